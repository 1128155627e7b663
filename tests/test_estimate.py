"""longctx.estimate against hand arithmetic, against autograd's saved tensors, and against the
live-tensor peak of real tiny bf16 models on CPU."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longctx import estimate as est_mod
from longctx.estimate import estimate, parse_bytes, shape_of

# h=64, L=2, a=4 heads, g=2 kv heads, d=16, f=160, V=1000, untied
SMALL = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=4096)


def test_parameter_count_by_hand():
    s = shape_of(SMALL)
    attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64      # q (h x a*d), k, v (h x g*d), o = 12288
    mlp = 3 * 64 * 160                                  # gate, up, down = 30720
    layer = attn + mlp + 2 * 64                         # + two RMSNorm weights = 43136
    assert s.layer_params == layer == 43136
    assert s.params == 2 * layer + 1000 * 64 + 1000 * 64 + 64 == 214336   # + embed + lm_head + final norm
    # SmolLM2-135M: 30 layers of 576*576*2 + 576*192*2 + 3*576*1536 + 2*576, tied 49152 x 576 embedding
    assert shape_of("smollm2-135m").params == 30 * (663552 + 221184 + 2654208 + 1152) + 49152 * 576 + 576 == 134515008
    # Llama-2-7B: 6,738,415,616 parameters (the published count)
    assert shape_of("llama2-7b").params == 6738415616


def test_smollm2_preset_matches_the_converted_checkpoint():
    from longctx.utils import cache_dir

    found = sorted(cache_dir("models").glob("smollm2-135m-*/config.json"))
    if not found:
        pytest.skip("smollm2-135m not converted on this machine")
    real, preset = shape_of(json.loads(found[0].read_text())), shape_of("smollm2-135m")
    fields = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tied", "gated_mlp")
    assert [getattr(real, f) for f in fields] == [getattr(preset, f) for f in fields]
    assert real.params == preset.params


def test_inference_by_hand():
    e = estimate(SMALL, 100, batch=3, dtype="bf16")
    assert e.weights == 214336 * 2 == 428672
    assert e.kv_cache == 2 * 2 * 2 * 16 * 100 * 3 * 2 == 76800   # 2 (k,v) * L * g * d * T * B * bytes
    # layer transient per token: 2 bytes * max(attention 4h + ad + 2gd + 3.5ad = 256+64+64+224 = 608,
    # MLP 4h + 3f = 256 + 480 = 736) = 1472, + cos/sin 2*2*16 = 64 -> 1536 per token, x B*T = 300 tokens
    assert e.layer_peak == 1536 * 300 == 460800
    assert e.logits == 3 * 1000 * 2                              # last position only: B * V * bytes
    assert e.total == 428672 + 76800 + 460800 == 966272
    assert e.activations == e.gradients == e.optimizer_states == 0
    # FLOPs per token: 2 * linear params (86272 - 256 norms = 86016) + attention 4*L*a*d*(T+1)/2 + head/T
    assert e.flops_per_token == pytest.approx(2 * 2 * 43008 + 4 * 2 * 4 * 16 * 50.5 + 2 * 64000 / 100)
    assert estimate(SMALL, 100, logits="all").logits == 100 * 1000 * 2


def test_lora_training_by_hand():
    e = estimate(SMALL, 100, train="lora", dtype="bf16", lora_r=8)
    lora_n = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))   # r*(in+out) for q,k,v,o, 2 layers = 7168
    extra_n = 64000 + (2 * 2 * 64 + 64)                                # embedding + all norms = 64320
    assert e.lora_param_count == lora_n == 7168 and e.lora_params == 4 * lora_n   # fp32 adapters
    assert e.trainable_params == lora_n + extra_n
    assert e.gradients == 4 * lora_n + 2 * extra_n == 157312
    assert e.optimizer_states == 2 * 4 * lora_n + 2 * 2 * extra_n == 314624     # Adam m, v: fp32 / bf16
    # checkpointing: each layer keeps its input (2*64 bytes/token); outside the layers: ids + labels 16,
    # cos/sin 2*2*16, final norm fp32 input 4*64 + 4 and its bf16 normalized input 2*64 (trained)
    assert e.activations == 100 * (2 * 128 + 16 + 64 + 256 + 4 + 128) == 72400
    assert e.logits == 12 * 100 * 1000                                  # fp32 log-softmax + 2 fp32 grads
    assert e.total == 428672 + 4 * lora_n + 314624 + 72400 + 1200000 == 2044368
    assert e.peak_phase.startswith("loss backward")


def test_kv_cache_mha_gqa_mqa():
    sizes = {}
    for g in (4, 2, 1):
        sizes[g] = estimate({**SMALL, "num_key_value_heads": g}, 1000).kv_cache
        assert sizes[g] == 2 * 2 * g * 16 * 1000 * 2
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]
    no_kv_heads = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}   # MHA by default
    assert estimate(no_kv_heads, 1000).kv_cache == sizes[4]
    assert estimate({**no_kv_heads, "model_type": "falcon", "multi_query": True}, 1000).kv_cache == sizes[1]


def test_streaming_bounds_the_kv_cache():
    cap = 4 + 1020
    per_token = 3 * 2 * 2 * 16 * 2          # k as produced, k re-rotated, v: 3 tensors * L * g * d * bytes
    for T in (2048, 32768, 1_000_000):
        e = estimate(SMALL, T, method="streaming:sink_size=4:window_size=1020")
        assert e.kv_cache == per_token * cap
        assert e.layer_peak == estimate(SMALL, 1020).layer_peak  # prefilled in window-sized chunks
    assert estimate(SMALL, 500, method="streaming", sink=4, window=1020).kv_cache == per_token * 500
    assert estimate(SMALL, 32768, method={"name": "streaming", "window_size": 60}).kv_cache == per_token * 64
    assert estimate(SMALL, 32768, method="yarn:factor=4").kv_cache == estimate(SMALL, 32768).kv_cache
    with pytest.raises(ValueError, match="unknown streaming option"):
        estimate(SMALL, 100, method="streaming:windw=3")


def test_zero_stages_divide_the_right_terms():
    kw = dict(train="full", gpus=4, gpu_memory="80GiB", master_weights=True)
    z = {k: estimate("llama2-7b", 4096, zero=k, **kw) for k in range(4)}
    P = shape_of("llama2-7b").params
    assert z[0].weights == 2 * P and z[0].gradients == 2 * P and z[0].optimizer_states == 12 * P
    assert (z[1].weights, z[1].gradients, z[1].optimizer_states) == (2 * P, 2 * P, 3 * P)
    assert (z[2].weights, z[2].gradients, z[2].optimizer_states) == (2 * P, P // 2, 3 * P)
    assert (z[3].weights, z[3].gradients, z[3].optimizer_states) == (P // 2, P // 2, 3 * P)
    assert z[3].zero3_gather == 2 * 2 * shape_of("llama2-7b").layer_params and z[2].zero3_gather == 0
    for k in range(4):  # activations, logits: per GPU, never divided
        assert z[k].activations == z[0].activations and z[k].logits == z[0].logits
        assert z[k].per_stage == z[0].per_stage and z[k].total == z[0].per_stage[k]
    assert z[0].total > z[1].total > z[2].total > z[3].total
    assert z[0].fits is False and z[3].fits is True
    one = estimate("llama2-7b", 4096, train="full", gpus=1, zero=3)   # one GPU: nothing to divide
    assert one.weights == 2 * P and one.zero3_gather == 0


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80G") == 80 * 2**30
    assert parse_bytes("80 gib") == 80 * 2**30
    assert parse_bytes("1.5TiB") == int(1.5 * 2**40)
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("512") == parse_bytes(512) == 512
    for bad in ("80 parsecs", "GiB", "", "-1GB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_fits():
    total = estimate(SMALL, 1000, train="lora").total
    assert estimate(SMALL, 1000, train="lora", gpu_memory=total).fits is True
    assert estimate(SMALL, 1000, train="lora", gpu_memory=total - 1).fits is False
    assert estimate(SMALL, 1000, train="lora").fits is None
    text = estimate("llama2-7b", 131072, train="lora", gpu_memory="80GiB").format()
    assert "DOES NOT FIT in 80.00 GiB" in text
    assert "FITS in 80.00 GiB" in estimate("smollm2-135m", 8192, gpu_memory="80GiB").format()


def test_config_sources_agree(tmp_path):
    cfg = AutoConfig.for_model(**SMALL)
    cfg.save_pretrained(tmp_path)
    ref = shape_of(SMALL)
    for source in (cfg, tmp_path, tmp_path / "config.json", str(tmp_path)):
        s = shape_of(source)
        assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab, s.tied) == \
               (ref.hidden, ref.layers, ref.heads, ref.kv_heads, ref.head_dim, ref.intermediate, ref.vocab, ref.tied)
    with pytest.raises(ValueError):
        estimate(SMALL, 100, train="lora", lora_targets=("nope",))


def test_flops_training_orders():
    base = dict(gradient_checkpointing=False)
    inf = estimate("llama2-7b", 4096).flops_per_token
    full = estimate("llama2-7b", 4096, train="full", **base).flops_per_token
    lora = estimate("llama2-7b", 4096, train="lora", **base).flops_per_token
    ckpt = estimate("llama2-7b", 4096, train="full").flops_per_token
    assert 2.9 < full / inf < 3.5          # forward + 2x backward (the head on every position in training)
    assert 1.9 < lora / inf < full / inf   # frozen weights: input gradients only
    assert ckpt > full                     # + a recomputed forward


# -------------------------------------------------------------- against PyTorch itself (CPU, bf16)
def _tracker_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_check.py"
    spec = importlib.util.spec_from_file_location("estimate_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny(layers, h=64, f=160, V=1000, tied=True, dtype=torch.bfloat16):
    cfg = AutoConfig.for_model("llama", hidden_size=h, intermediate_size=f, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=layers, vocab_size=V,
                               max_position_embeddings=4096, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model, cfg


def _saved_bytes(model, x):
    """Bytes of the distinct non-parameter storages autograd saves for the backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("train", ["lora", "full"])
