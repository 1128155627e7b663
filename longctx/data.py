"""Text corpora for long-context evaluation and fine-tuning.

``load_corpus`` returns a list of :class:`Document` from

* a local ``.txt`` file (one document), ``.jsonl`` / ``.parquet`` file (one document per row), or a
  folder of such files (searched recursively, following symlinked subfolders, in sorted order);
* a built-in corpus, built offline from Debian packages (fetched with ``apt-get download`` and unpacked
  with ``dpkg -x`` into a temporary folder; nothing is installed) and cached as jsonl under
  ``cache_dir("corpus")``:

  - ``austen``: Jane Austen's six novels from ``r-cran-janeaustenr``. The novels are R character
    vectors (one entry per printed line, ``""`` between paragraphs) in the package's lazy-load
    database ``usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` (index ``Rdata.rdx``), read with
    the ``rdata`` package;
  - ``austen-lines``: the same six novels as printed (the R line vectors joined with ``"\\n"``: hard
    line wraps kept, none of the cleaning below);
  - ``kjv``: the King James Bible, the compressed text of ``bible-kjv-text`` printed by the ``bible``
    program of ``bible-kjv`` (``bible -p <dir of bible.data> gen1:1-rev22:21``);
* otherwise a HuggingFace ``datasets`` name (needs ``pip install datasets`` and a network).

Document names: a ``.txt`` file's stem (``story.txt`` -> ``story``); a row's ``name`` or ``title``
field, else ``<stem>:<line>`` for jsonl and ``<stem>:<row>`` (from 0) for parquet. Inside a folder, a
file in a subfolder is named by its path relative to the folder, without the suffix (``a/ch1``,
``a/rows:3``); files at the top keep their stem. Documents may share a name (rows with one title);
selecting by a name (``select_documents``: ``--docs``, ``data.holdout``) that several share is an error.

Cleaning of the built-ins: hard line wraps are removed (the lines of a paragraph are joined with single
spaces, paragraphs are joined with ``"\\n\\n"``), runs of whitespace collapse to one space, and the
Bible loses its verse numbers and chapter references (see :func:`clean_bible`). Title lines and
chapter headings such as "CHAPTER 1" stay as paragraphs of their own.
"""

from __future__ import annotations

import codecs
import collections
import json
import numbers
import os
import re
import shutil
import subprocess
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.utils import cache_dir

