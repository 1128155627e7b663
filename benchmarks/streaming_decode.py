"""Per-token decode latency and memory of StreamingLLM caches, against dense decoding and sliding
window with recomputation, in one process.

    python benchmarks/streaming_decode.py --model smollm2-135m --caches 2048,4096 --out OUT.json
    python benchmarks/streaming_decode.py --llama2-7b-layers 32 --caches 2048,4096 --out OUT.json
    python benchmarks/streaming_decode.py --cpu-smoke

For each cache size C (sinks 4, window C - 4) it measures, with CUDA events, the median latency of
one decode step:
  sink@N     a SinkCache after N streamed tokens (N = 10k, 100k, 1M; the stream is prefilled in
             window-sized chunks, then tokens are decoded one by one; every step evicts one token)
  dense      a DynamicCache holding C tokens (no eviction): the cost of attention over C keys
  recompute  a fresh forward over the last C tokens per new token (the paper's sliding window
             with recomputation baseline)
and peak memory after each N. Targets (issue 3): sink latency flat within 10% from 10k to 1M,
peak memory constant, recompute/sink >= 20x at C=4096, dense/sink >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import longctx  # noqa: E402
from longctx.methods.streaming import SinkCache, prefill  # noqa: E402
from transformers import DynamicCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402


def load(args):
    if args.cpu_smoke or args.llama2_7b_layers:
        from transformers import LlamaConfig, LlamaForCausalLM

        if args.cpu_smoke:
            cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=2, vocab_size=256, max_position_embeddings=256)
        else:  # Llama-2-7B shape, random weights
            cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                              num_key_value_heads=32, num_hidden_layers=args.llama2_7b_layers, vocab_size=32000,
                              max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(args.dtype)
        return model.eval(), f"llama2-7b-shape x{cfg.num_hidden_layers} layers" if not args.cpu_smoke else "tiny"
    model, _ = longctx.load_model(args.model, dtype=args.dtype, device=args.device)
    return model, args.model


@torch.inference_mode()
def run(args):
    device = torch.device(args.device)
    model, name = load(args)
    vocab = model.config.vocab_size
    def measure(fn, n):
        return median_ms(fn, n, device)

    token = torch.randint(0, vocab, (1, 1), device=device)
    rows = []
    for C in args.caches:
        sink, window = 4, C - 4
        row = {"cache": C}
        # dense: a DynamicCache holding C tokens, one new token per step (the cache grows by the steps)
        dense = DynamicCache(config=model.config)
        model(torch.randint(0, vocab, (1, C), device=device), past_key_values=dense, use_cache=True)
        for _ in range(3):
            model(token, past_key_values=dense, use_cache=True)
        row["dense_ms"] = measure(lambda: model(token, past_key_values=dense, use_cache=True), args.steps)
        del dense
        # recompute: a forward over C tokens per new token
        window_ids = torch.randint(0, vocab, (1, C), device=device)
        model(window_ids, use_cache=False)
        row["recompute_ms"] = measure(lambda: model(window_ids, use_cache=False), max(3, args.steps // 10))
        # sink cache after N streamed tokens
        with longctx.applied(model, "streaming", sink_size=sink, window_size=window) as patch:
            cache, streamed = patch.new_cache(), 0
            for n in args.stream:
                chunk = torch.randint(0, vocab, (1, n - streamed), device=device)
                prefill(model, chunk, cache, chunk_size=window)
                streamed = n
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(3):
                    model(token, past_key_values=cache, use_cache=True)
                row[f"sink_ms@{n}"] = measure(lambda: model(token, past_key_values=cache, use_cache=True), args.steps)
                streamed += 3 + args.steps
                if device.type == "cuda":
                    row[f"peak_gib@{n}"] = torch.cuda.max_memory_allocated() / 2**30
                assert cache.layers[0].keys.shape[-2] <= C
        sinks = [row[f"sink_ms@{n}"] for n in args.stream]
        row["sink_spread"] = max(sinks) / min(sinks) - 1
        row["recompute_over_sink"] = row["recompute_ms"] / sinks[-1]
        row["dense_over_sink"] = row["dense_ms"] / sinks[-1]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return name, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--llama2-7b-layers", type=int, default=0, help="random Llama-2-7B-shaped model with N layers")
    p.add_argument("--caches", default="2048,4096")
    p.add_argument("--stream", default="10000,100000,1000000", help="measure after this many streamed tokens")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--out")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    if args.cpu_smoke:
        args.device, args.caches, args.stream, args.steps, args.dtype = "cpu", "32,64", "200,1000", 5, "fp32"
    else:
        args.device = "cuda"
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.caches = [int(x) for x in args.caches.split(",")]
    args.stream = [int(x) for x in args.stream.split(",")]
    name, rows = run(args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{name} | {gpu} | torch {torch.__version__} | median of {args.steps} steps\n")
    cols = [f"sink_ms@{n}" for n in args.stream]
    print("| cache | " + " | ".join(cols) + " | dense ms | recompute ms | recompute/sink | dense/sink | spread |")
    print("|---" * (len(cols) + 6) + "|")
    for r in rows:
        print(f"| {r['cache']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {r['dense_ms']:.3f} | {r['recompute_ms']:.2f} | {r['recompute_over_sink']:.1f}x"
              + f" | {r['dense_over_sink']:.2f} | {r['sink_spread']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": name, "gpu": gpu, "torch": torch.__version__,
                                              "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
