"""Memory and FLOPs planner: will a model fit at a context length, for inference or (LoRA) training?

    est = estimate("smollm2-135m", 32768)                           # inference (prefill) at 32k
    est = estimate("llama2-7b", 8192, train="lora", gpu_memory="80GiB")
    print(est.format())

    longctx estimate --model llama2-7b --length 32768 --train lora --gpus 8 --zero 3 --gpu-memory 80GiB

Everything is arithmetic on the config (no weights are loaded). The model is taken to be a
llama-style decoder (pre-norm RMSNorm, RoPE, GQA attention, gated MLP) run by transformers 5 with
SDPA attention (flash / memory-efficient kernels: no T x T matrix is kept) and no padding mask.
Other families are approximated with the same terms (and the parameter terms of their own, below). Symbols:

    B batch (per GPU), T tokens per sequence, L layers, h hidden size, a attention heads,
    g key/value heads (g = a: MHA, 1 < g < a: GQA, g = 1: MQA), d head dim, f MLP intermediate size,
    V vocabulary, e bytes per element of the model dtype (bf16/fp16 2, fp32 4), r LoRA rank,
    la bytes of a LoRA adapter element (4: peft keeps adapters in fp32 when the model is bf16/fp16)

Parameters (P):  per layer  h*a*d + 2*h*g*d + a*d*h        (q, k, v, o projections)
                          + 3*h*f (gated MLP; 2*h*f plain)   + 2*h (two norms)
                 + V*h (embedding) + V*h unless tied (lm_head) + h (final norm)
                 + the family's own terms: q/k/v biases (qwen2, attention_bias, use_qkv_bias), o biases
                 (attention_bias but in glm/stablelm; gpt_neox, phi, bloom, starcoder2), MLP biases (mlp_bias;
                 gpt_neox, phi, bloom, starcoder2), LayerNorm biases, q/k norms (qwen3, gemma3, olmo2/3;
                 qk_layernorm, use_qk_norm), 4 norms per layer (gemma2/3, glm4) or 1 (phi, cohere, stablelm's
                 use_parallel_residual), none (olmo); a flag a config dict leaves out takes its config class's
                 default. Exact (sum of p.numel(); tests/test_estimate.py checks all but mistral, gemma,
                 phi3 and granite) for llama, mistral, qwen2/3, gemma/2/3, phi, phi3, glm/4, gpt_neox,
                 bloom, starcoder2, olmo/2/3, cohere, stablelm, granite; other llama-like families use the
                 llama terms;
                 gpt2/opt/falcon (learned positions, other layouts)
                 are only approximated, and mixture-of-experts models (one expert's MLP counted: a
                 fraction of their weights) are underestimated, with a note saying so.

Memory terms (bytes; each is documented where it is computed, see the functions below):

    weights          P * e
    kv_cache         2 * L * g * d * T_kv * B * e     (inference only; T_kv = T + new tokens;
                     a sliding-window layer (window W): min(T_kv, W - 1);
                     "streaming": T_kv = min(T + new tokens, sink_size + window_size), and 3 tensors:
                     longctx's SinkCache keeps each key as produced as well as re-rotated)
    attention_mask   T * T (inference, models with sliding-window layers and T >= W: transformers'
                     boolean mask, in place of SDPA's is_causal)
    lora_params      la * r * sum over targets of (in + out)
    gradients        trainable params * their bytes
    optimizer_states Adam m and v (+ fp32 master weights under mixed precision); see _training_states
    activations      tensors kept for backward, all layers (training) / 0 (inference); _stored_per_token
    layer_peak       the largest transient of one layer: inference forward, or in training the
                     recomputed layer (gradient checkpointing) and its backward; _layer_peak_per_token
    logits           the output head: B*V*e (inference, last position) or B*T*V*e (all positions);
                     training 12*B*T*V (fp32 log-softmax saved, fp32 grads of it and of the logits)

    inference peak = weights + kv_cache + max(layer_peak, logits)
                     (sliding layers: weights + max(kv_cache + max(layer_peak + attention_mask, logits),
                      3 * attention_mask), the mask's creation coming before the layers)
    training peak  = weights + lora_params + optimizer_states + the largest of these phases:
        loss backward      activations + logits          (no parameter gradient exists yet)
        layer j backward   (ids, labels, cos/sin) + j * (kept per layer) + layer_peak
                           + gradients of layers j..L + of the output head, for j = L and j = 1
                           (linear in j: the largest is at one end)
        end of backward    gradients (all)
        optimizer step     gradients + one Adam moment (torch AdamW foreach: sqrt(v) of every parameter)

ZeRO (``gpus`` > 1, ``zero`` stage): stage >= 1 divides optimizer states (and fp32 master
weights) by ``gpus``, >= 2 also gradients, 3 also weights (and LoRA adapters), plus the gathered
full weights of 2 layers (the one computing and the one prefetched). Activations, logits and the KV
cache are per GPU (``batch`` is the per-GPU micro-batch) and are not divided.

FLOPs (multiply-add = 2):  forward per token = 2 * (matmul parameters) + 4 * L * a * d * k
where k is the mean number of keys a query attends to ((T + 1) / 2 causal; with a streaming cache
of S slots, mean over positions i of min(i, S); LongLoRA S2-Attn in training, groups of G tokens:
(G + 1) / 2); matmul parameters = the layers' linear weights +
V*h for each position whose logits are computed. Training step = forward + backward (+ one more
forward of the layers with gradient checkpointing); the backward costs 2x the forward for trained
linear weights (input and weight gradients), 1x for frozen ones (input gradient only) and 2.5x for
attention (FlashAttention-2's 5 matmuls vs 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4, "float": 4}
TRAIN_MODES = (None, "lora", "full")
LOGITS = ("last", "all")

# Configs of well-known models (the numbers of their config.json), so no download is needed.
PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=32768),
}
PRESETS["llama-2-7b"] = PRESETS["llama2-7b"]

# families whose MLP has two matrices (fc_in, fc_out) instead of three (gate, up, down)
_PLAIN_MLP = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "falcon", "phi", "bloom", "starcoder2", "mpt",
              "persimmon", "stablelm_epoch"}
_LAYERNORM = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "falcon", "phi", "bloom", "starcoder2", "stablelm",
              "persimmon", "cohere"}
# the parameters families add to the llama layout (checked against sum(p.numel()) of tiny models,
# tests/test_estimate.py): q/k/v biases whatever the config says (qwen2), biases of every linear
# (the config's flag, or always), norms per layer and their parameters per hidden unit (olmo: none;
# cohere: LayerNorm without bias, one per layer), q/k norms (per head_dim, or over all heads: olmo2),
# a LayerNorm after the embedding (bloom)
_QKV_BIAS = {"qwen2"}  # (its attention_bias, if a config has one, changes nothing)
_QKV_ONLY = {"glm", "glm4", "stablelm"}  # their attention_bias / use_qkv_bias: q/k/v only (llama and the rest: o too)
# q/k/v/o: (the config's flag, its default in the family's config class: a config.json written before the flag
# existed, e.g. pythia's, has the biases), or always
_ATTN_BIAS = {"gpt_neox": ("attention_bias", True), "starcoder2": ("use_bias", True), "phi": True, "bloom": True}
_MLP_BIAS = {"gpt_neox": True, "starcoder2": ("use_bias", True), "phi": True, "bloom": True}
_FLAG_DEFAULT = {"glm": True, "glm4": True}  # attention_bias when a config dict does not say
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4, "glm4": 4, "phi": 1, "cohere": 1}
_NORM_WEIGHTS = {"olmo": 0, "cohere": 1}
_QK_NORM = {"qwen3": "head", "gemma3_text": "head", "olmo2": "all", "olmo3": "all"}


# --------------------------------------------------------------------------------- the model shape
@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a config."""

    name: str
    model_type: str
    hidden: int             # h
    layers: int             # L
    heads: int              # a
    kv_heads: int           # g
    head_dim: int           # d
    intermediate: int       # f
    vocab: int              # V
    tied: bool              # lm_head shares the embedding matrix
    gated_mlp: bool = True
    layernorm: bool = False  # LayerNorm (weight + bias) instead of RMSNorm
    attention_bias: bool = False
    max_position_embeddings: int | None = None
    sliding_window: int | None = None  # window of the sliding-attention layers
    sliding_layers: int = 0            # how many layers use it (the rest attend to everything)
    o_bias: bool = False               # o_proj has a bias (q/k/v: attention_bias)
    mlp_bias: bool = False             # the MLP's linears have biases
    norms_per_layer: int = 2
    norm_weights: int | None = None    # parameters per hidden unit of a norm (default 2 with layernorm, else 1)
    qk_norm_params: int = 0            # q/k norms of one layer
    embed_norm: bool = False           # a norm right after the embedding (bloom)
    head_bias: bool = False            # the lm_head has a bias (phi)
    experts: int = 0                   # experts per MoE layer (one expert's MLP is counted)

    # -- parameter counts --------------------------------------------------------------------
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear in one layer, by the llama module names."""
        h, a, g, d, f = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        shapes = {"q_proj": (h, a * d), "k_proj": (h, g * d), "v_proj": (h, g * d), "o_proj": (a * d, h)}
        if self.gated_mlp:
            shapes.update(gate_proj=(h, f), up_proj=(h, f), down_proj=(f, h))
        else:
            shapes.update(up_proj=(h, f), down_proj=(f, h))
        return shapes

    @property
    def layer_linear_params(self) -> int:
        n = sum(i * o for i, o in self.linear_shapes().values())
        if self.attention_bias:
            n += (self.heads + 2 * self.kv_heads) * self.head_dim
        attention = ("q_proj", "k_proj", "v_proj", "o_proj")
        n += sum(o for k, (_, o) in self.linear_shapes().items()
                 if (self.o_bias and k == "o_proj") or (self.mlp_bias and k not in attention))
        return n

    @property
    def _norm(self) -> int:
        """Parameters of one norm over the hidden size."""
        return self.hidden * ((2 if self.layernorm else 1) if self.norm_weights is None else self.norm_weights)

    @property
    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self._norm + self.qk_norm_params

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + self.norm_params_per_layer

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return (0 if self.tied else self.vocab * self.hidden) + (self.vocab if self.head_bias else 0)

    @property
    def final_norm_params(self) -> int:
        return self._norm * (2 if self.embed_norm else 1)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + self.lm_head_params + self.final_norm_params


def _get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape_of(config, name: str | None = None) -> Shape:
    """A :class:`Shape` from a transformers config, a dict of config.json keys, or a name/path
    (see :func:`load_config`)."""
    if isinstance(config, Shape):
        return config
    if isinstance(config, (str, Path)):
        name = name or str(config)
        config = load_config(config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    h = _get(config, "hidden_size", "n_embd", "d_model")
    L = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    a = _get(config, "num_attention_heads", "n_head", "num_heads")
    if None in (h, L, a):
        raise ValueError("config needs hidden_size, num_hidden_layers and num_attention_heads")
    g = _get(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if g is None:
        g = 1 if _get(config, "multi_query", default=False) else a
    d = _get(config, "head_dim", default=None) or h // a
    mt = str(_get(config, "model_type", default="llama"))
    f = (None if mt == "bloom" else _get(config, "intermediate_size", "n_inner", "ffn_dim", default=None)) or 4 * h
    V = _get(config, "vocab_size")
    if V is None:
        raise ValueError("config needs vocab_size")
    tied = _get(config, "tie_word_embeddings", default=None)
    if tied is None:
        tied = mt in ("gpt2", "gpt_bigcode", "opt", "bloom", "gemma", "gemma2", "gemma3_text")
    window, n_sliding = _sliding_layers(config, int(L))
    bias, mlp_bias = (_get(config, b[0], default=b[1]) if isinstance(b, tuple) else b
                      for b in (_ATTN_BIAS.get(mt, False), _MLP_BIAS.get(mt, False)))
    flag = bool(_get(config, "attention_bias", "use_qkv_bias", default=_FLAG_DEFAULT.get(mt, False)))
    if mt in _QKV_BIAS:
        flag = False
    qk = _QK_NORM.get(mt)
    if mt in ("cohere", "stablelm") and _get(config, "use_qk_norm", "qk_layernorm", default=False):
        qk = "all"  # (stablelm: a LayerNorm without bias per head)
    norms = _NORMS_PER_LAYER.get(mt, 2)
    if mt == "stablelm" and _get(config, "use_parallel_residual", default=False):
        norms = 1
    if mt == "phi" and _get(config, "qk_layernorm", default=False):
        qk = "head_ln"
    qk_params = {None: 0, "head": 2 * int(d), "head_ln": 4 * int(d), "all": (int(a) + int(g)) * int(d)}[qk]
    return Shape(name=name or str(_get(config, "_name_or_path", default="") or mt), model_type=mt, hidden=int(h),
                 layers=int(L), heads=int(a), kv_heads=int(g), head_dim=int(d), intermediate=int(f), vocab=int(V),
                 tied=bool(tied), gated_mlp=mt not in _PLAIN_MLP, layernorm=mt in _LAYERNORM,
                 attention_bias=bool(bias) or flag or mt in _QKV_BIAS,
                 o_bias=bool(bias) or (flag and mt not in _QKV_ONLY),
                 mlp_bias=bool(mlp_bias) or bool(_get(config, "mlp_bias", default=False)),
                 norms_per_layer=norms, norm_weights=_NORM_WEIGHTS.get(mt),
                 qk_norm_params=qk_params, embed_norm=mt == "bloom", head_bias=mt == "phi",
                 max_position_embeddings=_get(config, "max_position_embeddings", "n_positions"),
                 sliding_window=window, sliding_layers=n_sliding,
                 experts=int(_get(config, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0))


def _sliding_layers(config, L: int) -> tuple[int | None, int]:
    """(sliding_window, number of sliding-attention layers): from ``layer_types`` (gemma2/3, ...; for a
    config.json that does not list them, as transformers derives them from its other keys), else
    ``sliding_window_pattern`` (every p-th layer full), else every layer (mistral style) unless
    ``use_sliding_window`` is False (qwen2)."""
    window = _get(config, "sliding_window")
    if not window or _get(config, "use_sliding_window", default=True) is False:
        return None, 0
    types = _get(config, "layer_types")
    if types is None and isinstance(config, dict):
        types = _derived_layer_types(config)
    if types is not None:
        n = sum(t == "sliding_attention" for t in types)
    elif _get(config, "sliding_window_pattern"):
        p = int(_get(config, "sliding_window_pattern"))
        n = sum((i + 1) % p != 0 for i in range(L))
    else:
        n = L
    return (int(window), n) if n else (None, 0)


def _derived_layer_types(config: dict):
    """The ``layer_types`` transformers gives a config built from this dict (a config.json written before
    configs listed them: gemma2 alternates, qwen2 slides from ``max_window_layers`` on); None where
    transformers does not know the model type or the family has no layer types."""
    try:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return getattr(AutoConfig.for_model(**config), "layer_types", None)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:
        return None


def load_config(name_or_path):
    """A config (dict or transformers config) without loading weights: a preset name
    (``PRESETS``: smollm2-135m, llama2-7b, llama3-8b, mistral-7b, ...), a ``config.json`` file or a
    model folder, a ``.gguf`` file (its metadata only), or a hub id (``AutoConfig``, needs network)."""
    key = str(name_or_path)
    if key.lower() in PRESETS:
        return dict(PRESETS[key.lower()])
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    from transformers import AutoConfig

    if path.is_file() and path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    try:
        from .models import MODEL_ALIASES

        if key in MODEL_ALIASES:  # an alias without a preset: its converted folder (converts once)
            from .models import _convert_alias

            return AutoConfig.from_pretrained(_convert_alias(key, MODEL_ALIASES[key]))
    except ImportError:
        pass
    try:
        return AutoConfig.from_pretrained(key)
    except Exception as err:
        raise ValueError(f"{key!r} is not a preset ({', '.join(sorted(PRESETS))}), a config.json, a model folder, "
                         f"a .gguf file or a reachable hub id: {err}") from err


# ------------------------------------------------------------------------------------ small parsers
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text) -> int:
    """``"80GiB"`` -> 80 * 2**30, ``"80GB"`` -> 80 * 10**9, ``"80G"`` -> 80 * 2**30 (as nvidia-smi
    means it), ``"1.5TiB"``, ``"512MiB"``, plain numbers are bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        n = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot parse a memory size from {text!r}: use e.g. 80GiB, 80GB, 24G, 512MiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {text!r}")
    return n


