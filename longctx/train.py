"""Shared training helpers for the fine-tuning recipes (``recipes/*.py``).

* config: YAML + ``key=value`` overrides (dotted keys reach into sections), checked against ``DEFAULTS``;
* data: pick documents (hold-outs by name), pack them into fixed-length sequences, and a deterministic
  sample order that depends only on the micro-step (so a data position is one integer);
* accelerate: the ``Accelerator`` for a config (bf16 where available, gradient accumulation, DeepSpeed
  batch settings), tracking (wandb, offline by default, and a ``log.jsonl``);
* held-out evaluation (``eval`` section): perplexity on the ``data.holdout`` documents every N optimizer
  steps, in eval mode (full attention), on the main process, leaving the training's RNG streams untouched;
* checkpoints with exact resume: ``accelerator.save_state`` (optimizer, scheduler, the RNG states of
  every process, and the model: only its *trainable* tensors outside FSDP/DeepSpeed) plus
  ``trainer_state.json`` (optimizer step and micro-step = data position), written last;
* the final artifact (adapter + trained embedding/norm tensors + ``longctx.json`` settings) and
  ``merge``: base model + RoPE method + adapter -> a plain transformers model folder
  (``longctx merge ARTIFACT --out DIR``; ``add_commands`` wires it into the CLI).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import lora
from .data import select_documents as select_documents_by_name
from .utils import compile_layers, uncompile_layers  # noqa: F401  (train.compile)
from .utils import decode_nonfinite, encode_nonfinite, strict_dumps

# --------------------------------------------------------------------------------------- config
DEFAULTS: dict = {
    "model": "smollm2-135m",  # load_model argument: alias, local HF folder, .gguf file or hub id
    "dtype": None,  # weights as loaded: null (checkpoint's own), bf16, fp16, fp32
    "attn_implementation": "sdpa",
    "target_length": 32768,  # the context length to train for
    # method: linear (pi), ntk, yarn, abf or none; + the method's options; factor defaults to target / trained length
    "rope": {"method": "linear"},
    # auto: on if the s2attn method is registered; + its options (train_only must stay true: full attention in eval)
    "s2attn": {"enabled": "auto"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None, "trainable": ["embed", "norm"],
             "quantize_4bit": False},
    "data": {"corpus": ["austen"], "holdout": [], "seq_len": None},  # seq_len null: target_length
    "train": {
        "steps": 1000,  # optimizer steps
        "micro_batch_size": 1,  # sequences per process per forward
        "gradient_accumulation_steps": 8,
        "global_batch_size": None,  # if set: accumulation = global / (micro_batch_size * processes)
        "lr": 2e-5, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8,
        "warmup_steps": 20, "lr_scheduler": "constant",  # constant, cosine or linear (all after linear warmup)
        "max_grad_norm": 1.0,
        "gradient_checkpointing": True,
        "gc_every": 0,  # N > 0: automatic GC off while training, young generations every step, all every N
        "compile": False,  # true or a dict of torch.compile arguments: compile each decoder layer (GPU)
        "compile_scope": "parts",  # parts: each layer's attention, MLP, norms; layer: each whole layer, one graph
        "mixed_precision": "auto",  # auto: bf16 on a GPU that has it, else no; or no, bf16, fp16
        "seed": 42,
        "checkpoint_every": 100,  # optimizer steps; the last step is always checkpointed
        "keep_checkpoints": 2,
        "log_every": 1,
    },
    "output_dir": "runs/longlora",
    "resume": False,  # true: continue from the latest checkpoint in output_dir/checkpoints
    "resume_from": None,  # or a checkpoint folder
    # false/null: off; mode: one of WANDB_MODES (None: $WANDB_MODE if set, else offline)
    "wandb": {"project": "longctx", "mode": None, "name": None},
    "make_tiny": None,  # tests/CPU demo: build a tiny random model and corpus (see make_tiny)
    # held-out perplexity during training (see HeldoutEval); every: 0 = off
    "eval": {
        "every": 0,  # optimizer steps between evaluations; also at step 0 (fresh runs) and at the last step
        "lengths": None,  # window lengths; null: [target_length]
        "max_tokens": None,  # truncate EACH held-out document to this many tokens (as longctx ppl --max-tokens)
        "corpus": None,  # where the data.holdout documents are read from; null: data.corpus
        "score": "tail",  # tail: the last quarter of each window (longctx ppl --score tail); or all
        "dtype": "auto",  # autocast dtype: auto (the training's mixed precision), bf16, fp16, fp32 (none)
        "keep_best": False,  # true: save the artifact with the lowest perplexity (longest length) to output_dir/best
    },
}
_OPEN_SECTIONS = ("rope", "s2attn", "wandb", "make_tiny")  # extra keys are passed on as options
_OPEN_OPTIONS = ("train.compile",)  # a mapping of torch.compile arguments (checked by compile_setting)
WANDB_MODES = ("offline", "online", "disabled", "shared")


def load_config(path: str | os.PathLike | None, overrides=()) -> dict:
    """``DEFAULTS`` updated with the YAML file, then with ``key=value`` overrides (values parsed as
    YAML: ``train.steps=50``, ``data.holdout=[Emma]``, ``wandb=false``). Unknown keys are errors."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        _update(cfg, loaded, "")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        *parents, leaf = key.strip().split(".")
        patch = {leaf: yaml.safe_load(value)}
        for parent in reversed(parents):
            patch = {parent: patch}
        _update(cfg, patch, "")
    check_config(cfg)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(cfg: dict) -> None:
    """Types and ranges of the settings, before anything is loaded: errors name the key and what it allows.
    A single string where a list is expected (``data.holdout=Emma``) becomes a one-item list."""
    def need(ok: bool, key: str, allowed: str, value) -> None:
        if not ok:
            raise ValueError(f"config key {key!r} must be {allowed}, got {value!r}")

    for section in ("train", "data", "lora"):  # not a TypeError below ('NoneType' object is not subscriptable)
        need(isinstance(cfg[section], dict), section, "a mapping of its settings", cfg[section])
    need(cfg["eval"] in (None, False) or isinstance(cfg["eval"], dict), "eval",
         "a mapping of its settings, false or null (no held-out evaluation)", cfg["eval"])
    need(cfg["make_tiny"] in (None, False) or isinstance(cfg["make_tiny"], dict), "make_tiny",
         "null, false or a mapping of make_tiny arguments", cfg["make_tiny"])
    t, d, lo = cfg["train"], cfg["data"], cfg["lora"]
    for key in ("steps", "micro_batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every"):
        need(_is_int(t[key]) and t[key] >= 1, f"train.{key}", "an integer >= 1", t[key])
    for key in ("warmup_steps", "keep_checkpoints", "gc_every"):
        need(_is_int(t[key]) and t[key] >= 0, f"train.{key}", "an integer >= 0" +
             (" (0: keep all)" if key == "keep_checkpoints" else ""), t[key])
    need(t["global_batch_size"] is None or (_is_int(t["global_batch_size"]) and t["global_batch_size"] >= 1),
         "train.global_batch_size", "null or an integer >= 1", t["global_batch_size"])
    need(_is_int(t["seed"]), "train.seed", "an integer", t["seed"])
    need(_is_real(t["lr"]) and t["lr"] > 0, "train.lr", "a number > 0", t["lr"])
    for key in ("weight_decay", "eps", "max_grad_norm"):
        need(_is_real(t[key]) and t[key] >= 0, f"train.{key}", "a number >= 0", t[key])
    b = t["betas"]
    need(isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_real(x) and 0 <= x < 1 for x in b),
         "train.betas", "two numbers in [0, 1), e.g. [0.9, 0.95]", b)
    need(isinstance(t["gradient_checkpointing"], bool), "train.gradient_checkpointing", "true or false",
         t["gradient_checkpointing"])
    need(_is_int(cfg["target_length"]) and cfg["target_length"] >= 2, "target_length", "an integer >= 2",
         cfg["target_length"])
    need(d["seq_len"] is None or (_is_int(d["seq_len"]) and d["seq_len"] >= 2), "data.seq_len",
         "null (target_length) or an integer >= 2", d["seq_len"])
    for section, key in (("data", "corpus"), ("data", "holdout"), ("lora", "trainable"), ("lora", "target_modules")):
        value = cfg[section][key]
        if isinstance(value, str):
            cfg[section][key] = value = [value]
        need(value is None and key == "target_modules" or isinstance(value, (list, tuple))
             and all(isinstance(x, str) for x in value), f"{section}.{key}",
             "a list of strings" + (" or null" if key == "target_modules" else ""), value)
    need(_is_int(lo["r"]) and lo["r"] >= 1, "lora.r", "an integer >= 1", lo["r"])
    need(_is_real(lo["alpha"]) and lo["alpha"] > 0, "lora.alpha", "a number > 0", lo["alpha"])
    need(_is_real(lo["dropout"]) and 0 <= lo["dropout"] < 1, "lora.dropout", "a number in [0, 1)", lo["dropout"])
    need(isinstance(lo["quantize_4bit"], bool), "lora.quantize_4bit", "true or false", lo["quantize_4bit"])
    need(isinstance(cfg["resume"], bool), "resume", "true or false", cfg["resume"])
    if t["mixed_precision"] is False:  # YAML 1.1 reads an unquoted no as false
        t["mixed_precision"] = "no"
    need(t["mixed_precision"] in ("auto", "no", "bf16", "fp16"), "train.mixed_precision", "auto, no, bf16 or fp16",
         t["mixed_precision"])
    need(t["lr_scheduler"] in SCHEDULERS, "train.lr_scheduler", " or ".join(SCHEDULERS), t["lr_scheduler"])
    from .models import DTYPES
    need(cfg["dtype"] is None or isinstance(cfg["dtype"], str) and cfg["dtype"].lower() in DTYPES, "dtype", f"null or one of {', '.join(DTYPES)}", cfg["dtype"])
    if cfg["s2attn"] in (False, None):  # s2attn: false / null = off
        cfg["s2attn"] = {"enabled": False}
    need(isinstance(cfg["s2attn"], dict), "s2attn", "a mapping of options, false or null", cfg["s2attn"])
    rope = cfg.get("rope") or {}
    need(isinstance(rope, dict), "rope", "a mapping of options or null", rope)
    need(rope.get("method") != "dynamic_ntk", "rope.method", "a method for training (linear, ntk, yarn, abf or "
         "none); dynamic_ntk is for inference only: its rotary state grows with the longest input seen, so "
         "evaluations would change training and resume would not be exact", rope.get("method"))
    method = rope.get("method")
    if method is None or method is False or method == "none":  # no RoPE method (rope_options: a falsy one too)
        extra = sorted(k for k in rope if k != "method")  # rope_options then applies nothing: silently ignored
        if extra:
            raise ValueError(f"config key 'rope' options {extra} do nothing without a rope.method (it is {method!r}): "
                             f"name the method (e.g. rope.method=linear) or drop them")
    else:  # not the s2attn or streaming patch (applied in the rope slot, trained with, recorded and merged)
        need(isinstance(method, str) and method in training_rope_methods(), "rope.method",
             f"a RoPE method for training ({', '.join(training_rope_methods())}) or none", method)
        # its options as longctx.apply checks them, once the model has loaded; the factor (default: target /
        # trained length) and abf's max_position_embeddings (default: target_length) are filled in as rope_options does
        options = {k: v for k, v in rope.items() if k != "method"}
        if options.get("factor") is None and "factor" in _option_names(method):
            options["factor"] = 2  # (a stand-in: the trained length is known once the model has loaded)
        if method == "abf" and options.get("max_position_embeddings") is None:
            options["max_position_embeddings"] = cfg["target_length"]
        _check_options("rope", method, options)
    enabled = cfg["s2attn"].get("enabled", "auto")
    need(isinstance(enabled, bool) or enabled == "auto", "s2attn.enabled", "true, false or auto", enabled)
    # S2 in eval mode too would make the held-out evaluation sparse, and the merged model (no S2) not the trained one
    need(enabled is False or cfg["s2attn"].get("train_only", True) is True, "s2attn.train_only",
         "true (S2-Attn in training only: the held-out evaluation and the merged model use full attention)",
         cfg["s2attn"].get("train_only"))
    if enabled is not False and s2attn_available():  # (off: its options are left as they are, unused)
        _check_options("s2attn", "s2attn", {k: v for k, v in cfg["s2attn"].items() if k != "enabled"})
    w = cfg["wandb"]  # a string (wandb=online, wandb=disabled) would have meant wandb on, offline
    need(w is None or isinstance(w, bool) or isinstance(w, dict) and all(isinstance(k, str) for k in w), "wandb",
         "a mapping of wandb.init settings (e.g. {project: longctx, mode: offline}), true, false or null", w)
    if isinstance(w, dict):
        need(w.get("mode") in (None, *WANDB_MODES), "wandb.mode", " or ".join(WANDB_MODES), w.get("mode"))


