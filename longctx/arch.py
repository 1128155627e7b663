"""Architecture table: how each model family encodes positions and where its rotary module lives.

Paths are relative to ``model.base_model`` (``LlamaForCausalLM.model``, ``GPTNeoXForCausalLM.gpt_neox``,
...). In transformers 5 every family below keeps one rotary module there, built from
``config.rope_parameters`` (per layer type for gemma3/olmo3-style models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    family: str
    positions: str  # "rope", "alibi" or "learned"
    rotary: str | None = "rotary_emb"  # attribute path from model.base_model; None without RoPE
    rope_types: tuple[str, ...] | None = None  # rope types its config accepts (None: all of transformers')


_ROPE = [
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "gemma", "gemma2", "gemma3_text", "glm", "glm4", "phi", "phi3", "olmo", "olmo2", "olmo3",
    "granite", "granitemoe", "cohere", "starcoder2", "stablelm", "gpt_neox", "falcon",
    "deepseek_v3", "exaone4", "ernie4_5", "helium", "smollm3", "seed_oss", "arcee", "nemotron",
    "persimmon", "cohere2", "gpt_oss",
]
ARCHITECTURES: dict[str, Arch] = {f: Arch(f, "rope") for f in _ROPE}
# Phi3Config refuses every rope type but these two (and rewrites "yarn" into "longrope" on load)
ARCHITECTURES["phi3"] = Arch("phi3", "rope", rope_types=("default", "longrope"))
ARCHITECTURES.update({
    "bloom": Arch("bloom", "alibi", None),
    "mpt": Arch("mpt", "alibi", None),
    "gpt2": Arch("gpt2", "learned", None),
    "opt": Arch("opt", "learned", None),
})


def supported_families() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_of(model: nn.Module) -> Arch:
    """The table entry for ``model`` (a transformers PreTrainedModel); ValueError if unknown."""
    family = getattr(model.config, "model_type", None)
    if family not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {family!r}; supported families: {', '.join(supported_families())}"
        )
    arch = ARCHITECTURES[family]
    if family == "falcon" and getattr(model.config, "alibi", False):
        arch = Arch("falcon", "alibi", None)  # falcon-rw style checkpoints use ALiBi instead of RoPE
    return arch


def rotary_module(model: nn.Module, method: str) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute, rotary_module)`` of a RoPE model; clear errors for anything else."""
    arch = arch_of(model)
    if arch.positions != "rope":
        raise ValueError(
            f"method {method!r} rescales rotary position embeddings (RoPE), but {arch.family!r} models "
            f"use {arch.positions} positions; RoPE families: {', '.join(f for f in _ROPE)}"
        )
    parent = model.base_model
    *head, attr = arch.rotary.split(".")
    for part in head:
        parent = getattr(parent, part)
    module = getattr(parent, attr, None)
    if module is None or not any(name.endswith("inv_freq") for name, _ in module.named_buffers()):
        raise ValueError(
            f"expected the rotary module of this {arch.family!r} model at base_model.{arch.rotary}, "
            f"found {type(module).__name__}; is this a transformers 5 model?"
        )
    return parent, attr, module


def rope_layers(model: nn.Module) -> list[bool]:
    """Per decoder layer: whether it rotates its queries and keys (False: a NoPE layer, or no RoPE at all).

    Families with NoPE layers: smollm3 (``config.no_rope_layers[i] == 0``), cohere2 (RoPE in the
    sliding-window layers only) and exaone4 with a sliding window (its global layers are NoPE)."""
    config = model.config.get_text_config(decoder=True)
    n = config.num_hidden_layers
    arch = arch_of(model)
    if arch.positions != "rope":
        return [False] * n
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * n
    if arch.family == "smollm3":
        return [bool(flag) for flag in config.no_rope_layers]
    if arch.family == "cohere2" or (arch.family == "exaone4" and config.sliding_window is not None):
        return [kind == "sliding_attention" for kind in kinds]
    return [True] * n
