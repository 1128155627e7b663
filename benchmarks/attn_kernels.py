"""Causal attention forward at the perplexity loop's shape: which kernel is fastest? (issue 2)

    python benchmarks/attn_kernels.py --out benchmarks/results/attn_kernels_smollm2_h100.json   # H100
    python benchmarks/attn_kernels.py --cpu-smoke                                                # CPU: code paths

longctx's perplexity at 32k spends most of its time in causal attention (benchmarks/README.md,
ppl_throughput.py). Its 1.5x target needs attention well faster than the kernel SDPA picks today.
This script times ONE causal attention forward (inference, no grad) of SmolLM2-135M's shape by
default: batch 2 windows x T=32768 (the CUDA perplexity default packs 65,536 tokens per forward),
9 query heads, 3 K/V heads, head_dim 64, bf16, q/k/v in the layout transformers passes
((B, T, H, D) memory seen as (B, H, T, D)). Variants:
    sdpa_default     F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), default choice
    sdpa_flash       the same, flash backend only
    sdpa_efficient   the same, memory-efficient backend only
    sdpa_cudnn_gqa   the same, cuDNN backend only (may refuse GQA: then recorded as an error)
    cudnn_expanded   K/V heads repeated to 9 (the repeat is timed), cuDNN backend only
    flex             compiled flex_attention, causal BlockMask (built once), enable_gqa
    flex_autotune    the same, flex_attention compiled with mode="max-autotune-no-cudagraphs"
TFLOP/s counts the causal (query, key) pairs: 4 * D FLOPs per pair per query head.
Every variant's output is compared with sdpa_default's (max abs difference).
A Markdown table is printed last; --out writes JSON.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402


def sdpa_only(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, backend)])


def variants(q, k, v, device, cpu_smoke):
    """name -> zero-argument callable returning the (B, H, T, D) output."""
    H, KV, T = q.shape[1], k.shape[1], q.shape[2]
    gqa = {"enable_gqa": True} if KV != H else {}
    out = {"sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)}

    def forced(backend, expand=False):
        def fn():
            kk, vv = k, v
            if expand:                                          # (B, KV, T, D) -> (B, H, T, D)
                kk, vv = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
            with sdpa_only(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, **({} if expand else gqa))
        return fn

    out["sdpa_flash"] = forced("FLASH_ATTENTION")
    out["sdpa_efficient"] = forced("EFFICIENT_ATTENTION")
    out["sdpa_cudnn_gqa"] = forced("CUDNN_ATTENTION")
    out["cudnn_expanded"] = forced("CUDNN_ATTENTION", expand=True)
    if not cpu_smoke:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=device, _compile=True)
        flex = torch.compile(flex_attention)
        auto = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
        out["flex"] = lambda: flex(q, k, v, block_mask=mask, **gqa)
        out["flex_autotune"] = lambda: auto(q, k, v, block_mask=mask, **gqa)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, T=256, fp32, 2 repeats: code paths only")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.cpu_smoke:
        device, dtype, args.length, args.repeats = torch.device("cpu"), torch.float32, 256, 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    B, T, H, KV, D = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)           # (B, H, T, D) view
    k, v = (torch.randn(B, T, KV, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(2))
    flops = 4 * D * H * B * T * (T + 1) / 2
    rows, ref = [], None
    with torch.inference_mode():
        for name, fn in variants(q, k, v, device, args.cpu_smoke).items():
            row = {"variant": name}
            try:
                o = fn()                                                              # warm-up / compile
                for _ in range(2):
                    o = fn()
                ref = o if ref is None else ref
                row["max_abs_diff"] = (o.float() - ref.float()).abs().max().item()
                ms = median_ms(fn, args.repeats, device)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:  # a backend that cannot run this shape: recorded, the others go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(row, flush=True)
    base = next((r["ms"] for r in rows if r["variant"] == "sdpa_default" and "ms" in r), None)
    print(f"\n{'GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"B={B} T={T} H={H} KV={KV} D={D} {str(dtype)[6:]}\n")
    print("| variant | ms | TFLOP/s | vs sdpa_default | max abs diff |\n|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} | {base / r['ms']:.2f}x | {r['max_abs_diff']:.1e} |")
        else:
            print(f"| {r['variant']} | error: {r['error']} | | | |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "argv": sys.argv, **{k: getattr(args, k) for k in
                ("length", "batch", "heads", "kv_heads", "head_dim", "repeats")}}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
