#!/usr/bin/env bash
# bash experiments/longlora_compile_layer/run.sh OUT_DIR
# The SmolLM2 LongLoRA recipe (configs/smollm2/135m_longlora_32k.yaml: 4 x 32k tokens per step, flex
# S2-Attn, checkpointing, train.compile on) for 8 steps, with each decoder layer's parts compiled
# (train.compile_scope=parts) and with each whole layer compiled (layer); S2-Attn and full attention
# (s2attn.enabled=false). Evaluation and wandb off. Prints each step's seconds and loss from log.jsonl and
# the median of steps 3-8 (step 1 compiles).
set -euo pipefail
out=${1:-runs/longlora_compile_layer}
variants="s2_parts s2_layer full_parts full_layer"
for variant in $variants; do
  s2=true; [ "${variant%%_*}" = full ] && s2=false
  python3 recipes/longlora_finetune.py --config configs/smollm2/135m_longlora_32k.yaml --no-wandb \
    output_dir="$out/$variant" train.steps=8 train.checkpoint_every=100 eval.every=0 train.compile=true \
    train.compile_scope="${variant#*_}" s2attn.enabled=$s2 2>&1 | grep -v "Warning\|warn" | tail -3
done
python3 - "$out" $variants <<'PY'
import statistics, sys
from pathlib import Path
from longctx.train import read_log  # a NaN loss is the string "NaN" in log.jsonl (strict JSON): back to the float
out, variants = Path(sys.argv[1]), sys.argv[2:]
rows = {v: [r for r in read_log(out / v) if "loss" in r] for v in variants}
print("| step | " + " | ".join(f"{v} s | {v} loss" for v in variants) + " |")
print("|---:|" + "---:|---:|" * len(variants))
for i, r in enumerate(rows[variants[0]]):
    print(f"| {r['step']} | " + " | ".join(f"{rows[v][i]['step_seconds']:.3f} | {rows[v][i]['loss']:.4f}" for v in variants) + " |")
med = {v: statistics.median(r["step_seconds"] for r in rows[v] if r["step"] >= 3) for v in variants}
print("median s/step (steps 3-8): " + ", ".join(f"{v} {med[v]:.3f}" for v in variants))
print(f"S2 layer vs S2 parts: {med['s2_parts'] / med['s2_layer']:.2f}x; S2/full with parts: "
      f"{med['full_parts'] / med['s2_parts']:.2f}x; with layer: {med['full_layer'] / med['s2_layer']:.2f}x")
print("peak GiB: " + ", ".join(f"{v} {rows[v][-1].get('max_memory_gib', 0):.1f}" for v in variants))
PY
