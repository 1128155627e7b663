import json
import os
import re
import subprocess
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

import longctx.data as data
from longctx.data import (Document, clean_austen, clean_bible, encode_documents, load_corpus, select_documents,
                          unwrap)


# ------------------------------------------------------------------------------------ local files
def test_txt(tmp_path):
    (tmp_path / "story.txt").write_text("Once upon a time.\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "story.txt")) == [Document("story", "Once upon a time.\n")]


def test_jsonl_names_and_text_field(tmp_path):
    rows = [{"title": "A", "body": "alpha"}, {"body": "beta"}, {"name": "C", "body": "gamma"}]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join([json.dumps(rows[0]), json.dumps(rows[1]), "", json.dumps(rows[2])]) + "\n")
    docs = load_corpus(str(f), text_field="body")
    assert docs == [Document("A", "alpha"), Document("rows:2", "beta"), Document("C", "gamma")]
    with pytest.raises(KeyError, match="text_field"):
        load_corpus(str(f))


def test_bad_jsonl_lines_name_the_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n\n\n{oops\n")
    with pytest.raises(ValueError, match=re.escape(f"{f}:4: not a JSON line")):
        load_corpus(str(tmp_path))                                 # also inside a folder
    for row, match in [("just a string", "expected an object with a 'text' field, got str"),
                       ([1, 2], "expected an object with a 'text' field, got list"),
                       ({"text": None}, "field 'text' must be a string, got None"),
                       ({"text": 5}, "field 'text' must be a string, got 5")]:
        f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{f}:2: {match}")):
            load_corpus(str(f))


def test_parquet_missing_text_is_an_error(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"title": ["A", "B"], "text": ["alpha", None]})   # None reads back as NaN/None
    monkeypatch.setattr(pd, "read_parquet", lambda path: frame)           # no pyarrow needed
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 't.parquet'} row 1: field 'text' must be a string")):
        load_corpus(str(tmp_path / "t.parquet"))


def test_utf8_bom_is_dropped(tmp_path):
    (tmp_path / "b.txt").write_bytes("\ufeffHello\n".encode())
    (tmp_path / "c.jsonl").write_bytes(("\ufeff" + json.dumps({"text": "x"}) + "\n").encode())
    assert load_corpus(str(tmp_path)) == [Document("b", "Hello\n"), Document("c:1", "x")]


def test_folder_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "sea"}) + "\n")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "notes.md").write_text("ignored")
    docs = load_corpus(str(tmp_path))
    assert [(d.name, d.text) for d in docs] == [("a", "ay"), ("b", "bee"), ("sub/c:1", "sea")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        load_corpus(str(tmp_path / "empty"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_corpus(str(tmp_path / "nope.txt"))


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"title": ["X", None], "text": ["ex", "why"]}).to_parquet(tmp_path / "t.parquet")
    assert load_corpus(str(tmp_path / "t.parquet")) == [Document("X", "ex"), Document("t:1", "why")]


def test_parquet_without_engine(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install pandas pyarrow"):
        load_corpus(str(tmp_path / "t.parquet"))


def test_unknown_name_lists_builtins():
    assert set(data.builtin_corpora()) == {"austen", "austen-lines", "kjv"}
    with pytest.raises(ValueError) as err:
        load_corpus("surely-not-a-corpus-name-xyz")
    assert "austen" in str(err.value) and "kjv" in str(err.value)


def test_empty_name_is_refused_and_a_path_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.txt").write_text("stray")            # "" must not read the current folder
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="load_corpus: name_or_path is empty.*austen"):
            load_corpus(empty)
    assert load_corpus(tmp_path / "stray.txt") == load_corpus(Path("stray.txt")) == [Document("stray", "stray")]


def test_undecodable_file_is_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes("ok\ncaf\xe9!".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    for f, line, byte in [("bad.txt", 2, 6), ("bad.jsonl", 3, 29)]:
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / f}:{line}: not UTF-8 text (invalid continuation "
                                                       f"byte at byte {byte} of the file); re-save it as UTF-8")):
            load_corpus(tmp_path / f)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.jsonl'}:3")):
        load_corpus(tmp_path)                                   # also inside a folder


