"""SinkDecoder (static ring buffers, CUDA graph on GPU) against the SinkCache it takes over."""

import contextlib

import pytest
import torch

import longctx
from longctx.methods.sink_decoder import SinkDecoder, check_supported
from longctx.methods.streaming import SinkCache, prefill
from conftest import tiny_model

FAMILIES = ["llama", "qwen2", "gpt_neox", "glm", "phi3"]  # full, partial and interleaved rotary


def ids_for(n, batch=1, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def stream(model, prompt, steps, decoder=None, sink_size=3, window_size=9, max_position=None):
    """Prefill ``prompt``, then feed ``steps`` (B, n) one token at a time: with the SinkCache
    itself, or through a SinkDecoder; then one 3-token chunk after it. Logits of every fed token."""
    with longctx.applied(model, "streaming", sink_size=sink_size, window_size=window_size), torch.no_grad():
        cache = SinkCache(model, sink_size, window_size, max_position=max_position)
        prefill(model, prompt, cache, chunk_size=4)
        out = []
        if decoder:
            with SinkDecoder(model, cache, cuda_graph=False) as dec:
                out += [dec.step(steps[:, t:t + 1]).clone() for t in range(steps.shape[1])]
        else:
            out += [model(steps[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                    for t in range(steps.shape[1])]
        tail = ids_for(3, prompt.shape[0], seed=9)
        out.append(model(tail, past_key_values=cache, use_cache=True).logits)  # chunks go on after it
        assert cache.layers[0].keys.shape[-2] == cache.capacity
        return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_position", [None, 20])  # 20: every key re-rotated from its original every ~8 steps
def test_decoder_equals_sink_cache_token_by_token(family, max_position):
    # sdpa in fp64: eager attention takes its softmax in fp32, whose sums depend on the key order
    model = tiny_model(family).double()
    model.set_attn_implementation("sdpa")
    prompt, steps = ids_for(14, batch=2), ids_for(40, batch=2, seed=1)  # 40 steps: the ring wraps 4 times
    want = stream(model, prompt, steps, max_position=max_position)
    got = stream(model, prompt, steps, decoder=True, max_position=max_position)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_decoder_without_sinks_is_window_only():
    model = tiny_model("llama").double()
    model.set_attn_implementation("sdpa")
    prompt, steps = ids_for(12), ids_for(25, seed=1)
    want = stream(model, prompt, steps, sink_size=0, window_size=8)
    got = stream(model, prompt, steps, decoder=True, sink_size=0, window_size=8)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_decoder_refuses_what_it_cannot_do():
    model = tiny_model("llama")
    with longctx.applied(model, "streaming", sink_size=2, window_size=6) as patch, torch.no_grad():
        cache = patch.new_cache()
        model(ids_for(4), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="full cache"):
            SinkDecoder(model, cache)
        with pytest.raises(TypeError, match="SinkCache"):
            SinkDecoder(model, object())
        model(ids_for(4), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="CUDA"):
            SinkDecoder(model, cache, cuda_graph=True)
        decoder = SinkDecoder(model, cache, cuda_graph=False)
        assert cache.layers[0].keys is None  # one copy of the slots, the decoder's
        with pytest.raises(RuntimeError, match="held by a SinkDecoder"):
            model(ids_for(1), past_key_values=cache, use_cache=True)
        decoder.step(ids_for(1))
        decoder.close()
        assert cache.layers[0].keys.shape[-2] == 8 and not cache.held
        model(ids_for(1), past_key_values=cache, use_cache=True)


def test_decoder_on_per_layer_type_rope():
    """gemma3's rotary module holds one RoPE per layer type: the decoder rotates with the full layers' one."""
    model = tiny_model("gemma3_text", layer_types=["full_attention"] * 2).double()
    model.set_attn_implementation("sdpa")
    prompt, steps = ids_for(14, batch=2), ids_for(30, batch=2, seed=1)
    want = stream(model, prompt, steps, max_position=20)
    got = stream(model, prompt, steps, decoder=True, max_position=20)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_decoder_refuses_sliding_and_nope_layers():
    from transformers import AutoConfig
    from conftest import _COMMON, build

    smollm3 = build(AutoConfig.for_model("smollm3", **{**_COMMON, "num_hidden_layers": 4}))  # layer 4: NoPE
    for model, match in ((tiny_model("gemma3_text"), "sliding-window layers"), (smollm3, "NoPE layers")):
        with longctx.applied(model, "streaming", sink_size=2, window_size=6) as patch, torch.no_grad():
            cache = patch.new_cache()
            prefill(model, ids_for(8), cache)
            with pytest.raises(NotImplementedError, match=match):
                SinkDecoder(model, cache)
            # also on a cache loaded with torch.load (no model yet): the same error, not an AttributeError
            buf = __import__("io").BytesIO()
            torch.save(cache, buf)
            buf.seek(0)
            with pytest.raises(NotImplementedError, match=match):
                check_supported(torch.load(buf, weights_only=False))


def test_compiled_decoder_equals_eager():
    # torch.compile of the model's forward on the ring cache: one graph, same logits (fp32); also with
    # inductor's freezing (weights as constants: the ring buffers must stay graph inputs, not constants)
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    prompt, steps = ids_for(14), ids_for(12, seed=1)
    got = []
    for compile in (False, True, {"options": {"freezing": True}}):
        with longctx.applied(model, "streaming", sink_size=3, window_size=9), torch.no_grad():
            cache = SinkCache(model, 3, 9, max_position=20)  # resets during the steps
            prefill(model, prompt, cache, chunk_size=4)
            with SinkDecoder(model, cache, cuda_graph=False, compile=compile) as dec:
                got.append(torch.cat([dec.step(steps[:, t:t + 1]).clone() for t in range(steps.shape[1])], 1))
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], got[0], rtol=1e-5, atol=1e-5)


def test_close_is_idempotent_and_ends_the_decoder():
    # close() inside the with block, then chunks fed to the cache: __exit__ must not write the decoder's
    # stale buffers back (the chunk was lost, seen_tokens counted twice); a closed decoder refuses steps;
    # a cache held by one decoder refuses a second
    model = tiny_model("llama").double()
    model.set_attn_implementation("sdpa")
    ids = ids_for(30)

    def run(explicit_close):
        with longctx.applied(model, "streaming", sink_size=2, window_size=6) as patch, torch.no_grad():
            cache = patch.new_cache()
            prefill(model, ids[:, :10], cache)
            with SinkDecoder(model, cache, cuda_graph=False) as dec:
                with pytest.raises(ValueError, match="held by another SinkDecoder"):
                    SinkDecoder(model, cache, cuda_graph=False)
                for t in range(10, 15):
                    dec.step(ids[:, t:t + 1])
                if explicit_close:
                    assert dec.close() is cache
                    model(ids[:, 15:18], past_key_values=cache, use_cache=True)
                    with pytest.raises(RuntimeError, match="after close"):
                        dec.step(ids[:, 18:19])
            if not explicit_close:
                model(ids[:, 15:18], past_key_values=cache, use_cache=True)
            return model(ids[:, 18:19], past_key_values=cache, use_cache=True).logits, cache.seen_tokens

    (a, seen_a), (b, seen_b) = run(False), run(True)
    assert seen_a == seen_b == 19
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_compile_option_checked():
    model = tiny_model("llama")
    with longctx.applied(model, "streaming", sink_size=2, window_size=6), torch.no_grad():
        cache = SinkCache(model, 2, 6)
        prefill(model, ids_for(10), cache)
        with pytest.raises(TypeError, match="option 'compile' must be True, False or a dict"):
            SinkDecoder(model, cache, cuda_graph=False, compile="yes")
        assert not cache.held  # refused before taking the cache
        with pytest.raises(ValueError, match="captures its own CUDA graphs"):
            SinkDecoder(model, cache, cuda_graph=False, compile={"mode": "reduce-overhead"})
        assert not cache.held



# -- stream_generate: the generate path that hands a full cache to a SinkDecoder ---------------------------
@pytest.mark.parametrize("prompt_len", [5, 14])  # shorter than the cache (steps fill it first) / longer
def test_stream_generate_equals_model_generate(prompt_len, monkeypatch):
    from longctx.chat import stream_generate

    model = tiny_model("llama").double()
    model.set_attn_implementation("sdpa")
    ids, n = ids_for(prompt_len), 30
    decoded = []
    step = SinkDecoder.step
    monkeypatch.setattr(SinkDecoder, "step", lambda self, x: decoded.append(1) or step(self, x))
    with longctx.applied(model, "streaming", sink_size=3, window_size=9):
        # no eos: min_new_tokens would instead mask it out of generate's logits
        want = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)[0, prompt_len:].tolist()
        assert len(want) == n
        assert list(stream_generate(model, ids, n)) == want and not decoded
        assert list(stream_generate(model, ids, n, decoder=True)) == want
        # the decoder takes over once the 12 slots are full and feeds every token but the last
        assert len(decoded) == n - 1 - max(0, 12 - prompt_len)
        k = next(i for i in range(1, n) if want[i] not in want[:i])  # a token not generated before
        kept = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=want[k])
        kept = kept[0, prompt_len:].tolist()
        assert want[k] not in kept and kept[:k] == want[:k]
        for dec in (False, True):
            assert list(stream_generate(model, ids, n, eos_token_id=want[k], decoder=dec)) == want[:k]  # stops
            assert list(stream_generate(model, ids, n, eos_token_id=[999, want[k]], decoder=dec)) == want[:k]
            # ignore_eos: eos is never sampled, as with generate's min_new_tokens
            assert list(stream_generate(model, ids, n, eos_token_id=want[k], ignore_eos=True, decoder=dec)) == kept
        assert list(stream_generate(model, ids, 0, decoder=True)) == []
        assert list(stream_generate(model, ids, 1, decoder=True)) == want[:1]


