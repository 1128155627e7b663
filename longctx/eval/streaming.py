"""Perplexity of a token stream under a bounded cache, scored exactly as generation would see it.

    streaming_perplexity(model, ids, sink_size=4, window_size=2044)                 # token by token
    streaming_perplexity(model, ids, 4, 2044, chunk_size=32)                        # chunked, faster

Cache policies (``policy``), all with the same number of cached tokens C = sink_size + window_size:
    "sinks"      StreamingLLM: the first sink_size tokens + the last window_size (longctx.SinkCache)
    "window"     window only: the last C tokens, no sinks (a SinkCache with sink_size 0)
    "dense"      every token cached (DynamicCache); positions grow past the trained length
    "recompute"  sliding window with recomputation: each token predicted by a fresh forward over
                 the C tokens before it (quality reference; O(T * C) work)

Token-by-token (chunk_size=1) feeds one token per forward, like generation. chunk_size=c feeds c
tokens per forward: the cache makes room for the chunk first, so the chunk's first token sees
C - c + 1 cached tokens and its last sees C (token by token: always C). Each token except the
first is scored once: ids[t] is predicted from the logits at t - 1.
"""

from __future__ import annotations

import math
import numbers
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from ..methods.streaming import check_sizes
from ..registry import applied, sharing_patches
from ..utils import as_float64, float64_zero

POLICIES = ("sinks", "window", "dense", "recompute")


@torch.inference_mode()
def streaming_perplexity(model, ids, sink_size: int = 4, window_size: int = 2044, *, policy: str = "sinks",
                         chunk_size: int = 1, curve_every: int | None = None, progress: bool = True) -> dict:
    """Perplexity of the one token stream ``ids`` (1-D, or (1, N)) under the cache ``policy``.

    Returns {"ppl", "nll", "tokens", "seconds", "tokens_per_s", "max_cache", "curve"} and the settings
    ("policy", "sink_size", "window_size", "chunk_size"); ``curve``
    lists (tokens so far, running ppl, cached tokens, CUDA memory allocated) every ``curve_every`` tokens:
    a point at the first chunk end at or past each multiple of it, so at most one point per chunk (its
    tokens-so-far says where it was taken; pick curve_every >= chunk_size for evenly spaced points).
    The model runs in eval mode; its training mode is restored afterwards."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    check_sizes(sink_size, window_size)
    sink_size, window_size = int(sink_size), int(window_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)  # (numpy integers too, as sink_size and window_size)
    if curve_every is not None and (isinstance(curve_every, bool) or not isinstance(curve_every, numbers.Integral)
                                    or curve_every < 1):  # (0 or a negative number: silently no curve)
        raise ValueError(f"curve_every must be a positive integer or None, got {curve_every!r}")
    curve_every = None if curve_every is None else int(curve_every)  # (np.int8(100): scored // it overflowed)
    if policy != "dense" and chunk_size > window_size:
        raise ValueError(f"chunk_size ({chunk_size}) must be <= window_size ({window_size}): a chunk has to "
                         f"fit in the cache window")
    if any(p.method == "streaming" for p in sharing_patches(model)):  # its hook would swap the caches made here
        # (on this model or another handle of it, e.g. its base model: that one's forward runs inside this one's)
        raise ValueError("streaming_perplexity applies the streaming patch itself (policies sinks and window) and "
                         "needs the model without it; remove the model's streaming patch first")
    ids = torch.as_tensor(ids)
    # as perplexity(): no silent rounding ([] and np.array([]) are float: empty, they reach the length check)
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise TypeError(f"ids must hold integer token ids, got {ids.dtype}")
    ids = ids.long()
    if sum(n > 1 for n in ids.shape) > 1:  # (2, N): two streams, which flatten() would join into one
        raise ValueError(f"ids must be one token stream (1-D, or (1, N)), got shape {tuple(ids.shape)}; "
                         f"score the rows of a batch one by one")
    ids = ids.flatten()
    if len(ids) < 2:  # the first token is context only: nothing would be scored
        raise ValueError(f"ids must hold at least 2 tokens (the first is not scored), got {len(ids)}")
    device = next(model.parameters()).device
    capacity = sink_size + window_size
    was_training = model.training
    model.eval()
    try:
        return _stream_ppl(model, ids, sink_size, window_size, policy, chunk_size, curve_every, progress, device,
                           capacity)
    finally:
        model.train(was_training)


def _stream_ppl(model, ids, sink_size, window_size, policy, chunk_size, curve_every, progress, device, capacity):
    """streaming_perplexity's scoring, on the model in eval mode."""
    nll = float64_zero(device)
    scored, max_cache, curve = 0, 0, []
    bar = tqdm(total=len(ids) - 1, desc=f"stream {policy}", unit="tok", disable=not progress)
    start = time.perf_counter()

    if policy == "recompute":
        for t in range(1, len(ids), chunk_size):  # chunk_size targets per batch of fresh windows
            targets = range(t, min(t + chunk_size, len(ids)))
            ctx = [ids[max(0, u - capacity):u] for u in targets]
            L = max(len(c) for c in ctx)
            if all(len(c) == L for c in ctx):
                logits = model(torch.stack(ctx).to(device), use_cache=False).logits[:, -1]
            else:  # the first windows of the stream are shorter: one by one
                logits = torch.cat([model(c[None].to(device), use_cache=False).logits[:, -1] for c in ctx])
            nll += as_float64(F.cross_entropy(logits.float(), ids[list(targets)].to(device), reduction="sum"), nll)
            scored += len(targets)
            max_cache = max(max_cache, L)
            bar.update(len(targets))
            curve = _curve(curve, curve_every, scored, nll, max_cache, device)
    else:
        if policy == "dense":
            cache, patch = DynamicCache(config=model.config), None
        else:
            sinks = 0 if policy == "window" else sink_size
            patch = applied(model, "streaming", sink_size=sinks, window_size=capacity - sinks)
            patch_obj = patch.__enter__()
            cache = patch_obj.new_cache()
        try:
            on_device = ids.to(device)  # one copy: a per-chunk copy would wait for the GPU every step
            for s in range(0, len(ids) - 1, chunk_size):
                x = on_device[s:s + chunk_size + 1]  # (c + 1,): inputs and their next tokens
                logits = model(x[None, :-1], past_key_values=cache, use_cache=True).logits[0]  # (c, V)
                nll += as_float64(F.cross_entropy(logits.float(), x[1:], reduction="sum"), nll)
                scored += len(x) - 1
                max_cache = max(max_cache, *(layer.keys.shape[-2] for layer in cache.layers))  # longest layer
                bar.update(len(x) - 1)
                curve = _curve(curve, curve_every, scored, nll, max_cache, device)
        finally:
            if patch is not None:
                patch.__exit__(None, None, None)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mean = (nll / scored).item()
    return {"policy": policy, "sink_size": sink_size, "window_size": window_size, "chunk_size": chunk_size,
            "ppl": _ppl(mean), "nll": mean, "tokens": scored, "seconds": seconds,
            "tokens_per_s": scored / seconds, "max_cache": max_cache, "curve": curve}


