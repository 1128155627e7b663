"""Tiny random-weight models of several families, built in-process (no network)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import longctx

TRAINED_LEN = 64  # max_position_embeddings of every tiny model: tests run past it
VOCAB = 128

_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
               vocab_size=VOCAB, max_position_embeddings=TRAINED_LEN, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
# per family: extra config keys (GQA where the family has it; partial rotary for gpt_neox, glm, phi3)
FAMILY_KWARGS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "gpt_neox": dict(rotary_pct=0.5),
    "glm": dict(num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5),
    "phi3": dict(num_key_value_heads=2, partial_rotary_factor=0.75),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, sliding_window=16, num_hidden_layers=2,
                        layer_types=["sliding_attention", "full_attention"]),
    "bloom": dict(n_layer=2, n_head=4),  # ALiBi
}
ROPE_FAMILIES = ["llama", "mistral", "qwen2", "gpt_neox", "glm", "phi3"]


def strict_loads(text: str):
    """json.loads as a strict parser (JavaScript's JSON.parse, jq) reads: the bare tokens Infinity, -Infinity
    and NaN, which Python's json writes for non-finite floats, are an error."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def tiny_config(family: str, **overrides):
    kwargs = {**_COMMON, **FAMILY_KWARGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def build(config, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def tiny_model(family: str, seed: int = 0, **overrides):
    return build(tiny_config(family, **overrides), seed)


def twin(model, config):
    """A model built natively from ``config`` carrying ``model``'s weights."""
    other = build(config)
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).dtype)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 3 * TRAINED_LEN), generator=g)  # 3x past the trained length


@pytest.fixture(autouse=True)
def _lazy_attributes_not_leaked():
    """``longctx.load_model`` / ``load_corpus`` are lazy (module ``__getattr__``). ``monkeypatch.setattr(longctx,
    "load_model", ...)`` reads the real function through ``__getattr__`` and on undo *sets* it on the package, so
    the attribute outlives the test and, e.g., code doing ``from longctx import load_model`` no longer sees a later
    test's patch of ``longctx.models.load_model``. Patch the defining module instead; this guard undoes and reports
    a leak."""
    before = {name for name in longctx._LAZY if name in vars(longctx)}
    yield
    leaked = [name for name in longctx._LAZY if name in vars(longctx) and name not in before]
    for name in leaked:
        delattr(longctx, name)
    if leaked:
        pytest.fail(f"the test left longctx.{', longctx.'.join(leaked)} set on the package: patch it where it is "
                    f"defined (longctx.models.load_model, longctx.data.load_corpus)")
