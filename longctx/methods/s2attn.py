"""LongLoRA shifted sparse attention (S2-Attn), a training-time attention pattern.

Chen et al. 2023, *LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models*,
arXiv:2309.12307. While fine-tuning on long sequences, tokens are split into groups of G and
attention is causal *within* each group; the last ``shifted_heads`` fraction of the heads uses
groups shifted by G/2, so information flows from one group to the next. Inference uses full
attention (``train_only=True``, the default: S2 is active only while ``model.training``).

    patch = longctx.apply(model, "s2attn", group_size_ratio=0.25)   # or group_size=2048
    model.train(); loss = model(ids, labels=ids).loss                 # S2 attention
    model.eval()                                                      # full attention, bit-identical
    patch.remove()                                                    # back to the original attention

The rule (strictly causal, no wrap-around). Let T be the query length of one forward and G the
group size. If T <= G there is one group: plain causal attention in every head (correct, not a
fallback). Otherwise, token i is in group ``i // G`` in an unshifted head and in group
``(i + G//2) // G`` in a shifted head (so a shifted head's first group has G/2 tokens and the
last group of either kind may be partial). Key j is visible to query i iff

    j <= i  and  group(j) == group(i)  and  key j is not padding  and  doc(j) == doc(i)
            and  (i - j < sliding_window, for sliding-window layers)  and  the model's 4-D mask allows it.

The reference code (``roll`` on the shifted heads) wraps its last shifted group around to the
start of the sequence, so tokens there see the future; this implementation does not.

- Group size: ``group_size=G`` (even, >= 2) is used as is; ``group_size_ratio=r`` gives
  ``G = r*T`` rounded UP to an even integer (>= 2), so r=1 is full causal attention for any T and
  r=1/4 at T=32768 is G=8192. Lengths not divisible by G are exact: the partial last group, and a
  shifted head's first half group, are attended on their own (no padding, nothing dropped). Groups
  are counted by the row index in the (padded) batch, also for left-padded rows.
- Heads: the last ``round(shifted_heads * num_heads)`` query heads are shifted (LongLoRA: half). A
  fraction strictly between 0 and 1 that would shift no head or every head is an error (at apply).
  Grouped-query attention (fewer K/V heads) is supported. On the sdpa path, a split that falls inside
  a K/V group (SmolLM2: 9 heads over 3 K/V heads, 4 shifted) repeats K/V per query head; a
  ``shifted_heads`` that ends on a group boundary (1/3 or 2/3 there) keeps SDPA's GQA kernels, at
  the cost of not shifting exactly half. The module's ``scaling``, ``dropout``,
  ``sliding_window`` and ``softcap`` are honoured (``softcap`` on the sdpa path by explicit math).
- Padding: the 2-D ``attention_mask`` (left or right padding, or any holes) is respected: padded
  keys are never attended by real tokens. A padded query with no visible key gets a finite,
  meaningless output (sdpa: attends itself; flex: zero; flash: zero) - never NaN.
- Packing: when ``position_ids`` (passed by transformers to attention functions in v5) do not
  increase by exactly 1 between two neighbours (e.g. they restart at 0), a new document starts
  there, and no token attends across a document boundary (transformers' own rule,
  ``find_packed_sequence_indices``). This works also where transformers' own mask would not
  detect packing (it only does so without a cache; training with ``use_cache=True`` builds one).
- Decoding with a KV cache (query length != key length), non-causal modules (encoders), and S2
  while inactive (eval mode with ``train_only=True``) all delegate to the model's original
  attention function and mask unchanged: bit-identical to the unpatched model. So generation
  with ``train_only=False`` uses S2 for the prompt and full attention for new tokens (with a dynamic cache: a
  pre-allocated static or hybrid cache gives the prompt more keys than queries, so it runs full attention too,
  with a warning, once).

Mechanism: the patch registers an attention function (``transformers.AttentionInterface``) and a
mask function (``masking_utils.AttentionMaskInterface``) under a name unique to the patch and
switches the model with ``model.set_attn_implementation(name)``; ``remove()`` switches back. On a multimodal
model only the language model's config (``get_text_config(decoder=True)``) and the top-level one are switched (the
dict form): vision and audio towers keep their own implementations, and ``remove()`` restores every sub-config's
own (they may differ: text eager, vision sdpa). The
name travels with the config, so a ``deepcopy`` of the model, or a model sharing its config object,
calls these functions too: they act as the original implementation for anything but this instance
(masks are S2's only inside its base model's forward, counted by two forward hooks; attention only in
its own modules, whose own ``training`` flag decides). Values derived from the inputs (document ids,
the flex BlockMask) are cached within one forward and keyed by the tensors' identity and version, so
a ``position_ids`` buffer refilled in place is read afresh. No
transformers class or forward is touched. What the attention function receives as
``attention_mask``: while S2 is inactive, exactly what the original implementation's mask
function builds (sdpa: None or a 4-D bool mask; eager: a 4-D float mask; ...). While active, for a
plain causal mask: a BlockMask on the fast path (below), else None when nothing is padded,
else the 2-D bool padding mask (as transformers does for flash attention); for any other mask pattern (sliding window beyond T, packing detected
by transformers, multimodal overlays): transformers' dense 4-D bool ``sdpa_mask``, which is
intersected with the S2 pattern. A 4-D mask passed by the user (bool, or float additive) reaches
the function as is and is intersected likewise. A module that does not run S2 while the mask
function is active (an eval-mode layer inside a training model, a model sharing the config run
inside the forward) gets its original implementation's own mask, rebuilt: causal, padding, packed
documents; dense window masks in eager's additive form. transformers' flex_attention cannot take
those dense masks (NotImplementedError, never a wrong result). Transformers has no API to unregister
a name: the two small entries stay registered after ``remove()`` and hold no reference to the model (nor,
once a patched model is dropped without ``remove()``, anything cached for it).

Copies: a ``copy.deepcopy`` or ``torch.save``/``torch.load`` of a patched model (also in another process) runs
its original attention, with a warning at the copy; ``longctx.apply(copy, "s2attn", ...)`` patches the copy
itself (after removing a copied patch, where ``(model, patch)`` were copied together).

Backends (``backend=``):
- ``"sdpa"`` (default on CPU, and wherever flex is unavailable): the whole groups are reshaped
  into the batch (a view for batch 1) and each head half runs one ``scaled_dot_product_attention``
  call over them, plus one per partial group (``is_causal=True`` without padding/documents/
  windows, an explicit (groups, G, G) mask otherwise). FLOPs and memory are those of T/G
  independent causal attentions of length G; the pieces' outputs are concatenated (copies, which
  inside a compiled layer inductor folds into its own kernels).
- ``"flex"`` (default on CUDA): ``torch.nn.attention.flex_attention`` with a ``BlockMask`` of the rule
  above (cached while the inputs' shapes, mask and position_ids objects stay the same, so once per
  forward). It is built directly from the rule's interval form, in O(B H (T/128)^2) (``_s2_block_mask``;
  identical to create_block_mask's, tests), with sliding windows, packed documents and padding whose
  valid keys form one run per row (left or right padding); otherwise (a dense 4-D mask, other padding,
  document ids given to ``s2_attention`` that go down along a row, a torch whose
  ``BlockMask.from_kv_blocks`` lacks ``seq_lengths``) by ``create_block_mask``: compiled on CUDA
  (``_compile=True``, a builder per shape), eager on CPU. flex_attention is
  compiled with ``torch.compile`` on CUDA. flex has no dropout: with attention dropout > 0 (declared in the
  config as ``attention_dropout``, or in the call) "auto" uses sdpa, and "flex" raises for a call with
  dropout. On CPU flex runs unfused and has no backward (tests only). ``flex_mode="max-autotune-no-cudagraphs"``
  compiles it with block configs tuned per shape, and ``flex_kernel_options`` fixes them (BLOCK_M,
  BLOCK_N, num_warps, ...). On SmolLM2's attention shape at 32k, autotuning took 7.5% off the
  call's time, but made the compiled-layers training step slower (benchmarks/README.md); both are
  off by default. Where the fast path is traced inside a compiled layer, the layer's own
  torch.compile mode applies instead of ``flex_mode`` (a warning says so, once). A run that does not
  use flex on CUDA warns once.
- ``"flash"``: flash-attn's ``flash_attn_varlen_func``, every (row, document, group) one
  variable-length sequence; padding is removed first. Needs ``flash_attn`` (else ImportError at
  apply) and fp16/bf16 CUDA tensors; it cannot apply an arbitrary dense 4-D mask, nor a sliding window
  with padding that leaves holes in a row (RuntimeError; use sdpa or flex).

The fast path (flex and sdpa on CUDA; nothing padded, no packed documents: the usual LongLoRA
batch): the mask function returns a BlockMask (kept per shape), transformers hands it to every layer,
and the attention function runs S2 directly: flex_attention with the BlockMask of the plain S2 pattern,
or the sdpa backend's calls. For sdpa the BlockMask is a tiny one that only signs "plain S2": a BlockMask
is the mask object every transformers model passes through to its attention function. Under "auto", a
call with attention dropout that the config does not declare (gpt2's ``attn_pdrop``) runs sdpa. Inside
compiled decoder layers this is traced into the layer's graph: no graph break, no per-call host work.
Everything else (padding, documents, dense masks, for flex also windows shorter than a group and
dropout) takes the general path, per call, outside any compiled graph; both paths give bit-identical
results (tests). On an H100 at 32k (benchmarks/README.md), the compiled SmolLM2 step with flex went
from 343 to 289 ms with whole layers compiled (407 to 316 ms with compiled parts); the Llama-2-7B-shape
step with sdpa from 3155 to 3016 ms. Which backend is faster depends on the shape: with whole layers
compiled, flex on SmolLM2 (9 heads of 64, 3 K/V heads: 1.95x full attention against sdpa's 1.71x),
sdpa/cuDNN on the 7B shape (32 heads of 128: 1.53x against flex's 1.47x).
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import os
import secrets
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import Options, Patch, check_choice, register

try:
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # torch < 2.5: no flex; isinstance(x, ()) is False
    BlockMask = ()

BACKENDS = ("auto", "sdpa", "flex", "flash")
_MARK = "_longctx_s2attn_member"  # attribute of the patched instance's modules while the patch is on
_UNKNOWN = object()  # position_ids outside a forward, or passed positionally
_FAST_PATH_DEVICES = ("cuda",)  # where the mask function returns S2's BlockMask, the fast path (tests add "cpu")
_NAMES = itertools.count()


def _nothing():  # a dead weak reference
    return None


# names unique across processes too: a model pickled with its patch's name (torch.save) and loaded in another
# process must not meet a later patch there under the same name
_RUN = secrets.token_hex(4)
_STATES: "weakref.WeakValueDictionary[str, _State]" = weakref.WeakValueDictionary()  # name -> its state


def _new_run():  # a forked process (multiprocessing's default on Linux) inherits _RUN and _NAMES: a run of its own
    global _RUN
    _RUN = secrets.token_hex(4)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_run)


# -- options ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class S2AttnOptions(Options):
    group_size_ratio: float | None = None  # G = ratio * T, rounded up to even; default 1/4 when neither is given
    group_size: int | None = None  # a fixed G (even, >= 2); exclusive with group_size_ratio
    shifted_heads: float = 0.5  # fraction of the query heads whose groups are shifted by G/2
    train_only: bool = True  # S2 only while model.training; False: also in eval (ablations)
    backend: str = "auto"  # "auto" | "sdpa" | "flex" | "flash"
    # flex only: torch.compile mode for flex_attention ("max-autotune-no-cudagraphs" tries Triton block
    # configs for the forward and backward once per shape), and fixed kernel_options (e.g. BLOCK_M)
    flex_mode: str | None = None
    flex_kernel_options: dict | None = None

    def validate(self) -> None:
        if self.group_size_ratio is not None and self.group_size is not None:
            raise ValueError("options 'group_size_ratio' and 'group_size' are exclusive: give exactly one of them")
        if self.group_size is None and self.group_size_ratio is None:
            self.group_size_ratio = 0.25
        if self.group_size is not None:
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 2 or g % 2:
                raise ValueError(f"option 'group_size' must be an even integer >= 2, got {g!r}")
            self.group_size = int(g)
        else:
            r = self.group_size_ratio
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r <= 1:
                raise ValueError(f"option 'group_size_ratio' must be a number in (0, 1], got {r!r}")
            self.group_size_ratio = float(r)
        s = self.shifted_heads
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s <= 1:
            raise ValueError(f"option 'shifted_heads' must be a fraction in [0, 1], got {s!r}")
        self.shifted_heads = float(s)
        if not isinstance(self.train_only, bool):
            raise ValueError(f"option 'train_only' must be True or False, got {self.train_only!r}")
        check_choice("backend", self.backend, BACKENDS)
        check_flex_settings(self.flex_mode, self.flex_kernel_options)
        if (self.flex_mode is not None or self.flex_kernel_options) and self.backend not in ("auto", "flex"):
            raise ValueError(f"options 'flex_mode' and 'flex_kernel_options' act on the flex backend only, "
                             f"but backend={self.backend!r}")


def group_size_for(length: int, group_size_ratio: float | None = None, group_size: int | None = None) -> int:
    """G for a sequence of ``length`` tokens: ``group_size``, or ratio*length rounded up to even (>= 2)."""
    if group_size is not None:
        return int(group_size)
    x = group_size_ratio * length
    if abs(x - round(x)) <= 1e-9 * max(1.0, x):  # an integer but for float error (0.14 * 100): not rounded up
        x = round(x)
    return max(2, 2 * math.ceil(x / 2))


def shifted_head_count(num_heads: int, shifted_heads: float) -> int:
    """How many query heads (the last ones) use shifted groups: ``round(shifted_heads * num_heads)``.
    A fraction strictly between 0 and 1 must leave at least one head of each kind (else no information
    would flow between groups, or no head would keep the unshifted groups): a clear error otherwise."""
    n = int(round(shifted_heads * num_heads))
    if 0 < shifted_heads < 1 and n in (0, num_heads):
        hint = (f"or a fraction that rounds to 1..{num_heads - 1} heads" if num_heads > 1
                else "(one head cannot be split)")
        raise ValueError(f"option 'shifted_heads'={shifted_heads} shifts {n} of {num_heads} query heads; a fraction "
                         f"in (0, 1) must leave at least one shifted and one unshifted head. Use 0 or 1 to "
                         f"shift none or all, {hint}")
    return n


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


# -- the extra constraints on top of the S2 pattern --------------------------------------------------
class _Constraints:
    """Per-forward inputs to the S2 rule besides the groups: key validity (B, T) bool, document ids
    (B, T), a sliding window, and a dense 4-D mask (bool: visible; float: additive, -inf/min = hidden)."""

    def __init__(self, valid=None, doc=None, window=None, dense=None):
        self.valid, self.doc, self.window, self.dense = valid, doc, window, dense

    @property
    def empty(self) -> bool:
        return self.valid is None and self.doc is None and self.window is None and self.dense is None

    def blocks(self, start: int, n: int, G: int, h0: int, h1: int, batch: int, dtype=None, device=None):
        """The mask of the n // G groups of G tokens starting at ``start``: (batch * groups, 1 or h1-h0, G, G),
        bool or float (additive), on ``device`` (the queries'). None when plain causal attention within each
        group is exact."""
        if self.empty:
            return None
        nG = n // G
        idx = start + torch.arange(n, device=device).view(nG, G)  # absolute positions
        vis = torch.ones(G, G, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, G, G)
        if self.valid is not None:
            vis = vis & self.valid[:, idx][:, :, None, :]
        if self.doc is not None:
            d = self.doc[:, idx]
            vis = vis & (d[..., :, None] == d[..., None, :])
        if self.window is not None:
            vis = vis & (torch.arange(G, device=device)[:, None] - torch.arange(G, device=device) < self.window)
        vis = vis.expand(-1, nG, -1, -1)[:, :, None]  # (B|1, nG, 1, G, G)
        bias = None
        if self.dense is not None:
            dense = self.dense
            if dense.shape[1] > 1:
                dense = dense[:, h0:h1]
            m = dense[:, :, idx[:, :, None], idx[:, None, :]].transpose(1, 2)  # (B|1, nG, 1|h, G, G)
            if m.dtype == torch.bool:
                vis = vis & m
            else:
                bias = m.to(dtype)
                vis = vis & (m > torch.finfo(m.dtype).min / 2)
        # a query row with no visible key (e.g. a left-padding query) attends itself: finite, never NaN
        eye = torch.eye(G, dtype=torch.bool, device=device)
        vis = vis | (eye & ~vis.any(-1, keepdim=True))
        vis = vis.expand(batch, *vis.shape[1:])
        if bias is not None:
            bias = bias.expand(batch, *bias.shape[1:]).masked_fill(~vis, float("-inf"))
            return bias.reshape(batch * nG, *bias.shape[2:])
        return vis.reshape(batch * nG, *vis.shape[2:])


def _kv_split(k, v, sizes: list[int], rep: int, allow_gqa: bool):
    """K/V for consecutive query-head blocks of ``sizes``: [(k, v, enable_gqa)] per block. With
    grouped-query attention the blocks split the K/V heads when they can (``split``: its backward
    is one ``cat``), else K/V heads are repeated per query head (``index_select``)."""
    if rep == 1:
        return [(kh, vh, False) for kh, vh in zip(k.split(sizes, 1), v.split(sizes, 1))]
    if allow_gqa and all(n % rep == 0 for n in sizes):
        kv = [n // rep for n in sizes]
        return [(kh, vh, True) for kh, vh in zip(k.split(kv, 1), v.split(kv, 1))]
    out, h0 = [], 0
    for n in sizes:
        idx = torch.arange(h0, h0 + n, device=k.device) // rep
        out.append((k.index_select(1, idx), v.index_select(1, idx), False))
        h0 += n
    return out


def _attend(q, k, v, mask, scale, dropout, softcap, gqa):
    """softmax(q k^T * scale [+ mask]) v for (N, h, L, D) inputs; causal when mask is None."""
    if softcap is None:
        kw = {"enable_gqa": True} if gqa else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                              scale=scale, **kw)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    L = q.shape[-2]
    if mask is None:
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32 if s.element_size() < 4 else s.dtype).to(q.dtype)
    p = F.dropout(p, p=dropout, training=dropout > 0)
    return torch.matmul(p, v)


def _groups_sdpa(q, k, v, start, G, h0, h1, cons, scale, dropout, softcap, gqa):
    """Attention within consecutive groups of G over tokens [start, start + n) of (B, h, n, D) inputs,
    n a multiple of G: one SDPA call with the groups as batch. Returns (B, n, h, D)."""
    B, h, n, D = q.shape
    nG = n // G

    def grouped(x):  # (B, h', n, d) -> (B*nG, h', G, d); a view when x is (B, n, h, d) in memory and B == 1
        x = x.transpose(1, 2)
        return x.reshape(B * nG, G, x.shape[2], x.shape[3]).transpose(1, 2)

    mask = cons.blocks(start, n, G, h0, h1, B, q.dtype, q.device)
    out = _attend(grouped(q), grouped(k), grouped(v), mask, scale, dropout, softcap, gqa)
    return out.transpose(1, 2).reshape(B, n, h, v.shape[-1])  # values may be narrower than q/k (DeepSeek-V3)


def _segments(T: int, G: int, shift: int) -> list[tuple[int, int, int]]:
    """(start, length, group length) runs covering [0, T): a shifted head's first half group, then as many
    whole groups as fit, then the partial last group. No padding, no wrap-around."""
    if T <= G:
        return [(0, T, T)]
    out = [(0, shift, shift)] if shift else []
    n_full = (T - shift) // G
    if n_full:
        out.append((shift, n_full * G, G))
    end = shift + n_full * G
    if end < T:
        out.append((end, T - end, T - end))
    return out


def _sdpa_backend(q, k, v, G, n_shift, cons, scale, dropout, softcap):
    """(B, H, T, D) inputs -> (B, T, H, D). The heads are cut into the unshifted and the shifted block,
    each block's tokens into runs of whole groups (``_segments``), all with ``split``: in the backward
    the pieces' gradients are joined by one ``cat`` per level instead of a zero-filled full-size
    gradient per slice (what indexing costs), which was most of the overhead around the kernels."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    blocks = [(h0, h1, shift) for h0, h1, shift in ((0, H - n_shift, 0), (H - n_shift, H, G // 2)) if h1 > h0]
    sizes = [h1 - h0 for h0, h1, _ in blocks]
    kvs = _kv_split(k, v, sizes, rep, allow_gqa=cons.empty and softcap is None)
    parts = []
    for (h0, h1, shift), qh, (kh, vh, gqa) in zip(blocks, q.split(sizes, 1), kvs):
        segs = _segments(T, G, shift)
        lens = [n for _, n, _ in segs]
        pieces = [_groups_sdpa(qs, ks, vs, start, glen, h0, h1, cons, scale, dropout, softcap, gqa)
                  for (start, _, glen), qs, ks, vs in zip(segs, qh.split(lens, 2), kh.split(lens, 2),
                                                           vh.split(lens, 2))]
        parts.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


# -- flex -----------------------------------------------------------------------------------------
_FLEX_COMPILED: dict = {}  # torch.compile mode -> compiled flex_attention
FLEX_KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2",
                       "BLOCK_N2", "fwd_BLOCK_M", "fwd_BLOCK_N", "fwd_num_warps", "fwd_num_stages",
                       "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2", "bwd_num_warps",
                       "bwd_num_stages", "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS")


