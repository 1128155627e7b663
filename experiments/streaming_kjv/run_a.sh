#!/usr/bin/env bash
# bash experiments/streaming_kjv/run_a.sh OUTDIR     (GPU; part A: exactness of chunked mode, whole-Bible runs)
# SmolLM2-135M (bf16) streaming over the King James Bible (corpus kjv, ~993k tokens), cache 4 + 2044.
set -euo pipefail
out=${1:-experiments/streaming_kjv}
s="python -m longctx.cli stream-ppl --model smollm2-135m --corpus kjv --dtype bf16"
# 1. token by token (as generation) vs chunked, on the first 10,000 tokens
$s --max-tokens 10000 --policy sinks --chunk-size 1 --out "$out/prefix_chunk1.json"
$s --max-tokens 10000 --policy sinks --chunk-size 32 --out "$out/prefix_chunk32.json"
$s --max-tokens 10000 --policy sinks --chunk-size 64 --out "$out/prefix_chunk64.json"
# 2. the whole Bible, chunked: sinks vs window only (same cache size), memory recorded along the way
$s --policy sinks,window --chunk-size 64 --curve-every 50000 --out "$out/kjv_sinks_window.json"
