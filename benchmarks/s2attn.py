"""S2-Attn (LongLoRA shifted sparse attention) vs dense causal attention: forward + backward time.

    python benchmarks/s2attn.py --out benchmarks/results/s2attn_h100.json   # GPU: T = 8k..64k, bf16, 32 x 128
    python benchmarks/s2attn.py --cpu-smoke                                  # CPU: tiny T, fp32, code paths only

One attention call of batch 1, 32 heads of 128 (K/V heads: --kv-heads), q/k/v in the layout transformers
passes to attention functions ((B, T, H, D) memory seen as (B, H, T, D)), forward plus backward.
- dense: F.scaled_dot_product_attention(is_causal=True), each SDPA backend alone (cuDNN, flash,
  efficient; via torch.nn.attention.sdpa_kernel); the fastest is the reference.
- S2 (group_size_ratio 1/4 unless --ratio, half the heads shifted): longctx's s2_attention with each
  available backend: sdpa (again under each SDPA kernel, fastest kept), flex (compiled flex_attention,
  BlockMask built once and cached, as in training), flash (flash_attn varlen, if installed).
Time: median over repeats after warm-up (CUDA events; triton.testing.do_bench-style). Compile time of
flex is excluded (warm-up). TFLOP/s counts the FLOPs of the attended (query, key) pairs only: causal for
dense, within-group causal for S2; fwd = 4*D per pair per head, fwd+bwd = 3.5 x fwd.
speed-up = dense (fastest) ms / S2 ms. Target: >= 3x at 32k for ratio 1/4 (ideal 4x).
A Markdown table is printed last; --out writes JSON.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from longctx.methods.s2attn import (_Cache, flash_available, flex_available, group_size_for,  # noqa: E402
                                    s2_attention, shifted_head_count)
from longctx.utils import strict_dumps  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sdpa_backends(device):
    from torch.nn.attention import SDPBackend
    if device.type != "cuda":
        return {"math": SDPBackend.MATH, "cpu_flash": SDPBackend.FLASH_ATTENTION}
    out = {}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["cudnn"] = SDPBackend.CUDNN_ATTENTION
    out["flash"] = SDPBackend.FLASH_ATTENTION
    out["efficient"] = SDPBackend.EFFICIENT_ATTENTION
    return out


def timer(fn, device, warmup, target_s, min_rep, max_rep):
    """Median milliseconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = time.perf_counter() - t0
        n = int(min(max_rep, max(min_rep, target_s / max(est, 1e-6))))
        return median_ms(fn, n, device), n
    times = []
    for _ in range(min_rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min_rep


def parse_flex_variant(text):
    """'default' -> ("", {}); 'autotune' -> flex_mode max-autotune-no-cudagraphs; 'K=V,...' -> kernel options."""
    text = text.strip()
    if text in ("", "default"):
        return "", {}
    if text == "autotune":
        return "autotune", {"flex_mode": "max-autotune-no-cudagraphs"}
    opts = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        opts[k.strip()] = v.strip() in ("1", "true", "True") if k.strip().isupper() and not k.strip().startswith(
            ("BLOCK", "fwd_", "bwd_")) else int(v)
    return text, {"flex_kernel_options": opts}


def pairs_causal(n):
    return n * (n + 1) // 2


def s2_pairs(T, G, H, n_shift):
    """Attended (query, key) pairs of S2, summed over heads."""
    if T <= G:
        return H * pairs_causal(T)
    unshifted = sum(pairs_causal(min(G, T - s)) for s in range(0, T, G))
    shifted = pairs_causal(G // 2) + sum(pairs_causal(min(G, T - s)) for s in range(G // 2, T, G))
    return (H - n_shift) * unshifted + n_shift * shifted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.25, help="group_size_ratio")
    ap.add_argument("--shifted-heads", type=float, default=0.5)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--backends", default="sdpa,flex,flash", help="S2 backends to try (those available run)")
    ap.add_argument("--flex-variants", default="default",
                    help="';'-separated flex settings, each 'default', 'autotune' (flex_mode="
                         "'max-autotune-no-cudagraphs') or kernel options 'BLOCK_M=64,BLOCK_N=128,num_warps=4'")
    ap.add_argument("--dense-kernels", default=None, help="SDPA kernels for dense (default: all), e.g. cudnn")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=1.0, help="time spent per measurement (GPU)")
    ap.add_argument("--min-rep", type=int, default=5)
    ap.add_argument("--max-rep", type=int, default=50)
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, T=256,512, fp32, 4 heads of 32, 2 repeats")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.lengths, args.heads, args.head_dim, args.dtype = "256,512", 4, 32, "fp32"
        args.warmup, args.min_rep = 1, 2
        args.kv_heads = args.kv_heads or 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu-smoke for a CPU run")
        device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    H, D, B = args.heads, args.head_dim, args.batch
    Hk = args.kv_heads or H
    gqa = Hk != H
    n_shift = shifted_head_count(H, args.shifted_heads)
    wanted = args.backends.split(",")
    unknown = sorted(set(wanted) - {"sdpa", "flex", "flash"})
    if unknown:  # else listed as "not available", the run going on without it
        ap.error(f"--backends: unknown {unknown}; allowed: sdpa, flex, flash")
    s2_backends = [b for b in wanted if (b == "sdpa") or (b == "flex" and flex_available())
                   or (b == "flash" and flash_available() and device.type == "cuda")]
    skipped = sorted(set(wanted) - set(s2_backends))
    kernels = sdpa_backends(device)
    dense_kernels = {k: v for k, v in kernels.items() if args.dense_kernels is None or k in args.dense_kernels.split(",")}
    unknown = sorted(set(args.dense_kernels.split(",")) - set(kernels)) if args.dense_kernels is not None else []
    if unknown:  # else left out silently: with none left, dense_ms is NaN and so is every speed-up
        ap.error(f"--dense-kernels: unknown {unknown}; on this device: {', '.join(kernels)}")
    from torch.nn.attention import sdpa_kernel
    flex_variants = [parse_flex_variant(x) for x in args.flex_variants.split(";")]

    def measure(fn):
        return timer(fn, device, args.warmup, args.target_s, args.min_rep, args.max_rep)

    results = []
    t_start = time.perf_counter()
    for T in [int(x) for x in args.lengths.split(",")]:
        G = group_size_for(T, args.ratio)
        g = torch.Generator(device=device).manual_seed(0)
        # transformers' layout: (B, T, H, D) in memory, seen as (B, H, T, D)
        q, k, v = (torch.randn(B, T, h, D, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
                   for h in (H, Hk, Hk))
        grad = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
        flops_dense = 3.5 * 4 * D * B * H * pairs_causal(T)
        flops_s2 = 3.5 * 4 * D * B * s2_pairs(T, G, H, n_shift)

        def step(fwd):
            def run():
                for x in (q, k, v):
                    x.grad = None
                fwd().backward(grad)
            return run

        dense_fwd = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, **({"enable_gqa": True} if gqa else {})).transpose(1, 2)
        rows = []
        for kname, kernel in dense_kernels.items():
            try:
                with sdpa_kernel([kernel]):
                    ms, n = measure(step(dense_fwd))
                rows.append(dict(T=T, G=None, method="dense", backend=kname, ms=ms, reps=n,
                                 tflops=flops_dense / ms / 1e9))
            except Exception as e:  # a kernel that cannot run this shape/dtype
                rows.append(dict(T=T, G=None, method="dense", backend=kname, error=f"{type(e).__name__}: {e}"[:200]))
            torch.cuda.empty_cache() if device.type == "cuda" else None
        ok = [r for r in rows if "ms" in r]
        dense_ms = min(r["ms"] for r in ok) if ok else float("nan")

        outputs = {}
        for backend, (flabel, fopts) in [(b, f) for b in s2_backends for f in (flex_variants if b == "flex" else [("", {})])]:
            cache = _Cache()
            fwd = lambda b=backend, c=cache, o=fopts: s2_attention(q, k, v, group_size=G, n_shift=n_shift,  # noqa: E731
                                                                   backend=b, cache=c, **o)
            variants = kernels.items() if backend == "sdpa" else [(backend, None)]
            # FlexAttention has no backward on CPU: the smoke run times its forward only
            fwd_only = backend == "flex" and device.type != "cuda"
            for kname, kernel in variants:
                label = f"sdpa/{kname}" if backend == "sdpa" else backend + (f"[{flabel}]" if flabel else "") + (
                    " (fwd only)" if fwd_only else "")
                if fwd_only:
                    fwd = torch.no_grad()(fwd)
                run = fwd if fwd_only else step(fwd)
                try:
                    if kernel is not None:
                        with sdpa_kernel([kernel]):
                            ms, n = measure(run)
                            out = fwd().detach()
                    else:
                        ms, n = measure(run)
                        out = fwd().detach()
                    if label not in outputs:
                        outputs[label] = out
                    row = dict(T=T, G=G, method="s2", backend=label, ms=ms, reps=n,
                               tflops=flops_s2 / (3.5 if fwd_only else 1) / ms / 1e9)
                    if not fwd_only:
                        row["speedup"] = dense_ms / ms
                    rows.append(row)
                except Exception as e:
                    rows.append(dict(T=T, G=G, method="s2", backend=label, error=f"{type(e).__name__}: {e}"[:200]))
                torch.cuda.empty_cache() if device.type == "cuda" else None
        # the S2 backends agree with each other (bf16 rounding)
        names = list(outputs)
        for other in names[1:]:
            diff = (outputs[other].float() - outputs[names[0]].float()).abs().max().item()
            for r in rows:
                if r["method"] == "s2" and r["backend"] == other:
                    r[f"max_abs_diff_vs_{names[0]}"] = diff
        results.extend(rows)
        for r in rows:
            print(json.dumps(r), flush=True)
        del q, k, v, grad, outputs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "triton", "flash_attn"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    meta = dict(device=dev, versions=versions, dtype=args.dtype, batch=B, heads=H, kv_heads=Hk, head_dim=D,
                ratio=args.ratio, shifted_heads=args.shifted_heads, skipped_backends=skipped,
                wall_s=round(time.perf_counter() - t_start, 1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(strict_dumps({"meta": meta, "results": results}, indent=1))  # NaN speedup: "NaN"

    print(f"\n{dev}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; {args.dtype}, batch {B}, {H} heads ({Hk} K/V) of {D}, ratio {args.ratio}, fwd+bwd"
          + (f"; not available: {', '.join(skipped)}" if skipped else ""))
    print("\n| T | G | method | backend | ms | TFLOP/s | speed-up vs dense |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['T']} | {r['G'] or '-'} | {r['method']} | {r['backend']} | error | | {r['error'][:60]} |")
            continue
        best = ""
        same = [x for x in results if x["T"] == r["T"] and x["method"] == r["method"] and "ms" in x
                and "fwd only" not in x["backend"]]
        if r in same and r["ms"] == min(x["ms"] for x in same):
            best = " **best**"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "1 (reference)" if best else ""
        print(f"| {r['T']} | {r['G'] or '-'} | {r['method']} | {r['backend']}{best} | {r['ms']:.2f} | "
              f"{r['tflops']:.3g} | {sp} |")


if __name__ == "__main__":
    main()
