"""Grid sweeps from a YAML file: models x methods x metrics x lengths, resumable, with tables and plots.

    longctx sweep experiments/rope_sweep.yaml            # run (or resume) the grid
    longctx sweep experiments/rope_sweep.yaml --dry-run  # print the grid and which cells are done

The YAML::

    models: [smollm2-135m]                 # aliases, local model folders, .gguf files or hub ids
    methods: [none, "yarn:factor=4", {name: dynamic_ntk, factor: 4}]   # the `longctx ppl` spec syntax
    lengths: [2048, 8192, 16384, 32768]
    metrics:                               # a list of names, or names -> settings
      ppl: {corpus: austen-lines, docs: [Pride and Prejudice, Emma], max_tokens: 65536, score: tail}
      passkey: {depths: [0, 0.5, 1], trials: 5}
      needle: {corpus: austen, trials: 5}
    dtype: bf16                            # optional: bf16, fp16 or fp32; default: the checkpoint's
    device: null                           # optional; default cuda when available
    wandb: {project: longctx, mode: offline}   # optional: a mapping (false/null: none); if wandb imports

A metric's settings may instead be a top-level block named after it (``metrics: [passkey]`` and
``passkey: {trials: 2}``); settings in both places, or for a metric not run, are an error. Settings
are a mapping; null means none (the defaults), any other value (``[]``, ``false``) is an error. A single
value stands for a one-item list (``lengths: 2048``); a model or length listed twice is an error, and
so are two methods that are the same method (``pi:factor=2`` and ``linear:factor=2.0``).

Metric settings (defaults in ``METRICS``): ppl -> corpus, docs, max_tokens, mode, stride, score,
tail_fraction (see ``longctx.eval.perplexity``; stride only with mode: sliding, tail_fraction only with
score: tail, else an error); passkey/needle -> depths, trials, seed, max_new_tokens, and corpus for
needle (see ``longctx.eval.passkey``). Corpora (and ppl docs) are loaded, and so checked, before the
first model.

Each model is loaded once; for each method the patch is applied, every metric is evaluated at every
length, and the patch is removed. Before each cell, rotary state that dynamic RoPE grew in an earlier
cell is reset (``reset_rotary_state``): a cell's value does not depend on the cells run before it.
Every cell (model, method, metric, length) is appended to
``results.jsonl`` in the output folder (default: next to the YAML, ``experiments/<name>/``) as one
JSON line with its full settings, the git commit, library versions and the hardware, as soon as it
is computed. The lines are strict JSON: a non-finite value or result (a perplexity that overflowed to
inf, NaN from a diverged model) is written as the string "Infinity", "-Infinity" or "NaN"
(``longctx.utils.strict_dumps``), and turned back into the float when the file is read. A rerun skips
the cells already there, so an interrupted sweep resumes where it stopped.
The key of a cell: model, method spec, metric, length, metric settings and dtype, in a canonical form
(``cell_key``): a method alias as its name (pi -> linear), options as the method validates them with
2 and 2.0 alike and defaults left out, the dtype's short name (FP32 -> fp32), ppl docs sorted and only
the settings the metric uses (tail_fraction with score: tail, stride with mode: sliding). The keys of
rows already in results.jsonl are recomputed in that form when it is read, so files written before
a change of the form still resume. At the end ``table.md``
(per metric and model: rows methods, columns lengths) and PNG plots (perplexity vs length on a log
axis, retrieval accuracy vs length) are written from the cells of the grid.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from .eval.passkey import DEPTHS, check_settings, passkey_accuracy
from .eval.perplexity import MODES, SCORES, _fmt, inactive_in_eval, perplexity
from .methods.rope import reset_rotary_state
from .utils import decode_nonfinite, strict_dumps

METRICS: dict[str, dict] = {
    "ppl": {"corpus": "austen", "docs": None, "max_tokens": None, "mode": "chunks", "stride": None,
            "score": "all", "tail_fraction": 0.25},
    "passkey": {"depths": list(DEPTHS), "trials": 5, "seed": 0, "max_new_tokens": 12},
    "needle": {"corpus": "austen", "depths": list(DEPTHS), "trials": 5, "seed": 0, "max_new_tokens": 12},
}
RESULTS = "results.jsonl"


# ------------------------------------------------------------------------------------------ grid
def _canonical(value):
    """JSON with sorted keys: the form a setting takes in a cell key."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def method_spec(entry) -> tuple[str, str, dict]:
    """A YAML methods entry ("none", "yarn:factor=4" or {name: yarn, factor: 4}) -> (label, name,
    options), validated against the registry."""
    from . import registry
    from .cli import method_label, parse_method

    try:
        if isinstance(entry, dict):  # the YAML values as they are (bools, null, lists: no round trip via text)
            options = dict(entry)
            name = options.pop("name", None) or options.pop("method", None)
            if not name:
                raise ValueError(f"method entry {entry} needs a name")
            label, name, options = method_label(str(name), options, None, f"method entry {entry}",
                                                factor_hint="{name: NAME, factor: F}")
        else:
            label, name, options = parse_method(str(entry), None, f"method entry {str(entry)!r}", "NAME:factor=F")
    except SystemExit as err:  # the ppl CLI's parser exits; here it is a config error
        raise ValueError(str(err)) from None
    if name != "none":
        registry.make_options(registry.get_method(name), **options)
    return label, name, options


