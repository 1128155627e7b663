"""S2-Attn (LongLoRA shifted sparse attention): the attention function against a dense reference built
from the rule, strict causality, exact eval/removal, model-level parity on several families, errors."""

import sys
import warnings

import pytest
import torch

import longctx
import longctx.methods.s2attn  # noqa: F401  (registers "s2attn")
from longctx.methods.s2attn import S2AttnPatch, group_size_for, s2_attention, shifted_head_count
from conftest import _COMMON, ROPE_FAMILIES, VOCAB, build, tiny_model
from transformers import AutoConfig

BACKENDS = ["sdpa", "flex"]  # flash-attn needs CUDA


# -- the reference: the rule written out, and dense attention under a mask ---------------------------
def rule_mask(T, H, G, n_shift, valid=None, doc=None, window=None):
    """(B|1, H, T, T) bool: key j visible to query i, straight from the spec."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    heads = []
    for h in range(H):
        if T <= G:
            same = torch.ones(T, T, dtype=torch.bool)
        else:
            off = G // 2 if h >= H - n_shift else 0
            same = (i + off) // G == (j + off) // G
        heads.append((j <= i) & same)
    m = torch.stack(heads)[None]
    if valid is not None:
        m = m & valid[:, None, None, :]
    if doc is not None:
        m = m & (doc[:, None, :, None] == doc[:, None, None, :])
    if window is not None:
        m = m & (i - j < window)
    return m


def dense_attention(q, k, v, mask, scale, softcap=None):
    """(B, H, T, D) -> (B, T, H, D); rows without a visible key come out NaN (never compared)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def float_mask(mask, dtype=torch.float32):
    """A bool mask as the additive 4-D float mask an eager model takes."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def qkv(B, H, Hk, T, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=dtype) for h in (H, Hk, Hk)]


def padding(kind, B, T):
    valid = torch.ones(B, T, dtype=torch.bool)
    if kind == "left":
        valid[0, :5] = False
        valid[1, :2] = False
    elif kind == "right":
        valid[0, T - 6:] = False
    return valid


def assert_close_rows(out, ref, mask, tol=1e-10, queries=None):
    """Compare the rows of queries that have a visible key (and are real tokens: ``queries``, if given)."""
    rows = mask.expand(out.shape[0], -1, -1, -1).any(-1).transpose(1, 2)  # (B, T, H)
    if queries is not None:
        rows = rows & queries[:, :, None]
    assert rows.any()
    assert torch.isfinite(out).all()
    diff = (out - ref).abs()[rows].max().item()
    assert diff < tol, diff


# more families than conftest has (same sizes): qwen3, gemma; gemma2 (softcap, alternating sliding window)
EXTRA_FAMILIES = {
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "gemma": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=10, attn_logit_softcapping=20.0,
                   final_logit_softcapping=None),
    # multi-head latent attention: q/k heads of 8 + 8, value heads of 8 (no GQA), MoE after the first layer
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        first_k_dense_replace=1, n_group=1, topk_group=1),
}


def model_of(family, **overrides):
    if family in EXTRA_FAMILIES:
        return build(AutoConfig.for_model(family, **{**_COMMON, **EXTRA_FAMILIES[family], **overrides}))
    return tiny_model(family, **overrides)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# -- the attention function vs the rule, float64 -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [32, 37, 12, 5])  # multiple of G, odd, G < T < 2G, T < G
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_function_matches_rule(backend, T, pad):
    B, H, Hk, G = 2, 4, 2, 8
    q, k, v = qkv(B, H, Hk, T)
    valid = padding(pad, B, T) if pad else None
    n_shift = shifted_head_count(H, 0.5)
    out = s2_attention(q, k, v, group_size=G, n_shift=n_shift, scale=0.3, valid=valid, backend=backend)
    assert out.shape == (B, T, H, 8)
    mask = rule_mask(T, H, G, n_shift, valid)
    assert_close_rows(out, dense_attention(q, k, v, mask, 0.3), mask)


@pytest.mark.parametrize("T,Hk,shifted_heads", [(32, 2, 0.5), (37, 2, 0.5), (29, 4, 0.25), (12, 1, 0.5)])
def test_sdpa_gradients_match_rule(T, Hk, shifted_heads):
    """The sdpa path's backward (split pieces, cat-joined gradients) equals autograd through the dense
    reference: gradients of q, k and v in float64, GQA, odd lengths, a head split inside a K/V group."""
    B, H, G = 2, 4, 8
    q, k, v = (x.requires_grad_() for x in qkv(B, H, Hk, T, seed=5))
    n_shift = shifted_head_count(H, shifted_heads)
    w = torch.randn(B, T, H, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = s2_attention(q, k, v, group_size=G, n_shift=n_shift, scale=0.3, backend="sdpa")
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = dense_attention(q, k, v, rule_mask(T, H, G, n_shift), 0.3)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max().item() < 1e-10, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shifted_heads", [0.0, 0.25, 0.75, 1.0])  # 0.25/0.75: split inside a K/V head group
def test_function_shifted_head_fractions(backend, shifted_heads):
    B, H, Hk, T, G = 2, 4, 2, 29, 6
    q, k, v = qkv(B, H, Hk, T, seed=1)
    n_shift = shifted_head_count(H, shifted_heads)
    out = s2_attention(q, k, v, group_size=G, n_shift=n_shift, scale=0.25, backend=backend)
    mask = rule_mask(T, H, G, n_shift)
    assert_close_rows(out, dense_attention(q, k, v, mask, 0.25), mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_documents_window_softcap(backend):
    B, H, Hk, T, G = 2, 4, 1, 37, 8
    q, k, v = qkv(B, H, Hk, T, seed=2)
    doc = torch.tensor([[0] * 10 + [1] * 15 + [2] * 12, [0] * 37])
    valid = padding("right", B, T)
    for kw in (dict(doc=doc), dict(window=5), dict(doc=doc, valid=valid, window=6), dict(softcap=2.0)):
        out = s2_attention(q, k, v, group_size=G, n_shift=2, scale=0.4, backend=backend, **kw)
        mask = rule_mask(T, H, G, 2, kw.get("valid"), kw.get("doc"), kw.get("window"))
        assert_close_rows(out, dense_attention(q, k, v, mask, 0.4, kw.get("softcap")), mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_function_intersects_a_dense_4d_mask(backend, kind):
    B, H, Hk, T, G = 2, 4, 2, 21, 8
    q, k, v = qkv(B, H, Hk, T, seed=3)
    g = torch.Generator().manual_seed(0)
    user = torch.rand(B, 1, T, T, generator=g) > 0.3  # an arbitrary 4-D mask
    dense = user if kind == "bool" else float_mask(user, torch.float64)
    out = s2_attention(q, k, v, group_size=G, n_shift=2, scale=0.3, dense=dense, backend=backend)
    mask = rule_mask(T, H, G, 2) & user
    assert_close_rows(out, dense_attention(q, k, v, mask, 0.3), mask)


def test_group_size_rule():
    assert group_size_for(32768, 0.25) == 8192
    assert group_size_for(1001, 0.25) == 252  # ceil(250.25) = 251 -> even: 252
    assert group_size_for(37, 1.0) == 38  # ratio 1: one group for any length
    assert group_size_for(3, 0.1) == 2
    assert group_size_for(100, group_size=16) == 16


# -- through the model ---------------------------------------------------------------------------------
def attn_module(model):
    return next(m for n, m in model.named_modules() if n.endswith("attn") or n.endswith("attention"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_registered_function_with_transformers_masks(backend, pad):
    """The registered function, given what transformers passes it (2-D padding mask, position_ids)."""
    model = tiny_model("llama").train()
    patch = longctx.apply(model, "s2attn", group_size=8, backend=backend)
    B, H, Hk, T = 2, 4, 2, 37
    q, k, v = qkv(B, H, Hk, T, D=16, seed=4)
    valid = padding(pad, B, T) if pad else None
    positions = torch.tensor([list(range(10)) + list(range(27)), list(range(37))])  # row 0: two documents
    out, weights = patch._state.attention(attn_module(model), q, k, v, valid, position_ids=positions,
                                          scaling=0.25, dropout=0.0)
    assert weights is None
    doc = torch.tensor([[0] * 10 + [1] * 27, [0] * 37])
    mask = rule_mask(T, H, 8, 2, valid, doc)
    assert_close_rows(out, dense_attention(q, k, v, mask, 0.25), mask)


def test_mask_forms_passed_by_transformers():
    """Active: None without padding, the 2-D bool padding mask with it. Inactive: the original's mask.
    Seen by the first decoder layer during real forwards; a mask built outside the model's forward
    (here: by hand) is always the original's."""
    from transformers.masking_utils import create_causal_mask

    model = tiny_model("llama")
    longctx.apply(model, "s2attn", group_size=8)
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                                    with_kwargs=True)
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :3] = 0
    x = torch.randint(3, 100, (2, 12))
    model.train()
    model(x)
    model(x, attention_mask=am)
    assert seen[0] is None
    assert seen[1].shape == (2, 12) and seen[1].dtype == torch.bool and torch.equal(seen[1], am.bool())
    model.eval()  # original implementation (eager): a 4-D float mask
    model(x, attention_mask=am)
    assert seen[2].shape == (2, 1, 12, 12) and seen[2].dtype == torch.float32
    model.train()
    by_hand = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(2, 12, 64), attention_mask=am,
                                 past_key_values=None, position_ids=torch.arange(12)[None])
    assert by_hand.shape == (2, 1, 12, 12)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_ratio_one_is_full_causal_attention(family, ids):
    model = tiny_model(family).train()
    x = ids[:, :37]  # odd length
    ref = logits(model, x)
    with longctx.applied(model, "s2attn", group_size_ratio=1.0):
        out = logits(model, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - ref).abs().max() < 1e-6 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("family", ROPE_FAMILIES + ["qwen3", "gemma"])
