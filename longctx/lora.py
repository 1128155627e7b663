"""LoRA+ for long-context fine-tuning, as in LongLoRA (Chen et al. 2023, arXiv:2309.12307).

LongLoRA found that LoRA on the attention projections alone does not adapt a model to much longer
contexts, but LoRA plus *fully trainable* input embedding and normalization layers does (0.3% of
the parameters more for Llama-2-7B). ``prepare`` builds exactly that::

    import longctx.lora                                               # not imported by ``import longctx``
    peft_model = longctx.lora.prepare(model, r=8, alpha=16)          # LoRA on q/k/v/o + embed + norms
    peft_model = longctx.lora.prepare(model, trainable=())           # plain LoRA

How the embedding and norms are made trainable: ``requires_grad`` on the base model's own parameters,
not peft's ``modules_to_save``. ``modules_to_save`` wraps a module and trains a *copy* of it; for an
input embedding tied to ``lm_head`` (SmolLM2, Gemma, ...) the copy would silently untie the two
(lm_head keeps the old weight) and doubles the embedding's memory. Training the base parameters in
place keeps a tied ``lm_head`` tied for free (it *is* the same Parameter) and makes saving and merging
trivial: ``save`` writes the peft adapter (LoRA only) plus ``trainable.safetensors`` with the
embedding/norm tensors under the base model's own state-dict names; ``load`` copies those into a
freshly loaded base model (``load_state_dict``, which writes through the tie) and attaches the
adapter; ``merge_and_unload`` then gives a plain transformers model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
from pathlib import Path

import torch
import torch.nn as nn

from .registry import unwrap_model

# default LoRA targets: the attention projections of each family (peft matches module-name suffixes)
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    **{f: _LLAMA_LIKE for f in (
        "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
        "gemma2", "gemma3_text", "glm", "glm4", "olmo", "olmo2", "olmo3", "granite", "granitemoe", "cohere",
        "starcoder2", "stablelm", "exaone4", "ernie4_5", "helium", "smollm3", "seed_oss", "arcee")},
    **{f: ("query_key_value", "dense") for f in ("gpt_neox", "falcon", "bloom", "persimmon")},
    "phi3": ("qkv_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "deepseek_v3": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "mpt": ("Wqkv", "out_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
}

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINABLE_FILE = "trainable.safetensors"  # the fully trained base tensors (embedding, norms)
LORA_FILE = "longctx_lora.json"  # what prepare() was called with, and the trainable names


def target_modules_for(model: nn.Module) -> list[str]:
    """The default LoRA target modules (attention projections) of ``model``'s family."""
    family = getattr(unwrap_model(model).config, "model_type", None)
    if family not in TARGET_MODULES:
        raise ValueError(
            f"no default LoRA target modules for model family {family!r}; pass target_modules=[...] "
            f"(names of its attention projection modules). Families with defaults: {', '.join(sorted(TARGET_MODULES))}"
        )
    return list(TARGET_MODULES[family])


def trainable_base_names(model: nn.Module, trainable=("embed", "norm")) -> list[str]:
    """Names (as in ``model.named_parameters()``, tied duplicates listed once) of the base parameters
    that ``trainable`` selects. ``"embed"``: the input embedding (``get_input_embeddings()``);
    ``"norm"``: every normalization layer (modules whose class name contains "Norm": RMSNorm,
    LayerNorm, ... including q/k norms); any other string: parameters whose name contains it (a tied
    duplicate's name too: ``"lm_head"`` on a tied model selects the embedding matrix it shares)."""
    if isinstance(trainable, str):
        trainable = (trainable,)
    model = unwrap_model(model)
    chosen: set[int] = set()
    for key in trainable:
        if not isinstance(key, str):
            raise TypeError(f"lora trainable must be strings (embed, norm or part of a parameter name), got {key!r}")
        if key == "embed":
            chosen.update(id(p) for p in model.get_input_embeddings().parameters())
        elif key == "norm":
            for module in model.modules():
                if "Norm" in type(module).__name__:
                    chosen.update(id(p) for p in module.parameters(recurse=False))
        else:
            # (tied duplicates too: "lm_head" on a tied model is the embedding's one matrix)
            hits = [p for n, p in model.named_parameters(remove_duplicate=False) if key in n]
            if not hits:
                raise ValueError(f"trainable={key!r} matches no parameter of this model")
            chosen.update(id(p) for p in hits)
    return [n for n, p in model.named_parameters() if id(p) in chosen]


