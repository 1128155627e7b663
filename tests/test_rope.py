"""RoPE scaling: parity with transformers' own rope types, exact removal, save/reload, all families."""

import copy
import importlib

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import longctx
from conftest import ROPE_FAMILIES, TRAINED_LEN, build, tiny_config, tiny_model, twin

FACTOR = 4.0
# longctx method + options -> the transformers rope parameters that define the same model
NATIVE = {
    "linear": ({"factor": FACTOR}, {"rope_type": "linear", "factor": FACTOR}, TRAINED_LEN * 4),
    "dynamic_ntk": ({"factor": FACTOR}, {"rope_type": "dynamic", "factor": FACTOR}, TRAINED_LEN),
    "yarn": ({"factor": FACTOR}, {"rope_type": "yarn", "factor": FACTOR, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "original_max_position_embeddings": TRAINED_LEN}, TRAINED_LEN * 4),
    "abf": ({"rope_theta": 5e5}, {"rope_theta": 5e5}, TRAINED_LEN),
}
ALL_METHODS = [("linear", {"factor": 4}), ("pi", {"factor": 2}), ("ntk", {"factor": 4}),
               ("dynamic_ntk", {"factor": 4}), ("yarn", {"factor": 8, "beta_fast": 16, "attention_factor": 1.2}),
               ("abf", {"rope_theta": 1e6, "max_position_embeddings": 4 * TRAINED_LEN})]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def native_twin(model, rope_update, max_len):
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {**model.config.rope_parameters, **rope_update}
    cfg.max_position_embeddings = max_len
    return twin(model, cfg)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("method", list(NATIVE))
def test_parity_with_native_rope_type(family, method, ids):
    if family == "phi3" and method != "abf":
        pytest.skip("Phi3Config has no linear/dynamic/yarn rope types: see test_phi3_* below")
    model = tiny_model(family)
    before = logits(model, ids)
    options, rope_update, max_len = NATIVE[method]
    expected = logits(native_twin(model, rope_update, max_len), ids)

    with longctx.applied(model, method, **options):
        got = logits(model, ids)
        assert model.config.max_position_embeddings == max_len
    assert torch.equal(got, expected)
    assert not torch.equal(got, before)  # the method really changed the model
    assert torch.equal(logits(model, ids), before)


def test_dynamic_ntk_matches_plain_rope_within_trained_length(ids):
    model = tiny_model("llama")
    short = ids[:, :TRAINED_LEN]
    before = logits(model, short)
    with longctx.applied(model, "dynamic_ntk", factor=4):
        assert torch.equal(logits(model, short), before)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_ntk_frequencies(family):
    """Static NTK-aware: base * factor^(d/(d-2)); the highest frequency is kept, the lowest divided by factor."""
    model = tiny_model(family)
    rotary = model.base_model.rotary_emb
    old = rotary.inv_freq.double()
    d = 2 * old.numel()
    base = model.config.rope_parameters["rope_theta"]
    with longctx.applied(model, "ntk", factor=FACTOR):
        new = model.base_model.rotary_emb.inv_freq.double()
        expected = 1.0 / (base * FACTOR ** (d / (d - 2))) ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        torch.testing.assert_close(new, expected, rtol=1e-6, atol=0)
        assert new[0] == 1.0
        torch.testing.assert_close(new[-1], old[-1] / FACTOR, rtol=1e-6, atol=0)
        assert model.config.max_position_embeddings == 4 * TRAINED_LEN


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("method,options", ALL_METHODS)
def test_remove_is_bit_identical(family, method, options, ids):
    if family == "phi3" and method == "dynamic_ntk":
        pytest.skip("refused on phi3: test_phi3_refuses_dynamic_ntk")
    model = tiny_model(family)
    before = logits(model, ids)
    config_before = model.config.to_dict()
    rotary = model.base_model.rotary_emb
    patch = longctx.apply(model, method, **options)
    assert model.base_model.rotary_emb is not rotary
    assert model.config.longctx[0]["method"] == longctx.registry.get_method(method).name
    changed = logits(model, ids)
    patch.remove()
    assert not torch.equal(changed, before)
    assert model.base_model.rotary_emb is rotary
    assert model.config.to_dict() == config_before
    assert torch.equal(logits(model, ids), before)
    assert longctx.active_patches(model) == []


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3"])
@pytest.mark.parametrize("method,options", ALL_METHODS)
def test_save_and_reload_without_longctx(family, method, options, ids, tmp_path):
    if family == "phi3" and method == "dynamic_ntk":
        pytest.skip("refused on phi3: test_phi3_refuses_dynamic_ntk")
    model = tiny_model(family)
    longctx.apply(model, method, **options)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded, ids), expected)
    assert reloaded.config.longctx == model.config.longctx  # the record travels too
    assert longctx.active_patches(reloaded) == []