def test_stored_activations_per_layer_match_autograd(train):
    """One more layer adds exactly _stored_per_token(...) bytes per token of saved tensors."""
    mod = _tracker_module()
    T = 256
    x = torch.randint(3, 1000, (1, T))
    saved = {}
    for layers in (1, 2):
        model, cfg = _tiny(layers)
        if train == "lora":
            model = mod.prepare_lora(model, 8)
        model.train()
        saved[layers] = _saved_bytes(model, x)
    s = shape_of(cfg)
    layer_tok, kept_tok = est_mod._stored_per_token(s, train, 2, 4, 8, ("q_proj", "k_proj", "v_proj", "o_proj"),
                                                    ("embed", "norm"), checkpointing=False)
    assert saved[2] - saved[1] == layer_tok * T


@pytest.mark.parametrize("train,ckpt,shape", [
    (None, False, dict(layers=2)),
    ("lora", True, dict(layers=2)),                       # output head dominates
    ("lora", False, dict(layers=2)),
    ("lora", True, dict(layers=3, h=256, f=1024, V=256, tied=False)),   # layers dominate
    ("full", False, dict(layers=3, h=256, f=1024, V=256, tied=False)),
])
def test_peak_within_15_percent_of_live_tensors(train, ckpt, shape):
    mod = _tracker_module()
    T = 512
    model, cfg = _tiny(**shape)
    x = torch.randint(3, cfg.vocab_size, (1, T))
    if train is None:
        with mod.Meter("cpu", model) as m, torch.inference_mode():
            model(input_ids=x, use_cache=True, logits_to_keep=1)
    else:
        if train == "lora":
            model = mod.prepare_lora(model, 8)
        if ckpt:
            mod.enable_checkpointing(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        with mod.Meter("cpu", model) as m:
            for step in range(2):
                if step:
                    m.reset()
                model(input_ids=x, labels=x, use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    e = estimate(cfg, T, train=train, gradient_checkpointing=ckpt, master_weights=False)
    assert 0.85 <= m.peak / e.total <= 1.15, (m.peak, e.total, e.peak_phase)


def test_cli(capsys):
    parser = argparse.ArgumentParser()
    est_mod.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--model", "llama2-7b", "--length", "8192,131072", "--train", "lora",
                              "--gpus", "8", "--zero", "3", "--gpu-memory", "80GiB"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "llama2-7b: LoRA training step, 1 x 8,192 tokens" in out and "1 x 131,072 tokens" in out
    assert "8 GPUs ZeRO-3" in out and "per GPU by ZeRO stage" in out
    assert "FITS in 80.00 GiB" in out
    args = parser.parse_args(["estimate", "--model", "smollm2-135m", "--length", "32768", "--method",
                              "streaming:window_size=1020", "--gpu-memory", "100MiB", "--json"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT in 100.00 MiB" in out
    assert json.loads(out.strip().splitlines()[-1])["kv_cache"] == 3 * 30 * 3 * 64 * 1024 * 2


def test_s2attn_changes_training_flops_not_memory():
    full = estimate(SMALL, 4096, train="lora")
    s2 = estimate(SMALL, 4096, train="lora", method="s2attn:group_size_ratio=0.25")
    assert s2.method_options == {"group_size": 1024} and s2.total == full.total
    attn = lambda keys: 4 * 2 * 4 * 16 * keys                          # 4 * L * a * d * mean keys
    # forward + 2.5x backward + recomputed forward of the attention: 4.5x, (T+1)/2 -> (G+1)/2 keys
    assert full.flops_per_token - s2.flops_per_token == pytest.approx(4.5 * (attn(4096.5 / 2) - attn(1024.5 / 2)))
    assert estimate(SMALL, 4096, method="s2attn").flops_per_token == estimate(SMALL, 4096).flops_per_token


def test_s2attn_group_size_is_the_patch_s():
    # group_size_ratio: G as the patch computes it at that length (ratio * T exact but for float error, e.g.
    # 0.14 * 100 = 14.000000000000002, is not rounded up to the next even number)
    from longctx.methods.s2attn import group_size_for

    for T, ratio in ((100, 0.14), (50, 0.28), (25, 0.56), (1001, 0.25), (4096, 0.25), (37, 1.0)):
        e = estimate(SMALL, T, train="lora", method=f"s2attn:group_size_ratio={ratio}")
        assert e.method_options == {"group_size": group_size_for(T, ratio)}, (T, ratio)


# ------------------------------------------------------------------ sliding layers, argument checks
def _sliding_model(types, window):
    cfg = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_hidden_layers=6, vocab_size=256,
                               sliding_window=window, max_position_embeddings=4096, pad_token_id=0,
                               layer_types=types)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval(), cfg


def test_sliding_layers_kv_cache_equals_transformers_cache():
    model, cfg = _sliding_model(["sliding_attention"] * 5 + ["full_attention"], 32)
    s = shape_of(cfg)
    assert (s.sliding_window, s.sliding_layers) == (32, 5)
    for T in (20, 200):   # below and past the window
        with torch.inference_mode():
            out = model(input_ids=torch.randint(3, 256, (2, T)), use_cache=True, logits_to_keep=1)
        real = sum(t.numel() * t.element_size() for l in out.past_key_values.layers for t in (l.keys, l.values))
        assert estimate(cfg, T, batch=2).kv_cache == real
    # mistral style (every layer sliding): a window-sized cache however long the prompt
    mistral = {**SMALL, "model_type": "mistral", "sliding_window": 32}
    assert estimate(mistral, 4096).kv_cache == estimate(SMALL, 31).kv_cache
    assert estimate({**mistral, "use_sliding_window": False}, 4096).kv_cache == estimate(SMALL, 4096).kv_cache


def test_config_json_without_layer_types_counts_sliding_layers_as_transformers(tmp_path):
    # a config.json written before configs listed layer_types (gemma-2's on the hub; qwen2 with
    # use_sliding_window): its sliding layers as transformers derives them, the same as for the model folder
    gemma2 = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=6, vocab_size=256, sliding_window=32,
                  max_position_embeddings=4096)
    qwen2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=6, vocab_size=256, sliding_window=32,
                 use_sliding_window=True, max_window_layers=4, max_position_embeddings=4096)
    for raw, n_sliding in ((gemma2, 3), (qwen2, 2)):
        path = tmp_path / raw["model_type"] / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(raw))
        for source in (raw, path, path.parent, AutoConfig.for_model(**raw)):
            assert shape_of(source).sliding_layers == n_sliding, (raw["model_type"], source)
        assert estimate(path, 4096).kv_cache == estimate(path.parent, 4096).kv_cache


