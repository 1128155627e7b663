"""StreamingLLM sink cache: exactness against dense decoding and an explicit reference."""

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

import longctx
from longctx.methods.streaming import SinkCache, prefill
from conftest import tiny_model

STREAM_FAMILIES = ["llama", "qwen2", "gpt_neox", "glm", "phi3"]  # full, partial and interleaved rotary


def decode(model, ids, cache):
    """Feed ``ids`` one token at a time; logits (B, T, V)."""
    with torch.no_grad():
        return torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                          for t in range(ids.shape[1])], dim=1)


def ids_for(n, batch=1, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_window_covering_the_stream_equals_dense_decoding(family):
    model = tiny_model(family).double()
    ids = ids_for(40, batch=2)
    dense = decode(model, ids, DynamicCache(config=model.config))
    with longctx.applied(model, "streaming", sink_size=4, window_size=40) as patch:
        got = decode(model, ids, patch.new_cache())
    assert torch.equal(got, dense)


# -- the reference: raw (unrotated) keys, all rotated to their places at every step -----------------
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ReferenceLayer(DynamicLayer):
    """Keeps raw (unrotated) keys; returns every key rotated to its current place (llama layout)."""

    def __init__(self, owner, index):
        super().__init__()
        self.owner, self.index = owner, index

    def update(self, key_states, value_states, *args, **kwargs):
        raw = self.owner.rotate(key_states, self.owner.new_places, self.index, inverse=True)  # from their places
        self.raw = raw if not hasattr(self, "raw") else torch.cat([self.raw, raw], dim=-2)
        self.values = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
        self.is_initialized = True
        self.keys = self.owner.rotate(self.raw, torch.arange(self.raw.shape[-2]), self.index)
        return self.keys, self.values

    def drop(self, start, count):
        self.raw = torch.cat([self.raw[:, :, :start], self.raw[:, :, start + count:]], dim=-2)
        self.values = torch.cat([self.values[:, :, :start], self.values[:, :, start + count:]], dim=-2)
        self.keys = self.values  # only its length is read (mask sizes) until the next update


class ReferenceSlidingLayer(DynamicSlidingWindowLayer):
    """The model's own window over raw keys (transformers' layer, for its mask sizes): the newest key
    sits at the query's place, every older one as many places before it as it is in the stream."""

    def __init__(self, owner, index, sliding_window):
        super().__init__(sliding_window)
        self.owner, self.index, self.raw = owner, index, None

    def update(self, key_states, value_states, *args, **kwargs):
        raw = self.owner.rotate(key_states, self.owner.new_places, self.index, inverse=True)
        raw = raw if self.raw is None else torch.cat([self.raw, raw], dim=-2)
        values = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self.raw, self.values = raw[:, :, 1 - self.sliding_window:], values[:, :, 1 - self.sliding_window:]
        self.is_initialized = True
        places = self.owner.new_places[-1] - torch.arange(raw.shape[-2] - 1, -1, -1)
        return self.owner.rotate(raw, places, self.index), values


def position_free_layers(model):
    """Per layer: True if a lone token's key is the same at positions 0 and 3 (a NoPE layer). A lone
    token attends to itself only, so its hidden states never depend on its position: only RoPE does."""
    keys = []
    for position in (0, 3):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.tensor([[5]]), position_ids=torch.tensor([[position]]), past_key_values=cache, use_cache=True)
        keys.append([layer.keys for layer in cache.layers])
    return [torch.equal(a, b) for a, b in zip(*keys)]


class ReferenceSinkCache(Cache):
    """Sinks + window on the full-attention layers, the model's own window on the sliding-window ones
    (laid out as transformers lays out the model's DynamicCache); raw keys, all rotated in fp64 to
    their places at every step: positions by place, no offsets."""

    def __init__(self, model, sink, window):
        dense = DynamicCache(config=model.config).layers
        super().__init__(layers=[ReferenceSlidingLayer(self, i, layer.sliding_window)
                                 if isinstance(layer, DynamicSlidingWindowLayer) else ReferenceLayer(self, i)
                                 for i, layer in enumerate(dense)])
        self.model, self.sink, self.window, self.length = model, sink, window, 0
        self.nope = position_free_layers(model)

    def rotate(self, x, places, index, inverse=False):
        """x (B, H, n, D) rotated to ``places`` (n,) as layer ``index`` rotates its keys (llama layout,
        full rotary, the rotary module's attention scaling included), or back from them."""
        if self.nope[index]:
            return x
        rotary = self.model.base_model.rotary_emb
        if isinstance(rotary.rope_type, dict):  # one RoPE per layer type (gemma3, olmo3)
            kind = self.model.config.layer_types[index]
            inv_freq, scale = getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling")
        else:
            inv_freq, scale = rotary.inv_freq, rotary.attention_scaling
        freqs = places.double()[:, None] * inv_freq.double()[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None] * scale, emb.sin()[None, None] * scale
        if inverse:  # the model's key is scale * R(place) raw
            return (x * cos - rotate_half(x) * sin) / scale**2
        return x * cos + rotate_half(x) * sin

    def step(self, model, token):
        if self.length + 1 > self.sink + self.window:  # evict the oldest window token
            for layer in self.layers:
                if isinstance(layer, ReferenceLayer):
                    layer.drop(self.sink, 1)
            self.length -= 1
        self.new_places = torch.tensor([self.length])
        out = model(token, past_key_values=self, use_cache=True, position_ids=self.new_places[None])
        self.length += 1
        return out.logits


@pytest.mark.parametrize("max_position", [None, 16])  # 16: the offset returns to 0 every 5 evictions
def test_token_by_token_agrees_with_reference_over_3x_window(max_position):
    model = tiny_model("llama").double()
    sink, window = 3, 8
    ids = ids_for(3 * (sink + window) + 5)
    ref_cache = ReferenceSinkCache(model, sink, window)
    with torch.no_grad():
        want = torch.cat([ref_cache.step(model, ids[:, t:t + 1]) for t in range(ids.shape[1])], dim=1)
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window):
        cache = SinkCache(model, sink, window, max_position=max_position)
        got = decode(model, ids, cache)
        assert cache.evicted_tokens == ids.shape[1] - sink - window
        assert int(cache.offset.max()) <= (max_position or 64 + sink + window) - sink - window
    # the sink cache rotates from fp32 cos/sin: R(a - b) R(b) vs R(a) differ in the last fp32 bits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, decode(model, ids, DynamicCache(config=model.config)), atol=1e-3)


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_chunk_that_evicts_every_slot(family):
    # no sinks and a chunk of window_size tokens: every slot is evicted, the cache holds only the chunk,
    # so what follows equals a cache that started with that chunk (positions keep counting from b)
    model = tiny_model(family).double()
    ids = ids_for(20)
    with longctx.applied(model, "streaming", sink_size=0, window_size=8), torch.no_grad():
        full = SinkCache(model, 0, 8)
        model(ids[:, :1], past_key_values=full, use_cache=True)
        model(ids[:, 1:9], past_key_values=full, use_cache=True)  # evicts the one slot held
        got = decode(model, ids[:, 9:], full)
        fresh = SinkCache(model, 0, 8)
        model(ids[:, 1:9], past_key_values=fresh, use_cache=True)
        want = decode(model, ids[:, 9:], fresh)
        assert torch.equal(full.places.diff(), torch.ones(1, 7, dtype=torch.long))  # consecutive places
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_default_max_position_and_rare_full_rerotation(monkeypatch):
    model = tiny_model("llama")
    assert SinkCache(model, 4, 60).max_position == 64 + 64  # static RoPE: trained length + capacity
    with longctx.applied(model, "dynamic_ntk", factor=2):
        assert SinkCache(model, 4, 60).max_position == 64  # dynamic: where its scaling would start
    # a cache as long as the trained length: every key re-rotated once per ~capacity steps, not every step
    calls = []
    monkeypatch.setattr(SinkCache, "_rerotate", lambda self, start: calls.append(self.seen_tokens))
    with longctx.applied(model, "streaming", sink_size=4, window_size=60), torch.no_grad():
        cache = SinkCache(model, 4, 60)
        prefill(model, ids_for(64), cache)
        decode(model, ids_for(200, seed=3), cache)
    assert calls == [128, 193, 258]  # every max_position - capacity + 1 = 65 tokens


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_rerotation_matches_keys_produced_at_the_new_place(family):
    """After eviction, each kept key equals the key the model produces for that token at its new place."""
    model = tiny_model(family).double()
    sink, window = 2, 5
    ids = ids_for(20)
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window) as patch:
        cache = patch.new_cache()
        decode(model, ids, cache)
    # rebuild: rotate each slot's original key to its current place with the model's own rotary code
    import importlib

    apply_rope = importlib.import_module(type(model.base_model).__module__).apply_rotary_pos_emb
    rotary = model.base_model.rotary_emb
    for layer in cache.layers:
        n = layer.keys.shape[-2]
        assert n == sink + window
        probe = torch.zeros((), dtype=torch.float64)
        cos_o, sin_o = rotary(probe, position_ids=cache.places)
        cos_n, sin_n = rotary(probe, position_ids=torch.arange(n)[None] + cache.offset[:, None])  # place + offset
        # un-rotate from the original place (inverse rotation), rotate to the new place
        raw = apply_rope(layer.orig_keys, layer.orig_keys, cos_o, -sin_o)[1]
        want = apply_rope(raw, raw, cos_n, sin_n)[1]
        torch.testing.assert_close(layer.keys, want, rtol=1e-5, atol=1e-6)


def test_cache_never_exceeds_its_bound_and_generates_10x_window():
    model = tiny_model("llama")
    sink, window = 4, 12
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window):
        out = model.generate(ids_for(6), max_new_tokens=10 * window, min_new_tokens=10 * window,
                             do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        assert isinstance(cache, SinkCache)
        assert out.sequences.shape[1] == 6 + 10 * window
        assert cache.get_seq_length() == sink + window
        assert all(layer.keys.shape[-2] == sink + window for layer in cache.layers)
        assert cache.evicted_tokens == 6 + 10 * window - 1 - (sink + window)  # last token is not fed
        # generate equals a hand-written greedy loop over the same cache semantics
        ids = ids_for(6)
        manual = SinkCache(model, sink, window)
        with torch.no_grad():
            logits = prefill(model, ids, manual).logits
            seq = [ids]
            for _ in range(30):
                nxt = logits[:, -1:].argmax(-1)
                seq.append(nxt)
                logits = model(nxt, past_key_values=manual, use_cache=True).logits
        gen = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        assert torch.equal(gen, torch.cat(seq, dim=1))


def test_remove_restores_dense_generation():
    model = tiny_model("llama")
    ids = ids_for(8)
    dense = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    assert not torch.equal(model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False), dense)
    patch.remove()
    assert torch.equal(model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False), dense)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # sink layers only; sink + sliding-window layers
def test_cache_kept_after_its_patch_is_removed_is_refused(family):
    """A SinkCache used after its model's streaming patch was removed got no room and no positions: its keys grew
    unbounded at positions the cache never gave (silently wrong). Refused; driving the cache directly (make_room,
    then position_ids from its places) stays allowed on the unpatched model, and gives the patched logits."""
    model = tiny_model(family)
    ids = ids_for(12)
    token = ids[:, :1]
    with torch.no_grad():
        with longctx.applied(model, "streaming", sink_size=2, window_size=6):
            out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            stale, direct, short = (copy.deepcopy(out.past_key_values) for _ in range(3))
            patched = model(token, past_key_values=out.past_key_values).logits
        with pytest.raises(RuntimeError, match=r"given no room for these 1 token\(s\).*was it removed"):
            model(token, past_key_values=stale)
        with pytest.raises(RuntimeError, match="given no room"):
            model.generate(out.sequences, past_key_values=copy.deepcopy(direct), max_new_tokens=2,
                           do_sample=False)
        short.make_room(2)
        with pytest.raises(RuntimeError, match=r"given no room for these 1 token\(s\).*room was made for 2"):
            model(token, past_key_values=short, position_ids=short.places[:, -2:-1])
        direct.make_room(1)
        logits = model(token, past_key_values=direct, position_ids=direct.places[:, -1:]).logits
    assert torch.equal(logits, patched)


def test_long_prompt_prefill_stays_bounded():
    model = tiny_model("llama")
    sink, window = 4, 16
    ids = ids_for(10 * window)
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window) as patch:
        cache = patch.new_cache()
        prefill(model, ids, cache, chunk_size=8)
        assert cache.seen_tokens == ids.shape[1]
        assert cache.layers[0].keys.shape[-2] == sink + window
        with pytest.raises(ValueError, match=r"cannot feed 17 tokens at once .* window_size=16"):
            cache.make_room(17)
        # generate with a prompt 10x the window: chunked by the hook, same as prefill + greedy decoding
        manual = patch.new_cache()
        with torch.no_grad():
            logits = prefill(model, ids, manual, chunk_size=window).logits
            seq = [ids]
            for _ in range(5):
                seq.append(logits[:, -1:].argmax(-1))
                logits = model(seq[-1], past_key_values=manual, use_cache=True).logits
        with pytest.warns(UserWarning, match="prefilled in chunks"):
            gen = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(gen, torch.cat(seq, dim=1))


def test_plain_forward_without_cache_is_untouched():
    model = tiny_model("llama")
    ids = ids_for(50)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        with longctx.applied(model, "streaming", sink_size=2, window_size=4):
            assert torch.equal(model(ids, use_cache=False).logits, before)


@pytest.mark.parametrize("options,match", [
    ({"sink_size": -1}, r"'sink_size' must be an integer >= 0"),
    ({"window_size": 0}, r"'window_size' must be a positive integer"),
    ({"window_size": 2.5}, r"'window_size' must be a positive integer"),
])
def test_bad_sizes(options, match):
    with pytest.raises(ValueError, match=match):
        longctx.apply(tiny_model("llama"), "streaming", **options)
    with pytest.raises(ValueError, match=match):  # the perplexity tool checks them first too, any policy
        from longctx.eval import streaming_perplexity
        streaming_perplexity(tiny_model("llama"), ids_for(8)[0], **{"sink_size": 4, "window_size": 8, **options},
                             policy="dense", progress=False)


@pytest.mark.parametrize("max_position", [0, -5, 10, 2.5, True])  # capacity 4 + 8 = 12
def test_bad_max_position(max_position):
    with pytest.raises(ValueError, match=r"option 'max_position' must be None \(the default\) or an integer >= "
                                         r"sink_size \+ window_size \(12\)"):
        SinkCache(tiny_model("llama"), 4, 8, max_position=max_position)