def test_greedy_loop_queues_the_next_step_before_reading_a_token():
    # pipelined greedy decoding: the step after token t is fed (queued) before t is read and yielded,
    # the last token is not fed, eos stops before it is yielded, banned ids are never chosen
    from longctx.chat import greedy_loop

    want = [3, 5, 7, 2, 9, 4]
    second = {i: (t + 1) % 10 for i, t in enumerate(want)}  # each step's runner-up

    def logits(i):
        x = torch.zeros(10)
        x[want[i]], x[second[i]] = 2.0, 1.0
        return x

    fed = []

    def feed(token):
        assert token.shape == (1, 1)
        fed.append(int(token))
        return logits(len(fed))

    out = []
    for t in greedy_loop(logits(0), feed, 4):
        assert len(fed) == len(out) + 1 or len(out) == 3  # the next step was queued first (none after the last)
        out.append(t)
    assert out == want[:4] and fed == want[:3]
    fed.clear()
    assert list(greedy_loop(logits(0), feed, 6, eos={9})) == want[:4]  # stops at eos (its step already queued)
    fed.clear()
    assert list(greedy_loop(logits(0), feed, 3, ban=[5])) == [3, second[1], 7]
    assert fed == [3, second[1]]
    fed.clear()
    assert list(greedy_loop(logits(0), feed, 0)) == [] and list(greedy_loop(logits(0), feed, 1)) == [3] and not fed


