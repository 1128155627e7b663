"""longctx: attach context-extension methods to an already-loaded transformers model.

    import longctx
    model, tok = longctx.load_model("smollm2-135m")
    patch = longctx.apply(model, "yarn", factor=4)      # this instance only
    ...
    patch.remove()                                      # bit-identical to before
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .arch import supported_families
from .methods.sink_decoder import SinkDecoder
from .methods.streaming import SinkCache
from .registry import Options, Patch, active_patches, applied, apply, methods, register

__version__ = "0.1.0"

_LAZY = {"load_model": ("models", "load_model"), "load_corpus": ("data", "load_corpus")}
_SUBMODULES = ("eval", "chat", "lora", "data", "models", "estimate", "sweep", "train")


def __getattr__(name):
    # heavy or optional pieces load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in _SUBMODULES:  # `import longctx` then longctx.lora.prepare(...), longctx.chat.stream_generate(...)
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")


__all__ = ["apply", "applied", "methods", "active_patches", "Patch", "Options", "register", "SinkCache",
           "SinkDecoder", "supported_families", "load_model", "load_corpus", "eval"]