def test_unsupported_models_and_inputs_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(ValueError, match=r"RoPE and ALiBi models; 'gpt2' uses learned positions"):
        longctx.apply(gpt2, "streaming")
    with pytest.raises(ValueError, match=r"every layer of this 'mistral' model is a sliding-window layer"):
        longctx.apply(tiny_model("mistral", sliding_window=16), "streaming")
    model = tiny_model("llama")
    with longctx.applied(model, "streaming", sink_size=2, window_size=8):
        ids = ids_for(5, batch=2)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # right padding
        with pytest.raises(NotImplementedError, match="only left padding"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)


# -- streaming perplexity ------------------------------------------------------------------------------
from longctx.eval.streaming import streaming_perplexity  # noqa: E402


def test_streaming_perplexity_scores_like_generation():
    """Token-by-token streaming ppl equals scoring the logits of a hand-driven decode loop."""
    model = tiny_model("llama").double()
    ids = ids_for(60)[0]
    with longctx.applied(model, "streaming", sink_size=2, window_size=10) as patch:
        logits = decode(model, ids[None, :-1], patch.new_cache())[0]
    want = torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="mean").exp().item()
    got = streaming_perplexity(model, ids, 2, 10, progress=False)
    assert got["tokens"] == 59 and got["max_cache"] == 12
    assert got["ppl"] == pytest.approx(want, rel=1e-6)  # fp32 cross-entropy in the reference


def test_streaming_perplexity_policies_and_chunks():
    model = tiny_model("llama").double()
    ids = ids_for(50)[0]
    with torch.no_grad():
        full = model(ids[None]).logits[0, :-1]
    dense_want = torch.nn.functional.cross_entropy(full.float(), ids[1:]).exp().item()
    dense = streaming_perplexity(model, ids, 2, 6, policy="dense", chunk_size=7, progress=False)
    assert dense["ppl"] == pytest.approx(dense_want, rel=1e-6) and dense["max_cache"] == 49
    big = streaming_perplexity(model, ids, 2, 60, chunk_size=9, progress=False)  # never evicts
    assert big["ppl"] == pytest.approx(dense_want, rel=1e-6)  # causal inside each chunk
    # recompute: each token from a fresh forward over the 8 tokens before it
    rec = streaming_perplexity(model, ids, 2, 6, policy="recompute", chunk_size=5, progress=False)
    nll = []
    with torch.no_grad():
        for t in range(1, 50):
            ctx = ids[max(0, t - 8):t]
            nll.append(torch.nn.functional.cross_entropy(model(ctx[None]).logits[0, -1:].float(), ids[t:t + 1]))
    assert rec["ppl"] == pytest.approx(torch.stack(nll).mean().exp().item(), rel=1e-6)
    window = streaming_perplexity(model, ids, 2, 6, policy="window", progress=False)
    sinks = streaming_perplexity(model, ids, 2, 6, progress=False)
    assert window["max_cache"] == sinks["max_cache"] == 8 and window["ppl"] != sinks["ppl"]
    with pytest.raises(ValueError, match="policy must be one of"):
        streaming_perplexity(model, ids, policy="lru")
    with pytest.raises(ValueError, match=r"chunk_size \(9\) must be <= window_size \(6\)"):
        streaming_perplexity(model, ids, 2, 6, chunk_size=9)


def test_chunked_streaming_with_eviction_is_causal():
    """Changing token t never changes a logit before t (chunks of 5, cache of 2 + 6)."""
    model = tiny_model("llama").double()
    ids = ids_for(40)

    def chunked_logits(x):
        with longctx.applied(model, "streaming", sink_size=2, window_size=6) as patch, torch.no_grad():
            cache = patch.new_cache()
            return torch.cat([model(x[:, s:s + 5], past_key_values=cache, use_cache=True).logits
                              for s in range(0, x.shape[1], 5)], dim=1)

    base = chunked_logits(ids)
    for t in (3, 7, 21, 38):
        other = ids.clone()
        other[0, t] = (other[0, t] + 1) % 128
        changed = chunked_logits(other)
        assert torch.equal(changed[:, :t], base[:, :t])
        assert not torch.equal(changed[:, t], base[:, t])


# -- multi-turn session ------------------------------------------------------------------------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "[unk]", "<user>", "<bot>", "<end>"] + [f"w{i}" for i in range(121)]  # = VOCAB
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}"
                          "{{ m['content'] }} <end> {% endfor %}{% if add_generation_prompt %}<bot> {% endif %}")
    return fast


def test_session_feeds_only_new_tokens_and_stays_bounded():
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama"), tiny_tokenizer()
    session = StreamingSession(model, tok, sink_size=2, window_size=24)
    for turn in range(6):
        reply = "".join(session.chat(" ".join(f"w{(turn * 7 + i) % 100}" for i in range(5)), max_new_tokens=4))
        rendered = tok.apply_chat_template(session.messages, tokenize=False)
        assert session.fed_text == rendered and session.messages[-1]["content"] == reply
        # every token of the rendered conversation was fed once, none twice
        assert session.cache.seen_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
        assert session.cache.get_seq_length() <= 26
    assert session.cache.evicted_tokens > 0


def test_session_reply_is_never_evicted_mid_generation(monkeypatch):
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama"), tiny_tokenizer()
    session = StreamingSession(model, tok, sink_size=2, window_size=20)
    list(session.chat("w1 w2 w3 w4 w5 w6 w7 w8", max_new_tokens=6))
    evictions = []
    real_reserve = session.cache.reserve
    monkeypatch.setattr(session.cache, "reserve", lambda n: evictions.append(real_reserve(n)) or evictions[-1])
    list(session.chat("w9 w10 w11", max_new_tokens=6))
    # room was made once, up front; the prompt and every reply token then fit (the last reserve is
    # the turn's closing tokens, fed after the reply)
    assert evictions[0] > 0 and all(e == 0 for e in evictions[1:-1]) and len(evictions) >= 3


def _scripted_replies(monkeypatch, tok, reply):
    """Every reply is ``reply`` (words) followed by the tokenizer's eos: longctx.chat.sample is scripted."""
    import longctx.chat as chat
    ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    state = {"left": iter(())}

    def sample(*args, **kwargs):
        return next(state["left"])
    monkeypatch.setattr(chat, "sample", sample)
    return lambda: state.update(left=iter(ids))


def test_session_does_not_refeed_when_the_template_rerenders_a_reply(monkeypatch):
    # templates that re-render a reply differently from what was generated (Llama-3's `| trim`, Qwen3 dropping
    # reasoning): the cache keeps the model's own text and gets only what follows the first difference. The
    # old code fed the whole conversation again each turn (the context doubled)
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}", "{{ m['content'][:2] }}")  # "w5 w6" -> "w5"
    next_reply = _scripted_replies(monkeypatch, tok, "w5 w6")
    session = StreamingSession(model, tok, sink_size=2, window_size=200)
    for turn in range(3):
        next_reply()
        with pytest.warns(UserWarning, match="renders the conversation differently"):
            assert "".join(session.chat(f"w{turn + 1} w9", max_new_tokens=5)) == "w5 w6"
        rendered = tok.apply_chat_template(session.messages, tokenize=False)
        # the rendered conversation once, plus each reply's "w6" that the template does not render
        assert session.cache.seen_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"]) + turn + 1


def test_session_refeeds_from_a_word_boundary(monkeypatch):
    # a template that drops the start of earlier replies (as Qwen3 drops reasoning): the texts first differ
    # inside a word ("w100" against "w5" share "w"); the new piece starts at that word, never inside it
    # (the old code fed "5 w6 ...", which the tokenizer read as [unk] w6 ...)
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}"
                         "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('w100 ')[-1] }}"
                         "{% else %}{{ m['content'] }}{% endif %} <end> {% endfor %}"
                         "{% if add_generation_prompt %}<bot> {% endif %}")
    next_reply = _scripted_replies(monkeypatch, tok, "w100 w5 w6 w7")
    session = StreamingSession(model, tok, sink_size=2, window_size=200)
    fed, real_feed = [], session.feed
    monkeypatch.setattr(session, "feed", lambda x: fed.append(tok.decode(x[0])) or real_feed(x))
    next_reply()
    list(session.chat("w1 w2", max_new_tokens=8))
    next_reply()
    fed.clear()
    with pytest.warns(UserWarning, match="renders the conversation differently"):
        list(session.chat("w3 w4", max_new_tokens=8))
    assert fed[0] == "w5 w6 w7 <end> <user> w3 w4 <end> <bot>"


@pytest.mark.parametrize("template, reply, fed_after_reply", [
    # `| trim` (Llama-3): the reply's trailing newline is not rendered; a whitespace-only difference needs no
    # back-up (the old code re-fed the reply's last word) and no warning
    ("{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}{{ m['content'] | trim }}<end>\n"
     "{% endfor %}{% if add_generation_prompt %}<bot> {% endif %}", "w5 w6\n", "<end>\n"),
    # no whitespace in the template at all: the old code backed up to the start and re-fed everything
    ("{% for m in messages %}{{ '<user>' if m['role'] == 'user' else '<bot>' }}{{ m['content'] | trim }}<end>"
     "{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}", "w5\n", "<end>"),
])
def test_session_whitespace_only_rerendering(monkeypatch, template, reply, fed_after_reply):
    import warnings
    from longctx.chat import StreamingSession
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["w1 w2 w3 w4 w5 w6\n"] * 20, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<user>", "<bot>", "<end>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = template
    model = tiny_model("llama", vocab_size=max(len(tok), 128))
    next_reply = _scripted_replies(monkeypatch, tok, reply)
    session = StreamingSession(model, tok, sink_size=2, window_size=200)
    fed, real_feed = [], session.feed
    monkeypatch.setattr(session, "feed", lambda x: fed.append(tok.decode(x[0])) or real_feed(x))
    next_reply()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "renders differently" warning for whitespace
        assert "".join(session.chat("w1", max_new_tokens=6)) == reply
    assert fed[-1] == fed_after_reply


def test_session_stops_at_generation_config_eos(monkeypatch):
    # end-of-turn ids declared only in generation_config (Phi-3's <|end|>, Gemma's <end_of_turn>) end a reply
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama"), tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<end>")
    model.generation_config.eos_token_id = [end]
    next_reply = _scripted_replies(monkeypatch, tok, "w3 <end> w4 w5")
    session = StreamingSession(model, tok, sink_size=2, window_size=50)
    next_reply()
    assert "".join(session.chat("w1 w2", max_new_tokens=8)) == "w3"
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        list(session.chat("w1", max_new_tokens=-4))