def check_flex_settings(mode, kernel_options) -> None:
    """``flex_mode``: None or a torch.compile mode that captures no CUDA graphs; ``flex_kernel_options``:
    None or a dict of the tuning knobs in ``FLEX_KERNEL_OPTIONS`` (block sizes: powers of two >= 16)."""
    if mode is not None:
        from ..utils import check_compile_kwargs
        if not isinstance(mode, str):
            raise ValueError(f"option 'flex_mode' must be a torch.compile mode name or None, got {mode!r}")
        check_compile_kwargs({"mode": mode}, "option 'flex_mode'")
    if kernel_options is None:
        return
    if not isinstance(kernel_options, dict):
        raise ValueError(f"option 'flex_kernel_options' must be a dict or None, got {kernel_options!r}")
    for k, v in kernel_options.items():
        if k not in FLEX_KERNEL_OPTIONS:
            raise ValueError(f"option 'flex_kernel_options': unknown key {k!r}; allowed: {', '.join(FLEX_KERNEL_OPTIONS)}")
        if k.isupper() and k.startswith(("PRESCALE", "ROWS", "BLOCKS_ARE")):
            if not isinstance(v, bool):
                raise ValueError(f"option 'flex_kernel_options': {k} must be True or False, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 or (
                "BLOCK" in k and (v < 16 or v & (v - 1))):
            what = "a power of two >= 16" if "BLOCK" in k else "a positive integer"
            raise ValueError(f"option 'flex_kernel_options': {k} must be {what}, got {v!r}")


