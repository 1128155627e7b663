#!/usr/bin/env bash
# bash experiments/streaming_generate/run.sh OUT_DIR [NEW_TOKENS]
# `longctx generate` on SmolLM2 (bf16, GPU) with the streaming patch (4 sinks + 1020 window), greedy,
# NEW_TOKENS new tokens (default 4000; --ignore-eos), once per decoding path:
#   generate  model.generate through the SinkCache (the default)
#   graph     --decoder graph: SinkDecoder once the cache is full (a CUDA graph per step)
#   compile   --decoder compile: the same with torch.compile inside the graph
# Each run is its own process; the tokens/s line (stderr) includes prefill and any compilation.
# Then: how far the three texts agree.
set -euo pipefail
out=${1:-runs/streaming_generate}
n=${2:-4000}
mkdir -p "$out"
prompt="It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
for d in generate graph compile; do
  flag=(); [ "$d" != generate ] && flag=(--decoder "$d")
  python3 -m longctx.cli generate --model smollm2-135m --dtype bf16 --device cuda \
    --method streaming:sink_size=4:window_size=1020 --prompt "$prompt" --max-new-tokens "$n" --ignore-eos \
    "${flag[@]}" > "$out/$d.txt" 2> "$out/$d.err"
  echo "$d: $(grep '^\[' "$out/$d.err" | tail -1)"
done
python3 - "$out" <<'PY'
import sys
from pathlib import Path
t = {d: (Path(sys.argv[1]) / f"{d}.txt").read_text() for d in ("generate", "graph", "compile")}
for d in ("graph", "compile"):
    a, b = t["generate"], t[d]
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"{d} vs generate: {len(b)} vs {len(a)} characters, identical for the first {k}")
PY
