#!/usr/bin/env bash
# bash experiments/austen_rope/run.sh OUTDIR [CORPUS]     (CORPUS: austen-lines (default) or austen)
# Perplexity of SmolLM2-135M (8k trained context) with each RoPE method, on the first 65,536 tokens
# of Pride and Prejudice and of Emma: non-overlapping windows, scoring the last quarter of each
# window, bf16. The reference rows were measured this way on the novels as printed
# (austen-lines); austen is the same text with hard line wraps removed.
set -euo pipefail
out=${1:-experiments/austen_rope}
corpus=${2:-austen-lines}
python -m longctx.cli ppl --model smollm2-135m --corpus "$corpus" --docs "Pride and Prejudice,Emma" \
  --max-tokens 65536 --lengths 2048,8192,16384,32768 --score tail --dtype bf16 \
  --method none --method linear:factor=4 --method dynamic_ntk:factor=4 --method yarn:factor=4 \
  --method yarn:factor=8 --method ntk:factor=4 --method abf:rope_theta=1000000 \
  --out "$out/results_$corpus.json" | tee "$out/table_$corpus.md"
