#!/usr/bin/env bash
# bash experiments/multigpu_tiny/run.sh ddp fsdp deepspeed_zero2 deepspeed_zero3      (on 2 GPUs, from the repo root)
# The tiny LongLoRA recipe (configs/tiny/longlora_cpu.yaml: S2-Attn auto, LoRA+, checkpointing) under each
# accelerate config of configs/accelerate/ on 2 processes: 6 steps with a checkpoint at step 3, then a second run
# resumed from that checkpoint; compare.py then checks that the resumed run logs the same losses and writes the
# same artifact, and that both artifacts merge (`longctx merge`) into plain models with identical logits.
# EXTRA: more overrides (e.g. EXTRA=train.mixed_precision=bf16 SUFFIX=_bf16, written to runs/multigpu_tiny_bf16).
# Output: runs/multigpu_tiny/<config>/{full,resumed,merged_full,merged_resumed}, and compare.py's lines.
set -uo pipefail
out=runs/multigpu_tiny
common=(--config configs/tiny/longlora_cpu.yaml --no-wandb train.steps=6 train.checkpoint_every=3 eval.every=0 ${EXTRA:-})
out=$out${SUFFIX:-}
python3 -c "from longctx import train; train.make_tiny('runs/tiny-longlora/base', 'runs/tiny-longlora/corpus.jsonl')"
for c in "$@"; do
  launch=(python3 -m accelerate.commands.launch --config_file "configs/accelerate/$c.yaml" --num_processes 2)
  rm -rf "$out/$c"
  echo "== $c: 6 steps"
  "${launch[@]}" recipes/longlora_finetune.py "${common[@]}" "output_dir=$out/$c/full" > "$out.$c.full.log" 2>&1 \
    || { echo "$c: the run failed"; tail -25 "$out.$c.full.log"; continue; }
  echo "== $c: resumed from step 3"
  "${launch[@]}" recipes/longlora_finetune.py "${common[@]}" "output_dir=$out/$c/resumed" \
    "resume_from=$out/$c/full/checkpoints/step_000003" > "$out.$c.resumed.log" 2>&1 \
    || { echo "$c: the resumed run failed"; tail -25 "$out.$c.resumed.log"; continue; }
  for run in full resumed; do
    python3 -m longctx.cli merge "$out/$c/$run/final" --out "$out/$c/merged_$run" > /dev/null 2>&1 \
      || { echo "$c: merge of $run failed"; python3 -m longctx.cli merge "$out/$c/$run/final" --out "$out/$c/merged_$run" 2>&1 | tail -5; }
  done
  python3 experiments/multigpu_tiny/compare.py "$c" "$out/$c"
done
