"""longctx.eval.perplexity against explicit float64 references on tiny random fp32 models."""

import copy as copy_module
import json
import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import strict_loads, tiny_model
from longctx.eval.perplexity import format_table, perplexity, save_json

V = 97


def tiny_llama(seed=0, cls=LlamaForCausalLM):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g) for n in (70, 45, 33, 16, 5)]


def ref(model, windows):
    """windows: [(ids (L,), first scored position)] -> (mean nll, tokens), one plain forward each."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, first in windows:
            logp = model(ids[None]).logits[0].double().log_softmax(-1)   # (L, V) float64
            for t in range(first, len(ids)):
                total -= logp[t - 1, ids[t]].item()
                n += 1
    return total / n, n


def chunk_windows(docs, L, first=1):
    return [(d[s:s + L], first) for d in docs for s in range(0, len(d) - L + 1, L)]


def sliding_windows(docs, L, stride):
    out = []
    for d in docs:
        if len(d) < L:
            continue
        prev = 0
        for end in list(range(L, len(d), stride)) + [len(d)]:
            new = end - prev                       # tokens not scored yet
            out.append((d[end - L:end], 1 if prev == 0 else max(1, L - new)))
            prev = end
    return out


def check(res, nll, tokens):
    assert res["tokens"] == tokens
    assert res["nll"] == pytest.approx(nll, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_chunks_all_matches_reference(model, docs):
    out = perplexity(model, docs, [8, 16], progress=False)
    for L in (8, 16):
        wins = chunk_windows(docs, L)
        check(out[L], *ref(model, wins))
        assert out[L]["windows"] == len(wins)
        assert out[L]["tokens"] == len(wins) * (L - 1)
        assert out[L]["dropped_tokens"] == sum(len(d) % L for d in docs)
    json.dumps(out)  # JSON-friendly


def test_chunks_tail_scores_last_quarter(model, docs):
    out = perplexity(model, docs, [8, 16], score="tail", progress=False)
    for L in (8, 16):
        wins = chunk_windows(docs, L, first=L - L // 4)
        assert out[L]["tokens"] == len(wins) * (L // 4)
        check(out[L], *ref(model, wins))
    out = perplexity(model, docs, [16], score="tail", tail_fraction=0.5, progress=False)
    check(out[16], *ref(model, chunk_windows(docs, 16, first=8)))


@pytest.mark.parametrize("L,stride", [(16, None), (16, 3), (16, 1), (16, 15), (8, 5), (8, 8)])
def test_sliding_scores_every_token_once(model, docs, L, stride):
    out = perplexity(model, docs, [L], mode="sliding", stride=stride, progress=False)
    wins = sliding_windows(docs, L, stride or L // 2)
    nll, n = ref(model, wins)
    check(out[L], nll, n)
    assert out[L]["windows"] == len(wins)
    if stride != L:  # every token but each document's first, exactly once
        assert n == sum(len(d) - 1 for d in docs if len(d) >= L)
    assert out[L]["dropped_tokens"] == sum(len(d) for d in docs if len(d) < L)


def test_sliding_stride_L_is_chunks_all(model):
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (32, 48)]      # multiples of L
    a = perplexity(model, docs, [16], mode="sliding", stride=16, progress=False)[16]
    b = perplexity(model, docs, [16], mode="chunks", progress=False)[16]
    assert a["tokens"] == b["tokens"] == 5 * 15 and a["windows"] == b["windows"] == 5
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-12)
    # not a multiple: sliding adds one window ending at the document end for the leftover tokens
    docs2 = [torch.cat([docs[0], docs[1][:5]])]
    a = perplexity(model, docs2, [16], mode="sliding", stride=16, progress=False)[16]
    assert a["windows"] == 3 and a["tokens"] == 2 * 15 + 5


def test_batching_and_logits_chunk_do_not_change_results(model, docs):
    for kw in ({}, {"mode": "sliding", "stride": 5}, {"score": "tail"}):
        base = perplexity(model, docs, [8, 16], progress=False, **kw)
        for opts in ({"batch_tokens": 10_000}, {"batch_tokens": 40}, {"logits_chunk": 3}):
            other = perplexity(model, docs, [8, 16], progress=False, **kw, **opts)
            for L in (8, 16):
                assert other[L]["tokens"] == base[L]["tokens"]
                assert other[L]["nll"] == pytest.approx(base[L]["nll"], rel=1e-6)


def test_lists_and_missing_length(model):
    doc = list(range(1, 21))
    with pytest.warns(UserWarning, match="no document has a full window"):
        out = perplexity(model, [doc], [10, 64], progress=False)
    check(out[10], *ref(model, chunk_windows([torch.tensor(doc)], 10)))
    assert out[64] == {"ppl": None, "nll": None, "tokens": 0, "windows": 0, "dropped_tokens": 20}


@pytest.mark.parametrize("kw,match", [
    ({"mode": "strided"}, "mode"), ({"score": "middle"}, "score"),
    ({"mode": "sliding", "stride": 0}, "stride"), ({"mode": "sliding", "stride": 17}, "stride"),
    ({"stride": 4}, "stride"), ({"mode": "sliding", "score": "tail"}, "tail"),
    ({"score": "tail", "tail_fraction": 0.01}, "tail_fraction"), ({"lengths": [1]}, "lengths"),
])
def test_bad_options(model, docs, kw, match):
    kw = {"lengths": [16]} | kw
    with pytest.raises(ValueError, match=match):
        perplexity(model, docs, progress=False, **kw)


def test_dynamic_rope_results_do_not_depend_on_the_order_of_lengths():
    # dynamic_ntk keeps the frequencies grown by a longer window: 300 after 400 used 400's (trained: 256)
    import longctx

    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, V, (1200,), generator=g)]
    model = tiny_llama()
    with longctx.applied(model, "dynamic_ntk", factor=2):
        both = perplexity(model, docs, [400, 300], progress=False)
    with longctx.applied(model, "dynamic_ntk", factor=2):
        alone = perplexity(model, docs, [300], progress=False)
        assert both[300]["nll"] == alone[300]["nll"]
        assert perplexity(model, docs, [400], progress=False)[400]["nll"] == both[400]["nll"]


def test_format_table():
    res = {"baseline": {256: {"ppl": 25.1349}, 1024: {"ppl": 293.24}},
           "yarn x4": {256: {"ppl": 3134.4}, "1024": {"ppl": 31337.0}, 4096: {"ppl": None}}}
    assert format_table(res) == (
        "| method | 256 | 1024 | 4096 |\n"
        "|---|---:|---:|---:|\n"
        "| baseline | 25.13 | 293.2 | - |\n"
        "| yarn x4 | 3134 | 31340 | - |")


def test_save_json(model, docs, tmp_path):
    out = perplexity(model, docs, [8], progress=False)
    p = save_json(out, tmp_path / "sub" / "r.json", model="tiny", method="baseline", mode="chunks",
                  lengths=[8], dtype=torch.float32)
    data = json.loads(p.read_text())
    assert data["results"]["8"]["tokens"] == out[8]["tokens"]
    assert data["settings"]["method"] == "baseline" and "torch" in data["env"]


def test_save_json_writes_non_finite_values_as_strict_json(tmp_path):
    # a perplexity that overflowed to inf and one that is NaN (a diverged model): json's bare Infinity/NaN
    # tokens are refused by strict parsers; they are written as strings and read back as the floats
    from longctx.utils import decode_nonfinite

    res = {"yarn x4": {256: {"ppl": math.inf, "nll": 800.0, "tokens": 10},
                       1024: {"ppl": math.nan, "tokens": 10, "curve": (1.0, -math.inf)}}}
    p = save_json(res, tmp_path / "r.json", model="tiny", lengths=[256, 1024])
    saved = strict_loads(p.read_text())["results"]["yarn x4"]
    assert saved["256"] == {"ppl": "Infinity", "nll": 800.0, "tokens": 10} and float(saved["256"]["ppl"]) == math.inf
    assert saved["1024"] == {"ppl": "NaN", "tokens": 10, "curve": [1.0, "-Infinity"]}
    back = decode_nonfinite(saved)
    assert back["256"]["ppl"] == math.inf and math.isnan(back["1024"]["ppl"]) and back["1024"]["curve"] == [1.0, -math.inf]
    assert format_table({"yarn x4": back}) == format_table(res) == (
        "| method | 256 | 1024 |\n|---|---:|---:|\n| yarn x4 | inf | nan |")


def test_austen_rope_plot_reads_an_overflowed_perplexity_as_a_number(tmp_path):
    # experiments/austen_rope/plot.py plots the ppl of a `longctx ppl --out` file: an overflowed one is the string
    # "Infinity" since strict JSON, which put the whole curve on a category axis (a wrong plot, no error)
    import runpy
    import shutil
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shutil.copy(Path(__file__).resolve().parents[1] / "experiments/austen_rope/plot.py", tmp_path / "plot.py")
    save_json({"yarn x4": {2048: {"ppl": 12.5}, 8192: {"ppl": 14.0}, 32768: {"ppl": math.inf}}},
              tmp_path / "results_austen-lines.json", model="tiny")
    try:
        ax = runpy.run_path(str(tmp_path / "plot.py"))["ax"]
        assert [list(line.get_ydata(orig=True)) for line in ax.lines if line.get_label() == "yarn x4"] == [
            [12.5, 14.0, math.inf]]
        assert (tmp_path / "austen_rope.png").is_file()
    finally:
        plt.close("all")


def _no_warning_run(m, docs, L):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the fast split path, no fallback
        return perplexity(m, docs, [L], progress=False)


def test_gpt_neox_body_head_split(docs):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=256, initializer_range=0.2)).eval()
    check(_no_warning_run(m, docs, 16)[16], *ref(m, chunk_windows(docs, 16)))


def test_gemma2_softcapping(docs):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    m = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, max_position_embeddings=256, final_logit_softcapping=0.7,
                                       initializer_range=0.5)).eval()
    check(_no_warning_run(m, docs, 16)[16], *ref(m, chunk_windows(docs, 16)))


class ScaledLlama(LlamaForCausalLM):
    """Post-processes logits in a way perplexity() cannot know about -> must take the fallback."""

    scale = 3

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.scale
        return out


def test_fallback_when_split_differs(docs):
    m = tiny_llama(cls=ScaledLlama)
    for kw in ({}, {"mode": "sliding", "stride": 5, "batch_tokens": 64}):
        with pytest.warns(UserWarning, match="logits_to_keep"):
            out = perplexity(m, docs, [16], progress=False, **kw)
        wins = chunk_windows(docs, 16) if not kw else sliding_windows(docs, 16, 5)
        check(out[16], *ref(m, wins))


class SlightlyScaledLlama(ScaledLlama):
    scale = 1.02


def test_probe_catches_a_small_logit_scale_in_bf16(docs):
    # 2% on the logits is within the bf16 logit tolerance, but moves the loss: the probe's NLL check catches it
    m = tiny_llama(cls=SlightlyScaledLlama).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="NLL"):
        out = perplexity(m, docs, [16], progress=False)
    check(out[16], *ref(m, chunk_windows(docs, 16)))


def test_probe_keeps_the_split_for_bf16_softcapping():
    # transformers caps Gemma 2's logits in bf16; the probe rounds the same way, so the NLL check does not
    # reject the split path on bf16 rounding (it did for 7 of 20 seeds, with a 2-token first window and
    # logits of about +-30, as a trained model's)
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    m = Gemma2ForCausalLM(Gemma2Config(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       tie_word_embeddings=False, final_logit_softcapping=30.0))
    with torch.no_grad():
        m.lm_head.weight.mul_(100)
    m = m.eval().to(torch.bfloat16)
    for seed in range(12):
        copy = copy_module.deepcopy(m)  # the split verdict is kept per model
        doc = torch.randint(0, 2000, (300,), generator=torch.Generator().manual_seed(seed))
        _no_warning_run(copy, [doc], 2)


def test_probe_no_longer_than_the_window():
    # a model with 32 learned positions evaluated at L=16: the split-path probe must fit in the window
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=V)).eval()
    docs = [torch.randint(0, V, (100,))]
    out = perplexity(m, docs, [16], progress=False)
    check(out[16], *ref(m, chunk_windows(docs, 16)))


def test_empty_list_document_and_nan_loss(model):
    # an empty list is an empty document (not a float32 tensor, refused as "not token ids"); NaN stays NaN
    out = perplexity(model, [[], list(range(1, 40))], [16], progress=False)
    assert out[16] == perplexity(model, [list(range(1, 40))], [16], progress=False)[16]
    nan = tiny_llama()
    with torch.no_grad():
        nan.lm_head.weight.fill_(float("nan"))
    got = perplexity(nan, [list(range(1, 40))], [16], progress=False)[16]
    assert math.isnan(got["ppl"]) and math.isnan(got["nll"])


@pytest.mark.parametrize("family,extra", [
    ("Mistral", {}), ("Qwen2", {}), ("Phi3", {"pad_token_id": 0}), ("Glm", {"head_dim": 8, "pad_token_id": 0}),
    ("Cohere", {"logit_scale": 0.3}), ("Granite", {"logits_scaling": 4.0}), ("GPT2", {}),
])
def test_other_families_use_split_path(docs, family, extra):
    import transformers as T
    torch.manual_seed(0)
    if family == "GPT2":
        cfg, cls = T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256), T.GPT2LMHeadModel
    else:
        cfg = getattr(T, family + "Config")(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                            initializer_range=0.2, **extra)
        cls = getattr(T, family + "ForCausalLM")
    m = cls(cfg).eval()
    check(_no_warning_run(m, docs, 16)[16], *ref(m, chunk_windows(docs, 16)))


def test_split_check_runs_once_per_model():
    """The probe that checks head(body(x)) == model(x).logits runs on the first call only; a new
    output embedding makes it run again."""
    model = tiny_llama(seed=3)
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    doc = torch.randint(0, V, (64,))
    first = perplexity(model, [doc], [16], progress=False)
    n_first = len(calls)
    calls.clear()
    second = perplexity(model, [doc], [16], progress=False)
    assert len(calls) == n_first - 2 == 4  # 4 windows; the probe's two body forwards are gone
    assert second == first
    model.lm_head = torch.nn.Linear(model.config.hidden_size, V, bias=False)  # a new head: re-checked
    calls.clear()
    perplexity(model, [doc], [16], progress=False)
    assert len(calls) == n_first


def test_compiled_body_equals_eager(docs):
    model = tiny_llama(seed=4)
    eager = perplexity(model, docs, [16, 32], progress=False)
    compiled = perplexity(model, docs, [16, 32], progress=False, compile=True)
    again = perplexity(model, docs, [16, 32], progress=False, compile=True)  # the same compiled code
    for L in (16, 32):
        assert compiled[L]["tokens"] == eager[L]["tokens"]
        assert abs(compiled[L]["nll"] - eager[L]["nll"]) < 1e-5 * abs(eager[L]["nll"])
        assert again[L]["nll"] == compiled[L]["nll"]
    import longctx.utils
    import torch._dynamo.utils
    scopes = []
    real = longctx.utils.compile_layers
    counters = torch._dynamo.utils.counters
    counters.clear()
    longctx.utils.compile_layers = lambda m, options=True, scope="parts": scopes.append(scope) or real(m, options, scope)
    try:
        layer = perplexity(model, docs, [16, 32], progress=False, compile="layer")  # whole decoder layers compiled
    finally:
        longctx.utils.compile_layers = real
    assert scopes == ["layer"] and counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    for L in (16, 32):
        assert abs(layer[L]["nll"] - eager[L]["nll"]) < 1e-5 * abs(eager[L]["nll"])
    assert all(m._compiled_call_impl is None for m in model.modules())  # the model is as before
    with pytest.raises(TypeError, match="compile must be True, False, 'parts' or 'layer', got 'yes'"):
        perplexity(model, docs, [16], progress=False, compile="yes")


def test_compiled_body_follows_rope_patches(docs):
    """Compiled code is reused across calls: applying and removing a RoPE method afterwards must still
    give the eager numbers (the rotary module runs outside the compiled layer parts)."""
    import longctx
    model = tiny_llama(seed=5)
    base = perplexity(model, docs, [32], progress=False, compile=True)[32]["nll"]
    for method, opts in (("yarn", {"factor": 4.0}), ("linear", {"factor": 2.0}), ("abf", {"rope_theta": 1e6})):
        with longctx.applied(model, method, **opts):
            eager = perplexity(model, docs, [32], progress=False)[32]["nll"]
            compiled = perplexity(model, docs, [32], progress=False, compile=True)[32]["nll"]
            assert abs(compiled - eager) < 1e-5 * abs(eager), method
            assert abs(compiled - base) > 1e-4, method  # the patch did change the numbers
    after = perplexity(model, docs, [32], progress=False, compile=True)[32]["nll"]
    assert abs(after - base) < 1e-6 * abs(base)


def test_compiled_body_neither_recompiles_nor_leaks(docs):
    import gc
    import weakref
    from torch._dynamo.utils import counters
    model = tiny_llama(seed=6)
    perplexity(model, docs, [16], progress=False, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    perplexity(model, docs, [16], progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs  # same shapes: the compiled code is reused
    body = weakref.ref(model.model)
    del model
    gc.collect()
    assert body() is None  # nothing of longctx's keeps the model (or its body) alive


@pytest.mark.slow
def test_compiled_many_lengths_stay_compiled():
    """More shapes than dynamo's default 8 variants per function: each length still gets compiled
    code (past the limit torch.compile would quietly run eager)."""
    from torch._dynamo.utils import counters
    model = tiny_llama(seed=7)
    doc = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2))
    lengths = list(range(4, 13))  # 9 shapes
    frames = dict(counters["frames"])
    compiled = perplexity(model, [doc], lengths, progress=False, compile=True)
    # every frame dynamo was asked to compile was compiled (past the limit it would count one not ok)
    assert counters["frames"]["total"] - frames.get("total", 0) >= len(lengths)
    assert counters["frames"]["total"] - frames.get("total", 0) == counters["frames"]["ok"] - frames.get("ok", 0)
    eager = perplexity(model, [doc], lengths, progress=False)
    for L in lengths:
        assert abs(compiled[L]["nll"] - eager[L]["nll"]) < 1e-5 * abs(eager[L]["nll"])


def test_compiled_layers_keep_the_causal_fast_path(docs):
    """compile=True compiles the decoder layers' parts, not the model: the causal mask is still skipped
    (SDPA gets attention_mask=None and is_causal), where a whole-model torch.compile (torch < 2.14)
    would hand SDPA a dense (T, T) mask. Afterwards the layers run eagerly again."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks = []

    def spy(module, query, key, value, attention_mask, **kwargs):  # runs while dynamo traces the graph
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    model = tiny_llama(seed=8)
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", spy)
    try:
        torch._dynamo.reset()
        compiled = perplexity(model, docs, [24], progress=False, compile=True)[24]["nll"]
    finally:
        AttentionInterface.register("sdpa", original)
        torch._dynamo.reset()
    assert masks and all(m is None for m in masks)
    parts = [p for layer in model.model.layers for p in layer.children()]
    assert parts and all(p._compiled_call_impl is None for p in parts)
    eager = perplexity(model, docs, [24], progress=False)[24]["nll"]
    assert abs(compiled - eager) < 1e-5 * abs(eager)