def sentencepiece_tokenizer():
    """A transformers LlamaTokenizer (legacy=False, as Llama-2, Mistral, TinyLlama load in transformers 5):
    Metaspace(prepend_scheme="first"), and a decoder that drops the space of the first token."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.train_from_iterator(["[INST] w1 w2 w3 w4 w5 w6 [/INST]"] * 20,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"]))
    bpe = json.loads(tok.to_str())["model"]
    return LlamaTokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]])


@pytest.mark.parametrize("template", [
    # Llama-2-chat: a space before the reply, which the decoder drops from the reply's first token: the whole
    # reply was fed again every turn, with a warning
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
    # Mistral-instruct: a turn starts right after </s>; tokenized on its own it got a "\u2581" ("\u2581[INST]").
    # (The reply is the model's own tokens, "\u2581w" "5\u2581w" "6", where the rendering tokenizes "w" "5\u2581w" "6")
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"])
def test_session_feeds_the_conversation_once_with_a_sentencepiece_tokenizer(monkeypatch, template):
    import warnings
    from longctx.chat import StreamingSession

    tok = sentencepiece_tokenizer()
    tok.chat_template = template
    next_reply = _scripted_replies(monkeypatch, tok, "w5 w6")
    session = StreamingSession(tiny_model("llama"), tok, sink_size=2, window_size=200)
    fed, real_feed = [], session.feed
    monkeypatch.setattr(session, "feed", lambda x: fed.extend(x[0].tolist()) or real_feed(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "renders differently" warning
        for message in ["w1 w2", "w3 w4"]:
            next_reply()
            assert "".join(session.chat(message, max_new_tokens=5)) == "w5 w6"
    full = tok(tok.apply_chat_template(session.messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert session.cache.seen_tokens == len(fed) == len(full)  # each token once (the replies were fed twice)
    reply = tok("w5 w6", add_special_tokens=False)["input_ids"]
    if template.startswith("{{ bos_token }}"):  # the reply right after [/INST]: rendered as "w" "5\u2581w" "6"
        full = [reply[0] if tok.convert_ids_to_tokens(t) == "w" else t for t in full]
    assert fed == full                          # tokenized as in context: no "\u2581[INST]" after </s>


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("extra, match", [(["--temperature", "-1"], "temperature must be a finite number >= 0"),
                                          (["--temperature", "nan"], "temperature must be a finite number >= 0"),
                                          (["--top-p", "7"], r"top_p must be a number in \(0, 1\]"),
                                          (["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0")])
def test_generate_and_chat_check_sampling_before_loading(monkeypatch, command, extra, match):
    # without --decoder, `longctx generate` decoded greedily at temperature -1 or nan and dropped top_p 7
    import longctx.models
    from longctx.cli import build_parser

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    args = build_parser().parse_args([command, *(["--prompt", "w1"] if command == "generate" else []), *extra])
    with pytest.raises(SystemExit, match=f"longctx {command}: {match}"):  # a message, not a traceback
        args.func(args)


def test_stream_generate_arguments():
    import numpy as np
    from longctx.chat import stream_generate

    model = tiny_model("llama").double()
    ids = ids_for(6)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        want = list(stream_generate(model, ids, 12))
        k = next(i for i in range(1, 12) if want[i] not in want[:i])  # a token not generated before
        for eos in (want[k], torch.tensor([want[k]]), torch.tensor(want[k]), np.int64(want[k]), [np.int64(want[k])]):
            assert list(stream_generate(model, ids, 12, eos_token_id=eos)) == want[:k]  # stops like an int
        for kwargs, match in [(dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
                              (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
                              (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
                              (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
                              (dict(eos_token_id=-1, ignore_eos=True), r"token ids in \[0, 128\)"),
                              (dict(eos_token_id="</s>"), TypeError)]:
            if match is TypeError:
                with pytest.raises(TypeError, match="eos_token_id must be a token id"):
                    stream_generate(model, ids, 3, **kwargs)
            else:
                with pytest.raises(ValueError, match=match):
                    stream_generate(model, ids, 3, **kwargs)
        with pytest.raises(ValueError, match=r"shape \(1, n\) with n >= 1"):
            stream_generate(model, ids[:, :0], 3)


def test_chat_command_takes_the_streaming_sizes():
    # `longctx chat --method streaming:...` sized the session from --sink-size/--window-size alone (4 + 2044)
    from longctx.chat import chat_sizes
    from longctx.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["chat", "--method", "streaming:sink_size=2:window_size=10", "--method", "yarn:factor=2"])
    assert chat_sizes(args) == (2, 10) and args.method == ["yarn:factor=2"]
    assert chat_sizes(parser.parse_args(["chat"])) == (4, 2044)
    assert chat_sizes(parser.parse_args(["chat", "--window-size", "30", "--method", "streaming:sink_size=1"])) == (1, 30)
    with pytest.raises(SystemExit, match="window_size is 30 from one option and 10 from another"):
        chat_sizes(parser.parse_args(["chat", "--window-size", "30", "--method", "streaming:window_size=10"]))
    with pytest.raises(SystemExit, match=r"unknown option\(s\) 'max_position' for method 'streaming'; allowed options: "
                                         r"sink_size, window_size"):
        chat_sizes(parser.parse_args(["chat", "--method", "streaming:max_position=100"]))


def test_stream_ppl_out_is_strict_json_with_non_finite_ppl(tmp_path, monkeypatch, capsys):
    # a stream whose perplexity overflowed: --out is strict JSON (no bare Infinity, which JSON.parse and jq refuse)
    import math

    import longctx.eval.streaming as streaming
    import longctx.models
    from longctx.cli import build_parser

    from conftest import strict_loads
    from test_passkey import TEXT, char_tokenizer

    (tmp_path / "c.txt").write_text(TEXT)
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (None, char_tokenizer()))
    monkeypatch.setattr(streaming, "streaming_perplexity", lambda model, ids, sink, window, policy, chunk_size,
                        curve_every: {"policy": policy, "ppl": math.inf, "tokens": len(ids), "max_cache": 8,
                                      "chunk_size": chunk_size, "tokens_per_s": 1.0, "curve": [(4, math.nan, 4, None)]})
    args = build_parser().parse_args(["stream-ppl", "--corpus", str(tmp_path / "c.txt"), "--policy", "sinks",
                                      "--window-size", "8", "--out", str(tmp_path / "s.json")])
    assert args.func(args) == 0 and "| inf |" in capsys.readouterr().out
    saved = strict_loads((tmp_path / "s.json").read_text())["results"][0]
    assert saved["ppl"] == "Infinity" and saved["curve"] == [[4, "NaN", 4, None]]


def test_cli_lists_streaming_commands():
    from longctx.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["stream-ppl", "--policy", "sinks,window", "--chunk-size", "16"])
    assert args.chunk_size == 16 and args.func.__name__ == "cmd_stream_ppl"
    assert parser.parse_args(["chat", "--window-size", "100"]).window_size == 100
    assert parser.parse_args(["generate", "--method", "streaming:sink_size=4"]).method == ["streaming:sink_size=4"]


# -- ALiBi models: no rotation, biases by index in the cache --------------------------------------------
def alibi_model(family):
    if family == "bloom":
        return tiny_model("bloom").double()
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    cfg = MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=128, expansion_ratio=2)
    return MptForCausalLM(cfg).double().eval()


class DropOldest(Cache):
    """Reference: plain layers; before each token, drop the oldest non-sink slot once full."""

    def __init__(self, n_layers, sink, window):
        super().__init__(layers=[DynamicLayer() for _ in range(n_layers)])
        self.sink, self.window = sink, window

    def step(self, model, token):
        layer0 = self.layers[0]
        if layer0.is_initialized and layer0.keys.shape[-2] + 1 > self.sink + self.window:
            for layer in self.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    setattr(layer, name, torch.cat([t[:, :, :self.sink], t[:, :, self.sink + 1:]], dim=-2))
        return model(token, past_key_values=self, use_cache=True).logits


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_models_stream_by_place(family):
    model = alibi_model(family)
    ids = ids_for(40)
    dense = decode(model, ids, DynamicCache(config=model.config))
    with longctx.applied(model, "streaming", sink_size=3, window_size=40) as patch:
        assert torch.equal(decode(model, ids, patch.new_cache()), dense)  # no eviction: dense decoding
    ref = DropOldest(model.config.num_hidden_layers, 3, 7)
    with torch.no_grad():
        want = torch.cat([ref.step(model, ids[:, t:t + 1]) for t in range(ids.shape[1])], dim=1)
    with longctx.applied(model, "streaming", sink_size=3, window_size=7) as patch:
        cache = patch.new_cache()
        assert torch.equal(decode(model, ids, cache), want)
        assert cache.layers[0].keys.shape[-2] == 10
        out = model.generate(ids[:, :4], max_new_tokens=70, min_new_tokens=70, do_sample=False)
        assert out.shape[1] == 74


# eager attention turns fully padded query rows into NaN that then leaks into the real rows (in
# transformers itself, without longctx), so the RoPE families run on SDPA; bloom has only eager,
# which is NaN-free in fp32
@pytest.mark.parametrize("family,impl,dtype,tol", [("llama", "sdpa", torch.float64, 1e-7),
                                                   ("gpt_neox", "sdpa", torch.float64, 1e-7),
                                                   ("bloom", "eager", torch.float32, 1e-4)])
def test_left_padded_batch_equals_each_row_alone(family, impl, dtype, tol):
    """Each row's sinks are its first real tokens, its places count its real tokens only."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=impl).to(dtype).eval()
    rows = [ids_for(9, seed=1)[0], ids_for(4, seed=2)[0], ids_for(6, seed=3)[0]]
    L = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([(torch.arange(L) >= L - len(r)).long() for r in rows])
    gen = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True,
               output_scores=True)
    with longctx.applied(model, "streaming", sink_size=2, window_size=10):
        out = model.generate(batch, attention_mask=mask, **gen)
        assert out.past_key_values.layers[0].keys.shape[-2] == 12
        for r, row in enumerate(rows):
            alone = model.generate(row[None], **gen)
            assert torch.equal(out.sequences[r, L:], alone.sequences[0, len(row):])
            torch.testing.assert_close(torch.stack(out.scores)[:, r], torch.stack(alone.scores)[:, 0],
                                       rtol=tol, atol=tol)


# -- models with sliding-window layers: the full layers get the sinks, the sliding ones keep their window ----
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from conftest import _COMMON  # noqa: E402
from longctx.arch import rope_layers  # noqa: E402

SLIDING = 6  # the tiny models' sliding window: far shorter than the streams
MIXED = {
    "gemma2": dict(head_dim=16),  # sliding and full layers alternating, one RoPE
    "gemma3_text": dict(head_dim=16, layer_types=["sliding_attention", "full_attention"] * 2),  # local RoPE base
    "cohere2": dict(layer_types=["sliding_attention", "full_attention"] * 2),  # interleaved RoPE, NoPE full layers
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,  # learned sinks, YaRN
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, original_max_position_embeddings=16)),
    "qwen2": dict(use_sliding_window=True, max_window_layers=2),  # two full layers, then two sliding
    "olmo3": dict(),  # three sliding layers to one full, RoPE per layer type
    "exaone4": dict(sliding_window_pattern=2),  # NoPE full layers
    "smollm3": dict(),  # no sliding layers (use_sliding_window is off), but a NoPE layer in four
}
LLAMA_LAYOUT = ["gemma2", "gemma3_text", "gpt_oss", "qwen2", "olmo3", "exaone4", "smollm3"]  # llama-layout RoPE


def mixed_model(family, sliding_window=SLIDING, **overrides):
    config = AutoConfig.for_model(family, **{**_COMMON, "num_hidden_layers": 4, "num_key_value_heads": 2,
                                             "sliding_window": sliding_window, **MIXED[family], **overrides})
    torch.manual_seed(0)
    experts = {"experts_implementation": "eager"} if family == "gpt_oss" else {}  # grouped_mm has no fp64
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **experts).double().eval()


@pytest.mark.parametrize("family", MIXED)
def test_rope_layers_match_the_models_own_keys(family):
    model = mixed_model(family)
    assert rope_layers(model) == [not nope for nope in position_free_layers(model)]


@pytest.mark.parametrize("family", MIXED)
def test_mixed_window_covering_the_stream_equals_dense_decoding(family):
    """No eviction: the streaming patch decodes exactly as the model's own DynamicCache, whose sliding
    layers bound themselves, over a stream far longer than the sliding window."""
    model = mixed_model(family)
    ids = ids_for(40, batch=2)
    dense = decode(model, ids, DynamicCache(config=model.config))
    with longctx.applied(model, "streaming", sink_size=4, window_size=40) as patch:
        cache = patch.new_cache()
        got = decode(model, ids, cache)
    assert torch.equal(got, dense)
    layout = [SLIDING - 1 if isinstance(layer, DynamicSlidingWindowLayer) else 40
              for layer in DynamicCache(config=model.config).layers]
    assert [layer.keys.shape[-2] for layer in cache.layers] == layout


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
@pytest.mark.parametrize("sliding_window", [SLIDING, 16])  # 16: longer than the sink cache (11)
def test_mixed_stream_agrees_with_reference_through_offset_resets(family, sliding_window, monkeypatch):
    """Token by token over 3x the sink cache, against positions by place recomputed in fp64 at every
    step. The offset scheme (b grows, returns to 0) only changes fp32 rotation rounding."""
    model = mixed_model(family, sliding_window)
    sink, window = 3, 8
    ids = ids_for(3 * (sink + window) + 5)
    ref = ReferenceSinkCache(model, sink, window)
    with torch.no_grad():
        want = torch.cat([ref.step(model, ids[:, t:t + 1]) for t in range(ids.shape[1])], dim=1)
    moves, move = [], SinkCache._move_sliding
    monkeypatch.setattr(SinkCache, "_move_sliding", lambda self, shift: moves.append(shift) or move(self, shift))
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window):
        for max_position in (None, 16):  # None: b only grows; 16: b returns to 0 every 5 evictions
            got = decode(model, ids, SinkCache(model, sink, window, max_position=max_position))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(moves) >= 4
        # and the moves matter: sliding keys left where they were disagree with the queries after a reset
        monkeypatch.setattr(SinkCache, "_move_sliding", lambda self, shift: None)
        stale = decode(model, ids, SinkCache(model, sink, window, max_position=16))
    if "sliding_attention" in model.config.layer_types:
        assert not torch.allclose(stale, want, atol=1e-3)


@pytest.mark.parametrize("family", ["gemma3_text", "cohere2", "gpt_oss"])
@pytest.mark.parametrize("sliding_window", [SLIDING, 16])
def test_mixed_cache_stays_bounded_and_sliding_keys_sit_at_stream_distances(family, sliding_window):
    """Every layer kind stays within its bound, and every key a sliding layer holds sits exactly
    (integer positions) as far before the newest query as its token is in the stream, resets included."""
    model = mixed_model(family, sliding_window)
    sink, window = 3, 8
    ids = ids_for(3 * (sink + window) + 5)
    given = []  # the position the hook gave each token
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window), torch.no_grad():
        cache = SinkCache(model, sink, window, max_position=16)
        for t in range(ids.shape[1]):
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            given.append(int(cache.places[0, -1]))
            for layer in cache.sink_layers:
                assert layer.keys.shape[-2] == layer.orig_keys.shape[-2] == layer.values.shape[-2] == min(t + 1, 11)
            for layer in cache.sliding_layers:
                held = min(t + 1, sliding_window - 1)
                assert layer.keys.shape[-2] == layer.orig_keys.shape[-2] == layer.values.shape[-2] == held
                assert layer.get_seq_length() == t + 1  # transformers' sliding mask counts the stream
                tokens = torch.arange(t + 1 - held, t + 1)
                assert torch.equal(torch.tensor(given)[tokens] + layer.shift[0], given[-1] - (t - tokens))
    assert cache.get_seq_length() == sink + window and cache.seen_tokens == ids.shape[1]
    assert sum(b < a for a, b in zip(given, given[1:])) >= 4  # the offset returned to 0 that often


def test_mixed_generate_with_a_long_prompt_stays_bounded():
    model = mixed_model("gemma3_text")
    sink, window = 2, 10
    ids = ids_for(30)
    with longctx.applied(model, "streaming", sink_size=sink, window_size=window) as patch:
        with pytest.warns(UserWarning, match="prefilled in chunks"):
            out = model.generate(ids, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                                 return_dict_in_generate=True)
        cache = out.past_key_values
        assert isinstance(cache, SinkCache) and cache.get_seq_length() == sink + window
        assert [layer.keys.shape[-2] for layer in cache.sliding_layers] == [SLIDING - 1] * 2
        manual = patch.new_cache()  # the same stream by hand: chunks of window_size, then greedy steps
        with torch.no_grad():
            logits = prefill(model, ids, manual).logits
            seq = [ids]
            for _ in range(50):
                seq.append(logits[:, -1:].argmax(-1))
                logits = model(seq[-1], past_key_values=manual, use_cache=True).logits
        assert torch.equal(out.sequences, torch.cat(seq, dim=1))


def test_sliding_models_refuse_what_is_not_supported():
    all_sliding = mixed_model("gemma3_text", layer_types=["sliding_attention"] * 4)
    with pytest.raises(ValueError, match=r"every layer of this 'gemma3_text' model is a sliding-window layer "
                                         r"\(sliding_window=6\) .* attention sinks\s+would apply to no layer"):
        longctx.apply(all_sliding, "streaming")
    chunked = tiny_model("llama", layer_types=["full_attention", "chunked_attention"], attention_chunk_size=4)
    with pytest.raises(NotImplementedError, match=r"layer types \['chunked_attention'\] are not supported"):
        longctx.apply(chunked, "streaming")
    model = mixed_model("gemma2")
    with longctx.applied(model, "streaming", sink_size=2, window_size=8):
        ids = ids_for(5, batch=2)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding
        with pytest.raises(NotImplementedError, match="padded batches on models with sliding-window layers"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)  # an all-ones mask is fine