def _option_names(method: str) -> set[str]:
    import dataclasses

    from . import registry

    return {f.name for f in dataclasses.fields(registry.get_method(method).options)}


def _check_options(section: str, method: str, options: dict) -> None:
    """The options of config section ``section`` (method ``method``) as ``longctx.apply`` would check them."""
    from . import registry

    try:
        registry.make_options(registry.get_method(method), **options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key {section!r}: {err}") from None


def training_rope_methods() -> list[str]:
    """The registered RoPE methods (and aliases) the recipe trains with: all but dynamic_ntk (inference only)."""
    from . import registry

    rope = [registry.get_method(name) for name in registry.methods() if name != "dynamic_ntk"]
    rope = [m for m in rope if getattr(m.patch, "slot", None) == "rope"]
    return sorted({name for m in rope for name in (m.name, *m.aliases)})


def _update(cfg: dict, new: dict, where: str) -> None:
    for key, value in new.items():
        name = f"{where}{key}"
        if key not in cfg and not (where and where.rstrip(".") in _OPEN_SECTIONS + _OPEN_OPTIONS):
            raise ValueError(f"unknown config key {name!r}; known keys here: {', '.join(cfg)}")
        if (not where and key not in _OPEN_SECTIONS and isinstance(DEFAULTS.get(key), dict)
                and isinstance(value, dict) and not isinstance(cfg.get(key), dict)):
            # a section set to false/null (eval: false), then given settings (eval.every=5): its keys are
            # checked against the defaults again, which fill in the rest (not a mapping of the given keys only)
            cfg[key] = copy.deepcopy(DEFAULTS[key])
        if isinstance(cfg.get(key), dict) and isinstance(value, dict):
            _update(cfg[key], value, f"{name}.")
        else:
            cfg[key] = _as_number(name, value, cfg.get(key), bool(where) and where.rstrip(".") in _OPEN_SECTIONS)


def _as_number(name: str, value, default, open_section: bool = False):
    """YAML reads ``5e-5`` or ``1e1`` (no dot) as a string: where the default is a number, or in an open
    section (rope, s2attn options), a string that reads as a number is one (an integer if it is one)."""
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    if not isinstance(value, str) or not (numeric_default or open_section):
        return value
    try:
        number = float(value)
    except ValueError:
        if open_section:
            return value
        raise ValueError(f"config key {name!r} must be a number, got {value!r}") from None
    return int(number) if number.is_integer() and isinstance(default, int) else number


# ------------------------------------------------------------------- methods, schedule
SCHEDULERS = ("constant", "cosine", "linear")


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warmup from 0, then ``constant``, ``cosine`` (to 0 at ``total_steps``) or ``linear`` decay."""
    if name not in SCHEDULERS:
        raise ValueError(f"train.lr_scheduler must be constant, cosine or linear; got {name!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rope_options(cfg: dict, trained_length: int) -> tuple[str, dict] | None:
    """(method, options) of the config's RoPE method; ``factor`` defaults to target / trained length."""
    import dataclasses

    from . import registry

    rope = dict(cfg.get("rope") or {})
    method = rope.pop("method", None)
    if not method or method == "none":
        return None
    fields = {f.name for f in dataclasses.fields(registry.get_method(method).options)}
    if "factor" in fields and rope.get("factor") is None:
        factor = cfg["target_length"] / trained_length
        rope["factor"] = int(factor) if float(factor).is_integer() else factor
    if method == "abf" and rope.get("max_position_embeddings") is None:  # the merged config's context limit
        rope["max_position_embeddings"] = cfg["target_length"]
    return method, rope


def s2attn_available() -> bool:
    """Whether the ``s2attn`` method is registered (its module is imported if need be)."""
    import importlib

    from . import registry

    if "s2attn" not in registry.methods():
        try:
            importlib.import_module("longctx.methods.s2attn")
        except ImportError:
            return False
    return "s2attn" in registry.methods()


def s2attn_options(cfg: dict) -> dict | None:
    """Options for the s2attn method, or None when it is off (``enabled: auto``: on if registered)."""
    s2 = dict(cfg.get("s2attn") or {})
    enabled = s2.pop("enabled", "auto")
    available = s2attn_available()
    if enabled == "auto":
        if not available:
            print("s2attn is not available in this longctx: training with full attention", file=sys.stderr)
        enabled = available
    if not enabled:
        return None
    if not available:
        raise ValueError("s2attn.enabled is true but this longctx has no 's2attn' method; set s2attn.enabled=false")
    return s2


# ----------------------------------------------------------------------------------------- data
def select_documents(docs, holdout=()) -> list:
    """``docs`` without the held-out ones (by name; each name must match exactly one document)."""
    held, rest = select_documents_by_name(docs, list(holdout or []), "data.holdout")
    if held and not rest:
        raise ValueError(f"data.holdout holds out every document of the corpus ({[d.name for d in held]}): "
                         f"nothing is left to train on")
    return rest


def pack_documents(tokenizer, docs, seq_len: int) -> torch.Tensor:
    """Concatenate the documents' tokens with EOS after each document and cut the stream into
    ``[n, seq_len]`` sequences (the remainder is dropped)."""
    from .data import encode_documents

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    eos = torch.tensor([tokenizer.eos_token_id])
    parts = []
    for ids in encode_documents(tokenizer, docs):
        parts += [ids, eos]
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the training documents have {len(stream):,} tokens, fewer than one "
                         f"sequence of {seq_len:,}")
    return stream[: n * seq_len].view(n, seq_len)