def test_sliding_window_mask_counted_in_the_inference_peak():
    mod = _tracker_module()
    T = 1024
    model, cfg = _sliding_model(["sliding_attention"] * 5 + ["full_attention"], 32)
    with mod.Meter("cpu", model) as m, torch.inference_mode():
        model(input_ids=torch.randint(3, 256, (1, T)), use_cache=True, logits_to_keep=1)
    e = estimate(cfg, T)
    assert 0.85 <= m.peak / e.total <= 1.15, (m.peak, e.total, e.peak_phase)
    assert e.attention_mask == T * T
    assert estimate(cfg, 16).attention_mask == 0           # below the window: SDPA's is_causal


def test_arguments_are_checked():
    bad = [dict(method="streaming:window_size=-50:sink_size=-4"), dict(method="streaming:window_size=0"),
           dict(new_tokens=-4096), dict(chunk=-10), dict(train="lora", lora_r=-8), dict(length=1.9),
           dict(batch=2.5), dict(train="lora", method="s2attn:group_size=-4"), dict(gpus=0)]
    for kw in bad:
        with pytest.raises(ValueError, match=r"must be|must hold"):
            estimate(SMALL, kw.pop("length", 100), **kw)
    assert estimate(SMALL, 100, new_tokens=0).kv_cache == estimate(SMALL, 100).kv_cache