def test_stream_generate_sampling_and_compile():
    # nucleus sampling with a seeded generator: the decoder draws the same tokens as the SinkCache steps
    # (fp64: the same probabilities); and the compiled decoder gives the greedy tokens
    from longctx.chat import stream_generate

    model = tiny_model("llama").double()
    model.set_attn_implementation("sdpa")
    ids = ids_for(6)
    with longctx.applied(model, "streaming", sink_size=3, window_size=9):
        runs = [list(stream_generate(model, ids, 25, temperature=0.8, top_p=0.9, decoder=dec,
                                     generator=torch.Generator().manual_seed(3))) for dec in (False, True)]
        assert runs[0] == runs[1]
        other = list(stream_generate(model, ids, 25, temperature=0.8, top_p=0.9,
                                     generator=torch.Generator().manual_seed(4)))
        assert other != runs[0]  # the seed matters: the comparison above is not trivially equal
        greedy = list(stream_generate(model, ids, 25))
        torch._dynamo.utils.counters.clear()
        assert list(stream_generate(model, ids, 25, decoder=True, compile=True)) == greedy
        assert not torch._dynamo.utils.counters["graph_break"]  # forward and position bookkeeping: whole graphs


def test_stream_generate_errors():
    from longctx.chat import stream_generate
    from test_streaming import alibi_model

    model = tiny_model("llama")  # every error is raised by the call itself, before any token
    with pytest.raises(ValueError, match="needs the streaming patch"):
        stream_generate(model, ids_for(4), 3)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        with pytest.raises(ValueError, match="pass decoder=True"):
            stream_generate(model, ids_for(4), 3, compile=True)
        with pytest.raises(TypeError, match="option 'compile' must be True, False or a dict"):
            stream_generate(model, ids_for(4), 3, decoder=True, compile="yes")
        with pytest.raises(ValueError, match="allowed modes"):
            stream_generate(model, ids_for(4), 3, decoder=True, compile={"mode": "reduce-overhead"})
        with pytest.raises(ValueError, match=r"unknown torch.compile arguments \['bogus'\]"):
            stream_generate(model, ids_for(4), 3, decoder=True, compile={"bogus": 1})
        with pytest.raises(ValueError, match=r"shape \(1, n\)"):
            stream_generate(model, ids_for(4, batch=2), 3)
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
            stream_generate(model, ids_for(4), -1)
    bloom = alibi_model("bloom")
    with longctx.applied(bloom, "streaming", sink_size=2, window_size=6):
        with pytest.raises(NotImplementedError, match="ALiBi"):
            stream_generate(bloom, ids_for(4), 3, decoder=True)
        assert len(list(stream_generate(bloom, ids_for(4), 3))) == 3  # the SinkCache path works