CACHE_VERSION = "v1"  # bump when cleaning changes: it is part of the cached file names
SUFFIXES = (".txt", ".jsonl", ".parquet")
_BUILTINS = {
    "austen": "Jane Austen's six novels, ~100k-200k words each (Debian package r-cran-janeaustenr)",
    "austen-lines": "the same six novels as printed: hard line wraps kept (lines joined with newlines)",
    "kjv": "the King James Bible as one ~790k-word document (Debian packages bible-kjv, bible-kjv-text)",
}
_AUSTEN = {  # R object name -> title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


@dataclass
class Document:
    name: str  # e.g. "Pride and Prejudice", "King James Bible", a file stem, "rows:3" (see the module doc)
    text: str


def builtin_corpora() -> dict[str, str]:
    """Built-in corpus names with a one-line description each."""
    return dict(_BUILTINS)


def load_corpus(name_or_path: str | os.PathLike, *, split: str | None = None,
                text_field: str | None = None) -> list[Document]:
    """Load a local file or folder, a built-in corpus (``austen``, ``austen-lines``, ``kjv``) or a
    HuggingFace dataset.

    ``text_field``: the field (column) holding the text, for .jsonl/.parquet files (default ``"text"``)
    and datasets; ``split``: the split of a HuggingFace dataset (default ``"train"``). Each is refused
    where it does not apply (a .txt file, a built-in, ``split`` for any local file). A source that
    yields no documents is an error."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(f"load_corpus: name_or_path must be a str or path, got {type(name_or_path).__name__}")
    if not name_or_path.strip():
        raise ValueError(f"load_corpus: name_or_path is empty; give a file, a folder, a built-in corpus "
                         f"({', '.join(_BUILTINS)}) or a HuggingFace dataset name")
    for option, value in (("split", split), ("text_field", text_field)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"load_corpus: {option} must be a non-empty string or None, got {value!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise ValueError(f"no {'/'.join(SUFFIXES)} files under {path}")
        only_txt = all(f.suffix.lower() == ".txt" for f in files)
        _refuse(split=split, text_field=text_field if only_txt else None,
                what=f"{path} (a local folder{' of .txt files only' if only_txt else ''})")
        docs = [doc for f in files for doc in _load_file(f, text_field or "text", _doc_stem(f, path))]
    elif path.is_file() or path.suffix.lower() in SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        _refuse(split=split, text_field=text_field if path.suffix.lower() == ".txt" else None,
                what=f"{path} (a local {path.suffix.lower()} file)")
        docs = _load_file(path, text_field or "text", path.stem)
    elif name_or_path.lower() in _BUILTINS:
        _refuse(split=split, text_field=text_field, what=f"{name_or_path!r} (a built-in corpus)")
        docs = _load_builtin(name_or_path.lower())
    else:
        docs = _load_hf(name_or_path, split or "train", text_field or "text")
    if not docs:
        raise ValueError(f"{name_or_path}: contains no documents")
    return docs


def select_documents(docs, names, what: str = "documents") -> tuple[list, list]:
    """(the documents named in ``names``, the others). Every name must match exactly one document: a name
    that is missing, or that two documents share (rows with the same title, or the same file name in two
    corpora), is a ValueError; ``what`` names the setting in the message."""
    counts = collections.Counter(d.name for d in docs)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"{what}: {missing} not in the corpus; it has: {list(counts)}")
    shared = [n for n in names if counts[n] > 1]
    if shared:
        raise ValueError(f"{what}: {shared} name more than one document ({', '.join(f'{n!r} x{counts[n]}' for n in shared)}); "
                         f"give the documents distinct names ('name'/'title' fields, file names) to select them")
    wanted = set(names)
    return [d for d in docs if d.name in wanted], [d for d in docs if d.name not in wanted]


def _refuse(*, split, text_field, what: str) -> None:
    """Refuse ``split`` / ``text_field`` given for a source that has no use for them."""
    if split is not None:
        raise ValueError(f"split={split!r} (--split) applies only to HuggingFace datasets, not to {what}")
    if text_field is not None:
        raise ValueError(f"text_field={text_field!r} (--text-field) applies only to .jsonl/.parquet files and "
                         f"HuggingFace datasets, not to {what}")


def _folder_files(root: Path) -> list[Path]:
    """The .txt/.jsonl/.parquet files under ``root``, recursively, following symlinked subfolders
    (each real folder once, so a link to a parent does not loop), sorted by their relative path."""
    seen, files = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        files += [Path(folder, n) for n in names if Path(n).suffix.lower() in SUFFIXES and Path(folder, n).is_file()]
    return sorted(files, key=lambda f: f.relative_to(root).parts)


def _doc_stem(file: Path, root: Path) -> str:
    """Name stem of a file inside a folder: its stem at the top, else its relative path without suffix."""
    rel = file.relative_to(root)
    return rel.with_suffix("").as_posix() if len(rel.parts) > 1 else file.stem


def plain_text_kwargs(tokenizer) -> dict:
    """Keyword arguments for ``tokenizer(text, ...)`` that tokenize text spelling a special token as that text:
    ``split_special_tokens=True``; none for mistral-common's ``MistralCommonBackend`` (the tokenizer of Mistral
    models when mistral-common is installed), which never reads control tokens from text and refuses that
    argument (a ValueError); none for a Python tokenizer with added tokens that are not special (its option would
    split those words too, changing ordinary text)."""
    from transformers import PythonBackend

    if any(c.__name__ == "MistralCommonBackend" for c in type(tokenizer).__mro__):
        return {}
    if isinstance(tokenizer, PythonBackend) and any(not t.special for t in tokenizer.added_tokens_decoder.values()):
        return {}  # a Python ("slow") tokenizer's split_special_tokens splits *every* added token: added words too
    return {"split_special_tokens": True}


def encode_documents(tokenizer, docs, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Tokenize each document (or string) of the list ``docs`` as running text, without BOS/EOS, into
    a 1-D LongTensor truncated to ``max_tokens``. Text that spells a special token (``<|endoftext|>``,
    ``</s>``, ...) is tokenized as the text it is, not as that token (``split_special_tokens``), where the tokenizer
    allows that without changing ordinary text (``plain_text_kwargs``: not mistral-common's tokenizer, nor a Python
    tokenizer with added words, which keep reading such text as the token)."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    if isinstance(docs, (str, bytes, Document)):
        raise TypeError(f"encode_documents: docs must be a list of Document or str, got a single "
                        f"{type(docs).__name__}; wrap it in a list")
    out = []
    for i, doc in enumerate(docs):
        text = doc.text if isinstance(doc, Document) else doc
        if not isinstance(text, str):
            what = f"document {doc.name!r}" if isinstance(doc, Document) else f"docs[{i}]"
            raise TypeError(f"encode_documents: {what} must be a Document or str with str text, "
                            f"got {type(text).__name__}")
        ids = tokenizer(text, add_special_tokens=False, verbose=False, **plain_text_kwargs(tokenizer))["input_ids"]
        out.append(torch.tensor(ids[:max_tokens], dtype=torch.long))
    return out


# ----------------------------------------------------------------------------------- local files
_TEXT_FIELD_HINT = "set the field with text_field=... (--text-field on the command line)"


def _row_doc(row: dict, text_field: str, default_name: str, where: str) -> Document:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with a {text_field!r} field, got {type(row).__name__} "
                         f"{str(row)[:40]!r}")
    if text_field not in row:
        raise KeyError(f"{where}: no field {text_field!r} (fields: {sorted(row)}); {_TEXT_FIELD_HINT}")
    text = row[text_field]
    if not isinstance(text, str):  # null, NaN (a missing parquet value), a number, ...
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {text!r}")
    name = next((v for v in (row.get("name"), row.get("title")) if isinstance(v, str) and v), default_name)
    return Document(name, text)


def _read_utf8(path: Path) -> str:
    """The file's text; a byte order mark (as Windows editors write) is dropped, not read as U+FEFF.
    Bytes that are not UTF-8 are a ValueError naming the file and line."""
    raw = path.read_bytes()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = raw[:at].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1  # universal newlines
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {at} of the file); "
                         f"re-save it as UTF-8") from None


def _load_file(path: Path, text_field: str, stem: str) -> list[Document]:
    """The documents of one file; ``stem`` starts the names of its documents (see the module doc)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Document(stem, _read_utf8(path))]
    if suffix == ".jsonl":
        docs = []
        try:  # streamed, universal newlines (a raw CR cannot occur inside a JSON string); utf-8-sig drops a BOM
            with open(path, encoding="utf-8-sig") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line.rstrip("\n"))  # the column of an error at the row's end
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg} at column {e.colno})") from None
                        docs.append(_row_doc(row, text_field, f"{stem}:{i}", f"{path}:{i}"))
        except UnicodeDecodeError:
            _read_utf8(path)  # raises the message naming the line
            raise
        return docs
    if suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(path)
        except ImportError as e:
            raise ImportError(f"reading {path.name} needs pandas and pyarrow: pip install pandas pyarrow") from e
        if text_field not in frame.columns:  # checked here too: a table with no rows has no row to check
            raise KeyError(f"{path}: no column {text_field!r} (columns: {sorted(map(str, frame.columns))}); "
                           f"{_TEXT_FIELD_HINT}")
        rows = frame.to_dict("records")
        return [_row_doc(r, text_field, f"{stem}:{i}", f"{path} row {i}") for i, r in enumerate(rows)]
    raise ValueError(f"unsupported file type {path.name!r}: use one of {', '.join(SUFFIXES)}")


