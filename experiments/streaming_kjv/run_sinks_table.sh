#!/usr/bin/env bash
# bash experiments/streaming_kjv/run_sinks_table.sh OUTDIR   (GPU; the sinks table of run_b.sh alone)
set -euo pipefail
out=${1:-experiments/streaming_kjv}
s="python -m longctx.cli stream-ppl --model smollm2-135m --corpus kjv --dtype bf16"
for k in 0 1 2 4 8; do
  $s --max-tokens 200000 --sink-size $k --window-size $((2048 - k)) --policy sinks --chunk-size 128 \
     --out "$out/sinks_${k}.json"
done