def test_unknown_methods_and_options_are_errors():
    with pytest.raises(ValueError, match=r"unknown yarn option\(s\) \['factr'\]; allowed options: .*factor"):
        estimate(SMALL, 100, method="yarn:factr=4")
    with pytest.raises(ValueError, match=r"unknown method 'streamng'; known methods: .*streaming"):
        estimate(SMALL, 100, method="streamng:window_size=8")
    with pytest.raises(ValueError, match=r"unknown s2attn option.*allowed options: group_size_ratio"):
        estimate(SMALL, 100, train="lora", method="s2attn:group=8")
    assert estimate(SMALL, 100, method="yarn:factor=4").total == estimate(SMALL, 100).total
    assert estimate(SMALL, 4096, train="lora", method="s2attn:train_only=False:group_size=8").method_options == \
        {"group_size": 8}


def test_per_stage_rows_equal_the_totals_at_each_stage():
    for train in ("lora", "full"):
        totals = [estimate("llama2-7b", 4096, train=train, gpus=8, zero=z).total for z in range(4)]
        for z in range(4):
            assert list(estimate("llama2-7b", 4096, train=train, gpus=8, zero=z).per_stage.values()) == totals


def test_streaming_does_not_change_training_flops():
    plain = estimate(SMALL, 4096, train="lora")
    stream = estimate(SMALL, 4096, train="lora", method="streaming:sink_size=4:window_size=60")
    assert stream.flops == plain.flops and stream.total == plain.total
    assert estimate(SMALL, 4096, method="streaming:window_size=60").flops < estimate(SMALL, 4096).flops