def test_layer_windows_older_transformers(monkeypatch):
    """transformers 5.17 returns one kwargs dict for all layers (5.2x: one per layer); both lay out the
    same windows. On 5.17 the per-layer reading once gave no layers at all, so every model was refused."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    from longctx.methods import streaming

    model = tiny_model("mistral", sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    new = streaming.layer_windows(model)

    def old_style(config):
        types, kwargs = get_layer_types_and_kwargs(config)
        if isinstance(kwargs, dict):  # running on 5.17 itself
            return types, kwargs
        return types, {k: v for kw in kwargs for k, v in kw.items()}

    monkeypatch.setattr(streaming, "get_layer_types_and_kwargs", old_style)
    assert streaming.layer_windows(model) == new == [8, None]
    plain = tiny_model("llama")
    assert streaming.layer_windows(plain) == [None] * plain.config.num_hidden_layers


def _longrope_model():
    from conftest import build, tiny_config
    cfg = tiny_config("phi3", num_hidden_layers=1, max_position_embeddings=64, original_max_position_embeddings=32,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                       "short_factor": [1.0] * 6, "long_factor": [4.0 + i for i in range(6)],
                                       "original_max_position_embeddings": 32})
    model = build(cfg).double()
    model.set_attn_implementation("sdpa")
    return model


def test_longrope_positions_stay_in_the_short_factor_range():
    # longrope (Phi-3-128k style, short != long factors): transformers picks the long factors once a call's
    # largest position reaches original_max_position_embeddings. Positions by place must stay below it, or
    # new keys get the long factors while cached keys and re-rotations keep the short ones (a 7e-3 logit
    # error against both references with the old default of max_position_embeddings). One layer: exact.
    model = _longrope_model()
    s, w = 3, 9
    ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(0))
    with longctx.applied(model, "streaming", sink_size=s, window_size=w), torch.no_grad():
        cache = SinkCache(model, s, w)
        assert cache.max_position == 32
        prefill(model, ids[:, :20], cache)
        for t in range(20, 120):
            got = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            kept = torch.cat([ids[0, :s], ids[0, t + 1 - w:t + 1]])[None]
            want = model(kept, position_ids=torch.arange(s + w)[None]).logits[0, -1]  # dense, positions by place
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"original_max_position_embeddings \(32\).*at most 32"):
            SinkCache(model, 4, 40)
        with pytest.raises(ValueError, match=r"max_position=48: use a cache and max_position of at most 32"):
            SinkCache(model, s, w, max_position=48)


def _streams_by_place(model, cache, ids, s, w, start, stop):
    """Feed ids[start:stop] one token at a time into ``cache`` (s sinks + w window): each token's logits equal a dense
    forward over the tokens the cache keeps, with positions by place (fp64, one layer: exact to 1e-6)."""
    for t in range(start, stop):
        got = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
        kept = ids[:, :t + 1] if t < s + w else torch.cat([ids[0, :s], ids[0, t + 1 - w:t + 1]])[None]
        want = model(kept, position_ids=torch.arange(kept.shape[1])[None]).logits[0, -1]  # positions by place
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, options", [("yarn", {"factor": 4}), ("linear", {"factor": 4})])
def test_a_rope_patch_on_phi3_streams_past_the_trained_length(method, options):
    # longctx writes its static methods on phi3 as longrope with equal short and long factors: the switch at
    # original_max_position_embeddings changes nothing there, but streaming refused every cache longer than the
    # trained length on such a model (the very case a RoPE patch is applied for). One layer: exact
    from conftest import build, tiny_config
    model = build(tiny_config("phi3", num_hidden_layers=1, original_max_position_embeddings=64)).double()
    s, w = 3, 70  # capacity 73 > 64
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    with longctx.applied(model, method, **options), longctx.applied(model, "streaming", sink_size=s, window_size=w), \
            torch.no_grad():
        cache = SinkCache(model, s, w)
        prefill(model, ids[:, :20], cache)
        _streams_by_place(model, cache, ids, s, w, 20, 300)
    with pytest.raises(ValueError, match=r"original_max_position_embeddings \(32\)"):  # a real switch: refused
        SinkCache(_longrope_model(), s, w)


def test_phi3_generate_keeps_the_sink_cache_past_original_max_position():
    # phi3's prepare_inputs_for_generation drops the cache once the sequence passes
    # original_max_position_embeddings (to redo it with longrope's long factors): under streaming that was a
    # dense pass over everything and then an error. The patch keeps the cache (an instance attribute while on)
    from longctx.chat import stream_generate

    model = tiny_model("phi3", original_max_position_embeddings=32).double()
    ids = ids_for(7)
    cls_prepare = type(model).prepare_inputs_for_generation
    with longctx.applied(model, "streaming", sink_size=2, window_size=10):
        want = list(stream_generate(model, ids, 60))
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
        assert got == want
    assert "prepare_inputs_for_generation" not in model.__dict__
    assert model.prepare_inputs_for_generation.__func__ is cls_prepare


def test_streaming_perplexity_restores_training_mode_and_refuses_a_batch():
    model = tiny_model("llama").train()
    ids = ids_for(30, batch=2)
    res = streaming_perplexity(model, ids[0], 2, 8, progress=False)
    assert model.training and all(m.training for m in model.modules())  # left as it was, not in eval mode
    model.eval()
    streaming_perplexity(model, ids[:1], 2, 8, policy="dense", progress=False)  # (1, N): one stream
    assert not model.training
    with pytest.raises(ValueError, match=r"ids must be one token stream \(1-D, or \(1, N\)\), got shape \(2, 30\)"):
        streaming_perplexity(model, ids, 2, 8, progress=False)  # two streams were flattened into one
    assert res["tokens"] == 29


def test_numpy_integer_sizes_are_accepted():
    """sink_size, like window_size and every other option, takes numpy integers (np.arange sweeps)."""
    np = pytest.importorskip("numpy")
    model = tiny_model("llama")
    with longctx.applied(model, "streaming", sink_size=np.int64(2), window_size=np.int64(8)) as patch:
        assert patch.options.to_dict() == {"sink_size": 2, "window_size": 8}
        assert type(patch.new_cache().sink_size) is int
    assert type(SinkCache(model, np.int32(2), np.int32(8)).sink_size) is int
    res = streaming_perplexity(model, ids_for(12)[0], np.int64(2), np.int64(8), progress=False)
    assert res["sink_size"] == 2 and type(res["sink_size"]) is int


def test_streaming_perplexity_takes_a_numpy_chunk_size():
    # sink_size and window_size took numpy integers, chunk_size (the same call, an np.arange sweep) was refused
    # ("chunk_size must be a positive integer, got np.int64(4)"); True was taken as chunk_size 1
    np = pytest.importorskip("numpy")
    model, ids = tiny_model("llama"), ids_for(20)[0]
    res = streaming_perplexity(model, ids, 2, 8, chunk_size=np.int64(4), progress=False)
    assert res == {**res, "chunk_size": 4} and type(res["chunk_size"]) is int
    assert res["ppl"] == streaming_perplexity(model, ids, 2, 8, chunk_size=4, progress=False)["ppl"]
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got True"):
        streaming_perplexity(model, ids, 2, 8, chunk_size=True, progress=False)


def test_streaming_perplexity_needs_two_tokens():
    # the first token is context only: an empty or 1-token stream scores nothing (was ppl 1.0 over 0 tokens)
    from longctx.eval.streaming import POLICIES

    model = tiny_model("llama")
    for policy in POLICIES:
        for n in (0, 1):
            with pytest.raises(ValueError, match="at least 2 tokens"):
                streaming_perplexity(model, torch.arange(3, 3 + n), 2, 6, policy=policy, progress=False)
    assert streaming_perplexity(model, torch.arange(3, 5), 2, 6, progress=False)["tokens"] == 1


def test_streaming_keeps_a_models_own_prepare_inputs():
    # a model whose instance already overrides prepare_inputs_for_generation (as peft does) keeps it: while
    # on, the patch's stream-position slicing wraps it; remove() puts it back
    model = tiny_model("llama")
    calls = []

    def own(*args, **kwargs):
        calls.append(kwargs.get("next_sequence_length"))
        return type(model).prepare_inputs_for_generation(model, *args, **kwargs)
    model.prepare_inputs_for_generation = own
    ids = ids_for(7)
    with longctx.applied(model, "streaming", sink_size=2, window_size=4):
        assert model.prepare_inputs_for_generation is not own
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True)
        calls.clear()
        model.generate(out.sequences, past_key_values=out.past_key_values, max_new_tokens=2, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
        assert calls == [1, 1]  # the stream has seen 12 of the 13 tokens (was 13 - 6 slots = 7)
    assert model.__dict__["prepare_inputs_for_generation"] is own


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_generate_continues_from_a_returned_sink_cache(family):
    # model.generate(sequences, past_key_values=cache) slices off cache.get_seq_length(): the slot count.
    # Once tokens were evicted, that fed tokens the stream had seen a second time (silently wrong outputs)
    model = tiny_model(family).double()
    ids = ids_for(9)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        want = model.generate(ids, max_new_tokens=14, **kw)
        out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
        assert out.past_key_values.seen_tokens > out.past_key_values.get_seq_length()  # tokens were evicted
        got = model.generate(out.sequences, past_key_values=out.past_key_values, max_new_tokens=9, **kw)
        assert torch.equal(got, want)
        # the same with only the new token and a mask over the whole stream (generate does not slice then)
        out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
        mask = torch.ones_like(out.sequences)
        got = model.generate(out.sequences[:, -1:], attention_mask=mask, past_key_values=out.past_key_values,
                             max_new_tokens=9, **kw)
        assert torch.equal(got[:, 1:], want[:, out.sequences.shape[1]:])
        # fewer tokens than the stream has seen: nothing new to feed
        out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
        with pytest.raises(ValueError, match=r"sink cache that has seen 13"):
            model.generate(out.sequences[:, :12], past_key_values=out.past_key_values, max_new_tokens=2, **kw)
        # a mask over the history that does not match the stream
        with pytest.raises(ValueError, match=r"the attention mask covers 20 tokens, but the sink cache has seen 13"):
            model(out.sequences[:, -1:], attention_mask=torch.ones(1, 20, dtype=torch.long),
                  past_key_values=out.past_key_values)


def test_generate_takes_inputs_embeds_and_continues_from_them():
    # the patch's prepare_inputs_for_generation wrapper hid the model's signature, and generate refuses
    # inputs_embeds unless prepare_inputs_for_generation names them (a ValueError since the wrapper came)
    model = tiny_model("llama").double()
    ids, embed = ids_for(9), model.get_input_embeddings()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad(), longctx.applied(model, "streaming", sink_size=2, window_size=6):
        want = model.generate(ids, max_new_tokens=14, **kw)
        out = model.generate(inputs_embeds=embed(ids), max_new_tokens=5, return_dict_in_generate=True, **kw)
        seen = torch.cat([ids, out.sequences], dim=1)
        assert torch.equal(seen, want[:, :14])
        assert out.past_key_values.seen_tokens > out.past_key_values.get_seq_length()  # tokens were evicted
        got = model.generate(inputs_embeds=embed(seen), past_key_values=out.past_key_values, max_new_tokens=9, **kw)
    assert torch.equal(torch.cat([seen, got], dim=1), want)


def test_chunked_prefill_continues_a_stream_as_unchunked():
    # generate's chunked prefill (prefill_chunk_size) cuts its input by get_seq_length() (the slot count) and never
    # passes next_sequence_length (5.17 does not slice a continuation at all): continuing an evicted stream re-fed the
    # tokens past the slots (then refused; under 5.17 after the first chunk had gone into the cache). A continuation
    # now runs unchunked (the patch chunks long inputs itself): the same tokens and logits as without the option
    import copy

    model = tiny_model("llama").double()
    ids = ids_for(9)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), longctx.applied(model, "streaming", sink_size=2, window_size=6):
        out = model.generate(ids, max_new_tokens=5, prefill_chunk_size=3, **kw)  # a fresh stream: chunked
        assert out.past_key_values.seen_tokens == 13
        seq = torch.cat([out.sequences, ids_for(8, seed=5)], dim=1)  # the sequence plus 8 new tokens (9 unseen)
        results = []
        for chunk in (3, None):
            cache = copy.deepcopy(out.past_key_values)
            got = model.generate(seq, past_key_values=cache, max_new_tokens=3, prefill_chunk_size=chunk, **kw)
            assert cache.seen_tokens == 13 + 9 + 2
            results.append((got.sequences, torch.stack(got.logits)))
        assert all(torch.equal(a, b) for a, b in zip(*results))
        with pytest.raises(ValueError, match="sink cache that has seen 24: pass the whole stream"):
            model.generate(seq, past_key_values=cache, max_new_tokens=1, prefill_chunk_size=3, **kw)
    assert "_prefill" not in model.__dict__ and "prepare_inputs_for_generation" not in model.__dict__


def test_deepcopy_and_pickle_of_a_streaming_model_act_on_the_copy():
    # the patch's prepare_inputs_for_generation / _prefill instance attributes were closures over the original's
    # bound methods: a deepcopy's generate ran the original model's forward for its prompt (the original's tokens;
    # a ValueError once the original's patch was removed), and torch.save(model) could not pickle them
    import copy
    import io

    model, other = tiny_model("llama").double(), tiny_model("llama", seed=1).double()
    ids = ids_for(9)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=10)
    dense = other.generate(ids, **kw)
    with longctx.applied(other, "streaming", sink_size=2, window_size=6):
        want = other.generate(ids, **kw)
        out = other.generate(ids, max_new_tokens=5, return_dict_in_generate=True,
                             **{k: v for k, v in kw.items() if k != "max_new_tokens"})
        want_continued = other.generate(out.sequences, past_key_values=out.past_key_values, **kw)
    assert not torch.equal(want, dense)  # the stream evicted tokens
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    twin = copy.deepcopy(model)
    twin.load_state_dict(other.state_dict())
    assert torch.equal(twin.generate(ids, **kw), want)
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.generate(ids, **kw), want)
    patch.remove()
    assert "prepare_inputs_for_generation" not in model.__dict__ and "_prefill" not in model.__dict__
    assert torch.equal(twin.generate(ids, **kw), want)  # the copy streams on, on its own weights
    out = twin.generate(ids, max_new_tokens=5, return_dict_in_generate=True,
                        **{k: v for k, v in kw.items() if k != "max_new_tokens"})
    assert torch.equal(twin.generate(out.sequences, past_key_values=out.past_key_values, **kw), want_continued)


def test_copies_of_a_streaming_model_track_their_own_patch():
    # a deepcopy (or torch.save / torch.load) of a streaming model streams with a copy of the patch, which the
    # registry did not know: active_patches(copy) was [], stream_generate refused the copy, the copy's patch could
    # not be removed (list.remove failed, after undoing half of it), and a second streaming patch was accepted on
    # top of it (two hooks: generate failed on a mask of the wrong size; streaming_perplexity likewise)
    import copy
    import io

    from longctx.chat import stream_generate

    model = tiny_model("llama").double()
    ids = ids_for(9)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=10)
    dense = model.generate(ids, **kw)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        want = model.generate(ids, **kw)
    assert not torch.equal(want, dense)  # the stream evicted tokens
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        [own] = longctx.active_patches(twin)
        assert own is not patch and own.model is twin and own.active
        with pytest.raises(ValueError, match="'streaming' is already applied to this model"):
            longctx.apply(twin, "streaming", sink_size=2, window_size=8)
        assert len(list(stream_generate(twin, ids, max_new_tokens=3))) == 3
        assert torch.equal(twin.generate(ids, **kw), want)
        own.remove()  # undoes the copy only
        assert torch.equal(twin.generate(ids, **kw), dense) and longctx.active_patches(twin) == []
        assert "prepare_inputs_for_generation" not in twin.__dict__ and not hasattr(twin.config, "longctx")
        assert torch.equal(model.generate(ids, **kw), want) and longctx.active_patches(model) == [patch]
        with longctx.applied(twin, "streaming", sink_size=2, window_size=6):  # and takes a patch again
            assert torch.equal(twin.generate(ids, **kw), want)
    patch.remove()
    assert torch.equal(model.generate(ids, **kw), dense)

# -- review fixes ------------------------------------------------------------------------------------------
SPLIT_ROTARY = {"phi": dict(partial_rotary_factor=0.5), "stablelm": dict(partial_rotary_factor=0.25, num_key_value_heads=2),
                "persimmon": dict(partial_rotary_factor=0.5)}


def split_rotary_model(family, **overrides):
    config = AutoConfig.for_model(family, **{**_COMMON, **SPLIT_ROTARY[family], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()


@pytest.mark.parametrize("family", SPLIT_ROTARY)
def test_partial_rotary_split_off_by_the_attention(family):
    # phi, stablelm, persimmon give apply_rotary_pos_emb only the first rotary_ndims dims of each key (gpt_neox's,
    # glm's and phi3's function splits them itself): re-rotating whole keys crashed at the first eviction.
    # One layer: a kept token's key and value depend on it and its place only, so every step equals a dense
    # forward over the kept tokens (sinks, then the most recent) at positions 0, 1, ...
    model = split_rotary_model(family, num_hidden_layers=1)
    s, w = 3, 8
    ids = ids_for(40)
    with longctx.applied(model, "streaming", sink_size=s, window_size=w), torch.no_grad():
        cache = SinkCache(model, s, w, max_position=20)  # the offset also returns to 0 every 9 evictions
        for t in range(ids.shape[1]):
            got = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            kept = ids[0, :t + 1] if t < s + w else torch.cat([ids[0, :s], ids[0, t + 1 - w:t + 1]])
            want = model(kept[None], position_ids=torch.arange(len(kept))[None], use_cache=False).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_latent_attention_models_are_refused():
    # deepseek_v3 (MLA) caches compressed latents as "keys" and the shared RoPE key as "values": re-rotating the
    # latents crashed at the first eviction, or (sink_size=0) silently corrupted them at the first offset reset
    config = AutoConfig.for_model("deepseek_v3", **{**_COMMON, "num_key_value_heads": 4, "num_hidden_layers": 1,
                                                    "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                                                    "qk_nope_head_dim": 8, "v_head_dim": 16})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match=r"'deepseek_v3' \(multi-head latent attention\)"):
        longctx.apply(model, "streaming", sink_size=2, window_size=6)
    with pytest.raises(NotImplementedError, match="multi-head latent attention"):
        SinkCache(model, 2, 6)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_reorder_cache_for_beam_search(family):
    # beam search reorders the cache's rows (Cache.reorder_cache): the sink layers' original keys, the stacked
    # sink keys and the sliding layers' originals and shifts kept the old row order, so every re-rotation from
    # them (sinks at each eviction, all keys when the offset returns to 0) mixed the rows
    model = tiny_model("llama").double() if family == "llama" else mixed_model(family, sliding_window=16)
    ids = ids_for(30, batch=2)
    s, w = 2, 6
    with longctx.applied(model, "streaming", sink_size=s, window_size=w), torch.no_grad():
        alone = SinkCache(model, s, w, max_position=12)
        want = decode(model, ids[1:], alone)[:, 10:]
        beams = SinkCache(model, s, w, max_position=12)
        decode(model, ids[:, :10], beams)
        beams.reorder_cache(torch.tensor([1, 1]))  # both beams continue row 1
        got = decode(model, ids[1:, 10:].expand(2, -1), beams)
    torch.testing.assert_close(got, want.expand(2, -1, -1), rtol=1e-9, atol=1e-9)


def test_reset_starts_a_new_stream():
    # Cache.reset() emptied the layers but kept the places, offsets and counts of the old stream: the next
    # forward crashed (or, with the stacked sink keys of the old stream, rotated the wrong keys)
    model = mixed_model("gemma3_text")
    ids = ids_for(30)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6), torch.no_grad():
        want = decode(model, ids[:, 20:], SinkCache(model, 2, 6))
        cache = SinkCache(model, 2, 6)
        decode(model, ids[:, :20], cache)
        cache.reset()
        got = decode(model, ids[:, 20:], cache)
    assert torch.equal(got, want)
    assert cache.seen_tokens == 10 and cache.evicted_tokens == 2


def test_assisted_decoding_is_refused_clearly():
    # generate with an assistant model crops the cache: models without sliding layers failed with
    # "AttributeError: 'SinkLayer' object has no attribute 'crop'"
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=1)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        with pytest.raises(NotImplementedError, match="cannot be rolled back"):
            model.generate(ids_for(6), assistant_model=assistant, max_new_tokens=20, do_sample=False,
                           eos_token_id=None)


@pytest.mark.parametrize("prompt", [3, 12])  # shorter and longer than the sliding window (6)
def test_assisted_decoding_is_refused_clearly_with_sliding_layers(prompt):
    # gemma2's first layer is a sliding-window layer: Cache.crop reached transformers' crop of it first, which cut
    # its keys but not their originals before the sink layer refused, or (once the stream passed the window)
    # failed with "`crop` was called, but the current layer does not track past states ... activate_past_recording"
    model, assistant = mixed_model("gemma2"), mixed_model("gemma2")
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        with pytest.raises(NotImplementedError, match="cannot be rolled back"):
            model.generate(ids_for(prompt), assistant_model=assistant, max_new_tokens=20, do_sample=False,
                           eos_token_id=None)
        cache = SinkCache(model, 2, 6)
        decode(model, ids_for(prompt), cache)
        kept = [(layer.keys, layer.values) for layer in cache.layers]
        with pytest.raises(NotImplementedError, match="cannot be rolled back"):
            cache.crop(-1)
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, kept))  # nothing cut


def test_streaming_perplexity_refuses_a_model_with_the_streaming_patch():
    # the patch's hook swapped the dense policy's DynamicCache for a fresh SinkCache at every chunk (each chunk
    # scored without context) and then failed with an AttributeError; sinks/window failed in apply
    model = tiny_model("llama")
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        for policy in ("dense", "sinks"):
            with pytest.raises(ValueError, match="applies the streaming patch itself"):
                streaming_perplexity(model, ids_for(20)[0], 2, 6, policy=policy, progress=False)


def test_streaming_perplexity_refuses_a_streaming_patch_on_another_handle():
    # the patch applied through the base model (another handle of the same model, as the registry knows them):
    # its hook still swapped the dense policy's DynamicCache for a fresh SinkCache and failed with an AttributeError
    model = tiny_model("llama")
    with longctx.applied(model.model, "streaming", sink_size=2, window_size=6):
        for policy in ("dense", "sinks"):
            with pytest.raises(ValueError, match="applies the streaming patch itself"):
                streaming_perplexity(model, ids_for(20)[0], 2, 6, policy=policy, progress=False)
    assert streaming_perplexity(model, ids_for(20)[0], 2, 6, policy="dense", progress=False)["tokens"] == 19


def test_peft_prompt_learning_set_up_before_streaming_keeps_the_continuation_slicing():
    # PeftModel.generate (prompt learning) sets its own prepare_inputs_for_generation on the model and then restores
    # the one it saw at get_peft_model: streaming's wrapper was gone for good, and a later model.generate continuing
    # a stream fed the tokens past the slots a second time (silently: 6 tokens instead of 1 here)
    from peft import PromptTuningConfig, get_peft_model

    model = tiny_model("llama").double()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = ids_for(9)
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model.generate(input_ids=ids, max_new_tokens=3, **kw)
    with peft_model.disable_adapter():
        out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
        cache = out.past_key_values
        assert (cache.seen_tokens, cache.get_seq_length()) == (13, 8)
        model.generate(out.sequences, past_key_values=cache, max_new_tokens=3, **kw)
        assert cache.seen_tokens == 13 + 1 + 2  # the one new token, then two steps
    peft_model.generate(input_ids=ids, max_new_tokens=2, **kw)  # peft sets its own again, and restores the class's
    patch.remove()
    assert "prepare_inputs_for_generation" not in model.__dict__ and "_prefill" not in model.__dict__


@pytest.mark.parametrize("temperature, top_k", [("0", None), ("0.7", 0)])
def test_generate_command_passes_top_k_only_when_sampling(monkeypatch, capsys, temperature, top_k):
    # greedy `longctx generate` passed top_k=0 to model.generate, and transformers printed "The following
    # generation flags are not valid and may be ignored: ['top_k']" on every default run
    import longctx.chat as chat
    from longctx.cli import build_parser
    from transformers import GenerationConfig

    seen = {}

    class Model:
        device = torch.device("cpu")
        generation_config = GenerationConfig(eos_token_id=None)

        def generate(self, ids, **kwargs):
            seen.update(kwargs)
            return torch.cat([ids, torch.tensor([[5, 6]])], dim=1)

    class Tok:
        eos_token_id, pad_token_id = None, 0

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            return {"input_ids": torch.tensor([[1, 2, 3]])}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    monkeypatch.setattr(chat, "_load", lambda args: (Model(), Tok()))
    args = build_parser().parse_args(["generate", "--prompt", "x", "--max-new-tokens", "2", "--temperature",
                                      temperature])
    assert chat.cmd_generate(args) == 0 and capsys.readouterr().out.strip() == "5 6"
    assert seen.get("top_k") == top_k and ("top_k" in seen) == (top_k is not None)


def test_peft_prompt_learning_generate_run_before_streaming_keeps_the_continuation_slicing():
    # once PeftModel.generate (prompt learning) has run, the model's instance attribute is the class's method, bound
    # (what peft restores): streaming applied after that took it for the model's own, wrapped it as is (phi3: its
    # cache-dropping prepare) and never put its wrapper back after the next peft generate (6 tokens fed, not 1)
    from peft import PromptTuningConfig, get_peft_model

    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = ids_for(9)
    model = tiny_model("llama").double()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    peft_model.generate(input_ids=ids, max_new_tokens=1, **kw)
    left = model.__dict__["prepare_inputs_for_generation"]  # the class's, bound
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model.generate(input_ids=ids, max_new_tokens=3, **kw)
    with peft_model.disable_adapter():
        _continues_with_one_new_token(model, ids, kw)
    patch.remove()
    assert model.__dict__["prepare_inputs_for_generation"] is left and "_prefill" not in model.__dict__
    # phi3: the wrapper wraps the cache-keeping prepare (the cache was dropped past original_max_position_embeddings)
    model = tiny_model("phi3", original_max_position_embeddings=32).double()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    peft_model.generate(input_ids=ids_for(7), max_new_tokens=1, **kw)
    with longctx.applied(model, "streaming", sink_size=2, window_size=10), peft_model.disable_adapter():
        got = model.generate(ids_for(7), max_new_tokens=40, **kw)
        assert got.shape == (1, 47)


def _prompt_tuned(streaming_first):
    """A tiny fp64 llama under peft prompt tuning (2 virtual tokens) and streaming (2 sinks + 6), in either order."""
    from peft import PromptTuningConfig, get_peft_model

    model = tiny_model("llama").double()
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6) if streaming_first else None
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    if patch is None:
        longctx.apply(model, "streaming", sink_size=2, window_size=6)
    return model, peft_model


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("streaming_first", [True, False])
def test_peft_prompt_tuning_continues_a_stream_as_one_call(streaming_first, mask):
    # PeftModel.generate feeds prompt tuning's virtual tokens into the stream before the prompt; out.sequences does
    # not hold them. Continuing it with out.sequences was refused with streaming applied before get_peft_model ("got
    # 14 tokens with a sink cache that has seen 15"); applied after, peft's prepare (which calls the class's, not the
    # patch's wrapper) sliced by the slot count and kept one token by its own rule only while the slots reached that
    # slice: past twice the slots (21 tokens here) it fed 13 tokens the stream had seen a second time (silently)
    model, peft_model = _prompt_tuned(streaming_first)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ids = ids_for(9)
    masked = (lambda x: dict(attention_mask=torch.ones_like(x))) if mask else (lambda x: {})
    for a, b in ((5, 4), (12, 4)):
        want = peft_model.generate(input_ids=ids, max_new_tokens=a + b, **masked(ids), **kw)
        out = peft_model.generate(input_ids=ids, max_new_tokens=a, **masked(ids), **kw)
        cache = out.past_key_values
        assert cache.seen_tokens == 2 + 9 + a - 1 > cache.get_seq_length()  # the virtual tokens too; evicted
        got = peft_model.generate(input_ids=out.sequences, past_key_values=cache, max_new_tokens=b,
                                  **masked(out.sequences), **kw)
        assert cache.seen_tokens == 2 + 9 + a + b - 1  # the one new token, then b - 1 steps
        assert torch.equal(got.sequences, want.sequences)
        assert torch.equal(torch.stack(out.logits + got.logits), torch.stack(want.logits))


@pytest.mark.parametrize("streaming_first", [True, False])
def test_peft_prompt_tuning_stream_refuses_what_it_has_seen(streaming_first):
    # a sequence the stream has seen all of is refused in either order, the message counting the virtual tokens
    # (applied after get_peft_model, peft's last-token rule fed its last token a second time); model.generate
    # continuing a stream that PeftModel.generate began feeds the one new token (it was refused)
    model, peft_model = _prompt_tuned(streaming_first)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    out = peft_model.generate(input_ids=ids_for(9), max_new_tokens=5, **kw)
    cache = out.past_key_values
    for seen in (out.sequences[:, :-1], out.sequences[:, :-3]):
        with pytest.raises(ValueError, match=r"has seen 15 \(2 of them before the sequence, e\.g\. prompt tuning"):
            peft_model.generate(input_ids=seen, past_key_values=cache, max_new_tokens=2, **kw)
    assert cache.seen_tokens == 15  # nothing was fed
    with peft_model.disable_adapter():
        model.generate(out.sequences, past_key_values=cache, max_new_tokens=3, **kw)
    assert cache.seen_tokens == 15 + 1 + 2


@pytest.mark.parametrize("streaming_first", [True, False])
def test_peft_prompt_tuning_feeds_every_new_token(streaming_first):
    # peft's prepare keeps only the last input id wherever the slot count reaches the ids given: a continuation with
    # more than one new token (the sequence plus new ones, or the new ones with a mask over the sequence) and every
    # chunk but the first of a chunked prefill (prefill_chunk_size) fed their last token only (silently under 5.23:
    # 16 tokens seen instead of 19; a ValueError about the mask under 5.17)
    import copy

    model, peft_model = _prompt_tuned(streaming_first)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ids, extra = ids_for(9), ids_for(3, seed=7)
    for new_only in (False, True):
        out = peft_model.generate(input_ids=ids, max_new_tokens=5, **kw)
        cache = out.past_key_values
        seq = torch.cat([out.sequences, extra], dim=1)
        ref = copy.deepcopy(cache)
        with torch.no_grad():
            want = model(seq[:, -4:], past_key_values=ref).logits[:, -1]
        given = dict(input_ids=seq[:, -4:], attention_mask=torch.ones_like(seq)) if new_only else dict(input_ids=seq)
        got = peft_model.generate(past_key_values=cache, max_new_tokens=1, **given, **kw)
        assert cache.seen_tokens == ref.seen_tokens == 15 + 4
        assert torch.equal(got.logits[0], want.float())  # (generate's logits are float32)
    # a new stream prefilled in chunks of 3: the virtual tokens and the first chunk, then the others whole
    got = peft_model.generate(input_ids=ids, max_new_tokens=1, prefill_chunk_size=3, **kw)
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        prompt = peft_model.get_prompt(batch_size=1).to(torch.float64)
        model(inputs_embeds=torch.cat([prompt, model.get_input_embeddings()(ids[:, :3])], dim=1), past_key_values=cache)
        model(ids[:, 3:6], past_key_values=cache)
        want = model(ids[:, 6:], past_key_values=cache).logits[:, -1]
    assert got.past_key_values.seen_tokens == 2 + 9 and got.past_key_values.prefix_tokens == 2
    assert torch.equal(got.logits[0], want.float())


def test_peft_forward_feeding_the_virtual_tokens_again_is_refused():
    # PeftModel's forward (prompt tuning) puts the virtual tokens before every input and their mask before the one
    # given: continuing a stream that PeftModel.generate began through it with a mask over the sequence fed the two
    # virtual tokens a second time (silently: the mask over the sequence was taken for one over the new tokens);
    # model's forward with the same mask feeds the one new token
    import copy

    model, peft_model = _prompt_tuned(True)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    out = peft_model.generate(input_ids=ids_for(9), max_new_tokens=5, **kw)
    cache, seq = out.past_key_values, out.sequences
    with torch.no_grad(), pytest.raises(ValueError, match="the attention mask covers 16 tokens, but the sink cache "
                                                          "has seen 15 and 3 are new"):
        peft_model(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq), past_key_values=cache)
    assert cache.seen_tokens == 15
    with torch.no_grad():
        model(seq[:, -1:], attention_mask=torch.ones_like(seq), past_key_values=cache)
    assert cache.seen_tokens == 16


def test_peft_begun_stream_continues_from_inputs_embeds():
    # a stream PeftModel.generate began (2 virtual tokens before the sequence) continued by model.generate with the
    # embeddings of the sequence: the hook took a mask over the sequence for token ids only, so the one generate
    # passes with them (5.17 keeps an all-ones mask; 5.23 drops it, but not one with zeros) was refused ("the
    # attention mask covers 17 tokens, but the sink cache has seen 15 and 4 are new"); generate's first prepare as
    # 5.17 calls it is run here directly, under either version
    import copy

    model, peft_model = _prompt_tuned(True)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    out = peft_model.generate(input_ids=ids_for(9), max_new_tokens=5, **kw)
    cache = out.past_key_values
    assert cache.seen_tokens == 15 and cache.prefix_tokens == 2
    seq = torch.cat([out.sequences, ids_for(3, seed=7)], dim=1)
    ref = copy.deepcopy(cache)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(seq)
        want = model(seq[:, -4:], past_key_values=ref).logits[:, -1]
        c = copy.deepcopy(cache)
        inputs = model.prepare_inputs_for_generation(seq, inputs_embeds=embeds, attention_mask=torch.ones_like(seq),
                                                     past_key_values=c, next_sequence_length=seq.shape[1] - 13,
                                                     is_first_iteration=True, use_cache=True)
        assert torch.equal(model(**inputs).logits[:, -1], want) and c.seen_tokens == 19
        by_ids = model.generate(seq, past_key_values=copy.deepcopy(cache), max_new_tokens=3, **kw)
        got = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(seq), past_key_values=cache,
                             max_new_tokens=3, **kw)
    assert cache.seen_tokens == 19 + 2
    assert torch.equal(got.logits[0], want.float())
    assert torch.equal(torch.stack(got.logits), torch.stack(by_ids.logits))


@pytest.mark.parametrize("chunk", [None, 3])
def test_generate_refuses_a_sequence_the_stream_has_seen_before_it_evicted(chunk):
    # a sequence the stream has seen all of was refused only once tokens were evicted: before, generate's slice
    # (the slot count, as many as the tokens seen) was input_ids[:, -0:], the whole sequence fed a second time
    # (silently: 23 tokens seen instead of 11, the chunked prefill too), or past it for a shorter one
    model = tiny_model("llama").double()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad(), longctx.applied(model, "streaming", sink_size=2, window_size=60):
        out = model.generate(ids_for(9), max_new_tokens=3, **kw)
        cache = out.past_key_values
        assert cache.seen_tokens == cache.get_seq_length() == 11
        for seen in (out.sequences[:, :-1], out.sequences[:, :-3]):
            with pytest.raises(ValueError, match=r"sink cache that has seen 11: pass the whole stream"):
                model.generate(seen, past_key_values=cache, max_new_tokens=2, prefill_chunk_size=chunk, **kw)
        assert cache.seen_tokens == 11  # nothing was fed
        got = model.generate(out.sequences, past_key_values=cache, max_new_tokens=2, **kw)
        assert cache.seen_tokens == 13 and got.sequences.shape[1] == 14


def test_a_removed_patchs_wrapper_put_back_by_peft_is_inert():
    # peft set up while streaming was on saw its wrapper, and PeftModel.generate (prompt learning) puts that back
    # after the patch was removed: it still sliced, and a new streaming patch wrapped it, slicing twice (a ValueError)
    from peft import PromptTuningConfig, get_peft_model

    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = ids_for(9)
    model = tiny_model("llama").double()
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    patch.remove()
    peft_model.generate(input_ids=ids, max_new_tokens=2, **kw)
    stale = model.__dict__["prepare_inputs_for_generation"]
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model.generate(input_ids=ids, max_new_tokens=2, **kw)  # puts the stale one back again
    with peft_model.disable_adapter():
        out, cache = _continues_with_one_new_token(model, ids, kw)
    patch.remove()
    assert model.__dict__["prepare_inputs_for_generation"] is stale
    # unpatched, the stale wrapper is the class's method (it sliced by the sink cache's evicted tokens still)
    seq = torch.cat([out.sequences, ids_for(2, seed=1)], dim=1)
    call = dict(past_key_values=cache, next_sequence_length=seq.shape[1] - 8, is_first_iteration=True)
    want = type(model).prepare_inputs_for_generation(model, seq, **call)["input_ids"]
    assert want.shape[1] == seq.shape[1] - 8 and torch.equal(stale(seq, **call)["input_ids"], want)


def test_a_copy_of_a_sink_cache_shares_the_model():
    # copy.deepcopy(cache) (transformers' prompt-cache pattern) copied the whole model with the cache
    import copy
    model = tiny_model("llama").double()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with longctx.applied(model, "streaming", sink_size=2, window_size=6):
        out = model.generate(ids_for(9), max_new_tokens=5, return_dict_in_generate=True, **kw)
        cache = out.past_key_values
        dup = copy.deepcopy(cache)
        assert dup._model is model and dup.seen_tokens == cache.seen_tokens == 13
        got = model.generate(out.sequences, past_key_values=dup, max_new_tokens=4, **kw)
        assert cache.seen_tokens == 13  # the original is untouched
        assert torch.equal(model.generate(out.sequences, past_key_values=cache, max_new_tokens=4, **kw), got)
        twin, twin_cache = copy.deepcopy((model, cache))  # copied together: the copy's cache streams through the copy
        assert twin_cache._model is twin and twin is not model
        cache_first, model_first = copy.deepcopy((cache, model))
        assert model_first is not model  # the model is copied still, where asked (the cache moves to it when used)


def test_a_removed_patchs_wrapper_on_phi3_is_the_class_prepare_again():
    # phi3: the patch wraps the cache-keeping prepare (its parent's) while it is on. A removed patch's wrapper that
    # peft (set up while the patch was on) puts back still ran that one: the unpatched phi3 kept a cache of fewer than
    # original_max_position_embeddings tokens past that length instead of dropping it (its longrope recompute)
    from peft import PromptTuningConfig, get_peft_model
    from transformers import DynamicCache

    model = tiny_model("phi3", original_max_position_embeddings=32).double()
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=10)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    patch.remove()
    peft_model.generate(input_ids=ids_for(7), max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
    stale = model.__dict__["prepare_inputs_for_generation"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids_for(32), past_key_values=cache, use_cache=True)
    call = dict(past_key_values=cache, next_sequence_length=1)
    seq = ids_for(33)
    want = type(model).prepare_inputs_for_generation(model, seq, **call)
    assert "past_key_values" not in want  # phi3 drops the cache (the ids it keeps differ between 5.17 and 5.23)
    got = stale(seq, **call)
    assert "past_key_values" not in got and torch.equal(got["input_ids"], want["input_ids"])


def _continues_with_one_new_token(model, ids, kw):
    """model.generate continuing a stream from its returned SinkCache feeds the one new token (not the tokens past the
    slot count again): 9 prompt tokens + 4 generated = 13 seen, then the new token and two steps."""
    out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
    cache = out.past_key_values
    model.generate(out.sequences, past_key_values=cache, max_new_tokens=3, **kw)
    assert cache.seen_tokens == 13 + 1 + 2
    return out, cache


def _model_with_own_prepare():
    """A tiny llama whose instance has its own prepare_inputs_for_generation, which records next_sequence_length."""
    model = tiny_model("llama").double()
    calls = []

    def own(*args, **kwargs):
        calls.append(kwargs.get("next_sequence_length"))
        return type(model).prepare_inputs_for_generation(model, *args, **kwargs)
    model.prepare_inputs_for_generation = own
    return model, calls  # (the own method: model.__dict__["prepare_inputs_for_generation"])


def test_a_removed_patchs_wrapper_of_a_models_own_prepare_stays_that_one():
    # a removed patch's wrapper of the model's own prepare (put back by peft, set up while the patch was on) stands
    # for that own prepare, not the class's: a later patch took it for the class's method and bypassed the own one
    from peft import PromptTuningConfig, get_peft_model

    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model, calls = _model_with_own_prepare()
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    patch.remove()
    peft_model.generate(input_ids=ids_for(9), max_new_tokens=2, **kw)
    stale = model.__dict__["prepare_inputs_for_generation"]
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model.generate(input_ids=ids_for(9), max_new_tokens=2, **kw)  # puts the stale one back again
    with peft_model.disable_adapter():
        out = model.generate(ids_for(9), max_new_tokens=5, return_dict_in_generate=True, **kw)
        calls.clear()
        model.generate(out.sequences, past_key_values=out.past_key_values, max_new_tokens=3, **kw)
        assert calls == [1, 1, 1] and out.past_key_values.seen_tokens == 13 + 1 + 2  # own, sliced once
    patch.remove()
    assert model.__dict__["prepare_inputs_for_generation"] is stale


def test_stream_generate_sees_a_patch_applied_through_the_base_model():
    # applied through model.model (another handle of the model: model.generate streams under it), the patch was
    # missing from active_patches(model), and stream_generate(model) said "needs the streaming patch:
    # longctx.apply(model, 'streaming', ...)", which then failed as "already applied"
    from longctx.chat import stream_generate

    ids = ids_for(30)
    with longctx.applied(tiny_model("llama"), "streaming", sink_size=2, window_size=8) as ref:
        want = list(stream_generate(ref.model, ids, 8))
    model = tiny_model("llama")
    with longctx.applied(model.model, "streaming", sink_size=2, window_size=8) as patch:
        assert longctx.active_patches(model) == [patch] == longctx.active_patches(model.model)
        assert list(stream_generate(model, ids, 8)) == want
        # the body itself has no head: a clear error, not an AttributeError on its output's missing logits
        with pytest.raises(TypeError, match=r"stream_generate needs a causal language model.*LlamaModel.*ForCausalLM"):
            stream_generate(model.model, ids, 8)


@pytest.mark.parametrize("removed_first", [False, True])
def test_peft_restoring_a_models_own_prepare_gets_the_wrapper_back(removed_first):
    # the wrapper was put back only where peft restored the class's method or the very object the patch wrapped: where
    # peft restored the model's own prepare itself (set up before the patch), or a removed patch's wrapper of it (the
    # patch applied before peft's generate put that back), later continuations fed 6 tokens, not 1 (silently)
    from peft import PromptTuningConfig, get_peft_model

    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model, calls = _model_with_own_prepare()
    own = model.__dict__["prepare_inputs_for_generation"]
    first = longctx.apply(model, "streaming", sink_size=2, window_size=6) if removed_first else None
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    if first is not None:  # peft saw that patch's wrapper; the next patch is applied before peft puts it back
        first.remove()
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    peft_model.generate(input_ids=ids_for(9), max_new_tokens=2, **kw)  # restores what it saw
    with peft_model.disable_adapter():
        out = model.generate(ids_for(9), max_new_tokens=5, return_dict_in_generate=True, **kw)
        calls.clear()
        model.generate(out.sequences, past_key_values=out.past_key_values, max_new_tokens=3, **kw)
        assert calls == [1, 1, 1] and out.past_key_values.seen_tokens == 13 + 1 + 2
    peft_model.generate(input_ids=ids_for(9), max_new_tokens=2, **kw)
    patch.remove()
    assert model.__dict__["prepare_inputs_for_generation"] is own


@pytest.mark.parametrize("patch_first", [False, True])
def test_a_patch_pickled_before_plain_keeps_the_peft_reinstall(patch_first, monkeypatch):
    # a patch pickled by longctx before _plain, applied after peft's generate (prompt learning) had left the class's
    # method bound on the model: loaded, it took that for the model's own method, so after the next peft generate the
    # wrapper was not put back (6 tokens fed, not 1); pickled after the model, its own method came back as its wrapper
    # (a bound method pickles as getattr(model, name)): generate failed on a wrapper loop
    import io

    from peft import PromptTuningConfig, get_peft_model

    from longctx.methods.streaming import StreamingPatch

    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = ids_for(9)
    model = tiny_model("llama").double()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    peft_model.generate(input_ids=ids, max_new_tokens=1, **kw)
    patch = longctx.apply(model, "streaming", sink_size=2, window_size=6)
    saving = StreamingPatch.__getstate__
    monkeypatch.setattr(StreamingPatch, "__getstate__", lambda self: {
        k: v for k, v in saving(self).items() if k != "_plain"})
    buf = io.BytesIO()
    torch.save((patch, peft_model) if patch_first else (peft_model, patch), buf)
    monkeypatch.undo()
    buf.seek(0)
    got = torch.load(buf, weights_only=False)
    loaded, twin = (got[0], got[1]) if patch_first else (got[1], got[0])
    base = twin.get_base_model()
    assert longctx.active_patches(base) == [loaded]
    twin.generate(input_ids=ids, max_new_tokens=2, **kw)
    with twin.disable_adapter():
        out = base.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
        base.generate(out.sequences, past_key_values=out.past_key_values, max_new_tokens=3, **kw)
        assert out.past_key_values.seen_tokens == 13 + 1 + 2
    loaded.remove()
    left = base.__dict__["prepare_inputs_for_generation"]
    assert left.__self__ is base and left.__func__ is type(base).prepare_inputs_for_generation
    assert "_prefill" not in base.__dict__


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_saved_sink_cache_keeps_no_model_and_streams_on_bit_identically(family):
    # torch.save of a SinkCache pickled the whole model with it (the file held every weight; a loaded cache
    # re-rotated its keys through that copy). Now the model stays out; a loaded cache is bound to the model it
    # is next used with, and continues the stream exactly as the original cache does
    import copy

    model = tiny_model(family).double()
    ids = ids_for(30)
    with longctx.applied(model, "streaming", sink_size=2, window_size=8) as patch:
        cache = patch.new_cache()
        decode(model, ids[:, :20], cache)                                # 20 tokens: 10 evicted
        buf = _saved(cache)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert buf.getbuffer().nbytes < weights / 4                      # the cache's tensors, not the model
        loaded = torch.load(io_of(buf), weights_only=False)
        assert loaded._model is None and copy.copy(cache)._model is model
        with pytest.raises(RuntimeError, match="cache.bind"):
            loaded.model
        want = decode(model, ids[:, 20:], cache)
        got = decode(model, ids[:, 20:], loaded)                         # bound on its first forward
        assert loaded._model is model and torch.equal(got, want)


def io_of(buf):
    buf.seek(0)
    return buf


def _reloaded(obj):
    """``obj`` through torch.save and torch.load."""
    return torch.load(io_of(_saved(obj)), weights_only=False)


def test_binding_a_saved_sink_cache_checks_the_model_layout():
    model, other = tiny_model("llama").double(), tiny_model("gpt_neox").double()
    with longctx.applied(model, "streaming", sink_size=2, window_size=8) as patch:
        cache = patch.new_cache()
        decode(model, ids_for(12), cache)
    loaded = _reloaded(cache)
    with pytest.raises(ValueError, match="another model layout"):
        loaded.bind(other)
    assert loaded.bind(model) is loaded and loaded.model is model
    # bound to one model, it moves to another after the same checks (e.g. a copy of the model)
    twin = tiny_model("llama").double()
    assert loaded.bind(twin) is loaded and loaded.model is twin
    longctx.apply(twin, "yarn", factor=2)
    with pytest.raises(ValueError, match="other RoPE frequencies"):
        loaded.bind(copy.deepcopy(twin))
    assert loaded.model is twin
    # a directly driven (managed) cache: make_room re-rotates through the bound model, unbound it says what to do
    loaded = _reloaded(cache)
    loaded.managed = True
    with pytest.raises(RuntimeError, match="torch.load"):
        loaded.make_room(1)


def test_a_rope_patch_on_phi3_streams_as_far_as_on_llama(monkeypatch):
    # longctx's static methods on phi3 (longrope, equal factors) have frequencies no position changes, as on llama:
    # streaming counted them as dynamic (max_position = the patched max_position_embeddings instead of it +
    # capacity), so a cache longer than that re-rotated every key at every token. One layer: exact
    from conftest import build, tiny_config
    model = build(tiny_config("phi3", num_hidden_layers=1, original_max_position_embeddings=64)).double()
    s, w = 3, 150  # capacity 153 > 128, the patched max_position_embeddings
    calls = []
    rerotate = SinkCache._rerotate
    monkeypatch.setattr(SinkCache, "_rerotate", lambda self, start: (calls.append(self.seen_tokens),
                                                                      rerotate(self, start)))
    ids = torch.randint(3, 128, (1, 420), generator=torch.Generator().manual_seed(0))
    with longctx.applied(model, "linear", factor=2), longctx.applied(model, "streaming", sink_size=s, window_size=w), \
            torch.no_grad():
        llama = tiny_model("llama")
        with longctx.applied(llama, "linear", factor=2):
            assert SinkCache(model, s, w).max_position == SinkCache(llama, s, w).max_position == 128 + 153
        cache = SinkCache(model, s, w)
        prefill(model, ids[:, :20], cache)
        _streams_by_place(model, cache, ids, s, w, 20, 420)
    assert calls == [281, 410]  # once per max_position - capacity + 1 = 129 tokens, not at every token past 128


@pytest.mark.parametrize("short, long", [
    (torch.tensor([1.5, 2.0, 2.5, 3.0, 3.5, 4.0]), torch.tensor([1.5, 2.0, 2.5, 3.0, 3.5, 4.0])),
    ((1.5, 2.0, 2.5, 3.0, 3.5, 4.0), [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),
    ([1.5, 2.0, 2.5, 3.0, 3.5, 4.0], [1.5 + 1e-12, 2.0, 2.5, 3.0, 3.5, 4.0]),  # equal in float32, as transformers reads
])
def test_one_set_of_longrope_factors_in_any_form(short, long):
    # factors as tensors (a config edited in memory) made SinkCache raise "Boolean value of Tensor ... ambiguous";
    # a tuple against a list, or factors equal in float32 (transformers' tensors) only, read as two sets: refused
    model = _longrope_model()
    model.config.rope_parameters.update(short_factor=short, long_factor=long)
    cache = SinkCache(model, 3, 40)  # capacity 43 > original_max_position_embeddings (32)
    assert cache.max_position == 64 + 43
    model.config.rope_parameters.update(long_factor=[4.0 + i for i in range(6)])
    with pytest.raises(ValueError, match=r"original_max_position_embeddings \(32\)"):  # two sets: refused still
        SinkCache(model, 3, 40)


def test_a_saved_streaming_session_continues_the_conversation():
    # torch.save(session) keeps the model (the session's own attribute) but no longer inside its SinkCache; the
    # session's cache is managed, so the patch's forward never binds it: its next turn failed with "this SinkCache
    # was loaded with torch.load". The loaded session binds its cache to its model and goes on exactly as the original
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama").double(), tiny_tokenizer()
    session = StreamingSession(model, tok, sink_size=2, window_size=12)
    list(session.chat("w1 w2 w3 w4 w5 w6 w7 w8", max_new_tokens=4))
    assert session.cache.evicted_tokens > 0
    loaded = torch.load(io_of(_saved(session)), weights_only=False)
    want = "".join(session.chat("w9 w10 w11 w12", max_new_tokens=5))
    got = "".join(loaded.chat("w9 w10 w11 w12", max_new_tokens=5))
    assert got == want and torch.equal(loaded.last_logits, session.last_logits)
    assert loaded.cache.model is loaded.model
    assert loaded.cache.seen_tokens == session.cache.seen_tokens and loaded.cache.evicted_tokens > 0


def test_a_streaming_session_saved_without_its_model_loads_and_continues():
    # a session saved without its model (session.model = None: the weights kept out of the file) could not be
    # loaded at all (its __setstate__ bound the cache to None: TypeError). It loads; given its model, it binds on
    # its next turn and goes on exactly as the original
    from longctx.chat import StreamingSession

    model, tok = tiny_model("llama").double(), tiny_tokenizer()
    session = StreamingSession(model, tok, sink_size=2, window_size=12)
    list(session.chat("w1 w2 w3 w4 w5 w6 w7 w8", max_new_tokens=4))
    session.model = None
    buf = _saved(session)
    session.model = model
    loaded = torch.load(io_of(buf), weights_only=False)
    assert loaded.model is None and loaded.cache._model is None
    loaded.model = model
    want = "".join(session.chat("w9 w10 w11 w12", max_new_tokens=5))
    got = "".join(loaded.chat("w9 w10 w11 w12", max_new_tokens=5))
    assert got == want and torch.equal(loaded.last_logits, session.last_logits) and loaded.cache.model is model


def _yarn_stream(ids, factor):
    """A sink cache (2 + 8) that streamed ids[:20] under yarn x factor, and the logits of ids[20:] continuing it."""
    model = tiny_model("llama").double()
    with longctx.applied(model, "yarn", factor=factor), \
            longctx.applied(model, "streaming", sink_size=2, window_size=8) as patch:
        cache = patch.new_cache()
        decode(model, ids[:, :20], cache)
        return cache, decode(model, ids[:, 20:], copy_of(cache))


def _yarn_continued(cache, ids, factor):
    """The logits of ids[20:] continuing ``cache`` (loaded) on a fresh model with the same yarn and streaming."""
    fresh = tiny_model("llama").double()
    with longctx.applied(fresh, "yarn", factor=factor), \
            longctx.applied(fresh, "streaming", sink_size=2, window_size=8):
        return decode(fresh, ids[:, 20:], cache)


def test_binding_a_saved_sink_cache_checks_the_rope_frequencies():
    # the layout check let a cache made under a RoPE method (yarn) bind to the same model without it (a fresh
    # process that applied only streaming): keys rotated with yarn's frequencies were re-rotated and attended by
    # queries with the plain ones, silently wrong. Another head_dim (same layer layout) only failed deep inside a
    # forward with a shape mismatch. Both are refused by bind; the same RoPE method on a fresh model binds
    ids = ids_for(30)
    cache, want = _yarn_stream(ids, factor=2)
    plain = tiny_model("llama").double()
    with longctx.applied(plain, "streaming", sink_size=2, window_size=8):
        with pytest.raises(ValueError, match="other RoPE frequencies"):
            decode(plain, ids[:, 20:], _reloaded(cache))
    with pytest.raises(ValueError, match="other RoPE frequencies"):
        _reloaded(cache).bind(tiny_model("llama", hidden_size=128).double())
    with pytest.raises(ValueError, match="other RoPE frequencies"):
        _reloaded(cache).bind(tiny_model("llama", rope_theta=500.0).double())
    assert torch.equal(_yarn_continued(_reloaded(cache), ids, factor=2), want)
    half = tiny_model("llama").double()
    with longctx.applied(half, "yarn", factor=2):
        half.half()  # (its frequencies rounded to fp16: still the same RoPE)
        assert _reloaded(cache).bind(half).model is half


def test_binding_a_saved_sink_cache_checks_the_rope_attention_scaling():
    # yarn's attention factor (or mscale) scales cos and sin, so every key the cache holds, and is not in the
    # frequencies: a cache made under yarn bound to the same yarn with another attention_factor (1.0) passed the
    # frequency check, and its held keys kept the old scale while new keys and queries had the new one (silently
    # wrong logits). Refused; the same options bind and continue exactly
    ids = ids_for(40)
    cache, want = _yarn_stream(ids, factor=4)
    other = tiny_model("llama").double()
    with longctx.applied(other, "yarn", factor=4, attention_factor=1.0):
        with pytest.raises(ValueError, match="attention scaling"):
            _reloaded(cache).bind(other)
    assert torch.equal(_yarn_continued(_reloaded(cache), ids, factor=4), want)


def test_binding_a_saved_sink_cache_checks_where_dynamic_rope_changes_its_frequencies():
    # dynamic_ntk (and longrope with two sets of factors) have their plain original_inv_freq, equal to the model
    # without the method, but change them for positions past the trained length (original_max_position_embeddings).
    # A cache made under static RoPE places tokens up to trained length + capacity: bound to the dynamic model, new
    # tokens past 64 got grown frequencies while the keys held and their re-rotations kept the plain ones (silently
    # wrong). Refused; the other way round (a dynamic cache stays below the trained length) binds and is exact
    ids = ids_for(200)
    plain, dynamic = tiny_model("llama").double(), tiny_model("llama").double()
    longctx.apply(dynamic, "dynamic_ntk", factor=2)
    caches = {}
    for name, model in (("plain", plain), ("dynamic", dynamic)):
        with longctx.applied(model, "streaming", sink_size=4, window_size=40) as patch:
            caches[name] = patch.new_cache()
            decode(model, ids[:, :100], caches[name])
            want = decode(model, ids[:, 100:], copy_of(caches[name]))
    assert caches["plain"].max_position == 64 + 44 and caches["dynamic"].max_position == 64
    with pytest.raises(ValueError, match="max_position=108, past 64"):
        torch.load(io_of(_saved(caches["plain"])), weights_only=False).bind(dynamic)
    with longctx.applied(plain, "streaming", sink_size=4, window_size=40):
        got = decode(plain, ids[:, 100:], torch.load(io_of(_saved(caches["dynamic"])), weights_only=False))
    assert torch.equal(got, want)
    # longrope: one set of factors (longctx's static methods on phi3) streams past original_max_position_embeddings
    # (32); the same short factors with other long ones switch there
    one = _longrope_model()
    one.config.rope_parameters.update(long_factor=[1.0] * 6)
    cache = SinkCache(one, 3, 40)
    assert cache.max_position == 64 + 43
    with pytest.raises(ValueError, match="max_position=107, past 32"):
        _reloaded(cache).bind(_longrope_model())


def test_binding_compares_fp32_frequencies_closely():
    # the frequency check took rtol=1e-2 for every dtype (for bf16 / fp16 roundings): fp32 models whose rope_theta
    # differed by 1% bound (for a 7B shape at 8k positions, middle frequencies several radians apart). Now one rounding
    # of the coarser dtype: fp32 against fp32 is close, a bf16 or fp16 copy of the same model still binds
    cache = SinkCache(tiny_model("llama"), 2, 8)
    with pytest.raises(ValueError, match="other RoPE frequencies"):
        _reloaded(cache).bind(tiny_model("llama", rope_theta=10100.0))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        same = tiny_model("llama").to(dtype)
        assert _reloaded(cache).bind(same).model is same
    half = SinkCache(tiny_model("llama").to(torch.bfloat16), 2, 8)  # (its record: bf16)
    fp32 = tiny_model("llama")
    assert torch.load(io_of(_saved(half)), weights_only=False).bind(fp32).model is fp32


def copy_of(cache):
    import copy

    return copy.deepcopy(cache)


def test_a_cache_copied_before_its_model_streams_through_the_copy():
    # copy.deepcopy((cache, model)) copies the cache first, while its model is still the original: the copied cache
    # re-rotated its keys through the original model when used with the copy (silently wrong once the copy changes)
    model = tiny_model("llama").double()
    ids = ids_for(30)
    with longctx.applied(model, "streaming", sink_size=2, window_size=8) as patch:
        cache = patch.new_cache()
        decode(model, ids[:, :14], cache)
        cache_copy, model_copy = copy.deepcopy((cache, model))
        assert cache_copy._model is model  # (the copy of the cache is made first)
        want = decode(model, ids[:, 14:], cache)
        got = decode(model_copy, ids[:, 14:], cache_copy)
        assert cache_copy._model is model_copy and torch.equal(got, want)
        # a cache bound to a model with other RoPE frequencies is refused, not re-rotated with the wrong ones
        again = copy.deepcopy(cache)
        longctx.apply(model_copy, "yarn", factor=2)
        with pytest.raises(ValueError, match="other RoPE frequencies"):
            decode(model_copy, ids[:, 14:16], again)


@pytest.mark.parametrize("argv, match", [
    (["chat"], "longctx chat: the tokenizer of tiny has no chat template"),
    (["generate", "--prompt", "w1", "--chat-template"],
     "longctx generate --chat-template: the tokenizer of tiny has no chat template"),
    (["generate", "--prompt", ""], r"longctx generate: the prompt is empty \(0 tokens\)")])
def test_chat_and_generate_refuse_a_missing_chat_template_and_an_empty_prompt(monkeypatch, argv, match):
    # a tokenizer without a chat template (a base model) failed inside transformers at the first chat turn, and an
    # empty prompt was a reshape RuntimeError in the model's attention
    import io

    import longctx.models
    from longctx.cli import build_parser

    tok = tiny_tokenizer()
    tok.chat_template = None
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (tiny_model("llama"), tok))
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2\n"))
    args = build_parser().parse_args([*argv, "--model", "tiny", "--device", "cpu", "--max-new-tokens", "2"])
    with pytest.raises(SystemExit, match=match):
        args.func(args)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_refuse_top_p_without_sampling(monkeypatch, command):
    # --top-p 0.5 at the default --temperature 0 decoded greedily: silently ignored by chat and generate --decoder
    import longctx.models
    from longctx.cli import build_parser

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    prompt = ["--prompt", "w1"] if command == "generate" else []
    args = build_parser().parse_args([command, *prompt, "--top-p", "0.5"])
    with pytest.raises(SystemExit, match=rf"longctx {command}: --top-p applies to sampling only \(--temperature > 0\)"):
        args.func(args)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_generate_command_stops_at_the_tokenizers_eos_without_decoder(monkeypatch, capsys, ignore_eos):
    # with no eos in generation_config, `longctx generate` took the tokenizer's eos as the stop token (the --decoder
    # path stops there) but model.generate was not given it: it generated past it, and an eos that came last was cut
    # off even under --ignore-eos (3 tokens asked, 2 printed)
    import longctx.chat as chat
    from longctx.cli import build_parser
    from transformers import GenerationConfig

    class Model:
        device = torch.device("cpu")
        generation_config = GenerationConfig(eos_token_id=None)

        def generate(self, ids, eos_token_id=None, min_new_tokens=None, **kwargs):
            out = [5, 6, 7, 6]  # 6 is the tokenizer's eos
            if eos_token_id is not None and not min_new_tokens:
                out = out[:out.index(6) + 1]
            elif min_new_tokens:  # eos suppressed: another token in its place
                out = [8 if t in (eos_token_id or []) else t for t in out]
            return torch.cat([ids, torch.tensor([out[:kwargs["max_new_tokens"]]])], dim=1)

    class Tok:
        eos_token_id, pad_token_id = 6, 0

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            return {"input_ids": torch.tensor([[1, 2, 3]])}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    monkeypatch.setattr(chat, "_load", lambda args: (Model(), Tok()))
    args = build_parser().parse_args(["generate", "--prompt", "x", "--max-new-tokens", "4",
                                      *(["--ignore-eos"] if ignore_eos else [])])
    assert chat.cmd_generate(args) == 0
    assert capsys.readouterr().out.strip() == ("5 8 7 8" if ignore_eos else "5")


def test_generate_command_with_zero_new_tokens(monkeypatch, capsys):
    # check_sampling lets --max-new-tokens 0 through (chat and --decoder generate nothing), but model.generate raised
    # "`max_new_tokens` must be greater than 0" after the model had loaded
    import longctx.chat as chat
    from longctx.cli import build_parser

    monkeypatch.setattr(chat, "_load", lambda args: (tiny_model("llama"), tiny_tokenizer()))
    args = build_parser().parse_args(["generate", "--prompt", "w1 w2", "--max-new-tokens", "0"])
    assert chat.cmd_generate(args) == 0
    out = capsys.readouterr()
    assert out.out == "\n" and "[2 prompt tokens, 0 new in" in out.err


@pytest.mark.parametrize("how", ["model_first", "same_model"])
def test_a_rope_method_applied_to_the_bound_model_is_checked(how):
    # the checks ran only when the cache changed model: copy.deepcopy((model, cache)) (model copied first, the cache
    # bound to the copy) and then yarn on the copy, or yarn applied to the cache's own model mid-stream, streamed on
    # silently with keys rotated under the old frequencies and re-rotated / queried under yarn's
    model = tiny_model("llama").double()
    ids = ids_for(30)
    with longctx.applied(model, "streaming", sink_size=2, window_size=8) as patch:
        cache = patch.new_cache()
        decode(model, ids[:, :14], cache)
        target, held = copy.deepcopy((model, cache)) if how == "model_first" else (model, cache)
        assert held._model is target
        decode(target, ids[:, 14:16], held)  # unchanged: streams on
        with longctx.applied(target, "yarn", factor=2):
            with pytest.raises(ValueError, match="other RoPE frequencies"):
                decode(target, ids[:, 16:18], held)
            with pytest.raises(ValueError, match="other RoPE frequencies"):
                held.bind(target)
        decode(target, ids[:, 16:18], held)  # yarn removed: the frequencies the keys have again


def test_generate_refuses_an_empty_prompt_before_loading(monkeypatch):
    import longctx.models
    from longctx.cli import build_parser

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: pytest.fail("checked before loading"))
    args = build_parser().parse_args(["generate", "--prompt", "", "--device", "cpu"])
    with pytest.raises(SystemExit, match="the prompt is empty"):
        args.func(args)


def test_generate_with_a_chat_template_takes_an_empty_message(monkeypatch, capsys):
    # the empty --prompt refusal before loading also refused --chat-template --prompt "", whose prompt is the template's
    # tokens ("<user> <end> <bot>"), not 0 tokens as the message said; it generated before that refusal was added
    import longctx.models
    from longctx.cli import build_parser

    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (tiny_model("llama"), tiny_tokenizer()))
    args = build_parser().parse_args(["generate", "--prompt", "", "--chat-template", "--model", "tiny", "--device",
                                      "cpu", "--max-new-tokens", "2", "--ignore-eos"])
    assert args.func(args) == 0
    assert "[3 prompt tokens, 2 new" in capsys.readouterr().err


def test_streaming_perplexity_is_exp_of_its_nll_in_float64():
    # ppl was exp(nll) in float32: 7 digits off the nll it sits beside (16.25762176513672 in kjv_sinks.json for
    # 16.2576212...), and inf past nll 88.7 where perplexity() gives a finite number up to nll 700
    import math

    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight *= 300  # a diverged model: mean nll ~124
    for policy in ("recompute", "sinks"):
        res = streaming_perplexity(model, torch.arange(3, 40), 2, 6, policy=policy, progress=False)
        assert 88.8 < res["nll"] < 700
        assert res["ppl"] == math.exp(res["nll"])
    res = streaming_perplexity(tiny_model("llama"), ids_for(30)[0], 2, 6, progress=False)
    assert res["ppl"] == math.exp(res["nll"])


def test_stream_ppl_out_in_a_new_folder(tmp_path, monkeypatch, capsys):
    # `longctx stream-ppl --out new/dir/s.json` failed with FileNotFoundError after the whole run (the results
    # lost); `longctx ppl --out` makes the folder (save_json)
    import longctx.eval.streaming as streaming
    import longctx.models
    from longctx.cli import build_parser

    from conftest import strict_loads
    from test_passkey import TEXT, char_tokenizer

    (tmp_path / "c.txt").write_text(TEXT)
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (None, char_tokenizer()))
    monkeypatch.setattr(streaming, "streaming_perplexity", lambda model, ids, sink, window, policy, chunk_size,
                        curve_every: {"policy": policy, "ppl": 2.0, "tokens": len(ids), "max_cache": 8,
                                      "chunk_size": chunk_size, "tokens_per_s": 1.0, "curve": []})
    out = tmp_path / "new" / "dir" / "s.json"
    args = build_parser().parse_args(["stream-ppl", "--corpus", str(tmp_path / "c.txt"), "--policy", "sinks",
                                      "--window-size", "8", "--out", str(out)])
    assert args.func(args) == 0
    assert strict_loads(out.read_text())["results"][0]["ppl"] == 2.0


def test_streaming_curve_points_only_where_a_multiple_was_passed():
    # "a point at the first chunk end at or past each multiple of curve_every, at most one per chunk": with chunks of
    # 25 and curve_every=10 the ends 25 and 50 pass multiples (10, 20; 30, 40, 50); the last chunk's end, 52, passes
    # none but got a point too (the count of points lagged the count of multiples)
    model = tiny_model("llama")
    ids = ids_for(53)[0]
    for policy in ("dense", "recompute"):
        res = streaming_perplexity(model, ids, 2, 30, policy=policy, chunk_size=25, curve_every=10, progress=False)
        assert [p[0] for p in res["curve"]] == [25, 50]
    res = streaming_perplexity(model, ids, 2, 30, chunk_size=4, curve_every=10, progress=False)
    assert [p[0] for p in res["curve"]] == [12, 20, 32, 40, 52]


def test_streaming_perplexity_checks_curve_every_and_integer_ids():
    # curve_every=0 or -5 gave no curve without a word (the CLI refuses them); float ids were rounded down to token
    # ids and a bool mask scored as tokens 0/1 (perplexity() refuses both)
    import numpy as np

    model = tiny_model("llama")
    ids = ids_for(12)[0]
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="curve_every must be a positive integer"):
            streaming_perplexity(model, ids, 2, 6, curve_every=bad, progress=False)
    for bad in (ids.float() + 0.7, ids > 60):
        with pytest.raises(TypeError, match="integer token ids"):
            streaming_perplexity(model, bad, 2, 6, progress=False)
    assert streaming_perplexity(model, ids.tolist(), 2, 6, curve_every=np.int64(5), progress=False)["curve"]


def test_streaming_curve_every_numpy_small_int_and_empty_id_lists():
    # a numpy int8/int16 curve_every was kept as is: `scored // np.int8(100)` raised OverflowError once scored passed
    # 127 (numpy 2 casts the Python int to int8); an empty list or np.array([]) (float dtypes) got "ids must hold
    # integer token ids, got torch.float32" instead of the "at least 2 tokens" ValueError an empty tensor gets
    import numpy as np

    model = tiny_model("llama")
    ids = ids_for(300)[0]
    res = streaming_perplexity(model, ids, 2, 6, curve_every=np.int8(100), progress=False)
    assert [p[0] for p in res["curve"]] == [100, 200]
    for empty in ([], np.array([])):
        with pytest.raises(ValueError, match="at least 2 tokens"):
            streaming_perplexity(model, empty, 2, 6, progress=False)


def test_streaming_curve_ppl_by_the_final_ppl_rule():
    # the curve's ppl was torch's exp of the float64 mean: finite for a mean nll in [700, 709.8) where the final ppl
    # (and perplexity()) is inf; one rule now, so a point at the stream's end equals the final ppl
    import math

    from longctx.eval.streaming import _curve

    nll = torch.tensor(1410.0, dtype=torch.float64)  # mean 705 over 2 tokens
    assert _curve([], 1, 2, nll, 0, torch.device("cpu"))[0][1] == math.inf
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight *= 300
    res = streaming_perplexity(model, torch.arange(3, 40), 2, 6, curve_every=36, progress=False)
    assert res["curve"][-1][0] == res["tokens"] and res["curve"][-1][1] == res["ppl"] == math.exp(res["nll"])