def _curve(curve, every, scored, nll, cache_len, device):
    if every and scored // every > (curve[-1][0] // every if curve else 0):  # passed a multiple since the last point
        mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        curve.append((scored, _ppl((nll / scored).item()), cache_len, mem))
    return curve


def _ppl(mean):
    """exp(mean nll) in float64, as perplexity(): the final ppl and the curve's by one rule."""
    return math.exp(mean) if mean < 700 else float("inf") if mean == mean else float("nan")


# -- command: longctx stream-ppl ---------------------------------------------------------------------------
def cmd_stream_ppl(args) -> int:
    import sys

    from ..cli import load_model_or_exit
    from ..data import encode_documents, load_corpus
    from ..utils import strict_dumps

    from ..data import select_documents

    policies = args.policy.split(",")  # the options before the corpus and the model
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or len(set(policies)) != len(policies):
        raise SystemExit(f"--policy: expected distinct comma-separated names from {', '.join(POLICIES)}, "
                         f"got {args.policy!r}")
    try:
        check_sizes(args.sink_size, args.window_size)
    except ValueError as err:
        raise SystemExit(f"--sink-size/--window-size: {err}") from None
    if args.chunk_size < 1 or (args.chunk_size > args.window_size and set(policies) - {"dense"}):
        raise SystemExit(f"--chunk-size must be >= 1 and, for policies other than dense, <= --window-size "
                         f"({args.window_size}); got {args.chunk_size}")
    if args.curve_every is not None and args.curve_every < 1:
        raise SystemExit(f"--curve-every must be >= 1, got {args.curve_every}")
    if args.dense_max_tokens is not None and not {"dense", "recompute"} & set(policies):
        raise SystemExit(f"--dense-max-tokens only applies to --policy dense or recompute (got --policy {args.policy})")
    try:  # the corpus and --doc before the (slower) model
        docs = load_corpus(args.corpus)
        if args.doc:
            docs = select_documents(docs, [args.doc], "--doc")[0]
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:  # messages written for the user
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"--corpus {args.corpus!r}: {message}") from None
    model, tokenizer = load_model_or_exit(args)
    ids = torch.cat(encode_documents(tokenizer, docs))[: args.max_tokens]
    rows = []
    for policy in policies:
        limit = args.dense_max_tokens if policy in ("dense", "recompute") else None
        r = streaming_perplexity(model, ids[:limit] if limit else ids, args.sink_size, args.window_size,
                                 policy=policy, chunk_size=args.chunk_size, curve_every=args.curve_every)
        rows.append(r)
        print(f"{policy}: ppl {r['ppl']:.4g} over {r['tokens']:,} tokens, cache <= {r['max_cache']}, "
              f"{r['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    print("| policy | tokens | cache | chunk | ppl |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['tokens']:,} | {r['max_cache']} | {r['chunk_size']} | {r['ppl']:.4g} |")
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # as `longctx ppl --out` (save_json)
        with open(args.out, "w") as f:  # strict JSON: a non-finite ppl as "Infinity"/"NaN" (strict_dumps)
            f.write(strict_dumps({"settings": vars(args) | {"func": None}, "results": rows}, indent=1))
    return 0


def add_commands(sub) -> None:
    from ..cli import _positive_int

    p = sub.add_parser("stream-ppl", help="perplexity of a long stream under a bounded (sink) cache")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="kjv")
    p.add_argument("--doc", help="one document of the corpus, by name")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="stream the first N tokens")
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=2044)
    p.add_argument("--policy", default="sinks", help=f"comma-separated, from {', '.join(POLICIES)}")
    p.add_argument("--chunk-size", type=int, default=1, help="tokens per forward (1 = as generation)")
    p.add_argument("--dense-max-tokens", type=_positive_int, default=None, help="stream length for dense/recompute")
    p.add_argument("--curve-every", type=int, default=None, help="record ppl/cache/memory every N tokens")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out")
    p.set_defaults(func=cmd_stream_ppl)