def sample_indices(n: int, micro_step: int, rank: int, world: int, batch_size: int, seed: int) -> list[int]:
    """Which of ``n`` packed sequences process ``rank`` trains on at ``micro_step``. Epoch e visits
    the sequences in the order ``randperm(n)`` seeded with ``seed + e``; the micro-steps of all
    processes walk through that order without overlap. Depends on nothing else: resuming at a
    micro-step resumes the data exactly. (Known: seed s's epoch e is seed s+1's epoch e-1, so runs with
    consecutive seeds differ in their first epoch's order only; for a seed study use seeds further apart
    than the number of epochs.
    Kept because the committed LongLoRA runs were trained with this order.)"""
    out, perms = [], {}
    start = (micro_step * world + rank) * batch_size
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perms[epoch][i]))
    return out


# ---------------------------------------------------------------------------------- accelerate
def make_accelerator(cfg: dict):
    """An ``Accelerator`` for the config. Mixed precision ``auto`` = bf16 on a CUDA device that has
    it, else none. The LR scheduler is stepped by the recipe once per optimizer step (accelerate's
    default would step it once per process). Re-creating one in the same process (tests) starts
    from a clean accelerate state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    t = cfg["train"]
    precision = t["mixed_precision"]
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    AcceleratorState._reset_state()  # keeps the process group (PartialState)
    GradientState._reset_state()
    world = int(os.environ.get("WORLD_SIZE", 1))
    accumulation = t["gradient_accumulation_steps"]
    if t.get("global_batch_size"):
        per_step = t["micro_batch_size"] * world
        if t["global_batch_size"] % per_step:
            raise ValueError(f"train.global_batch_size {t['global_batch_size']} is not a multiple of "
                             f"micro_batch_size x processes = {per_step}")
        accumulation = t["global_batch_size"] // per_step
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accumulation,
                              step_scheduler_with_optimizer=False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no dataloader tells it these
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = t["micro_batch_size"]
        ds["gradient_accumulation_steps"] = accumulation
        ds["train_batch_size"] = t["micro_batch_size"] * accumulation * accelerator.num_processes
        ds["gradient_clipping"] = t["max_grad_norm"] or 0.0
    return accelerator


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing on the transformers model inside ``model``."""
    from .registry import unwrap_model

    base = unwrap_model(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class ManualGC:
    """Python's automatic garbage collection off while training (``train.gc_every``): after every
    optimizer step a collection of the young generations (cheap; a reference cycle that became garbage
    during the step is freed at its end), and a full ``gc.collect()`` every ``every`` steps (anything
    older). 0 leaves the collector as it was. torchtitan does much the same. Why: with transformers,
    peft and compiled kernels loaded the heap holds about half a million objects, and an automatic full
    collection stops the host for hundreds of ms. Measured on the H100 (benchmarks/README.md): one of
    5 timed SmolLM2 steps at 16k (median 327 ms) held a 265 ms generation-2 collection. In the SmolLM2
    recipe (32k, 20 steps, experiments/longlora_gc) it changed nothing measurable: median step 1.506 s
    with ``gc_every: 10`` against 1.496 s with automatic GC, the same losses; each full collection took
    about 0.3 s (steps 10 and 20); with automatic GC one step (13) took 0.5 s longer than the median,
    likely a collection. Off by default. Written for CPython <= 3.13's generational collector
    (3.14's incremental one also scans part of the old generation in ``gc.collect(1)``; untested)."""

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"train.gc_every must be an integer >= 0 (0: Python's automatic GC), got {every!r}")
        self.every, self.was_enabled = every, None

    def __enter__(self) -> "ManualGC":
        if self.was_enabled is not None:
            raise RuntimeError("ManualGC is not reentrant")
        self.was_enabled = gc.isenabled()
        if self.every:
            gc.collect()
            gc.disable()
        return self

    def step(self, step: int) -> None:
        if self.every:
            gc.collect() if step % self.every == 0 else gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self.every and self.was_enabled:
            gc.enable()
        self.was_enabled = None