def test_bf16_model_parity(ids):
    model = tiny_model("llama").to(torch.bfloat16)
    expected = logits(native_twin(model, NATIVE["yarn"][1], 4 * TRAINED_LEN).to(torch.bfloat16), ids)
    with longctx.applied(model, "yarn", factor=FACTOR):
        assert model.base_model.rotary_emb.inv_freq.dtype == torch.bfloat16  # follows the cast model
        assert torch.equal(logits(model, ids), expected)


def test_per_layer_type_rope_rescales_full_attention_only(ids):
    model = tiny_model("gemma3_text")
    rotary = model.base_model.rotary_emb
    before = logits(model, ids)
    params = copy.deepcopy(model.config.rope_parameters)
    params["full_attention"].update(rope_type="yarn", factor=FACTOR, original_max_position_embeddings=TRAINED_LEN,
                                    beta_fast=32.0, beta_slow=1.0)
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters, cfg.max_position_embeddings = params, 4 * TRAINED_LEN
    expected = logits(twin(model, cfg), ids)
    with longctx.applied(model, "yarn", factor=FACTOR):
        new = model.base_model.rotary_emb
        assert torch.equal(new.sliding_attention_inv_freq, rotary.sliding_attention_inv_freq)
        assert not torch.equal(new.full_attention_inv_freq, rotary.full_attention_inv_freq)
        assert torch.equal(logits(model, ids), expected)
    assert torch.equal(logits(model, ids), before)
    with longctx.applied(model, "linear", factor=2, layer_types=("sliding_attention", "full_attention")):
        new = model.base_model.rotary_emb
        torch.testing.assert_close(new.sliding_attention_inv_freq, rotary.sliding_attention_inv_freq / 2)
    with pytest.raises(ValueError, match="layer_types"):
        longctx.apply(model, "linear", factor=2, layer_types=("chunked_attention",))


def test_nested_rope_keys_without_the_config_method():
    # transformers 5.17 configs have no nested_rope_parameter_keys (5.2x added it): gemma3's nested rope_parameters
    # were read there as one flat configuration and every RoPE method failed on it
    # (test_per_layer_type_rope_rescales_full_attention_only on 5.17). longctx.methods.rope.nested_rope_keys then
    # applies the same rule itself; here against transformers' own answer, through a config without the method
    from longctx.methods.rope import nested_rope_keys

    class Old:  # a config as transformers 5.17 has it
        def __init__(self, config):
            self._config = config

        def __getattr__(self, name):
            if name == "nested_rope_parameter_keys":
                raise AttributeError(name)
            return getattr(self._config, name)

    configs = [tiny_config("gemma3_text"), tiny_config("llama"),
               tiny_config("gemma3_text", layer_types=["full_attention"] * 2),  # declared layer types only
               tiny_config("qwen2", layer_types=["full_attention", "sliding_attention"], use_sliding_window=True),
               AutoConfig.for_model("olmo3", num_hidden_layers=4)]
    expected = [["sliding_attention", "full_attention"], [], ["full_attention"], [],
                ["sliding_attention", "full_attention"]]
    for config, want in zip(configs, expected):
        params = config.rope_parameters
        assert nested_rope_keys(Old(config), params) == want
        if hasattr(config, "nested_rope_parameter_keys"):  # transformers >= 5.2x
            assert nested_rope_keys(Old(config), params) == config.nested_rope_parameter_keys(params)
            assert nested_rope_keys(config, params) == config.nested_rope_parameter_keys(params)