@pytest.mark.parametrize("argv, match", [
    (["--lora-r", "64"], "--lora-r applies to --train lora only"),
    (["--train", "full", "--lora-r", "64"], "--lora-r applies to --train lora only"),
    (["--no-gradient-checkpointing"], "--no-gradient-checkpointing applies to --train only"),
    (["--train", "lora", "--new-tokens", "100"], r"--new-tokens applies to inference only")])
def test_cli_refuses_options_that_would_change_nothing(capsys, argv, match):
    # each was silently ignored: the estimate printed as without it
    parser = argparse.ArgumentParser()
    est_mod.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--model", "smollm2-135m", "--length", "8192", *argv])
    with pytest.raises(SystemExit, match=match):
        args.func(args)
    args = parser.parse_args(["estimate", "--model", "smollm2-135m", "--length", "8192", "--train", "lora",
                              "--lora-r", "64"])
    assert args.func(args) == 0 and "LoRA" in capsys.readouterr().out


def test_dtype_errors_name_the_option_and_the_value():
    with pytest.raises(ValueError, match=r"^lora_dtype must be one of bf16, .*, got 'int8'$"):
        estimate(SMALL, 128, train="lora", lora_dtype="int8")
    with pytest.raises(ValueError, match=r"^dtype must be one of bf16, .*, got 'int4'$"):
        estimate(SMALL, 128, dtype="int4")
    with pytest.raises(ValueError, match=r"logits must be one of .*, got 'first'"):
        estimate(SMALL, 128, logits="first")