def compile_setting(cfg: dict, accelerator=None) -> dict | None:
    """``train.compile`` as torch.compile keyword arguments (true or a dict, ``{}`` included: on), or
    None when off (false/null). Checked against the accelerator's distributed type when given."""
    from .utils import compile_options

    from .utils import COMPILE_SCOPES

    scope = cfg["train"].get("compile_scope", "parts")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"train.compile_scope must be one of {', '.join(repr(s) for s in COMPILE_SCOPES)}, "
                         f"got {scope!r}")
    value = cfg["train"]["compile"]
    if value is False or value is None:
        return None
    options = compile_options(value)
    if accelerator is not None:
        check_compile(accelerator)
    return options


def checkpoints_inside_forward(layer) -> bool:
    """Whether transformers wraps this layer class's ``forward`` with its checkpointing (newer versions; older ones
    override ``__call__``). The wrapper carries the original's name (functools.wraps), not its code."""
    code = getattr(type(layer).forward, "__code__", None)
    return code is not None and code.co_name == "forward_with_checkpointing"


def graph_break_count() -> int:
    """How many graph breaks dynamo has counted in this process (``check_layer_graphs`` compares against it)."""
    import torch._dynamo.utils

    return sum(torch._dynamo.utils.counters["graph_break"].values())


def check_layer_graphs(model, scope: str, breaks_before: int = 0) -> bool:
    """After the first compiled step: warn (and return True) when ``compile_scope: layer`` most likely ran
    eagerly. Where transformers checkpoints inside the layer's ``forward`` (its newer versions), the
    checkpoint is traced into the layer's graph, and a graph break inside it (s2attn's general path:
    padding, packed documents, sliding windows shorter than the sequence, backend flash, or any backend off
    CUDA) makes dynamo run the whole layer eagerly.
    ``breaks_before``: ``graph_break_count()`` before the step (breaks counted earlier in the process do not count)."""
    import warnings

    from .utils import _decoder_layers

    layers = _decoder_layers(model)
    inside = any(checkpoints_inside_forward(layer) and getattr(layer, "gradient_checkpointing", False)
                 for layer in layers)
    if scope != "layer" or not inside or graph_break_count() <= breaks_before:
        return False
    warnings.warn("train.compile_scope 'layer': a graph break inside checkpointed decoder layers (e.g. s2attn's "
                  "general path: padding, packed documents, backend flash, any backend off CUDA); with this "
                  "transformers version "
                  "dynamo then runs those layers eagerly. Use train.compile_scope=parts, or s2attn backend flex or "
                  "sdpa (on CUDA) without padding (sliding-window layers shorter than the sequence always take "
                  "the general path)", stacklevel=2)
    return True