def test_layer_types_no_layer_has_are_refused_clearly():
    # rope_parameters of gemma3 carry both layer types whichever the layers are; asking for one that no layer has
    # (the default full_attention on a model with sliding layers only) got an AttributeError from inside the patch
    # (the rotary module has no frequencies for it), not the error that says which layer types have RoPE
    for kinds, missing in ((["sliding_attention"] * 2, "full_attention"),
                           (["full_attention"] * 2, "sliding_attention")):
        model = tiny_model("gemma3_text", layer_types=kinds)
        config_before = model.config.to_dict()
        with pytest.raises(ValueError, match=rf"option 'layer_types': \['{missing}'\] have no RoPE in this model; "
                                             rf"layer types with RoPE: \['{kinds[0]}'\]"):
            longctx.apply(model, "yarn", factor=FACTOR, layer_types=[missing])
        assert model.config.to_dict() == config_before and longctx.active_patches(model) == []
        with longctx.applied(model, "yarn", factor=FACTOR, layer_types=[kinds[0]]):
            assert model.config.rope_parameters[kinds[0]]["rope_type"] == "yarn"
    with pytest.raises(ValueError, match=r"\['full_attention'\] have no RoPE"):  # the default layer type
        longctx.apply(tiny_model("gemma3_text", layer_types=["sliding_attention"] * 2), "linear", factor=2)


@pytest.mark.parametrize("family, options", [("llama", {}),
                                             ("gemma3_text", {"layer_types": ["full_attention", "sliding_attention"]})])
def test_reset_rotary_state_undoes_dynamic_growth(family, options, ids):
    # transformers' dynamic rope keeps the frequencies of a longer input: a shorter one after it gives other
    # logits than on a fresh model. reset_rotary_state puts them back (per layer type on gemma3)
    from longctx.methods.rope import reset_rotary_state

    model = tiny_model(family)
    short = ids[:, :2 * TRAINED_LEN]
    with longctx.applied(model, "dynamic_ntk", factor=4, **options):
        fresh = logits(model, short)
        logits(model, ids)                                      # grows the state to 3 * TRAINED_LEN
        assert not torch.equal(logits(model, short), fresh)
        assert reset_rotary_state(model) == (1 if family == "llama" else 2)
        assert torch.equal(logits(model, short), fresh)
        rotary = model.base_model.rotary_emb
        prefixes = [""] if family == "llama" else ["full_attention_", "sliding_attention_"]
        logits(model, ids)
        reset_rotary_state(model)
        for p in prefixes:
            assert torch.equal(getattr(rotary, p + "inv_freq"), getattr(rotary, p + "original_inv_freq"))
            assert getattr(rotary, p + "inv_freq") is not getattr(rotary, p + "original_inv_freq")
            assert getattr(rotary, p + "max_seq_len_cached", rotary.max_seq_len_cached) == TRAINED_LEN
    with longctx.applied(model, "yarn", factor=4):              # not dynamic: nothing to reset
        logits(model, ids)
        assert reset_rotary_state(model) == 0


def test_peft_wrapped_model(ids):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    before = logits(model, ids)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with longctx.applied(wrapped, "linear", factor=2):
        assert model.config.rope_parameters["rope_type"] == "linear"
    assert torch.equal(logits(model, ids), before)