@pytest.mark.parametrize("family, over", [
    ("llama", {}), ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {"head_dim": 16}),
    ("gemma2", {"head_dim": 16}), ("gemma3_text", {"head_dim": 16, "num_key_value_heads": 2}), ("olmo", {}),
    ("olmo2", {"num_key_value_heads": 2}), ("gpt_neox", {}), ("gpt_neox", {"attention_bias": False}),
    ("bloom", {}), ("phi", {}), ("phi", {"qk_layernorm": True}), ("starcoder2", {}),
    ("starcoder2", {"use_bias": False}), ("cohere", {}), ("cohere", {"use_qk_norm": True}),
    ("llama", {"attention_bias": True}), ("llama", {"mlp_bias": True}),
    ("glm", {"head_dim": 16, "pad_token_id": 0}), ("stablelm", {"use_qkv_bias": True})])
def test_parameter_count_equals_the_real_models_of_several_families(family, over):
    # the estimate counted only q/k/v biases from a config's attention_bias, two norms per layer and no q/k norms:
    # llama's attention_bias (o too) and mlp_bias, qwen2 (q/k/v biases always), gpt_neox/phi/bloom/starcoder2 (o
    # and MLP biases), qwen3/gemma3/olmo2 (q/k norms), gemma2/3 (4 norms per layer), olmo (parameterless norms),
    # bloom (embedding LayerNorm, MLP 4h)
    config = AutoConfig.for_model(family, **{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                             "num_hidden_layers": 2, "vocab_size": 128, "tie_word_embeddings": False,
                                             **over})
    model = AutoModelForCausalLM.from_config(config)
    assert shape_of(config).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("length", ["abc", "4k", "", ",", "0", "1000,-5"])
def test_cli_refuses_a_bad_length_naming_the_option(capsys, length):
    # "abc" was a bare int() ValueError, "" and "," printed nothing and exited 0
    parser = argparse.ArgumentParser()
    est_mod.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--model", "smollm2-135m", "--length", length])
    with pytest.raises(SystemExit, match=r"--length must be one or more comma-separated token counts"):
        args.func(args)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("size", ["0", "0GiB", "0.1", 0, -5, True])
def test_a_zero_or_negative_gpu_memory_is_refused(size):
    # --gpu-memory 0 (or 0.1 bytes, rounded down) was accepted and format() divided by zero
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(size)
    with pytest.raises(ValueError, match="memory size"):
        estimate(SMALL, 128, gpu_memory=size).format()


@pytest.mark.parametrize("family, over", [
    ("stablelm", {"qk_layernorm": True}), ("stablelm", {"use_parallel_residual": True}),
    ("stablelm", {"qk_layernorm": True, "use_parallel_residual": True, "use_qkv_bias": True, "num_key_value_heads": 2}),
    ("glm4", {"head_dim": 16, "pad_token_id": 0}), ("olmo3", {"num_key_value_heads": 2}),
    ("qwen2", {"attention_bias": True})])