def test_names_in_subfolders_are_relative_paths_and_distinct(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "ch1.txt").write_text(sub)
        (tmp_path / sub / "rows.jsonl").write_text(json.dumps({"text": sub}) + "\n")
    (tmp_path / "ch1.txt").write_text("top")
    assert [(d.name, d.text) for d in load_corpus(tmp_path)] == [
        ("a/ch1", "a"), ("a/rows:1", "a"), ("b/ch1", "b"), ("b/rows:1", "b"), ("ch1", "top")]
    assert [d.name for d in load_corpus(tmp_path / "a" / "ch1.txt")] == ["ch1"]   # a file alone: its stem
    # names that still collide (rows sharing a title: chapters of one book) load, but cannot select
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"title": t, "text": t + str(i)}) + "\n"
                                              for i, t in enumerate("ABA")))
    docs = load_corpus(tmp_path / "t.jsonl")
    assert [(d.name, d.text) for d in docs] == [("A", "A0"), ("B", "B1"), ("A", "A2")]
    chosen, rest = select_documents(docs, ["B"], "--docs")
    assert [d.text for d in chosen] == ["B1"] and [d.text for d in rest] == ["A0", "A2"]
    with pytest.raises(ValueError, match=re.escape("--docs: ['A'] name more than one document ('A' x2)")):
        select_documents(docs, ["A", "B"], "--docs")
    with pytest.raises(ValueError, match=re.escape("data.holdout: ['C'] not in the corpus; it has: ['A', 'B']")):
        select_documents(docs, ["C"], "data.holdout")


def test_jsonl_streams_and_names_the_line_of_bad_bytes(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": "a"\n')  # the row's end: the column, not 1
    with pytest.raises(ValueError, match=re.escape("c.jsonl:2: not a JSON line (Expecting ',' delimiter at column 13)")):
        load_corpus(tmp_path / "c.jsonl")
    (tmp_path / "cr.jsonl").write_bytes(b'{"text": "a"}\r{"text": "b"}\r{"text": "caf\xe9"}\r')
    with pytest.raises(ValueError, match=re.escape("cr.jsonl:3: not UTF-8")):
        load_corpus(tmp_path / "cr.jsonl")
    (tmp_path / "big.jsonl").write_text((json.dumps({"text": "word " * 2000}) + "\n") * 500)
    size = (tmp_path / "big.jsonl").stat().st_size
    tracemalloc.start()
    try:
        assert len(load_corpus(tmp_path / "big.jsonl")) == 500
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * size  # not the whole file as bytes, then as text, then as lines


def test_options_that_do_not_apply_are_refused(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "s.txt").write_text("hello")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "b"}) + "\n")
    for source, kwargs, match in [
            (tmp_path / "txt" / "s.txt", {"text_field": "body"}, "text_field='body' (--text-field) applies only to "
                                                                  ".jsonl/.parquet files and HuggingFace datasets"),
            (tmp_path / "txt", {"text_field": "text"}, "txt (a local folder of .txt files only)"),
            ("austen", {"text_field": "text"}, "not to 'austen' (a built-in corpus)"),
            (tmp_path / "txt" / "s.txt", {"split": "validation"}, "split='validation' (--split) applies only to "
                                                                   "HuggingFace datasets"),
            (tmp_path / "rows.jsonl", {"split": "train"}, "(a local .jsonl file)"),
            (tmp_path, {"split": "train"}, "(a local folder)"),
            ("kjv", {"split": "train"}, "(a built-in corpus)"),
            (tmp_path / "rows.jsonl", {"text_field": ""}, "text_field must be a non-empty string or None")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            load_corpus(source, **kwargs)
    assert load_corpus(tmp_path, text_field="body") == [Document("rows:1", "b"), Document("txt/s", "hello")]


def test_symlinked_subfolders_are_followed_once(tmp_path):
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "e.txt").write_text("ext")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("a")
    (tmp_path / "c" / "link").symlink_to(tmp_path / "ext")
    (tmp_path / "c" / "loop").symlink_to(tmp_path / "c")    # a link to the folder itself: read once, no loop
    assert [d.name for d in load_corpus(tmp_path / "c")] == ["a", "link/e"]


def test_no_documents_is_an_error(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="blank.jsonl: contains no documents"):
        load_corpus(tmp_path / "blank.jsonl")
    with pytest.raises(ValueError, match="contains no documents"):
        load_corpus(tmp_path)
    monkeypatch.setattr(pd, "read_parquet", lambda path: pd.DataFrame({"body": []}))   # no rows, no text column
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(KeyError, match=re.escape("t.parquet: no column 'text' (columns: ['body']); set the field "
                                                 "with text_field=... (--text-field on the command line)")):
        load_corpus(tmp_path / "t.parquet")


# --------------------------------------------------------------------------------------- cleaning
def test_unwrap():
    text = "  First line\nof a   paragraph.\n\n\n\tSecond\n  paragraph. \n \n"
    assert unwrap(text) == "First line of a paragraph.\n\nSecond paragraph."
    assert unwrap("") == ""


def test_clean_austen():
    lines = ["EMMA", "", "CHAPTER I", "", "", "Emma Woodhouse, handsome,", "clever, and rich.", "",
             "Chapter 2", "She was", "the youngest."]
    assert clean_austen(lines) == (
        "EMMA\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich.\n\nChapter 2\n\nShe was the youngest."
    )


BIBLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep. And the Spirit of God moved upon the face of the waters.

Genesis 2

  1 Thus the heavens and the earth were finished,
and all the host of them.

1 Kings 1

  1 Now king David was old and stricken in years; and they covered him with
  12 clothes.
"""


def test_clean_bible():
    assert clean_bible(BIBLE) == (
        "Genesis\n\n"
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters."
        "\n\nThus the heavens and the earth were finished, and all the host of them."
        "\n\n1 Kings\n\nNow king David was old and stricken in years; and they covered him with clothes."
    )


# ------------------------------------------------------------------------------------- encoding
def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_encode_documents():
    tok = _char_tokenizer()
    assert tok("ab")["input_ids"] == [1, 3, 4, 2]  # the tokenizer does add BOS/EOS by default
    out = encode_documents(tok, [Document("x", "abc"), "ba"])
    assert all(t.dtype == torch.long and t.dim() == 1 for t in out)
    assert [t.tolist() for t in out] == [[3, 4, 5], [4, 3]]
    assert [t.tolist() for t in encode_documents(tok, ["abcd", "a"], max_tokens=2)] == [[3, 4], [3]]
    for bad in (0, -5, 2.5, True, "3"):
        with pytest.raises(ValueError, match="max_tokens must be an integer >= 1 or None"):
            encode_documents(tok, ["abcd"], max_tokens=bad)
    for bad, match in [("abc", "got a single str"), (Document("x", "abc"), "got a single Document"),
                       ([Document("x", None)], "document 'x' must be"), (["ab", 5], r"docs\[1\] must be")]:
        with pytest.raises(TypeError, match=f"encode_documents: .*{match}"):
            encode_documents(tok, bad)


# -------------------------------------------------------------------------------------- built-ins
def test_apt_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"apt-get.*(\n|.)*local file or folder"):
        load_corpus("austen")


def test_apt_failure_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/" + name)

    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(100, cmd, stderr="E: Unable to locate package bible-kjv")

    monkeypatch.setattr(data.subprocess, "run", fail)
    with pytest.raises(RuntimeError, match="Unable to locate package.*apt-get update.*load_corpus"):
        load_corpus("kjv")


def _fake_build(monkeypatch, tmp_path, build):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_fetch_debs", lambda name, pkgs, dest: dest)
    monkeypatch.setitem(data._BUILD, "austen", (build, []))
    return tmp_path / "corpus"


def test_builtin_cache_write_is_safe_across_threads(tmp_path, monkeypatch):
    built = [Document("Emma", "x" * 2_000_000)]
    barrier = threading.Barrier(4)

    def build(root):
        barrier.wait(5)                                        # the four threads write the cache at once
        return built

    cache = _fake_build(monkeypatch, tmp_path, build)
    errors = []

    def worker():
        try:
            assert load_corpus("austen") == built
        except Exception as e:
            errors.append(repr(e)[:200])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and os.listdir(cache) == [f"austen-{data.CACHE_VERSION}.jsonl"]


def test_builtin_cache_write_cleans_up_when_interrupted(tmp_path, monkeypatch):
    cache = _fake_build(monkeypatch, tmp_path, lambda root: [Document("Emma", "x")])

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_corpus("austen")
    assert os.listdir(cache) == []                             # no .part file left behind


def test_builtin_missing_data_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_fetch_debs", lambda name, pkgs, dest: (dest / "root").mkdir() or dest / "root")
    for name, match in [("austen", "the Debian package r-cran-janeaustenr has no janeaustenr/data/Rdata.rdx"),
                        ("austen-lines", "r-cran-janeaustenr has no janeaustenr/data/Rdata.rdx"),
                        ("kjv", "the Debian package bible-kjv-text has no bible.data")]:
        with pytest.raises(RuntimeError, match=re.escape(match) + ".*local file or folder"):
            load_corpus(name)


def _no_subprocess(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached corpus should not call apt or dpkg")

    monkeypatch.setattr(data.subprocess, "run", fail)


def _assert_running_text(text):
    assert text == text.strip() and "\n\n\n" not in text
    assert all("\n" not in p and "  " not in p and p for p in text.split("\n\n"))


@pytest.mark.slow
def test_austen_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    docs = load_corpus("austen")
    assert [d.name for d in docs] == [
        "Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"]
    assert "It is a truth universally acknowledged, that a single man" in docs[1].text
    assert "\n\nChapter 1\n\n" in docs[1].text and "\n\nCHAPTER I\n\n" in docs[3].text
    for d in docs:
        _assert_running_text(d.text)
        assert 75_000 <= len(d.text.split()) <= 170_000, d.name
    _no_subprocess(monkeypatch)
    assert load_corpus("austen") == docs
    monkeypatch.undo()
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    lines = load_corpus("austen-lines")  # same words, printed line structure kept
    assert [d.name for d in lines] == [d.name for d in docs]
    assert lines[1].text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\nIt is a truth")
    assert "in possession\nof a good fortune" in lines[1].text
    for clean, raw in zip(docs, lines):
        assert raw.text.split() == clean.text.split()


@pytest.mark.slow
def test_kjv_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    docs = load_corpus("kjv")
    assert [d.name for d in docs] == ["King James Bible"]
    text = docs[0].text
    _assert_running_text(text)
    assert 700_000 <= len(text.split()) <= 900_000
    assert text.startswith("Genesis\n\nIn the beginning God created the heaven and the earth. And the earth")
    assert "In the beginning God created the heaven and the earth." in text
    assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not re.search(r"\d+:\d+", text)  # no "Ge1:1" nor "1:1"
    numbered = [p for p in text.split("\n\n") if p[0].isdigit()]  # only book titles such as "1 Kings"
    assert len(numbered) == 17 and all(re.fullmatch(r"\d [A-Z][a-z]+", p) for p in numbered)
    assert "\n\nRevelation\n\n" in text and "\n\nSong of Solomon\n\n" in text
    _no_subprocess(monkeypatch)
    assert load_corpus("kjv") == docs


def test_text_that_spells_a_special_token_is_text_and_packing_keeps_every_token_in_order():
    # a document containing the literal text "</s>" (or SmolLM2's "<|endoftext|>", "<|im_end|>") was tokenized
    # as the EOS token itself: a document separator inside a packed training sequence, and an EOS in perplexity
    from longctx.train import pack_documents

    tok = _char_tokenizer()
    assert tok("a</s>b", add_special_tokens=False)["input_ids"] == [3, 2, 4]  # what the tokenizer does by default
    assert [t.tolist() for t in encode_documents(tok, ["a</s>b", "<s>"])] == [[3, 0, 0, 21, 0, 4], [0, 21, 0]]
    docs = [Document("x", "ab</s>c"), Document("empty", ""), Document("y", "zz <s> y"), Document("z", "q" * 11)]
    stream = []
    for d in docs:  # the reference: each document's own characters, then EOS
        stream += [tok.get_vocab().get(c, 0) for c in d.text] + [tok.eos_token_id]
    packed = pack_documents(tok, docs, 5)
    assert packed.shape == (len(stream) // 5, 5)
    assert packed.flatten().tolist() == stream[: packed.numel()]
    assert [i for i, t in enumerate(stream) if t == tok.eos_token_id] == [7, 8, 17, 29]  # separators only


def test_encode_documents_with_a_mistral_common_tokenizer():
    # transformers' MistralCommonBackend (the tokenizer of Mistral models when mistral-common is installed) refuses
    # split_special_tokens=True with a ValueError: encode_documents (perplexity, training, sweep) failed outright.
    # It never reads control tokens from text, so it needs no such option. A stand-in with its behaviour:
    class MistralCommonBackend:
        def __call__(self, text, add_special_tokens=True, split_special_tokens=False, **kwargs):
            if split_special_tokens:
                raise ValueError("`MistralCommonBackend` does not support `return_offsets_mapping` and "
                                 "`split_special_tokens`.")
            return {"input_ids": [ord(c) for c in text]}

    assert [t.tolist() for t in encode_documents(MistralCommonBackend(), ["a</s>"])] == [[97, 60, 47, 115, 62]]


def test_encode_documents_keeps_the_added_words_of_a_python_tokenizer():
    # a Python ("slow") tokenizer's split_special_tokens=True splits *every* added token, not only special ones:
    # a word added to its vocabulary (add_tokens) came out as pieces, i.e. ordinary text tokenized otherwise than
    # the model saw it (fast tokenizers split only the special ones)
    from transformers import PythonBackend

    class Chars(PythonBackend):
        def __init__(self, **kwargs):
            self.vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz <>/")}}
            super().__init__(unk_token="<unk>", eos_token="</s>", **kwargs)

        def get_vocab(self):
            return dict(self.vocab, **self.added_tokens_encoder)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text, **kwargs):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return {i: t for t, i in self.vocab.items()}.get(index, "<unk>")

    tok = Chars()
    tok.add_tokens(["cat"])
    cat = tok.convert_tokens_to_ids("cat")
    assert tok("a cat", add_special_tokens=False)["input_ids"] == [2, 28, cat]
    assert encode_documents(tok, ["a cat"])[0].tolist() == [2, 28, cat]
