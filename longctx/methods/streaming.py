"""StreamingLLM attention sinks (Xiao et al., 2023, arXiv:2309.17453) on transformers 5 caches.

The cache keeps the keys/values of the first ``sink_size`` tokens (the attention sinks) and of the
most recent tokens, ``sink_size + window_size`` slots at most. Tokens get positions by their place
in the cache, as in the paper: a new token's position is its slot index, never its index in the
stream, so positions stay below the cache size however long the stream runs.

When tokens are evicted, the window slots move left, and their keys must be re-rotated to their
new places. Each slot keeps the key exactly as the model produced it (rotated at the place it had
then) and that place; the key the attention sees is that original rotated once, in fp32, by
``new place - original place``, with the model's own rotary module and ``apply_rotary_pos_emb``
(so partial rotary, interleaved layouts and any RoPE scaling stay right). Re-rotations never stack,
so no error accumulates over millions of tokens.

How it attaches (``longctx.apply(model, "streaming", sink_size=4, window_size=2044)``): a forward
pre-hook on this model's decoder body (``model.base_model``). Before every cached forward it
    1. swaps a fresh ``DynamicCache`` (what ``generate`` and ``use_cache=True`` create) for a
       ``SinkCache``;
    2. makes room for the new tokens (evicting the oldest window tokens, re-rotating the rest);
    3. sets ``position_ids`` to the new tokens' places and drops the all-ones 2-D attention mask
       (``generate``'s absolute positions and ever-growing mask describe the stream, not the cache).
Forwards without a cache (training, ``longctx.eval.perplexity``) are left alone. ``remove()``
removes the hook.

ALiBi models (bloom, mpt): no rotation at all; their biases come from each key's index in the
cache, which is its place.

Left-padded batches: each row's sinks are its first real tokens and its places count its real
tokens only, so every row streams as it would alone (see ``SinkCache``).

Models mixing full-attention and sliding-window layers (gemma2, gemma3, cohere2, gpt_oss, olmo3,
exaone4, qwen2/3 with ``use_sliding_window``; the layout is the one transformers' ``DynamicCache``
gives them): only the full-attention layers get the sinks and the window. Sliding-window layers
already bound their cache and keep their own behaviour: the last ``sliding_window`` tokens, the
mask transformers builds for them (``SlidingLayer``). Their keys follow the positions above, which
advance by one per token, so they stay consistent; when b returns to 0 every key they hold is
moved down by b as well, from its original, with the model's rotary module of that layer type
(gemma3 and olmo3 have a separate local RoPE). NoPE layers (cohere2's and hybrid exaone4's global
layers, smollm3's ``no_rope_layers``) are never rotated. Learned sinks (gpt_oss) live in the
attention itself and need nothing. A model whose every layer is a sliding-window layer (mistral
with ``sliding_window`` set) is refused: its own cache is bounded already and the sinks would
apply to no layer.

Not yet supported (clear errors): right padding, padding after the first forward, padded
batches on mpt (its ALiBi ignores the mask) and on models with sliding-window layers, layer types
other than full and sliding attention (chunked, linear), learned absolute positions (gpt2, opt),
multi-head latent attention (deepseek_v3: its cache holds latents), assisted decoding (no crop),
``generate``'s ``prefill_chunk_size`` continuing a stream that evicted tokens;
``SinkDecoder`` on models with sliding-window or NoPE layers. A forward with more tokens than the
window (a long prompt) is prefilled in window-sized chunks by the hook itself; its outputs then
cover the last ``window_size`` tokens only (``generate`` needs no more; a warning says so once).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicSlidingWindowLayer
from transformers.cache_utils import get_layer_types_and_kwargs

from ..arch import arch_of, rope_layers, rotary_module
from ..registry import Options, Patch, check_positive, register


STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")  # frequencies independent of the positions seen


_NO_ROLLBACK = ("streaming: the sink cache cannot be rolled back (assisted or speculative decoding); decode without "
                "an assistant model")


def _take_room(layer, key_states) -> None:
    """Every forward into a SinkCache must follow ``make_room`` for its n tokens (the streaming patch's hook calls
    it, or the caller driving the cache). Without it (e.g. a cache kept after its model's streaming patch was
    removed) the keys would be stored unbounded, at positions the cache never gave: silently wrong attention."""
    n = key_states.shape[-2]
    if layer.room != n:
        raise RuntimeError(
            f"this SinkCache was given no room for these {n} token(s): use it with a streaming-patched model (the "
            f"patch makes room before each forward; was it removed?), or call cache.make_room({n}) and pass "
            f"position_ids=cache.places[:, -{n}:] first"
            + (f" (room was made for {layer.room})" if layer.room is not None else ""))
    layer.room = None


class SinkLayer(CacheLayerMixin):
    """One layer's slots: ``orig_keys`` as produced, ``keys`` rotated to the current places, ``values``.
    Tensors are (batch, kv_heads, slots, head_dim).

    An eviction is only scheduled (``evict``) and carried out by the next ``update``, in the same
    concatenation that appends the new tokens: one copy of each tensor per step, as in a dense cache.
    """

    is_sliding = False
    is_compileable = False
    room = None  # tokens the next update may add (set by SinkCache.make_room, taken by update)

    def __init__(self, rope: bool = True):
        super().__init__()
        self.rope = rope  # False: a NoPE layer, whose keys are never rotated
        self.orig_keys: torch.Tensor | None = None
        self.pending: tuple[int, int, torch.Tensor | None] | None = None  # (start, count, new sink keys)

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.keys, self.orig_keys, self.values = empty, empty, value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        _take_room(self, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # new keys were rotated at their places (the hook set position_ids): current == original
        self.flush(key_states, value_states)
        return self.keys, self.values

    def evict(self, start: int, count: int, sink_keys: torch.Tensor | None = None) -> None:
        """Schedule dropping slots [start, start + count), and replacing keys[:start] by ``sink_keys``."""
        if self.pending is not None:
            self.flush()
        self.pending = (start, count, sink_keys)

    def flush(self, key_states=None, value_states=None) -> None:
        """Carry out the scheduled eviction, appending new states if given."""
        start, count, sinks = self.pending or (0, 0, None)
        self.pending = None
        new_k = [] if key_states is None else [key_states]
        new_v = [] if value_states is None else [value_states]
        head = self.keys[:, :, :start] if sinks is None else sinks
        self.keys = torch.cat([head, self.keys[:, :, start + count:], *new_k], dim=-2)
        self.orig_keys = torch.cat([self.orig_keys[:, :, :start], self.orig_keys[:, :, start + count:], *new_k], dim=-2)
        self.values = torch.cat([self.values[:, :, :start], self.values[:, :, start + count:], *new_v], dim=-2)

    def get_seq_length(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.shape[-2] - (self.pending[1] if self.pending else 0)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(_NO_ROLLBACK)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the rows of every tensor, the originals included."""
        if self.is_initialized:
            self.flush()
            idx = beam_idx.to(self.keys.device)
            self.keys, self.orig_keys, self.values = (t.index_select(0, idx)
                                                      for t in (self.keys, self.orig_keys, self.values))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1  # bounded by the SinkCache, which evicts before each forward

    def reset(self) -> None:
        self.keys = self.orig_keys = self.values = None
        self.pending = None
        self.is_initialized = False


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer of a mixed model: it keeps the model's own window, exactly as
    transformers' ``DynamicSlidingWindowLayer`` does (the last ``sliding_window - 1`` tokens are
    stored, each forward sees them plus its new tokens, and ``get_mask_sizes`` / ``get_seq_length``
    count the whole stream, so transformers builds the same sliding mask as for the dense cache).

    Only the positions follow the sink cache: new keys arrive rotated at the positions the cache
    gives (places + offset b), which advance by one per token, so the keys held agree with each
    other; when b returns to 0, every position moves down by b, and so does every key held here
    (``SinkCache._move_sliding``). Each key is kept as produced (``orig_keys``), with ``shift``
    (B, slots), how far it has moved since: the key attention sees is its original rotated once by
    ``shift`` (fp32, the model's rotary code for this layer type), so moves never stack.
    """

    is_croppable = False
    room = None  # as SinkLayer's

    def __init__(self, sliding_window: int, rope: bool = True, layer_type: str = "sliding_attention"):
        super().__init__(sliding_window)
        self.rope = rope  # False: a NoPE layer, whose keys are never rotated
        self.layer_type = layer_type
        self.orig_keys: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.orig_keys, self.values = key_states[:, :, :0], key_states[:, :, :0], value_states[:, :, :0]
        self.shift = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=key_states.device)
        self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append (B, H, n, D) states; keep the last ``sliding_window - 1``; return stored + new."""
        _take_room(self, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        new_shift = self.shift.new_zeros(key_states.shape[0], key_states.shape[-2])  # rotated where they are
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keep = self.sliding_window - 1
        self.keys, self.values = keys[:, :, -keep:], values[:, :, -keep:]
        self.orig_keys = torch.cat([self.orig_keys, key_states], dim=-2)[:, :, -keep:]
        self.shift = torch.cat([self.shift, new_shift], dim=-1)[:, -keep:]
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the rows of keys and values (transformers' layer), originals and shifts."""
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            self.orig_keys = self.orig_keys.index_select(0, beam_idx.to(self.orig_keys.device))
            self.shift = self.shift.index_select(0, beam_idx.to(self.shift.device))

    def activate_past_recording(self):
        raise NotImplementedError(_NO_ROLLBACK)

    def crop(self, tokens_to_remove: int) -> None:  # (transformers' layer would crop keys and values only)
        raise NotImplementedError(_NO_ROLLBACK)

    def reset(self) -> None:
        # dropped, not zeroed (transformers < 5.2x zeroes them in place and keeps their length)
        self.keys = self.values = self.orig_keys = self.shift = None
        self.is_initialized = False
        super().reset()  # (the window's cumulative length)


class SinkCache(Cache):
    """A bounded cache: ``sink_size`` attention sinks plus a window of ``window_size`` recent tokens.

    Usable as ``past_key_values=`` of a model patched with ``"streaming"`` (the patch makes room and
    sets positions before each forward), or directly: call ``make_room(n)`` before feeding n tokens
    and pass ``position_ids=cache.places[:, -n:]``. ``get_seq_length()`` is the number of stored
    slots (what transformers' mask code needs); ``seen_tokens`` counts the whole stream.

    Positions are places plus an offset ``b`` per row: a window slot's key sits at its place + b and
    new tokens get their place + b. RoPE sees only differences, so this is exactly positions by
    place, and it saves work: an eviction moves the window left and raises b by as much, so window
    keys keep their rotation; only the sink keys (fixed slots) are re-rotated. When the largest
    position would pass ``max_position`` (default: trained length + capacity for static RoPE, the
    trained length for dynamic RoPE; see ``_default_max_position``), b returns to 0 and every key is
    re-rotated once from its original.

    Left-padded batches: after the first (padded) forward, each row's slots are reordered to
    [its first sink_size real tokens][its pads][the rest]. Eviction always drops the slots right
    after the sinks, so a row loses its pads before any real token, which is exactly what it would
    do streamed alone. Pads stay masked (``key_mask``) until they are gone; places count real
    tokens only, per row.

    Models with sliding-window layers: those layers are ``SlidingLayer`` s (``sliding_layers``),
    bounded by their own window; everything above (slots, places, eviction) is about the
    full-attention layers (``sink_layers``). When b returns to 0, ``_move_sliding`` moves the
    sliding layers' keys down by b too. Padded batches are refused on such models.

    ``torch.save`` / pickle keep everything but the model: a loaded cache is bound to the model it is next used
    with (the streaming patch's forward, ``SinkDecoder``, ``prefill``, ``StreamingSession``) or by ``bind(model)``;
    so is a cache bound to another model (after the same checks of layout, frequencies and scaling), and a cache
    whose model had a RoPE method applied or removed since is checked again.
    """

    prefix_tokens = 0  # (a cache pickled before it had one)

    def __deepcopy__(self, memo):
        # a copy of the cache (transformers' prompt-cache pattern: copy.deepcopy(prompt_cache) per request) streams
        # through the same model, or through its copy where the same deepcopy made one first: it copied the whole
        # model along with it (on a GPU, the weights a second time)
        import copy

        self._check_not_held("copying")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = memo.get(id(value), value) if key == "_model" else copy.deepcopy(value, memo)
        return new

    def __copy__(self):  # (without this, copy.copy would go through __getstate__ and drop the model)
        self._check_not_held("copying")
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __getstate__(self):
        # torch.save / pickle: everything but the model. With it, a saved cache held the whole model (its weights a
        # second time) and a loaded one re-rotated keys through that copy. A loaded cache is bound to the model it
        # is next used with (the streaming patch's forward, SinkDecoder, prefill) or by ``bind(model)``.
        self._check_not_held("saving")
        state = dict(self.__dict__)
        state["_model"] = None
        state.pop("_rope_checked", None)  # (a weak reference into the model)
        return state

    def _check_not_held(self, action: str) -> None:
        # its keys and values are the decoder's: a saved or copied cache would hold none, and stay held for ever (the
        # decoder hands them back to this cache only)
        if self.held:
            raise RuntimeError(f"this SinkCache is held by a SinkDecoder, which holds its keys and values: close the "
                               f"decoder (it hands the cache back) before {action} the cache")

    def bind(self, model) -> "SinkCache":
        """Attach ``model`` to a cache loaded with torch.load / pickle (which keep no model), or move a cache bound
        to another model to this one (e.g. ``copy.deepcopy((cache, model))`` copies the cache first, while its
        model is still the original). ``model`` must have the layout the cache was made for (its layer kinds,
        positions and rotary width) and, for RoPE, the rotary frequencies and attention scaling its keys were
        rotated with (bf16 / fp16 roundings aside), which for dynamic RoPE (dynamic_ntk, longrope) must hold up
        to the cache's ``max_position``. The streaming patch's forward, ``prefill``, ``SinkDecoder`` and
        ``StreamingSession`` bind the cache to the model they run; on the cache's own model, a rotary module
        replaced since the last check (a RoPE method applied or removed) is checked again. Returns the cache."""
        model = _check_model(model)
        if self._model is model and self._rope_unchanged():
            return self
        if self._model is not None and self._model is not model:  # bound to another model: it moves, after the checks
            self._check_not_held("moving")
        windows, rotated = layer_windows(model), rope_layers(model)
        layout = [("sink" if w is None else ("sliding", w), r) for w, r in zip(windows, rotated)]
        ours = [("sink" if isinstance(layer, SinkLayer) else ("sliding", layer.sliding_window), layer.rope)
                for layer in self.layers]
        rope = arch_of(model).positions == "rope"
        if (layout != ours or rope != self.rope
                or (rope and rotary_width(model) != self._rotary_width)):
            raise ValueError(f"SinkCache.bind: this cache was made for another model layout ({len(ours)} layers, "
                             f"{'RoPE' if self.rope else 'ALiBi'}); {model.config.model_type!r} has {len(layout)} "
                             f"layers ({'RoPE' if rope else 'ALiBi'}) or other layer kinds / rotary width")
        ours, theirs = getattr(self, "_frequencies", None), rope_frequencies(model) if rope else None
        if ours is not None and (ours.keys() != theirs.keys()
                                 or not all(_same_frequencies(ours[k], theirs[k]) for k in ours)):
            # (the same checkpoint with a RoPE method, e.g. yarn, applied on one side only: the keys held were
            # rotated with other frequencies than the ones that would re-rotate them and rotate new tokens, silently
            # wrong)
            raise ValueError(f"SinkCache.bind: this cache's keys were rotated with other RoPE frequencies than "
                             f"{model.config.model_type!r}'s rotary embedding has (another head_dim, rope_theta or "
                             f"RoPE scaling): apply the RoPE method (yarn, linear, ...) the cache was made with")
        # the attention scaling (yarn's attention_factor / mscale, longrope's) is in the keys held, not in inv_freq:
        # yarn with another attention_factor has the same frequencies, and its new keys and queries another scale
        scales, theirs = getattr(self, "_attention_scaling", None), attention_scalings(model) if rope else None
        if scales is not None and (scales.keys() != theirs.keys() or any(
                not math.isclose(scales[k], theirs[k], rel_tol=1e-6) for k in scales)):
            raise ValueError(f"SinkCache.bind: this cache's keys were rotated with another RoPE attention scaling "
                             f"({scales}) than {model.config.model_type!r}'s rotary embedding has ({theirs}): apply "
                             f"the RoPE method with the options (yarn's attention_factor, ...) the cache was made with")
        # frequencies that change with the positions (dynamic, longrope): the same ones only below the model's limit.
        # A cache made under static RoPE runs its positions past the trained length, where a dynamic_ntk model grows
        # its frequencies for new tokens while the keys held and their re-rotations keep the original ones
        limit = self._position_limit(model)
        if limit is not None and self.max_position > limit:
            raise ValueError(f"SinkCache.bind: this cache places tokens up to max_position={self.max_position}, past "
                             f"{limit}, where {model.config.model_type!r}'s RoPE (dynamic / longrope) changes its "
                             f"frequencies: it was made for a model with static RoPE; apply the RoPE method the "
                             f"cache was made with")
        self._model = model
        self._remember_rope()
        return self

    def _bind_for(self, model) -> None:
        """``bind(model)`` unless the cache is bound to it already and its rotary module is the one checked (the check
        every forward can afford)."""
        from ..registry import unwrap_model

        if self._model is not model and (self._model is None or self._model is not unwrap_model(model)):
            self.bind(model)
        elif not self._rope_unchanged():  # a RoPE method applied to (or removed from) the bound model since
            self.bind(self._model)

    _rope_checked = None  # (weak) the bound model's rotary module when bind / __init__ checked the keys against it

    def _remember_rope(self) -> None:
        self._rope_checked = weakref.ref(rotary_module(self._model, "streaming")[2]) if self.rope else None

    def _rope_unchanged(self) -> bool:
        """Whether the bound model's rotary module is the one its RoPE was checked against: a RoPE method (yarn,
        linear, dynamic_ntk, ...) applied to the model or removed replaces it, and the keys held were rotated with
        the frequencies before (e.g. ``copy.deepcopy((model, cache))``, then yarn applied to the copy)."""
        if not self.rope:
            return True
        seen = self._rope_checked
        return seen is not None and seen() is rotary_module(self._model, "streaming")[2]

    @property
    def model(self):
        """The model whose rotary embedding re-rotates the keys; a clear error for a loaded, unbound cache."""
        if self._model is None:
            raise RuntimeError("this SinkCache was loaded with torch.load / pickle, which keep no model: use it "
                               "with a streaming-patched model (bound on its first forward) or call "
                               "cache.bind(model) first")
        return self._model

    def __init__(self, model, sink_size: int = 4, window_size: int = 2044, max_position: int | None = None):
        check_sizes(sink_size, window_size)
        self.sink_size, self.window_size = int(sink_size), int(window_size)
        self._model = _check_model(model)
        self.rope = arch_of(self._model).positions == "rope"  # ALiBi: biases follow the slot index already
        # full-attention layers hold the sinks + window; sliding-window layers keep their own window
        windows, rotated = layer_windows(self._model), rope_layers(self._model)
        super().__init__(layers=[SinkLayer(rope) if window is None else SlidingLayer(window, rope)
                                 for window, rope in zip(windows, rotated)])
        self.sink_layers = [layer for layer in self.layers if isinstance(layer, SinkLayer)]
        self.sliding_layers = [layer for layer in self.layers if isinstance(layer, SlidingLayer)]
        if max_position is not None and (isinstance(max_position, bool) or not isinstance(max_position, int)
                                         or max_position < self.capacity):
            raise ValueError(f"option 'max_position' must be None (the default) or an integer >= sink_size + "
                             f"window_size ({self.capacity}), got {max_position!r}")
        self.max_position = max_position if max_position is not None else self._default_max_position()
        short = self._longrope_limit()
        if short is not None and self.max_position > short:
            raise ValueError(f"streaming on a longrope model: positions must stay below the model's "
                             f"original_max_position_embeddings ({short}), where it uses its short factors; past it "
                             f"transformers switches to the long factors for new tokens while the cached keys and "
                             f"their re-rotations keep the short ones. Got sink_size + window_size = {self.capacity}"
                             + (f" and max_position={max_position}" if max_position is not None else "")
                             + f": use a cache and max_position of at most {short}")
        self.places = None  # (B, slots): position each slot's original key was rotated at
        self.offset = None  # (B,): b per row
        self.pads = None  # (B,): pad slots per row (after the sinks once reordered)
        self._reorder = False  # the first forward had padding: reorder the slots before the next one
        self.seen_tokens = 0  # tokens fed so far (the stream position)
        self.prefix_tokens = 0  # of those, fed before the sequence generate returns (see _stream_position_prefill)
        self.evicted_tokens = 0  # slots dropped so far (pads included)
        self.managed = False  # True: the caller makes room and sets positions (the patch's hook keeps off)
        self.held = False  # True while a SinkDecoder holds the slots (sink_decoder.py)
        # host-side bounds, so that a step never waits for the GPU: next position of any row <= _top,
        # pad slots of any row <= _max_pads
        self._top, self._max_pads = 0, 0
        self._sink_stack = None  # see _sink_keys
        self._rotary_width = rotary_width(self._model) if self.rope else None  # see rotate_keys
        self._frequencies = rope_frequencies(self._model) if self.rope else None  # checked by bind
        self._attention_scaling = attention_scalings(self._model) if self.rope else None  # checked by bind
        self._remember_rope()

    def _default_max_position(self) -> int:
        """Static RoPE (default, linear, yarn, llama3) only sees position differences, which stay below
        the capacity: positions may run to trained length + capacity (float32 angles at most ~2x as
        large as the model's own), so a cache as long as the trained length (Llama-2, 4096) re-rotates
        every key once per ~4096 steps, not at every step (longrope with one set of factors, as longctx's static
        methods on phi3 write it, included). RoPE whose frequencies depend on the largest position (dynamic,
        longrope) and ALiBi: the trained length."""
        trained = getattr(self._model.config, "max_position_embeddings", None)
        short = self._longrope_limit()
        if short is not None:  # longrope: its short factors up to original_max_position_embeddings
            return max(short, self.capacity)  # (a larger capacity is refused in __init__)
        if not trained:
            return 2**62
        if self.rope and (static_rope(rotary_module(self._model, "streaming")[2]) or self._fixed_longrope()):
            return trained + self.capacity
        return trained

    def _longrope_limit(self, model=None) -> int | None:
        """For longrope models: the smallest original_max_position_embeddings over layer types. transformers'
        rotary module uses the short factors while every position is below it and the long ones past it,
        deciding per call from the largest position, so a stream must keep all its positions below it to
        rotate queries, new keys and re-rotated keys with the same factors. None for other models."""
        if not self.rope:
            return None
        model = model if model is not None else self._model
        limits = []
        for kind, p in self._rope_kinds(model):
            if "longrope" in str(kind):
                if _one_factor_set(p):
                    continue  # one set of factors (longctx's static methods on phi3): the switch changes nothing
                limits.append(p.get("original_max_position_embeddings")
                              or getattr(model.config, "original_max_position_embeddings", None))
        limits = [x for x in limits if x]
        return min(limits) if limits else None

    def _rope_kinds(self, model=None) -> list[tuple]:
        """(rope type, its rope parameters) per layer type of the rotary module (of ``model``, default the cache's)."""
        model = model if model is not None else self._model
        rotary = rotary_module(model, "streaming")[2]
        rope_type = getattr(rotary, "rope_type", "default")
        types = rope_type if isinstance(rope_type, dict) else {None: rope_type}
        params = getattr(model.config, "rope_parameters", None) or {}
        return [(kind, params.get(layer_type, params) if layer_type is not None else params)
                for layer_type, kind in types.items()]

    def _fixed_longrope(self, model=None) -> bool:
        """Whether every layer type's RoPE is static or longrope with one set of factors (longctx's static methods
        on phi3): frequencies that no position changes, so positions may run as far as static RoPE's. Counted as
        dynamic, such a patch re-rotated every key once per trained length - capacity tokens (every token where
        the cache was longer than the patched max_position_embeddings), where the same patch on llama did so once
        per trained length."""
        kinds = self._rope_kinds(model)
        return any(kind == "longrope" for kind, _ in kinds) and all(
            kind in STATIC_ROPE_TYPES or (kind == "longrope" and _one_factor_set(p)) for kind, p in kinds)

    def _position_limit(self, model) -> int | None:
        """The largest max_position below which ``model``'s RoPE keeps the frequencies it has now, as
        ``_default_max_position`` counts it: None for frequencies no position changes (static RoPE, longrope with
        one set of factors, ALiBi); dynamic RoPE: the trained length; longrope: original_max_position_embeddings."""
        if not self.rope or static_rope(rotary_module(model, "streaming")[2]) or self._fixed_longrope(model):
            return None
        limits = [self._longrope_limit(model), getattr(model.config, "max_position_embeddings", None)]
        limits = [x for x in limits if x]
        return min(limits) if limits else None

    @property
    def capacity(self) -> int:
        return self.sink_size + self.window_size

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        """Without ``layer_idx``: the slots held (the full-attention layers' count). With it: that
        layer's own count (a sliding layer counts the whole stream, as transformers' masks expect)."""
        if layer_idx is None:
            return self.sink_layers[0].get_seq_length()
        return super().get_seq_length(layer_idx)

    def reset(self) -> None:
        """Empty the cache for a new stream: every layer and the per-stream bookkeeping."""
        super().reset()
        self.places = self.offset = self.pads = None
        self._reorder, self.seen_tokens, self.evicted_tokens, self.prefix_tokens = False, 0, 0, 0
        self._top, self._max_pads, self._sink_stack = 0, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the rows of every layer and of the per-row places, offsets and pads."""
        super().reorder_cache(beam_idx)
        if self.places is not None:
            idx = beam_idx.to(self.places.device)
            self.places, self.offset, self.pads = (t.index_select(0, idx) for t in (self.places, self.offset, self.pads))
        self._sink_stack = None  # stacked from the rows as they were

    def _slots(self) -> int:
        return 0 if self.places is None else self.places.shape[-1]

    def make_room(self, n: int, batch: int = 1, pads: torch.Tensor | None = None, device=None) -> None:
        """Evict so that ``n`` new tokens fit (re-rotating what must move), and give them their
        positions (``self.places[:, -n:]``). ``pads``: left padding per row, first forward only."""
        if self.held:
            raise RuntimeError("this SinkCache is held by a SinkDecoder: feed tokens through decoder.step, or "
                               "close the decoder (it hands the cache back) before feeding the cache itself")
        if n > self.window_size:
            raise ValueError(f"cannot feed {n} tokens at once into a streaming cache with window_size="
                             f"{self.window_size}; feed at most window_size tokens per forward "
                             f"(longctx.methods.streaming.prefill does that)")
        if self.places is None:
            device = device or torch.device("cpu")
            self.places = torch.zeros(batch, 0, dtype=torch.long, device=device)
            self.offset = torch.zeros(batch, dtype=torch.long, device=device)
            self.pads = torch.zeros(batch, dtype=torch.long, device=device)
        self.reserve(n)  # (reorders the slots of a padded previous forward first)
        if pads is not None and bool(pads.any()):
            if self._slots():
                raise NotImplementedError("streaming: padding is supported in the first forward only (left "
                                          "padding of the prompt)")
            if self.sliding_layers:
                raise NotImplementedError("streaming: padded batches on models with sliding-window layers "
                                          "(their masks count stream positions, the sinks' count slots); "
                                          "stream rows alone")
            if int((n - pads).min()) < self.sink_size:
                raise NotImplementedError(f"streaming: every padded row needs at least sink_size={self.sink_size} "
                                          f"real tokens in its first forward")
            self.pads, self._reorder = pads.to(self.places.device), True
            self._max_pads = int(pads.max())
        slots = self._slots()
        real = slots - self.pads  # (B,) real tokens held
        if self.rope and self._top + n > self.max_position:  # stay in the trained range (_top >= real + b)
            shift = -self.offset  # (B,): every position moves down by b
            self.offset = torch.zeros_like(self.offset)
            self._top = slots
            self._rerotate(0)
            self._move_sliding(shift)
        step = torch.arange(n, device=self.places.device)[None]
        new = (real + self.offset)[:, None] + step  # real tokens count from the row's first one
        if slots == 0:  # the first forward (pads, masked, sit at b = 0), or everything was just evicted
            new = (step - self.pads[:, None]).clamp(min=0) + self.offset[:, None]
        self.places = torch.cat([self.places, new], dim=-1)
        self.seen_tokens += n
        self._top += n
        for layer in self.layers:  # each layer's next update may add these n tokens (see _take_room)
            layer.room = n

    def key_mask(self, n_new: int) -> torch.Tensor | None:
        """(B, slots + n_new) 1 = attend, 0 = a pad slot; None when no row holds pads."""
        if self.pads is None or self._max_pads == 0:
            return None
        slots = self._slots() - n_new
        i = torch.arange(slots + n_new, device=self.pads.device)[None]
        if self._reorder or slots == 0:  # not reordered yet: pads first
            pad = i < self.pads[:, None]
        else:
            pad = (i >= self.sink_size) & (i < self.sink_size + self.pads[:, None])
        return (~pad).long()

    def _reorder_slots(self) -> None:
        """After the padded first forward: [pads][real] -> [real[:sink]][pads][real[sink:]] per row."""
        self._reorder, self._sink_stack = False, None
        n, s = self._slots(), self.sink_size
        i = torch.arange(n, device=self.places.device)[None]
        p = self.pads[:, None]
        index = torch.where(i < s, i + p, torch.where(i < s + p, i - s, i))  # (B, n) source slot
        self.places = self.places.gather(1, index)
        for layer in self.sink_layers:
            if layer.is_initialized:
                layer.flush()
                idx = index.to(layer.keys.device)[:, None, :, None]
                for name in ("keys", "orig_keys", "values"):
                    t = getattr(layer, name)
                    setattr(layer, name, t.gather(2, idx.expand(t.shape[0], t.shape[1], n, t.shape[3])))

    def reserve(self, n: int) -> int:
        """Evict now so that ``n`` more tokens fit without eviction (at most window_size); returns
        how many slots were dropped."""
        if self.places is None:
            return 0
        if self._reorder:
            self._reorder_slots()
        n = min(n, self.window_size)
        length = self._slots()
        drop = max(0, length + n - self.capacity)
        if drop:
            start = min(self.sink_size, length)
            self.places = torch.cat([self.places[:, :start], self.places[:, start + drop:]], dim=-1)
            self.evicted_tokens += drop
            real_dropped = (drop - self.pads).clamp(min=0)  # a row's pads go first
            self.pads = (self.pads - drop).clamp(min=0)
            self._max_pads = max(0, self._max_pads - drop)
            self.offset = self.offset + real_dropped  # the window moved left as many places: positions unchanged
            layers = [layer for layer in self.sink_layers if layer.is_initialized]
            rotating = [layer for layer in layers if layer.rope] if self.rope and start else []
            sinks = {}
            if rotating:  # the sinks stay in their slots: re-rotated to j + b
                rotated = self._rotated(self._sink_keys(rotating, start), *self._rotation(0, start))
                sinks = dict(zip(rotating, rotated.unbind(0)))
            for layer in layers:
                layer.evict(start, drop, sinks.get(layer))
        return drop

    def _targets(self, start: int, stop: int) -> torch.Tensor:
        """(B, stop - start) position each slot in [start, stop) should sit at: its place + b."""
        i = torch.arange(start, stop, device=self.places.device)[None]
        s, p = self.sink_size, self.pads[:, None]
        place = torch.where(i < s, i, i - p)  # window slots: their index among the real tokens
        return place + self.offset[:, None]

    def _rotation(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, n, rot_dim) in fp32 turning slots [start, stop) from their original positions to
        their targets: R(target - original), unscaled."""
        device = self.sink_layers[0].orig_keys.device
        delta = (self._targets(start, stop) - self.places[:, start:stop]).to(device)
        return rope_cos_sin(rotary_module(self.model, "streaming")[2], delta, "full_attention")

    def _sink_keys(self, layers, start: int) -> torch.Tensor:
        """(L, B, H, start, D) original keys of the sink slots of all layers, stacked once and kept
        while the sinks stay the same (one rotation per step for every layer, not one per layer)."""
        kept = self._sink_stack
        if kept is None or kept.shape[0] != len(layers) or kept.shape[-2] != start:
            kept = self._sink_stack = torch.stack([layer.orig_keys[:, :, :start] for layer in layers])
        return kept

    def _rotated(self, orig_keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate_keys(self._apply_rotary, orig_keys.float(), cos, sin, self._rotary_width).to(orig_keys.dtype)

    def _rerotate(self, start: int) -> None:
        """keys[start:] = R(target - original position) orig_keys[start:], for every full-attention layer."""
        layer0 = self.sink_layers[0]
        if not layer0.is_initialized or self._slots() <= start:
            return
        for layer in self.sink_layers:
            layer.flush()
        rotation = self._rotation(start, self._slots())
        for layer in [layer for layer in self.sink_layers if layer.rope]:  # NoPE layers: never rotated
            layer.keys = torch.cat([layer.keys[:, :, :start], self._rotated(layer.orig_keys[:, :, start:], *rotation)],
                                   dim=-2)

    def _move_sliding(self, shift: torch.Tensor) -> None:
        """Move every key the sliding-window layers hold by ``shift`` (B,) positions: each is its
        original rotated once by all the moves since it was made (R(layer.shift) orig_keys, fp32)."""
        rotary = rotary_module(self.model, "streaming")[2]
        for layer in self.sliding_layers:
            if not layer.rope or not layer.is_initialized or layer.keys.shape[-2] == 0:
                continue
            layer.shift = layer.shift + shift.to(layer.shift.device)[:, None]
            cos, sin = rope_cos_sin(rotary, layer.shift, layer.layer_type)
            layer.keys = self._rotated(layer.orig_keys, cos, sin)

    @property
    def _apply_rotary(self):
        module = importlib.import_module(type(self.model.base_model).__module__)
        return module.apply_rotary_pos_emb

    def to_device(self, device) -> None:
        if self.places is not None:
            self.places, self.offset, self.pads = (t.to(device) for t in (self.places, self.offset, self.pads))


def _one_factor_set(params) -> bool:
    """Whether longrope ``params`` hold one set of factors: short and long factors equal as transformers reads them
    (float32 tensors; lists, tuples or tensors alike), so its switch at original_max_position_embeddings changes
    no frequency (the attention factor never depends on the position)."""
    short, long = params.get("short_factor"), params.get("long_factor")
    if short is None or long is None:
        return False
    try:
        short, long = (torch.as_tensor(f, dtype=torch.float32).cpu() for f in (short, long))
    except (TypeError, ValueError, RuntimeError):
        return False
    return short.shape == long.shape and torch.equal(short, long)


def static_rope(rotary) -> bool:
    """True if the frequencies of ``rotary`` (every layer type's) do not depend on the positions seen."""
    rope_type = getattr(rotary, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return all(t in STATIC_ROPE_TYPES for t in types)


def rotary_width(model) -> int | None:
    """How many leading dims of each key RoPE turns where the attention itself splits them off before calling
    ``apply_rotary_pos_emb`` (partial rotary in phi, stablelm, persimmon, gpt_neox: ``rotary_ndims``); None
    where that function takes whole keys."""
    for module in model.modules():
        width = getattr(module, "rotary_ndims", None)
        if isinstance(width, int) and not isinstance(width, bool):
            return width
    return None


def rope_frequencies(model) -> dict[str, torch.Tensor]:
    """The frequencies the model's rotary module was built with (its ``original_inv_freq`` buffers, one per layer
    type), copies in their dtype where they are (no wait for the GPU): what the keys of a SinkCache made now are
    rotated with (``SinkCache.bind`` checks them)."""
    rotary = rotary_module(model, "streaming")[2]
    buffers = dict(rotary.named_buffers())
    names = [n for n in buffers if n.endswith("original_inv_freq")] or [n for n in buffers if n.endswith("inv_freq")]
    return {n: buffers[n].detach().clone() for n in names}


def _same_frequencies(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two ``rope_frequencies`` entries are the same frequencies, up to one rounding of the coarser dtype
    (a model cast to bf16 / fp16 after the cache was made, or before; fp16's subnormals for the smallest) and
    1e-5 at least (computed on another device). With a fixed rtol=1e-2, fp32 models whose rope_theta differed by
    1% passed (at 8k positions, several radians apart in the middle frequencies)."""
    if ours.shape != theirs.shape:
        return False
    coarse = [torch.finfo(t.dtype) for t in (ours, theirs)]
    rtol, atol = max(1e-5, *(f.eps for f in coarse)), max(f.tiny * f.eps for f in coarse)  # (a subnormal's step)
    return torch.allclose(ours.cpu().double(), theirs.cpu().double(), rtol=rtol, atol=atol)  # (no fp64 on mps)


def attention_scalings(model) -> dict[str, float]:
    """The attention scaling the model's rotary module multiplies its cos and sin by (yarn's attention factor /
    mscale, longrope's), per layer type (``attention_scaling`` or ``{layer_type}_attention_scaling``): in every key
    it rotates, and not in its frequencies (``SinkCache.bind`` checks it)."""
    rotary = rotary_module(model, "streaming")[2]
    rope_type = getattr(rotary, "rope_type", None)
    names = [f"{t}_attention_scaling" for t in rope_type] if isinstance(rope_type, dict) else ["attention_scaling"]
    return {n: float(getattr(rotary, n, 1.0)) for n in names}


def rotate_keys(apply_rotary, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                width: int | None = None) -> torch.Tensor:
    """``k`` turned by cos, sin with the model's ``apply_rotary_pos_emb``; with ``width`` (``rotary_width``),
    only its first ``width`` dims, as the model's attention does."""
    if width is not None and width < k.shape[-1]:
        head = apply_rotary(k[..., :width], k[..., :width], cos, sin)[1]
        return torch.cat([head, k[..., width:]], dim=-1)
    return apply_rotary(k, k, cos, sin)[1]


def rope_cos_sin(rotary, delta: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, n, rot_dim) in fp32 rotating by ``delta`` (B, n) positions, from the model's own
    rotary module, unscaled (the module's attention scaling undone). Modules with one RoPE per layer
    type (gemma3, olmo3) give the one of ``layer_type``."""
    probe = torch.zeros((), dtype=torch.float32, device=delta.device)
    if isinstance(getattr(rotary, "rope_type", None), dict):  # per layer type
        cos, sin = rotary(probe, position_ids=delta, layer_type=layer_type)
        scale = getattr(rotary, f"{layer_type}_attention_scaling", 1.0)
    else:
        cos, sin = rotary(probe, position_ids=delta)
        scale = getattr(rotary, "attention_scaling", 1.0)
    scale = float(scale)  # the rotary output carries it: undo
    return cos / scale, sin / scale


def layer_windows(model) -> list[int | None]:
    """Per decoder layer: None for full attention (the sink cache bounds it) or its sliding window
    (it bounds itself), laid out as transformers' ``DynamicCache(config=...)`` lays out its layers."""
    config = model.config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(config)
    if isinstance(kwargs, dict):  # transformers < 5.2x: one kwargs dict for every layer
        kwargs = [kwargs] * len(layer_types)
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise NotImplementedError(f"streaming: layer types {unknown} are not supported; supported layer types: "
                                  f"full_attention, sliding_attention")
    return [kw.get("sliding_window", getattr(config, "sliding_window", None)) if kind == "sliding_attention" else None
            for kind, kw in zip(layer_types, kwargs)]


def check_sizes(sink_size, window_size) -> None:
    """sink_size an integer >= 0, window_size an integer >= 1 (numpy integers included, as for every option)."""
    if isinstance(sink_size, bool) or not isinstance(sink_size, numbers.Integral) or sink_size < 0:
        raise ValueError(f"option 'sink_size' must be an integer >= 0, got {sink_size!r}")
    check_positive("window_size", window_size, integer=True)


# families whose cache layers hold MLA latents (keys) and the shared RoPE key (values), not attention keys
_LATENT_KV_FAMILIES = ("deepseek_v3",)


def _check_model(model):
    from ..arch import arch_of
    from ..registry import unwrap_model

    model = unwrap_model(model)
    config = model.config
    positions = arch_of(model).positions  # a known family, or a clear error
    if config.model_type in _LATENT_KV_FAMILIES:
        raise NotImplementedError(f"streaming: {config.model_type!r} (multi-head latent attention) caches compressed "
                                  f"latents and a separate RoPE key, not keys the sink cache could re-rotate")
    if positions == "rope":
        rotary_module(model, "streaming")
    elif positions != "alibi":
        raise ValueError(f"streaming supports RoPE and ALiBi models; {config.model_type!r} uses {positions} "
                         f"positions")
    windows = layer_windows(model)
    if all(window is not None for window in windows):
        sizes = ", ".join(map(str, sorted(set(windows))))
        raise ValueError(f"streaming: every layer of this {config.model_type!r} model is a sliding-window layer "
                         f"(sliding_window={sizes}) whose own cache keeps only its last tokens, so attention sinks "
                         f"would apply to no layer; decode it with its own cache (DynamicCache), or load it with "
                         f"full-attention layers (mistral-style configs: sliding_window=None) to stream it with sinks")
    return model


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: SinkCache, chunk_size: int | None = None):
    """Feed a prompt of any length into ``cache`` in chunks of at most ``chunk_size`` (default:
    window_size) tokens; memory stays bounded by the cache. Returns the last chunk's model output. ``model`` must
    have the streaming patch (its forward makes room and sets positions; a ``managed`` cache is refused)."""
    chunk_size = chunk_size or cache.window_size
    cache._bind_for(model)  # a loaded cache, or one bound to another model: checked, bound to this one
    out = None
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model(input_ids[:, start:start + chunk_size], past_key_values=cache, use_cache=True)
    return out


# model families whose prepare_inputs_for_generation drops the cache once the sequence passes
# original_max_position_embeddings, to recompute it with longrope's long factors
_CACHE_DROPPING_FAMILIES = ("phi3", "phimoe", "phi4_multimodal")


def _cache_keeping_prepare(model):
    """For the families above: their parent's prepare_inputs_for_generation, bound to this instance (set as
    an instance attribute while the patch is on, so ``model.generate`` keeps the sink cache), else None.
    Under streaming the drop is wrong: it would run a dense pass over the whole sequence (unbounded) and
    hand the patch a full DynamicCache; positions by place never reach the switch point (a longrope
    SinkCache keeps them below it, see SinkCache._longrope_limit)."""
    import types

    mro = type(model).__mro__
    owner = next((c for c in mro if "prepare_inputs_for_generation" in c.__dict__), None)
    if owner is None or not any(f".{family}." in owner.__module__ + "." for family in _CACHE_DROPPING_FAMILIES):
        return None
    parent = next(c for c in mro[mro.index(owner) + 1:] if "prepare_inputs_for_generation" in c.__dict__)
    return types.MethodType(parent.__dict__["prepare_inputs_for_generation"], model)


def _stream_position_prepare(prepare, *args, **kwargs):
    """``prepare(*args, **kwargs)`` (a bound prepare_inputs_for_generation), made to slice a continued stream by the
    tokens it has seen. ``model.generate(sequences, past_key_values=sink_cache)`` feeds the tokens past
    ``get_seq_length()``; a SinkCache's is the slot count (what the masks need), so once tokens were
    evicted, generate would feed tokens the stream has already seen a second time. On the first
    iteration the slice is set to the tokens given past the stream's (its seen tokens but those it saw before the
    sequence, ``prefix_tokens``: prompt tuning's virtual tokens); later steps (one token each) are left alone. Where
    generate's slice was already set so (this wraps a prepare that calls another wrapper), it is left as it is."""
    return prepare(*args, **_stream_slice(args, kwargs))


def _stream_slice(args, kwargs) -> dict:
    """``kwargs`` of a prepare_inputs_for_generation call with the first iteration's slice set as
    _stream_position_prepare says (a sequence the stream has seen all of is refused, also where generate's own slice,
    the slot count, happens to be the same: it was ``input_ids[:, -0:]``, the whole sequence fed a second time)."""
    cache, n = kwargs.get("past_key_values"), kwargs.get("next_sequence_length")
    if kwargs.get("is_first_iteration") and n is not None and isinstance(cache, SinkCache) and not cache.managed:
        embeds = kwargs.get("inputs_embeds")
        given = (embeds if embeds is not None else args[0] if args else kwargs["input_ids"]).shape[1]
        seen = cache.seen_tokens - cache.prefix_tokens  # of the sequence (generate's n: given - the slot count)
        _check_new_tokens(given, cache)
        if given - seen != n:
            kwargs = {**kwargs, "next_sequence_length": given - seen}
        mask = kwargs.get("attention_mask")
        if embeds is not None and cache.prefix_tokens and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
                and mask.shape[1] == given:
            # the embeddings of the sequence with a mask over it, in a stream fed tokens before it (prompt tuning's
            # virtual tokens): the hook takes a mask over the sequence for token ids only (peft's forward re-feeding
            # the virtual tokens comes as long), so this one is put over the stream (5.17 keeps an all-ones mask)
            ones = mask.new_ones(mask.shape[0], cache.prefix_tokens)
            kwargs = {**kwargs, "attention_mask": torch.cat([ones, mask], dim=1)}
    return kwargs


def _check_new_tokens(given: int, cache: SinkCache) -> None:
    """Refuse a sequence of ``given`` tokens continuing ``cache``'s stream that holds no token it has not seen."""
    if cache.seen_tokens and given <= cache.seen_tokens - cache.prefix_tokens:
        before = (f" ({cache.prefix_tokens} of them before the sequence, e.g. prompt tuning's virtual tokens)"
                  if cache.prefix_tokens else "")
        raise ValueError(f"streaming patch: model.generate got {given} tokens with a sink cache that has seen "
                         f"{cache.seen_tokens}{before}: pass the whole stream so far plus the new tokens")


def _stream_position_prefill(prefill, *args, **kwargs):
    """``prefill(*args, **kwargs)`` (generate's bound ``_prefill``). A chunked prefill (``prefill_chunk_size``) that
    continues a stream runs unchunked: generate cuts its chunks by ``get_seq_length()`` (the slot count) without
    ``next_sequence_length`` (5.2x), or feeds the whole sequence (5.17), so ``_stream_position_prepare`` could not set
    the slice and tokens the stream has seen would be fed a second time; the patch's forward prefills an input longer
    than window_size in window_size chunks itself, so memory stays bounded. A new stream records the tokens it was fed
    beyond the sequence given (``prefix_tokens``: prompt tuning's virtual tokens, which peft's prepare puts before the
    prompt; they are in the stream, not in the sequences generate returns)."""
    import copy

    given = {**dict(zip(("input_ids", "generation_config", "model_kwargs"), args)), **kwargs}
    config, cache = given.get("generation_config"), (given.get("model_kwargs") or {}).get("past_key_values")
    if (getattr(config, "prefill_chunk_size", None) is not None and isinstance(cache, SinkCache)
            and not cache.managed and cache.seen_tokens):
        config = copy.copy(config)  # (generate's own copy for this call; the caller's is not touched)
        config.prefill_chunk_size = None
        if len(args) > 1:
            args = (args[0], config, *args[2:])
        else:
            kwargs["generation_config"] = config
    # (a stream begun from inputs_embeds: continued with the embeddings of the whole stream, they count as its sequence)
    new = ((not isinstance(cache, SinkCache) or cache.seen_tokens == 0)  # (generate's empty DynamicCache: the hook's)
           and (given.get("model_kwargs") or {}).get("inputs_embeds") is None)
    out = prefill(*args, **kwargs)
    cache = getattr(out, "past_key_values", None)
    if new and isinstance(cache, SinkCache) and not cache.managed and given.get("input_ids") is not None:
        cache.prefix_tokens = max(cache.seen_tokens - given["input_ids"].shape[1], 0)
    return out


_WRAPPERS = {"prepare_inputs_for_generation": _stream_position_prepare, "_prefill": _stream_position_prefill}


def _stands_for(model, name: str, value):
    """What the instance attribute value ``value`` of ``model``'s ``name`` stands for: None for the class's method
    (missing, the class's method bound to ``model``, or the wrapper of a removed streaming patch that wrapped the
    class's method: what peft's ``PeftModel.generate`` restores where it was set up while a patch was on), else the
    model's own method (itself, or the one a removed patch's wrapper wrapped, followed through such wrappers)."""
    while isinstance(value, _PatchedMethod) and not value.patch.active:
        inner = None if value.patch._plain[value.name] else value.patch._own[value.name]
        if inner is value:
            break
        value = inner
    if value is None or (getattr(value, "__self__", None) is model
                         and getattr(value, "__func__", None) is getattr(type(model), name, None)):
        return None
    return value


def _is_class_method(model, name: str) -> bool:
    """Whether ``model``'s instance attribute ``name`` stands for its class's method (see _stands_for)."""
    return _stands_for(model, name, model.__dict__.get(name)) is None


class _PatchedMethod:
    """What the patch sets as a model instance attribute (``prepare_inputs_for_generation``, ``_prefill``): a
    callable holding the patch, which finds the method it wraps through ``patch.model`` at each call. So a
    ``copy.deepcopy`` of the patched model copies it with the same patch copy its hook is bound to, acting on
    the copy (a closure over the original's bound method made the copy's generate run the original model), and
    ``torch.save(model)`` can pickle it. ``__wrapped__`` is the method wrapped: ``inspect.signature`` follows it
    (generate reads prepare_inputs_for_generation's, e.g. to accept ``inputs_embeds`` only where it takes them)."""

    def __init__(self, patch, name: str):
        self.patch, self.name = patch, name

    @property
    def __wrapped__(self):
        return self.patch._wrapped(self.name)

    def __call__(self, *args, **kwargs):
        if not self.patch.active:  # left behind by a removed patch (peft put it back): the method it wrapped
            return self.patch._wrapped(self.name)(*args, **kwargs)
        if self.name == "_prefill":  # generate's prefill, before its first prepare_inputs_for_generation
            self.patch._reinstall()
            with self.patch._slicing_prepare():
                return _WRAPPERS[self.name](self.patch._wrapped(self.name), *args, **kwargs)
        return _WRAPPERS[self.name](self.patch._wrapped(self.name), *args, **kwargs)


class _SlicingPrepare:
    """Another's prepare_inputs_for_generation on the model (peft's, set by ``PeftModel.generate``), made to slice a
    continued stream for one prefill (see StreamingPatch._slicing_prepare)."""

    def __init__(self, prepare):
        self.__wrapped__ = prepare

    def __call__(self, *args, **kwargs):
        kwargs = _stream_slice(args, kwargs)
        inputs = self.__wrapped__(*args, **kwargs)
        # peft's last-token rule (prompt learning: it keeps only the last input id wherever the slot count reaches
        # them) cut a prefill into a stream to one token: a continuation with more than one new token, a chunk of a
        # chunked prefill (prefill_chunk_size) past the first, dropped the others silently. Every id this prefill
        # call is to feed is put back: the slice set above, or all of them where generate sets none
        cache, ids = kwargs.get("past_key_values"), args[0] if args else kwargs.get("input_ids")
        fed = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if isinstance(cache, SinkCache) and not cache.managed and cache.seen_tokens and ids is not None \
                and fed is not None and fed.dim() == 2 and ids.dim() == 2:
            n = kwargs.get("next_sequence_length")
            want = ids.shape[1] if n is None else min(n, ids.shape[1])
            if 0 < fed.shape[1] < want and torch.equal(fed, ids[:, ids.shape[1] - fed.shape[1]:]):
                inputs["input_ids"] = ids[:, -want:].clone(memory_format=torch.contiguous_format)
        return inputs


@dataclass(kw_only=True)
class StreamingOptions(Options):
    sink_size: int = 4  # attention sinks: the first tokens, kept for ever
    window_size: int = 2044  # recent tokens kept

    def validate(self) -> None:
        check_sizes(self.sink_size, self.window_size)


@register("streaming", StreamingOptions,
          "StreamingLLM: attention sinks + recent window, bounded KV cache, positions by place (Xiao et al., 2023)")
class StreamingPatch(Patch):
    slot = "cache"

    def _attach(self) -> None:
        _check_model(self.model)
        self._warned = False
        self._handle = self.model.base_model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        # a model's own instance attribute (e.g. peft's prepare_inputs_for_generation) is kept and wrapped;
        # generate's chunked prefill slices by get_seq_length() without prepare's next_sequence_length
        self._own = {name: self.model.__dict__.get(name) for name in _WRAPPERS}
        # the class's method bound as an instance attribute (left there by peft's PeftModel.generate, prompt learning,
        # once it ran), or a removed patch's wrapper: wrapped as the class's method (phi3: the cache-keeping one), and
        # put back where peft resets it again; remove() restores what was there
        self._plain = {name: _is_class_method(self.model, name) for name in _WRAPPERS}
        self._set = {}
        for name in _WRAPPERS:  # a bare decoder (no generate) has neither
            if hasattr(self.model, name):
                self._set[name] = _PatchedMethod(self, name)
                setattr(self.model, name, self._set[name])

    def __setstate__(self, state: dict) -> None:
        if "_own" in state:
            # a bound method pickles as getattr(model, name): where the model was rebuilt before this patch's state
            # (torch.save((patch, model))), the class's method bound to it came back as this patch's own wrapper
            model, own = state.get("_model_ref", state.get("model")), dict(state["_own"])
            for name, value in own.items():
                if isinstance(value, _PatchedMethod) and value.patch is self:
                    own[name] = getattr(type(model), name).__get__(model, type(model))
            state = {**state, "_own": own}
            if "_plain" not in state:  # (pickled by longctx before _plain): the class's method bound is plain too
                state["_plain"] = {name: value is None or (getattr(value, "__self__", None) is model and getattr(
                    value, "__func__", None) is getattr(type(model), name, None)) for name, value in own.items()}
        super().__setstate__(state)

    def _wrapped(self, name: str):
        """The bound method that the instance attribute ``name`` wraps (see _PatchedMethod)."""
        if not self._plain[name]:
            return self._own[name]
        # the cache-keeping prepare only while the patch is on: a removed patch's wrapper is the class's method
        keeping = (_cache_keeping_prepare(self.model) if name == "prepare_inputs_for_generation" and self.active
                   else None)
        return keeping or getattr(type(self.model), name).__get__(self.model, type(self.model))

    def _reinstall(self) -> None:
        """Put the wrappers back where the instance attribute was reset to the class's own method: peft's
        ``PeftModel.generate`` for prompt learning sets its own ``prepare_inputs_for_generation`` on the model and
        afterwards restores the one it saw when it was built, so with peft set up before streaming, every later
        ``model.generate`` lost the continuation slicing (it fed tokens the stream had seen a second time). Anything
        else set there (peft's own, during its generate) is left alone; _slicing_prepare wraps it for the prefill."""
        for name, wrapper in self._set.items():
            current = self.model.__dict__.get(name)
            # (also a removed patch's wrapper standing for the method this one wraps: peft put it back)
            if current is not wrapper and _stands_for(self.model, name, current) is self._target(name):
                setattr(self.model, name, wrapper)

    @contextlib.contextmanager
    def _slicing_prepare(self):
        """While generate's prefill runs: where the model's prepare_inputs_for_generation is another's (peft's, set by
        ``PeftModel.generate`` for prompt learning; it calls the prepare peft saw at ``get_peft_model``: the class's
        where peft was set up before this patch), that one wrapped to slice the continued stream too. Its own
        last-token rule does not: it keeps one token only where the slot count reaches generate's slice, so a
        stream past twice the cache's slots fed tokens it had seen a second time (silently), and prompt tuning's
        virtual tokens were not counted. (Where it calls this patch's wrapper, the slice is set once.)"""
        current = self.model.__dict__.get("prepare_inputs_for_generation")
        if current is None or current is self._set.get("prepare_inputs_for_generation"):
            yield
            return
        wrapper = _SlicingPrepare(current)
        self.model.prepare_inputs_for_generation = wrapper
        try:
            yield
        finally:
            if self.model.__dict__.get("prepare_inputs_for_generation") is wrapper:
                self.model.prepare_inputs_for_generation = current

    def _target(self, name: str):
        """What this patch's wrapper ``name`` stands for (see _stands_for): None where it wraps the class's method."""
        return None if self._plain[name] else _stands_for(self.model, name, self._own[name])

    def _detach(self) -> None:
        self._handle.remove()
        for name, wrapper in self._set.items():
            current = self.model.__dict__.get(name)
            if current is wrapper or (current is not None
                                      and _stands_for(self.model, name, current) is self._target(name)):
                if self._own[name] is not None:
                    setattr(self.model, name, self._own[name])
                else:
                    delattr(self.model, name)

    def new_cache(self) -> SinkCache:
        return SinkCache(self.model, self.options.sink_size, self.options.window_size)

    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None:
            return None  # no cache: a plain (dense) forward
        if isinstance(cache, DynamicCache) and not isinstance(cache, SinkCache):
            if cache.get_seq_length() > 0:
                raise ValueError("streaming patch: got a DynamicCache that already holds tokens; "
                                 "start from an empty cache or a longctx.SinkCache")
            cache = kwargs["past_key_values"] = self.new_cache()
        if not isinstance(cache, SinkCache) or cache.managed:
            return None  # a cache the caller chose (e.g. static) or drives itself: theirs
        cache._bind_for(self.model)  # a loaded cache, or one bound to another model (a copy's): checked, bound here
        if args:  # the decoder body called positionally: input_ids first
            kwargs["input_ids"], args = args[0], ()
        key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        x = kwargs[key]
        n = x.shape[1]
        mask = kwargs.pop("attention_mask", None)
        pads = None
        if mask is not None:
            # (over the stream: seen + new; over the sequence generate returns, where the stream was fed tokens
            # before it, e.g. prompt tuning's virtual tokens: seen - prefix_tokens + new, for new token ids only:
            # peft's forward puts the virtual tokens' embeddings before every input, and their mask before the
            # one given, so a mask over the sequence came as long with the virtual tokens fed a second time)
            over = (cache.seen_tokens + n,) + ((cache.seen_tokens - cache.prefix_tokens + n,) if key == "input_ids"
                                               else ())
            if mask.dim() == 2 and mask.shape[1] > n and mask.shape[1] not in over:
                # a mask over the history must cover exactly what the stream has seen plus the new tokens.
                # It does not when model.generate continues from a returned SinkCache with the whole
                # sequence: generate slices off get_seq_length() = the slot count, not the tokens seen,
                # and would feed the tokens past the slots a second time
                raise ValueError(
                    f"streaming patch: the attention mask covers {mask.shape[1]} tokens, but the sink cache has "
                    f"seen {cache.seen_tokens} and {n} are new. To continue model.generate from a returned "
                    f"SinkCache, pass only the new tokens as input_ids with an attention mask over the whole "
                    f"stream ({cache.seen_tokens} + new), or use longctx.chat.StreamingSession / stream_generate")
            mask = mask[:, -n:] if mask.dim() == 2 else mask
            if mask.dim() != 2:
                raise NotImplementedError("streaming patch: only 2-D attention masks (left padding) are supported")
            # padding is only possible in the first forward (checked below); a one-token step's mask is
            # not read, so that decoding never waits for the GPU (generate passes all ones)
            checked = n > 1 or cache._slots() == 0
            if checked and not bool(mask.all()):  # left padding: zeros then ones in each row
                pads = (mask == 0).sum(-1)
                ar = torch.arange(mask.shape[1], device=mask.device)[None]
                if not torch.equal(mask.bool(), ar >= pads[:, None]):
                    raise NotImplementedError("streaming patch: only left padding is supported")
                if not cache.rope and self.model.config.model_type != "bloom":
                    raise NotImplementedError(f"streaming patch: padded batches on {self.model.config.model_type!r} "
                                              f"(its ALiBi ignores the mask); stream rows alone")
        if n > cache.window_size:  # a long prompt: prefill its head in window-sized chunks, bounded
            if pads is not None:
                raise NotImplementedError("streaming patch: a padded prompt longer than window_size; "
                                          "pad it to at most window_size tokens or stream rows alone")
            head, step = n - cache.window_size, cache.window_size
            rest = {k: v for k, v in kwargs.items() if k not in (key, "position_ids", "cache_position")}
            for start in range(0, head, step):
                module(**{key: x[:, start:min(start + step, head)]}, **rest)  # re-enters this hook
            if not self._warned:
                warnings.warn(f"streaming: a {n}-token input was prefilled in chunks of window_size="
                              f"{step}; the forward's outputs cover its last {step} tokens", stacklevel=2)
                self._warned = True
            x = kwargs[key] = x[:, head:]
            n = step
        cache.to_device(x.device)
        cache.make_room(n, batch=x.shape[0], pads=pads, device=x.device)
        key_mask = cache.key_mask(n)
        if key_mask is not None:
            kwargs["attention_mask"] = key_mask.to(x.device)
        if cache.rope:  # ALiBi models (bloom, mpt) bias keys by their index in the cache: nothing to set
            places = cache.places[:, -n:].to(x.device)
            kwargs["position_ids"] = places
            if "cache_position" in kwargs:  # transformers < 5.2x passes it too
                kwargs["cache_position"] = places[0]
        else:
            kwargs.pop("position_ids", None)
        return args, kwargs
