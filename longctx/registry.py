"""The method registry and the Patch life cycle.

A method is three things: a name, an options dataclass and a Patch subclass. Registering one::

    @dataclass
    class MyOptions(Options):
        factor: float = 2.0

    @register("my_method", MyOptions, "one-line description")
    class MyPatch(Patch):
        slot = "rope"                      # what part of the model it owns
        def _attach(self): ...             # change this one model instance
        def _detach(self): ...             # undo it exactly

``apply(model, "my_method", factor=4)`` validates the options, checks that no other active patch
owns the same slot of that model, attaches, and returns the Patch; ``patch.remove()`` detaches.
Patches are tracked per model instance (weakly: a patch holds its model by a weak reference, so a
patched model dropped without ``remove()`` is freed), never on a transformers class.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import dataclasses
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.nn as nn


@dataclass
class Options:
    """Base class of every method's options. Subclasses check their values in ``validate``."""

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Method:
    name: str
    options: type[Options]
    patch: type["Patch"]
    description: str
    aliases: tuple[str, ...] = ()


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}
# model instance -> its active patches, in the order they were applied
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, list[Patch]]" = weakref.WeakKeyDictionary()
_ORDER = itertools.count(1)


def register(name: str, options: type[Options], description: str, aliases: tuple[str, ...] = ()) -> Callable:
    """Class decorator that adds a Patch subclass to the registry under ``name`` (and ``aliases``)."""

    def wrap(patch_cls: type[Patch]) -> type[Patch]:
        for key in (name, *aliases):
            if key in _METHODS or key in _ALIASES:
                raise ValueError(f"method name {key!r} is already registered")
        _METHODS[name] = Method(name, options, patch_cls, description, tuple(aliases))
        for alias in aliases:
            _ALIASES[alias] = name
        patch_cls.method = name
        return patch_cls

    return wrap


def methods() -> dict[str, str]:
    """Registered method names with their one-line descriptions (aliases noted)."""
    out = {}
    for m in _METHODS.values():
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        out[m.name] = m.description + alias
    return out


def get_method(name: str) -> Method:
    key = _ALIASES.get(name, name)
    if key not in _METHODS:
        known = sorted([*_METHODS, *_ALIASES])
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return _METHODS[key]