def test_model_matches_eager_with_explicit_s2_mask(family, ids):
    """Patched training-mode logits == the unpatched (eager) model given the S2 mask as a 4-D float mask."""
    model = model_of(family).train()
    T, G = 45, 12
    x = ids[:, :T]
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2)))
    with longctx.applied(model, "s2attn", group_size=G):
        out = logits(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - logits(model, x)).abs().max() > 1e-3  # S2 is not full attention here


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_model_padding_matches_reference(family, pad, ids):
    model = tiny_model(family).train()
    T, G = 40, 16
    x = ids[:, :T]
    valid = padding(pad, 2, T)
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2, valid)))
    with longctx.applied(model, "s2attn", group_size=G):
        out = logits(model, x, attention_mask=valid.long())
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_model_packed_documents(family, ids):
    model = tiny_model(family).train()
    T, G = 40, 16
    x = ids[:, :T]
    positions = torch.tensor([list(range(13)) + list(range(27)), list(range(20)) + list(range(20))])
    doc = torch.tensor([[0] * 13 + [1] * 27, [0] * 20 + [1] * 20])
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2, doc=doc)), position_ids=positions)
    with longctx.applied(model, "s2attn", group_size=G):
        out = logits(model, x, position_ids=positions)
        out_nocache = logits(model, x, position_ids=positions, use_cache=False)  # transformers then detects packing too
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_nocache, ref, rtol=1e-5, atol=1e-5)