def test_wrapped_handles_are_one_model():
    # peft_model.base_model (peft's LoraModel) forwards its attributes to the model: the patch was kept under the
    # tuner, so active_patches(peft_model) was []; DataParallel / DistributedDataParallel (accelerator.prepare on
    # several devices) was refused ("expected a transformers model with a .config"); a patch applied through
    # model.model was missing from active_patches(model)
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for handle in (wrapped.base_model, torch.nn.DataParallel(model), model.model):
        with longctx.applied(handle, "yarn", factor=2) as patch:
            assert model.config.rope_parameters["rope_type"] == "yarn"
            assert patch.model is (model.model if handle is model.model else model)
            for other in (handle, wrapped, model, model.model):
                assert longctx.active_patches(other) == [patch]
        assert longctx.active_patches(wrapped) == [] and model.config.rope_parameters["rope_type"] == "default"
    first = longctx.apply(model.model, "yarn", factor=2)
    second = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    assert longctx.active_patches(wrapped) == [first, second]  # oldest first, across handles
    second.remove()
    first.remove()


# -- errors: each names the option and the allowed values ---------------------------------------------
def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match=r"unknown method 'rope_magic'.*dynamic_ntk.*linear.*yarn"):
        longctx.apply(tiny_model("llama"), "rope_magic", factor=2)


@pytest.mark.parametrize("factor", [0, -1.5])
def test_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match=r"'factor' must be a number > 0"):
        longctx.apply(tiny_model("llama"), "yarn", factor=factor)


def test_factor_wrong_type():
    with pytest.raises(ValueError, match=r"'factor' must be a number > 0, got '4'"):
        longctx.apply(tiny_model("llama"), "linear", factor="4")


def test_unknown_and_missing_options():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'scale' for method 'linear'; allowed options: "
                                        r"layer_types, factor"):
        longctx.apply(model, "linear", scale=2)
    with pytest.raises(TypeError, match=r"method 'yarn' needs option\(s\): factor"):
        longctx.apply(model, "yarn")
    with pytest.raises(ValueError, match=r"'beta_fast' \(1.0\) must be > 'beta_slow' \(2.0\)"):
        longctx.apply(model, "yarn", factor=2, beta_fast=1.0, beta_slow=2.0)
    with pytest.raises(ValueError, match="layer_types"):
        longctx.apply(model, "yarn", factor=2, layer_types=("full_attention",))


def test_rope_method_on_alibi_model():
    with pytest.raises(ValueError, match=r"'bloom' models use alibi positions"):
        longctx.apply(tiny_model("bloom"), "yarn", factor=2)


def test_unsupported_architecture_lists_families():
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=1, n_head=2, vocab_size=64, rotary_dim=8))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gptj'; supported families: .*llama.*qwen2"):
        longctx.apply(model, "linear", factor=2)


def test_two_rope_methods_is_an_error_and_removal_is_once():
    model = tiny_model("llama")
    patch = longctx.apply(model, "yarn", factor=2)
    with pytest.raises(ValueError, match=r"'yarn' is already applied .* \.remove\(\) on that patch first"):
        longctx.apply(model, "linear", factor=2)
    with pytest.raises(ValueError, match="already applied"):
        longctx.apply(model, "yarn", factor=2)
    patch.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        patch.remove()
    longctx.apply(model, "linear", factor=2).remove()  # free again


def test_already_scaled_model_is_refused():
    cfg = tiny_config("llama")
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "linear", "factor": 2.0}
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"already uses rope_type 'linear'"):
        longctx.apply(model, "yarn", factor=2)


def test_applied_restores_on_error(ids):
    model = tiny_model("llama")
    before = logits(model, ids)
    with pytest.raises(KeyError):
        with longctx.applied(model, "ntk", factor=4):
            raise KeyError("boom")
    assert torch.equal(logits(model, ids), before)


def test_methods_listing():
    names = longctx.methods()
    assert set(names) >= {"linear", "ntk", "dynamic_ntk", "yarn", "abf"}
    assert "alias: pi" in names["linear"]


