"""Fast one-token decoding on a full sink cache: static ring buffers, optionally a CUDA graph.

``SinkCache`` (streaming.py) keeps its slots in order and concatenates on every step, which is
simple and handles chunks, padding and ALiBi, but its tensors change shape every step, so a step
cannot be captured as a CUDA graph, and a small model's decode step is then all kernel launches.
``SinkDecoder`` takes over a *full* sink cache for one-token steps:

    with SinkDecoder(model, cache) as decoder:     # cache: a SinkCache holding sink + window tokens
        logits = decoder.step(next_ids)            # (B, 1) -> (B, 1, vocab); overwritten next step
    # on exit the cache holds every decoded token, in its usual form: chunks can follow
    # (while the decoder holds it, the cache's own tensors are freed and it refuses forwards)

Layout: one buffer per kind for all layers, (L, B, H, C, D) with C = sink_size + window_size.
Slots [0, sink) hold the sinks; slots [sink, C) are a ring: each step writes the new token over
the oldest window token (``slot``), so nothing moves. One query attends to every slot, and RoPE
carries the order, so the ring order needs no mask.

Positions follow SinkCache exactly (positions by place, with a common offset b per row): a step
raises b by one, the new token sits at C - 1 + b, window keys keep the rotation they were made
with, and the sinks are re-rotated from their original keys (fp32, the model's own rotary module)
to j + b. When C - 1 + b would reach ``max_position``, b returns to 0 and every key is re-rotated
from its original once (eagerly, outside the graph), so positions stay in the trained range.

On CUDA (``cuda_graph=None`` means "if the device is CUDA"), after two eager warm-up steps the
whole step (b, positions, sink rotation, the model's forward, the ring pointer) is captured once
and replayed. ``compile=True`` runs the model's forward through ``torch.compile`` (fused kernels,
one graph for the fixed shapes; compiled in the warm-up) inside that capture; a dict gives
torch.compile's keyword arguments (``{"mode": "max-autotune-no-cudagraphs"}``: autotuned matmuls). RoPE models only, without sliding-window layers (gemma2/3, cohere2, gpt_oss: decode those
with the SinkCache itself) or NoPE layers (smollm3, cohere2, hybrid exaone4); no pad slots may remain; dynamic RoPE types (whose rotary module reads
positions on the host) run eagerly.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..arch import rotary_module
from ..utils import check_compile_kwargs, recompile_room
from .streaming import SinkCache, rope_cos_sin, rotate_keys, static_rope


class _RingLayer(CacheLayerMixin):
    """One layer's views of the shared buffers; ``update`` writes the new token at ``slot``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys, orig_keys, values, slot, stored: int):
        super().__init__()
        self.keys, self.orig_keys, self.values, self.slot = keys, orig_keys, values, slot  # (B, H, C, D); (1,)
        self.stored = stored  # slots holding a token before the new one is written (C - 1)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # buffers exist from the start
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # (B, H, 1, D) each
        self.keys.index_copy_(2, self.slot, key_states)
        self.orig_keys.index_copy_(2, self.slot, key_states)  # rotated at its place: original == current
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.stored

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1


def check_supported(cache) -> None:
    """Raise unless a SinkDecoder can take over ``cache`` once it is full (a RoPE model without
    sliding-window or NoPE layers): a clear error before any decoding, not in the middle of it."""
    if not isinstance(cache, SinkCache):
        raise TypeError(f"SinkDecoder needs a longctx.SinkCache, got {type(cache).__name__}")
    if not cache.rope:
        raise NotImplementedError("SinkDecoder: ALiBi models bias keys by slot index, which a ring buffer "
                                  "reorders; decode them with the SinkCache itself")
    family = repr(cache._model.config.model_type) if cache._model is not None else "this cache's model"
    if cache.sliding_layers:
        raise NotImplementedError(f"SinkDecoder: models with sliding-window layers "
                                  f"({family}) are not supported; decode them with "
                                  f"the SinkCache itself (the streaming patch's forwards)")
    if not all(layer.rope for layer in cache.layers):
        raise NotImplementedError(f"SinkDecoder: models with NoPE layers ({family}) "
                                  f"are not supported; decode them with the SinkCache itself")


def check_compile(compile) -> dict:
    """The torch.compile keyword arguments of SinkDecoder's ``compile`` option; clear errors for bad values."""
    if not (isinstance(compile, (bool, dict))):
        raise TypeError(f"SinkDecoder: option 'compile' must be True, False or a dict of torch.compile keyword "
                        f"arguments, got {compile!r}")
    compile_kw = compile if isinstance(compile, dict) else {}
    check_compile_kwargs(compile_kw, "SinkDecoder option 'compile' (the decoder captures its own CUDA graphs)")
    return compile_kw