def _check_targets(base: nn.Module, targets: list, trainable: tuple, names: list[str]) -> None:
    """Refuse what would train but not merge: LoRA on a tied embedding (its delta would be merged into
    the one shared matrix, changing both ends), and ``trainable`` parameters inside a module that LoRA
    wraps (peft renames them, so the artifact's names would not be the base model's)."""
    wrapped = [n for n, _ in base.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]
    if _tied(base):
        ends = {id(base.get_input_embeddings()), id(base.get_output_embeddings())}
        hit = [n for n, m in base.named_modules() if n in wrapped and id(m) in ends]
        if hit:
            raise ValueError(f"lora target_modules={targets} put LoRA on {hit}, but the input and output embeddings "
                             f"are tied: merging would change both. Leave them out of target_modules (train the "
                             f"embedding with trainable=('embed',)) or untie them first")
    inside = [p for p in names if any(p.startswith(m + ".") for m in wrapped)]
    if inside:
        raise ValueError(f"lora trainable={list(trainable)} selects {inside[:3]}{' ...' if len(inside) > 3 else ''} "
                         f"inside modules that target_modules={targets} wraps with LoRA; peft renames them, so the "
                         f"artifact could not be merged. Remove those entries from trainable or target_modules")


def prepare(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=None,
            trainable=("embed", "norm"), quantize_4bit: bool = False, verbose: bool = True):
    """Wrap ``model`` (a transformers causal LM, changed in place) in a peft ``PeftModel`` with LoRA
    on the attention projections and, unless ``trainable=()``, the input embedding and all norms
    fully trainable. ``quantize_4bit``: QLoRA, frozen base Linear weights in 4-bit NF4 (needs
    bitsandbytes and a CUDA model). ``target_modules``: module names (or ends of names after a dot), each of
    which must match a module, or peft's ``"all-linear"`` (every Linear/Conv1D module but the output head); None: the
    family's defaults. ``r`` must be an integer >= 1, ``alpha`` > 0, ``dropout`` in [0, 1). The returned model
    has ``.longctx_lora`` (settings and the trainable parameter counts); the summary is printed when
    ``verbose``."""
    from peft import LoraConfig, get_peft_model

    if quantize_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantize_4bit=True (QLoRA) needs bitsandbytes: pip install bitsandbytes "
                          "(and a CUDA GPU); or use quantize_4bit=False")
    base = unwrap_model(model)
    if hasattr(model, "peft_config"):
        raise ValueError("this model already has peft adapters; prepare() takes a plain transformers model")
    # (alpha 0 would make LoRA a silent no-op: its scaling alpha / r multiplies the update and its gradients)
    for key, value, ok, allowed in (
            ("r", r, isinstance(r, numbers.Integral) and r >= 1, "an integer >= 1"),
            ("alpha", alpha, isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0, "a number > 0"),
            ("dropout", dropout, isinstance(dropout, numbers.Real) and 0 <= dropout < 1, "a number in [0, 1)")):
        if isinstance(value, bool) or not ok:
            raise ValueError(f"lora {key} must be {allowed}, got {value!r}")
    # numpy numbers as Python ones: json (save's longctx_lora.json) cannot write numpy.int64 / numpy.float32
    r, dropout = int(r), float(dropout)
    alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
    if target_modules is not None and not target_modules:
        raise ValueError("lora target_modules must name at least one module (or be None for the family's "
                         f"defaults: {target_modules_for(base) if base.config.model_type in TARGET_MODULES else 'none'})")
    targets = ([target_modules] if isinstance(target_modules, str) else list(target_modules)) if target_modules \
        else target_modules_for(base)
    if [t.lower() if isinstance(t, str) else t for t in targets] == ["all-linear"]:
        # peft's shorthand (it expands only a bare string, which the list above is not), expanded as peft does:
        # every Linear/Conv1D module but the output head
        from transformers.pytorch_utils import Conv1D

        head = base.get_output_embeddings()
        targets = [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
    if target_modules:  # peft only refuses targets of which *none* matches: a misspelt one was dropped silently
        modules = [n for n, _ in base.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if n and not n.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(f"lora target_modules {unmatched} match no module of this model (a target is a module "
                             f"name or the end of one after a dot, e.g. 'q_proj'); its modules include: "
                             f"{', '.join(leaves[:40])}")
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable or ())
    names = trainable_base_names(base, trainable)  # before peft renames the modules
    _check_targets(base, targets, trainable, names)
    if quantize_4bit:
        _quantize_4bit(base)
    params = dict(base.named_parameters())
    chosen = [params[n] for n in names]

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)  # freezes everything but the LoRA weights
    for p in chosen:
        p.requires_grad_(True)
    if quantize_4bit:  # fp32 norms/embedding and input grads for the k-bit base
        for p in chosen:
            p.data = p.data.float()

    peft_model.longctx_lora = {
        "r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets,
        "trainable": list(trainable), "quantize_4bit": quantize_4bit, "trainable_names": names,
        "tied_embeddings": _tied(base), "counts": trainable_summary(peft_model),
    }
    if verbose:
        print(format_summary(peft_model))
    return peft_model


