"""Token-weighted perplexity of a causal LM at fixed context lengths, lean on memory.

The naive way, ``model(x).logits`` then cross-entropy, materializes a (L, V) logits tensor and
its fp32 copy: at L=32k and V=49k that is 3.2 GB in bf16 plus 6.4 GB in fp32 plus the
log-softmax. Here the model body (decoder + final norm) runs once, the hidden states of the
scored positions are kept, and the output embedding is applied `logits_chunk` rows at a time.
"""

import contextlib
import inspect
import math
import numbers
import platform
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..methods.rope import reset_rotary_state
from ..registry import active_patches, check_language_model, unwrap_model
from ..utils import as_float64, float64_zero, layers_compiled, recompile_room, strict_dumps

MODES = ("chunks", "sliding")
SCORES = ("all", "tail")



def inactive_in_eval(name: str, options: dict, with_cache: bool = False) -> str | None:
    """Why method ``name`` (with ``options``) would change nothing in an evaluation, or None. Evaluations run
    the model in eval mode, and perplexity (``with_cache=False``) runs each window in one forward without a
    cache: a row labelled with such a method would show the unpatched model's numbers."""
    if name == "streaming" and not with_cache:
        return ("perplexity runs each window without a cache, so a streaming patch changes nothing; "
                "use `longctx stream-ppl` for perplexity under a sink cache")
    if name == "s2attn" and options.get("train_only", True) is not False:
        return ("s2attn is active only in training (train_only=True); evaluations run in eval mode. "
                "Use s2attn:train_only=false to evaluate with S2-Attn")
    return None