def is_full(cache) -> bool:
    """Whether a SinkDecoder can take ``cache`` over now: every slot holds a token, none is padding."""
    return cache._slots() == cache.capacity and not cache._reorder and not cache._max_pads


_SIDE_STREAMS: dict = {}


def _side_stream(device) -> "torch.cuda.Stream":
    """One warm-up stream per device, shared by all decoders: every new stream that runs a matmul gets
    its own cuBLAS workspace (tens of MiB, kept for the life of the process)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class SinkDecoder:
    """One-token steps on a full ``SinkCache`` (see the module docstring)."""

    def __init__(self, model, cache: SinkCache, cuda_graph: bool | None = None, warmup: int = 2,
                 compile: bool | dict = False):
        compile_kw = check_compile(compile)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"SinkDecoder: option 'warmup' must be an integer >= 0, got {warmup!r}")
        if isinstance(cache, SinkCache):  # a loaded cache, or one bound to another model: checked, bound here
            if cache.held:  # before the bind, which refuses to move a held cache with another message
                raise ValueError("SinkDecoder: this cache is held by another SinkDecoder; close that one first")
            cache._bind_for(model)  # before check_supported: its messages name the bound model's family
        check_supported(cache)
        if not is_full(cache):
            raise ValueError(f"SinkDecoder needs a full cache without pad slots ({cache._slots()} of "
                             f"{cache.capacity} slots held, pads {cache._max_pads}); prefill it first")
        self.model, self.cache = model, cache
        self.sink, self.capacity = cache.sink_size, cache.capacity
        self.window = cache.window_size
        for layer in cache.layers:
            layer.flush()
        first = cache.layers[0].keys
        device, self.dtype = first.device, first.dtype
        _, _, self.rotary = rotary_module(cache.model, "streaming")
        # looked up once: the cache's property imports the modeling module, which would break the compiled graph
        self.apply_rotary, self.rotary_width = cache._apply_rotary, cache._rotary_width
        # RoPE types whose rotary module reads the positions on the host (dynamic, longrope) cannot be captured
        static = static_rope(self.rotary)
        self.use_graph = (device.type == "cuda" if cuda_graph is None else cuda_graph) and static
        if self.use_graph and device.type != "cuda":
            raise ValueError("SinkDecoder: cuda_graph=True needs a CUDA device")
        # (L, B, H, C, D): all layers in one buffer, so one copy re-rotates every layer's sinks
        self.keys = torch.stack([layer.keys for layer in cache.layers])
        self.orig_keys = torch.stack([layer.orig_keys for layer in cache.layers])
        self.values = torch.stack([layer.values for layer in cache.layers])
        for layer in cache.layers:  # the decoder holds the only copy until close()
            layer.keys = layer.orig_keys = layer.values = None
        cache.held = True
        self.places = cache.places.to(device).clone()  # (B, C): position each slot's original key has
        self.b = cache.offset.to(device).clone()  # (B,)
        self.oldest = self.sink  # ring pointer on the host; ``slot`` is its device copy
        self.slot = torch.tensor([self.sink], device=device)
        self.ids = torch.zeros(first.shape[0], 1, dtype=torch.long, device=device)  # (B, 1) static input
        self.pos = torch.zeros_like(self.ids)  # (B, 1) static positions
        self.sink_index = torch.arange(self.sink, device=device)
        self.next_position = self.capacity + int(self.b.max())  # host: largest position the next step gives
        self.steps = 0
        self.ring = Cache(layers=[_RingLayer(self.keys[i], self.orig_keys[i], self.values[i], self.slot,
                                             self.capacity - 1) for i in range(len(cache.layers))])
        self.warmup, self.graph, self.logits = warmup, None, None
        self.closed = False
        # compile: the model's forward through torch.compile (fused kernels; static shapes, one graph),
        # compiled during the warm-up steps and then captured like the eager one
        # (a dict: keyword arguments for torch.compile, e.g. {"mode": "max-autotune-no-cudagraphs"})
        self.forward = model if compile is False else torch.compile(model, **{"dynamic": False, **compile_kw})
        self.room = contextlib.nullcontext if compile is False else recompile_room
        self.positions = self._positions if compile is False else torch.compile(self._positions, dynamic=False)

    # -- the step ----------------------------------------------------------------------------------
    def _rotate(self, orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """R(delta) orig in fp32; orig (..., B, H, n, D), delta (B, n)."""
        cos, sin = rope_cos_sin(self.rotary, delta, "full_attention")
        return rotate_keys(self.apply_rotary, orig.float(), cos, sin, self.rotary_width).to(orig.dtype)

    def _positions(self) -> None:
        """The step's bookkeeping before the forward: b, the new token's position, its slot's place, and
        the sinks re-rotated to j + b. With ``compile``, compiled too: fused kernels instead of about 20
        small eager ones, which made the 7B-shape step (C=4096, H100) 7.40 ms instead of 7.68
        (benchmarks/README.md, decode_profile.py). That measurement had the rotation split into three
        graphs (a module lookup broke it); it is one graph now, not yet measured on a GPU."""
        self.b += 1
        torch.add(self.b[:, None], self.capacity - 1, out=self.pos)
        self.places.index_copy_(1, self.slot, self.pos)
        if self.sink:  # sinks to j + b, from their originals, every layer at once
            delta = self.b[:, None] + self.sink_index - self.places[:, :self.sink]  # (B, sink)
            self.keys[..., :self.sink, :].copy_(self._rotate(self.orig_keys[..., :self.sink, :], delta))

    def _advance(self) -> torch.Tensor:
        """Everything one step does on the device (captured as the graph). Every write is a kernel into a
        static buffer: a same-dtype ``copy_`` between contiguous tensors would be a memcpy node."""
        with self.room():  # compiled: one variant per decoder shape, past dynamo's default limit of 8
            self.positions()
            out = self.forward(self.ids, position_ids=self.pos, past_key_values=self.ring, use_cache=True)
        self.slot.sub_(self.sink - 1).remainder_(self.window).add_(self.sink)  # (slot - sink + 1) % window + sink
        return out.logits

    def _rerotate_all(self) -> None:
        """Before a step: b -> 0 and every key from its original to its place, as SinkCache does it
        (host-decided, eager). The step that follows raises b by one, so b is set to -1 here, and a
        window slot's place is counted as if the oldest token (overwritten by the step) were gone."""
        age = (torch.arange(self.sink, self.capacity, device=self.b.device) - self.oldest) % self.window
        targets = torch.cat([self.sink_index, self.sink + age - 1])  # (C,); sinks: redone by the step
        self.b.fill_(-1)
        delta = targets[None] - self.places  # (B, C)
        for i in range(self.keys.shape[0]):  # layer by layer: fp32 copies of one layer at a time
            self.keys[i].copy_(self._rotate(self.orig_keys[i], delta))
        self.next_position = self.capacity - 1

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed (B, 1) token ids; returns their logits (B, 1, vocab), a buffer the next step overwrites."""
        if self.closed:
            raise RuntimeError("SinkDecoder.step after close(): the cache was handed back; feed it directly "
                               "or open a new SinkDecoder on it")
        if self.next_position > self.cache.max_position - 1:
            self._rerotate_all()
        self.ids.copy_(ids)
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.steps >= self.warmup:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._advance()
            self.graph.replay()  # capture records only: run it
        elif self.use_graph:  # warm-up on a side stream, as CUDA graph capture wants
            stream = _side_stream(self.ids.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.logits = self._advance()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            self.logits = self._advance()
        self._stepped()
        return self.logits

    def _stepped(self) -> None:
        """The host's side of a step that ran: the ring pointer and the position count move on."""
        self.oldest = (self.oldest - self.sink + 1) % self.window + self.sink
        self.next_position += 1
        self.steps += 1

    # -- handing the cache back --------------------------------------------------------------------
    def close(self) -> SinkCache:
        """Write the state back into the SinkCache (slots in place order) and return it. Closing again
        (e.g. ``close()`` inside a ``with`` block) does nothing more."""
        cache = self.cache
        if self.closed:
            return cache
        ring = (torch.arange(self.window, device=self.b.device) + self.oldest - self.sink) % self.window
        order = torch.cat([self.sink_index, self.sink + ring])  # slot of place 0, 1, ..., C - 1
        for i, layer in enumerate(cache.layers):
            layer.keys = self.keys[i].index_select(2, order)
            layer.orig_keys = self.orig_keys[i].index_select(2, order)
            layer.values = self.values[i].index_select(2, order)
            layer.pending = None
        cache.held = False
        cache.places = self.places.index_select(1, order).to(cache.places.device)
        cache.offset = self.b.clone().to(cache.offset.device)
        cache._top = self.next_position
        cache._sink_stack = None
        cache.seen_tokens += self.steps
        cache.evicted_tokens += self.steps
        self.graph = None
        self.closed = True  # only once the state is back: a failed write-back can be retried
        return cache

    def __enter__(self) -> "SinkDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