def test_submodules_load_on_first_use():
    # `import longctx` alone: longctx.lora.prepare and longctx.chat.stream_generate, as the README and the
    # issues write them (chat and lora were an AttributeError without their own import)
    import subprocess
    import sys

    code = ("import longctx, sys; assert 'longctx.lora' not in sys.modules; "
            "print(longctx.lora.prepare.__name__, longctx.chat.stream_generate.__name__, longctx.estimate.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["prepare", "stream_generate", "longctx.estimate"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        longctx.nope


@pytest.mark.parametrize("method", ["linear", "yarn"])
def test_phi3_static_methods_are_written_as_longrope(method, ids):
    """Phi3Config accepts only default/longrope: the same frequencies travel as longrope factors."""
    model = tiny_model("phi3")
    reference = tiny_model("llama")  # a family where transformers has the rope type natively
    ref_rotary = reference.base_model.rotary_emb
    with longctx.applied(model, method, factor=FACTOR):
        params = model.config.rope_parameters
        assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
        rotary = model.base_model.rotary_emb
        # same frequencies and attention factor as transformers' own rope type on a same-sized rotary dim
        cfg = copy.deepcopy(model.config)
        cfg.rope_parameters = {**NATIVE[method][1], "rope_theta": params["rope_theta"],
                               "partial_rotary_factor": params["partial_rotary_factor"]}
        cfg.max_position_embeddings = 4 * TRAINED_LEN
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        want, want_scale = ROPE_INIT_FUNCTIONS[NATIVE[method][1]["rope_type"]](cfg)
        rotary(torch.zeros(1), torch.arange(3 * TRAINED_LEN)[None])  # past the trained length: long factors
        torch.testing.assert_close(rotary.inv_freq, want, rtol=1e-6, atol=0)
        assert rotary.attention_scaling == pytest.approx(want_scale, rel=1e-12)
    del ref_rotary


def test_phi3_refuses_dynamic_ntk():
    with pytest.raises(ValueError, match=r"accepts only rope types default, longrope"):
        longctx.apply(tiny_model("phi3"), "dynamic_ntk", factor=2)


# -- one model, several handles; failures leave nothing behind; saved scaling is not compounded -------------
def test_other_handles_and_shared_configs_cannot_stack_patches():
    model = tiny_model("llama")
    theta = model.config.rope_parameters["rope_theta"]
    longctx.apply(model, "ntk", factor=4)
    for handle in (model.model, torch.compile(model, backend="eager")):
        with pytest.raises(ValueError, match="'ntk' is already applied to this model"):
            longctx.apply(handle, "ntk", factor=4)
    sharing = type(model)(model.config)  # another model on the same config object
    with pytest.raises(ValueError, match="already applied"):
        longctx.apply(sharing, "yarn", factor=2)
    longctx.active_patches(model)[0].remove()
    assert model.config.rope_parameters["rope_theta"] == theta


@pytest.mark.parametrize("method, options", [("yarn", {"factor": 2}), ("s2attn", {}),
                                             ("streaming", {"sink_size": 2, "window_size": 6})])
def test_a_patched_model_dropped_without_remove_is_freed(method, options):
    # the registry holds each model's patches (keyed weakly by the model), but every patch held its model strongly:
    # a patched model was never freed (nor its GPU memory) unless its patch was removed first
    import gc
    import weakref

    model = tiny_model("llama")
    patch = longctx.apply(model, method, **options)
    copies = [copy.deepcopy(model)] if method == "streaming" else []  # a copy of it carries a copy of the patch
    # the weights too: a RoPE patch held the rotary module's parent (the decoder body, all but lm_head) for remove()
    refs = [weakref.ref(m) for m in (model, *copies, model.base_model, model.base_model.embed_tokens.weight)]
    del model, copies
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    with pytest.raises(RuntimeError, match="model was garbage-collected"):
        patch.remove()

@pytest.mark.parametrize("method, options", [("yarn", {"factor": 2}), ("s2attn", {"group_size": 8}),
                                             ("streaming", {"sink_size": 2, "window_size": 6})])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_model_and_its_patch_removes_on_the_copy(method, options, how):
    # copy.deepcopy((model, patch)) (or torch.save of both): the copy of the patch carries the copy of the model,
    # but the registry did not track it (only streaming's): its remove() undid the copy, then failed (KeyError), and
    # s2attn's, sharing the original's state, switched S2 off in the original (silently: it kept running full attention)
    import importlib
    import io

    importlib.import_module("longctx.methods.s2attn")  # registers "s2attn"
    model = tiny_model("llama").train(method == "s2attn")
    x = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    patch = longctx.apply(model, method, **options)
    patched = model(x).logits
    assert not torch.equal(patched, ref) or method == "streaming"
    if how == "deepcopy":
        dup, dup_patch = copy.deepcopy((model, patch))
    else:
        buf = io.BytesIO()
        torch.save({"model": model, "patch": patch}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        dup, dup_patch = loaded["model"], loaded["patch"]
    assert dup_patch.model is dup and longctx.active_patches(dup) == [dup_patch]
    dup_patch.remove()
    assert longctx.active_patches(dup) == [] and not hasattr(dup.config, "longctx")
    assert torch.equal(dup(x).logits, ref)
    assert torch.equal(model(x).logits, patched) and longctx.active_patches(model) == [patch]
    patch.remove()
    assert torch.equal(model(x).logits, ref)


def test_failed_attach_leaves_the_model_unchanged(monkeypatch):
    model = tiny_model("llama")
    before = (copy.deepcopy(model.config.rope_parameters), model.config.max_position_embeddings)
    rotary_cls = type(model.model.rotary_emb)

    def broken(self, *a, **kw):
        raise RuntimeError("rotary module failed")
    with monkeypatch.context() as m:
        m.setattr(rotary_cls, "__init__", broken)
        with pytest.raises(RuntimeError, match="rotary module failed"):
            longctx.apply(model, "yarn", factor=2)
    assert (model.config.rope_parameters, model.config.max_position_embeddings) == before
    assert not longctx.active_patches(model) and not hasattr(model.config, "longctx")
    longctx.apply(model, "yarn", factor=2).remove()  # and the model takes a method afterwards
    with pytest.raises(ValueError, match="option 'beta_fast' must be a finite number > 0, got inf"):
        longctx.apply(model, "yarn", factor=2, beta_fast=float("inf"))


def test_saved_scaling_is_not_compounded(tmp_path):
    model = tiny_model("llama")
    longctx.apply(model, "ntk", factor=4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for method, options in (("ntk", {"factor": 4}), ("abf", {"rope_theta": 1e6}), ("linear", {"factor": 2})):
        with pytest.raises(ValueError, match="saved after longctx applied 'ntk'"):
            longctx.apply(reloaded, method, **options)
    longctx.apply(reloaded, "streaming", sink_size=2, window_size=8).remove()  # other slots are fine
    assert reloaded.config.longctx[0]["method"] == "ntk"  # the saved record stays


def test_layer_types_checked():
    for bad in (5, (), ("full_attention", "full_attention")):
        with pytest.raises(ValueError, match="option 'layer_types'"):
            longctx.apply(tiny_model("llama"), "ntk", factor=2, layer_types=bad)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_remove_after_cast_or_move_matches_never_patched_model(family, ids):
    # the rotary module put back by remove() missed the casts and moves made while it was outside the model
    ref = tiny_model(family).to(torch.bfloat16)
    model = tiny_model(family)
    patch = longctx.apply(model, "yarn", factor=4)
    model.to(torch.bfloat16)
    patch.remove()
    assert all(b.dtype == torch.bfloat16 for b in model.base_model.rotary_emb.buffers())
    assert torch.equal(logits(model, ids), logits(ref, ids))
    patch = longctx.apply(model, "linear", factor=2)
    model.to("meta")
    patch.remove()
    assert all(b.device.type == "meta" for b in model.base_model.rotary_emb.buffers())


@pytest.mark.parametrize("method,options", [
    ("linear", {"factor": np.float32(2)}),
    ("yarn", {"factor": np.float64(2), "original_max_position_embeddings": np.int64(TRAINED_LEN)}),
    ("abf", {"rope_theta": np.float32(1e5), "max_position_embeddings": np.int64(128)})])
def test_numpy_scalar_options_apply_and_save(method, options, ids, tmp_path):
    # numpy scalars pass the option checks; they were stored as such: abf failed in transformers' strict
    # config after rope_parameters was already set (half applied), linear/yarn could not be saved (JSON)
    model = tiny_model("llama")
    longctx.apply(model, method, **options)
    want = logits(model, ids)
    assert all(type(v) in (int, float, str) for v in model.config.rope_parameters.values())
    assert type(model.config.max_position_embeddings) is int
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded, ids), want)


@pytest.mark.parametrize("method", ["yarn", "dynamic_ntk"])
def test_mixtral_without_head_dim(method, ids, tmp_path):
    # MixtralConfig.head_dim defaults to None (as in Mixtral-8x7B's config.json); transformers' yarn and dynamic
    # rope functions read it unguarded. While patched the config carries hidden_size // heads; remove() puts None back
    cfg = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                               max_position_embeddings=TRAINED_LEN, num_local_experts=4)
    assert cfg.head_dim is None
    model = build(cfg)
    before = logits(model, ids)
    patch = longctx.apply(model, method, factor=4)
    got = logits(model, ids)
    assert not torch.equal(got, before) and model.config.head_dim == 16
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded, ids), got)
    patch.remove()
    assert torch.equal(logits(model, ids), before) and model.config.to_dict() == cfg.to_dict()