def test_model_sliding_window(ids):
    model = tiny_model("mistral", sliding_window=6).train()
    T, G = 40, 16
    x = ids[:, :T]
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2, window=6)))
    with longctx.applied(model, "s2attn", group_size=G):
        out = logits(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_model_per_layer_type_masks(family, ids):
    """Sliding-window and full layers (and gemma2's logit softcap): the reference gets one mask per layer type."""
    model = model_of(family).train()
    T, G = 40, 16
    x = ids[:, :T]
    H, W = model.config.num_attention_heads, model.config.sliding_window
    masks = {"full_attention": float_mask(rule_mask(T, H, G, H // 2)),
             "sliding_attention": float_mask(rule_mask(T, H, G, H // 2, window=W))}
    ref = logits(model, x, attention_mask=masks)
    with longctx.applied(model, "s2attn", group_size=G):
        out = logits(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_is_strictly_causal(family, backend, ids):
    """Changing token t never changes a logit before t: also right after shifted-group boundaries and at
    the last tokens, where LongLoRA's roll wraps the last shifted group around to the start."""
    model = tiny_model(family).train()
    T, G = 40, 8  # unshifted groups start at 0, 8, 16, ...; shifted ones at 0, 4, 12, 20, ...
    x = ids[:, :T].clone()
    longctx.apply(model, "s2attn", group_size=G, backend=backend)
    base = logits(model, x)
    for t in [1, 4, 5, 8, 12, 13, 20, 35, 36, 38, 39]:
        y = x.clone()
        y[:, t] = (y[:, t] + 7) % VOCAB
        out = logits(model, y)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.equal(out[:, t], base[:, t]), t


def test_eval_and_remove_are_bit_identical(ids):
    model = tiny_model("llama")
    x = ids[:, :50]
    am = torch.ones_like(x)
    am[0, :6] = 0
    ref_eval, ref_eval_pad = logits(model, x), logits(model, x, attention_mask=am)
    model.train()
    ref_train = logits(model, x)
    patch = longctx.apply(model, "s2attn", group_size_ratio=0.25)
    assert model.config._attn_implementation == patch.attn_implementation
    assert not torch.equal(logits(model, x), ref_train)
    model.eval()
    assert torch.equal(logits(model, x), ref_eval)
    assert torch.equal(logits(model, x, attention_mask=am), ref_eval_pad)
    model.train()
    patch.remove()
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model, x), ref_train)
    assert not hasattr(model.config, "longctx")


def test_train_only_false_applies_in_eval_and_generation_still_works(ids):
    model = tiny_model("llama")
    x = ids[:1, :24]
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(24, H, 8, H // 2)))
    longctx.apply(model, "s2attn", group_size=8, train_only=False)
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # prompt through S2, decoding steps (KV cache) through the original attention
        out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 28)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_flow(ids, checkpointing):
    model = tiny_model("llama").train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    longctx.apply(model, "s2attn", group_size=8, backend="sdpa")
    x = ids[:, :30]
    am = torch.ones_like(x)
    am[0, :5] = 0  # left padding: pad queries have no visible key
    labels = x.masked_fill(am == 0, -100)
    loss = model(x, attention_mask=am, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_attention_dropout_in_training(ids):
    model = tiny_model("llama", attention_dropout=0.5).train()
    longctx.apply(model, "s2attn", group_size=8)  # auto -> sdpa (flex has no dropout)
    x = ids[:1, :24]
    torch.manual_seed(0)
    a = logits(model, x)
    torch.manual_seed(1)
    b = logits(model, x)
    assert not torch.equal(a, b)
    model.eval()  # inactive and no dropout: deterministic
    assert torch.equal(logits(model, x), logits(model, x))


def test_peft_model(ids):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.train()
    patch = longctx.apply(lora, "s2attn", group_size=8)
    loss = lora(ids[:, :30], labels=ids[:, :30]).loss
    loss.backward()
    patch.remove()
    assert model.config._attn_implementation == "eager"


# -- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(group_size=7), "'group_size' must be an even integer >= 2"),
    (dict(group_size=0), "'group_size' must be an even integer >= 2"),
    (dict(group_size=2.0), "'group_size' must be an even integer >= 2"),
    (dict(group_size_ratio=0.0), r"'group_size_ratio' must be a number in \(0, 1\]"),
    (dict(group_size_ratio=1.5), r"'group_size_ratio' must be a number in \(0, 1\]"),
    (dict(group_size_ratio=0.25, group_size=16), "exclusive"),
    (dict(shifted_heads=1.5), r"'shifted_heads' must be a fraction in \[0, 1\]"),
    (dict(train_only="yes"), "'train_only' must be True or False"),
    (dict(backend="triton"), "'backend' must be one of 'auto', 'sdpa', 'flex', 'flash'"),
    (dict(flex_mode="max-autotune"), "'flex_mode': mode 'max-autotune' captures CUDA graphs"),
    (dict(flex_mode="fast"), "'flex_mode': unknown mode 'fast'; allowed modes: .*'max-autotune-no-cudagraphs'"),
    (dict(flex_kernel_options={"BLOCK_M": 48}), "BLOCK_M must be a power of two >= 16"),
    (dict(flex_kernel_options={"num_warps": 0}), "num_warps must be a positive integer"),
    (dict(flex_kernel_options={"PRESCALE_QK": 1}), "PRESCALE_QK must be True or False"),
    (dict(flex_kernel_options={"BLOCK_K": 64}), "unknown key 'BLOCK_K'; allowed: BLOCK_M, BLOCK_N"),
    (dict(flex_kernel_options=[("BLOCK_M", 64)]), "'flex_kernel_options' must be a dict or None"),
    (dict(backend="sdpa", flex_kernel_options={"BLOCK_M": 64}), "act on the flex backend only, but backend='sdpa'"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        longctx.apply(tiny_model("llama"), "s2attn", **options)


def test_default_options_and_slot():
    model = tiny_model("llama")
    patch = longctx.apply(model, "s2attn")
    assert isinstance(patch, S2AttnPatch) and patch.options.group_size_ratio == 0.25
    assert model.config.longctx[-1]["method"] == "s2attn"
    with pytest.raises(ValueError, match="already applied"):
        longctx.apply(model, "s2attn", group_size=8)
    assert patch._state.backend(torch.device("cpu"), 0.0, None) == "sdpa"


def test_flex_settings_not_used_are_reported():
    # flex_mode / flex_kernel_options tune the compiled CUDA flex kernel: a run on another backend says so (once)
    model = tiny_model("llama").train()
    patch = longctx.apply(model, "s2attn", group_size=8, flex_kernel_options={"BLOCK_M": 64, "num_warps": 4})
    ids = torch.randint(0, 100, (1, 24))
    with pytest.warns(UserWarning, match="flex_mode/flex_kernel_options are not used: this call runs the 'sdpa' "
                                         "backend on cpu"):
        model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids)  # once only
    patch.remove()


def test_flash_backend_needs_flash_attn():
    import importlib.util
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    with pytest.raises(ImportError, match="flash_attn"):
        longctx.apply(tiny_model("llama"), "s2attn", backend="flash")


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                      window_size=(-1, -1), softcap=0.0, **kw):
    """flash_attn_varlen_func's contract, computed densely on CPU: each cu_seqlens span is one sequence."""
    assert torch.equal(cu_q, cu_k) and causal and cu_q.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    assert q.shape[-1] == k.shape[-1] == v.shape[-1]  # one head size (flash-attn 2)
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i = torch.arange(b - a)[:, None]
        j = torch.arange(b - a)[None, :]
        m = j <= i
        if window_size[0] >= 0:
            m = m & (i - j <= window_size[0])
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[a:b] = dense_attention(qs[None], ks[None], vs[None], m, softmax_scale, softcap or None)[0]
    return out


def test_flash_backend_segments(monkeypatch):
    """The flash path's unpadding and cu_seqlens (row x document x group), with a CPU stand-in for flash-attn."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash_varlen))
    B, H, Hk, T, G = 2, 4, 2, 37, 8
    q, k, v = qkv(B, H, Hk, T, seed=5)
    doc = torch.tensor([[0] * 10 + [1] * 27, [0] * 37])
    for n_shift in (2, 1):
        for kw in (dict(), dict(valid=padding("left", B, T)), dict(valid=padding("right", B, T), doc=doc),
                   dict(window=5, softcap=3.0)):
            out = s2_attention(q, k, v, group_size=G, n_shift=n_shift, scale=0.3, backend="flash", **kw)
            mask = rule_mask(T, H, G, n_shift, kw.get("valid"), kw.get("doc"), kw.get("window"))
            # padded queries are dropped by the flash path (zero output): compare real tokens
            assert_close_rows(out, dense_attention(q, k, v, mask, 0.3, kw.get("softcap")), mask,
                              queries=kw.get("valid"))
    model = tiny_model("llama")
    patch = longctx.apply(model, "s2attn", group_size=8, backend="flash")  # importable now: no error
    assert patch._state.backend(torch.device("cpu"), 0.0, None) == "flash"


def test_sdpa_window_mask_on_the_inputs_device():
    # a sliding window shorter than a group with nothing else to mask (the sdpa fast path's case): the
    # within-group mask is built on the queries' device, not on the CPU (on CUDA: a device mismatch in SDPA)
    q, k, v = (torch.empty(1, h, 32, 8, device="meta") for h in (4, 2, 2))
    for softcap in (None, 3.0):
        out = s2_attention(q, k, v, group_size=16, n_shift=2, window=4, softcap=softcap, backend="sdpa")
        assert out.device.type == "meta" and out.shape == (1, 32, 4, 8)


def test_refused_apply_leaves_the_model_unchanged():
    # a model without AttentionInterface support is refused; no hook or module mark of the patch stays behind
    model = tiny_model("bloom")
    pre, post = dict(model.transformer._forward_pre_hooks), dict(model.transformer._forward_hooks)
    with pytest.raises(ValueError, match="does not support setting its attention implementation"):
        longctx.apply(model, "s2attn", group_size=8)
    assert model.config._attn_implementation == "eager" and not getattr(model.config, "longctx", None)
    assert dict(model.transformer._forward_pre_hooks) == pre and dict(model.transformer._forward_hooks) == post
    assert not any("_longctx_s2attn_member" in m.__dict__ for m in model.modules())


def test_flex_refuses_dropout():
    q, k, v = qkv(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="no attention dropout"):
        s2_attention(q, k, v, group_size=8, n_shift=2, dropout=0.1, backend="flex")


def test_decoding_delegates(ids):
    """q_len != kv_len (a KV cache) goes to the original attention unchanged, also with S2 active."""
    import copy

    model = tiny_model("llama").train()
    x = ids[:1, :20]
    with torch.no_grad():
        cache = model(x[:, :19], use_cache=True).past_key_values
        ref = model(x[:, 19:], past_key_values=copy.deepcopy(cache)).logits
    longctx.apply(model, "s2attn", group_size=8, train_only=False)
    with torch.no_grad():
        step = model(x[:, 19:], past_key_values=copy.deepcopy(cache)).logits
    assert torch.equal(step, ref)


# -- the patch acts for its own model instance and its own inputs ----------------------------------------
def test_position_ids_buffer_refilled_in_place():
    # a training loop that refills one position_ids buffer: the document boundaries follow its contents
    model = tiny_model("llama").train()
    longctx.apply(model, "s2attn", group_size=8)
    x = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    buf = torch.cat([torch.arange(10), torch.arange(14)])[None]
    packed = logits(model, x, position_ids=buf.clone())
    assert not torch.equal(logits(model, x, position_ids=buf), logits(model, x, position_ids=torch.arange(24)[None]))
    buf.copy_(torch.arange(24)[None])
    torch.testing.assert_close(logits(model, x, position_ids=buf), logits(model, x, position_ids=torch.arange(24)[None]),
                               rtol=0, atol=0)
    buf.copy_(torch.cat([torch.arange(10), torch.arange(14)])[None])
    with torch.inference_mode():  # inference tensors track no version: the per-forward reset covers them
        inf = buf.clone()
        a = model(x, position_ids=inf).logits
        inf.copy_(torch.arange(24)[None])
        b = model(x, position_ids=inf).logits
    torch.testing.assert_close(a, packed, rtol=0, atol=0)
    torch.testing.assert_close(b, logits(model, x, position_ids=torch.arange(24)[None]), rtol=0, atol=0)


def test_copies_and_shared_configs_are_not_patched():
    # the registered name travels with the config: a deepcopy, or a model sharing the config object,
    # calls the patch's functions too, and must behave as the unpatched model whatever the modes
    import copy

    model = tiny_model("llama")
    twin = type(model)(model.config)  # shares the config object
    twin.load_state_dict(model.state_dict())
    x = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 24, dtype=torch.long)
    am[1, :5] = 0
    full = logits(model.eval(), x, attention_mask=am)
    longctx.apply(model, "s2attn", group_size=8)
    dup = copy.deepcopy(model)
    s2 = logits(model.train(), x, attention_mask=am)
    assert (s2 - full)[am.bool()].abs().max() > 1e-3  # S2 is active in the patched model
    for other in (dup, twin):
        for model_mode, other_mode in ((True, False), (False, True), (True, True)):
            model.train(model_mode)
            other.train(other_mode)
            got = logits(other, x, attention_mask=am)
            torch.testing.assert_close(got[am.bool()], full[am.bool()], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model.train(), x, attention_mask=am), s2, rtol=0, atol=0)


def test_group_size_and_shifted_heads_arithmetic():
    import numpy as np

    assert [group_size_for(100, 0.14), group_size_for(50, 0.28), group_size_for(25, 0.56)] == [14, 14, 14]
    assert group_size_for(101, 0.14) == 16  # 14.14 rounds up to even
    assert longctx.apply(tiny_model("llama"), "s2attn", group_size=np.int64(8)).options.group_size == 8
    assert [shifted_head_count(9, 0.5), shifted_head_count(4, 0.25), shifted_head_count(1, 1.0)] == [4, 1, 1]
    for heads, frac in ((1, 0.5), (4, 0.1), (4, 0.9)):
        with pytest.raises(ValueError, match="option 'shifted_heads'=.* must leave at least one shifted and one"):
            shifted_head_count(heads, frac)
    with pytest.raises(ValueError, match="option 'shifted_heads'"):  # checked when applied, before any forward
        longctx.apply(tiny_model("llama"), "s2attn", shifted_heads=0.1)


def test_compiled_layers_do_not_recompile_per_layer():
    # train.compile_layers + s2attn: the attention function is traced once for every layer. (Checking the
    # patch's modules by WeakSet membership guarded each module's identity: one recompile per layer, and
    # past dynamo's limit of 8 the rest ran uncompiled; the compiled S2 step took 15 s on the H100.)
    from transformers import LlamaConfig, LlamaForCausalLM
    from longctx import train

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=10, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    patch = longctx.apply(model, "s2attn", group_size=16, backend="sdpa")
    train.compile_layers(model)
    model.train()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            model(torch.randint(0, 128, (1, 64)), use_cache=False).logits.sum().backward()
    # and no frame fell back to eager (an `in` test on the markers broke the graph: dynamo cannot trace ==
    # on plain objects); the one graph break is S2's attention, outside the graphs by design
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
    assert all("disable" in str(reason) for reason in counters["graph_break"]), dict(counters["graph_break"])
    train.uncompile_layers(model)
    patch.remove()
    assert not any("_longctx_s2attn_member" in m.__dict__ for m in model.modules())  # the marks go with the patch


def test_modules_shared_by_two_patched_models(monkeypatch):
    # two models sharing a decoder layer, each patched: both keep S2 in every layer, and removing one patch
    # leaves the other's (a single marker attribute was overwritten by the second patch and then deleted)
    import sys
    s2 = sys.modules["longctx.methods.s2attn"]
    calls = []
    real = s2._State._s2_attention
    monkeypatch.setattr(s2._State, "_s2_attention", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(1))
    A, B = tiny_model("llama").train(), tiny_model("llama", seed=1).train()
    B.model.layers[0] = A.model.layers[0]
    pa = longctx.apply(A, "s2attn", group_size=8)

    def s2_layers():
        calls.clear()
        with torch.no_grad():
            A(x)
        return len(calls)
    assert s2_layers() == 2
    pb = longctx.apply(B, "s2attn", group_size=8)
    assert s2_layers() == 2
    pb.remove()
    assert s2_layers() == 2
    pa.remove()
    assert s2_layers() == 0 and not any("_longctx_s2attn_member" in m.__dict__ for m in A.modules())


# -- the flex fast path: the mask function's BlockMask, flex traced inside compiled layers ---------------
@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """The BlockMask fast path (CUDA only in use) on CPU too, where flex runs unfused: exact, no backward."""
    import sys
    s2 = sys.modules["longctx.methods.s2attn"]
    monkeypatch.setattr(s2, "_FAST_PATH_DEVICES", ("cuda", "cpu"))
    calls = {"plain": 0, "general": 0}
    plain, general = s2._State._plain, s2._State._s2_attention
    monkeypatch.setattr(s2._State, "_plain",
                        lambda self, *a: calls.__setitem__("plain", calls["plain"] + 1) or plain(self, *a))
    monkeypatch.setattr(s2._State, "_s2_attention",
                        lambda self, *a: calls.__setitem__("general", calls["general"] + 1) or general(self, *a))
    return s2, calls


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2", "gemma2"])
def test_fast_path_equals_the_rule_and_the_general_path(family, backend, ids, fast_path_on_cpu):
    # gemma2: logit softcap in the attention, and sliding layers (their masks take the general path)
    s2, calls = fast_path_on_cpu
    model = model_of(family).eval()
    T, G = 45, 12
    x = ids[:, :T]
    H = model.config.num_attention_heads
    W = getattr(model.config, "sliding_window", None)
    types = getattr(model.config, "layer_types", None) or ["full_attention"]
    masks = {"full_attention": float_mask(rule_mask(T, H, G, H // 2)),
             "sliding_attention": float_mask(rule_mask(T, H, G, H // 2, window=W))}
    ref = logits(model, x, attention_mask=masks if len(set(types)) > 1 else masks["full_attention"])
    with longctx.applied(model, "s2attn", group_size=G, backend=backend, train_only=False):
        fast = logits(model, x)
        n_plain = calls["plain"]
        s2._FAST_PATH_DEVICES = ("cuda",)
        general = logits(model, x)
    n_layers = model.config.num_hidden_layers
    assert n_plain == sum(t == "full_attention" for t in (types * n_layers)[:n_layers]) > 0
    assert calls["plain"] == n_plain  # the general run did not take the fast path
    assert torch.equal(fast, general)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_flex_fast_path_only_without_padding_or_documents(ids, fast_path_on_cpu):
    # padding and packed documents (position_ids, with or without a 2-D mask) take the general path, exactly
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").eval()
    T, G = 40, 16
    x = ids[:, :T]
    H = model.config.num_attention_heads
    valid = padding("left", 2, T)
    positions = torch.tensor([list(range(13)) + list(range(27)), list(range(20)) + list(range(20))])
    doc = torch.tensor([[0] * 13 + [1] * 27, [0] * 20 + [1] * 20])
    with longctx.applied(model, "s2attn", group_size=G, backend="flex", train_only=False):
        padded = logits(model, x, attention_mask=valid.long())
        packed = logits(model, x, position_ids=positions, attention_mask=torch.ones(2, T, dtype=torch.long))
        plain_positions = logits(model, x, position_ids=torch.arange(T)[None])
        assert calls["plain"] == model.config.num_hidden_layers  # only the last call
    ref_pad = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2, valid)))
    ref_doc = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2, doc=doc)), position_ids=positions)
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2)))
    torch.testing.assert_close(padded[valid], ref_pad[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, ref_doc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_positions, ref, rtol=1e-5, atol=1e-5)


BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices", "seq_lengths", "BLOCK_SIZE")


@pytest.mark.parametrize("T", [1, 7, 127, 128, 129, 300, 513, 1100])
@pytest.mark.parametrize("G", [2, 5, 64, 129, 256, 1100])
@pytest.mark.parametrize("window", [None, 1, 3, 200])
def test_block_mask_from_intervals_equals_create_block_mask(T, G, window):
    # S2's BlockMask built from the rule's interval form (no T x T mask, no compiled builder) is the one
    # create_block_mask makes from the mask_mod: every count and index, for whole and partial blocks, odd
    # group sizes, lengths off the 128 grid, one group, no / some / all heads shifted, sliding windows
    from torch.nn.attention.flex_attention import create_block_mask
    s2 = sys.modules["longctx.methods.s2attn"]
    H = 3
    for n_shift in range(H + 1):
        mask_mod = s2.s2_mask_mod(T, G, H, n_shift, s2._Constraints(window=window))
        ref = create_block_mask(mask_mod, None, H, T, T, device="cpu")
        got = s2._s2_block_mask(T, G, H, n_shift, torch.device("cpu"), mask_mod, window)
        assert got.mask_mod is mask_mod
        assert_same_block_mask(got, ref, n_shift)


def assert_same_block_mask(got, ref, *where):
    for name in BLOCK_MASK_FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        # strides too: flex's Triton kernels read the indices as contiguous
        same = lambda x: (x.dtype, x.stride(), x.storage_offset())  # noqa: E731
        assert (torch.equal(a, b) and same(a) == same(b) if torch.is_tensor(a) else a == b), (name, *where)


@pytest.mark.parametrize("T", [1, 130, 300, 640])
@pytest.mark.parametrize("G", [4, 64, 100, 700])
@pytest.mark.parametrize("window", [None, 50])
def test_block_mask_from_intervals_with_padding_and_documents(T, G, window):
    # per-row BlockMasks: left / right / no / all padding (each row's valid keys one run) and packed documents
    # of several lengths, alone and together, against create_block_mask; a row whose valid keys are not one run,
    # or whose document ids go down (a document in two pieces), is left to create_block_mask (None)
    from torch.nn.attention.flex_attention import create_block_mask
    s2 = sys.modules["longctx.methods.s2attn"]
    B, cpu = 4, torch.device("cpu")
    g = torch.Generator().manual_seed(T + G)
    pad = torch.randint(0, T + 1, (B,), generator=g).tolist()
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :pad[0]] = False  # left padding
    valid[1, T - pad[1]:] = False  # right padding
    valid[2] = False  # nothing valid
    starts = torch.rand(B, T, generator=g) < 0.01 + 3.0 / T
    doc = starts.long().cumsum(-1)
    doc[3] = 0  # one document
    for v, d in [(valid, None), (None, doc), (valid, doc), (valid[:1], None)]:
        rows = B if (d is not None or v is not None and v.shape[0] > 1) else 1
        cons = s2._Constraints(valid=None if v is None else v.expand(rows, T), doc=d, window=window)
        for H, n_shift in ((1, 0), (1, 1), (2, 0), (2, 1), (2, 2)):  # H = 1: the head stride is the row's
            mask_mod = s2.s2_mask_mod(T, G, H, n_shift, cons)
            ref = create_block_mask(mask_mod, rows, H, T, T, device="cpu")
            got = s2._s2_block_mask(T, G, H, n_shift, cpu, mask_mod, window, v, d, rows)
            assert_same_block_mask(got, ref, n_shift, v is None, d is None)
    if T > 2:
        holes = torch.ones(1, T, dtype=torch.bool)
        holes[0, 1] = False
        assert s2._s2_block_mask(T, G, 2, 1, cpu, None, None, holes, None, 1) is None
        pieces = torch.zeros(1, T, dtype=torch.long)
        pieces[0, 1] = 1
        assert s2._s2_block_mask(T, G, 2, 1, cpu, None, None, None, pieces, 1) is None


def test_flex_block_masks_come_from_intervals(ids, fast_path_on_cpu, monkeypatch):
    # flex's BlockMasks (fast path, general path, left padding) are built without create_block_mask;
    # padding with holes still uses it. Where the interval form is unavailable (older torch), the
    # compiled builder takes over, with the same logits
    s2, calls = fast_path_on_cpu
    built = []
    real = s2._create_block_mask
    monkeypatch.setattr(s2, "_create_block_mask", lambda *a, **k: built.append(a) or real(*a, **k))
    model = tiny_model("llama").eval()
    x = ids[:, :40]
    with longctx.applied(model, "s2attn", group_size=16, backend="flex", train_only=False):
        plain = logits(model, x)
        assert calls["plain"] == model.config.num_hidden_layers and not built
        monkeypatch.setattr(s2, "_FAST_PATH_DEVICES", ())  # the general path, per call
        assert torch.equal(logits(model, x), plain) and not built
        logits(model, x, attention_mask=padding("left", 2, 40).long())
        assert not built  # left padding: each row's valid keys are one run
        holes = torch.ones(2, 40, dtype=torch.long)
        holes[:, 3] = 0
        logits(model, x, attention_mask=holes)
        assert built  # other padding: per-row masks from create_block_mask
    built.clear()
    monkeypatch.setattr(s2, "_FAST_PATH_DEVICES", ("cpu",))
    monkeypatch.setattr(s2, "_s2_block_mask", lambda *a, **k: None)
    with longctx.applied(model, "s2attn", group_size=16, backend="flex", train_only=False):
        assert torch.equal(logits(model, x), plain)
    assert built


def test_block_mask_from_intervals_needs_seq_lengths(monkeypatch):
    s2 = sys.modules["longctx.methods.s2attn"]

    def old_from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                           BLOCK_SIZE=128, mask_mod=None):
        pytest.fail("called without seq_lengths")
    monkeypatch.setattr(s2.BlockMask, "from_kv_blocks", old_from_kv_blocks)
    assert s2._s2_block_mask(300, 64, 2, 1, torch.device("cpu"), s2.s2_mask_mod(300, 64, 2, 1)) is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fast", [True, False])
def test_module_in_eval_gets_causal_attention(attn, fast, ids, monkeypatch):
    # the mask follows the base model's mode, the attention each module's: an eval-mode layer in a training
    # model gets the original's causal attention, with the original's own mask (None handed to eager attended
    # to everything, in both paths), bit-identical on both paths
    import sys
    s2 = sys.modules["longctx.methods.s2attn"]
    monkeypatch.setattr(s2, "_FAST_PATH_DEVICES", ("cuda", "cpu") if fast else ("cuda",))
    model = tiny_model("llama").train()
    model.set_attn_implementation(attn)  # tiny models are built eager
    model.model.layers[0].eval()
    x = ids[:1, :40]
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % VOCAB
    with longctx.applied(model, "s2attn", group_size=16, backend="flex"):
        a, b = logits(model, x), logits(model, y)
        monkeypatch.setattr(s2, "_FAST_PATH_DEVICES", ("cuda",))
        general = logits(model, x)
    assert torch.equal(a[:, :-1], b[:, :-1])  # causal: the last token changes nothing before it
    assert torch.equal(a, general)


def test_model_running_flex_attention_unchanged_while_s2_inactive(ids):
    # transformers' own flex_attention implementation hands its layers BlockMasks too: only S2's are taken
    # for S2's (an eval model got None instead of its causal BlockMask: it attended to everything)
    model = tiny_model("llama").eval()
    model.set_attn_implementation("flex_attention")
    x = ids[:1, :40]
    ref = logits(model, x)
    with longctx.applied(model, "s2attn", group_size=16):
        out = logits(model, x)
    assert torch.equal(out, ref)


def test_flex_fast_path_position_ids_not_plain_2d(ids, fast_path_on_cpu):
    # position_ids passed positionally, or in another layout than (B, T) (qwen2-vl's (4, B, T) rows): the
    # mask function cannot read documents from them, so the general path runs (it reads the layers' 2-D ones)
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").eval()
    T, G = 40, 16
    x = ids[:, :T]
    positions = torch.tensor([list(range(13)) + list(range(27)), list(range(20)) + list(range(20))])
    with longctx.applied(model, "s2attn", group_size=G, backend="flex", train_only=False), torch.no_grad():
        by_keyword = model.model(input_ids=x, position_ids=positions).last_hidden_state
        assert calls["plain"] == 0
        positional = model.model(x, None, positions).last_hidden_state
        assert calls["plain"] == 0
    assert torch.equal(positional, by_keyword)
    # qwen2-vl: (4, B, T) position_ids, the text positions in row 0, two packed documents
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = Qwen2VLConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                         max_position_embeddings=64,
                                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, in_chans=3),
                        vocab_size=VOCAB, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, pad_token_id=0)
    torch.manual_seed(0)
    vl = Qwen2VLForConditionalGeneration(cfg).eval()
    text = torch.tensor([list(range(15)) + list(range(25))])
    pos = torch.cat([text[None], text[None].expand(3, 1, T)], 0)
    y = x[:1].clone()
    y[0, 3] = (y[0, 3] + 1) % (VOCAB - 3)
    with longctx.applied(vl, "s2attn", group_size=G, backend="flex", train_only=False), torch.no_grad():
        a = vl(input_ids=x[:1], position_ids=pos, use_cache=True).logits
        b = vl(input_ids=y, position_ids=pos, use_cache=True).logits
    assert calls["plain"] == 0
    assert torch.equal(a[0, 15:], b[0, 15:])  # the second document does not see the first


def test_flex_fast_path_nested_forward_reads_its_own_position_ids(ids, fast_path_on_cpu):
    # a forward of the same model inside another (here from a layer's pre-hook): the inner one's packed
    # documents are its own (the outer forward's position_ids were used)
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").eval()
    x = ids[:1, :40]
    packed = torch.tensor([list(range(20)) + list(range(20))])
    inner = {}

    def run_inner(module, args):
        if "h" not in inner:
            inner["h"] = None
            inner["h"] = model.model(input_ids=x, position_ids=packed).last_hidden_state

    with longctx.applied(model, "s2attn", group_size=16, backend="flex", train_only=False) as patch, torch.no_grad():
        alone = model.model(input_ids=x, position_ids=packed).last_hidden_state
        hook = model.model.layers[0].register_forward_pre_hook(run_inner)
        try:
            model(x)
        finally:
            hook.remove()
        state = patch._state
        assert state.positions == [] and state.depth == 0  # nothing left from the forwards
    assert torch.equal(inner["h"], alone)
    assert not state.block_masks and state.causal_kwargs is None  # remove() drops what it kept


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_fast_path_head_count_and_window_fallbacks(backend, ids, fast_path_on_cpu):
    # a config whose head count differs from the modules' (the BlockMask does not fit): the general path,
    # exactly; a sliding window shorter than a group arriving with the BlockMask: flex's BlockMask has no
    # window (the general path), sdpa applies it itself: both exact
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").eval()
    T, G = 40, 16
    x = ids[:, :T]
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2)))
    model.config.num_attention_heads = 2 * H  # read by the mask function only; the modules keep H heads
    try:
        with longctx.applied(model, "s2attn", group_size=G, backend=backend, train_only=False):
            out = logits(model, x)
    finally:
        model.config.num_attention_heads = H
    assert calls["plain"] == model.config.num_hidden_layers and calls["general"] == calls["plain"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the window: the attention function itself, given S2's BlockMask and sliding_window=6
    q, k, v = qkv(1, 4, 2, T, dtype=torch.float32)
    with longctx.applied(model, "s2attn", group_size=G, backend=backend, train_only=False) as patch:
        state = patch._state
        logits(model, x)
        (block_mask,) = state.block_masks.values()  # the one the forward used, kept for the next
        module = model.model.layers[0].self_attn
        with torch.no_grad():
            out, _ = state.attention(module, q, k, v, block_mask, scaling=0.5, sliding_window=6)
    want = dense_attention(q.double(), k.double(), v.double(), rule_mask(T, 4, G, 2, window=6), 0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_deepcopy_shares_the_patch_state(ids, fast_path_on_cpu):
    # a deep copy of a patched model copies its hooks; they share the state (and act only for the original):
    # the copy holds no second set of cached BlockMasks, and after remove() nothing cached is left anywhere
    import copy
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").eval()
    x = ids[:1, :40]
    ref = logits(model, x)
    patch = longctx.apply(model, "s2attn", group_size=16, backend="flex", train_only=False)
    logits(model, x)
    state = patch._state
    assert state.block_masks
    twin = copy.deepcopy(model)
    hooks = list(twin.model._forward_pre_hooks.values())
    assert any(getattr(h, "__self__", None) is state for h in hooks)
    patch.remove()
    assert not state.block_masks
    assert torch.equal(logits(twin, x), ref)  # the copy runs unpatched


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("hooks", [False, True])
def test_fast_path_traces_without_graph_breaks(backend, hooks, ids, monkeypatch):
    # inside a compiled layer the fast path is one graph: flex_attention, or the grouped SDPA calls, traced
    # (dynamo only, no inductor; fullgraph=True: a graph break, e.g. in the general path, is an error); also
    # with accelerate's device hooks, whose BlockMask copies carry S2's marks on their mask_mod only
    import sys

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    monkeypatch.setattr(sys.modules["longctx.methods.s2attn"], "_FAST_PATH_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama").eval()
    if hooks:
        for layer in model.model.layers:
            add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    x = ids[:, :40]
    with longctx.applied(model, "s2attn", group_size=16, backend=backend, train_only=False):
        eager = logits(model, x)
        counter = torch._dynamo.testing.CompileCounter()
        torch._dynamo.reset()
        for layer in model.model.layers:
            layer.self_attn.compile(backend=counter, fullgraph=True)
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = logits(model, x, use_cache=False)
                compiled2 = logits(model, x, use_cache=False)
        finally:
            for layer in model.model.layers:
                layer.self_attn._compiled_call_impl = None
            torch._dynamo.reset()
    assert counter.frame_count == 1
    assert torch.equal(compiled, eager) and torch.equal(compiled2, eager)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sdpa_fast_path_gradients_equal_the_general_path(dropout, ids, fast_path_on_cpu):
    # training with the sdpa backend (auto's choice under attention dropout): the fast path's loss and
    # gradients are bit-identical to the general path's, dropout included (the same SDPA calls, same order)
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama", attention_dropout=dropout).train()
    model.set_attn_implementation("sdpa")
    x = ids[:, :45]

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    with longctx.applied(model, "s2attn", group_size=12, backend="sdpa" if not dropout else "auto"):
        fast = step()
        assert calls["plain"] == model.config.num_hidden_layers and calls["general"] == 0
        s2._FAST_PATH_DEVICES = ("cuda",)
        general = step()
        assert calls["general"] == model.config.num_hidden_layers
    assert torch.equal(fast[0], general[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], general[1]))
    if dropout:  # dropout acted: without it the loss differs
        model.config.attention_dropout = 0.0
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.0
        with longctx.applied(model, "s2attn", group_size=12, backend="sdpa"):
            assert not torch.equal(step()[0], fast[0])


def test_sdpa_fast_path_mask_is_a_small_sign(ids, fast_path_on_cpu, monkeypatch):
    # sdpa never reads S2's BlockMask: its fast path gets a (1, H, T, T) BlockMask of one block per head,
    # without building the real one (H * (T/128)^2 indices per shape)
    s2, calls = fast_path_on_cpu
    monkeypatch.setattr(s2, "_create_block_mask", lambda *a, **k: pytest.fail("built S2's BlockMask for sdpa"))
    monkeypatch.setattr(s2, "_s2_block_mask", lambda *a, **k: pytest.fail("built S2's BlockMask for sdpa"))
    model = tiny_model("llama").eval()
    H = model.config.num_attention_heads
    with longctx.applied(model, "s2attn", group_size=16, backend="sdpa", train_only=False) as patch:
        logits(model, ids[:, :40])
        (sign,) = patch._state.block_masks.values()
    assert calls["plain"] == model.config.num_hidden_layers
    assert sign.shape == (1, H, 40, 40) and sign.kv_indices.numel() == H


def test_auto_runs_sdpa_for_dropout_the_config_does_not_declare(ids, fast_path_on_cpu, monkeypatch):
    # auto picks the fast path's backend from config.attention_dropout; a model keeping its dropout elsewhere
    # (gpt2: attn_pdrop) gets flex's BlockMask but calls with dropout: sdpa runs on the fast path (no graph
    # break), equal to the general path (which picks sdpa per call). auto's CUDA choice is simulated on CPU.
    s2, calls = fast_path_on_cpu
    backend = s2._State.backend
    monkeypatch.setattr(s2._State, "backend", lambda self, device, dropout, dense: "flex" if (
        self.options.backend == "auto" and not dropout) else backend(self, device, dropout, dense))
    model = tiny_model("llama").train()
    model.set_attn_implementation("sdpa")
    assert not model.config.attention_dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    x = ids[:, :45]

    def run():
        torch.manual_seed(1)
        return logits(model, x, use_cache=False)

    with longctx.applied(model, "s2attn", group_size=12) as patch:
        fast = run()
        assert {k[-1] for k in patch._state.block_masks} == {"flex"}
        assert calls["plain"] == model.config.num_hidden_layers and calls["general"] == 0
        s2._FAST_PATH_DEVICES = ("cuda",)
        general = run()
    assert torch.equal(fast, general)


@pytest.fixture
def auto_as_on_cuda(monkeypatch):
    """auto's CUDA choice on CPU: flex unless there is dropout (declared in the config, or in the call)."""
    import sys
    s2 = sys.modules["longctx.methods.s2attn"]
    backend = s2._State.backend
    monkeypatch.setattr(s2._State, "backend", lambda self, device, dropout, dense: "flex" if (
        self.options.backend == "auto" and not dropout) else backend(self, device, dropout, dense))


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_fast_path_survives_accelerate_device_hooks(backend, ids, fast_path_on_cpu):
    # device_map / offloading put accelerate's hooks on the layers; they move every input with .to(), and
    # BlockMask.to() makes a new BlockMask: S2 still knows it (by its mask_mod) instead of raising TypeError
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").eval()
    T, G = 40, 16
    H = model.config.num_attention_heads
    ref = logits(model, ids[:, :T], attention_mask=float_mask(rule_mask(T, H, G, H // 2)))
    for layer in model.model.layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    try:
        with longctx.applied(model, "s2attn", group_size=G, backend=backend, train_only=False):
            out = logits(model, ids[:, :T])
    finally:
        for layer in model.model.layers:
            remove_hook_from_module(layer)
    assert calls["plain"] == model.config.num_hidden_layers and calls["general"] == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_backend_follows_declared_dropout_on_both_paths(ids, fast_path_on_cpu, auto_as_on_cuda, monkeypatch):
    # a config declaring attention dropout makes auto pick sdpa for the model, also for calls without dropout
    # (eval with train_only=False): the fast path (its sign) and the general path run the same backend, bit-identical
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama", attention_dropout=0.1).eval()
    model.set_attn_implementation("sdpa")
    ran = []
    for name in ("_sdpa_backend", "_flex_backend"):
        monkeypatch.setattr(s2, name, lambda *a, _fn=getattr(s2, name), _n=name, **k: ran.append(_n) or _fn(*a, **k))
    with longctx.applied(model, "s2attn", group_size=12, train_only=False):
        fast = logits(model, ids[:, :45])
        s2._FAST_PATH_DEVICES = ("cuda",)
        general = logits(model, ids[:, :45])
    assert calls["plain"] == calls["general"] == model.config.num_hidden_layers
    assert set(ran) == {"_sdpa_backend"}
    assert torch.equal(fast, general)


def test_sdpa_sign_unavailable_takes_the_general_path(ids, fast_path_on_cpu, monkeypatch):
    # a torch whose BlockMask.from_kv_blocks has no seq_lengths cannot build the sign: the general path, exact
    s2, calls = fast_path_on_cpu

    def old_from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                           BLOCK_SIZE=128, mask_mod=None):
        pytest.fail("called without seq_lengths")
    monkeypatch.setattr(s2.BlockMask, "from_kv_blocks", old_from_kv_blocks)
    model = tiny_model("llama").eval()
    T, G = 40, 16
    H = model.config.num_attention_heads
    ref = logits(model, ids[:, :T], attention_mask=float_mask(rule_mask(T, H, G, H // 2)))
    with longctx.applied(model, "s2attn", group_size=G, backend="sdpa", train_only=False) as patch:
        out = logits(model, ids[:, :T])
        assert not patch._state.block_masks
    assert calls["plain"] == 0 and calls["general"] == model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_undeclared_dropout_reports_unused_flex_settings(ids, fast_path_on_cpu, auto_as_on_cuda):
    # auto with flex_mode on a model keeping its dropout outside config.attention_dropout: the mask function
    # picks flex, every call has dropout and runs sdpa: the "not used" warning, once, as on the general path
    s2, calls = fast_path_on_cpu
    model = tiny_model("llama").train()
    model.set_attn_implementation("sdpa")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    with longctx.applied(model, "s2attn", group_size=12, flex_mode="max-autotune-no-cudagraphs"), \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logits(model, ids[:, :45], use_cache=False)
        logits(model, ids[:, :45], use_cache=False)
    said = [str(w.message) for w in seen if "s2attn" in str(w.message)]
    assert calls["plain"] == 2 * model.config.num_hidden_layers and calls["general"] == 0
    assert len(said) == 1 and "flex_mode/flex_kernel_options are not used: this call runs the 'sdpa'" in said[0], said


@pytest.mark.parametrize("setting", ["flex_mode", "flex_kernel_options"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("compiled", ["all", "first"])
def test_flex_settings_warnings_leave_compiled_layers_one_graph(setting, dropout, compiled, ids, auto_as_on_cuda,
                                                                monkeypatch):
    # with flex settings, the warnings are said outside the compiled graphs (by the mask function): a compiled
    # attention module stays one graph, with no recompile, also when an eager layer says a warning between
    # forwards; each true warning said once. dropout 0.3: gpt2-style dropout the config does not declare (the
    # mask function picks flex, the calls run sdpa: the settings are not used)
    import sys

    import torch._dynamo.testing
    monkeypatch.setattr(sys.modules["longctx.methods.s2attn"], "_FAST_PATH_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama").train()
    model.set_attn_implementation("sdpa")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    x = ids[:, :48]
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    options = {"flex_mode": "max-autotune-no-cudagraphs"} if setting == "flex_mode" else {
        "flex_kernel_options": {"BLOCK_M": 64}}
    layers = model.model.layers if compiled == "all" else model.model.layers[:1]
    with longctx.applied(model, "s2attn", group_size=12, **options), \
            warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        for layer in layers:
            layer.self_attn.compile(backend=counter, fullgraph=True)
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(3):
                    logits(model, x, use_cache=False)
        finally:
            for layer in layers:
                layer.self_attn._compiled_call_impl = None
            torch._dynamo.reset()
    said = sorted(str(w.message) for w in seen if "s2attn" in str(w.message))
    assert counter.frame_count == 1
    expected = (["does not apply inside compiled decoder layers"] if setting == "flex_mode" else []) + (
        ["are not used: this call runs the 'sdpa'"] if dropout else [])
    assert len(said) == len(expected) and all(any(e in s for s in said) for e in expected), said


def test_flex_mode_warning_only_where_flex_runs(ids, monkeypatch):
    # auto with flex_mode, where auto runs sdpa (here CPU) inside a compiled layer: the one warning that
    # flex_mode is not used, not the one that says flex is traced into the layer
    import sys
    monkeypatch.setattr(sys.modules["longctx.methods.s2attn"], "_FAST_PATH_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama").eval()
    attn = model.model.layers[1].self_attn
    attn._compiled_call_impl = attn._call_impl  # a layer marked compiled (runs its eager code)
    try:
        with longctx.applied(model, "s2attn", group_size=16, train_only=False,
                             flex_mode="max-autotune-no-cudagraphs"), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            logits(model, ids[:, :40])
    finally:
        attn._compiled_call_impl = None
    said = [str(w.message) for w in seen if "s2attn" in str(w.message)]
    assert len(said) == 1 and "flex_mode/flex_kernel_options are not used" in said[0], said


def test_flex_mode_under_compiled_layers_is_reported(ids, monkeypatch):
    # the fast path traces flex into compiled layers, where flex_mode cannot act: said once, not ignored
    import sys
    monkeypatch.setattr(sys.modules["longctx.methods.s2attn"], "_FAST_PATH_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama").eval()
    x = ids[:, :40]
    attn = model.model.layers[1].self_attn
    with longctx.applied(model, "s2attn", group_size=16, backend="flex", train_only=False,
                         flex_mode="max-autotune-no-cudagraphs"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="s2attn: flex_mode/flex_kernel_options are not used")  # CPU
        warnings.filterwarnings("error", message="s2attn: flex_mode=")
        logits(model, x)  # eager layers: no warning
        attn._compiled_call_impl = attn._call_impl  # a layer marked compiled (runs its eager code)
        try:
            with pytest.raises(UserWarning, match="flex_mode='max-autotune-no-cudagraphs' does not apply inside compiled"):
                logits(model, x)
            logits(model, x)  # once
        finally:
            attn._compiled_call_impl = None


@pytest.mark.parametrize("backend", BACKENDS + ["flash"])
def test_value_head_size_differs(backend, monkeypatch):
    # DeepSeek-V3-style attention: values narrower than queries/keys (the sdpa and flash backends reshaped them
    # with q's size; flash-attn takes one head size: values are padded, the output cropped)
    import sys
    import types
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash_varlen))
    T, G = 37, 8
    q, k, _ = qkv(2, 4, 2, T, D=12)
    v = torch.randn(2, 2, T, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    valid = padding("left", 2, T)
    for kw in (dict(), dict(valid=valid)):
        out = s2_attention(q, k, v, group_size=G, n_shift=2, backend=backend, **kw)
        mask = rule_mask(T, 4, G, 2, kw.get("valid"))
        assert out.shape == (2, T, 4, 8)
        assert_close_rows(out, dense_attention(q, k, v, mask, 12 ** -0.5), mask, queries=kw.get("valid"))


def test_deepseek_v3_model(ids):
    model = model_of("deepseek_v3").train()
    T, G = 40, 16
    x = ids[:, :T]
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, H, G, H // 2)))
    with longctx.applied(model, "s2attn", group_size=G):
        out = logits(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - logits(model, x)).abs().max() > 1e-3  # S2 is not full attention here


def test_non_causal_attention_left_alone(ids):
    # the original's causal mask is rebuilt only for causal self-attention: a bidirectional decoder and an
    # encoder-decoder (cross-attention has other key lengths) run exactly as unpatched, S2 active or not
    from transformers import BartConfig, BartForConditionalGeneration
    x = ids[:, :40]
    for train in (False, True):
        model = tiny_model("llama").train(train)
        model.config.is_causal = False
        ref = logits(model, x)
        with longctx.applied(model, "s2attn", group_size=16):
            logits(tiny_model("llama").train(), x)  # an active causal mask call elsewhere does not matter
            out = logits(model, x)
        assert torch.equal(out, ref)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)
    torch.manual_seed(0)
    bart = BartForConditionalGeneration._from_config(cfg, attn_implementation="eager").train()
    src, tgt = ids[:1, :30], ids[1:, :20]
    bart.model.decoder.layers[0].eval()  # not running S2 while its mask function is active
    ref = logits(bart, src, decoder_input_ids=tgt)
    with longctx.applied(bart, "s2attn", group_size=8):
        bart.model.decoder.layers[0].self_attn.eval()
        out = logits(bart, src, decoder_input_ids=tgt)
    assert torch.isfinite(out).all() and out.shape == ref.shape


@pytest.mark.parametrize("family,window", [("mistral", 16), ("mistral", 64), ("gemma3_text", None)])
def test_eval_layers_in_training_model_with_sliding_windows(family, window, ids):
    # every layer in eval mode inside a training model: nothing runs S2, so the output is the unpatched one; the
    # dense bool masks S2's mask function builds for windows shorter than T reach eager in its additive form, and
    # a window of at least T (no mask call but sliding ones, all skipped) still gets the causal mask
    overrides = {"sliding_window": window} if window else {}
    model = model_of(family, **overrides).train()
    for layer in model.model.layers:
        layer.eval()
    x = ids[:, :40]
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB
    ref = logits(model, x)
    with longctx.applied(model, "s2attn", group_size=16):
        out, changed = logits(model, x), logits(model, y)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, :-1], changed[:, :-1])  # causal
    model.set_attn_implementation("flex_attention")  # which cannot take a dense mask: said, not run wrongly
    with longctx.applied(model, "s2attn", group_size=16):
        if window is not None and window >= 40:
            torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(NotImplementedError, match="got a dense mask, which transformers' flex_attention"):
                logits(model, x)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_eval_layers_in_training_model_with_packed_documents(attn, ids):
    # S2's mask function lets transformers' packed-document mask skip (S2 reads the documents from position_ids);
    # a module that does not run S2 gets the mask transformers would have built (documents kept apart)
    model = tiny_model("llama").train()
    model.set_attn_implementation(attn)
    for layer in model.model.layers:
        layer.eval()
    x = ids[:, :40]
    packed = torch.tensor([list(range(20)) + list(range(20))] * 2)
    ref = logits(model, x, position_ids=packed, use_cache=False)
    with longctx.applied(model, "s2attn", group_size=16):
        out = logits(model, x, position_ids=packed, use_cache=False)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_eval_layers_packed_documents_all_sliding_qwen2(attn, ids):
    # qwen2 with every layer sliding (window >= T) builds a full and a sliding mask: with packed documents both are
    # skipped by S2's mask function, and each eval-mode layer gets the one of its own kind (was: an error)
    model = model_of("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0,
                     layer_types=["sliding_attention", "sliding_attention"]).train()
    model.set_attn_implementation(attn)
    for layer in model.model.layers:
        layer.eval()
    x = ids[:, :40]
    packed = torch.tensor([list(range(20)) + list(range(20))] * 2)
    ref = logits(model, x, position_ids=packed, use_cache=False)
    with longctx.applied(model, "s2attn", group_size=16):
        out = logits(model, x, position_ids=packed, use_cache=False)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_copy_run_after_a_packed_training_forward(ids):
    # what a patched forward records for modules not running S2 ends with that forward: a deep copy (or a model
    # sharing the config) run afterwards runs as unpatched (it got the last batch's packed-document mask)
    import copy
    model = tiny_model("llama").train()
    model.set_attn_implementation("sdpa")
    x = ids[:, :40]
    packed = torch.tensor([list(range(20)) + list(range(20))] * 2)
    ref, ref24 = logits(model.eval(), x), logits(model, x[:, :24])
    with longctx.applied(model.train(), "s2attn", group_size=16):
        twin = copy.deepcopy(model).eval()  # its config names S2's functions: they run, for a model not patched
        logits(model, x, position_ids=packed, use_cache=False)
        assert torch.equal(logits(twin, x), ref)
        assert torch.equal(logits(twin, x[:, :24]), ref24)


def test_numpy_values_inside_dict_options_are_converted(tmp_path):
    # as_python converts top-level numpy scalars only: flex_kernel_options={"BLOCK_M": __import__("numpy").int64(64)} passes
    # validation and lands in config.longctx as np.int64, and save_pretrained fails (not JSON serializable)
    import numpy as np

    model = tiny_model("llama")
    longctx.apply(model, "s2attn", group_size=16, backend="flex", flex_kernel_options={"BLOCK_M": np.int64(64)})
    assert type(model.config.longctx[0]["flex_kernel_options"]["BLOCK_M"]) is int
    model.save_pretrained(tmp_path)


# -- multimodal models: S2 in the language model only ------------------------------------------------------------
def tiny_multimodal(kind, attn):
    """A tiny vision-language model built with ``attn`` (a dict per sub-config: mixed implementations)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MllamaConfig, MllamaForConditionalGeneration
    text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "llava":  # CLIP vision tower (its attention is marked non-causal)
        cfg = LlavaConfig(text_config=dict(model_type="llama", **text), image_token_index=VOCAB - 1,
                          vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_hidden_layers=2, image_size=32, patch_size=8,
                                             projection_dim=32))
        return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
    # mllama: its vision attention has no is_causal (it looked causal to S2), cross-attention layers in the text model
    cfg = MllamaConfig(text_config=dict(cross_attention_layers=[1], **text), image_token_index=VOCAB - 1,
                       vision_config=dict(hidden_size=32, attention_heads=2, num_hidden_layers=2, num_global_layers=1,
                                          intermediate_size=64, image_size=32, patch_size=8, max_num_tiles=2,
                                          supported_aspect_ratios=[[1, 1], [1, 2]], vision_output_dim=64,
                                          intermediate_layers_indices=[0]))
    return MllamaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def vision_features(kind, model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if kind == "llava":
            return model.model.vision_tower(torch.randn(2, 3, 32, 32, generator=g)).last_hidden_state
        tiles = torch.randn(1, 1, 2, 3, 32, 32, generator=g)  # one image of two tiles, aspect ratio 1x2
        return model.model.vision_model(tiles, aspect_ratio_ids=torch.tensor([[2]]),
                                        aspect_ratio_mask=torch.tensor([[[1, 1]]])).last_hidden_state


def implementations(model):
    c = model.config
    return {"": c._attn_implementation, **{k: getattr(c, k)._attn_implementation for k in c.sub_configs}}


@pytest.mark.parametrize("kind", ["llava", "mllama"])
@pytest.mark.parametrize("attn", ["eager", {"text_config": "eager", "vision_config": "sdpa"},
                                  {"text_config": "sdpa", "vision_config": "eager"}])
def test_multimodal_vision_tower_keeps_its_attention(kind, attn, ids):
    # set_attn_implementation(name) switched every sub-config: the vision tower ran S2's function, which ran S2 on
    # mllama's (no is_causal there) and the top-level implementation instead of the tower's own on llava's; now
    # only the language model (and the top-level config) carry S2's name
    model = tiny_multimodal(kind, attn).train()
    T, G = 40, 16
    x = ids[:, :T]
    before = implementations(model)
    vision = vision_features(kind, model)
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, 4, G, 2)))
    with longctx.applied(model, "s2attn", group_size=G) as patch:
        assert torch.equal(vision_features(kind, model), vision)  # mllama's was S2 (0.036 off)
        assert implementations(model) == {**before, "": patch.attn_implementation,
                                          "text_config": patch.attn_implementation}
        torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)  # S2 in the language model


@pytest.mark.parametrize("kind", ["llava", "mllama"])
@pytest.mark.parametrize("attn", [{"text_config": "eager", "vision_config": "sdpa"},
                                  {"text_config": "sdpa", "vision_config": "eager"}])
def test_multimodal_remove_restores_every_sub_config(kind, attn, ids):
    # sub-configs with their own implementations (top-level sdpa, text eager): inactive S2 delegated to the
    # top-level one, and remove() set that one on every sub-config; now each keeps, and gets back, its own
    model = tiny_multimodal(kind, attn)
    x = ids[:, :40]
    before = implementations(model)
    assert len(set(before.values())) > 1
    ref, vision = logits(model, x), vision_features(kind, model)
    with longctx.applied(model, "s2attn", group_size=16):
        assert torch.equal(logits(model, x), ref)  # eval: S2 inactive, the text model's own implementation
    assert implementations(model) == before
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(vision_features(kind, model), vision)
    model.train()
    assert torch.equal(vision_features(kind, model), vision)


def test_multimodal_shifted_heads_checked_on_the_text_config(ids):
    # the top-level config of a multimodal model has no num_attention_heads: 0.25 was checked against 2 heads
    # ("shifts 0 of 2 query heads") although the language model has 4
    model = tiny_multimodal("llava", "eager").train()
    T, G = 40, 16
    x = ids[:, :T]
    ref = logits(model, x, attention_mask=float_mask(rule_mask(T, 4, G, 1)))
    with longctx.applied(model, "s2attn", group_size=G, shifted_heads=0.25):
        torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shifts 0 of 4 query heads"):
        longctx.apply(model, "s2attn", group_size=G, shifted_heads=0.1)


def tiny_sub_config_lm(family):
    """A plain causal LM whose config has sub-configs (``attn_config``), built without attn_implementation (as
    from_pretrained loads it by default): those sub-configs have no implementation of their own (None)."""
    from transformers import AutoModelForCausalLM
    kw = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB)
    if family == "dbrx":
        kw.update(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=128, moe_num_experts=2, moe_top_k=1))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()


def test_sub_configs_without_an_implementation_are_restored(ids):
    # dbrx's attn_config / ffn_config have None: remove() passed None back in the dict form, which transformers
    # refuses for a sub-config without a sub-model (ValueError): remove() failed half done (hooks gone, top-level
    # restored, attn_config still naming S2, the patch still active); mpt (refused: no AttentionInterface) got
    # that ValueError instead of the refusal, and its attn_config kept S2's name
    model = tiny_sub_config_lm("dbrx")
    subs = lambda m: [m.config.attn_config._attn_implementation, m.config.ffn_config._attn_implementation]  # noqa: E731
    assert subs(model) == [None, None]
    x = ids[:, :24]
    ref, ref_train = logits(model, x), logits(model.train(), x)
    patch = longctx.apply(model, "s2attn", group_size=8)
    assert not torch.equal(logits(model, x), ref_train)  # S2 runs
    patch.remove()
    assert not patch.active and longctx.active_patches(model) == []
    assert model.config._attn_implementation == "sdpa" and subs(model) == [None, None]
    assert torch.equal(logits(model, x), ref_train) and torch.equal(logits(model.eval(), x), ref)
    mpt = tiny_sub_config_lm("mpt")
    with pytest.raises(ValueError, match="does not support setting its attention implementation"):
        longctx.apply(mpt, "s2attn", group_size=8)
    assert mpt.config._attn_implementation == "eager" and mpt.config.attn_config._attn_implementation is None


def test_a_dropped_model_leaves_nothing_cached(ids, fast_path_on_cpu):
    # the registered functions hold the state for ever (transformers cannot unregister a name): a model dropped
    # without remove() left its BlockMasks (on its GPU) and caches in that state
    import gc
    model = tiny_model("llama").eval()
    patch = longctx.apply(model, "s2attn", group_size=16, backend="flex", train_only=False)
    logits(model, ids[:1, :40])
    state = patch._state
    assert state.block_masks
    del model
    gc.collect()
    assert not state.block_masks and not state._originals and state.model_ref() is None


def test_torch_save_of_a_patched_model(ids, tmp_path):
    # torch.save(model) failed (its hooks' state holds weak references). Loaded, the copy runs the original attention,
    # as a deepcopy does, here and in another process (where the patch's name is unknown until the load registers
    # it), and can be patched itself; remove() leaves a config naming the original implementation
    import io
    import subprocess

    model = tiny_model("llama").train()
    x = ids[:1, :24]
    ref = logits(model, x)
    patch = longctx.apply(model, "s2attn", group_size=8)
    s2 = logits(model, x)
    assert not torch.equal(s2, ref)
    buf = io.BytesIO()
    with pytest.warns(UserWarning, match="a copy of a patched model .* runs its original attention"):
        torch.save(model, buf)
    torch.save({"model": model, "x": x, "ref": ref, "s2": s2}, tmp_path / "saved.pt")
    buf.seek(0)
    dup = torch.load(buf, weights_only=False)
    assert torch.equal(logits(dup, x), ref) and torch.equal(logits(model, x), s2)
    own = longctx.apply(dup, "s2attn", group_size=8)
    assert torch.equal(logits(dup, x), s2) and torch.equal(logits(model, x), s2)
    own.remove()
    assert dup.config._attn_implementation == "eager" and torch.equal(logits(dup, x), ref)
    patch.remove()
    script = f"""
import torch, longctx
saved = torch.load({str(tmp_path / 'saved.pt')!r}, weights_only=False)
model, x = saved["model"], saved["x"]
assert torch.equal(model(x).logits, saved["ref"])
patch = longctx.apply(model, "s2attn", group_size=8)
assert torch.equal(model(x).logits, saved["s2"]), "S2 on the loaded copy"
patch.remove()
assert model.config._attn_implementation == "eager" and torch.equal(model(x).logits, saved["ref"])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_copy_can_be_patched(ids):
    # a deepcopy of a patched model carries the patch's name in its config: applying s2attn to it was refused
    # ("already runs an s2attn attention function") with no patch to remove
    import copy
    model = tiny_model("llama").train()
    x = ids[:1, :24]
    ref = logits(model, x)
    patch = longctx.apply(model, "s2attn", group_size=8)
    s2 = logits(model, x)
    with pytest.warns(UserWarning, match="a copy of a patched model"):
        dup = copy.deepcopy(model)
    assert torch.equal(logits(dup, x), ref)
    with longctx.applied(dup, "s2attn", group_size=8):
        assert torch.equal(logits(dup, x), s2)
        with pytest.raises(ValueError, match="already applied"):
            longctx.apply(dup, "s2attn", group_size=8)
    assert torch.equal(logits(dup, x), ref) and torch.equal(logits(model, x), s2)
    with pytest.raises(ValueError, match="already applied"):
        longctx.apply(model, "s2attn", group_size=8)
    patch.remove()


def _copy_of(obj, how):
    """``obj`` copied with copy.deepcopy (how="deepcopy") or through torch.save / torch.load."""
    import copy
    import io

    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_loses_its_marks_with_its_patch(how):
    # a copy of a patched model carries copies of the marks on its modules (they match no state): removing the copy's
    # patch, or a patch applied to the copy, left _longctx_s2attn_member on every module of the copy
    import warnings

    def marked(m):
        return [name for name, module in m.named_modules() if "_longctx_s2attn_member" in module.__dict__]

    model = tiny_model("llama")
    patch = longctx.apply(model, "s2attn", group_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "a copy of a patched model runs its original attention"
        copied, copied_patch = _copy_of((model, patch), how)
        alone = _copy_of(model, how)
    copied_patch.remove()
    assert marked(copied) == []
    longctx.apply(alone, "s2attn", group_size=8).remove()
    assert marked(alone) == []
    assert marked(model) == [name for name, _ in model.named_modules()]  # the original's stay while it is on
    patch.remove()
    assert marked(model) == []


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_patched_copy_gets_every_sub_config_back(how):
    # a copy of a patched model carries S2's name in every sub-config S2 switched: applying s2attn to the copy read
    # each as the text config's original, so remove() left llava's top-level config (sdpa) at the text model's eager,
    # and dbrx's attn_config / ffn_config (None) at sdpa
    llava = tiny_multimodal("llava", {"text_config": "eager", "vision_config": "sdpa"})
    dbrx = tiny_sub_config_lm("dbrx")
    subs = lambda m: [m.config._attn_implementation, m.config.attn_config._attn_implementation,  # noqa: E731
                      m.config.ffn_config._attn_implementation]
    for model, impls in ((llava, implementations), (dbrx, subs)):
        before = impls(model)
        with pytest.warns(UserWarning, match="a copy of a patched model"):
            with longctx.applied(model, "s2attn", group_size=16):
                dup = _copy_of(model, how)
        with longctx.applied(dup, "s2attn", group_size=16):
            pass
        assert impls(dup) == before and impls(model) == before


def test_a_forked_process_names_its_patches_apart():
    # a forked process (multiprocessing's default on Linux) inherited _RUN and the name counter: its patches took the
    # names the parent's next ones take, so the parent, loading a model the child saved, took the child's patch for its
    # own live one (the copy ran, and after apply/remove was restored to, the parent model's original)
    import os
    s2 = sys.modules["longctx.methods.s2attn"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, s2._RUN.encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != s2._RUN


def test_a_loaded_copy_keeps_hooks_registered_later_apart(ids, monkeypatch):
    # torch.save of a patched model pickles its hooks without their handles: in a fresh process (its next hook id
    # low again) a hook registered on the loaded model took the id of the patch's pre-hook, and with it that one's
    # with_kwargs flag: a plain forward pre-hook was called with kwargs (TypeError); also for a copy saved again
    import io
    import weakref

    from torch.utils.hooks import RemovableHandle
    s2 = sys.modules["longctx.methods.s2attn"]
    model = tiny_model("llama").train()
    x = ids[:1, :24]
    ref = logits(model, x)

    def fresh_process():  # what another process has: no states, a low next hook id
        monkeypatch.setattr(s2, "_STATES", weakref.WeakValueDictionary())
        RemovableHandle.next_id = 0

    def reloaded(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        fresh_process()
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    saved = RemovableHandle.next_id
    try:
        RemovableHandle.next_id = 0  # the patch's hooks get low ids, as in a fresh process
        with longctx.applied(model, "s2attn", group_size=8), pytest.warns(UserWarning, match="a copy of a patched"):
            buf = io.BytesIO()
            torch.save(model, buf)
        fresh_process()
        buf.seek(0)
        dup = torch.load(buf, weights_only=False)
        for loaded in (dup, reloaded(dup)):  # (the second: the copy saved again, loaded in a third process)
            seen = []
            pre = loaded.model.register_forward_pre_hook(lambda module, args: seen.append("pre"))
            post = loaded.model.register_forward_hook(lambda module, args, out: seen.append("post"))
            assert torch.equal(logits(loaded, x), ref) and seen == ["pre", "post"]
            pre.remove()
            post.remove()
    finally:
        RemovableHandle.next_id = max(RemovableHandle.next_id, saved)


def test_prompt_against_a_static_cache_is_reported(ids):
    """generate with a pre-allocated (static) cache gives the prompt more keys than queries: S2 cannot run there
    (full attention, as for decoding), and that is said, once, instead of silently scoring the prompt in full."""
    model = tiny_model("llama")
    x = ids[:1, :24]
    H = model.config.num_attention_heads
    ref = logits(model, x, attention_mask=float_mask(rule_mask(24, H, 8, H // 2)))[:, -1]
    longctx.apply(model, "s2attn", group_size=8, train_only=False)
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            dynamic = model.generate(x, **kw)
    assert not [w for w in seen if "keys (a KV cache" in str(w.message)]
    torch.testing.assert_close(dynamic.logits[0], ref, rtol=1e-5, atol=1e-5)  # S2 on the prompt
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            model.generate(x, cache_implementation="static", **kw)
            model.generate(x, cache_implementation="static", **kw)
    said = [w for w in seen if "s2attn: an attention call of 24 queries over" in str(w.message)]
    assert len(said) == 1 and "runs the original full attention, not S2" in str(said[0].message)


def test_flash_backend_window_with_padding_holes(monkeypatch):
    """flash measures a sliding window over the unpadded tokens: with left/right padding (one run of valid keys per
    row) that is the rule's distance; a hole inside a row would shrink it (keys past the window seen): an error."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash_varlen))
    B, H, Hk, T, G = 2, 4, 2, 37, 16
    q, k, v = qkv(B, H, Hk, T, seed=5)
    for kind in ("left", "right"):
        valid = padding(kind, B, T)
        out = s2_attention(q, k, v, group_size=G, n_shift=2, scale=0.3, backend="flash", valid=valid, window=3)
        mask = rule_mask(T, H, G, 2, valid, None, 3)
        assert_close_rows(out, dense_attention(q, k, v, mask, 0.3), mask, queries=valid)
    holes = torch.ones(B, T, dtype=torch.bool)
    holes[0, [5, 6, 7, 20]] = False
    with pytest.raises(RuntimeError, match="'flash' cannot combine a sliding window with padding that leaves holes"):
        s2_attention(q, k, v, group_size=G, n_shift=2, scale=0.3, backend="flash", valid=holes, window=3)
    out = s2_attention(q, k, v, group_size=G, n_shift=2, scale=0.3, backend="flash", valid=holes)  # no window: exact
    mask = rule_mask(T, H, G, 2, holes)
    assert_close_rows(out, dense_attention(q, k, v, mask, 0.3), mask, queries=holes)


def test_training_with_prefix_tuning_says_why_s2_does_not_run(ids):
    """peft prefix tuning gives every training forward its virtual keys (more keys than queries): S2 cannot run there
    and the warning said it was a KV cache of generate, advising generate(..., cache_implementation='dynamic')."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.train()
    longctx.apply(model, "s2attn", group_size=8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(input_ids=ids[:, :32], labels=ids[:, :32]).loss.backward()
        model(input_ids=ids[:, :32], labels=ids[:, :32]).loss.backward()
    said = [str(w.message) for w in seen if "runs the original full attention, not S2" in str(w.message)]
    assert len(said) == 1 and "prefix tuning" in said[0] and "cache_implementation" not in said[0]