def human(n: float) -> str:
    """Bytes in binary units: 1.50 GiB, 12.0 MiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} FLOP"


def parse_method_spec(spec) -> tuple[str | None, dict]:
    """``"streaming:sink_size=4:window_size=2044"`` -> ("streaming", {...}); None/"none" -> (None, {})."""
    if spec is None or spec == "none":
        return None, {}
    if isinstance(spec, dict):
        spec = dict(spec)
        return spec.pop("name", spec.pop("method", None)), spec
    name, *pairs = str(spec).split(":")
    options = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep:
            raise ValueError(f"method {spec!r}: expected NAME:key=value, got {pair!r}")
        if v.lower() in ("true", "false"):
            options[k] = v.lower() == "true"
            continue
        try:
            options[k] = int(v)
        except ValueError:
            try:
                options[k] = float(v)
            except ValueError:
                options[k] = v
    return (None if name == "none" else name), options


# ------------------------------------------------------------------------------------------ result
@dataclass
class Estimate:
    """Estimated peak memory (bytes, per GPU) and FLOPs. ``total`` is the peak for the chosen ZeRO
    stage; ``per_stage`` gives it for stages 0-3. ``fits``: None unless ``gpu_memory`` was given."""

    shape: Shape
    length: int
    batch: int
    dtype: str
    train: str | None
    method: str | None
    method_options: dict
    gpus: int
    zero: int
    gradient_checkpointing: bool
    params: int
    trainable_params: int
    lora_param_count: int
    weights: int
    kv_cache: int
    activations: int
    layer_peak: int
    logits: int
    lora_params: int
    gradients: int
    optimizer_states: int
    zero3_gather: int
    total: int
    peak_phase: str
    per_stage: dict[int, int]
    flops_per_token: float
    flops: float                     # per training step, or for the prefill
    gpu_memory: int | None = None
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)
    attention_mask: int = 0          # inference with sliding-window layers: the materialized boolean mask

    def breakdown(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("weights", "lora_params", "gradients", "optimizer_states", "kv_cache",
                                              "activations", "layer_peak", "logits", "zero3_gather",
                                              "attention_mask")}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shape"] = dataclasses.asdict(self.shape)
        return out

    def format(self) -> str:
        s = self.shape
        what = {None: "inference (prefill)", "lora": "LoRA training step", "full": "full training step"}[self.train]
        lines = [f"{s.name}: {what}, {self.batch} x {self.length:,} tokens, {self.dtype}"
                 + (f", method {self.method}" + (f" {self.method_options}" if self.method_options else "")
                    if self.method else "")
                 + (f", {self.gpus} GPUs ZeRO-{self.zero}" if self.gpus > 1 or self.zero else ""),
                 f"  model: {self.params / 1e6:,.1f}M params (L={s.layers}, h={s.hidden}, heads={s.heads}, "
                 f"kv_heads={s.kv_heads}, head_dim={s.head_dim}, f={s.intermediate}, V={s.vocab}"
                 f"{', tied' if s.tied else ''})"]
        if self.train:
            lines.append(f"  trainable: {self.trainable_params / 1e6:,.2f}M params"
                         + (f" (LoRA {self.lora_param_count / 1e6:,.2f}M)" if self.train == "lora" else "")
                         + f"; gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}")
        rows = [("weights", self.weights), ("lora_params", self.lora_params), ("gradients", self.gradients),
                ("optimizer_states", self.optimizer_states), ("kv_cache", self.kv_cache),
                ("activations", self.activations), ("layer_peak", self.layer_peak), ("logits", self.logits),
                ("zero3_gather", self.zero3_gather), ("attention_mask", self.attention_mask)]
        lines.append("  memory per GPU:")
        for k, v in rows:
            if v or k in ("weights", "activations", "logits"):
                lines.append(f"    {k:<17} {human(v):>12}")
        if self.train:
            formula = "weights + lora_params + optimizer_states + the largest phase of the step"
        else:
            formula = "weights + kv_cache + max(layer_peak, logits)"
            if self.attention_mask:
                formula = "weights + max(kv_cache + max(layer_peak + attention_mask, logits), 3 * attention_mask)"
        lines.append(f"    {'peak':<17} {human(self.total):>12}   = {formula}; peak in the {self.peak_phase}")
        if self.gpus > 1 or self.zero:
            lines.append("  per GPU by ZeRO stage: " + ", ".join(f"{z}: {human(v)}" for z, v in self.per_stage.items()))
        unit = "step" if self.train else "prefill"
        lines.append(f"  FLOPs: {_flops(self.flops_per_token)} per token, {_flops(self.flops)} per {unit}")
        if self.gpu_memory is not None:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"  {verdict} in {human(self.gpu_memory)} per GPU "
                         f"({100 * self.total / self.gpu_memory:.0f}% used)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ the formulas
def _lora_count(s: Shape, r: int, targets) -> int:
    """LoRA parameters: r * (in + out) per targeted linear per layer (A is r x in, B is out x r)."""
    shapes = s.linear_shapes()
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(shapes)}")
    return s.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def _extra_count(s: Shape, extra) -> int:
    """Fully trained base parameters next to LoRA: "embed" (V*h; the tied lm_head is the same
    matrix), "norm" (every norm), "lm_head" (V*h, untied only)."""
    n = 0
    for name in extra:
        if name == "embed":
            n += s.embed_params
        elif name == "norm":
            n += s.layers * s.norm_params_per_layer + s.final_norm_params
        elif name == "lm_head":
            n += s.lm_head_params
        else:
            raise ValueError(f"unknown trainable_extra {name!r}: use embed, norm, lm_head")
    return n


def _training_states(s: Shape, train, e, lora_n, extra_n, master_weights, la):
    """(gradients, optimizer_states, master) bytes, unpartitioned.

    full:  gradients P*e; Adam m and v: 4+4 bytes per parameter when mixed precision keeps an fp32
           master copy (+4), i.e. 12 bytes per parameter beyond weights and gradients (the ZeRO
           paper's K=12); with master_weights=False the states are in the parameter dtype (2*e).
    lora:  adapters (fp32, la bytes): gradients la, Adam m+v 2*la (no master: they are fp32 already);
           trained extras (embed, norms; stored in the model dtype): gradients e, and Adam m+v of 2*e
           bytes (torch AdamW keeps states in the parameter dtype), or 4 + 8 bytes with
           master_weights (DeepSpeed / ZeRO mixed precision: fp32 master + fp32 m, v).
    """
    if train == "full":
        grads = s.params * e
        if master_weights and e < 4:
            return grads, 8 * s.params, 4 * s.params
        return grads, 2 * e * s.params, 0
    grads = lora_n * la + extra_n * e
    optim, master = 2 * la * lora_n, 0
    if master_weights and e < 4:
        optim += 8 * extra_n
        master = 4 * extra_n
    else:
        optim += 2 * e * extra_n
    return grads, optim, master


def _stored_per_token(s: Shape, train, e, la, r, targets, extra, checkpointing) -> tuple[float, float]:
    """Bytes kept for the backward, per token: (one layer without checkpointing, what stays per
    layer with it). Counted from what PyTorch autograd saves in transformers' llama code with SDPA
    (checked with saved-tensor hooks on CPU, see tests/test_estimate.py):

    each RMSNorm    4*h (its input upcast to fp32) + 4 (1/rms, fp32) + e*h if its weight is trained
                    (the normalized input, before the weight)
    attention       e*(a*d + 2*g*d) (q, k after RoPE, v, kept by SDPA) + e*a*d (its output)
                    + 4*a (fp32 log-sum-exp of the flash/efficient kernels); no T x T term
    MLP (gated)     3*e*f: gate (SiLU input), up and SiLU(gate) (the product's inputs);
                    plain MLP: e*f (activation input) [+ e*f activation output if fc_out trains]
    linear inputs   a linear saves its input only if its weight trains: full training e*h for q/k/v
                    (one shared tensor), e*h for gate/up, e*f for down, nothing for o (its input
                    is the attention output, same storage); frozen linears save nothing
    LoRA            per targeted linear: its input cast to the adapter dtype (la*in; shared with the
                    base input only when la == e) + la*r (the A output)

    (Korthikanti et al. 2022 count s*b*h*(34 + 5*a*s/h) for GPT-3 with dropout and materialized
    attention; with SDPA the 5*a*s/h term is gone, there is no dropout, and the SwiGLU MLP and the
    fp32 norm upcasts change the rest: hence this explicit list.)
    With gradient checkpointing (transformers, non-reentrant) each layer keeps only its input, e*h.
    """
    h, a, g, d, f = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    norm_trains = train == "full" or (train == "lora" and "norm" in extra)
    norm = 4 * h + 4 + (e * h if norm_trains else 0)
    if s.layernorm:
        norm += 4  # mean
    attn = e * (a * d + 2 * g * d) + e * a * d + 4 * a
    mlp = 3 * e * f if s.gated_mlp else e * f
    lin = 0
    if train == "full":
        lin = e * h + e * h + e * f + (0 if s.gated_mlp else e * f)
    lora = 0
    if train == "lora":
        shapes = s.linear_shapes()
        shared = set()
        for t in targets:
            inp = shapes[t][0]
            if la == e:  # no cast: the input tensor is shared between linears fed by the same tensor
                src = "attn_in" if t in ("q_proj", "k_proj", "v_proj") else ("mlp_in" if t in ("gate_proj", "up_proj") else t)
                if t == "o_proj":
                    src = "attn_out"  # already kept by SDPA
                if src not in shared:
                    shared.add(src)
                    lora += 0 if src == "attn_out" else e * inp
            else:
                lora += la * inp
            lora += la * r
    layer = 2 * norm + attn + mlp + lin + lora
    return layer, (e * h if checkpointing else layer)


def _layer_peak_per_token(s: Shape, train, e, layer_stored, checkpointing) -> float:
    """The transient of one layer, bytes per token.

    inference (no autograd): max over the attention and the MLP of what is live at once, times e:
        both       4*h: the embedding output (held by the model's forward), the layer's input (held
                   by the loop over layers), the residual sum and the normed input
        attention  4*h + a*d (q) + 2*g*d (k, v) + 3.5*a*d (RoPE temporaries: q*cos, rotate_half(q)
                   and its negated half, * sin)
        MLP        4*h + 3*f (SiLU(gate), up and their product; plain MLP: 4*h + 2*f)
    training, backward of one layer: its stored activations again when they are recomputed
    (gradient checkpointing), plus the gradients in flight, the larger of
        MLP        3*e*f + e*h: the gradients of the product, of SiLU(gate) and of up are live
                   together with the saved gate/up/SiLU(gate) (plain MLP: 2*e*f + e*h)
        attention  e*(a*d + 2*g*d) (gradients of q, k, v) + 4*a*d (FlashAttention-2's fp32 dq
                   accumulator) + 2*e*a*d (dk, dv per query head before the GQA sum, if g < a) + e*h
    """
    h, a, g, d, f = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    if train is None:
        attn = 4 * h + a * d + 2 * g * d + 3.5 * a * d
        mlp = 4 * h + (3 * f if s.gated_mlp else 2 * f)
        return e * max(attn, mlp)
    mlp_ws = (3 if s.gated_mlp else 2) * e * f + e * h
    attn_ws = e * (a * d + 2 * g * d) + 4 * a * d + (2 * e * a * d if g < a else 0) + e * h
    workspace = max(mlp_ws, attn_ws)
    return (layer_stored if checkpointing else 0) + workspace


def _mean_keys(T: int, cap: int | None) -> float:
    """Mean over query positions i = 1..T of the keys it attends to: i (causal), min(i, cap) with a
    bounded cache of cap slots."""
    if cap is None or cap >= T:
        return (T + 1) / 2
    return (cap * (cap + 1) / 2 + (T - cap) * cap) / T


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# estimate's own short names: sink/window for streaming's options, longlora for s2attn
_OPTION_ALIASES = {"sink": "sink_size", "window": "window_size"}


def _method_options(name: str, opts: dict) -> dict:
    """Check ``opts`` against the registered method's options dataclass (as registry.make_options):
    an unknown method or option is a ValueError naming the allowed ones. streaming and s2attn, whose
    values the estimate uses, come back validated and with their defaults filled in."""
    from . import registry

    m = registry.get_method("s2attn" if name == "longlora" else name)  # ValueError listing known methods
    if m.name == "streaming":
        opts = {_OPTION_ALIASES.get(k, k): v for k, v in opts.items()}
    fields = [f.name for f in dataclasses.fields(m.options)]
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; allowed options: {', '.join(fields)}")
    if m.name not in ("streaming", "s2attn"):
        # the given values checked as longctx.apply checks them (yarn:factor=-2 was accepted); a required option
        # left out (a factor: RoPE methods change no memory) gets a stand-in
        stand_in = {f.name: 2 for f in dataclasses.fields(m.options) if f.name not in opts
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        registry.make_options(m, **stand_in, **opts)
        return opts
    return registry.make_options(m, **opts).to_dict()  # validate() raises ValueError on bad values


def estimate(config, length: int, *, method=None, train: str | None = None, batch: int = 1, dtype: str = "bf16",
             gpus: int = 1, zero: int = 0, gradient_checkpointing: bool = True, lora_r: int = 8,
             lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), trainable_extra=("embed", "norm"),
             gpu_memory=None, logits: str | None = None, new_tokens: int = 0, chunk: int | None = None,
             master_weights: bool | None = None, lora_dtype: str = "fp32", **method_options) -> Estimate:
    """Estimate peak memory per GPU and FLOPs of ``config`` at ``length`` tokens.

    config: a transformers config, a dict of config.json keys, or a name/path (``load_config``).
    method: None, a registered method name or spec (``"yarn:factor=4"``; RoPE methods change no
        memory), ``"streaming"`` with ``sink_size``/``window_size`` (also ``sink``/``window``) as
        keyword options or in the spec: bounds the KV cache, and the prompt is prefilled in chunks
        of ``window_size`` tokens; or ``"s2attn"`` (``group_size`` or ``group_size_ratio``, default
        1/4): attention FLOPs within groups while training, memory unchanged. An unknown method or
        option is a ValueError listing the allowed ones.
    train: None (inference: a prefill of ``length`` tokens with the KV cache, logits of the last
        position), "lora" (peft LoRA on ``lora_targets`` with rank ``lora_r``, adapters in
        ``lora_dtype``, ``trainable_extra`` trained fully) or "full"; training is one step of AdamW
        with the loss on all positions, measured after the first step (optimizer states exist).
    logits: "last" (inference default) or "all" (every position; training always).
    new_tokens: tokens generated after the prefill (they add to the KV cache).
    chunk: inference prefill chunk (tokens per forward; default all, streaming: window_size).
    master_weights: fp32 master copies for the optimizer (default: True for full training and
        under ZeRO, False for LoRA with plain torch AdamW).
    gpu_memory: bytes or a string such as "80GiB" / "80GB"; sets ``fits``.
    """
    s = shape_of(config)
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    for opt, value in (("dtype", dtype), ("lora_dtype", lora_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{opt} must be one of {', '.join(DTYPE_BYTES)}, got {value!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    for opt, value, low in (("length", length, 1), ("batch", batch, 1), ("gpus", gpus, 1), ("lora_r", lora_r, 1),
                            ("new_tokens", new_tokens, 0), ("chunk", 1 if chunk is None else chunk, 1)):
        _check_int(opt, value, low)
    if logits not in (None, *LOGITS):
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    e, la, T, B = DTYPE_BYTES[dtype], DTYPE_BYTES[lora_dtype], int(length), int(batch)
    notes = []

    name, opts = parse_method_spec(method)
    opts = {**opts, **method_options}
    if name is not None:
        opts = _method_options(name, opts)
    cap = s2_group = None
    if name == "streaming":
        sink, window = opts["sink_size"], opts["window_size"]
        cap = sink + window
        if train:
            notes.append("streaming bounds the KV cache of generation; training is not changed by it")
        elif chunk is None:
            chunk = window
    elif name in ("s2attn", "longlora"):
        # LongLoRA shifted sparse attention: causal within groups of G tokens while training
        G, ratio, train_only = opts["group_size"], opts["group_size_ratio"], opts["train_only"]
        if G is None:  # the patch's own rule (ratio * T rounded up to even, float error not rounded up)
            from .methods.s2attn import group_size_for

            G = group_size_for(T, ratio)
        opts = {"group_size": int(G)}
        if train or not train_only:
            s2_group = int(G)
        else:
            notes.append("s2attn is active in training only (train_only=True): inference is full attention")
        notes.append("s2attn: memory as full attention with an O(T) kernel; attention FLOPs within groups")
    elif name is not None:
        from . import registry

        if registry.get_method(name).patch.slot != "rope":
            notes.append(f"method {name!r} is not modeled: estimated as the plain model")
    elif opts:
        raise ValueError(f"method options {sorted(opts)} given without a method")

    lora_n = _lora_count(s, lora_r, lora_targets) if train == "lora" else 0
    extra_n = _extra_count(s, trainable_extra) if train == "lora" else 0
    trainable = s.params if train == "full" else lora_n + extra_n

    weights = s.params * e
    lora_params = lora_n * la
    kv = mask = 0
    if train:
        logits_mode = "all"
        if logits == "last":
            notes.append("training computes the logits of every position (logits='last' ignored)")
    else:
        logits_mode = logits or "last"

    if train:
        layer_tok, kept_tok = _stored_per_token(s, train, e, la, lora_r, lora_targets, trainable_extra,
                                                gradient_checkpointing)
        h = s.hidden
        norm_trains = train == "full" or "norm" in trainable_extra
        head_trains = train == "full" or ("embed" in trainable_extra and s.tied) or "lm_head" in trainable_extra
        # outside the layers: token ids + labels (int64), RoPE cos/sin (e*2*d), the final norm, the
        # lm_head input if its weight trains
        outside = 16 + 2 * e * s.head_dim + 4 * h + 4 + (e * h if norm_trains else 0) + (e * h if head_trains else 0)
        activations = int(B * T * (s.layers * kept_tok + outside))
        layer_peak = int(B * T * _layer_peak_per_token(s, train, e, layer_tok, gradient_checkpointing))
        # forward: logits (e) + fp32 copy (4) + fp32 log-softmax (4, kept); backward: kept log-softmax,
        # its fp32 gradient and the fp32 gradient of the logits (4 + 4 + 4)
        logits_b = int(B * T * s.vocab * max(e + 8, 12))
    else:
        C = min(T, chunk) if chunk else T
        n_kv = 3 if cap is not None else 2
        T_kv = T + new_tokens if cap is None else min(T + new_tokens, cap)
        # transformers' sliding cache layers (DynamicSlidingWindowLayer) keep the last sliding_window - 1
        # tokens: the token being computed completes the window (streaming: its own cache, every layer)
        n_sw = s.sliding_layers if cap is None else 0
        slots = (s.layers - n_sw) * T_kv + (n_sw * min(T_kv, s.sliding_window - 1) if n_sw else 0)
        kv = n_kv * s.kv_heads * s.head_dim * slots * B * e
        # with sliding layers, once the keys reach the window transformers 5 cannot use SDPA's is_causal
        # (masking_utils.sdpa_mask returns None only below it) and materializes a boolean mask: T x T
        # bytes, once for all sliding layers (the full layers' mask is None), broadcast over the batch
        # when there is no padding; kept through the layers, made from 3 such temporaries
        if n_sw and T >= s.sliding_window:
            if C == T:
                mask = T * T
            else:
                notes.append("the sliding-window attention masks of a chunked prefill are not counted")
        activations = 0
        layer_peak = int(B * C * (_layer_peak_per_token(s, None, e, 0, False) + 2 * e * s.head_dim))
        logits_b = B * s.vocab * e if logits_mode == "last" else B * C * s.vocab * e
        if chunk and C < T:
            notes.append(f"prefill in chunks of {C} tokens")

    layer_w = s.layer_params * e
    # gradients by where the backward produces them: per layer (in the layers' backward), the output
    # head's (first, right after the loss), the untied input embedding's (last)
    g_layer = g_head = g_embed = 0
    if train == "full":
        g_layer, g_head = s.layer_params * e, (s.lm_head_params + s.final_norm_params) * e
        g_embed = s.embed_params * e
        if s.tied:
            g_head, g_embed = g_head + g_embed, 0
    elif train == "lora":
        norm_n = s.norm_params_per_layer if "norm" in trainable_extra else 0
        g_layer = (lora_n // s.layers) * la + norm_n * e
        g_head = ((s.final_norm_params if "norm" in trainable_extra else 0)
                  + (s.embed_params if "embed" in trainable_extra and s.tied else 0)
                  + (s.lm_head_params if "lm_head" in trainable_extra else 0)) * e
        g_embed = s.embed_params * e if ("embed" in trainable_extra and not s.tied) else 0

    def states(z: int):
        """(gradients, optimizer states + master weights, AdamW step temporary) at ZeRO stage z, whose
        master_weights default (fp32 masters under ZeRO) depends on the stage."""
        if not train:
            return 0, 0, 0
        mw = (train == "full" or z > 0) if master_weights is None else master_weights
        grads, optim, master = _training_states(s, train, e, lora_n, extra_n, mw, la)
        # torch AdamW with foreach (the CUDA default) makes one temporary the size of a moment,
        # sqrt(v), for all parameters of a dtype at once (the CPU per-tensor loop: 2x the largest)
        if train == "full":
            step_temp = s.params * (4 if mw and e < 4 else e)
        else:
            step_temp = lora_n * la + extra_n * (4 if mw and e < 4 else e)
        return grads, optim + master, step_temp

    if train:
        # in the layers' backward the head's saved tensors are gone: ids, labels and cos/sin remain
        outside = B * T * (16 + 2 * e * s.head_dim)
        kept_layer = B * T * kept_tok

    def total_for(z: int):
        grads, optim, step_temp = states(z)
        div = gpus if gpus > 1 else 1
        w = weights / div if z >= 3 else weights
        lp = lora_params / div if z >= 3 else lora_params
        g_ = grads / div if z >= 2 else grads
        gdiv = div if z >= 2 else 1
        o = optim / div if z >= 1 else optim
        gather = 2 * layer_w if (z >= 3 and gpus > 1) else 0
        if not train:
            phases = {"forward (a layer's MLP/attention)": kv + layer_peak + mask, "forward (output head)": kv + logits_b,
                      "forward (sliding-window mask)": 3 * mask}  # made before the layers: no KV cache yet
            phase = max(phases, key=phases.get)
            return int(math.ceil(w + phases[phase] + gather)), phase, int(w), int(lp), int(g_), int(o), int(gather)
        static = w + lp + o + gather
        phases = {"loss backward (logits)": static + activations + logits_b}
        # backward of layer j (L first): layers 1..j still keep their activations, layers j+1..L and
        # the head have gradients, layer j's are being made; linear in j, so j = L or j = 1
        for j, where in ((s.layers, "last layer's backward"), (1, "first layer's backward")):
            phases[where] = (static + outside + j * kept_layer + layer_peak
                             + ((s.layers - j + 1) * g_layer + g_head) / gdiv)
        phases["end of backward"] = static + g_
        phases["optimizer step"] = static + g_ + step_temp / (div if z >= 1 else 1)
        phase = max(phases, key=phases.get)
        return int(math.ceil(phases[phase])), phase, int(w), int(lp), int(g_), int(o), int(gather)

    per_stage = {z: total_for(z)[0] for z in range(4)}
    total, phase, w, lp, g_, o, gather = total_for(zero)

    # FLOPs per token (multiply-add = 2): linear weights 2 per parameter, attention 4*a*d per key
    lin = s.layers * s.layer_linear_params
    head = s.vocab * s.hidden
    keys = _mean_keys(T, None if train else cap) if s2_group is None else _mean_keys(min(T, s2_group), None)
    attn_fwd = 4 * s.layers * s.heads * s.head_dim * keys
    if train:
        fwd = 2 * lin + 2 * head + attn_fwd + 2 * lora_n
        if train == "full":
            bwd = 2 * (2 * lin + 2 * head)                     # input and weight gradients
        else:                                                  # frozen: input gradients only
            bwd = 2 * lin + (4 if head_trains else 2) * head + 2 * 2 * lora_n
        bwd += 2.5 * attn_fwd
        recompute = (2 * lin + 2 * lora_n + attn_fwd) if gradient_checkpointing else 0
        per_token = fwd + bwd + recompute
    else:
        per_token = 2 * lin + attn_fwd + 2 * head * (1 if logits_mode == "all" else 1 / T)
    flops = per_token * B * T

    fits = None
    gpu_bytes = None
    if gpu_memory is not None:
        gpu_bytes = parse_bytes(gpu_memory)
        fits = total <= gpu_bytes
    if not train and s.max_position_embeddings and T > s.max_position_embeddings and name is None:
        notes.append(f"{T} tokens is past the trained context ({s.max_position_embeddings}): memory is fine, "
                     f"quality needs a context-extension method")
    if s.experts > 1:
        notes.append(f"mixture of experts ({s.experts} experts per layer): one expert's MLP is counted, so the "
                     f"parameters and every term made from them (weights, gradients, optimizer states) are "
                     f"underestimated")
    if train and s.sliding_layers:
        notes.append("sliding-window layers: their attention masks are not counted in training")
    if gpus > 1 and zero == 0 and train:
        notes.append("ZeRO-0 (DDP): every GPU holds everything; DDP gradient buckets may add up to one "
                     "more copy of the gradients")
    return Estimate(shape=s, length=T, batch=B, dtype=dtype, train=train, method=name, method_options=opts, gpus=gpus,
                    zero=zero, gradient_checkpointing=gradient_checkpointing, params=s.params,
                    trainable_params=trainable, lora_param_count=lora_n, weights=w, kv_cache=int(kv),
                    activations=int(activations), layer_peak=int(layer_peak), logits=int(logits_b), lora_params=lp,
                    gradients=g_, optimizer_states=o, zero3_gather=gather, total=total, peak_phase=phase,
                    per_stage=per_stage, flops_per_token=per_token, flops=flops, gpu_memory=gpu_bytes, fits=fits,
                    notes=notes, attention_mask=int(mask))


# ------------------------------------------------------------------------------------------- CLI
def cmd_estimate(args) -> int:
    ignored = [message for given, message in (
        (args.lora_r is not None and args.train != "lora", "--lora-r applies to --train lora only"),
        (args.no_gradient_checkpointing and not args.train, "--no-gradient-checkpointing applies to --train only"),
        (args.new_tokens and args.train, "--new-tokens applies to inference only (not --train)")) if given]
    if ignored:
        raise SystemExit("; ".join(ignored))
    try:
        lengths = [int(x) for x in str(args.length).split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise SystemExit(f"--length must be one or more comma-separated token counts (integers >= 1), "
                         f"got {args.length!r}")
    if args.gpu_memory is not None:
        try:
            parse_bytes(args.gpu_memory)
        except ValueError as err:
            raise SystemExit(f"--gpu-memory: {err}") from None
    for i, L in enumerate(lengths):
        try:  # its errors (an unknown model or method option, --batch 0, ...) name the setting: a message, not a traceback
            est = estimate(args.model, L, method=args.method, train=args.train, batch=args.batch, dtype=args.dtype,
                           gpus=args.gpus, zero=args.zero, gradient_checkpointing=not args.no_gradient_checkpointing,
                           lora_r=8 if args.lora_r is None else args.lora_r, gpu_memory=args.gpu_memory,
                           logits=args.logits, new_tokens=args.new_tokens)
        except (ValueError, TypeError) as err:
            raise SystemExit(f"longctx estimate: {err}") from None
        if i:
            print()
        print(est.format())
        if args.json:
            print(json.dumps(est.to_dict(), default=str))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="memory and FLOPs estimate: does it fit at this length?",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help=f"preset ({', '.join(sorted(PRESETS))}), config.json, model folder, .gguf or hub id")
    p.add_argument("--length", default="32768", help="tokens per sequence (comma-separated for several)")
    p.add_argument("--method", default=None, help="e.g. streaming:sink_size=4:window_size=2044 or yarn:factor=4")
    p.add_argument("--train", choices=["lora", "full"], default=None, help="a training step (default: inference)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--lora-r", type=int, default=None, help="--train lora: LoRA rank (default 8)")
    p.add_argument("--logits", choices=LOGITS, default=None, help="inference: logits of the last or all positions")
    p.add_argument("--new-tokens", type=int, default=0, help="inference: tokens generated after the prompt")
    p.add_argument("--gpu-memory", default=None, help="per-GPU memory, e.g. 80GiB, 80GB, 24G")
    p.add_argument("--json", action="store_true", help="also print the estimate as one JSON line")
    p.set_defaults(func=cmd_estimate)


if __name__ == "__main__":  # python -m longctx.estimate ...
    parser = argparse.ArgumentParser(prog="longctx")
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["estimate", *sys.argv[1:]])
    sys.exit(ns.func(ns))
