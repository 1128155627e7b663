"""Passkey / needle prompts (length, depth), scoring with forced-answer fake models, determinism, CLI."""

import argparse
import json
import random
import re

import pytest
import torch
import torch.nn as nn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import longctx
from longctx.eval import passkey as pk

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. However little known the feelings or views of such a man may be on his first "
        "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
        "that he is considered the rightful property of some one or other of their daughters.\n\n"
        "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is "
        "let at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long "
        "has just been here, and she told me all about it.\" Mr. Bennet made no answer.\n\n")


def char_tokenizer():
    """One token per character (digits included), built in-process."""
    chars = sorted(set(TEXT + pk.PASSKEY_INTRO + pk.PASSKEY_FILLER + pk.PASSKEY_NEEDLE + pk.PASSKEY_QUESTION
                       + pk.NEEDLE_INTRO + pk.NEEDLE_NEEDLE + pk.NEEDLE_QUESTION + "0123456789\n "))
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def bpe_tokenizer():
    """A byte-level BPE trained in-process: words are one or several tokens, merges cross letters."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, pk.PASSKEY_FILLER * 3, pk.PASSKEY_INTRO, pk.PASSKEY_QUESTION], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def ctok():
    return char_tokenizer()


TOKENIZERS = {"char": char_tokenizer, "bpe": bpe_tokenizer}


def max_word_tokens(tok, text):
    return max(len(tok(w, add_special_tokens=False)["input_ids"]) for w in re.findall(r"\S+\s*", text))


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("task", pk.TASKS)
def test_prompt_length_hits_target(kind, task):
    tok = TOKENIZERS[kind]()
    slack = max_word_tokens(tok, TEXT + pk.PASSKEY_FILLER) + 2  # the filler is cut at a word
    for L in (300, 517, 1000, 2048, 4000):
        for depth in (0.0, 0.5, 1.0):
            p = pk.make_prompt(tok, L, depth, 12345, task, haystack=TEXT if task == "needle" else None, start=7)
            n = len(p.input_ids)
            assert L - slack <= n <= L, (kind, task, L, depth, n)
            assert p.input_ids == tok(p.text, add_special_tokens=False)["input_ids"]


def test_prompt_too_short_is_an_error(ctok):
    with pytest.raises(ValueError, match="too short"):
        pk.make_prompt(ctok, 50, 0.5, 12345)


def test_prompt_reaches_the_length_with_multiword_tokens():
    # a token spanning a whole filler sentence (17 words): `length` words were ~half the length, silently
    tok = char_tokenizer()
    tok.add_tokens([pk.PASSKEY_FILLER])
    for L in (600, 1000):
        p = pk.make_prompt(tok, L, 0.5, 12345)
        assert L - len(pk.PASSKEY_FILLER) <= len(p.input_ids) <= L     # was 443 and 493
        assert p.input_ids == tok(p.text, add_special_tokens=False)["input_ids"]

    class Swallows:  # filler words that give no tokens: no number of them reaches the length
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) for c in text if c not in "z "]}

    with pytest.raises(ValueError, match=r"length 400 is out of reach: with 800 filler words the prompt has only "
                                         r"\d+ tokens"):
        pk.make_prompt(Swallows(), 400, 0.5, 12345, "needle", haystack="z " * 10)


def test_haystack_wrap_keeps_a_space_between_the_last_and_first_word():
    hay = pk._Haystack(pk._words("a b.\n\nc d."))  # documents joined as load_corpus gives them (stripped)
    assert "".join(hay.units(2, 4)) == "c d.\n\na b.\n\n"    # was "c d.a b.\n\n"
    assert hay.ends == [2, 4]


@pytest.mark.parametrize("task", pk.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_key_is_at_the_requested_depth(ctok, task, depth):
    p = pk.make_prompt(ctok, 3000, depth, 54321, task, haystack=TEXT if task == "needle" else None)
    needle = (pk.PASSKEY_NEEDLE if task == "passkey" else pk.NEEDLE_NEEDLE).format(key="54321")
    assert p.text.count("54321") == (2 if task == "passkey" else 1)
    assert ctok.decode(p.input_ids[p.needle_start:p.needle_end]) == needle
    # the filler around the needle: depth fraction of its tokens before it (one sentence of slack)
    assert abs(p.actual_depth - depth) < 0.04, p.actual_depth
    before = p.text[:p.text.index(needle)].rstrip()
    if depth < 1:  # at a sentence boundary (at depth 1: where the filler was cut, at a word)
        assert before.endswith((".", "?", "!", '"')), before[-30:]
    intro = pk.PASSKEY_INTRO if task == "passkey" else pk.NEEDLE_INTRO
    question = pk.PASSKEY_QUESTION if task == "passkey" else pk.NEEDLE_QUESTION
    assert p.text.startswith(intro) and p.text.endswith(question)
    if depth == 0:
        assert p.text.startswith(intro + "\n" + needle)
    if depth == 1:
        assert p.text.endswith(needle + "\n" + question)


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_token_positions_are_the_first_token_of_each_piece(kind, depth):
    tok = TOKENIZERS[kind]()
    p = pk.make_prompt(tok, 600, depth, 12345)
    needle = pk.PASSKEY_NEEDLE.format(key="12345")
    ids, dec = p.input_ids, tok.decode
    assert dec(ids[:p.filler_start]) == pk.PASSKEY_INTRO + "\n"    # the "\n" after a piece is not the next one's
    assert dec(ids[p.needle_start:p.needle_end]) == needle
    assert dec(ids[p.question_start:]) == pk.PASSKEY_QUESTION
    filler = dec(ids[p.filler_start:p.needle_start])             # the filler before the needle, and its "\n"
    assert (filler == "") if depth == 0 else (filler.startswith("The grass") and filler.endswith("\n")
                                               and not filler.endswith("\n\n"))
    assert p.needle_start == len(tok(p.text[:p.text.index(needle)], add_special_tokens=False)["input_ids"])


def test_passkey_text_is_the_landmark_prompt(ctok):
    p = pk.make_prompt(ctok, 600, 0.5, 11111)
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in p.text
    assert "The pass key is 11111. Remember it. 11111 is the pass key." in p.text
    assert p.text.endswith("What is the pass key? The pass key is")


def test_extract_key():
    assert pk.extract_key(" 53721.\nThe pass key") == "53721"
    assert pk.extract_key("is 1, then 12345 and 67890") == "12345"
    assert pk.extract_key("123456") is None          # 6 digits is not a 5-digit answer
    assert pk.extract_key("no digits") is None


class Forced(nn.Module):
    """Answers by reading the key out of the prompt: right, or off by one (wrong)."""

    def __init__(self, tokenizer, right=True):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok, self.right, self.calls = tokenizer, right, 0

    def generate(self, input_ids, generation_config, **kwargs):
        self.calls += 1
        max_new_tokens = generation_config.max_new_tokens
        text = self.tok.decode(input_ids[0])
        key = re.search(r"(?:pass key is|magic number is) (\d{5})", text).group(1)
        if not self.right:
            key = str(10000 + (int(key) - 10000 + 1) % 90000)
        new = self.tok(" " + key + ". Remember", add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


@pytest.mark.parametrize("task", pk.TASKS)
def test_forced_right_scores_one_wrong_scores_zero(ctok, task):
    depths = (0, 0.5, 1)
    right = pk.passkey_accuracy(Forced(ctok), ctok, [400, 800], depths=depths, trials=3, task=task,
                                corpus=[TEXT] if task == "needle" else None, progress=False)
    wrong = pk.passkey_accuracy(Forced(ctok, right=False), ctok, [400, 800], depths=depths, trials=3,
                                task=task, corpus=[TEXT] if task == "needle" else None, progress=False)
    for L in (400, 800):
        assert right[L]["accuracy"] == 1.0 and right[L]["correct"] == right[L]["total"] == 9
        assert wrong[L]["accuracy"] == 0.0 and wrong[L]["correct"] == 0 and wrong[L]["total"] == 9
        assert set(right[L]["by_depth"]) == {0.0, 0.5, 1.0}
        assert all(v == {"accuracy": 1.0, "correct": 3, "total": 3} for v in right[L]["by_depth"].values())
        assert all(s["prompt_tokens"] <= L for s in right[L]["samples"])
        assert all(len(s["key"]) == 5 and s["answer"] == s["key"] for s in right[L]["samples"])
    json.dumps(right)  # serializable


def test_deterministic_given_seed(ctok):
    def keys(seed, task="passkey"):
        res = pk.passkey_accuracy(Forced(ctok), ctok, [400], depths=(0.25, 0.75), trials=4, seed=seed,
                                  task=task, corpus=[TEXT] if task == "needle" else None, progress=False)
        return [(s["key"], s["prompt_tokens"], s["needle_start"]) for s in res[400]["samples"]]

    assert keys(0) == keys(0)
    assert keys(0, "needle") == keys(0, "needle")
    assert keys(0) != keys(1)
    assert len({k for k, _, _ in keys(0)}) > 1  # a different key per trial


def tiny_llama(vocab, max_position=512):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position,
                      pad_token_id=1, eos_token_id=2, bos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_greedy_decode_matches_argmax_loop(ctok):
    model = tiny_llama(len(ctok))
    ids = pk.make_prompt(ctok, 300, 0.5, 12345).input_ids
    new = pk.greedy_decode(model, ids, 6, ctok)
    x = torch.tensor([ids])
    ref = []
    with torch.no_grad():
        for _ in range(6):  # no cache, full recompute
            t = model(x).logits[0, -1].argmax()
            ref.append(int(t))
            x = torch.cat([x, t.view(1, 1)], dim=1)
    assert new == ref


def test_greedy_decode_ignores_the_checkpoints_generation_options(ctok):
    model = tiny_llama(len(ctok))
    ids = pk.make_prompt(ctok, 300, 0.5, 12345).input_ids
    x, ref = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(12):
            t = model(x).logits[0, -1].argmax()
            ref.append(int(t))
            x = torch.cat([x, t.view(1, 1)], dim=1)
    assert len(set(ref)) < len(ref) and model.config.eos_token_id not in ref  # repeats: penalties would bite
    gc = model.generation_config  # as a checkpoint's generation_config.json may set them
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 1.3, 3, 12
    gc.suppress_tokens = [ref[0]]
    assert pk.greedy_decode(model, ids, 12, ctok) == ref
    assert model.generation_config is gc and gc.repetition_penalty == 1.3  # the checkpoint's config is back


def test_depths_are_checked_before_decoding(ctok):
    model = Forced(ctok)
    for depths, match in [([], "non-empty"), ([0.5, 0.5], "distinct"), ([0, 0.0], "distinct"),
                          ([0.5, 1.5], r"in \[0, 1\]"), ([0.5, True], r"in \[0, 1\]"), (0.5, "list")]:
        with pytest.raises(ValueError, match=match):
            pk.passkey_accuracy(model, ctok, [300], depths=depths, trials=2, progress=False)
    for trials, new in [(0, 12), (2.5, 12), (1, 0)]:
        with pytest.raises(ValueError, match="trials" if new else "max_new_tokens"):
            pk.passkey_accuracy(model, ctok, [300], depths=[0.5], trials=trials, max_new_tokens=new, progress=False)
    for lengths, match in [([300.9], "lengths must be a non-empty list of integers >= 1"), (["400"], "lengths must"),
                           ([300, 0], "lengths must"), ([], "lengths must"), (300, "lengths must"),
                           ([300, True], "lengths must"), ([300, 300], "lengths must be distinct")]:
        with pytest.raises(ValueError, match=match):
            pk.passkey_accuracy(model, ctok, lengths, depths=[0.5], trials=1, progress=False)
    with pytest.raises(ValueError, match="seed must be an integer, got 'x'"):
        pk.passkey_accuracy(model, ctok, [300], depths=[0.5], trials=1, seed="x", progress=False)
    with pytest.raises(ValueError, match="corpus applies to task='needle' only"):
        pk.passkey_accuracy(model, ctok, [300], depths=[0.5], trials=1, corpus=[TEXT], progress=False)
    assert model.calls == 0
    assert pk.passkey_accuracy(model, ctok, (300,), depths=[0.5], trials=1, progress=False)[300]["total"] == 1


def test_dynamic_rope_state_is_reset_before_each_prompt(ctok, monkeypatch):
    # a length evaluated after a longer one, and within a length each trial after the first (its prompt of exactly
    # L tokens after one that grew the cache to L + the generated tokens), saw frequencies grown earlier
    model = tiny_llama(len(ctok), max_position=256)
    seen, decode = [], pk.greedy_decode

    def recording(m, ids, *args):
        seen.append(model.model.rotary_emb.inv_freq.clone())
        return decode(m, ids, *args)

    monkeypatch.setattr(pk, "greedy_decode", recording)
    with longctx.applied(model, "dynamic_ntk", factor=2):
        pk.passkey_accuracy(model, ctok, [400, 300], depths=[0.0, 1.0], trials=2, max_new_tokens=4, progress=False)
        original = model.model.rotary_emb.original_inv_freq
    assert len(seen) == 8 and all(torch.equal(s, original) for s in seen)


def test_streaming_decode_equals_dense_when_the_window_holds_everything(ctok):
    if "streaming" not in longctx.methods():
        pytest.skip("no streaming method registered")
    model = tiny_llama(len(ctok))
    ids = pk.make_prompt(ctok, 300, 0.5, 12345).input_ids
    dense = pk.greedy_decode(model, ids, 5, ctok)
    with longctx.applied(model, "streaming", sink_size=4, window_size=400):
        assert pk.greedy_decode(model, ids, 5, ctok) == dense


def eos_then_key_model(ctok, eos_in_generation_config=True):
    """A tiny llama scripted to answer <eos> and then the key of prompt (300, depth 0.5, trial 0)."""
    model = tiny_llama(len(ctok))
    if not eos_in_generation_config:
        model.generation_config.eos_token_id = None
    key = str(random.Random("longctx-passkey:0:300:0.5:0").randint(10000, 99999))
    script = [ctok.eos_token_id] + ctok.convert_tokens_to_ids(list(key + "."))  # <eos>, then the key
    forward, step = model.forward, {"i": 0}

    def scripted(*args, **kwargs):
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        step["i"] = 0 if ids.shape[1] > 1 else step["i"] + 1
        out.logits[:, -1] = -1e4
        out.logits[:, -1, script[min(step["i"], len(script) - 1)]] = 1e4
        return out

    model.forward = scripted
    return model, key


@pytest.mark.parametrize("eos_in_generation_config", [True, False])
def test_dense_and_streaming_decode_stop_at_eos(ctok, eos_in_generation_config):
    # an answer after eos scored as correct under streaming (it decoded on past eos); and the dense path
    # (model.generate) stopped only at the generation config's eos, not the tokenizer's
    model, key = eos_then_key_model(ctok, eos_in_generation_config)
    dense = pk.passkey_accuracy(model, ctok, [300], depths=[0.5], trials=1, progress=False)[300]
    with longctx.applied(model, "streaming", sink_size=4, window_size=400):
        res = pk.passkey_accuracy(model, ctok, [300], depths=[0.5], trials=1, progress=False)[300]
        ids = pk.make_prompt(ctok, 300, 0.5, key).input_ids
        assert pk.greedy_decode(model, ids, 12, ctok) == [ctok.eos_token_id]     # eos kept, as generate keeps it
    assert res["samples"][0]["output"] == dense["samples"][0]["output"] == "" and res["correct"] == dense["correct"] == 0


def test_real_tiny_model_end_to_end(ctok):
    res = pk.passkey_accuracy(tiny_llama(len(ctok)), ctok, [300], depths=(0.5,), trials=2, progress=False)
    assert res[300]["total"] == 2 and 0 <= res[300]["accuracy"] <= 1


def test_cli(ctok, tmp_path, monkeypatch, capsys):
    import longctx.models

    model = tiny_llama(len(ctok))
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (model, ctok))
    parser = argparse.ArgumentParser()
    pk.add_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "pk.json"
    args = parser.parse_args(["passkey", "--model", "tiny", "--lengths", "300,400", "--depths", "0,1",
                              "--trials", "1", "--method", "none", "--method", "yarn:factor=2",
                              "--out", str(out)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| method | 300 | 400 |" in table and "| yarn x2 |" in table and "| none |" in table
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"none", "yarn x2"}
    assert saved["settings"]["depths"] == [0.0, 1.0] and saved["results"]["none"]["300"]["total"] == 2
    assert not longctx.active_patches(model)  # removed again


def _stubbed_passkey_cli(monkeypatch, tok, argv):
    """``longctx passkey`` on a tiny llama with ``tok`` and a one-document corpus, methods none and yarn x2, its
    evaluation recorded instead of run: (the evaluation calls, the parsed args)."""
    import longctx.data
    import longctx.models

    calls = []
    monkeypatch.setattr(longctx.models, "load_model", lambda *a, **k: (tiny_llama(len(tok)), tok))
    monkeypatch.setattr(pk, "passkey_accuracy", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(longctx.data, "load_corpus", lambda name, **k: [longctx.data.Document("Emma", TEXT)])
    parser = argparse.ArgumentParser()
    pk.add_commands(parser.add_subparsers(dest="command"))
    return calls, parser.parse_args(["passkey", "--model", "tiny", *argv, "--method", "none", "--method",
                                     "yarn:factor=2"])


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_cli_refuses_a_length_too_short_for_the_prompt_before_any_method_runs(ctok, monkeypatch, task):
    # a traceback (make_prompt's ValueError) once the earlier methods, or the longer lengths, had been evaluated
    calls, args = _stubbed_passkey_cli(monkeypatch, ctok, ["--lengths", "300,20", "--task", task])
    with pytest.raises(SystemExit, match="^--lengths: length 20 is too short: the prompt without filler has"):
        args.func(args)
    assert calls == []


@pytest.mark.parametrize("task, short, longer", [("passkey", 243, 244), ("needle", 233, 234)])
def test_cli_refuses_a_length_above_the_shortest_too_short_for_its_keys(monkeypatch, task, short, longer):
    # keys are drawn per length and may tokenize to more tokens (here a doubled digit is one token): only the shortest
    # length's samples were checked, so `longer` raised after the methods before had run; and the check built whole
    # prompts (about a second each at 32k tokens) where the prompt without filler decides
    tok = char_tokenizer()
    tok.add_tokens([d * 2 for d in "0123456789"])
    for L in (short, longer):  # (seed 0, depth 0.5, trial 0): what this test stands on
        key = random.Random(f"longctx-{task}:0:{L}:0.5:0").randint(10000, 99999)
        if L == short:
            pk.make_prompt(tok, L, 0.5, key, task, haystack=TEXT if task == "needle" else None)
        else:
            with pytest.raises(ValueError, match=f"length {L} is too short"):
                pk.make_prompt(tok, L, 0.5, key, task, haystack=TEXT if task == "needle" else None)
    calls, args = _stubbed_passkey_cli(monkeypatch, tok, ["--lengths", f"{short},{longer}", "--task", task,
                                                          "--depths", "0.5", "--trials", "1"])
    with pytest.raises(SystemExit, match=f"^--lengths: length {longer} is too short: the prompt without filler has"):
        args.func(args)
    assert calls == []
    monkeypatch.setattr(pk, "make_prompt", _boom)  # no prompt built: the prompt without filler is counted
    pk.check_prompts(tok, [short, 4000], [0.5], 1, 0, task)


def _boom(*a, **k):
    raise AssertionError("not expected to be called")


def test_cli_refuses_duplicate_methods_and_bad_depths(ctok, monkeypatch):
    import longctx.models

    def boom(*a, **k):
        raise AssertionError("checked before loading")

    monkeypatch.setattr(longctx.models, "load_model", boom)
    parser = argparse.ArgumentParser()
    pk.add_commands(parser.add_subparsers(dest="command"))
    for extra, match in [(["--method", "yarn:factor=2", "--method", "yarn", "--factor", "2"], "'yarn x2' given more"),
                         (["--method", "none", "--method", "none"], "'none' given more"),
                         (["--depths", "0.5,0.5"], "distinct"), (["--depths", "0,2"], r"\[0, 1\]"),
                         (["--method", "s2attn"], "--method s2attn: s2attn is active only in training"),
                         (["--task", "passkey", "--corpus", "austen"], "--corpus applies to --task needle only"),
                         (["--corpus", "austen"], "--corpus applies to --task needle only"),
                         (["--factor", "4"], "no --method here uses it"),
                         (["--method", "yarn:factor=2", "--factor", "4"], "no --method here uses it")]:
        args = parser.parse_args(["passkey", "--model", "tiny", "--lengths", "300", *extra])
        with pytest.raises((SystemExit, ValueError), match=match):
            args.func(args)


def test_haystack_is_refused_for_the_passkey_task(ctok):
    # the passkey filler is fixed text: a haystack given with task="passkey" was silently not used
    with pytest.raises(ValueError, match="haystack applies to task='needle' only"):
        pk.make_prompt(ctok, 600, 0.5, 12345, "passkey", haystack=TEXT)
    assert "The grass is green." in pk.make_prompt(ctok, 600, 0.5, 12345, "passkey").text


def test_needle_filler_that_spells_a_special_token_stays_text():
    # encode_documents (perplexity, training) tokenizes text spelling a special token as text; the passkey/needle
    # prompt tokenized the corpus filler with the default, so "[EOS]" in a corpus became an EOS inside the prompt
    tok = char_tokenizer()
    hay = "the cat [EOS] sat on the mat. " * 40
    p = pk.make_prompt(tok, 600, 0.5, 12345, "needle", haystack=hay)
    assert "[EOS]" in p.text and tok.eos_token_id not in p.input_ids
