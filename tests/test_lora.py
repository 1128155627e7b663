"""longctx.lora: LoRA+ (LoRA on attention, trainable embedding and norms), tied embeddings, save/load/merge."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from longctx import lora

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a renamed transformers API


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def lora_names(layers, modules, prefix="base_model.model.model.layers", attn="self_attn"):
    return {f"{prefix}.{i}.{attn}.{m}.lora_{ab}.default.weight"
            for i in range(layers) for m in modules for ab in "AB"}


LLAMA_NORMS = {f"base_model.model.model.layers.{i}.{n}.weight" for i in range(2)
               for n in ("input_layernorm", "post_attention_layernorm")} | {"base_model.model.model.norm.weight"}


def test_llama_lora_plus_exact_names():
    model = lora.prepare(tiny_model("llama"), verbose=False)
    expected = (lora_names(2, ("q_proj", "k_proj", "v_proj", "o_proj")) | LLAMA_NORMS
                | {"base_model.model.model.embed_tokens.weight"})
    assert trainable(model) == expected
    counts = model.longctx_lora["counts"]
    # r * (in + out) per projection: q/o 64x64, k/v 64x32 (GQA, 2 of 4 heads), 2 layers
    assert counts["lora"] == 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2)
    assert counts["embed"] == 128 * 64 and counts["norm"] == 5 * 64 and counts["other"] == 0
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_plain_lora():
    model = lora.prepare(tiny_model("llama"), r=4, trainable=(), verbose=False)
    assert trainable(model) == lora_names(2, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 16


def test_gpt_neox_defaults_and_layernorm_bias():
    model = lora.prepare(tiny_model("gpt_neox"), verbose=False)
    pre = "base_model.model.gpt_neox"
    norms = {f"{pre}.layers.{i}.{n}.{w}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
             for w in ("weight", "bias")} | {f"{pre}.final_layer_norm.weight", f"{pre}.final_layer_norm.bias"}
    expected = (lora_names(2, ("query_key_value", "dense"), f"{pre}.layers", "attention") | norms
                | {f"{pre}.embed_in.weight"})
    assert trainable(model) == expected


def test_target_modules_override_and_unknown_family():
    base = tiny_model("llama")
    base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="'mystery'.*target_modules.*gpt_neox.*llama.*phi3"):
        lora.prepare(base, verbose=False)
    model = lora.prepare(base, target_modules=["q_proj", "v_proj"], trainable=(), verbose=False)
    assert trainable(model) == lora_names(2, ("q_proj", "v_proj"))


def test_qlora_needs_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="bitsandbytes"):
        lora.prepare(tiny_model("llama"), quantize_4bit=True, verbose=False)


def test_tied_embeddings_stay_tied_through_training_save_and_merge(tmp_path, ids):
    base = tiny_model("llama", tie_word_embeddings=True)
    before = base.model.embed_tokens.weight.detach().clone()
    model = lora.prepare(base, verbose=False)
    assert model.longctx_lora["tied_embeddings"]
    assert "base_model.model.lm_head.weight" not in trainable(model)  # one parameter, listed once
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert not torch.equal(base.model.embed_tokens.weight, before)  # it did train
    model.eval()
    with torch.no_grad():
        want = model(ids).logits

    lora.save(model, tmp_path / "adapter")
    # reloaded onto a fresh copy of the base: still tied, the trained values, the same logits
    fresh = tiny_model("llama", tie_word_embeddings=True)
    again = lora.load(fresh, tmp_path / "adapter").eval()
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.model.embed_tokens.weight, base.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
    # merged and saved as a plain model: tied after from_pretrained, same logits
    merged = lora.load(tiny_model("llama", tie_word_embeddings=True), tmp_path / "adapter", merge=True)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=0)


def test_upcast_trainable_keeps_tie():
    base = tiny_model("llama", tie_word_embeddings=True).to(torch.bfloat16)
    model = lora.prepare(base, verbose=False)
    lora.upcast_trainable(model)
    assert base.model.embed_tokens.weight.dtype == torch.float32 and base.lm_head.weight is base.model.embed_tokens.weight
    assert base.model.norm.weight.dtype == torch.float32
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16  # frozen: untouched


def test_prepare_refuses_what_could_not_be_merged():
    from longctx import lora

    tied = tiny_model("llama", tie_word_embeddings=True)
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight
    for targets in (["q_proj", "lm_head"], ["q_proj", "embed_tokens"]):
        with pytest.raises(ValueError, match=r"input and output embeddings are tied: merging would change both"):
            lora.prepare(tiny_model("llama", tie_word_embeddings=True), target_modules=targets, trainable=("norm",),
                         verbose=False)
    untied = tiny_model("llama", tie_word_embeddings=False)
    lora.prepare(untied, target_modules=["q_proj", "lm_head"], trainable=("norm",), verbose=False)  # fine
    with pytest.raises(ValueError, match=r"selects \['model.layers.0.self_attn.o_proj.weight'.* inside modules that"):
        lora.prepare(tiny_model("llama"), trainable=("embed", "o_proj"), verbose=False)
    prepared = lora.prepare(tiny_model("llama"), target_modules="q_proj", verbose=False)  # one name, not letters
    assert prepared.longctx_lora["target_modules"] == ["q_proj"]


def test_load_trainable_resumes_lora_plus_and_saves_it_again(tmp_path):
    # load(is_trainable=True) made only LoRA trainable and set no .longctx_lora, so saving again dropped the
    # trained embedding and norms
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 64), generator=g)
    model = lora.prepare(tiny_model("llama"), verbose=False)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight.add_(0.1)
        model.base_model.model.model.norm.weight.mul_(1.5)
    want = model.eval()(ids).logits
    lora.save(model, tmp_path / "a")
    again = lora.load(tiny_model("llama"), tmp_path / "a", is_trainable=True)
    assert trainable(again) == trainable(model) and again.longctx_lora["trainable"] == ["embed", "norm"]
    lora.save(again, tmp_path / "b")
    third = lora.load(tiny_model("llama"), tmp_path / "b").eval()
    assert torch.equal(third(ids).logits, want)
    assert trainable(lora.load(tiny_model("llama"), tmp_path / "b")) == set()  # not trainable unless asked


def test_empty_target_modules_is_refused():
    with pytest.raises(ValueError, match="target_modules must name at least one module"):
        lora.prepare(tiny_model("llama"), target_modules=[], verbose=False)


def test_summary_counts_zero3_partitioned_parameters():
    # under DeepSpeed ZeRO-3 a parameter's tensor is empty and its size is ds_numel: the summary showed only LoRA
    model = lora.prepare(tiny_model("llama"), verbose=False)
    want = lora.trainable_summary(model)
    for p in model.parameters():
        p.ds_numel, p.data = p.numel(), torch.empty(0, dtype=p.dtype)
    assert lora.trainable_summary(model) == want and want["total"] > want["trainable"] > want["lora"] > 0


def test_save_over_an_earlier_save_leaves_no_stale_trained_tensors(tmp_path, ids):
    # saving plain LoRA (or trainable=("norm",)) into a folder that held a LoRA+ save kept the old
    # trainable.safetensors; load copied its embedding into the base: another model than the one saved
    lora_plus = lora.prepare(tiny_model("llama"), verbose=False)
    with torch.no_grad():
        lora_plus.base_model.model.model.embed_tokens.weight.add_(0.5)
    lora.save(lora_plus, tmp_path / "a")
    plain = lora.prepare(tiny_model("llama"), trainable=(), verbose=False).eval()
    with torch.no_grad():
        plain.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.fill_(0.01)
        want = plain(ids).logits
    lora.save(plain, tmp_path / "a")
    again = lora.load(tiny_model("llama"), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


def test_settings_that_would_train_other_than_asked_are_refused():
    # a misspelt entry among target_modules was dropped silently (peft refuses only when *no* target matches):
    # LoRA on q/k/v without o; alpha=0 made LoRA a no-op (scaling alpha / r = 0: no update, no gradient)
    with pytest.raises(ValueError, match=r"lora target_modules \['o_prj'\] match no module of this model.*o_proj"):
        lora.prepare(tiny_model("llama"), target_modules=["q_proj", "k_proj", "v_proj", "o_prj"], verbose=False)
    for key, value, allowed in [("alpha", 0, "a number > 0"), ("alpha", -16, "a number > 0"),
                                ("r", 2.5, "an integer >= 1"), ("r", 0, "an integer >= 1"),
                                ("dropout", -0.1, r"a number in \[0, 1\)"), ("dropout", 1.0, r"a number in \[0, 1\)")]:
        with pytest.raises(ValueError, match=rf"lora {key} must be {allowed}, got {value!r}"):
            lora.prepare(tiny_model("llama"), verbose=False, **{key: value})
    with pytest.raises(TypeError, match="lora trainable must be strings"):
        lora.prepare(tiny_model("llama"), trainable=("norm", 5), verbose=False)
    model = lora.prepare(tiny_model("llama"), target_modules=["self_attn.q_proj", "lm_head"], trainable=(),
                         verbose=False)  # dotted suffixes and a top-level module still match
    assert trainable(model) == lora_names(2, ("q_proj",)) | {f"base_model.model.lm_head.lora_{ab}.default.weight"
                                                             for ab in "AB"}


def test_artifact_without_its_trained_tensors_is_refused(tmp_path, ids):
    # an artifact copied without trainable.safetensors (only the peft adapter files) loaded silently as LoRA on
    # the untrained embedding and norms: another model than the one trained
    import shutil

    model = lora.prepare(tiny_model("llama"), verbose=False)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight.add_(0.5)
    lora.save(model, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy", ignore=shutil.ignore_patterns(lora.TRAINABLE_FILE))
    with pytest.raises(FileNotFoundError, match=r"records trained tensors that trainable.safetensors does not hold "
                                                r"\(it is missing\): \['model.embed_tokens.weight', .*whole artifact"):
        lora.load(tiny_model("llama"), tmp_path / "copy")
    with torch.no_grad():  # the whole folder still loads, and plain LoRA (no trained tensors) too
        assert torch.equal(lora.load(tiny_model("llama"), tmp_path / "a").eval()(ids).logits, model.eval()(ids).logits)
    lora.save(lora.prepare(tiny_model("llama"), trainable=(), verbose=False), tmp_path / "plain")
    assert lora.load(tiny_model("llama"), tmp_path / "plain").longctx_lora["trainable_names"] == []


def test_trainable_by_a_tied_duplicates_name_selects_the_shared_matrix():
    # "lm_head" on a tied model was refused as matching no parameter (the tied weight is listed once, as the embedding)
    tied = tiny_model("llama", tie_word_embeddings=True)
    assert lora.trainable_base_names(tied, ("lm_head",)) == ["model.embed_tokens.weight"]
    untied = tiny_model("llama", tie_word_embeddings=False)
    assert lora.trainable_base_names(untied, ("lm_head",)) == ["lm_head.weight"]
    with pytest.raises(ValueError, match="matches no parameter"):
        lora.trainable_base_names(tied, ("no_such_part",))


def test_numpy_settings_save_and_all_linear_is_peft_shorthand(tmp_path):
    # prepare accepted numpy numbers (numbers.Integral / Real) but stored them as such: lora.save (the recipe's
    # artifact, at the very end of training) failed in json ("Object of type int64 is not JSON serializable");
    # target_modules="all-linear" (peft's shorthand) was refused as a target matching no module
    import json

    import numpy as np

    model = lora.prepare(tiny_model("llama"), r=np.int64(4), alpha=np.float32(8), dropout=np.float32(0.5),
                         verbose=False)
    lora.save(model, tmp_path / "a")
    info = json.loads((tmp_path / "a" / lora.LORA_FILE).read_text())
    assert (info["r"], info["alpha"], info["dropout"]) == (4, 8.0, 0.5)
    assert type(info["r"]) is int and lora.load(tiny_model("llama"), tmp_path / "a").peft_config["default"].r == 4
    for spec in ("all-linear", ["all-linear"]):
        model = lora.prepare(tiny_model("llama"), target_modules=spec, trainable=(), verbose=False)
        mlp = lora_names(2, ("gate_proj", "up_proj", "down_proj"), attn="mlp")
        assert trainable(model) == lora_names(2, ("q_proj", "k_proj", "v_proj", "o_proj")) | mlp  # not lm_head


def test_stale_trained_tensors_of_an_earlier_save_are_not_loaded(tmp_path, ids):
    # longctx before 37672e3 left an earlier save's trainable.safetensors behind when a plain LoRA model was saved
    # into the same folder; longctx_lora.json records that none belong to this model, yet load copied them in
    import shutil

    plus = lora.prepare(tiny_model("llama"), verbose=False)
    with torch.no_grad():
        plus.base_model.model.model.embed_tokens.weight.add_(0.5)
    lora.save(plus, tmp_path / "a")
    shutil.copy(tmp_path / "a" / lora.TRAINABLE_FILE, tmp_path / "stale")
    plain = lora.prepare(tiny_model("llama", seed=1), trainable=(), verbose=False).eval()
    lora.save(plain, tmp_path / "a")
    shutil.copy(tmp_path / "stale", tmp_path / "a" / lora.TRAINABLE_FILE)  # what the old save left
    loaded = lora.load(tiny_model("llama", seed=1), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, plain(ids).logits)
