"""CUDA-only paths, against the same computations on the CPU paths or in eager mode (skipped without a GPU).

What only runs on a GPU: the SinkDecoder's CUDA graph, the greedy loop's pinned-memory copy and event,
compiled FlexAttention for S2 (forward and backward), S2 inside compiled decoder layers, and QLoRA
(bitsandbytes 4-bit base weights; skipped where bitsandbytes is not installed).
Run on the GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``.
"""

import pytest
import torch

import longctx
from longctx.methods.s2attn import s2_attention
from longctx.methods.sink_decoder import SinkDecoder
from longctx.methods.streaming import SinkCache, prefill
from conftest import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def ids_for(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed)).to(CUDA)


def test_cuda_graph_decoder_equals_sink_cache_steps():
    # fp64 on the GPU: the replayed graph gives the SinkCache's logits, across max_position re-rotations
    model = tiny_model("llama").double().to(CUDA)
    model.set_attn_implementation("sdpa")
    prompt, steps = ids_for(14), ids_for(40, seed=1)
    got = {}
    for use_decoder in (False, True):
        with longctx.applied(model, "streaming", sink_size=3, window_size=9), torch.no_grad():
            cache = SinkCache(model, 3, 9, max_position=24)
            prefill(model, prompt, cache, chunk_size=4)
            if use_decoder:
                with SinkDecoder(model, cache) as dec:
                    assert dec.use_graph
                    got[use_decoder] = torch.cat([dec.step(steps[:, t:t + 1]).clone() for t in range(40)], 1)
                    assert dec.graph is not None  # the steps after warm-up were replays
            else:
                got[use_decoder] = torch.cat([model(steps[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                                              for t in range(40)], 1)
    torch.testing.assert_close(got[True], got[False], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decoder", [False, True])
def test_stream_generate_on_cuda_equals_model_generate(decoder):
    # the pipelined greedy loop (pinned host copy + event, next step queued first) gives generate's tokens
    from longctx.chat import stream_generate

    model = tiny_model("llama").double().to(CUDA)
    model.set_attn_implementation("sdpa")
    ids = ids_for(5)
    with longctx.applied(model, "streaming", sink_size=3, window_size=9):
        want = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None)[0, 5:].tolist()
        assert list(stream_generate(model, ids, 40, decoder=decoder)) == want
        k = next(i for i in range(1, 40) if want[i] not in want[:i])
        assert list(stream_generate(model, ids, 40, eos_token_id=want[k], decoder=decoder)) == want[:k]


def test_flex_s2_equals_sdpa_s2_with_gradients():
    # compiled FlexAttention (the GPU default) against the sdpa path: GQA 9/3 heads of 64, as SmolLM2,
    # odd length, half the heads shifted; outputs and gradients of q, k, v
    g = torch.Generator(device=CUDA).manual_seed(0)
    T, G = 1000, 256
    q, k, v = (torch.randn(1, T, h, 64, device=CUDA, generator=g).transpose(1, 2).requires_grad_() for h in (9, 3, 3))
    grad = torch.randn(1, T, 9, 64, device=CUDA, generator=g)
    results = []
    for backend in ("sdpa", "flex"):
        out = s2_attention(q, k, v, group_size=G, n_shift=4, backend=backend)
        out.backward(grad)
        results.append((out.detach(), q.grad, k.grad, v.grad))
        q.grad = k.grad = v.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


def test_flex_s2_padding_documents_window_equal_sdpa_s2():
    # flex's per-row BlockMasks from the interval form on CUDA (left padding; packed documents; both, with a
    # sliding window) against the sdpa path, outputs and gradients at the valid queries; each BlockMask equals
    # the one create_block_mask(_compile=True) builds
    from torch.nn.attention.flex_attention import create_block_mask
    from longctx.methods import s2attn as s2
    g = torch.Generator(device=CUDA).manual_seed(1)
    B, T, G = 2, 1000, 256
    valid = torch.ones(B, T, dtype=torch.bool, device=CUDA)
    valid[0, :123] = False
    doc = torch.zeros(B, T, dtype=torch.long, device=CUDA)
    doc[1, 300:] = 1
    doc[1, 777:] = 2
    for kw in ({"valid": valid}, {"doc": doc}, {"valid": valid, "doc": doc, "window": 200}):
        q, k, v = (torch.randn(B, T, h, 64, device=CUDA, generator=g).transpose(1, 2).requires_grad_()
                   for h in (9, 3, 3))
        rows = kw.get("valid", torch.ones_like(valid))  # padded queries: no reference to compare with
        grad = torch.randn(B, T, 9, 64, device=CUDA, generator=g) * rows[..., None, None]
        results = []
        for backend in ("sdpa", "flex"):
            out = s2_attention(q, k, v, group_size=G, n_shift=4, backend=backend, **kw)
            out.backward(grad)
            results.append((out.detach()[rows], q.grad.transpose(1, 2)[rows], k.grad, v.grad))
            q.grad = k.grad = v.grad = None
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
        cons = s2._Constraints(valid=kw.get("valid"), doc=kw.get("doc"), window=kw.get("window"))
        mask_mod = s2.s2_mask_mod(T, G, 9, 4, cons)
        got = s2._s2_block_mask(T, G, 9, 4, CUDA, mask_mod, cons.window, cons.valid, cons.doc, B)
        ref = create_block_mask(mask_mod, B, 9, T, T, device=CUDA, _compile=True)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            a, b = getattr(got, name), getattr(ref, name)
            assert torch.equal(a, b) and a.stride() == b.stride(), name


def test_compiled_layers_with_flex_s2_train_step():
    # train.compile_layers + s2attn flex on CUDA: no recompiles across the layers, and the loss and gradients
    # of the eager step (bf16 fused kernels round differently: loose tolerances)
    from transformers import LlamaConfig, LlamaForCausalLM
    from longctx import train

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=10, vocab_size=128, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(CUDA).train()
    patch = longctx.apply(model, "s2attn", group_size_ratio=0.25, backend="flex")
    x = ids_for(512)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), model.model.layers[3].self_attn.q_proj.weight.grad.clone()

    eager = step()
    torch._dynamo.reset()  # flex was compiled for the eager layers' q/k/v layout; the compiled layers' differs
    train.compile_layers(model)
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            step()
            compiled = step()
        assert counters["frames"]["total"] == counters["frames"]["ok"] > 0  # no frame fell back to eager
    finally:
        train.uncompile_layers(model)
        patch.remove()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("scope", ["parts", "layer"])
def test_fast_path_in_compiled_layers(scope, backend, monkeypatch):
    # the mask function's BlockMask, S2 (flex, or the grouped SDPA calls) traced into the compiled graphs (no
    # graph break), against the general path (per call, outside the graphs): loss and gradients, with
    # gradient checkpointing, each decoder layer's parts or each layer compiled
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM
    from longctx import train

    s2 = sys.modules["longctx.methods.s2attn"]
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=10, vocab_size=128, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(CUDA).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch = longctx.apply(model, "s2attn", group_size_ratio=0.25, backend=backend)
    x = ids_for(512)
    counters = torch._dynamo.utils.counters

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), model.model.layers[3].self_attn.q_proj.weight.grad.clone()

    results = {}
    try:
        for path in ("general", "fast"):
            monkeypatch.setattr(s2, "_FAST_PATH_DEVICES", ("cuda",) if path == "fast" else ())
            torch._dynamo.reset()
            train.compile_layers(model, scope=scope)
            counters.clear()
            with torch._dynamo.config.patch(error_on_recompile=True):
                step()
                results[path] = step()
            train.uncompile_layers(model)
            if path == "fast":
                assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
                assert not counters["graph_break"], dict(counters["graph_break"])
                assert counters["stats"]["unique_graphs"] >= 1
    finally:
        train.uncompile_layers(model)
        patch.remove()
    torch.testing.assert_close(results["fast"][0], results["general"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["fast"][1], results["general"][1], rtol=1e-3, atol=1e-5)


def test_qlora_prepare_equals_dequantized_weights_and_trains():
    # lora.prepare(quantize_4bit=True): every Linear but the head becomes an NF4 Linear4bit, LoRA wraps q/k/v/o;
    # before training (LoRA B = 0) the logits are those of the model with each weight replaced by its
    # dequantized NF4 value (the 4-bit matmul runs in bf16: bf16 tolerance); a few AdamW steps lower the loss
    # and move only the trainable tensors, never the 4-bit weights
    import copy

    bnb = pytest.importorskip("bitsandbytes")
    from longctx import lora

    model = tiny_model("llama").to(CUDA)
    ref = copy.deepcopy(model)
    head = model.get_output_embeddings()
    peft_model = lora.prepare(model, quantize_4bit=True, verbose=False)
    base = peft_model.get_base_model()
    assert type(base.get_output_embeddings()) is torch.nn.Linear and base.get_output_embeddings() is head
    quantized = {n: m for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    plain = [n for n, m in ref.named_modules() if type(m) is torch.nn.Linear and m is not ref.get_output_embeddings()]
    assert sorted(n.removesuffix(".base_layer") for n in quantized) == sorted(plain) and len(plain) == 14
    assert all(".self_attn." in n for n in quantized if n.endswith(".base_layer")) and \
        sum(n.endswith(".base_layer") for n in quantized) == 8  # q/k/v/o of 2 layers carry LoRA
    assert peft_model.longctx_lora["quantize_4bit"] is True
    with torch.no_grad():
        ref_modules = dict(ref.named_modules())
        for name, q in quantized.items():
            w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
            original = ref_modules[name.removesuffix(".base_layer")].weight
            assert w.shape == original.shape and not torch.equal(w, original)
            assert (w - original).norm() < 0.2 * original.norm()  # NF4's error, not another tensor
            original.copy_(w)
    ids = ids_for(48)
    with torch.no_grad():
        want = ref(ids).logits
        got = peft_model(ids).logits
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()

    frozen = {n: q.weight.data.clone() for n, q in quantized.items()}
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable.values())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(q.weight.data, frozen[n]) for n, q in quantized.items())
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_qlora_recipe_resumes_exactly_and_merges(tmp_path):
    # the tiny recipe with lora.quantize_4bit on CUDA: 6 steps, a checkpoint at 3; resuming from it gives the
    # same losses, weights and optimizer state; the artifact merges into a plain model that reloads
    import argparse
    import json

    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    from longctx import train
    from test_recipe import assert_same, checkpoint, finetune, train_rows

    train.make_tiny(tmp_path / "base", tmp_path / "corpus.jsonl")
    settings = ("lora.quantize_4bit=true", "train.steps=6", "train.checkpoint_every=3", "eval.every=0")
    full = finetune(tmp_path, tmp_path / "full", *settings)
    assert next(full["model"].parameters()).is_cuda
    losses = [r["loss"] for r in train_rows(full)]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    resumed = finetune(tmp_path, tmp_path / "resumed", *settings, f"resume_from={tmp_path / 'full/checkpoints/step_000003'}")
    assert [r["loss"] for r in train_rows(resumed)] == losses[3:]
    for a, b in zip(checkpoint(tmp_path / "full", 6), checkpoint(tmp_path / "resumed", 6)):
        assert_same(a, b)
    parser = argparse.ArgumentParser()
    train.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["merge", str(full["artifact"]), "--out", str(tmp_path / "merged")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "merged/config.json").read_text())["rope_parameters"]["factor"] == 4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # full-precision base + LoRA
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    untrained = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # same config, base weights
    untrained.load_state_dict(AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict())
    ids = torch.randint(3, merged.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = full["model"].eval()(ids.to(CUDA)).logits.float().cpu()
        # the merge keeps what QLoRA learned: the merged model is much nearer the trained one than the base
        # is (not equal: the merged weights are the full-precision base, not its NF4 values)
        assert (merged(ids).logits - trained).abs().mean() < 0.5 * (untrained(ids).logits - trained).abs().mean()