def _flex_fn(device, mode=None):
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention  # eager: materializes the scores (CPU tests), no fused CPU kernel compile
    if mode not in _FLEX_COMPILED:
        _FLEX_COMPILED[mode] = torch.compile(flex_attention, **({"mode": mode} if mode else {}))
    return _FLEX_COMPILED[mode]


def s2_mask_mod(T: int, G: int, num_heads: int, n_shift: int, cons: _Constraints | None = None) -> Callable:
    """The S2 rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx)."""
    cons = cons or _Constraints()
    h_shift = num_heads - n_shift
    half = G // 2
    one_group = T <= G
    valid, doc, window, dense = cons.valid, cons.doc, cons.window, cons.dense
    dense_bool = dense is not None and dense.dtype == torch.bool
    dense_b = dense is not None and dense.shape[0] > 1
    dense_h = dense is not None and dense.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        m = kv_idx <= q_idx
        if not one_group:
            off = (h >= h_shift).to(q_idx.dtype) * half
            m = m & ((q_idx + off) // G == (kv_idx + off) // G)
        if valid is not None:
            m = m & valid[b, kv_idx]
        if doc is not None:
            m = m & (doc[b, q_idx] == doc[b, kv_idx])
        if window is not None:
            m = m & (q_idx - kv_idx < window)
        if dense is not None:
            x = dense[b if dense_b else 0, h if dense_h else 0, q_idx, kv_idx]
            m = m & (x if dense_bool else x > torch.finfo(dense.dtype).min / 2)
        return m

    return mask_mod


_BLOCK = 128  # flex's default sparse block (create_block_mask's BLOCK_SIZE)


def _s2_block_mask(T: int, G: int, H: int, n_shift: int, device, mask_mod, window=None, valid=None, doc=None,
                   rows: int | None = None):
    """S2's BlockMask of shape (rows or 1, H, T, T), from the rule's interval form instead of a T x T mask.

    Token q of row b may see the keys [start(q), q] that are valid, where start(q) = max(first key of q's group,
    q - window + 1, first token of q's document) (groups shifted by G/2 for the last ``n_shift`` heads).
    start(q) never decreases with q. With the valid keys of a row one run [v0, v1), the kv block [k0, k1)
    shrinks to K = [max(k0, v0), min(k1, v1)), and for the q block [q0, q1): the pair is empty iff K is
    empty, or q = max(q0, K0) is past the q block, or start(q) >= K1; it is full iff both blocks are whole,
    K is the whole kv block, q0 >= k1 - 1 and start(q1 - 1) <= k0. That is O(rows * (T/128)^2) work per head
    kind (plus the BlockMask's own O(rows * H * (T/128)^2) indices), exact,
    with no compiled builder: create_block_mask(_compile=True) traces and compiles a kernel per shape (on an
    H100, about 200 s for SmolLM2's 16k shape), and without compiling it builds the dense T x T mask. The
    indices are ordered and laid out (contiguous) as create_block_mask's (tests compare the two).

    ``valid`` (rows, T) bool: key validity; ``doc`` (rows, T): document ids. None (the caller builds the mask
    with create_block_mask) where a row's valid keys are not one run, document ids decrease along a row (a
    document in several pieces), or this torch's ``BlockMask.from_kv_blocks`` takes no ``seq_lengths``."""
    if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        return None
    r = rows or 1
    n = -(-T // _BLOCK)
    q = torch.arange(T, device=device)
    b0 = torch.arange(n, device=device) * _BLOCK  # first index of each block, as q block and as kv block
    b1 = torch.clamp(b0 + _BLOCK, max=T)  # one past its last
    whole = b1 - b0 == _BLOCK
    k0, k1 = b0.expand(r, n), b1.expand(r, n)  # each row's kv blocks, cut to its valid keys
    if valid is not None:
        valid = valid.to(device=device, dtype=torch.bool).expand(r, T)
        count = valid.sum(-1)
        runs = valid[:, 0].long() + (valid[:, 1:] & ~valid[:, :-1]).sum(-1)
        if bool((runs > 1).any()):
            return None
        v0 = valid.int().argmax(-1)  # the first valid key (0 where none: then the run is empty)
        k0, k1 = torch.maximum(k0, v0[:, None]), torch.minimum(k1, (v0 + count)[:, None])
    doc_start = None
    if doc is not None:
        doc = doc.to(device).expand(r, T).contiguous()
        if bool((doc[:, 1:] < doc[:, :-1]).any()):
            return None
        doc_start = torch.searchsorted(doc, doc)  # the first token of each token's document
    kv_whole = whole & (k0 == b0) & (k1 == b1)  # (r, n)
    first = torch.maximum(b0[None, :, None], k0[:, None, :])  # (r, q block, kv block)
    q_first = b0[None, :, None] >= b1[None, None, :] - 1  # every q of the q block at or past the kv block
    kinds = []  # per head kind (unshifted, shifted): (partial, full) block pairs, each (r, n, n) bool
    for off in (0, G // 2)[:2 if (T > G and n_shift) else 1]:
        start = torch.clamp((q + off) // G * G - off, min=0) if T > G else torch.zeros_like(q)
        if window is not None:
            start = torch.maximum(start, q - window + 1)
        start = start.expand(r, T) if doc_start is None else torch.maximum(start, doc_start)
        at_first = start.gather(1, first.clamp(max=T - 1).flatten(1)).view(r, n, n)
        nonempty = (k0 < k1)[:, None, :] & (first < b1[None, :, None]) & (at_first < k1[:, None, :])
        full = (whole[None, :, None] & kv_whole[:, None, :] & q_first
                & (start[:, b1 - 1][:, :, None] <= b0[None, None, :]))
        kinds.append((nonempty & ~full, full))
    if T > G and 0 < n_shift < H:
        head_kind = (torch.arange(H, device=device) >= H - n_shift).long()
    else:
        head_kind = torch.full((H,), 1 if (T > G and n_shift == H) else 0, device=device)
    def ordered(i):  # as flex's _dense_to_ordered (counts; the set blocks first, ascending), once per head kind
        blocks = torch.stack([k[i] for k in kinds]).to(torch.int32)  # (kinds, r, n, n)
        counts = blocks.sum(-1).to(torch.int32)
        indices = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
        # then per head, (r, H, n[, n]) in fresh contiguous memory: flex's Triton kernels assume contiguous
        # indices (they step over (batch, head) rows by the head stride)
        return tuple(x.transpose(0, 1).index_select(1, head_kind) for x in (counts, indices))

    return BlockMask.from_kv_blocks(*ordered(0), *ordered(1), BLOCK_SIZE=_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _create_block_mask(mask_mod, B, H, T, device):
    from torch.nn.attention.flex_attention import create_block_mask
    if device.type == "cuda":
        with warnings.catch_warnings():  # torch >= 2.13 deprecates _compile in favour of torch.compile(...)
            warnings.simplefilter("ignore", DeprecationWarning)
            return create_block_mask(mask_mod, B, H, T, T, device=device, _compile=True)
    # inductor's CPU code for the compiled mask builder does not build on every machine; eager is exact
    return create_block_mask(mask_mod, B, H, T, T, device=device)


def _sdpa_sign(H: int, T: int, device, mask_mod):
    """The sdpa fast path's mask: a BlockMask of (1, H, T, T) made of one T x T block per head, a few bytes.
    It is only the sign "plain S2" (never given to flex_attention); S2's real BlockMask would cost a compiled
    build and (H * (T/128)^2) indices per shape. None where this torch cannot build it (no ``seq_lengths``)."""
    if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        return None
    one = torch.ones(1, H, 1, dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(one, torch.zeros_like(one)[..., None], BLOCK_SIZE=T, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _s2_marks(mask) -> tuple:
    """(marker, backend) of S2's BlockMask, read from the mask or, on a copy made by ``BlockMask.to()``, from its
    mask_mod; (None, None) for any other BlockMask."""
    marker = getattr(mask, "_longctx_s2", None)
    if marker is not None:
        return marker, mask._longctx_backend
    return getattr(mask.mask_mod, "_longctx_s2", None), getattr(mask.mask_mod, "_longctx_backend", None)


def _marked(mask_mod, marker, backend: str):
    """S2's marks on a BlockMask's mask_mod: ``BlockMask.to()`` (accelerate's device hooks call it on every
    layer's inputs) makes a new BlockMask but keeps the mask_mod, so the marks survive the move."""
    mask_mod._longctx_s2, mask_mod._longctx_backend = marker, backend
    return mask_mod


def _flex_backend(q, k, v, G, n_shift, cons, scale, softcap, cache, mode=None, kernel_options=None):
    B, H, T, D = q.shape
    per_batch = cons.valid is not None or cons.doc is not None or (cons.dense is not None and cons.dense.shape[0] > 1)
    key = ("block_mask", B if per_batch else None, H, T, G, n_shift, cons.window, q.device,
           _ident(cons.valid), _ident(cons.doc), _ident(cons.dense))
    block_mask = cache.get(key)
    if block_mask is None:
        mask_mod = s2_mask_mod(T, G, H, n_shift, cons)
        block_mask = None if cons.dense is not None else _s2_block_mask(
            T, G, H, n_shift, q.device, mask_mod, cons.window, cons.valid, cons.doc, B if per_batch else None)
        if block_mask is None:
            block_mask = _create_block_mask(mask_mod, B if per_batch else None, H, T, q.device)
        # hold the tensors the key names by id, so the ids stay unique while cached
        cache.put(key, block_mask, (cons.valid, cons.doc, cons.dense))
    score_mod = None
    dense = cons.dense
    if dense is not None and dense.dtype != torch.bool:
        db, dh = dense.shape[0] > 1, dense.shape[1] > 1

        def score_mod(score, b, h, q_idx, kv_idx):
            bias = dense[b if db else 0, h if dh else 0, q_idx, kv_idx]
            return score + torch.where(bias > torch.finfo(dense.dtype).min / 2, bias, 0).to(score.dtype)
    if softcap is not None:
        inner = score_mod

        def score_mod(score, b, h, q_idx, kv_idx):
            score = softcap * torch.tanh(score / softcap)
            return inner(score, b, h, q_idx, kv_idx) if inner is not None else score
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # flex refuses CPU inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    with warnings.catch_warnings():  # off CUDA, flex runs unfused (tests): do not warn about it
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        kw = {"kernel_options": dict(kernel_options)} if kernel_options and q.device.type == "cuda" else {}
        out = _flex_fn(q.device, mode)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                       enable_gqa=k.shape[1] != H, **kw)
    return out.transpose(1, 2)


# -- flash-attn varlen ---------------------------------------------------------------------------------
def _flash_backend(q, k, v, G, n_shift, cons, scale, dropout, softcap):
    from flash_attn import flash_attn_varlen_func
    if cons.dense is not None:
        raise RuntimeError("s2attn backend 'flash' cannot apply a dense 4-D attention mask (custom masks, packing "
                           "detected by transformers, sliding windows shorter than the sequence); use "
                           "backend='sdpa' or 'flex'")
    if cons.window is not None and cons.valid is not None:
        runs = cons.valid[:, 0].long() + (cons.valid[:, 1:] & ~cons.valid[:, :-1]).sum(-1)
        if bool((runs > 1).any()):  # padding is removed first: a hole would shrink the distances the window measures
            raise RuntimeError("s2attn backend 'flash' cannot combine a sliding window with padding that leaves holes "
                               "in a row (its valid keys not one run); use backend='sdpa' or 'flex'")
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    if Dv < D:  # flash-attn takes one head size: narrower values (DeepSeek-V3) are zero-padded, the output cropped
        v = F.pad(v, [0, D - Dv])
    Hk = k.shape[1]
    rep = H // Hk
    device = q.device
    qt, kt, vt = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))
    pos = torch.arange(T, device=device).repeat(B)
    row = torch.arange(B, device=device).repeat_interleave(T)
    if cons.valid is not None:
        keep = cons.valid.reshape(-1).nonzero().squeeze(1)
        qt, kt, vt, pos, row = qt[keep], kt[keep], vt[keep], pos[keep], row[keep]
    else:
        keep = None
    doc = cons.doc.reshape(-1)[keep] if cons.doc is not None and keep is not None else (
        cons.doc.reshape(-1) if cons.doc is not None else None)
    N = qt.shape[0]
    extra = {"softcap": float(softcap)} if softcap is not None else {}
    window = (cons.window - 1, 0) if cons.window is not None else (-1, -1)
    outs = []
    for h0, h1, shift in ((0, H - n_shift, 0), (H - n_shift, H, G // 2)):
        if h1 <= h0:
            continue
        grp = (pos + shift) // G if T > G else torch.zeros_like(pos)
        new = torch.ones(N, dtype=torch.bool, device=device)
        new[1:] = (row[1:] != row[:-1]) | (grp[1:] != grp[:-1])
        if doc is not None:
            new[1:] |= doc[1:] != doc[:-1]
        starts = new.nonzero().squeeze(1)
        cu = torch.cat([starts, starts.new_tensor([N])]).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        if rep == 1:
            ks, vs = kt[:, h0:h1], vt[:, h0:h1]
        elif h0 % rep == 0 and h1 % rep == 0:
            ks, vs = kt[:, h0 // rep:h1 // rep], vt[:, h0 // rep:h1 // rep]
        else:
            idx = torch.arange(h0, h1, device=device) // rep
            ks, vs = kt.index_select(1, idx), vt.index_select(1, idx)
        o = flash_attn_varlen_func(qt[:, h0:h1].contiguous(), ks.contiguous(), vs.contiguous(), cu, cu, max_len,
                                   max_len, dropout_p=dropout, softmax_scale=scale, causal=True,
                                   window_size=window, **extra)
        outs.append(o)
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if keep is not None:
        out = out.new_zeros(B * T, H, D).index_copy(0, keep, out)
    return out.view(B, T, H, D)[..., :Dv]


# -- the attention function --------------------------------------------------------------------------
def s2_attention(query, key, value, *, group_size: int, n_shift: int, scale: float | None = None,
                 dropout: float = 0.0, valid=None, doc=None, window: int | None = None, dense=None,
                 softcap: float | None = None, backend: str = "sdpa", cache=None, flex_mode: str | None = None,
                 flex_kernel_options: dict | None = None):
    """S2 attention of (B, Hq, T, D) queries on (B, Hkv, T, D) keys/values; returns (B, T, Hq, D).

    ``valid``: (B, T) bool, False = padded key; ``doc``: (B, T) document ids; ``window``: sliding
    window; ``dense``: a (B|1, 1|Hq, T, T) mask, bool (True = visible) or float (additive).
    ``backend``: "sdpa", "flex" or "flash" (no "auto" here). ``flex_mode`` / ``flex_kernel_options``: how
    flex_attention is compiled and tuned (see ``S2AttnOptions``; CUDA only, ignored by the CPU reference path).
    """
    B, H, T, D = query.shape
    if key.shape[-2] != T:
        raise ValueError("s2_attention needs as many keys as queries (no KV cache)")
    if H % key.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {key.shape[1]} key/value heads")
    G = int(group_size)
    scale = D ** -0.5 if scale is None else scale
    if window is not None and window >= min(T, G):
        window = None  # every visible key is already within the window
    cons = _Constraints(valid, doc, window, dense)
    if backend == "sdpa":
        return _sdpa_backend(query, key, value, G, n_shift, cons, scale, dropout, softcap)
    if backend == "flex":
        if dropout:
            raise RuntimeError("s2attn backend 'flex' has no attention dropout; use backend='sdpa' (or 'auto')")
        check_flex_settings(flex_mode, flex_kernel_options)
        return _flex_backend(query, key, value, G, n_shift, cons, scale, softcap, cache or _Cache(), flex_mode,
                             flex_kernel_options)
    if backend == "flash":
        return _flash_backend(query, key, value, G, n_shift, cons, scale, dropout, softcap)
    raise ValueError(f"unknown backend {backend!r}")


def _ident(t):
    """A cache key for a tensor object: its id and, where tracked, its version, which in-place writes bump
    (a position_ids buffer refilled with ``copy_`` is not the same input). The patch also clears the caches
    at every forward of the model, which covers inference tensors (they track no version)."""
    if not torch.is_tensor(t):
        return id(t)
    try:
        return id(t), t._version
    except RuntimeError:
        return id(t), None


class _Cache:
    """One-entry caches (per patch) of values derived from per-forward inputs, keyed by their ids."""

    def __init__(self):
        self._store: dict[str, tuple] = {}

    def get(self, key):
        hit = self._store.get(key[0])
        return hit[1] if hit is not None and hit[0] == key else None

    def put(self, key, value, refs=()):
        self._store[key[0]] = (key, value, refs)

    def clear(self):
        self._store.clear()


def _doc_ids(position_ids, B: int, T: int, cache: _Cache):
    """(B, T) document ids from packed position_ids (a new document wherever they do not go up by 1)."""
    if not torch.is_tensor(position_ids) or position_ids.ndim != 2 or position_ids.shape[-1] != T:
        return None
    key = ("doc", _ident(position_ids), B, T)
    hit = cache.get(key)
    if hit is not None:
        return hit[0]
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    doc = None
    if bool(starts.any()):
        doc = torch.cat([torch.zeros_like(position_ids[:, :1]), starts.long().cumsum(-1)], dim=-1)
        doc = doc.expand(B, T)
    cache.put(key, (doc,), (position_ids,))
    return doc


def _valid_keys(mask2d, T: int, cache: _Cache):
    key = ("valid", _ident(mask2d), T)
    hit = cache.get(key)
    if hit is not None:
        return hit[0]
    valid = mask2d[:, -T:].bool()
    valid = None if bool(valid.all()) else valid
    cache.put(key, (valid,), (mask2d,))
    return valid


# -- the patch -----------------------------------------------------------------------------------------
@register("s2attn", S2AttnOptions,
          "LongLoRA shifted sparse attention for long-context fine-tuning, strictly causal (Chen et al., 2023)")
class S2AttnPatch(Patch):
    slot = "attention"

    def _attach(self) -> None:
        o = self.options
        if o.backend == "flash" and not flash_available():
            raise ImportError("s2attn backend='flash' needs the flash_attn package (pip install flash-attn); "
                              "use backend='sdpa' or 'flex'")
        if o.backend == "flex" and not flex_available():
            raise ImportError("s2attn backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        model = self.model
        # a multimodal model: S2 is for its causal language model only; the other sub-configs (vision, audio
        # towers) keep their own implementations, and remove() restores every sub-config's own
        text = _text_config(model.config)
        before = _implementations(model.config, text)
        original = text._attn_implementation or "eager"
        # a copy of a patched model (deepcopy, torch.save/load) carries the patch's name in its config but runs the
        # original implementation: read as that one here, and restored as that one by remove()
        before, original = _unpatched(before, model), _unpatched(original, model)
        if any(str(x).startswith("longctx_s2attn") for x in (_unpatched(model.config._attn_implementation, model),
                                                               original)):
            raise ValueError("this model already runs an s2attn attention function")
        shifted_head_count(getattr(text, "num_attention_heads", 2) or 2, o.shifted_heads)  # error now
        name = f"longctx_s2attn_{_RUN}_{next(_NAMES)}"
        state = _State(model, original, o, name, before)
        # the registered functions act for this instance only: masks inside its forwards (copies and models
        # sharing its config get the original's), attention in its own modules
        base = model.base_model
        self._hooks = (base.register_forward_pre_hook(state.enter, with_kwargs=True),
                       base.register_forward_hook(state.exit, always_call=True))
        state.hook_ids = tuple(hook.id for hook in self._hooks)
        _register(state)
        try:
            model.set_attn_implementation(name if text is model.config else _switched(model.config, text, name))
            if model.config._attn_implementation != name or text._attn_implementation != name:
                raise ValueError(f"cannot apply 's2attn': {type(model).__name__} does not support setting its "
                                 "attention implementation (it does not use transformers' AttentionInterface)")
        except BaseException:  # refused: leave the model as it was (no hooks, no marks on its modules)
            for hook in self._hooks:
                hook.remove()
            if _implementations(model.config, text) != before:
                _restore(model, before)
            state.detach()
            raise
        self._state, self._name, self._original, self._before = state, name, original, before

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        _restore(self.model, self._before)  # every sub-config's own, as before apply
        # (a copy of the patch, with a copy of the model, shares the original's state: it acts for the original)
        if self._state.model_ref() is self.model:
            self._state.detach()  # the registered entries stay (no unregister API) but become inert
        else:  # the copy's modules carry copies of the original's marks: gone with the copy's patch
            _unmark(list(self.model.modules()))
        del self._state

    @property
    def attn_implementation(self) -> str:
        return self._name


def _unmark(modules) -> None:
    """Take off ``modules`` every mark (``_MARK``) that no patched model's live state holds: the one of a state being
    detached, and the copies that a ``copy.deepcopy`` or ``torch.save`` of a patched model gives its modules (they match
    no state; removing the copy's patch, or a patch applied to the copy later, left them on every module)."""
    live = [s.marker for s in list(_STATES.values()) if s.model_ref() is not None]
    for m in modules:
        rest = tuple(x for x in m.__dict__.get(_MARK, ()) if any(x is marker for marker in live))
        if rest:
            m.__dict__[_MARK] = rest
        else:
            m.__dict__.pop(_MARK, None)


def _text_config(config):
    """The config of the causal language model: a multimodal model's text sub-config, else the config itself
    (also where ``get_text_config`` returns a copy: legacy encoder-decoder configs)."""
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):  # an older signature, or several text configs
        return config
    return text if _holds(config, text) else config


def _holds(config, sub) -> bool:
    """Whether ``sub`` is ``config`` or one of its sub-configs, at any depth (by identity)."""
    return config is sub or any(getattr(config, k, None) is not None and _holds(getattr(config, k), sub)
                                for k in getattr(config, "sub_configs", None) or {})


def _implementations(config, text=None) -> dict:
    """Every (sub-)config's attention implementation, in the dict form ``set_attn_implementation`` takes (keyed
    by sub-config name, ``""`` for the config itself; nested where a sub-config has sub-configs of its own).
    Those that S2 switches (``text`` and the configs holding it) are restored to "eager" if they had none."""
    def own(c):
        return c._attn_implementation or ("eager" if text is not None and _holds(c, text) else None)
    out = {"": own(config)}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _implementations(sub, text) if getattr(sub, "sub_configs", None) else own(sub)
    return out


def _restore(model, implementations: dict) -> None:
    """``model.set_attn_implementation(implementations)``, where a sub-config that had no implementation of its own
    (None: dbrx's and mpt's attn_config as loaded) gets None back: transformers refuses None for a sub-config
    without a sub-model (a ValueError, which left remove() half done), so it is set there directly."""
    def defined(impls):
        return {k: defined(v) if isinstance(v, dict) else v for k, v in impls.items() if v is not None}

    def unset(config, impls):
        for key, value in impls.items():
            sub = config if key == "" else getattr(config, key, None)
            if isinstance(value, dict):
                unset(sub, value)
            elif value is None and sub is not None:
                sub._attn_implementation_internal = None

    model.set_attn_implementation(defined(implementations))
    unset(model.config, implementations)


def _register(state) -> None:
    """Register ``state``'s attention and mask functions under its name (no API removes them: they stay, small)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(state.name, state.attention)
    AttentionMaskInterface.register(state.name, state.mask)
    _STATES[state.name] = state


def _unpatched(implementations, model):
    """An implementation name (or a nested ``_implementations`` dict) with each s2attn name whose state is not
    this model's replaced by the implementation it stands in for (what that state's model had there before the
    patch): a copy of a patched model (deepcopy, torch.save/load) carries the patch's name in its config and runs
    the original."""
    return _unpatched_at(implementations, model, None)


def _unpatched_at(implementations, model, path):
    """``_unpatched`` at ``path`` (keys into the dict form; None: a single name, the text config's): a sub-config
    gets back what that state's model had there before (the top-level config, a vision tower's parent, a sub-config
    with None), not the text config's implementation."""
    if isinstance(implementations, dict):
        return {k: _unpatched_at(v, model, (*(path or ()), k)) for k, v in implementations.items()}
    state = _STATES.get(implementations) if isinstance(implementations, str) else None
    if state is None or state.model_ref() is model:
        return implementations
    if path is None:
        return state.original
    before = state.before
    for key in path:
        if not isinstance(before, dict) or key not in before:
            return state.original
        before = before[key]
    return state.original if isinstance(before, dict) else before


def _state_for(name: str, original: str, options, before: dict | None = None, hook_ids: tuple = ()) -> "_State":
    """Unpickling a state (``torch.load`` of a model pickled with its hooks): in the process that pickled it, the
    live state (a copy of the model shares it, as a deepcopy does: the copy runs the original implementation);
    in another process, an inert state registered under the same name, so the copy runs the original too.
    The hooks come back under their ids without their handles (torch's next hook id follows an unpickled handle,
    not a module's hook dicts): in a fresh process a hook registered later took such an id, and with it the loaded
    hook's flags (a plain forward pre-hook was called with kwargs: a TypeError), so the next id is moved past them."""
    from torch.utils.hooks import RemovableHandle

    if hook_ids:
        RemovableHandle.next_id = max(RemovableHandle.next_id, max(hook_ids) + 1)
    state = _STATES.get(name)
    if state is None:
        state = _State(None, original, options, name, before)
        state.hook_ids = tuple(hook_ids)  # (pickled again with the copy)
        _register(state)
    return state


def _switched(config, text, name):
    """``_implementations(config)`` with ``name`` for ``config``, for ``text`` and for the sub-configs between them;
    every other sub-config (a vision or audio tower) keeps its own implementation."""
    out = {"": name}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is None:
            continue
        if getattr(sub, "sub_configs", None):
            out[key] = _switched(sub, text, name) if _holds(sub, text) else _implementations(sub)
        else:
            out[key] = name if sub is text else sub._attn_implementation
    return out


class _State:
    """What the registered functions hold: options, the original implementation's name, weak references
    to the model, its base model and its modules, how deep the base model's forward is entered, and
    per-forward caches.

    The functions are registered under a name that the model's config carries, so a ``deepcopy`` of the
    model, or another model sharing its config object, calls them too. S2 is active only for this
    instance: the mask function only inside its base model's forward (the hooks count it), the
    attention function only for its own modules, and training mode is read from the module called."""

    def __init__(self, model, original: str, options: S2AttnOptions, name: str, before: dict | None = None):
        """``model`` None: an inert state (unpickled in another process), acting as ``original`` for everything.
        ``before``: every sub-config's implementation before the patch (what a copy's remove() restores)."""
        self.name = name
        self.before = before
        self.hook_ids: tuple = ()  # its hooks' ids on the base model (set by the patch)
        self.model_ref = weakref.ref(model) if model is not None else _nothing
        self.base_ref = weakref.ref(model.base_model) if model is not None else _nothing
        self.members = weakref.WeakSet(model.modules() if model is not None else ())
        # the registered functions hold this state for ever (no unregister API): when the model is dropped without
        # remove(), what the state caches for it (BlockMasks, on its device) goes with it
        self._finalizer = weakref.finalize(model, self.detach) if model is not None else None
        self.warned_copy = False
        # this instance's modules carry ``marker`` (a deepcopy gets a copy of it, not it): the attention function
        # checks it by identity, which torch.compile guards as one value for every layer (membership in the
        # WeakSet guarded each module's identity: a recompile per layer, past dynamo's limit of 8)
        self.marker = object()
        for m in self.members:  # a tuple: a module shared with another patched model carries both markers
            m.__dict__[_MARK] = m.__dict__.get(_MARK, ()) + (self.marker,)
        self.depth = 0  # > 0 inside the patched base model's forward
        self.positions: list = []  # per entered forward (nested ones too): its position_ids, None or _UNKNOWN
        self.block_masks: dict = {}  # (H, T, G, n_shift, device, backend) -> BlockMask of the plain S2 pattern
        self.causal_kwargs: dict | None = None  # the last active causal mask call's settings (no tensors)
        self.masks_active = False  # S2's mask function was active in the current (last) forward
        self.skipped: list = []  # this forward's mask calls S2 let skip (None) where transformers would not have
        self.original = original
        self.options = options
        self.cache = _Cache()
        self._originals: dict[type, Callable] = {}
        self.warned_flex = False
        self.warned_mode = False
        self.warned_cache = False  # S2 on, but a call had more keys than queries (a KV cache)
        self.flex_unused_seen = False  # a compiled fast-path call ran sdpa although flex settings are set

    def detach(self):
        if self._finalizer is not None:
            self._finalizer.detach()  # (it held this state)
        self.model_ref = self.base_ref = _nothing
        _unmark(list(self.members))
        self.members = weakref.WeakSet()
        self.cache.clear()
        self.block_masks.clear()
        self.positions.clear()
        self.causal_kwargs = None
        self._originals.clear()

    def __deepcopy__(self, memo):
        # a deep copy of the model copies its hooks, which hold this state: the copy's hooks share it (they act
        # only for this model's base model, so for the copy they do nothing) instead of duplicating its caches
        self._warn_copy()
        return self

    def __reduce__(self):
        # pickling the model (torch.save) pickles its hooks, which hold this state: the name, the original and the
        # options travel; loaded, the copy shares this state (in this process) or an inert one (in another)
        self._warn_copy()
        return _state_for, (self.name, self.original, self.options, self.before, self.hook_ids)

    def _warn_copy(self):
        if self.model_ref() is not None and not self.warned_copy:
            self.warned_copy = True
            warnings.warn("s2attn: a copy of a patched model (copy.deepcopy, torch.save) runs its original attention: "
                          "S2 acts for the patched instance only; apply s2attn to the copy to train it with S2 "
                          "(after removing a copied patch, if one came with it)", stacklevel=3)

    # forward hooks of the patched base model (a copy's hooks are copies: they check the module too)
    def enter(self, module, args, kwargs):
        if module is self.base_ref():
            if self.depth == 0:
                self.cache.clear()  # a new forward: nothing derived from the last one's inputs is reused
                self.positions.clear()
                self.masks_active = False
                self.skipped = []
            # transformers' models pass position_ids by keyword; given any other way it is unknown here
            self.positions.append(kwargs.get("position_ids") if len(args) <= 1 else _UNKNOWN)
            self.depth += 1

    def exit(self, module, args, output):
        if module is self.base_ref():
            self.depth = max(0, self.depth - 1)
            if self.positions:
                self.positions.pop()
            if self.depth == 0:  # a copy or a model sharing the config, run later, is not inside this forward
                self.masks_active = False
                self.skipped = []

    # which function the model would call without the patch
    def original_attention(self, module) -> Callable:
        fn = self._originals.get(type(module))
        if fn is None:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            mod = sys.modules.get(type(module).__module__)
            interface = getattr(mod, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
            default = getattr(mod, "eager_attention_forward", None)
            if self.original == "eager" and default is None:
                raise RuntimeError(f"s2attn: cannot find the eager attention function of {type(module).__name__}")
            fn = interface.get_interface(self.original, default)
            self._originals[type(module)] = fn
        return fn

    def enabled(self, module=None) -> bool:
        """S2 for a call from ``module`` (the attention function), or for a mask built now (no module)."""
        if module is None:
            base = self.base_ref()
            return base is not None and self.depth > 0 and ((not self.options.train_only) or base.training)
        # identity, not ``in``: torch.compile cannot trace == on plain objects (a graph break per call)
        mine = any(mark is self.marker for mark in getattr(module, _MARK, ()))
        return mine and ((not self.options.train_only) or module.training)

    def backend(self, device, dropout: float, dense) -> str:
        b = self.options.backend
        if b == "auto":
            b = "flex" if device.type == "cuda" and flex_available() and not dropout else "sdpa"
        o = self.options
        if (o.flex_mode is not None or o.flex_kernel_options) and not (b == "flex" and device.type == "cuda") \
                and not self.warned_flex:
            self.warned_flex = True
            warnings.warn(f"s2attn: flex_mode/flex_kernel_options are not used: this call runs the {b!r} backend "
                          f"on {device.type} (they act on flex on CUDA only)", stacklevel=2)
        return b

    # registered in AttentionMaskInterface
    def mask(self, *args, **kwargs):
        from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function,
                                                causal_mask_function, sdpa_mask)
        q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
        offsets_zero = all(isinstance(kwargs.get(x, 0), int) and kwargs.get(x, 0) == 0
                           for x in ("q_offset", "kv_offset"))
        mask_function = kwargs.get("mask_function")
        bidirectional = mask_function is bidirectional_mask_function or "allow_is_bidirectional_skip" in kwargs
        active = (self.enabled() and not args and q_len is not None and q_len == kv_len and offsets_zero
                  and not bidirectional)
        if not active:
            original = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(self.original)
            return original(*args, **kwargs) if original is not None else None
        self.masks_active = True
        if mask_function is causal_mask_function and not kwargs.get("use_vmap", False):
            mask2d = kwargs.get("attention_mask")  # 2-D bool (B, kv_len) or None
            # for a module that does not run S2 in this forward: the original's mask is rebuilt from these
            self.causal_kwargs = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
            if mask2d is None or bool(mask2d.all()):
                return self.plain_block_mask(q_len, kwargs.get("config"), kwargs.get("device"))
            return mask2d[:, -kv_len:]
        result = sdpa_mask(**{**kwargs, "allow_is_causal_skip": True})
        if result is None and not kwargs.get("allow_is_causal_skip", True):
            self.skipped.append(kwargs)  # e.g. packed documents, which S2 reads from position_ids itself
        return result

    def plain_block_mask(self, T: int, config, device):
        """The fast path: for a forward with nothing padded and no documents, the mask function returns a
        BlockMask (built once per shape, kept across forwards); the attention function then runs S2 directly,
        traceable inside a compiled layer: flex_attention with the BlockMask of the plain S2 pattern, or the
        sdpa backend's grouped SDPA calls, for which a tiny BlockMask (``_sdpa_sign``) only signs "plain S2"
        (a BlockMask is the one mask object every transformers model hands through to its attention function).
        None (the general path, per attention call) where the backend is flash, or documents are packed."""
        if device is None or torch.device(device).type not in _FAST_PATH_DEVICES or config is None:
            return None
        device = torch.device(device)
        dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        positions = self.positions[-1] if self.positions else _UNKNOWN
        backend = self.backend(device, dropout, None)
        if backend not in ("flex", "sdpa") or positions is _UNKNOWN or BlockMask == () or (
                backend == "flex" and not flex_available()):
            return None
        H = getattr(config, "num_attention_heads", None)
        if not isinstance(H, int) or H < 1:
            return None
        if positions is not None:
            # 2-D (B, T) only: other forms (e.g. qwen2-vl's (4, B, T) rows) are the general path's to read
            if not torch.is_tensor(positions) or positions.ndim != 2 or positions.shape[-1] != T:
                return None
            if _doc_ids(positions, positions.shape[0], T, self.cache) is not None:
                return None  # packed documents: the general path reads them from position_ids
        o = self.options
        if self.flex_unused_seen and not self.warned_flex:
            self.backend(device, 1.0, None)  # (auto with dropout: sdpa) says that the flex settings are not used
        if backend == "flex" and o.flex_mode is not None and not self.warned_mode:
            model = self.model_ref()
            if torch.compiler.is_compiling() or (
                    model is not None and any(m._compiled_call_impl is not None for m in model.modules())):
                self.warned_mode = True  # (a call with undeclared dropout runs sdpa there: not flex_mode either)
                warnings.warn(f"s2attn: flex_mode={o.flex_mode!r} does not apply inside compiled decoder layers: "
                              "S2 is traced into their graphs, under their torch.compile mode", stacklevel=2)
        G = group_size_for(T, o.group_size_ratio, o.group_size)
        n_shift = shifted_head_count(H, o.shifted_heads)
        key = (H, T, G, n_shift, device, backend)
        block_mask = self.block_masks.get(key)
        if block_mask is None:
            if len(self.block_masks) >= 8:
                self.block_masks.clear()
            if backend == "flex":
                mask_mod = _marked(s2_mask_mod(T, G, H, n_shift), self.marker, "flex")
                block_mask = _s2_block_mask(T, G, H, n_shift, device, mask_mod)
                if block_mask is None:
                    block_mask = _create_block_mask(mask_mod, None, H, T, device)
            else:
                def sign(b, h, q_idx, kv_idx):  # never evaluated: sdpa does not read the sign's blocks
                    return q_idx >= kv_idx
                block_mask = _sdpa_sign(H, T, device, _marked(sign, self.marker, "sdpa"))
                if block_mask is None:
                    return None
            # S2's own (a model running flex_attention gets BlockMasks too), marked on the mask and its mask_mod
            block_mask._longctx_s2, block_mask._longctx_backend = self.marker, backend
            self.block_masks[key] = block_mask
        return block_mask

    # registered in AttentionInterface
    def attention(self, module, query, key, value, attention_mask, **kwargs):
        T = query.shape[-2]
        causal = (getattr(module, "is_causal", True) is not False and kwargs.get("is_causal", True) is not False
                  and getattr(getattr(module, "config", None), "is_causal", True) is not False)
        # from plain_block_mask (no padding, no documents); checked by a marker, which dynamo guards as one value
        # (on the mask, or, for a copy made by BlockMask.to(), on its mask_mod)
        plain = isinstance(attention_mask, BlockMask) and _s2_marks(attention_mask)[0] is self.marker
        if not (self.enabled(module) and causal and key.shape[-2] == T):
            if T > 1 and causal and key.shape[-2] > T and not self.warned_cache and self.enabled(module):
                # not S2 although it is on: a prompt run against a pre-allocated cache (generate with a static or
                # hybrid cache) has more keys than queries; say so, once, instead of training/scoring full attention
                self.warned_cache = True
                if module.training:  # (no generate here: keys given to the forward, e.g. peft prefix tuning's)
                    warnings.warn(f"s2attn: a training attention call of {T} queries over {key.shape[-2]} keys (past "
                                  "key values given to the forward, e.g. peft prefix tuning's virtual tokens) runs the "
                                  "original full attention, not S2: S2 needs as many keys as queries", stacklevel=2)
                else:
                    warnings.warn(f"s2attn: an attention call of {T} queries over {key.shape[-2]} keys (a KV cache: a "
                                  "pre-allocated static/hybrid cache, or a chunk added to a filled cache) runs the "
                                  "original full attention, not S2; for S2 on a prompt use a dynamic cache "
                                  "(generate(..., cache_implementation='dynamic'))", stacklevel=2)
            # S2's masks (its BlockMask, or None / the 2-D padding mask for a causal forward) are not what the
            # original takes; it gets its own mask function's mask (sdpa and flash take None and 2-D masks as is)
            # (only for a causal self-attention call after an active mask call: a non-causal module, or
            # cross-attention, gets its mask as built for it)
            if causal and key.shape[-2] == T and self.masks_active and (
                    plain or (attention_mask is None and (self.skipped or not self._none_is_causal()))
                    or (torch.is_tensor(attention_mask) and attention_mask.ndim == 2
                        and not self.original.startswith("flash"))):
                attention_mask = self._original_mask(module, query, None if plain else attention_mask,
                                                     kwargs.get("sliding_window"))
            elif (torch.is_tensor(attention_mask) and attention_mask.dtype == torch.bool and attention_mask.ndim == 4
                  and self.original in ("eager", "flex_attention") and self.masks_active):
                attention_mask = self._original_dense_mask(attention_mask, query.dtype)
            return self.original_attention(module)(module, query, key, value, attention_mask, **kwargs)
        if plain:
            return self._plain(query, key, value, attention_mask, kwargs)
        return self._s2_attention(query, key, value, attention_mask, kwargs)

    def _original_dense_mask(self, mask, dtype):
        """S2's mask function returns dense 4-D bool masks (sliding windows, overlays); eager adds masks to
        the scores, so it gets the additive float form. transformers' flex_attention cannot take them."""
        if self.original == "flex_attention":
            raise NotImplementedError("s2attn: a module that does not run S2 (e.g. an eval-mode layer inside a "
                                      "training model) got a dense mask, which transformers' flex_attention cannot "
                                      "take; put the whole model in one mode, or use attn_implementation 'sdpa'")
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def _none_is_causal(self) -> bool:
        return self.original == "sdpa" or self.original.startswith("flash")

    @torch.compiler.disable
    def _original_mask(self, module, query, mask2d, window=None):
        """The original implementation's mask for a causal forward of ``query``'s shape with padding ``mask2d``
        (or none), from the settings of the last active causal mask call (else the module's config)."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
        fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(self.original)
        if fn is None:
            return mask2d
        if mask2d is None and self.skipped:  # S2 skipped a mask transformers needs (packed documents, overlays)
            # the call of this layer's kind: its window (None for full attention) is the call's local_size
            mine = [kw for kw in self.skipped if kw.get("local_size") == window]
            if len(mine) != 1 and len(self.skipped) > 1:
                raise NotImplementedError("s2attn: a module that does not run S2 (e.g. an eval-mode layer inside a "
                                          "training model) cannot be given its mask: several layer types built "
                                          "masks S2 skipped (packed documents?); put the whole model in one mode")
            return fn(**(mine[0] if len(mine) == 1 else self.skipped[0]))
        B, T = query.shape[0], query.shape[-2]
        kw = self.causal_kwargs or {"mask_function": causal_mask_function, "dtype": query.dtype,
                                    "config": getattr(module, "config", None), "use_vmap": False}
        kw = {**kw, "batch_size": B, "q_length": T, "kv_length": T, "q_offset": 0, "kv_offset": 0,
              "attention_mask": mask2d, "allow_is_causal_skip": True, "device": query.device}
        return fn(**kw)

    # Traceable: a compiled decoder layer keeps S2's kernels inside its graph (no graph break, no per-call
    # host work beyond the graph's own launch).
    def _plain(self, query, key, value, block_mask, kwargs):
        B, H, T, D = query.shape
        o = self.options
        G = group_size_for(T, o.group_size_ratio, o.group_size)
        window = kwargs.get("sliding_window")
        dropout = float(kwargs.get("dropout", 0.0) or 0.0)
        # auto picks sdpa for dropout; the mask function reads it from the config, which not every model uses
        # (gpt2: attn_pdrop), so a call with dropout under a flex BlockMask runs sdpa here as well
        carrier = _s2_marks(block_mask)[1]
        sdpa = carrier == "sdpa" or (dropout > 0 and o.backend == "auto")
        if sdpa and carrier != "sdpa" and (o.flex_mode is not None or o.flex_kernel_options):
            # that the flex settings are not used, once, as the general path says it; inside a compiled graph only
            # noted (a store, no guard, no graph break), and said by the mask function at the next forward
            if torch.compiler.is_compiling():
                self.flex_unused_seen = True
            elif not self.warned_flex:
                self.backend(query.device, dropout, None)
        if (block_mask.shape[1] != H or tuple(block_mask.shape[2:]) != (T, T) or kwargs.get("s_aux") is not None
                or (not sdpa and (dropout or (window is not None and window < min(T, G))))):
            return self._s2_attention(query, key, value, None, kwargs)  # the general path says what it cannot do
        if sdpa:  # the same call as the general path's with no padding and no documents
            out = s2_attention(query, key, value, group_size=G, n_shift=shifted_head_count(H, o.shifted_heads),
                               scale=kwargs.get("scaling"), dropout=dropout, window=window,
                               softcap=kwargs.get("softcap"), backend="sdpa")
            return out.contiguous(), None
        softcap = kwargs.get("softcap")
        score_mod = None
        if softcap is not None:
            def score_mod(score, b, h, q_idx, kv_idx):
                return softcap * torch.tanh(score / softcap)
        kw = {"kernel_options": dict(o.flex_kernel_options)} if o.flex_kernel_options and query.is_cuda else {}
        if torch.compiler.is_compiling():  # traced into the caller's graph
            from torch.nn.attention.flex_attention import flex_attention
            out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                 scale=kwargs.get("scaling"), enable_gqa=key.shape[1] != H, **kw)
        else:
            with warnings.catch_warnings():  # off CUDA flex runs unfused (tests): do not warn about it
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = _flex_fn(query.device, o.flex_mode)(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                                          scale=kwargs.get("scaling"), enable_gqa=key.shape[1] != H, **kw)
        return out.transpose(1, 2).contiguous(), None

    def _declared_dropout(self) -> float:
        """The config's attention dropout, from which the mask function picks auto's backend."""
        cfg = getattr(self.model_ref(), "config", None)
        try:  # the decoder's text config: the one its model hands the mask function
            cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        except (TypeError, ValueError):  # an older signature, or several text configs: the config itself
            pass
        return float(getattr(cfg, "attention_dropout", 0.0) or 0.0)

    # Outside any torch.compile graph (a compiled decoder layer breaks its graph here): the padding and
    # document checks depend on tensor values, the flex BlockMask cache on object identity, and the flex
    # kernel is compiled on its own.
    @torch.compiler.disable
    def _s2_attention(self, query, key, value, attention_mask, kwargs):
        T = query.shape[-2]
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError("s2attn does not support attention sinks (s_aux)")
        B = query.shape[0]
        valid = dense = None
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask):
                raise TypeError(f"s2attn: unsupported attention_mask of type {type(attention_mask).__name__}")
            if attention_mask.ndim == 2:
                valid = _valid_keys(attention_mask, T, self.cache)
            elif attention_mask.ndim == 4:
                dense = attention_mask  # (kept as the same object: the flex BlockMask cache keys on it)
                if attention_mask.shape[-2:] != (T, T):
                    dense = attention_mask[:, :, :T, :T]  # like eager: the first kv_len columns
            else:
                raise ValueError(f"s2attn: attention_mask of shape {tuple(attention_mask.shape)} is neither 2-D nor 4-D")
        doc = _doc_ids(kwargs.get("position_ids"), B, T, self.cache)
        o = self.options
        G = group_size_for(T, o.group_size_ratio, o.group_size)
        n_shift = shifted_head_count(query.shape[1], o.shifted_heads)
        dropout = float(kwargs.get("dropout", 0.0) or 0.0)
        out = s2_attention(query, key, value, group_size=G, n_shift=n_shift, scale=kwargs.get("scaling"),
                           dropout=dropout, valid=valid, doc=doc, window=kwargs.get("sliding_window"),
                           dense=dense, softcap=kwargs.get("softcap"),
                           # auto's choice as the mask function's: dropout declared in the config counts too
                           backend=self.backend(query.device, dropout or self._declared_dropout(), dense),
                           cache=self.cache,
                           flex_mode=o.flex_mode, flex_kernel_options=o.flex_kernel_options)
        return out.contiguous(), None
