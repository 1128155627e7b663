"""python experiments/multigpu_tiny/compare.py NAME RUN_DIR: the resumed run against the uninterrupted one (see run.sh)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

name, root = sys.argv[1], Path(sys.argv[2])


def losses(run):
    from longctx.train import read_log  # a NaN loss is the string "NaN" in log.jsonl (strict JSON): back to the float
    return {r["step"]: r["loss"] for r in read_log(root / run) if "loss" in r}


def tensors(run):
    found = {}
    for f in sorted((root / run / "final").glob("*.safetensors")):
        found.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return found


full, resumed = losses("full"), losses("resumed")
same_losses = sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in resumed)
a, b = tensors("full"), tensors("resumed")
same_artifact = a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
ids = torch.randint(3, 40, (1, 128), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = [AutoModelForCausalLM.from_pretrained(root / f"merged_{run}").eval()(ids).logits for run in ("full", "resumed")]
config = json.loads((root / "merged_full/config.json").read_text())
print(json.dumps({
    "config": name, "losses_full": [full[s] for s in sorted(full)], "losses_resumed_4_6": [resumed[s] for s in sorted(resumed)],
    "resumed_losses_equal": same_losses, "artifact_tensors": len(a), "artifacts_equal": same_artifact,
    "merged_logits_equal": bool(torch.equal(*logits)), "merged_rope": config.get("rope_parameters"),
    "merged_max_position_embeddings": config.get("max_position_embeddings"),
}))