def make_options(method: Method, **options: Any) -> Options:
    """Build and validate ``method``'s options; unknown or missing options are TypeErrors."""
    fields = {f.name: f for f in dataclasses.fields(method.options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method.name!r}; "
            f"allowed options: {', '.join(fields) or '(none)'}"
        )
    missing = [
        n for n, f in fields.items()
        if n not in options and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TypeError(f"method {method.name!r} needs option(s): {', '.join(missing)}")
    opts = method.options(**options)
    opts.validate()
    for f in dataclasses.fields(opts):
        setattr(opts, f.name, as_python(getattr(opts, f.name)))
    return opts


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside ``model`` (torch.compile's wrapper, a peft PeftModel or its tuner
    ``peft_model.base_model`` (LoraModel), and torch's DataParallel / DistributedDataParallel, as
    ``accelerator.prepare`` returns on several devices, are unwrapped)."""
    for _ in range(8):  # wrappers of wrappers: DDP(torch.compile(peft_model)), ...
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model)
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if inner is None and hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        if inner is None and _is_peft_tuner(model):
            # peft_model.base_model (LoraModel, ...): its attributes forward to the model, so it read as one and
            # its patch was kept under the tuner, where active_patches(peft_model) never looked
            inner = model.model
        if inner is None or inner is model:
            break
        model = inner
    if not hasattr(model, "config"):
        raise TypeError(f"expected a transformers model with a .config, got {type(model).__name__}")
    return model


def check_language_model(model: nn.Module, where: str) -> None:
    """A TypeError naming the fix where ``model`` is a decoder body (``model.model``: no language-model head, its
    forward returns hidden states, no logits), not the causal language model it belongs to."""
    inner = unwrap_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    if getattr(inner, "base_model", inner) is inner and callable(get) and get() is None:
        raise TypeError(f"{where} needs a causal language model (one that returns logits); got "
                        f"{type(inner).__name__}, a decoder body without a language-model head: pass the model it "
                        f"belongs to (the ...ForCausalLM whose .model / .base_model this is)")


def _is_peft_tuner(model) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return False
    return isinstance(model, BaseTuner) and isinstance(getattr(model, "model", None), nn.Module)


def _handles(model: nn.Module) -> Callable[[nn.Module], bool]:
    """Whether a tracked model is ``model`` or another handle of the same forwards: its base model (the decoder
    body, ``model.model``), or the model whose base model ``model`` is."""
    base = getattr(model, "base_model", None)
    return lambda m: m is model or m is base or getattr(m, "base_model", None) is model


def active_patches(model: nn.Module) -> list["Patch"]:
    """The patches currently attached to ``model``, oldest first; also those applied through another handle of it
    (its base model ``model.model``, or the causal LM whose base model it is): they act on its forwards."""
    model = unwrap_model(model)
    same = _handles(model)
    found = [p for m, ps in list(_ACTIVE.items()) if same(m) for p in ps]
    return sorted(found, key=lambda p: getattr(p, "_order", 0))


def sharing_patches(model: nn.Module) -> list["Patch"]:
    """The patches attached to ``model`` or to another handle of it (its base model) or to a model sharing its
    config object: the ones acting on its forwards or its config."""
    config = unwrap_model(model).config
    return [p for m, ps in list(_ACTIVE.items()) if m.config is config for p in ps]


class Patch:
    """One method attached to one model instance. Undo with ``remove()`` (or use as a context manager).

    Subclasses set ``slot`` (the part of the model they own: "rope", "attention", "cache"; two
    active patches may not share a slot) and implement ``_attach`` and ``_detach``.
    """

    method: str = ""
    slot: str = ""

    def __init__(self, model: nn.Module, options: Options):
        self.model = unwrap_model(model)
        self.options = options
        self.active = False

    # the model is held weakly: the registry (_ACTIVE) holds the patches of each model, so a strong reference
    # from a patch back to its model kept every patched model alive for ever (a model dropped without
    # remove(), e.g. one loaded per run, was never freed, nor its GPU memory)
    @property
    def model(self) -> nn.Module | None:
        """The model this patch is attached to (None once that model was garbage-collected)."""
        return self._model_ref()

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        self._model_ref = _dead if model is None else weakref.ref(model)

    def __getstate__(self) -> dict:
        # a weak reference can be neither pickled nor deep-copied (copy would keep pointing at the original):
        # a copy carries the model itself
        state = self.__dict__.copy()
        state["_model_ref"] = self.model
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        model = state.pop("model", None)  # (pickled by longctx before the model was held weakly)
        model = state.pop("_model_ref", model)
        self.__dict__.update(state)
        self.model = model
        self._track_copy()  # a copy of an active patch with a copy of its model: that copy's patch, removable

    # -- subclass hooks ------------------------------------------------------------------------
    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        raise NotImplementedError

    # -- life cycle ----------------------------------------------------------------------------
    def attach(self) -> "Patch":
        patches = _ACTIVE.setdefault(self.model, [])
        # also patches on another handle of the same model (its base model) or on a model sharing its
        # config object: RoPE patches change that config, s2attn sets its attention implementation
        for other in sharing_patches(self.model):
            if other.slot == self.slot:
                raise ValueError(
                    f"cannot apply {self.method!r}: {other.method!r} is already applied to this model "
                    f"(both change its {self.slot}); call .remove() on that patch first"
                )
        self._attach()
        self._record(add=True)
        patches.append(self)
        self.active = True
        self._order = next(_ORDER)  # active_patches lists the patches of several handles, oldest first
        return self

    def remove(self) -> None:
        """Undo the patch: the model behaves bit-identically to before ``apply``."""
        if not self.active:
            raise RuntimeError(f"this {self.method!r} patch was already removed")
        if self.model is None:
            raise RuntimeError(f"this {self.method!r} patch's model was garbage-collected: nothing to undo")
        self._detach()
        self._record(add=False)
        _ACTIVE[self.model].remove(self)
        self.active = False

    def _check_saved(self) -> None:
        """Refuse a model whose config says (``config.longctx``, saved with it) that a method of this slot
        was applied before it was saved, and is not active now: its config already carries that change."""
        active = {p.method for p in active_patches(self.model)}
        saved = [e.get("method") for e in getattr(self.model.config, "longctx", None) or []
                 if e.get("method") in _slot_methods(self.slot) and e.get("method") not in active]
        if saved:
            raise ValueError(f"cannot apply {self.method!r}: this model was saved after longctx applied "
                             f"{saved[0]!r} (config.longctx), so its config already carries that scaling; "
                             f"load the original model to apply another")

    def _track_copy(self) -> None:
        """Track this patch for its model, where it arrived as a copy of an active patch along with a copy of
        that model (``copy.deepcopy``, ``torch.save`` / ``torch.load``; of the model, where it holds its patch, as
        streaming's hook and instance attributes do, or of both, e.g. ``copy.deepcopy((model, patch))``); called
        from ``__setstate__``.
        Untracked, the copy's patch was missing from ``active_patches``, could not be removed, and a second
        patch of its slot was accepted on top of it. A shallow copy of a patch (its model already tracks a patch
        of this slot) is left untracked."""
        if self.active and self.model is not None:
            patches = _ACTIVE.setdefault(self.model, [])  # (only hashed: the model may be half-built here)
            if not any(p.slot == self.slot for p in patches):
                patches.append(self)

    def _record(self, add: bool) -> None:
        """Keep ``model.config.longctx`` (saved with the model) listing the applied methods. An entry of this
        method already there (a model saved while a patch of it was on, reloaded) is replaced in its place while
        this patch is on, and put back by remove(): removing it deleted the saved entry (remove() left the config
        changed, and a later save lost the record)."""
        config = self.model.config
        entries = list(getattr(config, "longctx", None) or [])
        at = next((i for i, e in enumerate(entries) if e.get("method") == self.method), None)
        if add:
            self._replaced = None if at is None else entries[at]
            entry = {"method": self.method, **copy.deepcopy(self.options.to_dict())}
            if at is None:
                entries.append(entry)
            else:
                entries[at] = entry
        elif at is not None:
            replaced = getattr(self, "_replaced", None)  # (None in a patch pickled by an older longctx)
            if replaced is None:
                del entries[at]
            else:
                entries[at] = replaced
        if entries:
            config.longctx = entries
        elif hasattr(config, "longctx"):
            del config.longctx

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.remove()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.to_dict().items())
        state = "active" if self.active else "removed"
        return f"<{type(self).__name__} {self.method}({opts}) {state}>"


def _dead() -> None:
    """The model reference of a patch whose model is gone."""
    return None


def _slot_methods(slot: str) -> set[str]:
    return {name for name, m in _METHODS.items() if m.patch.slot == slot}


def apply(model: nn.Module, method: str, **options: Any) -> Patch:
    """Attach ``method`` to this model instance and return the Patch (``patch.remove()`` undoes it).

    >>> patch = longctx.apply(model, "yarn", factor=4)
    """
    m = get_method(method)
    opts = make_options(m, **options)
    return m.patch(model, opts).attach()


@contextlib.contextmanager
def applied(model: nn.Module, method: str, **options: Any) -> Iterator[Patch]:
    """Context-manager form of ``apply``: the patch is removed on exit, also on error."""
    patch = apply(model, method, **options)
    try:
        yield patch
    finally:
        if patch.active:
            patch.remove()


# -- small option checks shared by the methods ----------------------------------------------------
def check_positive(name: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    """A finite number > 0 (numpy scalars included), or an integer > 0; None only with ``allow_none``."""
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive integer" if integer else "a number > 0"
        raise ValueError(f"option {name!r} must be {what}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"option {name!r} must be a finite number > 0, got {value!r}")


def as_python(value: Any) -> Any:
    """numpy scalars -> int/float, so that configs and the config.longctx record stay JSON-serializable."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, dict):
        return {k: as_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_python(v) for v in value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"option {name!r} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
