"""Per-token decode latency and memory of StreamingLLM caches, against dense decoding and sliding
window with recomputation, in one process.

    python benchmarks/streaming_decode.py --model smollm2-135m --caches 2048,4096 --out OUT.json
    python benchmarks/streaming_decode.py --llama2-7b-layers 32 --caches 2048,4096 --out OUT.json
    python benchmarks/streaming_decode.py --cpu-smoke
    add --compile: also SinkDecoder(compile=True) after the longest stream and a compiled dense step
    (torch.compile inside the CUDA graph)

For each cache size C (sinks 4, window C - 4), the median latency of one decode step (CUDA events):
  sink@N        longctx's SinkDecoder (static ring buffers, the step replayed as one CUDA graph) after
                N streamed tokens (N = 10k, 100k, 1M: the stream is prefilled in window-sized chunks
                through the SinkCache, then tokens are decoded one by one; every step evicts one token)
  sink_eager@N  the same steps through SinkCache itself, no graph (what model.generate runs)
  dense         a static cache holding C tokens, one query attending to all of them, no eviction,
                replayed as a CUDA graph too: the cost of attention over C keys (dense_eager: a
                DynamicCache of C tokens, eager)
  recompute     a fresh forward over the last C tokens per new token (the paper's sliding window with
                recomputation baseline; eager, as in the paper), the logits of the last position only
                (``recompute_step``: the one row a new token needs, as the sink and dense steps compute)
With --loop, each step kind is also timed inside the generation loop that longctx.chat.stream_generate
runs for greedy decoding (``greedy_loop``: the argmax is fed back on the device and the next step is
queued before the host reads the token), as wall time per token over the loop (*_loop_ms).
and peak memory after each N. Targets (issue 3): sink latency flat within 10% from 10k to 1M,
peak memory constant, recompute/sink >= 20x at C=4096, dense/sink >= 0.9.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import longctx  # noqa: E402
from longctx.chat import greedy_loop  # noqa: E402
from longctx.methods.sink_decoder import SinkDecoder  # noqa: E402
from longctx.methods.streaming import prefill  # noqa: E402
from longctx.utils import recompile_room  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402


class DenseStaticLayer(CacheLayerMixin):
    """C filled slots; a step writes its token into the last one and attends to all C (no eviction)."""

    is_sliding, is_compileable = False, False

    def __init__(self, keys, values, slot):
        super().__init__()
        self.keys, self.values, self.slot, self.is_initialized = keys, values, slot, True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.slot, key_states)
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values

    def get_seq_length(self):
        return self.keys.shape[-2] - 1

    def get_mask_sizes(self, query_length):
        return self.keys.shape[-2] - 1 + query_length, 0

    def get_max_length(self):
        return -1


def graphed(fn, warmup: int = 3, outputs: list | None = None):
    """fn captured as a CUDA graph (after warm-up on a side stream); returns its replay. ``outputs``: a
    list that receives the captured call's output (static tensors that each replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    if outputs is not None:
        outputs.append(out)
    return graph.replay


# torch.compile settings (keyword arguments) that --compile-variants can time
COMPILE_VARIANTS = {
    "default": {},
    "cdt": {"options": {"coordinate_descent_tuning": True}},  # tuned launch configs of the fused kernels
    "autotune": {"mode": "max-autotune-no-cudagraphs"},  # Triton matmul templates against cuBLAS
    # freezing: weights become constants, so inductor concatenates the linears that share an input
    # (q/k/v, gate/up) into one matmul each; costs a concatenated copy of those weights
    "freeze": {"options": {"freezing": True}},
    "freeze_autotune": {"options": {"freezing": True, "max_autotune": True}},  # (mode and options exclude each other)
}


def suffix(variant: str) -> str:
    """Row-key infix of a compile variant ("" for the default, so older results read the same)."""
    return "" if variant == "default" else f"_{variant}"