def check_compile(accelerator) -> None:
    """``train.compile`` is for one process or DDP: FSDP and DeepSpeed re-wrap the layers it compiled."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"train.compile is supported on one GPU and with DDP, not with "
                         f"{accelerator.distributed_type.value}; set train.compile=false")


def model_device(accelerator):
    """Where to load the model: the process's device, except under FSDP and DeepSpeed ZeRO-1/2 (CPU: they
    shard or place it). Under ZeRO-3 transformers partitions the weights while loading (zero.Init, since
    accelerate registers the DeepSpeed config whatever zero3_init_flag says) onto this process's GPU; moving
    the model to the CPU then made DeepSpeed gather each weight on the CPU."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return accelerator.device
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return "cpu"
    return accelerator.device


def trainable_dtype(accelerator):
    """The dtype the recipe gives the trained tensors before ``accelerator.prepare`` (``lora.upcast_trainable``),
    or None to leave them. Under mixed precision, fp32: master copies that small updates do not round away.
    Under DeepSpeed with mixed precision, DeepSpeed's own precision (bf16/fp16): it keeps the fp32 master weights
    itself, and ZeRO-3 requires every trained tensor in its precision (the weights it partitioned while loading
    are; LoRA's new tensors are fp32 and must follow)."""
    from accelerate.utils import DistributedType

    if accelerator.mixed_precision == "no":
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    return torch.float32


