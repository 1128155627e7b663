"""Small shared helpers: the user cache folder, strict JSON for results, float64 sums of scores, dynamo's
recompile limit, compiled decoder layers."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The longctx cache folder (``$LONGCTX_CACHE``, else ``$XDG_CACHE_HOME/longctx``, else
    ``~/.cache/longctx``), joined with ``parts`` and created on demand."""
    root = os.environ.get("LONGCTX_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "longctx")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Non-finite floats in written results (a perplexity that overflowed to inf, NaN from a diverged model):
# Python's json writes them as the bare tokens Infinity / NaN, which strict parsers (JSON.parse, jq, ...)
# reject. longctx writes them as these strings instead: the same words, quoted, which Python's float()
# and JavaScript's Number() both turn back into the number.
NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def encode_nonfinite(value):
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples (as lists), replaced
    by the string "Infinity", "-Infinity" or "NaN"; everything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: encode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_nonfinite(v) for v in value]
    return value


def decode_nonfinite(value):
    """The inverse of ``encode_nonfinite``: the strings "Infinity", "-Infinity" and "NaN", at any depth,
    back to floats. Apply it to the numeric parts of a file read back (a string field that happens to
    read "NaN" would become a float too); values already floats (a file written by json's own
    Infinity/NaN tokens) pass unchanged."""
    if isinstance(value, str):
        return NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_nonfinite(v) for v in value]
    return value


def strict_dumps(value, **kwargs) -> str:
    """``json.dumps(value, **kwargs)`` as strict JSON: non-finite floats as the strings "Infinity",
    "-Infinity", "NaN" (``encode_nonfinite``; read them back with ``decode_nonfinite``)."""
    return json.dumps(encode_nonfinite(value), allow_nan=False, **kwargs)


# Scores (summed negative log-likelihoods) are added up in float64, so that a sum over millions of tokens
# keeps its digits. Apple's MPS has no float64: there the sum lives on the CPU (one copy per batch).
def float64_zero(device):
    """A float64 zero scalar to sum scores into: on ``device`` where it has float64, else on the CPU."""
    import torch

    device = torch.device(device)
    return torch.zeros((), dtype=torch.float64, device="cpu" if device.type == "mps" else device)


def as_float64(value, total):
    """``value`` (a tensor on any device) as float64 on ``total``'s device, ready to add to ``total``."""
    return value.to(total.device).double()


def recompile_room(limit: int = 64):
    """A context raising dynamo's per-code-object limit of compiled variants (8 by default; past it
    torch.compile silently runs eager) to at least ``limit``, for calls that compile one variant per
    shape or per patch: perplexity over many lengths, a SinkDecoder per cache size."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), limit)})


COMPILE_SCOPES = ("parts", "layer")


def _decoder_layers(model) -> list:
    """Every decoder layer (transformers' GradientCheckpointingLayer) of the transformers model inside
    ``model`` (a peft wrapper is looked through)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .registry import unwrap_model

    return [m for m in unwrap_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def _layer_parts(model) -> list:
    """The children (attention module, MLP, norms) of every decoder layer, and the layers themselves."""
    layers = _decoder_layers(model)
    return [child for layer in layers for child in layer.children()] + layers


def _compile_targets(model, scope: str) -> list:
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(repr(s) for s in COMPILE_SCOPES)}, got {scope!r}")
    layers = _decoder_layers(model)
    return layers if scope == "layer" else [child for layer in layers for child in layer.children()]


def compile_options(options) -> dict:
    """torch.compile keyword arguments from True or a dict; modes that capture CUDA graphs are refused
    (the parts are re-entered under gradient checkpointing and by callers that capture their own)."""
    if options is True:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"compile (train.compile) must be true, false or a dict of torch.compile keyword "
                        f"arguments, got {options!r}")
    check_compile_kwargs(options, "compile (train.compile)")
    return dict(options)


def check_compile_kwargs(options: dict, where: str) -> None:
    """torch.compile keyword arguments: known names only, and no mode that captures CUDA graphs (the
    callers compile parts that are re-entered, or capture graphs of their own)."""
    import torch
    from torch._inductor import list_mode_options

    allowed = [k for k in inspect.signature(torch.compile).parameters if k != "model"]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown torch.compile arguments {unknown}; allowed: {', '.join(allowed)}")
    modes = [m for m in list_mode_options() if m not in ("reduce-overhead", "max-autotune")]
    if options.get("mode") in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"{where}: mode {options['mode']!r} captures CUDA graphs; allowed modes: "
                         f"{', '.join(repr(m) for m in modes)}")
    if options.get("mode") not in (None, *modes):
        raise ValueError(f"{where}: unknown mode {options['mode']!r}; allowed modes: {', '.join(repr(m) for m in modes)}")


def compile_layers(model, options=True, scope: str = "parts") -> int:
    """``torch.compile`` the parts of every decoder layer in place (``nn.Module.compile`` on each child
    of each layer: attention module, MLP, norms; layers of one class share their compiled graphs, as in
    torchtune). Projections with their LoRA, RoPE, norms and the MLP get fused kernels.
    ``scope="layer"`` compiles each decoder layer as one module instead: one graph per layer (fewer
    host calls per step; with transformers versions that checkpoint inside the layer's ``forward``,
    the checkpoint is traced into the graph too).

    Why the parts and not the model: the attention mask is built outside the graphs, as in eager
    mode. Under a whole-model torch.compile, transformers (with torch < 2.14) never skips the causal
    mask, so SDPA gets a dense (T, T) mask and loses its causal kernels (measured on an H100:
    perplexity at 32k 0.42x eager, +14 GiB). Why not the layer: gradient checkpointing (which
    transformers puts around the layer's forward or ``__call__``, by version) stays outside every
    graph, and a graph break in the attention function (s2attn's, by design) splits only the
    attention module's graph. ``options``: True or a dict of torch.compile keyword arguments.
    Returns the number of modules compiled; a model without such layers is an error. Undo:
    ``uncompile_layers``."""
    options = compile_options(options)
    parts = _compile_targets(model, scope)
    if not parts:
        raise ValueError(f"compile: {type(model).__name__} has no decoder layers to compile (transformers' "
                         f"GradientCheckpointingLayer); run it without compile")
    for part in parts:
        part.compile(**options)
    return len(parts)


def uncompile_layers(model) -> None:
    """Undo ``compile_layers`` (either scope): the decoder layers and their parts run eagerly again."""
    for part in _layer_parts(model):
        part._compiled_call_impl = None


@contextlib.contextmanager
def layers_compiled(model, options=True, scope: str = "parts"):
    """``compile_layers`` for the duration of a block; afterwards every part is as it was before."""
    parts = _layer_parts(model)
    before = [part._compiled_call_impl for part in parts]
    compile_layers(model, options, scope)
    try:
        yield
    finally:
        for part, impl in zip(parts, before):
            part._compiled_call_impl = impl