def test_parameter_count_follows_the_flags_of_the_exact_families(family, over):
    # stablelm's qk_layernorm (a bias-free LayerNorm per head) and use_parallel_residual (one norm per layer) were
    # not read; glm4 has 4 norms per layer, olmo3 olmo2's q/k norms; qwen2 ignores an attention_bias (o stays bare)
    config = AutoConfig.for_model(family, **{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                             "num_hidden_layers": 2, "vocab_size": 128, "tie_word_embeddings": False,
                                             **over})
    model = AutoModelForCausalLM.from_config(config)
    assert shape_of(config).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family, flag, over", [("gpt_neox", "attention_bias", {}), ("starcoder2", "use_bias", {}),
                                                ("glm", "attention_bias", {"head_dim": 16, "pad_token_id": 0})])
def test_parameter_count_of_a_config_dict_without_a_bias_flag(family, flag, over):
    # a config.json that leaves the flag out (pythia's, written before transformers had attention_bias) has the
    # biases (the config class's default is True): they were counted as absent
    config = AutoConfig.for_model(family, **{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                             "num_hidden_layers": 2, "vocab_size": 128, **over})
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    as_json = config.to_dict()
    del as_json[flag]
    assert shape_of(as_json).params == real


def test_mixture_of_experts_is_said_to_be_underestimated():
    # Mixtral-8x7B (46.7B parameters, 87 GiB in bf16) was "FITS in 80 GiB (18% used)" with no word of its experts
    mixtral = dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000, num_local_experts=8,
                   tie_word_embeddings=False, max_position_embeddings=32768)
    est = estimate(mixtral, 4096, gpu_memory="80GiB")
    assert any("mixture of experts (8 experts per layer)" in n and "underestimated" in n for n in est.notes)
    assert "underestimated" in est.format()
    assert not any("experts" in n for n in estimate(SMALL, 4096).notes)


@pytest.mark.parametrize("size", ["0", "abc", "0.5"])
def test_cli_refuses_a_bad_gpu_memory_naming_the_option(capsys, size):
    # --gpu-memory 0 (and abc) was a ValueError traceback out of estimate(), not naming the option
    parser = argparse.ArgumentParser()
    est_mod.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--model", "smollm2-135m", "--length", "1024", "--gpu-memory", size])
    with pytest.raises(SystemExit, match=r"--gpu-memory: .*memory size"):
        args.func(args)
    assert capsys.readouterr().out == ""


def test_rope_method_values_are_checked_and_a_factor_may_be_left_out():
    # yarn:factor=-2 (or abf:rope_theta=-1) was accepted and estimated as if it were a method
    for method, match in (("yarn:factor=-2", "option 'factor' must be a number > 0, got -2"),
                          ("yarn:factor=4:beta_fast=0.5", "option 'beta_fast' .* must be > 'beta_slow'"),
                          ("abf:rope_theta=-1", "option 'rope_theta' must be a number > 0")):
        with pytest.raises(ValueError, match=match):
            estimate(SMALL, 100, method=method)
    assert estimate(SMALL, 100, method="yarn").total == estimate(SMALL, 100, method="abf").total == \
        estimate(SMALL, 100).total                           # RoPE methods change no memory: no factor needed


@pytest.mark.parametrize("argv, match", [
    (["--method", "yarn:factr=4"], r"^longctx estimate: unknown yarn option\(s\) \['factr'\]"),
    (["--method", "yarn:factor=-2"], "^longctx estimate: option 'factor' must be a number > 0"),
    (["--method", "streaming:window_size=0"], "^longctx estimate: option 'window_size' must be a positive integer"),
    (["--batch", "0"], "^longctx estimate: batch must be an integer >= 1, got 0"),
    (["--gpus", "0"], "^longctx estimate: gpus must be an integer >= 1, got 0")])
def test_cli_errors_are_messages_not_tracebacks(argv, match):
    # estimate()'s ValueErrors came out of `longctx estimate` as tracebacks
    parser = argparse.ArgumentParser()
    est_mod.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--model", "smollm2-135m", "--length", "1024", *argv])
    with pytest.raises(SystemExit, match=match):
        args.func(args)
