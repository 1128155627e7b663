"""Small shared helpers: the user cache folder and option checking."""

from __future__ import annotations

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


def recompile_room(limit: int = 64):
    """A context raising dynamo's per-code-object limit of compiled variants (8 by default; past it
    torch.compile silently runs eager) to at least ``limit``, for calls that compile one variant per
    shape or per patch: perplexity over many lengths, a SinkDecoder per cache size."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), limit)})
