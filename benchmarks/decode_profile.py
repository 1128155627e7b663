"""Where the time of one batch-1 decode step goes (issue 3: recompute/sink >= 20x needs a faster step).

    python benchmarks/decode_profile.py --llama2-7b-layers 32 --cache 4096 --out OUT.json
    python benchmarks/decode_profile.py --cpu-smoke

On one GPU, in one process:
  bandwidth   the measured HBM read bandwidth (a sum over a 4 GiB tensor) and copy bandwidth
  floor       (weights + cache bytes) / measured read bandwidth: the step if it only streamed memory (of the
              input embedding only the token's row: its table is not counted unless tied to the output one)
  gemv        cuBLAS matmuls of one token against each distinct weight shape of a layer, every
              layer's own weight (no L2 reuse), L of them captured in one CUDA graph: ms and GB/s
  sdpa        one query against C cached keys (the decode attention), each SDPA kernel forced,
              L calls (distinct caches) in one CUDA graph
  step        the dense static-cache step of streaming_decode.py (C cached tokens, one new one), per
              compile variant: median of its CUDA-graph replay, and the sum of its kernels' times
              from torch.profiler (eager launches) grouped into matmul / attention / other, so that
              step - kernel sum is the gaps between kernels
  sink step   the same for longctx's SinkDecoder (--sinks sinks + the rest window, evicting every step),
              plus its bare graph replay and the kernels the profiler sees inside the graph
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_decode import COMPILE_VARIANTS, dense_static_step, graphed  # noqa: E402
from timing import median_ms  # noqa: E402

from longctx.utils import recompile_room, strict_dumps  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def kind(name: str) -> str:
    """Kernel family from its CUDA name (inductor's Triton kernels by the ops fused into them)."""
    n = name.lower()
    if n.startswith("triton_"):
        return "matmul" if re.search(r"(^|_)(mm|bmm|addmm)(_|$)", n) else "other"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention", "sdpa", "attn")):
        return "attention"
    if any(s in n for s in ("gemm", "gemv", "cutlass", "xmma", "sm90_", "sm80_", "triton_tem", "splitk")):
        return "matmul"
    return "other"


def read_bandwidth(device, gib: float = 4.0) -> dict:
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    x.sum()
    read = median_ms(lambda: x.sum(), 20, device)
    copy = median_ms(lambda: y.copy_(x), 20, device)
    nbytes = x.numel() * 2
    return {"read_gbs": nbytes / read / 1e6, "copy_gbs": 2 * nbytes / copy / 1e6}


def graph_ms(fn, n: int, device) -> float:
    """Median ms of fn replayed as a CUDA graph (eager fn on CPU)."""
    return median_ms(graphed(fn) if device.type == "cuda" else fn, n, device)


def gemv_table(cfg, L, dtype, device, steps) -> list[dict]:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kvh = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    rows = []
    for label, (n_out, n_in) in {"q/o (h x h)": (h, h), "k/v (kv x h)": (kvh, h), "gate/up (i x h)": (inter, h),
                                 "down (h x i)": (h, inter), "qkv fused (h+2kv x h)": (h + 2 * kvh, h),
                                 "gate+up fused (2i x h)": (2 * inter, h)}.items():
        ws = [torch.randn(n_out, n_in, dtype=dtype, device=device) / n_in**0.5 for _ in range(L)]
        x = torch.randn(1, 1, n_in, dtype=dtype, device=device)

        def run():
            for w in ws:
                F.linear(x, w)
        ms = graph_ms(run, steps, device)
        nbytes = L * n_out * n_in * 2
        rows.append({"matmul": label, "calls": L, "ms": ms, "per_call_us": 1e3 * ms / L, "gbs": nbytes / ms / 1e6})
        ws = None
    return rows


def sdpa_table(cfg, L, C, dtype, device, steps) -> list[dict]:
    H, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    q = torch.randn(1, H, 1, D, dtype=dtype, device=device)
    kv = [(torch.randn(1, kvh, C, D, dtype=dtype, device=device), torch.randn(1, kvh, C, D, dtype=dtype, device=device))
          for _ in range(L)]
    rows = []
    if device.type == "cuda":  # FlexAttention without a mask: under torch.compile, q_len 1 runs its split-KV decode kernel
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def run():
            for k, v in kv:
                flex(q, k, v, enable_gqa=kvh != H)
        ms = graph_ms(run, steps, device)
        rows.append({"backend": "flex (compiled)", "calls": L, "ms": ms, "per_call_us": 1e3 * ms / L,
                     "gbs": L * 2 * kvh * C * D * 2 / ms / 1e6})
    for name, backend in BACKENDS.items():
        def run():
            with sdpa_kernel(backend):
                for k, v in kv:
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=kvh != H)
        try:
            ms = graph_ms(run, steps, device)
        except RuntimeError as e:  # the kernel refuses this shape or device
            rows.append({"backend": name, "error": str(e).splitlines()[0][:160]})
            continue
        nbytes = L * 2 * kvh * C * D * 2
        rows.append({"backend": name, "calls": L, "ms": ms, "per_call_us": 1e3 * ms / L, "gbs": nbytes / ms / 1e6})
    return rows