def perplexity(model, docs, lengths, mode="chunks", stride=None, score="all", *, tail_fraction=None,
               batch_tokens=None, logits_chunk=4096, progress=True, compile=False) -> dict[int, dict]:
    """Perplexity of `model` on `docs` (1-D token-id tensors or lists) for each window length L.

    mode="chunks": each document is cut into non-overlapping windows of exactly L tokens from 0;
    a final incomplete window is dropped (its tokens are counted in "dropped_tokens"). Every
    window is a fresh forward with positions 0..L-1::

        doc    t0 t1 ... t(L-1) | tL ... t(2L-1) | t2L .. (dropped, < L tokens)
        window [------ 0 -----] [------ 1 -----]
        all:    .  x ...   x     .  x  ...  x      x = scored (predicted from the tokens before it
        tail:   .  . .. x  x     .  .  .. x x          in the same window), . = context only

      score="all":  tokens 1..L-1 of each window (L-1 per window; token 0 has no context).
      score="tail": only the last int(L * tail_fraction) tokens of each window (the long-context
                    part; every scored token has >= L - int(L*tail_fraction) tokens of context).
                    tail_fraction: default 0.25; it applies to score="tail" only (ValueError otherwise).

    mode="sliding": windows of exactly L tokens whose ends advance by `stride` (default L // 2);
    the last window ends at the document end. Each token is scored once, in the window where it
    has the most context::

        doc     t0 t1 ..................................... t(N-1)
        win 0   [.xxxxxxxxxxxxxxx]                 first window: tokens 1..L-1
        win 1   <stride>[........xxxxxxxx]         then each window: its last `stride` tokens,
        win 2           <stride>[........xxxxxxxx]   each with >= L - stride tokens of context
        last                       [.............xxx]  ends at N: scores the tokens left (<= stride)

      So every token of a document except its first is scored exactly once (N - 1 tokens).
      stride == L: windows do not overlap, and the first token of each window has no context in
      it, so it is not scored: for N a multiple of L this is exactly chunks/all.
      score="tail" is rejected (ValueError) in sliding mode: the scored part of each window is
      already its tail, set by `stride`. Documents shorter than L have no window (dropped).

    A peft model is scored through the transformers model inside (its LoRA layers included); a prompt
    learning adapter (prompt/prefix tuning: virtual tokens added by PeftModel.forward) is a TypeError.
    Token-weighted: ppl = exp(sum of NLL over all scored tokens / number of scored tokens).
    batch_tokens: token budget per forward; windows (of one or several documents) are stacked
    into batches of max(1, batch_tokens // L). Default 65536 on CUDA, L (batch 1) elsewhere.
    logits_chunk: rows of hidden states turned into fp32 logits at once.
    How: the body (`model.base_model`) runs with use_cache=False, its hidden states at the scored
    positions go through `model.get_output_embeddings()` (plus logit_scale / logits_scaling /
    final_logit_softcapping from the config) in chunks. This is checked once per model against
    model(probe).logits on the first 64 tokens; if it does not match, the model's own forward with
    logits_to_keep is used instead (more memory) and a warning says so.
    compile: during the call, every decoder layer's parts (attention module, MLP, norms) run through
    ``torch.compile(dynamic=False)`` (``longctx.utils.layers_compiled``): fused norms, RoPE and
    activations, while the attention mask is built eagerly, so SDPA keeps its causal kernels (a
    whole-model compile loses them). Compiled once per batch shape (tens of seconds on a GPU); a
    later call with the same shapes reuses the compiled code; afterwards the model is as before.
    Results equal the eager ones to float rounding (kernels fused in a different order). Off by
    default: on an H100 it measured slower than eager (SmolLM2 at 32k: 0.71-0.89x; benchmarks/README.md).
    ``compile="layer"``: each whole decoder layer compiled instead (``compile_layers(scope="layer")``;
    1.07x eager in the same measurement).
    Dynamic RoPE (``dynamic_ntk``, or a checkpoint's own dynamic rope type) keeps frequencies grown by
    a longer input; they are reset before each length (``longctx.methods.rope.reset_rotary_state``), so
    a length's result does not depend on the order of ``lengths`` or on what ran before.
    Returns {L: {"ppl", "nll" (mean per token), "tokens", "windows", "dropped_tokens"}}; a length
    with no full window gives tokens 0 and ppl/nll None (with a warning).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if mode == "sliding" and score == "tail":
        raise ValueError("score='tail' is only defined for mode='chunks': in mode='sliding' each window "
                         "already scores only its tail, the last `stride` tokens (lower stride instead)")
    if mode == "chunks" and stride is not None:
        raise ValueError("stride only applies to mode='sliding' (chunks never overlap)")
    if tail_fraction is None:
        tail_fraction = 0.25
    elif score != "tail":  # (as `longctx ppl --tail-fraction` without --score tail): it would change nothing
        raise ValueError(f"tail_fraction only applies to score='tail', got score={score!r}")
    if not isinstance(compile, bool) and compile not in ("parts", "layer"):
        raise TypeError(f"compile must be True, False, 'parts' or 'layer', got {compile!r}")
    def positive_int(name, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")
    positive_int("logits_chunk", logits_chunk)
    positive_int("batch_tokens", batch_tokens, allow_none=True)
    positive_int("stride", stride, allow_none=True)
    if isinstance(lengths, (int, numbers.Integral)) and not isinstance(lengths, bool):
        lengths = [lengths]
    lengths = list(lengths)  # a generator is read once: checked and evaluated from this list
    for L in lengths:
        positive_int("every entry of lengths", L)
    lengths = [int(L) for L in lengths]
    if torch.is_tensor(docs) and docs.dim() == 1:
        raise TypeError("docs must be a list of documents (token id sequences); got one 1-D tensor: pass [ids]")
    if isinstance(tail_fraction, bool) or not isinstance(tail_fraction, numbers.Real):
        raise ValueError(f"tail_fraction must be a number in (0, 1], got {tail_fraction!r}")
    for L in lengths:
        if L < 2:
            raise ValueError(f"lengths must be >= 2 (one token of context, one to predict), got {L}")
        if mode == "sliding" and not 1 <= (L // 2 if stride is None else stride) <= L:
            raise ValueError(f"stride must be in 1..L (L={L}), got {stride}")
        if score == "tail" and not (0 < tail_fraction <= 1 and int(L * tail_fraction) >= 1):
            raise ValueError(f"tail_fraction must be in (0, 1] with int(L * tail_fraction) >= 1, "
                             f"got {tail_fraction} for L={L}")

    docs = [torch.as_tensor(d, dtype=None if torch.is_tensor(d) or len(d) else torch.long) for d in docs]  # [] float32
    rows = [i for i, d in enumerate(docs) if sum(n > 1 for n in d.shape) > 1]  # (1, N) is one document, (2, N) two
    if rows:
        raise ValueError(f"docs: document {rows[0]} has shape {tuple(docs[rows[0]].shape)}: each document must be "
                         f"one sequence (1-D, or (1, N)); pass the rows of a batch as documents of their own")
    docs = [d.flatten().cpu() for d in docs]
    bad = [i for i, d in enumerate(docs) if d.is_floating_point() or d.is_complex() or d.dtype == torch.bool]
    if bad:
        raise TypeError(f"docs must hold integer token ids; document {bad[0]} is {docs[bad[0]].dtype}")
    docs = [d.long() for d in docs]
    adapters = getattr(getattr(model, "_orig_mod", model), "peft_config", None)  # peft: {adapter name: config}
    if isinstance(adapters, dict) and any(getattr(c, "is_prompt_learning", False) for c in adapters.values()):
        raise TypeError("perplexity: a peft model with a prompt learning adapter (prompt/prefix tuning) is not "
                        "supported: its virtual tokens are added by PeftModel.forward, which the scoring never runs")
    check_language_model(model, "perplexity")
    model = unwrap_model(model)  # a peft model: the transformers model inside (its LoRA layers included)
    if any(p.method == "streaming" for p in active_patches(model)):
        warnings.warn("perplexity: the model has a streaming patch, which changes nothing here: each window runs "
                      "without a cache (full attention); longctx.eval.streaming_perplexity scores under a sink cache",
                      stacklevel=2)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = {}
    try:
        # compile: one compiled variant per shape; the room covers every compiled forward of the call
        # (past dynamo's limit a code object is never compiled again in this process)
        with torch.inference_mode(), (recompile_room() if compile else contextlib.nullcontext()), \
                (layers_compiled(model, {"dynamic": False}, "layer" if compile == "layer" else "parts")
                 if compile else contextlib.nullcontext()):
            scorer = None
            for L in lengths:
                reset_rotary_state(model)  # dynamic RoPE: no state grown by an earlier (longer) length
                specs, dropped = _windows(docs, L, mode, L // 2 if stride is None else stride, score, tail_fraction)
                if not specs:
                    warnings.warn(f"perplexity: no document has a full window of {L} tokens")
                    results[L] = {"ppl": None, "nll": None, "tokens": 0, "windows": 0, "dropped_tokens": dropped}
                    continue
                if scorer is None:  # decided once, on the first real window
                    scorer = _make_scorer(model, docs[specs[0][0]][specs[0][1]:][:min(64, L)].to(device)[None],
                                          compile)
                budget = batch_tokens or (65536 if device.type == "cuda" else L)
                B = max(1, budget // L)                                # windows per forward
                nll = float64_zero(device)
                bar = tqdm(total=len(specs), desc=f"ppl L={L}", unit="win", disable=not progress)
                for k in range(0, len(specs), B):
                    batch = specs[k:k + B]
                    x = torch.stack([docs[i][s:s + L] for i, s, _ in batch]).to(device)  # (B, L)
                    nll += as_float64(scorer(x, [f for _, _, f in batch], logits_chunk), nll)
                    bar.update(len(batch))
                bar.close()
                tokens = sum(L - f for _, _, f in specs)
                mean = nll.item() / tokens
                ppl = math.exp(mean) if mean < 700 else float("inf") if mean == mean else float("nan")
                results[L] = {"ppl": ppl, "nll": mean,
                              "tokens": tokens, "windows": len(specs), "dropped_tokens": dropped}
    finally:
        model.train(was_training)
    return results


def _windows(docs, L, mode, stride, score, tail_fraction):
    """Windows as (doc index, start, first scored position within the window), dropped tokens."""
    specs, dropped = [], 0
    for i, d in enumerate(docs):
        n = len(d)
        if mode == "chunks":
            first = 1 if score == "all" else L - int(L * tail_fraction)
            first = max(first, 1)  # tail_fraction=1: token 0 still has nothing to be predicted from
            specs += [(i, s, first) for s in range(0, n - L + 1, L)]
            dropped += n % L
        elif n < L:
            dropped += n
        else:
            prev_end = 0
            for end in [*range(L, n, stride), n]:
                # the window [end-L, end) scores the tokens [prev_end, end), all of them for the first
                first = 1 if prev_end == 0 else max(1, L - (end - prev_end))
                specs.append((i, end - L, first))
                prev_end = end
    return specs, dropped


# model -> (what the check depended on, its verdict): the probe's two forwards run once per model,
# not once per call (on a GPU they are launch-bound and cost tens of ms, a few % of a 32k window)
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _make_scorer(model, probe, compile=False):
    """Pick how to turn a (B, L) batch into a summed NLL: body + chunked head when that reproduces
    model(probe).logits, else the model's own forward with logits_to_keep (the fallback). The verdict
    is kept per model while its class, body, output embedding and logit scalings stay the same."""
    body, head = model.base_model, model.get_output_embeddings()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale, div = getattr(cfg, "logit_scale", None), getattr(cfg, "logits_scaling", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    mul_scaling = "hyperclovax" in str(getattr(cfg, "model_type", ""))
    key = (type(model), scale, div, cap)
    parts = (body, head, getattr(head, "weight", None))  # compared by identity (weak references)

    def to_logits(h, model_dtype=False):                # (c, D) hidden -> (c, V) fp32 logits
        # model_dtype (the probe only): scale and cap in the head's dtype, rounding as transformers does, so the
        # probe compares like with like; scoring does them in fp32
        logits = head(h) if model_dtype else head(h).float()
        if isinstance(scale, (int, float)):             # Cohere: logits * logit_scale
            logits = logits * scale
        if isinstance(div, (int, float)):               # Granite: logits / logits_scaling
            logits = logits * div if mul_scaling else logits / div  # HyperCLOVAX multiplies
        if isinstance(cap, (int, float)):               # Gemma 2/3: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # compile: the decoder layers' parts are compiled for the call (perplexity's layers_compiled);
    # dynamo keeps their compiled code, so a later call with the same shapes does not recompile

    def split(x, firsts, chunk):
        h = _hidden(body(input_ids=x, use_cache=False))                                     # (B, L, D)
        L = x.shape[1]
        rows = torch.cat([h[b, f - 1:L - 1] for b, f in enumerate(firsts)])        # (M, D)
        tgt = torch.cat([x[b, f:] for b, f in enumerate(firsts)])                  # (M,)
        return _chunked_nll(rows, tgt, to_logits, chunk)

    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def fallback(x, firsts, chunk):
        L = x.shape[1]
        kw = {"logits_to_keep": L - min(firsts) + 1} if takes_keep else {}
        logits = model(input_ids=x, use_cache=False, **kw).logits                            # (B, K, V)
        off = L - logits.shape[1]                                                  # position of row 0
        return sum(_chunked_nll(logits[b, f - 1 - off:L - 1 - off], x[b, f:], lambda r: r.float(), chunk)
                   for b, f in enumerate(firsts))

    try:
        known = _CHECKED.get(model)
    except TypeError:  # not weak-referenceable
        known = None
    if known is not None and known[0] == key and all(r() is x for r, x in zip(known[2], parts)):
        why = known[1]
        if why is None:
            return split
    else:
        with _eager():  # the probe's own shape: not worth compiling
            why = _check_split(model, body, head, to_logits, probe)
        try:
            _CHECKED[model] = (key, why, tuple(weakref.ref(x) if x is not None else (lambda: None)
                                                for x in parts))
        except TypeError:  # not weak-referenceable: check every call
            pass
        if why is None:
            return split
    warnings.warn(f"perplexity: {type(model).__name__}: using model(..., logits_to_keep=...) "
                  f"(more memory): {why}")
    return fallback


def _eager():
    """Run compiled modules eagerly in this block (torch >= 2.6; else a no-op)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def _check_split(model, body, head, to_logits, probe) -> str | None:
    """None if head(body(probe)) reproduces model(probe).logits, else why not."""
    try:
        if head is None or body is model:
            raise TypeError("no separate body/output embedding")
        ref = model(input_ids=probe, use_cache=False).logits.float()               # (1, P, V)
        ours = to_logits(_hidden(body(input_ids=probe, use_cache=False))[0], model_dtype=True)[None]
        tol = max(4 * torch.finfo(head.weight.dtype).eps, 1e-4)               # bf16: 0.03 of max |logit|
        if ours.shape != ref.shape or not (ours - ref).abs().max() <= tol * ref.abs().max().clamp(min=1):
            return "body + output embedding does not reproduce model(x).logits"
        # the logit check alone lets a few % of scaling through in bf16: the probe's NLL must agree too
        tgt = probe[0, 1:]
        zero = float64_zero(ref.device)
        nll_ref = F.cross_entropy(as_float64(ref[0, :-1], zero), tgt.to(zero.device))
        nll_ours = F.cross_entropy(as_float64(ours[0, :-1], zero), tgt.to(zero.device))
        if not (nll_ours - nll_ref).abs() <= 1e-3 * nll_ref.abs().clamp(min=1):
            return f"body + output embedding changes the probe's NLL ({nll_ours.item():.5g} vs {nll_ref.item():.5g})"
        return None
    except (TypeError, AttributeError, ValueError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunked_nll(rows, tgt, to_logits, chunk):
    """Sum of -log p(tgt) over rows, `chunk` rows at a time, fp32 softmax, float64 sum."""
    total = float64_zero(rows.device)
    for i in range(0, rows.shape[0], chunk):
        logits = to_logits(rows[i:i + chunk])                                      # (c, V) fp32
        total += as_float64(F.cross_entropy(logits, tgt[i:i + chunk], reduction="sum"), total)
    return total


def save_json(result, path, **settings):
    """Write {"results", "settings", "env"} to `path` (settings: model, method, options, mode,
    stride, score, lengths, device, ...; torch/transformers versions and the name of the device are added: the
    settings' "device" where given, else CUDA's current device if there is one).

    The file is strict JSON: a non-finite float (a perplexity that overflowed, NaN from a diverged model)
    is written as the string "Infinity", "-Infinity" or "NaN" (``longctx.utils.strict_dumps``; read back
    with ``longctx.utils.decode_nonfinite``, or float() on the value)."""
    import transformers

    # the device the run used (settings "device", e.g. --device cpu on a GPU host, or cuda:1), else CUDA's default
    try:
        where = torch.device(settings["device"]) if settings.get("device") is not None else None
    except (RuntimeError, TypeError, ValueError):  # not a torch device ("auto", 0 without CUDA): as given
        name = f"{settings['device']} ({platform.machine()})"
    else:
        name = f"{'cpu' if where is None else where.type} ({platform.machine()})"
        if (where is None or where.type == "cuda") and torch.cuda.is_available():
            try:
                name = torch.cuda.get_device_name(where)
            except (AssertionError, RuntimeError):  # a GPU this host lacks (cuda:1 on a 1-GPU host)
                pass
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": name}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": result, "settings": settings, "env": env}
    path.write_text(strict_dumps(payload, indent=2, default=str) + "\n")
    return path


def _fmt(x):
    """4 significant digits: 25.13, 293.2, 3134, 31340."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None else str(x)
    s = f"{x:#.4g}"
    return f"{float(s):.0f}" if "e" in s else s.rstrip(".")


def format_table(results_by_method: dict[str, dict[int, dict]]) -> str:
    """Markdown table: one row per method, one column per length, cells = perplexity."""
    lengths = sorted({int(L) for res in results_by_method.values() for L in res})
    lines = ["| method | " + " | ".join(str(L) for L in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name, res in results_by_method.items():
        res = {int(L): r for L, r in res.items()}
        cells = [_fmt(res[L]["ppl"]) if L in res else "-" for L in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