def test_abf_smaller_max_position_embeddings_is_applied():
    # it was silently kept at the trained length
    model = tiny_model("llama")
    longctx.apply(model, "abf", rope_theta=1e5, max_position_embeddings=TRAINED_LEN // 2)
    assert model.config.max_position_embeddings == TRAINED_LEN // 2


@pytest.mark.parametrize("method,options", ALL_METHODS)
def test_rotary_module_follows_the_models_train_eval_mode(method, options):
    """The swapped-in rotary module was built in training mode inside an eval model (the one module training),
    and the original came back in the mode it had at apply, whatever model.train()/eval() did meanwhile."""
    model = tiny_model("llama")
    with longctx.applied(model, method, **options):
        assert not any(m.training for m in model.modules())
        model.train()
    assert all(m.training for m in model.modules())
    with longctx.applied(model, method, **options):
        assert all(m.training for m in model.modules())
        model.eval()
    assert not any(m.training for m in model.modules())


def test_remove_restores_a_saved_record_of_the_same_method(tmp_path, ids):
    # a model saved with patches on carries their record (config.longctx); applying one of those methods again to
    # the reloaded model (streaming, s2attn: other slots than the saved scaling) and removing it deleted the saved
    # entry: remove() left the config changed (to_dict differed, and a second save lost the record)
    importlib.import_module("longctx.methods.s2attn")  # registers "s2attn"
    model = tiny_model("llama")
    for method, options in (("ntk", {"factor": 4}), ("s2attn", {"group_size": 8}),
                            ("streaming", {"sink_size": 2, "window_size": 6})):
        longctx.apply(model, method, **options)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    before, ref = reloaded.config.to_dict(), logits(reloaded, ids)
    for method, options in (("streaming", {"sink_size": 4, "window_size": 12}), ("s2attn", {"group_size": 4})):
        patch = longctx.apply(reloaded, method, **options)
        assert [e["method"] for e in reloaded.config.longctx] == ["ntk", "s2attn", "streaming"]
        assert {"method": method, **patch.options.to_dict()} in reloaded.config.longctx  # what is on now
        patch.remove()
        assert reloaded.config.to_dict() == before
    first = longctx.apply(reloaded, "streaming", sink_size=4, window_size=12)
    second = longctx.apply(reloaded, "s2attn", group_size=4)
    first.remove()  # not in the order applied
    second.remove()
    assert reloaded.config.to_dict() == before and torch.equal(logits(reloaded, ids), ref)


@pytest.mark.parametrize("yarn_original", [None, TRAINED_LEN // 2])
def test_yarn_original_length_is_not_overridden_by_a_top_level_config_value(yarn_original, ids, tmp_path):
    """transformers' rope init replaces a flat yarn/longrope configuration's original_max_position_embeddings with a
    top-level config.original_max_position_embeddings (phi3 has one, any config.json may carry one): yarn's option
    (or its default, max_position_embeddings) was silently ignored, while max_position_embeddings followed it."""
    model = tiny_model("llama", original_max_position_embeddings=4096)
    before = logits(model, ids)
    original = yarn_original or TRAINED_LEN
    options = {} if yarn_original is None else {"original_max_position_embeddings": yarn_original}
    reference = tiny_model("llama")  # the same weights, no stray top-level value
    expected = logits(native_twin(reference, {**NATIVE["yarn"][1], "original_max_position_embeddings": original},
                                  4 * original), ids)
    with longctx.applied(model, "yarn", factor=FACTOR, **options):
        assert model.config.rope_parameters["original_max_position_embeddings"] == original
        assert torch.equal(logits(model, ids), expected)
        model.save_pretrained(tmp_path)
    assert torch.equal(logits(model, ids), before) and model.config.original_max_position_embeddings == 4096
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded, ids), expected)


def test_phi3_yarn_honours_original_max_position_embeddings():
    # a phi3 checkpoint as published: original_max_position_embeddings == max_position_embeddings
    model = tiny_model("phi3", partial_rotary_factor=1.0, original_max_position_embeddings=TRAINED_LEN)
    half = TRAINED_LEN // 2
    cfg = tiny_config("llama")
    cfg.rope_parameters = {**NATIVE["yarn"][1], "rope_theta": 10000.0, "original_max_position_embeddings": half}
    cfg.max_position_embeddings = 4 * half
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    with longctx.applied(model, "yarn", factor=FACTOR, original_max_position_embeddings=half):
        rotary = model.base_model.rotary_emb
        rotary(torch.zeros(1), torch.arange(3 * TRAINED_LEN)[None])
        torch.testing.assert_close(rotary.inv_freq, want, rtol=1e-6, atol=0)
        assert rotary.attention_scaling == pytest.approx(want_scale, rel=1e-12)
        assert model.config.max_position_embeddings == 4 * half
    assert model.config.original_max_position_embeddings == TRAINED_LEN


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn"])
def test_a_factor_that_leaves_no_positions_is_refused(method):
    # 64 x 1e-3 rounds to 0: the patch was applied with max_position_embeddings 0 in the config (and saved so)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"option 'factor' \(0.001\) is too small.*max_position_embeddings would be 0"):
        longctx.apply(model, method, factor=1e-3)
    assert model.config.max_position_embeddings == TRAINED_LEN and longctx.active_patches(model) == []
    with longctx.applied(model, method, factor=1 / TRAINED_LEN):  # one position is still a model
        assert model.config.max_position_embeddings == 1


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
def test_a_factor_too_large_for_a_float_is_refused_as_an_option_error(method, family):
    # the mirror of the 'too small' check: round(64 * 1e307) (linear, yarn) or ntk's base * factor^(d/(d-2)) overflow a
    # float and raised OverflowError, not the ValueError every other bad option gives (the CLI reports ValueErrors
    # only: a traceback)
    model = tiny_model(family)
    before = model.config.to_dict()
    with pytest.raises(ValueError, match=r"option 'factor' \(1e\+307\) is too large"):
        longctx.apply(model, method, factor=1e307)
    assert model.config.to_dict() == before and longctx.active_patches(model) == []
