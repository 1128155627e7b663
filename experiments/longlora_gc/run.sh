#!/usr/bin/env bash
# bash experiments/longlora_gc/run.sh OUT_DIR [STEPS]
# The SmolLM2 LongLoRA recipe (configs/smollm2/135m_longlora_32k.yaml: 4 x 32k tokens per step, flex
# S2-Attn, checkpointing, compiled layers) for STEPS steps (default 20), with Python's automatic GC
# (train.gc_every=0, the default) and with train.gc_every=10 (automatic GC off; young generations
# collected after every step, everything every 10 steps); evaluation and wandb off.
# Prints each step's seconds and loss from log.jsonl and the median and mean of steps 3..STEPS
# (step 1 compiles).
set -euo pipefail
out=${1:-runs/longlora_gc}
steps=${2:-20}
for every in 0 10; do
  python3 recipes/longlora_finetune.py --config configs/smollm2/135m_longlora_32k.yaml --no-wandb \
    output_dir="$out/gc$every" train.steps=$steps train.checkpoint_every=1000 eval.every=0 train.gc_every=$every
done
python3 - "$out" <<'PY'
import statistics, sys
from pathlib import Path
from longctx.train import read_log  # a NaN loss is the string "NaN" in log.jsonl (strict JSON): back to the float
rows = {v: read_log(Path(sys.argv[1]) / v) for v in ("gc0", "gc10")}
print("| step | gc_every 0: s | loss | gc_every 10: s | loss |\n|---:|---:|---:|---:|---:|")
for a, b in zip(rows["gc0"], rows["gc10"]):
    print(f"| {a['step']} | {a['step_seconds']:.3f} | {a['loss']:.4f} | {b['step_seconds']:.3f} | {b['loss']:.4f} |")
for v, r in rows.items():
    t = [x["step_seconds"] for x in r if x["step"] >= 3]
    print(f"{v}: steps 3-{r[-1]['step']}: median {statistics.median(t):.3f} s, mean {statistics.mean(t):.3f} s, "
          f"max {max(t):.3f} s")
PY