def test_peft_model_and_argument_types():
    # a peft-wrapped model (as lora.load(merge=False) returns) scores like its merged equivalent
    from longctx import lora

    model = tiny_model("llama")
    doc = torch.randint(3, 100, (40,), generator=torch.Generator().manual_seed(0))
    peft_model = lora.prepare(model, verbose=False)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    got = perplexity(peft_model, [doc], [16], progress=False)[16]
    want = perplexity(peft_model.merge_and_unload(), [doc], [16], progress=False)[16]
    assert got["tokens"] == want["tokens"] and abs(got["nll"] - want["nll"]) < 1e-5
    with pytest.raises(TypeError, match="got one 1-D tensor: pass \\[ids\\]"):
        perplexity(model, doc, [16], progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        perplexity(model, [doc.float()], [16], progress=False)
    for kwargs, match in (({"lengths": [16.9]}, "every entry of lengths must be an integer"),
                          ({"lengths": ["16"]}, "every entry of lengths"),
                          ({"mode": "sliding", "stride": True}, "stride must be an integer >= 1"),
                          ({"logits_chunk": 2.5}, "logits_chunk must be an integer >= 1"),
                          ({"score": "tail", "tail_fraction": "x"}, "tail_fraction must be a number")):
        args = {"lengths": [16], **kwargs}
        with pytest.raises(ValueError, match=match):
            perplexity(model, [doc], progress=False, **args)
    assert perplexity(model, [doc], 16, progress=False)[16]["tokens"] > 0  # one length as a number


def test_lengths_as_a_one_pass_iterable(model, docs):
    # a generator (or map) of lengths was consumed by the check: no length was evaluated and {} came back
    want = perplexity(model, docs, [8, 16], progress=False)
    assert perplexity(model, docs, (L for L in (8, 16)), progress=False) == want
    assert perplexity(model, docs, map(int, "8,16".split(",")), progress=False) == want


def test_a_document_of_several_rows_is_refused(model):
    # a (2, N) batch as one document was flattened: windows ran across the end of one row into the next
    rows = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"document 1 has shape \(2, 24\)"):
        perplexity(model, [rows[0], rows], [16], progress=False)
    one = perplexity(model, [rows[:1]], [16], progress=False)[16]      # (1, N) as a tokenizer returns it: fine
    assert one == perplexity(model, [rows[0]], [16], progress=False)[16]