def test_generate_cli_decoder_option():
    from longctx.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "--method", "streaming", "--decoder", "compile"]).decoder == "compile"
    assert parser.parse_args(["generate"]).decoder is None
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--decoder", "fast"])


def test_generate_command(monkeypatch, capsys):
    # cmd_generate with a stub loader: --decoder without streaming fails before loading; --decoder runs
    # stream_generate and prints the same text as the model.generate path; --ignore-eos keeps eos out
    import longctx.chat as chat
    from longctx.cli import build_parser

    model = tiny_model("llama").double()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None

    class Tok:
        eos_token_id, pad_token_id = None, 0

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            return {"input_ids": ids_for(7)}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    loads = []

    def fake_load(args):
        loads.append(args)
        longctx.apply(model, "streaming", sink_size=3, window_size=9)
        return model, Tok()

    monkeypatch.setattr(chat, "_load", fake_load)
    parser = build_parser()
    with pytest.raises(SystemExit, match="--decoder needs --method streaming"):
        chat.cmd_generate(parser.parse_args(["generate", "--prompt", "x", "--decoder", "graph"]))
    assert not loads
    texts = []
    for extra in ([], ["--decoder", "graph"]):
        args = parser.parse_args(["generate", "--method", "streaming", "--prompt", "x", "--max-new-tokens", "20",
                                  *extra])
        assert chat.cmd_generate(args) == 0
        out = capsys.readouterr()
        texts.append(out.out)
        assert "20 new in" in out.err
        for p in longctx.registry.active_patches(model):
            p.remove()
    assert texts[0] == texts[1] and len(texts[0].split()) == 20


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_decoder_on_partial_rotary_split_off_by_the_attention(family):
    # phi and stablelm rotate only the first rotary_ndims dims of a key, split off in their attention: the
    # decoder's sink rotations (and the SinkCache's) gave their apply_rotary_pos_emb whole keys and crashed
    from test_streaming import split_rotary_model

    model = split_rotary_model(family)
    model.set_attn_implementation("sdpa")
    prompt, steps = ids_for(14, batch=2), ids_for(30, batch=2, seed=1)
    want = stream(model, prompt, steps, max_position=20)
    got = stream(model, prompt, steps, decoder=True, max_position=20)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_decoder_takes_over_a_cache_loaded_with_torch_load():
    # a saved SinkCache keeps no model (see test_streaming); SinkDecoder(model, loaded) binds it to its model and
    # decodes exactly as it does on the original cache
    import io

    model = tiny_model("llama").double()
    steps = ids_for(6, seed=3)
    with longctx.applied(model, "streaming", sink_size=3, window_size=9), torch.no_grad():
        cache = SinkCache(model, 3, 9)
        prefill(model, ids_for(20), cache, chunk_size=4)
        buf = io.BytesIO()
        torch.save(cache, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        outs = []
        for c in (cache, loaded):
            with SinkDecoder(model, c, cuda_graph=False) as dec:
                outs.append(torch.cat([dec.step(steps[:, t:t + 1]).clone() for t in range(steps.shape[1])], dim=1))
    assert loaded.model is model and torch.equal(outs[0], outs[1])


@contextlib.contextmanager
def _prefilled(model):
    """Under a streaming patch (3 sinks + 9) and no_grad: a SinkCache prefilled with 20 tokens, full."""
    with longctx.applied(model, "streaming", sink_size=3, window_size=9), torch.no_grad():
        cache = SinkCache(model, 3, 9)
        prefill(model, ids_for(20), cache, chunk_size=4)
        yield cache


def test_a_held_cache_is_not_saved():
    # while a SinkDecoder holds the cache, the keys and values are the decoder's (the cache's are None): a saved
    # copy held no tensors and came back held, refusing every forward for a decoder that no longer exists
    import io

    model = tiny_model("llama").double()
    with _prefilled(model) as cache:
        with SinkDecoder(model, cache, cuda_graph=False) as dec:
            dec.step(ids_for(1, seed=2))
            with pytest.raises(RuntimeError, match="held by a SinkDecoder.*close the decoder"):
                torch.save(cache, io.BytesIO())
        buf = io.BytesIO()
        torch.save(cache, buf)  # handed back: saved as usual
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    assert not loaded.held and torch.equal(loaded.layers[0].keys, cache.layers[0].keys)


def test_a_held_cache_is_not_copied():
    # as with saving: copy.deepcopy (the prompt-cache pattern) of a held cache gave a copy without keys or values that
    # stayed held for ever (the decoder hands them back to the original only), refusing every forward; so did
    # copy.copy. Refused while held; once handed back, a deep copy decodes on exactly as the cache does
    import copy

    model = tiny_model("llama").double()
    steps = ids_for(4, seed=3)
    with _prefilled(model) as cache:
        with SinkDecoder(model, cache, cuda_graph=False) as dec:
            dec.step(ids_for(1, seed=2))
            for copier in (copy.deepcopy, copy.copy):
                with pytest.raises(RuntimeError, match="held by a SinkDecoder.*before copying"):
                    copier(cache)
        twin = copy.deepcopy(cache)
        outs = [torch.cat([model(steps[:, t:t + 1], past_key_values=c, use_cache=True).logits
                           for t in range(steps.shape[1])], dim=1) for c in (cache, twin)]
    assert not twin.held and twin.model is model and torch.equal(outs[0], outs[1])


def test_a_held_cache_bound_to_another_model_is_refused_as_held():
    # the cache moved (bind) before the held check: a held cache bound to another model got bind's RuntimeError
    # ("close the decoder ... before moving the cache") instead of the decoder's own refusal
    import copy

    model = tiny_model("llama").double()
    with longctx.applied(model, "streaming", sink_size=2, window_size=6) as patch:
        cache = patch.new_cache()
        prefill(model, ids_for(12), cache)
        other = copy.deepcopy(model)
        cache.held = True  # (as a SinkDecoder holding it leaves it)
        try:
            with pytest.raises(ValueError, match="held by another SinkDecoder"):
                SinkDecoder(other, cache, cuda_graph=False, warmup=0)
            assert cache._model is model
        finally:
            cache.held = False


def test_decoder_names_the_model_family_of_a_loaded_cache_it_refuses():
    # check_supported ran before the bind: on a loaded (unbound) cache its message named "this cache's model"
    # instead of the model's family
    import io

    model = tiny_model("gemma3_text")
    with longctx.applied(model, "streaming", sink_size=2, window_size=6) as patch, torch.no_grad():
        cache = patch.new_cache()
        prefill(model, ids_for(8), cache)
        buf = io.BytesIO()
        torch.save(cache, buf)
        buf.seek(0)
        with pytest.raises(NotImplementedError, match="sliding-window layers \\('gemma3_text'\\)"):
            SinkDecoder(model, torch.load(buf, weights_only=False))
