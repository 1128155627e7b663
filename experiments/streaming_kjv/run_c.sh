#!/usr/bin/env bash
# bash experiments/streaming_kjv/run_c.sh OUTDIR    (GPU; the reduced run that fit this session's budget)
# First 100,000 tokens of the KJV: sinks (4+2044) vs window only (0+2048), chunks of 64 (within 4e-4 of
# token by token, see prefix_chunk*.json); dense 2k-window reference on the same tokens; dense cache to 32k.
set -euo pipefail
out=${1:-experiments/streaming_kjv}
s="python -m longctx.cli stream-ppl --model smollm2-135m --corpus kjv --dtype bf16"
$s --max-tokens 100000 --policy sinks,window --chunk-size 64 --curve-every 10000 --out "$out/kjv100k_sinks_window.json"
python -m longctx.cli ppl --model smollm2-135m --corpus kjv --max-tokens 100000 --lengths 2048 --dtype bf16 \
  --out "$out/kjv100k_dense_2k_windows.json"
$s --max-tokens 32768 --policy dense --chunk-size 512 --curve-every 4096 --out "$out/kjv_dense_32k.json"