def _tied(base: nn.Module) -> bool:
    out = base.get_output_embeddings()
    return out is not None and out.weight is base.get_input_embeddings().weight


def trainable_summary(model: nn.Module) -> dict:
    """Trainable parameter counts by kind: lora, embed, norm, other; plus trainable and total."""
    base = unwrap_model(model)
    embed = {id(p) for p in base.get_input_embeddings().parameters()}
    norm = {id(p) for m in base.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    counts = {"lora": 0, "embed": 0, "norm": 0, "other": 0, "trainable": 0, "total": 0}
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # DeepSpeed ZeRO-3 keeps an empty tensor in place
        n *= 2 if type(p).__name__ == "Params4bit" else 1  # 4-bit tensors pack two values a byte
        counts["total"] += n
        if not p.requires_grad:
            continue
        counts["trainable"] += n
        kind = ("lora" if "lora_" in name else "embed" if id(p) in embed else "norm" if id(p) in norm else "other")
        counts[kind] += n
    return counts


def format_summary(model: nn.Module) -> str:
    c = trainable_summary(model)
    parts = ", ".join(f"{k} {c[k]:,}" for k in ("lora", "embed", "norm", "other") if c[k])
    tied = " (embedding tied with lm_head)" if _tied(unwrap_model(model)) else ""
    return (f"trainable parameters: {c['trainable']:,} of {c['total']:,} "
            f"({100 * c['trainable'] / max(c['total'], 1):.2f}%): {parts or 'none'}{tied}")


def _quantize_4bit(base: nn.Module) -> None:
    """Replace every nn.Linear except the output head by a bitsandbytes NF4 Linear4bit (quantized
    when it lands on the GPU), then peft's k-bit preparation."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    device = next(base.parameters()).device
    if device.type != "cuda":
        raise ValueError("quantize_4bit=True needs the model on a CUDA device (bitsandbytes quantizes on "
                         f"the GPU); it is on {device}. Load it with device='cuda'.")
    if not getattr(base, "is_loaded_in_4bit", False):
        head = base.get_output_embeddings()
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        for module in list(base.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not nn.Linear or child is head:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, child_name, q.to(device))
        base.is_loaded_in_4bit = True
    prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def upcast_trainable(model: nn.Module, dtype=torch.float32) -> None:
    """Put the trainable tensors in ``dtype``: fp32 master weights when the frozen base is bf16/fp16 (small
    updates to bf16 embeddings and norms would round away; use with autocast, accelerate mixed precision), or
    the precision DeepSpeed trains in (``train.trainable_dtype``). Assigns ``.data``, so a tied lm_head stays
    the same Parameter."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


# ------------------------------------------------------------------------------- save and load
def _strip(name: str) -> str:
    """peft name -> the base model's state-dict name."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def trainable_base_state(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The trained non-LoRA tensors (embedding, norms) under the base model's own names. With
    ``state_dict`` (e.g. gathered by accelerate from a sharded model) the tensors come from it."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    recorded = [f"base_model.model.{n}" for n in getattr(model, "longctx_lora", {}).get("trainable_names", [])]
    names += [n for n in recorded if n not in names and n in dict(model.named_parameters())]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    return {_strip(n): source[n].detach().cpu().contiguous() for n in names}


def save(model: nn.Module, folder, state_dict: dict | None = None) -> Path:
    """Write the adapter (peft ``save_pretrained``: LoRA weights and config), ``trainable.safetensors``
    (embedding/norm tensors) and ``longctx_lora.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=False)
    extra = trainable_base_state(model, state_dict)
    if extra:
        save_file(extra, folder / TRAINABLE_FILE)
    else:  # an earlier save's tensors in this folder would be loaded as this model's
        (folder / TRAINABLE_FILE).unlink(missing_ok=True)
    info = {k: v for k, v in getattr(model, "longctx_lora", {}).items()}
    info["trainable_names"] = sorted(extra)
    (folder / LORA_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load(base: nn.Module, folder, *, merge: bool = False, is_trainable: bool = False):
    """Attach a saved adapter to a freshly loaded ``base`` model: the trained embedding/norm tensors
    are copied into it (through any weight tie), then the LoRA weights. Where ``longctx_lora.json``
    exists, only the tensors it records are loaded, and a folder missing any of them is refused
    (FileNotFoundError).
    ``merge=True`` returns the plain transformers model with LoRA merged into the weights
    (``merge_and_unload``)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / LORA_FILE).read_text()) if (folder / LORA_FILE).is_file() else None
    recorded = (info or {}).get("trainable_names", [])
    tensors = load_file(folder / TRAINABLE_FILE) if (folder / TRAINABLE_FILE).is_file() else {}
    if info is not None:  # save records exactly what it writes: others are an earlier save's (versions before
        tensors = {n: t for n, t in tensors.items() if n in recorded}  # 37672e3 left them behind), not this model's
    lost = [n for n in recorded if n not in tensors]  # e.g. trainable.safetensors not copied with the adapter
    if lost:
        raise FileNotFoundError(f"{folder}: {LORA_FILE} records trained tensors that {TRAINABLE_FILE} does not "
                                f"hold{'' if (folder / TRAINABLE_FILE).is_file() else ' (it is missing)'}: {lost[:5]}"
                                f"{' ...' if len(lost) > 5 else ''}; without them this is not the trained model. "
                                f"Copy the whole artifact folder")
    if tensors:
        missing = sorted(set(tensors) - set(base.state_dict()))
        if missing:
            raise ValueError(f"{folder / TRAINABLE_FILE} has tensors this model lacks: {missing[:5]}")
        with torch.no_grad():
            params = dict(base.named_parameters(remove_duplicate=False))
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].dtype))
    model = PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
    if info is not None:
        model.longctx_lora = info
        if is_trainable:
            params = dict(base.named_parameters())
            for name in model.longctx_lora.get("trainable_names", []):
                params[name].requires_grad_(True)
    if merge:
        return model.merge_and_unload()
    return model