class Tracker:
    """Metrics to ``output_dir/log.jsonl`` (main process) and to wandb when enabled and installed. The lines
    are strict JSON: a non-finite metric (a NaN loss, an overflowed perplexity) is written as the string
    "Infinity", "-Infinity" or "NaN" (``longctx.utils.strict_dumps``); ``read_log`` turns it back."""

    def __init__(self, accelerator, cfg: dict, enabled_wandb: bool = True, start_step: int = 0):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(cfg["output_dir"]) / "log.jsonl"
        self.wandb = None
        if self.main and self.path.exists():  # keep the rows up to where this run starts (a fresh run: none;
            # its step-0 evaluation is made again, and rows of an abandoned run there are not this run's)
            rows = [r for r in read_log(cfg["output_dir"]) if r["step"] <= start_step] if start_step else []
            self.path.write_text("".join(strict_dumps(r) + "\n" for r in rows))
        settings = cfg.get("wandb")
        if not (self.main and enabled_wandb and settings):
            return
        try:
            import wandb
        except ImportError:
            print("wandb is not installed: logging to log.jsonl only (pip install wandb)", file=sys.stderr)
            return
        opts = dict(settings) if isinstance(settings, dict) else {}
        project = opts.pop("project", "longctx")
        # to this run's init, not os.environ (a later run in this process would inherit it)
        mode = opts.pop("mode", None) or os.environ.get("WANDB_MODE") or "offline"
        # the other settings are wandb.init's own; they may replace these defaults (dir, resume, ...)
        self.wandb = wandb.init(**{"config": cfg, "dir": cfg["output_dir"], "resume": "allow", **opts,
                                   "project": project, "mode": mode})

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(strict_dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_log(output_dir) -> list[dict]:
    """The rows of ``output_dir/log.jsonl``, with "Infinity", "-Infinity" and "NaN" back as floats (every
    logged value is a number)."""
    path = Path(output_dir) / "log.jsonl"
    return [decode_nonfinite(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------- held-out evaluation
EVAL_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
EVAL_SCORES = ("tail", "all")


def eval_settings(cfg: dict) -> dict | None:
    """The checked ``eval`` section, or None when held-out evaluation is off (``every`` 0 or absent)."""
    e = {**DEFAULTS["eval"], **(cfg.get("eval") or {})}
    every = e["every"] or 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"eval.every must be an integer >= 0 (0: no held-out evaluation), got {every!r}")
    if every == 0:
        return None
    if not cfg["data"]["holdout"]:
        raise ValueError("eval.every > 0 evaluates on the held-out documents, but data.holdout is empty: "
                         "name some documents there, or set eval.every=0")
    lengths = e["lengths"] or [cfg["target_length"]]
    if isinstance(lengths, int):
        lengths = [lengths]
    if not all(isinstance(L, int) and not isinstance(L, bool) and L >= 2 for L in lengths):
        raise ValueError(f"eval.lengths must be a list of integers >= 2, got {e['lengths']!r}")
    if e["max_tokens"] is not None and (not isinstance(e["max_tokens"], int) or e["max_tokens"] < max(lengths)):
        raise ValueError(f"eval.max_tokens must be null or an integer >= the longest of eval.lengths "
                         f"({max(lengths)}), got {e['max_tokens']!r}")
    if e["score"] not in EVAL_SCORES:
        raise ValueError(f"eval.score must be one of {', '.join(EVAL_SCORES)}; got {e['score']!r}")
    if e["score"] == "tail" and min(lengths) < 4:  # the last quarter of a shorter window is no token
        raise ValueError(f"eval.lengths with eval.score tail (the last quarter of each window) must be >= 4, got "
                         f"{min(lengths)}: lengthen it or set eval.score=all")
    if e["dtype"] not in EVAL_DTYPES:
        raise ValueError(f"eval.dtype must be one of {', '.join(EVAL_DTYPES)}; got {e['dtype']!r}")
    if not isinstance(e["keep_best"], bool):
        raise ValueError(f"eval.keep_best must be true or false, got {e['keep_best']!r}")
    return {**e, "every": every, "lengths": sorted(set(lengths))}


def load_heldout(cfg: dict, tokenizer, settings: dict) -> list[torch.Tensor]:
    """Token ids (1-D, one tensor per document, each cut to ``eval.max_tokens``) of the ``data.holdout``
    documents of ``eval.corpus`` (default: the training corpora), tokenized as ``longctx ppl`` does."""
    from .data import encode_documents, load_corpus

    corpora = settings["corpus"] or cfg["data"]["corpus"]
    corpora = [corpora] if isinstance(corpora, str) else list(corpora)
    docs = [d for c in corpora for d in load_corpus(c)]
    wanted = list(cfg["data"]["holdout"])
    chosen = select_documents_by_name(docs, wanted, f"eval: held-out documents (data.holdout) in eval.corpus {corpora}")[0]
    return encode_documents(tokenizer, chosen, max_tokens=settings["max_tokens"])


@contextlib.contextmanager
def preserve_rng(device):
    """Python, NumPy, torch CPU (and ``device``'s CUDA) random states are restored on exit: code run
    inside cannot shift the training's random streams (dropout, ...)."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class HeldoutEval:
    """Perplexity on the held-out documents during training (the ``eval`` config section).

    The model is put in eval mode, so S2-Attn (``train_only``) is inactive: full attention, as at
    inference. Scoring is ``longctx.eval.perplexity`` with non-overlapping windows (mode "chunks")
    and ``eval.score`` (default "tail": the last quarter of each window), the settings of
    ``longctx ppl --score tail``, under autocast to ``eval.dtype``. Only the main process evaluates
    (every other process waits for the result, which is broadcast to all); under DDP or DeepSpeed
    ZeRO-1/2 every process holds the whole model, so this is exact. FSDP and ZeRO-3 shard the
    weights and are refused. Nothing of the training changes: RNG states are restored, no gradient
    is made (inference mode), and the data order depends on the micro-step only.
    """

    def __init__(self, cfg: dict, accelerator, tokenizer):
        from accelerate.utils import DistributedType

        self.settings = eval_settings(cfg)
        if self.settings is None:
            raise ValueError("HeldoutEval needs eval.every > 0")
        sharded = accelerator.distributed_type == DistributedType.FSDP or (
            accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)
        if sharded:
            raise ValueError("eval.every > 0 evaluates the unsharded model on the main process; FSDP and DeepSpeed "
                             "ZeRO-3 shard the weights: use DDP or ZeRO-2, or set eval.every=0")
        self.accelerator = accelerator
        self.last_step = cfg["train"]["steps"]
        self.ids, error = None, None
        if accelerator.is_main_process:
            try:
                self.ids = load_heldout(cfg, tokenizer, self.settings)
                # a length with no full window would be logged as null at every evaluation
                short = [L for L in self.settings["lengths"] if not any(len(ids) >= L for ids in self.ids)]
                if short:
                    raise ValueError(f"eval: no held-out document (data.holdout) has {short[0]:,} tokens, the window "
                                     f"length of eval.lengths {short}: they have {[len(ids) for ids in self.ids]} "
                                     f"tokens{' (eval.max_tokens cuts them)' if self.settings['max_tokens'] else ''}; "
                                     f"hold out longer documents or shorten eval.lengths")
            except Exception as err:  # any type: the other processes must hear of it, or they wait in broadcast
                error = err
        if accelerator.num_processes > 1:  # every process stops: the others would wait in evaluate() for ever
            from accelerate.utils import broadcast_object_list

            said = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"])[0]
            if said is not None and error is None:
                raise ValueError(f"the main process could not load the held-out documents: {said}")
        if error is not None:
            raise error
        self.best: float | None = None  # lowest perplexity at the longest length so far

    @property
    def key_length(self) -> int:
        """The length whose perplexity decides the best artifact: the longest."""
        return self.settings["lengths"][-1]

    def due(self, step: int) -> bool:
        return step % self.settings["every"] == 0 or step == self.last_step

    def resume(self, rows: list[dict]) -> None:
        """Take the best perplexity so far from the log rows of the run being resumed (those up to the
        checkpoint's step). An output_dir/best saved after that step by the interrupted run stays until
        a better model replaces it."""
        key = str(self.key_length)
        seen = [r["heldout_ppl"][key] for r in rows if key in (r.get("heldout_ppl") or {})]
        seen = [v for v in seen if v is not None]
        self.best = min(seen) if seen else None

    def autocast(self):
        name = self.settings["dtype"]
        dtype = EVAL_DTYPES[name]
        if name == "auto":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=dtype)

    def __call__(self, model) -> tuple[dict, bool]:
        """Evaluate ``model`` (as returned by ``accelerator.prepare``); returns (metrics for the log,
        whether the perplexity at the longest length is the best so far), the same on every process.
        Metrics: ``heldout_ppl`` {length: ppl}, ``heldout_tokens`` {length: scored tokens}, ``eval_seconds``."""
        import time

        from accelerate.utils import broadcast_object_list

        from .eval.perplexity import perplexity
        from .registry import unwrap_model

        payload = [None, False]
        if self.accelerator.is_main_process:
            started = time.time()
            inner = unwrap_model(self.accelerator.unwrap_model(model))  # the transformers model (LoRA injected)
            was_training = model.training
            model.eval()  # S2-Attn off (train_only): full attention
            try:
                with preserve_rng(self.accelerator.device), self.autocast():
                    res = perplexity(inner, self.ids, self.settings["lengths"], mode="chunks",
                                     score=self.settings["score"], progress=False)
            finally:
                model.train(was_training)
            metrics = {"heldout_ppl": {str(L): r["ppl"] for L, r in res.items()},
                       "heldout_tokens": {str(L): r["tokens"] for L, r in res.items()},
                       "eval_seconds": time.time() - started}
            value = res[self.key_length]["ppl"]
            improved = value is not None and (self.best is None or value < self.best)
            payload = [metrics, improved]
        payload = broadcast_object_list(payload)
        metrics, improved = payload
        if improved:
            self.best = metrics["heldout_ppl"][str(self.key_length)]
        return metrics, improved


# --------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done by each process: the data position
    tokens: int = 0  # tokens trained on, all processes
    processes: int = 0  # processes of the run that wrote it (0: not recorded): micro_step is per process


STATE_FILE = "trainer_state.json"


def _only_trainable(models, weights, output_dir) -> None:
    """save_state pre-hook: keep only the trainable tensors of each model (LoRA, embed, norms);
    the frozen base comes from the base checkpoint on resume."""
    for i, state in enumerate(weights):  # empty under FSDP/DeepSpeed: they save the model themselves
        keep = {n for n, p in models[i].named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in state.items() if k in keep}


RUN_CONFIG = "run_config.json"
# what a resumed run must share with the run that wrote its checkpoint (logging, checkpointing, evaluation,
# wandb and output may change; train.steps too, under a constant schedule: check_resume; and
# train.gradient_checkpointing, train.compile: memory and speed, not the optimizer state, data or model)
RESUME_KEYS = ("model", "dtype", "attn_implementation", "target_length", "rope", "s2attn", "lora", "data", "make_tiny",
               "train.micro_batch_size", "train.gradient_accumulation_steps", "train.global_batch_size", "train.lr",
               "train.weight_decay", "train.betas", "train.eps", "train.warmup_steps", "train.lr_scheduler",
               "train.max_grad_norm", "train.seed", "train.mixed_precision")


def check_resume(folder, cfg: dict) -> None:
    """Refuse to resume from ``folder`` with settings that differ (``RESUME_KEYS``) from those the
    checkpoint was written with: optimizer and scheduler state would quietly keep the old ones, or
    the data and model would no longer match. Checkpoints without a saved config are not checked."""
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        return
    # compared with non-finite floats as strict_dumps writes them (a file written before that: bare Infinity/NaN)
    saved, now = encode_nonfinite(json.loads(path.read_text())), json.loads(strict_dumps(cfg, default=str))

    def get(c, key):
        for part in key.split("."):
            c = c.get(part) if isinstance(c, dict) else None
        return c
    diffs = [f"{key}: {get(saved, key)!r} -> {get(now, key)!r}" for key in RESUME_KEYS if get(saved, key) != get(now, key)]
    if get(now, "train.lr_scheduler") != "constant" and get(saved, "train.steps") != get(now, "train.steps"):
        diffs.append(f"train.steps: {get(saved, 'train.steps')!r} -> {get(now, 'train.steps')!r} (the "
                     f"{get(now, 'train.lr_scheduler')} schedule decays over train.steps)")
    if diffs:
        raise ValueError(f"resume: settings differ from the run that wrote {folder}: {'; '.join(diffs)}. Resume with "
                         f"the same settings (train.steps with a constant schedule, logging, checkpointing, eval, "
                         f"wandb, train.gradient_checkpointing and train.compile may change) or start a new "
                         f"output_dir")


def check_resumed_state(output_dir, state: TrainState, processes: int, steps: int | None = None) -> None:
    """After loading a checkpoint: refuse a different process count (the data position and the RNG states are
    per process), ``steps`` (train.steps) below the checkpoint's step (nothing would be trained, and the artifact
    would be the checkpoint's longer run) and later checkpoints in the same output_dir (a rollback: they would
    count as the newest, so pruning would delete the new ones, and resume=true would continue the abandoned run)."""
    if steps is not None and steps < state.step:
        raise ValueError(f"resume: train.steps={steps} is below the checkpoint's step {state.step}: set train.steps "
                         f">= {state.step}, or resume from an earlier checkpoint (resume_from=...)")
    if state.processes not in (0, processes):
        raise ValueError(f"resume: the checkpoint was written by {state.processes} processes, this run has "
                         f"{processes}: the data position and the per-process RNG states would not carry over")
    newer = [p for p in list_checkpoints(output_dir) if int(p.name.split("_")[1]) > state.step]
    if newer:
        raise FileExistsError(f"resume: {Path(output_dir) / 'checkpoints'} holds checkpoints after step {state.step} "
                              f"({', '.join(p.name for p in newer)}): delete them to roll back, or resume into "
                              f"another output_dir")


def save_checkpoint(accelerator, output_dir, state: TrainState, keep: int | None = None,
                    config: dict | None = None) -> Path:
    """``output_dir/checkpoints/step_NNNNNN``: accelerate state (model trainables, optimizer,
    scheduler, RNG of every process) + ``trainer_state.json`` (+ the run's ``config``, which
    ``check_resume`` compares). Keeps the newest ``keep``."""
    from accelerate.utils import DistributedType

    root = Path(output_dir) / "checkpoints"
    folder = root / f"step_{state.step:06d}"
    if not getattr(accelerator, "_longctx_hook", False):
        accelerator.register_save_state_pre_hook(_only_trainable)
        accelerator._longctx_hook = True
    kwargs = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        kwargs["exclude_frozen_parameters"] = True
    accelerator.save_state(str(folder), **kwargs)
    # every process has written its part (its random_states_N.pkl; shards): only then is the folder marked complete.
    # Without this, a run killed while another process was still writing left a listed checkpoint without that
    # process's RNG file, and accelerate's load_state resumes without it silently (not exact)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config is not None:
            (folder / RUN_CONFIG).write_text(strict_dumps(config, default=str, indent=1) + "\n")
        # written last (complete), whole or not at all: an interrupted write leaves no truncated state file
        partial = folder / (STATE_FILE + ".partial")
        partial.write_text(json.dumps(asdict(state)) + "\n")
        os.replace(partial, folder / STATE_FILE)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                (old / STATE_FILE).unlink(missing_ok=True)  # first: one half deleted is not listed as complete
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def load_checkpoint(accelerator, folder) -> TrainState:
    """Restore what ``save_checkpoint`` wrote into the prepared model/optimizer/scheduler and the
    RNGs; returns the TrainState to continue from."""
    from accelerate.utils import DistributedType

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    kwargs = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        kwargs["load_module_strict"] = False
    elif accelerator.distributed_type != DistributedType.FSDP:
        kwargs["strict"] = False  # the file holds the trainable tensors only
    accelerator.load_state(str(folder), **kwargs)
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


def resume_folder(cfg: dict) -> Path | None:
    """The checkpoint to resume from: ``resume_from``, else the latest one if ``resume``."""
    if cfg.get("resume_from"):
        return Path(cfg["resume_from"])
    found = list_checkpoints(cfg["output_dir"])
    if cfg.get("resume"):
        if found:
            return found[-1]
        print(f"resume: no checkpoint in {cfg['output_dir']}/checkpoints, starting fresh", file=sys.stderr)
    elif found:
        raise FileExistsError(f"{cfg['output_dir']} has checkpoints of an earlier run (up to {found[-1].name}): "
                              f"pass resume=true to continue it, or another output_dir (or delete them)")
    return None


# ----------------------------------------------------------------------------------- artifacts
SETTINGS_FILE = "longctx.json"


def save_artifact(accelerator, model, folder, settings: dict) -> Path:
    """The final artifact: peft adapter, ``trainable.safetensors`` (embedding/norm tensors),
    ``longctx.json`` (``settings``: base model, dtype, RoPE method and options, s2attn options,
    LoRA settings; strict JSON, a non-finite held-out perplexity as "Infinity"/"NaN": ``strict_dumps``).
    Call on every process (a sharded model is gathered)."""
    state_dict = accelerator.get_state_dict(model)
    folder = Path(folder)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        lora.save(unwrapped, folder, state_dict=state_dict)
        (folder / "README.md").unlink(missing_ok=True)  # peft's model card template
        (folder / SETTINGS_FILE).write_text(strict_dumps(settings, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return folder


def check_merge_paths(artifact, out) -> None:
    """A FileNotFoundError if ``artifact`` is no longctx artifact; a ValueError if ``out`` is not a folder of its own
    (the artifact's folder, or one holding another artifact or adapter: a model beside an adapter loads with it)."""
    artifact = Path(artifact)
    if not (artifact / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"{artifact} is not a longctx artifact (no {SETTINGS_FILE})")
    if Path(out).resolve() == artifact.resolve():  # a merged model beside its own adapter loads with LoRA twice
        raise ValueError(f"merge: --out {out} is the artifact folder itself; write the merged model to a folder "
                         f"of its own")
    beside = [f for f in ("adapter_config.json", SETTINGS_FILE, lora.LORA_FILE) if (Path(out) / f).is_file()]
    if beside:  # another artifact's folder (best/, another run's final/): the same, with that artifact's adapter
        raise ValueError(f"merge: --out {out} holds a LoRA artifact or adapter ({', '.join(beside)}): a merged model "
                         f"beside an adapter loads with that adapter on top; write it to a folder of its own")


def merge_artifact(artifact, out, *, base: str | None = None, dtype=None, device=None) -> Path:
    """Base model (recorded, or ``base``) + its RoPE method + the artifact's adapter and trained
    tensors, LoRA merged into the weights, saved with the tokenizer as a plain transformers model
    (its config carries the rope scaling, so ``AutoModelForCausalLM.from_pretrained(out)`` needs no
    longctx). Merged in float32, saved in ``dtype`` (default: the base model's dtype in training).
    ``out`` must be a folder of its own: the artifact's folder, or a folder holding another artifact or
    adapter, is refused (a model beside an adapter loads with that adapter on top)."""
    from . import registry
    from .models import DTYPES, load_model

    artifact = Path(artifact)
    check_merge_paths(artifact, out)
    settings = json.loads((artifact / SETTINGS_FILE).read_text())
    model, tokenizer = load_model(base or settings["base_model"], dtype=torch.float32, device=device)
    rope = settings.get("rope")
    if rope:
        registry.apply(model, rope["method"], **rope.get("options", {}))
    merged = lora.load(model, artifact, merge=True)
    target = dtype or settings.get("base_dtype") or "float32"
    merged = merged.to(DTYPES[target.lower()] if isinstance(target, str) else target)
    out = Path(out)
    merged.save_pretrained(out)
    if settings.get("target_length"):
        tokenizer.model_max_length = settings["target_length"]
    tokenizer.save_pretrained(out)
    return out


def cmd_merge(args) -> int:
    from .models import DTYPES
    if args.dtype is not None and args.dtype.lower() not in DTYPES:
        raise SystemExit(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    try:  # before the (slow) load of the base model; a message, not a traceback
        check_merge_paths(args.artifact, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"longctx merge: {err}") from None
    out = merge_artifact(args.artifact, args.out, base=args.base, dtype=args.dtype, device=args.device)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_commands(subparsers) -> None:
    """CLI: ``longctx merge ARTIFACT --out DIR``."""
    p = subparsers.add_parser("merge", help="merge a LongLoRA artifact into a plain transformers model folder")
    p.add_argument("artifact", help="the artifact folder a recipe wrote (OUTPUT_DIR/final)")
    p.add_argument("--out", required=True, help="folder for the merged model (not the artifact's folder, nor one "
                                                   "holding another artifact or adapter)")
    p.add_argument("--base", help="base model to use instead of the recorded one (alias, folder, .gguf, hub id)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: the base model's dtype in training)")
    p.add_argument("--device", default=None, help="where to merge (default: cuda when available)")
    p.set_defaults(func=cmd_merge)


# ------------------------------------------------------------------------------ tiny test setup
TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'!?-\n"
TINY_SENTENCES = [
    "the cat sat on the mat. ", "a dog ran far away, then came back home. ", "it is a truth universally acknowledged. ",
    "she walked to the village in the rain; ", "he said nothing at all! ", "one, two, three, four, five. ",
]


def make_tiny(model_dir, corpus_file, *, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, max_position_embeddings: int = 32, tie_word_embeddings: bool = True,
              documents=("Alpha", "Beta", "Gamma", "Held Out"), chars_per_document: int = 6000) -> None:
    """A tiny random llama with a character tokenizer in ``model_dir`` and a repetitive-text jsonl
    corpus in ``corpus_file`` (learnable within a few steps); each is made only if missing."""
    model_dir, corpus_file = Path(model_dir), Path(corpus_file)
    if not (model_dir / "config.json").is_file():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *TINY_CHARS])}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        tok.model_max_length = max_position_embeddings
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2, tie_word_embeddings=tie_word_embeddings)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    if not corpus_file.is_file():
        import random

        rng = random.Random(seed)
        corpus_file.parent.mkdir(parents=True, exist_ok=True)
        with open(corpus_file, "w") as f:
            for name in documents:
                text = ""
                while len(text) < chars_per_document:
                    text += rng.choice(TINY_SENTENCES)
                f.write(json.dumps({"name": name, "text": text}) + "\n")


__all__ = ["DEFAULTS", "load_config", "select_documents", "pack_documents", "sample_indices", "make_accelerator",
           "model_device", "Tracker", "read_log", "TrainState", "save_checkpoint", "list_checkpoints",
           "load_checkpoint", "resume_folder", "check_resume", "save_artifact", "merge_artifact", "add_commands", "make_tiny",
           "rope_options", "s2attn_options", "make_scheduler", "enable_activation_checkpointing", "compile_layers",
           "compile_setting", "check_layer_graphs", "checkpoints_inside_forward",
           "graph_break_count", "ManualGC", "check_compile",
           "uncompile_layers", "eval_settings", "load_heldout", "preserve_rng", "HeldoutEval"]
