#!/usr/bin/env bash
# bash experiments/streaming_kjv/run_b.sh OUTDIR     (GPU; part B: baselines and the sinks table)
set -euo pipefail
out=${1:-experiments/streaming_kjv}
# dense reference at 2k context: non-overlapping 2048-token windows, every token scored
python -m longctx.cli ppl --model smollm2-135m --corpus kjv --lengths 2048,8192 --dtype bf16 \
  --out "$out/kjv_dense_windows.json"
s="python -m longctx.cli stream-ppl --model smollm2-135m --corpus kjv --dtype bf16"
# dense cache beyond the trained 8k: positions run past it
$s --max-tokens 32768 --policy dense --chunk-size 512 --curve-every 4096 --out "$out/kjv_dense_32k.json"
# the sinks table (paper's Table 1 shape): 0/1/2/4/8 sinks, 2048 cached tokens, first 200k tokens, chunks of 128
for k in 0 1 2 4 8; do
  $s --max-tokens 200000 --sink-size $k --window-size $((2048 - k)) --policy sinks --chunk-size 128 \
     --out "$out/sinks_${k}.json"
done
