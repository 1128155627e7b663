import json
import re
import subprocess

import pytest
import torch

import longctx.data as data
from longctx.data import Document, clean_austen, clean_bible, encode_documents, load_corpus, unwrap


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
    assert [(d.name, d.text) for d in docs] == [("a", "ay"), ("b", "bee"), ("c:1", "sea")]
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
