#!/usr/bin/env bash
# bash experiments/longlora_compile/run.sh OUT_DIR
# The SmolLM2 LongLoRA recipe (configs/smollm2/135m_longlora_32k.yaml: 4 x 32k tokens per step, flex
# S2-Attn, checkpointing) for 8 steps, eager and with train.compile=true, evaluation and wandb off.
# Prints each step's seconds and loss from log.jsonl and the median of steps 3-8 (step 1 compiles).
set -euo pipefail
out=${1:-runs/longlora_compile}
for variant in eager compile; do
  flag=false; [ "$variant" = compile ] && flag=true
  python3 recipes/longlora_finetune.py --config configs/smollm2/135m_longlora_32k.yaml --no-wandb \
    output_dir="$out/$variant" train.steps=8 train.checkpoint_every=100 eval.every=0 train.compile=$flag
done
python3 - "$out" <<'PY'
import statistics, sys
from pathlib import Path
from longctx.train import read_log  # a NaN loss is the string "NaN" in log.jsonl (strict JSON): back to the float
rows = {v: read_log(Path(sys.argv[1]) / v) for v in ("eager", "compile")}
print("| step | eager s | eager loss | compile s | compile loss |\n|---:|---:|---:|---:|---:|")
for e, c in zip(rows["eager"], rows["compile"]):
    print(f"| {e['step']} | {e['step_seconds']:.3f} | {e['loss']:.4f} | {c['step_seconds']:.3f} | {c['loss']:.4f} |")
med = {v: statistics.median(r["step_seconds"] for r in rows[v] if r["step"] >= 3) for v in rows}
print(f"median s/step (steps 3-8): eager {med['eager']:.3f}, compile {med['compile']:.3f}: "
      f"{med['eager'] / med['compile']:.2f}x; peak GiB eager {rows['eager'][-1].get('max_memory_gib', 0):.1f}, "
      f"compile {rows['compile'][-1].get('max_memory_gib', 0):.1f}")
PY
