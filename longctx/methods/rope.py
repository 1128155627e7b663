"""RoPE scaling methods: position interpolation, NTK-aware, dynamic NTK, YaRN and a new rope theta.

How a patch works: it rewrites the model's ``config.rope_parameters`` (and ``max_position_embeddings``, and a
top-level ``original_max_position_embeddings`` where the config has one, as phi3's does, to the
value in the new ``rope_parameters``)
into the transformers rope configuration that describes the method, then builds a fresh rotary
module of the model's own class from that config and swaps it in for the old one. So the patched
model is, by construction, the model transformers would build from the saved config: the same
``ROPE_INIT_FUNCTIONS``, the same ``dynamic_rope_update``, bit-identical logits, and
``save_pretrained`` -> ``from_pretrained`` reproduces it without longctx. ``remove()`` puts the
untouched original module and config values back.

Methods that transformers has no rope type for are expressed through one it has:
``ntk`` (static NTK-aware) is plain RoPE with base * factor^(d/(d-2)), ``abf`` plain RoPE with a
new base. d is the rotary dimension (head_dim times partial_rotary_factor). Families whose config
accepts only some rope types (phi3: default and longrope) get static methods written as
``longrope`` with equal short and long per-dimension factors: the same frequencies and attention
factor, up to float32 rounding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..arch import arch_of, rotary_module
from ..registry import Options, Patch, check_positive, register


@dataclass(kw_only=True)
class RopeOptions(Options):
    # models with per-layer-type RoPE (gemma3, olmo3): which layer types to rescale.
    # None = "full_attention" (sliding-window layers never see long distances).
    layer_types: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.layer_types is not None:
            if isinstance(self.layer_types, str):
                self.layer_types = (self.layer_types,)
            if not isinstance(self.layer_types, (tuple, list)) or not self.layer_types \
                    or not all(isinstance(t, str) for t in self.layer_types):
                raise ValueError(f"option 'layer_types' must be a layer type name or a non-empty list of them "
                                 f"(e.g. ['full_attention']), got {self.layer_types!r}")
            if len(set(self.layer_types)) != len(self.layer_types):
                raise ValueError(f"option 'layer_types' lists a layer type twice: {list(self.layer_types)}")
            self.layer_types = tuple(self.layer_types)


@dataclass(kw_only=True)
class FactorOptions(RopeOptions):
    factor: float  # new context length / trained context length

    def validate(self) -> None:
        super().validate()
        check_positive("factor", self.factor)


@dataclass(kw_only=True)
class YarnOptions(FactorOptions):
    beta_fast: float = 32.0  # dims rotating more than beta_fast times over the trained length: untouched
    beta_slow: float = 1.0  # dims rotating fewer than beta_slow times: fully interpolated
    attention_factor: float | None = None  # None: 0.1 ln(factor) + 1, as in the paper
    original_max_position_embeddings: int | None = None  # None: the model's max_position_embeddings

    def validate(self) -> None:
        super().validate()
        check_positive("beta_fast", self.beta_fast)
        check_positive("beta_slow", self.beta_slow)
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"option 'beta_fast' ({self.beta_fast}) must be > 'beta_slow' ({self.beta_slow})")
        check_positive("attention_factor", self.attention_factor, allow_none=True)
        check_positive("original_max_position_embeddings", self.original_max_position_embeddings,
                       integer=True, allow_none=True)


@dataclass(kw_only=True)
class AbfOptions(RopeOptions):
    rope_theta: float  # the new RoPE base ("adjusted base frequency")
    max_position_embeddings: int | None = None  # None: keep the model's

    def validate(self) -> None:
        super().validate()
        check_positive("rope_theta", self.rope_theta)
        check_positive("max_position_embeddings", self.max_position_embeddings, integer=True, allow_none=True)


def reset_rotary_state(model) -> int:
    """Put every dynamic rotary module of ``model`` that has grown back to its original state.

    transformers' ``dynamic_rope_update`` (rope types containing "dynamic": ``dynamic_ntk``, or a
    checkpoint's own dynamic RoPE) recomputes ``inv_freq`` when an input is longer than
    ``max_seq_len_cached`` and keeps it, with the new ``max_seq_len_cached``, until an input shorter than
    the trained length comes. So a forward at length L after a longer one sees the longer one's
    frequencies: results would depend on what ran before. This restores ``inv_freq`` =
    ``original_inv_freq`` and ``max_seq_len_cached`` = ``original_max_seq_len``, as transformers' own
    reset does; models with per-layer-type RoPE (``rope_type`` a dict, e.g. gemma3) keep them per layer
    type, as ``{layer_type}_inv_freq``, ``{layer_type}_original_inv_freq`` and
    ``{layer_type}_max_seq_len_cached``. Modules that have not grown, and non-dynamic rope types
    (whose frequencies never depend on earlier inputs), are left alone. Returns how many were reset."""
    count = 0
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        original_len = getattr(module, "original_max_seq_len", None)
        if rope_type is None or original_len is None:
            continue
        kinds = rope_type.items() if isinstance(rope_type, dict) else [(None, rope_type)]
        for layer_type, kind in kinds:
            if not isinstance(kind, str) or "dynamic" not in kind:
                continue
            prefix = "" if layer_type is None else f"{layer_type}_"
            original = getattr(module, f"{prefix}original_inv_freq", None)
            current = getattr(module, f"{prefix}inv_freq", None)
            # per layer type, transformers falls back to the module's max_seq_len_cached until it has grown
            cached = getattr(module, f"{prefix}max_seq_len_cached", getattr(module, "max_seq_len_cached", None))
            if original is None or current is None or cached is None or not bool(cached > original_len):
                continue
            # a copy, not the original itself: nothing may write into original_inv_freq through inv_freq
            module.register_buffer(f"{prefix}inv_freq", original.detach().clone().to(current.device),
                                   persistent=False)
            setattr(module, f"{prefix}max_seq_len_cached", original_len)
            count += 1
    return count


def nested_rope_keys(config, params: dict) -> list[str]:
    """The layer types ``params`` (rope_parameters) is nested under (gemma3: full_attention and
    sliding_attention), or [] for one flat configuration. transformers >= 5.2x says so itself; 5.17 has
    no such method, so the same rule is applied here: keys that name a declared layer type."""
    if hasattr(config, "nested_rope_parameter_keys"):
        return config.nested_rope_parameter_keys(params)
    labels = getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ()
    return [key for key in params if key in labels]


class RopePatch(Patch):
    slot = "rope"

    def scaled(self, params: dict, rotary_dim: int, trained_len: int) -> tuple[dict, int]:
        """The rope parameters for one layer type, and the new max_position_embeddings."""
        raise NotImplementedError

    def _attach(self) -> None:
        self._check_saved()
        parent, attr, old = rotary_module(self.model, self.method)
        config = old.config  # the (text) config the rotary module was built from
        params = copy.deepcopy(config.rope_parameters)
        trained_len = config.max_position_embeddings

        nested = nested_rope_keys(config, params)
        if nested:
            targets = self.options.layer_types or ("full_attention",)
            # only the declared layer types (gemma3 with sliding layers only has no full_attention frequencies,
            # even where its rope_parameters carry an entry for them)
            unknown = [t for t in targets if t not in nested or params[t] is None]
            if unknown:
                raise ValueError(f"option 'layer_types': {unknown} have no RoPE in this model; "
                                 f"layer types with RoPE: {[k for k in nested if params[k] is not None]}")
        elif self.options.layer_types is not None:
            raise ValueError("option 'layer_types' applies only to models with per-layer-type RoPE "
                             "(e.g. gemma3); this model has a single RoPE configuration")
        else:
            targets = (None,)

        allowed = arch_of(self.model).rope_types
        new_len = None
        for layer_type in targets:
            current = params if layer_type is None else params[layer_type]
            rope_type = current.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(
                    f"cannot apply {self.method!r}: this model already uses rope_type {rope_type!r} "
                    f"(config.rope_parameters); longctx RoPE methods rescale plain RoPE. Load the unscaled model."
                )
            inv_freq = getattr(old, "inv_freq" if layer_type is None else f"{layer_type}_inv_freq")
            try:
                entry, entry_len = self.scaled(dict(current), 2 * inv_freq.numel(), trained_len)
            except OverflowError:  # max_position_embeddings (or ntk's rope_theta) past a float: not a model either
                raise ValueError(f"option 'factor' ({self.options.factor}) is too large for this model: its "
                                 f"max_position_embeddings or rope_theta would overflow (now {trained_len})") from None
            if entry_len < 1:  # a factor below 1 / the trained length: max_position_embeddings 0 went into the config
                raise ValueError(f"option 'factor' ({self.options.factor}) is too small for this model: its "
                                 f"max_position_embeddings would be {entry_len} (now {trained_len}); it must be >= 1")
            if allowed is not None and entry["rope_type"] not in allowed:
                entry = self._as_longrope(type(old), config, layer_type, entry, entry_len, allowed)
            if layer_type is None:
                params = entry
            else:
                params[layer_type] = entry
            new_len = entry_len if new_len is None else max(new_len, entry_len)

        head_dim = getattr(config, "head_dim", 0)
        # transformers' rope init functions (standardize_rope_params) overwrite the original_max_position_embeddings
        # of a flat yarn/longrope configuration with a top-level config.original_max_position_embeddings (phi3 has one,
        # any config.json may carry one): it must say the same, or the trained length (and the yarn option) was ignored
        # (held as a 1-tuple of the old value, None where there is nothing to change: the patch may be deep-copied)
        top = None
        if not nested and hasattr(config, "original_max_position_embeddings") \
                and "original_max_position_embeddings" in params:
            top = (config.original_max_position_embeddings,)
        # not the parent module (found again at remove()): held by the patch, it kept the decoder body, weights
        # included, alive after the model was dropped without remove()
        saved = (config, config.rope_parameters, config.max_position_embeddings, None, attr, old, head_dim)
        try:
            config.rope_parameters = params
            config.max_position_embeddings = int(new_len)
            if top is not None:
                config.original_max_position_embeddings = params["original_max_position_embeddings"]
            if head_dim is None:  # mixtral: rope init functions other than default's read head_dim unguarded
                config.head_dim = config.hidden_size // config.num_attention_heads
            new = type(old)(config=config)
        except Exception:  # the config is left as it was: nothing half-applied
            config.rope_parameters, config.max_position_embeddings = saved[1], saved[2]
            if top is not None:
                config.original_max_position_embeddings = top[0]
            if head_dim is None:
                config.head_dim = None
            raise
        self._saved = saved
        self._top_original = top
        # follow the old module's device (and dtype, if someone cast the buffers), and its train/eval mode (a new
        # module is in training mode, which left model.eval()'s rotary module the one module training)
        buf = next(old.buffers())
        new.to(device=buf.device)
        if buf.dtype != torch.float32:
            new.to(dtype=buf.dtype)
        new.train(old.training)
        setattr(parent, attr, new)

    def _as_longrope(self, rotary_cls, config, layer_type, entry, new_len, allowed) -> dict:
        """Rewrite a static rope type as ``longrope``: per-dimension factors = old / new frequency."""
        if "longrope" not in allowed or self.method == "dynamic_ntk":
            raise ValueError(
                f"cannot apply {self.method!r} to a {config.model_type!r} model: its config accepts only "
                f"rope types {', '.join(allowed)}, so the scaling could not be saved with the model; "
                f"static methods that work here: linear, ntk, yarn, abf"
            )
        probe = copy.deepcopy(config)
        probe.max_position_embeddings = new_len
        if layer_type is None:
            probe.rope_parameters = entry
            if hasattr(probe, "original_max_position_embeddings") and "original_max_position_embeddings" in entry:
                probe.original_max_position_embeddings = entry["original_max_position_embeddings"]  # (see _attach)
        else:
            probe.rope_parameters = {**probe.rope_parameters, layer_type: entry}
        plain, _ = rotary_cls.compute_default_rope_parameters(config, layer_type=layer_type)
        target, attention_factor = ROPE_INIT_FUNCTIONS[entry["rope_type"]](probe, layer_type=layer_type)
        factors = (plain.double() / target.double()).tolist()
        keep = {k: entry[k] for k in ("rope_theta", "partial_rotary_factor") if k in entry}
        return {**keep, "rope_type": "longrope", "short_factor": factors, "long_factor": factors,
                "original_max_position_embeddings": config.max_position_embeddings,
                "attention_factor": float(attention_factor)}

    def _detach(self) -> None:
        config, params, max_len, parent, attr, old, head_dim = self._saved
        if parent is None:  # (a patch pickled by an older longctx holds it)
            parent = rotary_module(self.model, self.method)[0]
        config.rope_parameters = params
        config.max_position_embeddings = max_len
        if head_dim is None:
            config.head_dim = None
        top = getattr(self, "_top_original", None)  # (absent in a patch pickled by an older longctx)
        if top is not None:
            config.original_max_position_embeddings = top[0]
        # follow casts, moves and model.train() / model.eval() made while patched (the old module was outside the
        # model then)
        cur = getattr(parent, attr)
        ref = next((b for n, b in cur.named_buffers() if n.endswith("original_inv_freq")), next(cur.buffers()))
        old_buf = next(old.buffers())
        old.to(device=ref.device)
        if ref.dtype != old_buf.dtype:
            old.to(dtype=ref.dtype)
        old.train(cur.training)
        setattr(parent, attr, old)
        del self._saved


@register("linear", FactorOptions, "position interpolation: positions divided by factor (Chen et al., 2023)",
          aliases=("pi",))
class LinearPatch(RopePatch):
    def scaled(self, params, rotary_dim, trained_len):
        params.update(rope_type="linear", factor=float(self.options.factor))
        return params, round(trained_len * self.options.factor)


@register("ntk", FactorOptions, "static NTK-aware scaling: rope base times factor^(d/(d-2)) (bloc97, 2023)")
class NtkPatch(RopePatch):
    def scaled(self, params, rotary_dim, trained_len):
        d = rotary_dim
        params["rope_theta"] = float(params["rope_theta"] * self.options.factor ** (d / (d - 2)))
        return params, round(trained_len * self.options.factor)


@register("dynamic_ntk", FactorOptions,
          "dynamic NTK: NTK base grows with the current length beyond the trained one (emozilla, 2023)")
class DynamicNtkPatch(RopePatch):
    def scaled(self, params, rotary_dim, trained_len):
        params.update(rope_type="dynamic", factor=float(self.options.factor))
        # transformers' dynamic rope reads max_position_embeddings as the trained length: keep it
        return params, trained_len


@register("yarn", YarnOptions, "YaRN: NTK-by-parts interpolation plus attention temperature (Peng et al., 2023)")
class YarnPatch(RopePatch):
    def scaled(self, params, rotary_dim, trained_len):
        o = self.options
        original = o.original_max_position_embeddings or trained_len
        params.update(rope_type="yarn", factor=float(o.factor), original_max_position_embeddings=original,
                      beta_fast=float(o.beta_fast), beta_slow=float(o.beta_slow))
        if o.attention_factor is not None:
            params["attention_factor"] = float(o.attention_factor)
        return params, round(original * o.factor)


@register("abf", AbfOptions, "adjusted base frequency: a new rope_theta (Xiong et al., 2023)")
class AbfPatch(RopePatch):
    def scaled(self, params, rotary_dim, trained_len):
        params["rope_theta"] = float(self.options.rope_theta)
        return params, self.options.max_position_embeddings or trained_len