def launch_profile(fn, reps: int = 20) -> dict:
    """fn run alone (synchronised after each call), as median_ms times it: the host time of its
    cudaGraphLaunch / kernel launches, the delay from fn's first launch call to its first kernel,
    and its kernels' span (first start to last end)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            with torch.profiler.record_function("rep"):
                fn()
            torch.cuda.synchronize()
    ev = prof.events()
    reps_ = sorted((e for e in ev if e.name == "rep" and e.device_type.name == "CPU"), key=lambda e: e.time_range.start)
    kernels = sorted((e for e in ev if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    launches = sorted((e for e in ev if e.device_type.name == "CPU" and e.name.startswith("cuda")
                       and ("Launch" in e.name or "Memcpy" in e.name)), key=lambda e: e.time_range.start)
    rows = []
    for r, nxt in zip(reps_, reps_[1:] + [None]):  # a rep's kernels: those starting before the next rep starts
        end = nxt.time_range.start if nxt is not None else float("inf")
        k = [e for e in kernels if r.time_range.start <= e.time_range.start < end]
        lc = [e for e in launches if r.time_range.start <= e.time_range.start <= r.time_range.end]
        if not k or not lc:
            continue
        span = max(e.time_range.end for e in k) - k[0].time_range.start
        rows.append((lc[0].time_range.start, k[0].time_range.start - lc[0].time_range.start, span,
                     sum(e.time_range.elapsed_us() for e in lc), r.time_range.elapsed_us()))
    med = lambda i: sorted(x[i] for x in rows)[len(rows) // 2] / 1e3 if rows else float("nan")  # noqa: E731
    return {"first_kernel_delay_ms": med(1), "span_ms": med(2), "launch_host_ms": med(3), "host_ms": med(4),
            "launch_calls": sorted({e.name for e in launches})}


def kernel_profile(fn, device, reps: int = 5) -> dict:
    """Per-step device time of fn's kernels by family, from torch.profiler (eager launches)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by = defaultdict(float)
    count = defaultdict(int)
    top = defaultdict(float)
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    # idle device time between one kernel's end and the next one's start, by the pair of kernels around it
    gaps = defaultdict(float)
    for a, b in zip(events, events[1:]):
        gap = b.time_range.start - a.time_range.end
        if 0 < gap < 1000:  # the reps run back to back: their boundaries count too; a 1 ms+ pause is the host
            gaps[f"{a.name[:60]} -> {b.name[:60]}"] += gap
    for e in events:
        us = e.time_range.elapsed_us()  # a kernel: its own span on the device
        by[kind(e.name)] += us
        count[kind(e.name)] += 1
        top[e.name] += us
    out = {f"{k}_ms": v / reps / 1e3 for k, v in by.items()}
    out.update({f"{k}_kernels": c // reps for k, c in count.items()})
    out["kernel_sum_ms"] = sum(by.values()) / reps / 1e3
    out["top"] = [(n[:90], round(us / reps, 1)) for n, us in sorted(top.items(), key=lambda x: -x[1])[:12]]
    out["gap_ms"] = sum(gaps.values()) / reps / 1e3
    out["memcpy_nodes"] = sum("memcpy" in e.name.lower() or "memset" in e.name.lower() for e in events) // reps
    out["first_events"] = [e.name[:50] for e in events[:8]]
    out["top_gaps"] = [(n, round(us / reps, 1)) for n, us in sorted(gaps.items(), key=lambda x: -x[1])[:10]]
    return out


def bare_replay(decoder):
    """The decoder's captured step without ``step``'s input copy. The replay moves the ring on the device, so
    the host's ring pointer and position count move with it (``_stepped``, as in ``step``) and the cache
    handed back at ``close`` stays in order; the position reset is kept too."""
    def replay():
        if decoder.next_position > decoder.cache.max_position - 1:
            decoder._rerotate_all()
        decoder.graph.replay()
        decoder._stepped()
    return replay


def sink_rows(model, C, variants, device, steps, sinks=(4,)) -> list[dict]:
    """The same model's SinkDecoder step (``sink`` sinks + C - sink window, full and evicting), per sink
    count and variant: the median of ``decoder.step`` and of its bare graph replay, the kernel profile of
    the graph replay (the kernels inside the graph) and of a second decoder without the graph."""
    import longctx
    from longctx.methods.sink_decoder import SinkDecoder
    from longctx.methods.streaming import prefill

    cuda = device.type == "cuda"
    vocab = model.config.vocab_size
    token = torch.randint(0, vocab, (1, 1), device=device)
    rows = []
    for sink in sinks:
        with longctx.applied(model, "streaming", sink_size=sink, window_size=C - sink) as patch:
            cache = patch.new_cache()
            prefill(model, torch.randint(0, vocab, (1, C + 100), device=device), cache, chunk_size=C - 4)
            for v in variants:
                base, _, flag = v.partition("/")  # "default/eagerpos": the step's bookkeeping left eager
                kw = False if base == "eager" else COMPILE_VARIANTS[base]
                row = {"variant": v, "sink": sink}
                with SinkDecoder(model, cache, cuda_graph=cuda, compile=kw) as decoder:
                    if flag == "eagerpos":
                        decoder.positions = decoder._positions
                    for _ in range(3):
                        decoder.step(token)
                    row["step_ms"] = median_ms(lambda: decoder.step(token), steps, device)
                    if cuda:
                        replay = bare_replay(decoder)
                        row["replay_ms"] = median_ms(replay, steps, device)
                        row["graph"] = kernel_profile(replay, device)
                        row["graph_alone"] = launch_profile(replay)
                        row["step_alone"] = launch_profile(lambda: decoder.step(token))
                if cuda:
                    with SinkDecoder(model, cache, cuda_graph=False, compile=kw) as decoder:
                        if flag == "eagerpos":
                            decoder.positions = decoder._positions
                        row.update(kernel_profile(lambda: decoder.step(token), device))
                rows.append(row)
                print(json.dumps({"sink": row}), file=sys.stderr)
    return rows


@torch.inference_mode()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama2-7b-layers", type=int, default=32)
    ap.add_argument("--cache", type=int, default=4096)
    ap.add_argument("--variants", default="eager,default,autotune",
                    help=f"step variants: eager and/or compile variants of streaming_decode.py ({', '.join(COMPILE_VARIANTS)})")
    ap.add_argument("--sink-variants", default="eager,default,autotune",
                    help="the same, for SinkDecoder steps; VARIANT/eagerpos leaves the step's position bookkeeping "
                         "(SinkDecoder._positions) uncompiled")
    ap.add_argument("--sinks", default="4", help="sink counts of the SinkDecoder rows (0: window only, no sink rotation)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    # (empty names skipped, here and in the runs below: "eager," ran its steps, then failed on the empty one)
    variants, sink_variants = ([v for v in names.split(",") if v] for names in (args.variants, args.sink_variants))
    for flag, names in (("--variants", variants), ("--sink-variants", sink_variants)):
        for v in names:  # a typo would run under its own label (or fail after the others)
            base, _, pos = v.partition("/")
            flags = ("", "eagerpos") if flag == "--sink-variants" else ("",)
            if base not in ("eager", *COMPILE_VARIANTS) or pos not in flags:
                ap.error(f"{flag}: unknown {v!r}; allowed: eager, {', '.join(COMPILE_VARIANTS)}"
                         + (" (each optionally /eagerpos)" if flag == "--sink-variants" else ""))
    try:  # (as the names: "4," or a count the cache cannot hold failed after the dense steps had run)
        sinks = [int(x) for x in args.sinks.split(",") if x]
    except ValueError:
        ap.error(f"--sinks: expected comma-separated integers, got {args.sinks!r}")
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.cpu_smoke:
        device, dtype, C, steps = torch.device("cpu"), torch.float32, 64, 3
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                          num_hidden_layers=2, vocab_size=256, max_position_embeddings=256)
    else:
        device, dtype, C, steps = torch.device("cuda"), torch.bfloat16, args.cache, args.steps
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=args.llama2_7b_layers, vocab_size=32000, max_position_embeddings=4096)
    if sink_variants and not (sinks and all(0 <= x < C for x in sinks)):
        ap.error(f"--sinks: sink counts in 0..{C - 1} (the window is the cache {C} less the sinks), got {args.sinks!r}")
    L = cfg.num_hidden_layers
    cuda = device.type == "cuda"
    res = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "cache": C, "layers": L}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    res["weight_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    # what a step streams: a token's embedding is one row of the input table (unless it is tied to the output one)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    res["step_weight_gb"] = res["weight_gb"] - (0 if emb is head else emb.numel() * emb.element_size() / 1e9)
    res["cache_gb"] = 2 * L * cfg.num_key_value_heads * C * (cfg.hidden_size // cfg.num_attention_heads) * 2 / 1e9
    if cuda:
        res["bandwidth"] = read_bandwidth(device)
        res["floor_ms"] = (res["step_weight_gb"] + res["cache_gb"]) / res["bandwidth"]["read_gbs"] * 1e3
        print(json.dumps(res), file=sys.stderr)
        res["gemv"] = gemv_table(cfg, L, dtype, device, steps)
        res["sdpa"] = sdpa_table(cfg, L, C, dtype, device, steps)
    res["steps"] = []
    with recompile_room():
        for v in variants:
            m = model if v == "eager" else torch.compile(model, **{"dynamic": False, **COMPILE_VARIANTS[v]})
            fn = dense_static_step(m, C, device)
            row = {"variant": v, "step_ms": graph_ms(fn, steps, device)}
            if cuda:
                row.update(kernel_profile(fn, device))
                replay = graphed(fn)
                row["graph"] = kernel_profile(replay, device)
                row["graph_alone"] = launch_profile(replay)
            res["steps"].append(row)
            print(json.dumps(row), file=sys.stderr)
        res["sink_steps"] = sink_rows(model, C, sink_variants, device, steps,
                                     sinks) if sink_variants else []
    if args.out:
        Path(args.out).write_text(strict_dumps(res, indent=1))  # strict JSON: a NaN median as "NaN"
    if cuda:
        print(f"\n{res['gpu']}, torch {res['torch']}: Llama-2-7B shape x{L}, cache {C}, batch 1, bf16")
        b = res["bandwidth"]
        print(f"read {b['read_gbs']:.0f} GB/s, copy {b['copy_gbs']:.0f} GB/s; weights read "
              f"{res['step_weight_gb']:.2f} GB + cache {res['cache_gb']:.2f} GB -> floor {res['floor_ms']:.3f} ms")
        print("\n| matmul | us/call | GB/s |\n|---|---:|---:|")
        for r in res["gemv"]:
            print(f"| {r['matmul']} | {r['per_call_us']:.1f} | {r['gbs']:.0f} |")
        print("\n| sdpa decode | us/call | GB/s |\n|---|---:|---:|")
        for r in res["sdpa"]:
            print(f"| {r['backend']} | " + (f"{r['per_call_us']:.1f} | {r['gbs']:.0f} |" if "ms" in r else f"{r['error']} | |"))
        print("\n| step | graph ms | kernel sum | matmul | attention | other | kernels |\n|---|---:|---:|---:|---:|---:|---:|")
        for r in res["steps"] + [dict(r, variant=f"sink{r['sink']} {r['variant']}") for r in res["sink_steps"]]:
            n = sum(v for k, v in r.items() if k.endswith("_kernels"))
            print(f"| {r['variant']} | {r['step_ms']:.3f} | {r['kernel_sum_ms']:.3f} | {r.get('matmul_ms', 0):.3f} | "
                  f"{r.get('attention_ms', 0):.3f} | {r.get('other_ms', 0):.3f} | {n} |")
        if res["sink_steps"]:
            print("\n| SinkDecoder | step ms | graph replay ms | kernels in the graph, sum ms | count |\n|---|---:|---:|---:|---:|")
            for r in res["sink_steps"]:
                g = r["graph"]
                print(f"| sink {r['sink']}, {r['variant']} | {r['step_ms']:.3f} | {r['replay_ms']:.3f} | "
                      f"{g['kernel_sum_ms']:.3f} | {sum(v for k, v in g.items() if k.endswith('_kernels'))} |")
    else:
        print(json.dumps(res["steps"] + res["sink_steps"]))


if __name__ == "__main__":
    main()