def _plain(value):
    """A value as a cell key holds it: integral floats as ints (factor 2 and 2.0 are one setting), tuples
    as lists."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def canonical_method(name: str, options: dict) -> dict:
    """``{"method": name, **options}`` in the form a cell key holds: the registry's name for an alias
    (pi -> linear), every option as the method's options class validates it, integral floats as ints,
    options equal to their default left out. Two specs of the same method give the same dict."""
    if name == "none":
        return {"method": "none"}
    from . import registry

    method = registry.get_method(name)
    opts = registry.make_options(method, **options)
    out = {"method": method.name}
    for f in dataclasses.fields(opts):
        value = _plain(getattr(opts, f.name))
        if f.default is not dataclasses.MISSING and value == _plain(f.default):
            continue
        out[f.name] = value
    return out


def dtype_name(dtype) -> str | None:
    """None (the checkpoint's dtype) or a dtype name ``load_model`` takes, any case -> None or its short
    name (bf16, fp16, fp32)."""
    if dtype is None:
        return None
    import torch

    from .models import DTYPES

    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
        raise ValueError(f"'dtype' must be null (the checkpoint's) or one of {', '.join(DTYPES)}, got {dtype!r}")
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return short.get(DTYPES[dtype.lower()], dtype.lower())


def key_settings(metric: str, settings: dict) -> dict:
    """A metric's settings as a cell key holds them: only those the metric uses (ppl: tail_fraction only
    with score: tail, as a float; stride only with mode: sliding), ppl docs sorted (they are read in
    corpus order)."""
    s = dict(settings)
    if metric == "ppl":
        if s.get("score") != "tail":
            s.pop("tail_fraction", None)
        elif isinstance(s.get("tail_fraction"), int):
            s["tail_fraction"] = float(s["tail_fraction"])  # 1 and 1.0 alike
        if s.get("mode") != "sliding":
            s.pop("stride", None)
        if "docs" in s:
            s["docs"] = sorted(s["docs"]) if s["docs"] else None
    return s


def _metric_settings(metrics, config, lengths) -> dict[str, dict]:
    """``metrics``: a name, a list of names, or names -> settings. A metric's settings may instead be a
    top-level block named after it (``passkey: {trials: 2}``); in both places, or for a metric the
    sweep does not run, they are an error."""
    if metrics is None:
        metrics = {}
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, list):
        if not all(isinstance(m, str) for m in metrics):
            raise ValueError(f"'metrics' as a list names metrics ({', '.join(METRICS)}), got {metrics}")
        metrics = {m: None for m in metrics}
    if not isinstance(metrics, dict):
        raise ValueError(f"'metrics' must be a metric name, a list of them or names -> settings, got {metrics!r}")
    out = {}
    for name, given in metrics.items():
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        top = config.get(name)
        if given not in (None, {}) and top is not None:
            raise ValueError(f"{name} settings are given twice, under 'metrics' and as a top-level {name!r} "
                             f"block: keep one")
        if given in (None, {}) and top is not None:
            given = top
        if given is None:  # only null means "no settings": [], false or 0 are mistakes, not the defaults
            given = {}
        if not isinstance(given, dict):
            raise ValueError(f"{name} settings must be a mapping of {', '.join(METRICS[name])}, got {given!r}")
        unknown = sorted(set(given) - set(METRICS[name]))
        if unknown:
            raise ValueError(f"unknown {name} setting(s) {unknown}; allowed: {', '.join(METRICS[name])}")
        s = {**METRICS[name], **given}
        if "docs" in s and isinstance(s["docs"], str):
            s["docs"] = [d.strip() for d in s["docs"].split(",") if d.strip()]
        out[name] = _check_settings(name, s, lengths)
        if name == "ppl" and "tail_fraction" in given and s["score"] != "tail":  # (as stride without mode: sliding;
            # its default is in every ppl cell's settings, and left out of the key)
            raise ValueError(f"ppl setting 'tail_fraction' only applies to score: tail (score: {s['score']} scores "
                             f"every token of a window)")
    unused = [m for m in METRICS if m in config and m not in out]
    if unused:
        raise ValueError(f"top-level settings {unused} are for metric(s) the sweep does not run: add them to "
                         f"'metrics' or remove the block(s)")
    if not out:
        raise ValueError("the sweep has no metrics (metrics: [ppl, passkey, needle])")
    return out


def _check_settings(name: str, s: dict, lengths: list[int]) -> dict:
    """The checks a metric makes when its cell runs (maybe hours into the sweep), made when the config
    loads, so that --dry-run reports them. Returns the settings normalized (depths as floats)."""
    def bad(key, allowed):
        return ValueError(f"{name} setting {key!r} must be {allowed}, got {s[key]!r}")

    def integer(key, least=None, none_ok=False):
        v = s[key]
        if v is None and none_ok:
            return
        if isinstance(v, bool) or not isinstance(v, int) or (least is not None and v < least):
            allowed = "an integer" + (f" >= {least}" if least is not None else "")
            raise bad(key, allowed + (" or null" if none_ok else ""))

    if "corpus" in s and (not isinstance(s["corpus"], str) or not s["corpus"]):
        raise bad("corpus", "a corpus name or path")
    if name != "ppl":
        integer("seed")
        depths = [s["depths"]] if isinstance(s["depths"], (int, float)) else s["depths"]
        try:
            return {**s, "depths": check_settings(depths, s["trials"], s["max_new_tokens"])}
        except ValueError as e:
            raise ValueError(f"{name} setting {e}") from None
    if s["mode"] not in MODES:
        raise bad("mode", " or ".join(MODES))
    if s["score"] not in SCORES:
        raise bad("score", " or ".join(SCORES))
    integer("max_tokens", 1, none_ok=True)
    integer("stride", 1, none_ok=True)
    if s["mode"] == "chunks" and s["stride"] is not None:
        raise ValueError("ppl setting 'stride' only applies to mode: sliding (chunks never overlap)")
    if s["mode"] == "sliding" and s["score"] == "tail":
        raise ValueError("ppl setting score: tail is only defined for mode: chunks (sliding windows score "
                         "their last `stride` tokens)")
    tail = s["tail_fraction"]
    if isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0 < tail <= 1:
        raise bad("tail_fraction", "a number in (0, 1]")
    if s["docs"] is not None and (not isinstance(s["docs"], list) or not all(isinstance(d, str) for d in s["docs"])):
        raise bad("docs", "a list of document names or null")
    for L in lengths:
        if L < 2:
            raise ValueError(f"ppl needs lengths >= 2 (one token of context, one to predict), got {L}")
        if s["stride"] is not None and s["stride"] > L:
            raise bad("stride", f"at most every length (here {L})")
        if s["score"] == "tail" and int(L * tail) < 1:
            raise bad("tail_fraction", f"large enough to score a token of every length (here {L})")
    return s


def load_config(path) -> dict:
    """Read and check a sweep YAML; returns the normalized grid."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"name", "models", "methods", "lengths", "metrics", "dtype", "device", "wandb",
                                 *METRICS})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")

    def as_list(key):  # a single value is a one-item list
        value = raw.get(key)
        return value if isinstance(value, list) else [] if value is None else [value]

    def once(key, items):  # a repeat would run the same cells again and fill the table twice
        twice = sorted({str(x) for x in items if items.count(x) > 1})
        if twice:
            raise ValueError(f"{path}: {key} {', '.join(twice)} listed more than once ({key}: {items}); "
                             f"every entry must be distinct")

    models = [str(m) for m in as_list("models")]
    if not models:
        raise ValueError(f"{path}: 'models' must list at least one model")
    once("models", models)
    methods = as_list("methods") or ["none"]
    lengths = as_list("lengths")
    if not lengths:
        raise ValueError(f"{path}: 'lengths' must list at least one length")
    if any(isinstance(L, bool) or not isinstance(L, int) or L < 1 for L in lengths):
        raise ValueError(f"{path}: 'lengths' must be integers >= 1 (tokens), got {lengths}")
    once("lengths", lengths)
    specs = [method_spec(m) for m in methods]
    labels = [s[0] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: duplicate methods {labels}")
    canonical = [_canonical(canonical_method(name, options)) for _, name, options in specs]
    for i, spec in enumerate(canonical):  # pi:factor=2 and linear:factor=2.0: the same cells twice
        if canonical.index(spec) != i:
            raise ValueError(f"{path}: methods {labels[canonical.index(spec)]!r} and {labels[i]!r} are the same "
                             f"method ({spec}); keep one")
    try:
        dtype = dtype_name(raw.get("dtype"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if raw.get("device") is not None and (not isinstance(raw["device"], str) or not raw["device"].strip()):
        raise ValueError(f"{path}: 'device' must be null (cuda when available) or a device name such as cuda, cuda:1 "
                         f"or cpu, got {raw['device']!r}")
    wandb = raw.get("wandb")
    if not (wandb is None or wandb is False or (isinstance(wandb, dict) and all(isinstance(k, str) for k in wandb))):
        raise ValueError(f"{path}: 'wandb' must be a mapping of wandb.init settings (e.g. {{project: longctx, "
                         f"mode: offline}}), false or null, got {wandb!r}")
    try:
        metrics = _metric_settings(raw.get("metrics"), raw, lengths)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for metric in metrics:  # ppl without a cache; passkey generates with one
        for label, name, options in specs:
            reason = inactive_in_eval(name, options, with_cache=metric != "ppl")
            if reason:
                raise ValueError(f"{path}: method {label!r} with metric {metric!r}: {reason}")
    return {"name": raw.get("name") or path.stem, "models": models, "methods": specs,
            "lengths": lengths, "metrics": metrics,
            "dtype": dtype, "device": raw.get("device"), "wandb": wandb}


def cell_key(model: str, name: str, options: dict, metric: str, length: int, settings: dict, dtype) -> str:
    """The key of a cell: equal for equivalent specs (``canonical_method``, ``key_settings``, ``dtype_name``)."""
    return _canonical({"model": model, "method": canonical_method(name, options), "metric": metric,
                       "length": int(length), "settings": key_settings(metric, settings), "dtype": dtype_name(dtype)})


def row_key(row: dict):
    """A results.jsonl row's key, recomputed from its recorded cell as ``cell_key`` computes it now (so rows
    written before a change of the canonical form still match their cells); its stored key if that fails."""
    try:
        spec = dict(row["method_spec"])
        name = spec.pop("method")
        return cell_key(row["model"], name, spec, row["metric"], row["length"], row["settings"], row.get("dtype"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return row.get("key")


def cells(grid) -> list[dict]:
    """Every cell of the grid, in run order (model, method, metric, length)."""
    out = []
    for model in grid["models"]:
        for label, name, options in grid["methods"]:
            for metric, settings in grid["metrics"].items():
                for L in grid["lengths"]:
                    out.append({"model": model, "method": label, "method_spec": canonical_method(name, options),
                                "metric": metric, "length": L, "settings": settings, "dtype": grid["dtype"],
                                "key": cell_key(model, name, options, metric, L, settings, grid["dtype"])})
    return out


# -------------------------------------------------------------------------------- results file
def read_results(path: Path) -> list[dict]:
    """The cells in a results.jsonl. A last line cut short by an interruption is dropped (and
    removed from the file, so that appending stays valid JSON lines). The "value" (and a ppl "result") of
    a row get back the non-finite floats written as "Infinity", "-Infinity" or "NaN" (``decode_nonfinite``);
    rows written with json's bare Infinity/NaN tokens (before strict JSON) read the same."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows, good = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(_decoded(json.loads(line)))
            good.append(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
            print(f"sweep: dropping an incomplete last line of {path}", file=sys.stderr)
    clean = "".join(line + "\n" for line in good)
    if clean != text:
        path.write_text(clean)
    return rows


def _decoded(row):
    """A results.jsonl row with the non-finite floats of its "value" and of a ppl "result" (all numbers; a
    passkey result holds the model's output text, which could read "NaN") back as floats."""
    if not isinstance(row, dict):
        return row
    numeric = ("value", "result") if row.get("metric") == "ppl" else ("value",)
    return {k: decode_nonfinite(v) if k in numeric else v for k, v in row.items()}


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(strict_dumps(row, default=str) + "\n")  # non-finite floats as "Infinity", "NaN" strings
        f.flush()
        os.fsync(f.fileno())


def environment(device) -> dict:
    """Git commit, library versions and hardware, recorded with every cell."""
    import torch
    import transformers

    from . import __version__

    root = Path(__file__).resolve().parents[1]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        hardware = torch.cuda.get_device_name(torch.device(dev))
    else:
        kind = "cpu" if dev.startswith("cuda") else dev.split(":")[0]  # mps, xpu: not "cpu" (as save_json)
        hardware = f"{kind} ({platform.machine()}, {os.cpu_count()} cores)"
    return {"git_commit": commit, "git_dirty": dirty,
            "versions": {"longctx": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "hardware": hardware, "device": dev}


# -------------------------------------------------------------------------------------- running
class _Data:
    """Corpora loaded once per run (token ids per tokenizer for ppl, texts for needle)."""

    def __init__(self):
        self.ids, self.texts, self.corpora = {}, {}, {}

    def documents(self, metric, s):
        """The documents of a metric's corpus (ppl: its docs), loaded once; a corpus that does not load or a
        doc it lacks is a ValueError naming the metric's setting."""
        from .data import load_corpus, select_documents

        if s["corpus"] not in self.corpora:
            try:
                self.corpora[s["corpus"]] = load_corpus(s["corpus"])
            except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else err
                raise ValueError(f"{metric} setting 'corpus' {s['corpus']!r}: {message}") from None
        docs = self.corpora[s["corpus"]]
        if metric == "ppl" and s["docs"]:
            docs = select_documents(docs, list(s["docs"]), f"ppl setting 'docs' (corpus {s['corpus']!r})")[0]
        return docs

    def ppl_ids(self, model_name, tokenizer, s):
        from .data import encode_documents

        key = (model_name, s["corpus"], tuple(s["docs"] or ()), s["max_tokens"])
        if key not in self.ids:
            self.ids[key] = encode_documents(tokenizer, self.documents("ppl", s), max_tokens=s["max_tokens"])
        return self.ids[key]

    def needle_texts(self, corpus):
        if corpus not in self.texts:
            self.texts[corpus] = [d.text for d in self.documents("needle", {"corpus": corpus})]
        return self.texts[corpus]


def evaluate_cell(model, tokenizer, cell, data: _Data) -> tuple[dict, float | None]:
    """Run one cell's metric at its length: (result dict, headline value). Dynamic RoPE state grown by an
    earlier cell is reset first, so a cell's value does not depend on the cells run before it."""
    reset_rotary_state(model)
    s, L = cell["settings"], cell["length"]
    if cell["metric"] == "ppl":
        ids = data.ppl_ids(cell["model"], tokenizer, s)
        tail = {"tail_fraction": s["tail_fraction"]} if s["score"] == "tail" else {}  # (score all: not used)
        res = perplexity(model, ids, [L], mode=s["mode"], stride=s["stride"], score=s["score"], **tail,
                         progress=False)[L]
        return res, res["ppl"]
    corpus = data.needle_texts(s["corpus"]) if cell["metric"] == "needle" else None
    res = passkey_accuracy(model, tokenizer, [L], depths=s["depths"], trials=s["trials"], seed=s["seed"],
                           task="needle" if cell["metric"] == "needle" else "passkey", corpus=corpus,
                           max_new_tokens=s["max_new_tokens"], progress=False)[L]
    return res, res["accuracy"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _slugs(models) -> dict[str, str]:
    """A distinct file-name part per model: the last path component of its folder/file/hub id, with as
    many parent components as tell it from the others (run1/final, run2/final -> run1_final, run2_final)."""
    parts = {m: [p for p in re.split(r"[/\\]+", str(m)) if p] or [str(m)] for m in models}
    slugs = {}
    for n in range(1, max((len(p) for p in parts.values()), default=0) + 1):
        slugs = {m: _slug("_".join(p[-n:])) for m, p in parts.items()}
        if len(set(slugs.values())) == len(slugs):
            return slugs
    used, out = set(), {}  # still equal (they differ in characters a file name drops): number them
    for m, slug in slugs.items():
        k, out[m] = 1, slug
        while out[m] in used:
            k += 1
            out[m] = f"{slug}-{k}"
        used.add(out[m])
    return out


def _wandb_start(cfg, grid, out):
    if cfg is None or cfg is False:
        return None
    try:
        import wandb
    except ImportError:
        print("sweep: wandb is not installed: logging to wandb skipped (pip install wandb)", file=sys.stderr)
        return None
    cfg = dict(cfg)
    # the other settings are wandb.init's own; they may replace the sweep's defaults (name, dir, config)
    config = {k: v for k, v in grid.items() if k != "wandb"}
    return wandb.init(**{"name": grid["name"], "dir": str(out), "config": config, **cfg,
                         "project": cfg.get("project", "longctx"), "mode": cfg.get("mode", "offline")})


def run(config_path, out=None, dry_run=False, device=None, plots=True) -> dict:
    """Run (or resume) the sweep in ``config_path``; returns {"computed", "skipped", "out", "cells"}."""
    from . import registry

    config_path = Path(config_path)
    grid = load_config(config_path)
    out = Path(out) if out else config_path.parent / config_path.stem
    results_path = out / RESULTS
    all_cells = cells(grid)
    done = {row_key(r) for r in read_results(results_path)}
    todo = [c for c in all_cells if c["key"] not in done]

    if dry_run:
        print(f"sweep {grid['name']}: {len(all_cells)} cells, {len(all_cells) - len(todo)} done, {len(todo)} to run "
              f"(results: {results_path})")
        for c in all_cells:
            state = "done" if c["key"] in done else "todo"
            print(f"  [{state}] {c['model']} | {c['method']} | {c['metric']} | {c['length']}")
        return {"computed": 0, "skipped": len(all_cells) - len(todo), "out": out, "cells": all_cells}

    device = device or grid["device"]
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if todo:  # a device torch does not parse or this machine lacks: before the corpora, the folder and wandb
        from .models import check_device

        check_device(device)
    data = _Data()
    for metric, settings in grid["metrics"].items():  # corpora and docs before the (slow) models and cells
        if "corpus" in settings and any(c["metric"] == metric for c in todo):
            data.documents(metric, settings)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    wb = _wandb_start(grid["wandb"], grid, out)
    slugs = _slugs(grid["models"])
    computed, n_todo = 0, len(todo)
    try:
        for model_name in grid["models"]:
            pending = [c for c in todo if c["model"] == model_name]
            if not pending:
                continue
            from .models import load_model

            t0 = time.time()
            model, tokenizer = load_model(model_name, dtype=grid["dtype"], device=device)
            print(f"sweep: loaded {model_name} in {time.time() - t0:.0f}s", file=sys.stderr)
            for label, name, options in grid["methods"]:
                mine = [c for c in pending if c["method"] == label]
                if not mine:
                    continue
                patch = None if name == "none" else registry.apply(model, name, **options)
                try:
                    for c in mine:
                        t1 = time.time()
                        result, value = evaluate_cell(model, tokenizer, c, data)
                        row = {**c, "value": value, "result": result, "seconds": round(time.time() - t1, 3),
                               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "config": str(config_path), **env}
                        _append(results_path, row)
                        computed += 1
                        shown = "-" if value is None else (f"{value:.4g}" if c["metric"] == "ppl" else f"{value:.2f}")
                        print(f"[{computed}/{n_todo}] {model_name} | {label} | {c['metric']} | {c['length']}: "
                              f"{shown} ({row['seconds']:.0f}s)", file=sys.stderr)
                        if wb is not None:
                            wb.log({f"{c['metric']}/{slugs[model_name]}/{label}/{c['length']}": value,
                                    "metric": c["metric"], "method": label, "length": c["length"], "value": value})
                finally:
                    if patch is not None:
                        patch.remove()
            del model
    finally:
        if wb is not None:
            wb.finish()
    rows = read_results(results_path)
    write_outputs(grid, all_cells, rows, out, plots=plots)
    return {"computed": computed, "skipped": len(all_cells) - n_todo, "out": out, "cells": all_cells}


# ------------------------------------------------------------------------------ tables and plots
def _grid_values(grid, all_cells, rows):
    """{(model, metric): {method label: {length: value}}} for the cells of this grid."""
    by_key = {row_key(r): r for r in rows}
    table: dict = {}
    for c in all_cells:
        r = by_key.get(c["key"])
        if r is None:
            continue
        table.setdefault((c["model"], c["metric"]), {}).setdefault(c["method"], {})[c["length"]] = r.get("value")
    return table


def _cell_text(metric, v):
    if v is None:
        return "-"
    return _fmt(v) if metric == "ppl" else f"{v:.2f}"


def format_tables(grid, all_cells, rows) -> str:
    values = _grid_values(grid, all_cells, rows)
    lines = [f"# {grid['name']}", ""]
    names = {"ppl": "perplexity", "passkey": "passkey retrieval accuracy", "needle": "needle-in-a-haystack accuracy"}
    for model in grid["models"]:
        for metric, settings in grid["metrics"].items():
            vals = values.get((model, metric))
            if not vals:
                continue
            shown = {k: v for k, v in key_settings(metric, settings).items() if v is not None}
            lines += [f"## {names[metric]}: {model}", "",
                      "settings: " + ", ".join(f"{k}={v}" for k, v in shown.items())
                      + (f", dtype={grid['dtype']}" if grid["dtype"] else ""), "",
                      "| method | " + " | ".join(str(L) for L in grid["lengths"]) + " |",
                      "|---|" + "---:|" * len(grid["lengths"])]
            for label, _, _ in grid["methods"]:
                row = vals.get(label, {})
                lines.append(f"| {label} | " + " | ".join(_cell_text(metric, row.get(L, None)) if L in row else " "
                                                          for L in grid["lengths"]) + " |")
            lines.append("")
    return "\n".join(lines)


def write_outputs(grid, all_cells, rows, out: Path, plots=True) -> list[Path]:
    """table.md and, when matplotlib is importable, one PNG per model and metric."""
    written = [out / "table.md"]
    (out / "table.md").write_text(format_tables(grid, all_cells, rows))
    if not plots:
        return written
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib is not installed: plots skipped (pip install matplotlib)", file=sys.stderr)
        return written
    values = _grid_values(grid, all_cells, rows)
    slugs = _slugs(grid["models"])
    for (model, metric), vals in values.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, _, _ in grid["methods"]:
            pts = sorted((L, v) for L, v in vals.get(label, {}).items()
                         if v is not None and (metric != "ppl" or (math.isfinite(v) and v > 0)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(grid["lengths"], [str(L) for L in grid["lengths"]])
        ax.set_xlabel("context length (tokens)")
        if metric == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (log scale)")
        else:
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel(f"{metric} accuracy")
        ax.set_title(f"{model}: {metric}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{slugs[model]}_{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------- CLI
def cmd_sweep(args) -> int:
    import yaml

    try:  # the YAML and --device, before anything runs: a message naming what is wrong, not a traceback
        load_config(args.config)
    except (ValueError, OSError, yaml.YAMLError) as err:
        where = "" if str(args.config) in str(err) else f" {args.config}"
        raise SystemExit(f"longctx sweep{where}: {err}") from None
    if args.device_override is not None and not args.dry_run:
        from .models import check_device

        try:
            check_device(args.device_override)
        except ValueError as err:
            raise SystemExit(f"longctx sweep --{err}") from None
    res = run(args.config, out=args.out, dry_run=args.dry_run, device=args.device_override, plots=not args.no_plots)
    if not args.dry_run:
        print(f"sweep: {res['computed']} cell(s) computed, {res['skipped']} already done; "
              f"results in {res['out']}", file=sys.stderr)
        print((Path(res["out"]) / "table.md").read_text())
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a YAML grid of models x methods x metrics x lengths (resumable)")
    p.add_argument("config", help="the sweep YAML, e.g. experiments/rope_sweep.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the grid and which cells are done; compute nothing")
    p.add_argument("--out", default=None, help="output folder (default: next to the YAML, named after it)")
    p.add_argument("--device", dest="device_override", default=None, help="override the YAML's device")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_sweep)


if __name__ == "__main__":  # python -m longctx.sweep CONFIG [--dry-run] [--out DIR]
    import argparse

    _parser = argparse.ArgumentParser(prog="longctx")
    add_commands(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["sweep", *sys.argv[1:]])
    sys.exit(_args.func(_args))