def _load_hf(name: str, split: str, text_field: str) -> list[Document]:
    builtins = ", ".join(_BUILTINS)
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is not a file or folder nor a built-in corpus ({builtins}); loading it as a HuggingFace "
            f"dataset needs `pip install datasets` and a network. Local .txt/.jsonl/.parquet files and "
            f"folders and the built-ins {builtins} work offline."
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise ValueError(f"{name!r} is not a file or folder, a built-in corpus ({builtins}), "
                         f"or a loadable HuggingFace dataset: {e}") from e
    return [_row_doc(row, text_field, f"{name}:{i}", f"{name}[{i}]") for i, row in enumerate(ds)]


# --------------------------------------------------------------------------------------- cleaning
def unwrap(text: str) -> str:
    """Join the lines of each blank-line separated paragraph with single spaces (collapsing all
    whitespace runs); join the paragraphs with a blank line."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


_HEADING = re.compile(r"(?:CHAPTER|Chapter|VOLUME|Volume) [0-9IVXLC]+\.?")


def clean_austen(lines) -> str:
    """An R vector of printed lines ("" between paragraphs) -> running text; headings such as
    "CHAPTER 1" are kept as paragraphs of their own. The source's ``_..._`` italics markers (as in
    ``he _may_ fall``) are kept as they are in janeaustenr."""
    out = []
    for line in lines:
        line = "" if line is None else str(line)
        out.extend(["", line, ""] if _HEADING.fullmatch(line.strip()) else [line])
    return unwrap("\n".join(out))


_CHAPTER_LINE = re.compile(r"(\S.*?) (\d+)")  # "Genesis 1", "Song of Solomon 3", "1 Kings 22"
_VERSE_NUMBER = re.compile(r"^\s+\d+\s+", re.M)  # verse starts are indented: "  12 And ..."


def clean_bible(raw: str) -> str:
    """Output of ``bible`` (pretty-printed: a "Book N" line, then the chapter's verses, each starting
    with an indented verse number and wrapped at ~80 columns) -> running text. Kept: the book name as
    its own paragraph where a book starts ("Genesis"). Dropped: chapter numbers, verse numbers. Each
    chapter becomes one paragraph."""
    paras, book = [], None
    for block in re.split(r"\n\s*\n", raw):
        block = block.strip("\n")
        if not block.strip():
            continue
        heading = _CHAPTER_LINE.fullmatch(block)
        if heading:  # unindented, unlike verse starts
            if heading.group(1) != book:
                book = heading.group(1)
                paras.append(book)
            continue
        paras.append(_VERSE_NUMBER.sub("", block))
    return unwrap("\n\n".join(paras))


# -------------------------------------------------------------------------------------- built-ins
_NO_APT = (
    "Building the built-in corpus {name!r} needs Debian's apt-get and dpkg (to fetch {pkgs}), and {why}. "
    "Alternatively download the texts yourself (e.g. from Project Gutenberg) and pass a local file or "
    "folder, e.g. load_corpus('~/texts/austen/') with one .txt per novel, or a .jsonl of "
    '{{"name": ..., "text": ...}} lines.'
)


def _fetch_debs(name: str, pkgs: list[str], dest: Path) -> Path:
    """``apt-get download`` the packages into ``dest`` and ``dpkg -x`` them into ``dest/root``."""
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(_NO_APT.format(name=name, pkgs=" ".join(pkgs), why=f"{' and '.join(missing)} is missing"))
    try:
        subprocess.run(["apt-get", "download", *pkgs], cwd=dest, check=True, capture_output=True, text=True)
        for deb in sorted(dest.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(dest / "root")], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        detail = [line for line in lines if line.startswith("E:")] or lines[-1:]
        why = f"that failed ({'; '.join(detail)}; maybe run `apt-get update` first)"
        raise RuntimeError(_NO_APT.format(name=name, pkgs=" ".join(pkgs), why=why)) from e
    return dest / "root"


def _read_rdb(rdx: Path) -> dict[str, list[str]]:
    """Read all objects of an R lazy-load database (``X.rdx`` index + ``X.rdb`` blobs)."""
    import rdata

    with warnings.catch_warnings():  # rdata warns that the files have no RDS/RDA header
        warnings.simplefilter("ignore")
        index = rdata.read_rds(rdx)
        blobs = rdx.with_suffix(".rdb").read_bytes()
        out = {}
        for key, (offset, length) in index["variables"].items():
            # each blob: 4-byte big-endian uncompressed length, then zlib data (R's compress=TRUE)
            raw = zlib.decompress(blobs[offset + 4 : offset + length])
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            out[str(key)] = ["" if x is None else str(x) for x in lines]
    return out


def _find(root: Path, pattern: str, pkgs: str, name: str) -> Path:
    """The first file under the unpacked packages matching ``pattern``, else a RuntimeError."""
    found = next(iter(sorted(root.rglob(pattern))), None)
    if found is None:
        raise RuntimeError(f"building the built-in corpus {name!r}: the Debian package {pkgs} has no {pattern} "
                           f"(has its layout changed?). Pass a local file or folder to load_corpus instead, "
                           f"e.g. one .txt per document.")
    return found


def _build_austen(root: Path) -> list[Document]:
    rdx = _find(root, "janeaustenr/data/Rdata.rdx", "r-cran-janeaustenr", "austen")
    novels = _read_rdb(rdx)
    return [Document(title, clean_austen(novels[key])) for key, title in _AUSTEN.items()]


def _build_austen_lines(root: Path) -> list[Document]:
    # The R vectors as they are, joined with "\n": the form the foundation issue's reference
    # perplexities were measured on (reproduced to 0.05%; see experiments/austen_rope/README.md).
    novels = _read_rdb(_find(root, "janeaustenr/data/Rdata.rdx", "r-cran-janeaustenr", "austen-lines"))
    return [Document(title, "\n".join(novels[key])) for key, title in _AUSTEN.items()]


def _build_kjv(root: Path) -> list[Document]:
    data = _find(root, "bible.data", "bible-kjv-text", "kjv")
    _find(root, "usr/bin/bible", "bible-kjv", "kjv")
    cmd = [str(root / "usr/bin/bible"), "-p", ".", "gen1:1-rev22:21"]  # -p .: cwd, so paths may hold spaces
    def run(env=None):  # stdin closed and stdout a pipe: no interactive prompt, no paging
        return subprocess.run(cmd, cwd=data.parent, stdin=subprocess.DEVNULL, capture_output=True, env=env)

    out = run()
    if out.returncode != 0 and b"shared librar" in out.stderr:  # e.g. no libreadline.so.8 here
        out = run(dict(os.environ, LD_LIBRARY_PATH=_fetch_readline(root.parent)))
    if out.returncode != 0 or not out.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode(errors='replace').strip()}")
    return [Document("King James Bible", clean_bible(out.stdout.decode("latin-1")))]


def _fetch_readline(tmp: Path) -> str:
    """``bible`` links libreadline, which slim Debian images lack: unpack it beside the program and
    return an LD_LIBRARY_PATH for it (the package is called libreadline8t64 from Debian 13 on)."""
    for pkg in ("libreadline8t64", "libreadline8"):
        try:
            lib = _fetch_debs("kjv", [pkg], Path(tempfile.mkdtemp(prefix=pkg, dir=tmp)))
        except RuntimeError:
            continue
        return os.pathsep.join(sorted({str(p.parent) for p in lib.rglob("*.so*")}))
    raise RuntimeError("the `bible` program needs libreadline: apt-get install libreadline8 (or libreadline8t64)")


_BUILD = {"austen": (_build_austen, ["r-cran-janeaustenr"]),
          "austen-lines": (_build_austen_lines, ["r-cran-janeaustenr"]), "kjv": (_build_kjv, ["bible-kjv", "bible-kjv-text"])}


def _load_builtin(name: str) -> list[Document]:
    cached = cache_dir("corpus") / f"{name}-{CACHE_VERSION}.jsonl"
    if not cached.exists():
        build, pkgs = _BUILD[name]
        with tempfile.TemporaryDirectory(prefix=f"longctx-{name}-") as tmp:
            docs = build(_fetch_debs(name, pkgs, Path(tmp)))
        # A temporary file of its own (unique across threads, processes and containers sharing the
        # cache), then an atomic rename: a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cached.parent, prefix=cached.name + ".",
                                         suffix=".part", delete=False) as part:
            try:
                part.writelines(json.dumps({"name": d.name, "text": d.text}) + "\n" for d in docs)
                part.close()
                os.chmod(part.name, 0o644)  # NamedTemporaryFile creates it 0600; the cache may be shared
                os.replace(part.name, cached)
            finally:
                if os.path.exists(part.name):  # the rename did not happen: an error or an interrupt
                    os.unlink(part.name)
    return _load_file(cached, "text", cached.stem)