def test_prompt_learning_peft_adapters_are_refused():
    # prompt/prefix tuning add virtual tokens in PeftModel.forward, which the unwrapped body never runs:
    # the base model's numbers came back, labelled as the adapter's
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    doc = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(0))
    for config in (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(tiny_llama(), config).eval()
        with pytest.raises(TypeError, match="prompt learning"):
            perplexity(peft_model, [doc], [16], progress=False)


def test_a_streaming_patch_is_said_to_change_nothing(docs):
    # perplexity runs each window without a cache, so a streaming patch changes nothing: the CLI and sweeps refuse
    # such a row, the Python API returned the dense numbers without a word
    import longctx
    model = tiny_model("llama")
    want = perplexity(model, docs, [16], progress=False)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        with pytest.warns(UserWarning, match="streaming patch, which changes nothing here"):
            got = perplexity(model, docs, [16], progress=False)
    assert got == want
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        perplexity(model, docs, [16], progress=False)


def test_the_decoder_body_is_refused_with_a_clear_error():
    # perplexity(model.model, ...) (the base decoder, no lm_head) failed at the first window with
    # "AttributeError: 'BaseModelOutputWithPast' object has no attribute 'logits'"
    body = tiny_llama().model
    with pytest.raises(TypeError, match=r"perplexity needs a causal language model.*LlamaModel.*ForCausalLM"):
        perplexity(body, [torch.arange(3, 60)], [16], progress=False)


def test_tail_fraction_applies_to_score_tail_only(model):
    """tail_fraction with score='all' changed nothing (silently); it is refused, as `longctx ppl` refuses it."""
    docs = [torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match=r"tail_fraction only applies to score='tail', got score='all'"):
        perplexity(model, docs, [16], tail_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="tail_fraction only applies to score='tail'"):
        perplexity(model, docs, [16], mode="sliding", tail_fraction=0.25, progress=False)
    default = perplexity(model, docs, [16], score="tail", progress=False)[16]
    assert default == perplexity(model, docs, [16], score="tail", tail_fraction=0.25, progress=False)[16]
    assert default["tokens"] == 4 * 4  # the default fraction: a quarter of each 16-token window


def test_float64_sums_avoid_float64_on_mps():
    # Apple's MPS has no float64: the score sums live on the CPU there, on the device elsewhere
    from longctx.utils import as_float64, float64_zero

    for name, where in (("mps", "cpu"), ("cpu", "cpu"), ("meta", "meta")):
        zero = float64_zero(torch.device(name))
        assert zero.dtype == torch.float64 and zero.device.type == where and zero.shape == ()
    total = float64_zero("cpu")
    total += as_float64(torch.tensor(1.5, dtype=torch.bfloat16), total)
    assert total.dtype == torch.float64 and total.item() == 1.5


def test_eval_modules_make_no_float64_on_the_model_device():
    # every float64 score sum goes through float64_zero/as_float64 (a .double() or torch.float64 on the
    # model's device would fail on MPS)
    import inspect
    import re

    import longctx.eval.perplexity as ppl_mod
    import longctx.eval.streaming as stream_mod

    for mod in (ppl_mod, stream_mod):
        src = inspect.getsource(mod)
        assert not re.search(r"\.double\(\)|torch\.float64", src), mod.__name__


def test_save_json_names_the_device_the_run_used(tmp_path, monkeypatch):
    # env.device was CUDA's current GPU whenever CUDA was available: `longctx ppl --device cpu` on a GPU host wrote
    # the GPU's name (and --device cuda:1 GPU 0's); the run's device and --compile were not in the settings
    from longctx import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {device}")
    env = json.loads(save_json({}, tmp_path / "a.json", device="cpu").read_text())["env"]
    assert env["device"].startswith("cpu (")
    assert json.loads(save_json({}, tmp_path / "b.json", device="cuda:1").read_text())["env"]["device"] == "GPU cuda:1"
    assert json.loads(save_json({}, tmp_path / "c.json").read_text())["env"]["device"] == "GPU None"
    import longctx.data
    import longctx.eval
    import longctx.models

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(longctx.data, "load_corpus", lambda *a, **k: [])
    monkeypatch.setattr(longctx.data, "encode_documents", lambda *a, **k: [])
    monkeypatch.setattr(longctx.eval, "perplexity", lambda model, ids, lengths, **k: {L: {"ppl": 2.0} for L in lengths})
    cli.main(["ppl", "--lengths", "4", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["env"]["device"].startswith("cpu (")
    assert saved["settings"]["device"] == "cpu" and saved["settings"]["compile"] is False


def test_save_json_device_it_cannot_name(tmp_path, monkeypatch):
    import platform

    # save_json parsed settings["device"] with torch.device and asked CUDA for its name: a device torch does not parse
    # ("auto"; 0 on a machine with no accelerator) raised RuntimeError, and cuda:1 on a one-GPU host raised in
    # get_device_name, after the whole run (its results lost); before, any device setting was written as given
    for device in ("auto", 0):
        saved = json.loads(save_json({"x": 1}, tmp_path / "a.json", device=device).read_text())
        assert saved["results"] == {"x": 1} and saved["settings"]["device"] == device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def name(device=None):
        if torch.device(device).index not in (None, 0):
            raise AssertionError("Invalid device id")
        return "GPU 0"

    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    assert json.loads(save_json({}, tmp_path / "b.json", device="cuda:0").read_text())["env"]["device"] == "GPU 0"
    assert json.loads(save_json({}, tmp_path / "c.json", device="cuda:1").read_text())["env"]["device"] == \
        f"cuda ({platform.machine()})"


def test_cmd_ppl_without_device_runs_where_it_records(tmp_path, monkeypatch):
    # cmd_ppl called without main() (args.device None): load_model(device=None) loaded onto the CPU while the JSON
    # recorded device None named after CUDA's GPU; passkey resolves None to cuda-when-available itself
    import longctx.data
    import longctx.eval
    import longctx.models
    from longctx.cli import build_parser

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (seen.update(k), (None, None))[1])
    monkeypatch.setattr(longctx.data, "load_corpus", lambda *a, **k: [])
    monkeypatch.setattr(longctx.data, "encode_documents", lambda *a, **k: [])
    monkeypatch.setattr(longctx.eval, "perplexity", lambda model, ids, lengths, **k: {L: {"ppl": 2.0} for L in lengths})
    args = build_parser().parse_args(["ppl", "--lengths", "4", "--out", str(tmp_path / "p.json")])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert seen["device"] == saved["settings"]["device"] == "cuda" and saved["env"]["device"] == "GPU"