def dense_static_step(model, C, device):
    """One decode step over a static cache of C tokens (random contents: timing only)."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    shape = (cfg.num_hidden_layers, 1, kv_heads, C, head_dim)
    keys, values = torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)
    slot = torch.tensor([C - 1], device=device)
    cache = Cache(layers=[DenseStaticLayer(keys[i], values[i], slot) for i in range(shape[0])])
    ids = torch.randint(0, cfg.vocab_size, (1, 1), device=device)
    pos = torch.full((1, 1), C - 1, device=device)
    step = lambda: model(ids, position_ids=pos, past_key_values=cache, use_cache=True)  # noqa: E731
    step.ids = ids  # the static input a loop writes its token into
    return step


def recompute_step(model, ids):
    """Sliding window with recomputation: a forward over the C tokens of ``ids`` (1, C) without a cache, ->
    logits (1, 1, V) of the last position. ``logits_to_keep=1``: by default transformers applies the output
    embedding to all C positions, C - 1 rows of work (and a (C, V) logits tensor) that the decode steps it is
    compared with never do."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return model(ids, use_cache=False, **keep).logits[:, -1:]


def loop_ms(logits, feed, n: int, device) -> float:
    """Milliseconds per token of longctx's greedy generation loop (``chat.greedy_loop``, what
    ``stream_generate`` runs): argmax on the device, fed back without a host round trip, the next step
    queued before the host reads the token. n + 1 tokens, n steps, wall time over the whole loop."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in greedy_loop(logits, feed, n + 1):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def dense_loop(model, C, device, n):
    """The graphed dense step inside the generation loop: ms per token."""
    step, out = dense_static_step(model, C, device), []
    replay = graphed(step, outputs=out)

    def feed(token):
        step.ids.copy_(token)
        replay()
        return out[0].logits[0, -1]
    replay()
    return loop_ms(out[0].logits[0, -1], feed, n, device)


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
    cuda = device.type == "cuda"
    model, name = load(args)
    vocab = model.config.vocab_size

    def measure(fn, n):
        return median_ms(fn, n, device)

    token = torch.randint(0, vocab, (1, 1), device=device)
    rows = []
    for C in args.caches:
        sink, window = 4, C - 4
        row = {"cache": C}
        # dense: a DynamicCache holding C tokens (eager), and a static C-token cache (CUDA graph)
        dense = DynamicCache(config=model.config)
        model(torch.randint(0, vocab, (1, C - 1), device=device), past_key_values=dense, use_cache=True)

        def dense_step():  # C - 1 cached + the new token; cropped back so every step sees C keys
            model(token, past_key_values=dense, use_cache=True)
            dense.crop(-1)
        row["dense_eager_ms"] = measure(dense_step, args.steps)
        dense_step = dense = None  # free it
        if cuda:
            row["dense_ms"] = measure(graphed(dense_static_step(model, C, device)), args.steps)
            if args.loop:
                row["dense_loop_ms"] = dense_loop(model, C, device, args.steps)
            for v in args.compile_variants:
                compiled = torch.compile(model, **{"dynamic": False, **COMPILE_VARIANTS[v]})
                row[f"dense_compiled{suffix(v)}_ms"] = measure(graphed(dense_static_step(compiled, C, device)),
                                                              args.steps)
                if args.loop:
                    row[f"dense_compiled{suffix(v)}_loop_ms"] = dense_loop(compiled, C, device, args.steps)
                compiled = None
        # recompute: a forward over C tokens per new token
        window_ids = torch.randint(0, vocab, (1, C), device=device)
        recompute_step(model, window_ids)
        row["recompute_ms"] = measure(lambda: recompute_step(model, window_ids), max(3, args.steps // 10))
        row["recompute_logits"] = "last"  # committed runs before this field computed the logits of all C positions
        if args.loop:  # the same forward in the generation loop: the window slides on the device
            ring = [window_ids]

            def recompute_feed(token):
                ring[0] = torch.cat([ring[0][:, 1:], token], dim=1)
                return recompute_step(model, ring[0])[0, -1]
            row["recompute_loop_ms"] = loop_ms(recompute_step(model, window_ids)[0, -1], recompute_feed,
                                               max(3, args.steps // 10), device)
        # sink cache after N streamed tokens
        with longctx.applied(model, "streaming", sink_size=sink, window_size=window) as patch:
            cache, streamed = patch.new_cache(), 0
            for n in args.stream:
                prefill(model, torch.randint(0, vocab, (1, n - streamed), device=device), cache, chunk_size=window)
                streamed = n
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(3):
                    model(token, past_key_values=cache, use_cache=True)
                row[f"sink_eager_ms@{n}"] = measure(lambda: model(token, past_key_values=cache, use_cache=True),
                                                    args.steps)
                with SinkDecoder(model, cache, cuda_graph=cuda) as decoder:
                    for _ in range(3):  # warm-up, then the graph is captured
                        decoder.step(token)
                    row[f"sink_ms@{n}"] = measure(lambda: decoder.step(token), args.steps)
                    streamed += 3 + 2 * args.steps + 3
                    if args.loop:
                        row[f"sink_loop_ms@{n}"] = loop_ms(decoder.step(token)[0, -1],
                                                           lambda t: decoder.step(t)[0, -1], args.steps, device)
                        streamed += args.steps + 1
                decoder = None  # its buffers and graph go: the next N starts from the cache alone
                gc.collect()
                if cuda:  # memory along the stream, before any compiled decoder (compile/autotune memory)
                    row[f"peak_gib@{n}"] = torch.cuda.max_memory_allocated() / 2**30
                    row[f"allocated_gib@{n}"] = torch.cuda.memory_allocated() / 2**30
                for v in args.compile_variants if n == args.stream[-1] else ():  # after the longest stream
                    with SinkDecoder(model, cache, cuda_graph=cuda, compile=COMPILE_VARIANTS[v]) as decoder:
                        for _ in range(3):
                            decoder.step(token)
                        row[f"sink_compiled{suffix(v)}_ms@{n}"] = measure(lambda: decoder.step(token), args.steps)
                        streamed += 3 + args.steps
                        if args.loop:
                            row[f"sink_compiled{suffix(v)}_loop_ms@{n}"] = loop_ms(
                                decoder.step(token)[0, -1], lambda t: decoder.step(t)[0, -1], args.steps, device)
                            streamed += args.steps + 1
                    decoder = None
                gc.collect()  # this N's decoders and their graphs go
                assert cache.layers[0].keys.shape[-2] <= C
        sinks = [row[f"sink_ms@{n}"] for n in args.stream]
        row["sink_spread"] = max(sinks) / min(sinks) - 1
        row["recompute_over_sink"] = row["recompute_ms"] / sinks[-1]
        row["dense_over_sink"] = row.get("dense_ms", row["dense_eager_ms"]) / sinks[-1]
        eager = row[f"sink_eager_ms@{args.stream[-1]}"]
        row["eager_recompute_over_sink"] = row["recompute_ms"] / eager
        row["eager_dense_over_sink"] = row["dense_eager_ms"] / eager
        if args.loop:
            last = row[f"sink_loop_ms@{args.stream[-1]}"]
            row["loop_recompute_over_sink"] = row["recompute_loop_ms"] / last
            if "dense_loop_ms" in row:
                row["loop_dense_over_sink"] = row["dense_loop_ms"] / last
            for v in args.compile_variants:
                last = row[f"sink_compiled{suffix(v)}_loop_ms@{args.stream[-1]}"]
                row[f"compiled{suffix(v)}_loop_recompute_over_sink"] = row["recompute_loop_ms"] / last
                if f"dense_compiled{suffix(v)}_loop_ms" in row:
                    row[f"compiled{suffix(v)}_loop_dense_over_sink"] = row[f"dense_compiled{suffix(v)}_loop_ms"] / last
        for v in args.compile_variants:
            last = row[f"sink_compiled{suffix(v)}_ms@{args.stream[-1]}"]
            row[f"compiled{suffix(v)}_recompute_over_sink"] = row["recompute_ms"] / last
            if f"dense_compiled{suffix(v)}_ms" in row:
                row[f"compiled{suffix(v)}_dense_over_sink"] = row[f"dense_compiled{suffix(v)}_ms"] / last
        if cuda:
            peaks = [row[f"peak_gib@{n}"] for n in args.stream]
            row["peak_spread"] = max(peaks) / min(peaks) - 1
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
    p.add_argument("--compile", action="store_true",
                   help="also time SinkDecoder(compile=True) and a compiled dense step (torch.compile inside the graph)")
    p.add_argument("--compile-variants", default=None,
                   help=f"comma-separated torch.compile settings to time, of: {', '.join(COMPILE_VARIANTS)} "
                        f"(--compile alone: default)")
    p.add_argument("--loop", action="store_true",
                   help="also time each step kind inside longctx's greedy generation loop (chat.greedy_loop: "
                        "tokens fed back on the device, the next step queued before the host reads a token)")
    args = p.parse_args()
    if args.cpu_smoke:
        args.device, args.caches, args.stream, args.steps, args.dtype = "cpu", "32,64", "200,1000", 5, "fp32"
    else:
        args.device = "cuda"
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.compile_variants = (args.compile_variants.split(",") if args.compile_variants
                             else ["default"] if args.compile else [])
    bad = [v for v in args.compile_variants if v not in COMPILE_VARIANTS]
    if bad:
        p.error(f"--compile-variants: unknown {bad}; allowed: {', '.join(COMPILE_VARIANTS)}")
    args.caches = [int(x) for x in args.caches.split(",")]
    args.stream = [int(x) for x in args.stream.split(",")]
    # every compiled variant (cache size x variant x dense/sink) is one more entry for the model's forward:
    # past dynamo's default limit of 8 the rest would quietly run eager
    with recompile_room():
        name, rows = run(args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{name} | {gpu} | torch {torch.__version__} | median of {args.steps} steps\n")
    cols = [f"sink_ms@{n}" for n in args.stream]
    print("CUDA graph steps (SinkDecoder; dense: static cache):")
    print("| cache | " + " | ".join(cols) + " | dense ms | recompute ms | recompute/sink | dense/sink | spread |")
    print("|---" * (len(cols) + 6) + "|")
    for r in rows:
        print(f"| {r['cache']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {r.get('dense_ms', float('nan')):.3f} | {r['recompute_ms']:.2f} | {r['recompute_over_sink']:.1f}x"
              + f" | {r['dense_over_sink']:.2f} | {r['sink_spread']:.1%} |")
    cols = [f"sink_eager_ms@{n}" for n in args.stream]
    print("\nEager steps (SinkCache, as model.generate; dense: DynamicCache):")
    print("| cache | " + " | ".join(cols) + " | dense ms | recompute/sink | dense/sink |")
    print("|---" * (len(cols) + 4) + "|")
    for r in rows:
        print(f"| {r['cache']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {r['dense_eager_ms']:.3f} | {r['eager_recompute_over_sink']:.1f}x | {r['eager_dense_over_sink']:.2f} |")
    if args.compile_variants:  # compiled once per cache size and variant, after the longest stream
        n = args.stream[-1]
        print(f"\ntorch.compile + CUDA graph steps (after {n} tokens):")
        print("| cache | compile | sink ms | dense ms | recompute/sink | dense/sink |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rows:
            for v in args.compile_variants:
                x = suffix(v)
                print(f"| {r['cache']} | {v} | {r[f'sink_compiled{x}_ms@{n}']:.3f} | "
                      f"{r.get(f'dense_compiled{x}_ms', float('nan')):.3f} | "
                      f"{r[f'compiled{x}_recompute_over_sink']:.1f}x | "
                      f"{r.get(f'compiled{x}_dense_over_sink', float('nan')):.2f} |")
    if args.loop:
        n = args.stream[-1]
        print(f"\nPer token in the generation loop (greedy_loop; after {n} tokens), ms:")
        print("| cache | step | sink | dense | recompute | recompute/sink | dense/sink |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            for v in ["graph"] + args.compile_variants:
                x = "" if v == "graph" else f"_compiled{suffix(v)}"
                pre = "loop" if v == "graph" else f"compiled{suffix(v)}_loop"
                print(f"| {r['cache']} | {v} | {r[f'sink{x}_loop_ms@{n}']:.3f} | "
                      f"{r.get(f'dense{x}_loop_ms', float('nan')):.3f} | {r['recompute_loop_ms']:.2f} | "
                      f"{r[f'{pre}_recompute_over_sink']:.1f}x | {r.get(f'{pre}_dense_over_sink', float('nan')):.2f} |")
    if any("peak_gib@" + str(n) in r for r in rows for n in args.stream):
        print("\npeak GiB after N tokens: " + "; ".join(
            f"C={r['cache']}: " + ", ".join(f"{r[f'peak_gib@{n}']:.3f}" for n in args.stream) for r in rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": name, "gpu": gpu, "torch": torch.__version__,
                                              "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
