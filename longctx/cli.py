"""The ``longctx`` command line.

    longctx methods
    longctx ppl --model smollm2-135m --corpus austen --method yarn --factor 4 \\
                --lengths 2048,8192,16384,32768 --out results.json

``--method`` may be repeated to compare methods on one loaded model; each value is ``NAME`` or
``NAME:key=value:key=value`` (``none`` = the unpatched model). ``--factor`` fills in the factor of
methods that take one and were not given it; it is refused when no method uses it. ``--text-field``
(.jsonl/.parquet files, datasets) and ``--split`` (datasets) go to ``load_corpus`` with ``--corpus``.
Every option, the corpus and ``--docs`` are checked before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import shlex
import sys
import time

from . import registry


def parse_method(spec: str, factor: float | None, where: str | None = None,
                 factor_hint: str = "--factor F or NAME:factor=F") -> tuple[str, str, dict]:
    """``"yarn:factor=8:beta_fast=16"`` -> (label, name, options); label is what tables show. A value
    reads as an int, a float, true/false (a bool) or none (None), case-insensitive; else a string.
    ``where`` starts the error messages (default ``--method 'SPEC'``); ``factor_hint``: how to give a missing
    factor, NAME standing for the method (commands without ``--factor`` pass "NAME:factor=F")."""
    where = where or f"--method {spec!r}"
    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{where}: expected NAME:key=value, got {pair!r}")
        if key in options:
            raise SystemExit(f"{where}: option {key!r} is given twice")
        options[key] = _value(value)
    return method_label(name, options, factor, where, factor_hint)


def method_label(name: str, options: dict, factor: float | None, where: str,
                 factor_hint: str = "--factor F or NAME:factor=F") -> tuple[str, str, dict]:
    """(label, name, options) for a method and its options, taken as they are; ``factor`` fills in the
    factor of a method that takes one and was not given it. ``where`` starts the error messages;
    ``factor_hint``: how to give a missing factor there (NAME stands for the method)."""
    options = dict(options)
    if name == "none":
        if options:
            raise SystemExit(f"{where}: method none takes no options")
        return "none", name, {}
    try:
        method = registry.get_method(name)
    except ValueError as err:
        raise SystemExit(f"{where}: {err}") from None
    fields = [f.name for f in dataclasses.fields(method.options)]
    unknown = sorted(set(options) - set(fields))
    if unknown:  # before the factor: a misspelt factor= would read as a missing one
        raise SystemExit(f"{where}: unknown option(s) {', '.join(map(repr, unknown))} for method {method.name!r}; "
                         f"allowed options: {', '.join(fields) or '(none)'}")
    if "factor" in fields and "factor" not in options:
        if factor is None:
            raise SystemExit(f"{where}: method {name} needs a factor: {factor_hint.replace('NAME', name)}")
        options["factor"] = factor
    label = name
    if "factor" in options:
        if isinstance(options["factor"], bool) or not isinstance(options["factor"], numbers.Real):
            raise SystemExit(f"{where}: option 'factor' must be a number, got {options['factor']!r}")
        label += f" x{_short(options['factor'])}"
    extra = {k: v for k, v in options.items() if k != "factor"}
    if extra:
        label += " (" + ", ".join(f"{k}={_short(v)}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()) + ")"
    return label, name, options


def _short(x) -> str:
    """A number for a label: ``:g`` (4, 1e+06), unless that loses digits (1.0000001 and 1.0000002 both read 1: two
    distinct methods under one label, refused as given twice), then in full."""
    text = f"{x:g}"
    return text if float(text) == x else repr(float(x))


def parse_methods(specs: list[str], factor: float | None) -> list[tuple[str, str, dict]]:
    """Every --method value parsed; two with the same label (e.g. ``yarn:factor=2`` and ``yarn`` with
    ``--factor 2``) are an error: their results would overwrite each other in the table and JSON. So are two
    labels of the same method (``pi:factor=4`` and ``linear:factor=4``: one method computed twice), and a
    ``factor`` that no method uses (methods without a factor, or with their own)."""
    out = [parse_method(m, factor) for m in specs]
    if factor is not None and not any(_fills_factor(m) for m in specs):
        takes = [name for name in registry.methods() if _takes_factor(name)]
        raise SystemExit(f"--factor fills in the factor of methods that take one ({', '.join(takes)}) and were not "
                         f"given it; no --method here uses it ({', '.join(specs)})")
    labels = [label for label, _, _ in out]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise SystemExit(f"--method: {', '.join(map(repr, twice))} given more than once (methods {labels}); "
                         f"every method must be distinct")
    from .sweep import canonical_method

    seen = {}
    for label, name, options in out:  # pi:factor=4 and linear:factor=4 (or a default given): one method computed twice
        try:
            key = repr(canonical_method(name, options))
        except (ValueError, TypeError):
            continue  # a bad option: the commands say so, naming it
        if key in seen:
            raise SystemExit(f"--method: {seen[key]!r} and {label!r} are the same method; every method must be "
                             f"distinct")
        seen[key] = label
    return out


_WORDS = {"true": True, "false": False, "none": None}


def _value(text: str):
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 2, got {text!r}")
    return list(dict.fromkeys(values))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _fills_factor(spec: str) -> bool:
    """Whether --factor fills in the factor of this (already parsed, so valid) --method value."""
    name, *pairs = spec.split(":")
    return "factor" not in {pair.partition("=")[0] for pair in pairs} and _takes_factor(name)


def _takes_factor(name: str) -> bool:
    return name != "none" and "factor" in {f.name for f in dataclasses.fields(registry.get_method(name).options)}


def load_model_or_exit(args, device=None):
    """``load_model(args.model, dtype=args.dtype, device=...)`` for the commands: its errors (no such folder or
    .gguf file, a hub id without network, a folder that is not a model) are a message naming --model, not a
    traceback (RuntimeError: the built-in alias's model could not be fetched). Loaded through longctx.models at call
    time (tests replace it there)."""
    from . import models

    try:
        return models.load_model(args.model, dtype=args.dtype, device=args.device if device is None else device)
    except (ValueError, OSError, RuntimeError) as err:
        raise SystemExit(f"--model {args.model!r}: {err}") from None


def apply_method(model, spec: str, name: str, options: dict):
    """``registry.apply(model, name, **options)``; what the loaded model refuses (a RoPE method on an ALiBi model,
    ``layer_types`` on a model with one RoPE configuration, a factor too small for its length, streaming on layer
    kinds it does not support, s2attn's flash backend without flash_attn) is a message naming the --method, not a
    traceback."""
    try:
        return registry.apply(model, name, **options)
    except (ValueError, TypeError, NotImplementedError, ImportError) as err:
        if (isinstance(err, ImportError) and err.name is not None) or not str(err):
            raise  # an import that failed (a module missing or broken, a name moved) or a bare NotImplementedError
            # (a method hook left unwritten): bugs to trace, not what the --method asks for
        raise SystemExit(f"--method {spec}: {err}") from None


def check_methods_on(model, specs) -> None:
    """Apply and remove each of ``specs`` ((label, name, options), as ``parse_methods``) on the loaded model, before
    any evaluation: a method this model refuses stops the command at once, not after the earlier methods' results
    were computed (and then lost, unwritten)."""
    for label, name, options in specs:
        if name != "none":
            apply_method(model, label, name, options).remove()


def command_line(args) -> str:
    """The command that ran, as a shell would re-run it: the argv ``main`` parsed (else the process's)."""
    return getattr(args, "command_line", None) or shlex.join(["longctx", *sys.argv[1:]])


def cmd_methods(args) -> int:
    for name, description in registry.methods().items():
        print(f"{name:<12} {description}")
    return 0


def cmd_ppl(args) -> int:
    from .data import encode_documents, load_corpus, select_documents
    from .eval import format_table, perplexity, save_json
    from .eval.perplexity import inactive_in_eval

    method_specs = args.method or ["none"]
    specs = parse_methods(method_specs, args.factor)
    for _, name, options in specs:  # check every option before the slow loads
        reason = inactive_in_eval(name, options)
        if reason:
            raise SystemExit(f"--method {name}: {reason}")
        if name != "none":
            try:
                registry.make_options(registry.get_method(name), **options)
            except (ValueError, TypeError) as err:
                raise SystemExit(f"--method {name}: {err}") from None
    if args.mode == "chunks" and args.stride is not None:
        raise SystemExit("--stride only applies to --mode sliding")
    if args.mode == "sliding" and args.score == "tail":
        raise SystemExit("--score tail only applies to --mode chunks (sliding windows score their last --stride tokens)")
    if args.stride is not None and not 1 <= args.stride <= min(args.lengths):
        raise SystemExit(f"--stride must be in 1..{min(args.lengths)} (the smallest of --lengths), got {args.stride}")
    if args.tail_fraction is not None and args.score != "tail":
        raise SystemExit(f"--tail-fraction only applies to --score tail (got --score {args.score})")
    tail = {"tail_fraction": 0.25 if args.tail_fraction is None else args.tail_fraction} if args.score == "tail" else {}
    if tail and not (0 < tail["tail_fraction"] <= 1 and int(min(args.lengths) * tail["tail_fraction"]) >= 1):
        raise SystemExit(f"--tail-fraction must be in (0, 1] and score >= 1 token of every length, "
                         f"got {tail['tail_fraction']}")
    wanted = None
    if args.docs is not None:
        wanted = [d.strip() for d in args.docs.split(",")]
        if not all(wanted):
            raise SystemExit(f"--docs: expected comma-separated document names, got {args.docs!r} (an empty name)")
    for option, value in (("--model", args.model), ("--corpus", args.corpus)):
        if not value.strip():
            raise SystemExit(f"{option} is empty")

    t0 = time.time()
    try:  # the corpus and --docs before the (slower) model
        docs = load_corpus(args.corpus, split=args.split, text_field=args.text_field)
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:  # messages written for the user
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        raise SystemExit(f"--corpus {args.corpus!r}: {message}") from None
    if wanted is not None:
        try:
            docs = select_documents(docs, wanted, "--docs")[0]
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.device is None:  # as main() and passkey: cuda when available (load_model's None is the CPU, and the
        import torch  # JSON named CUDA's GPU for that run)

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_or_exit(args)
    check_methods_on(model, specs)
    ids = encode_documents(tokenizer, docs, max_tokens=args.max_tokens)
    print(f"loaded {args.model} and {len(ids)} document(s), {sum(len(x) for x in ids):,} tokens "
          f"in {time.time() - t0:.0f}s", file=sys.stderr)

    results = {}
    for label, name, options in specs:
        patch = None if name == "none" else apply_method(model, label, name, options)
        try:
            results[label] = perplexity(model, ids, args.lengths, mode=args.mode, stride=args.stride,
                                        score=args.score, compile=args.compile, **tail)
        finally:
            if patch is not None:
                patch.remove()
        print(f"{label}: " + ", ".join(f"{L}: {r['ppl']:.4g}" if r["ppl"] else f"{L}: -"
                                       for L, r in results[label].items()), file=sys.stderr)

    print(format_table(results))
    if args.out:
        corpus_options = {k: v for k, v in (("split", args.split), ("text_field", args.text_field)) if v is not None}
        save_json(results, args.out, model=args.model, corpus=args.corpus, **corpus_options,
                  docs=[d.name for d in docs], max_tokens=args.max_tokens,
                  methods={label: {"method": n, **o} for label, n, o in specs}, mode=args.mode, stride=args.stride,
                  score=args.score, **tail, lengths=args.lengths, dtype=args.dtype, device=args.device,
                  compile=args.compile, command=command_line(args))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


# Feature modules that add their own subcommands: each defines add_commands(subparsers) and sets
# func=... on its parsers. Keeps one file per feature; this module only wires them in.
COMMAND_MODULES: tuple[str, ...] = ("longctx.chat", "longctx.eval.streaming", "longctx.train", "longctx.eval.passkey",
                                    "longctx.estimate", "longctx.sweep")


# commands whose --dtype is not load_model's (estimate: argparse choices of its own, bytes per value)
_OWN_DTYPES = ("estimate",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description="Context-length extension for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the registered methods").set_defaults(func=cmd_methods)

    p = sub.add_parser("ppl", help="perplexity by context length, for one or more methods")
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, .gguf file or hub id")
    p.add_argument("--corpus", default="austen",
                   help="austen, austen-lines, kjv, a local file/folder, or a datasets name")
    p.add_argument("--text-field", help=".jsonl/.parquet files and datasets: the field holding the text "
                                        "(default: text)")
    p.add_argument("--split", help="datasets: the split to read (default: train)")
    p.add_argument("--docs", help="comma-separated document names to keep, e.g. 'Pride and Prejudice,Emma'")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="truncate each document to this many tokens")
    p.add_argument("--method", action="append", help="NAME or NAME:key=value:... (repeatable; 'none' = unpatched)")
    p.add_argument("--factor", type=float, help="factor for methods that take one and were not given it")
    p.add_argument("--lengths", type=_ints, default=[2048, 8192, 16384, 32768], help="comma-separated")
    p.add_argument("--mode", choices=["chunks", "sliding"], default="chunks")
    p.add_argument("--stride", type=int, default=None, help="sliding mode: window step (default length/2)")
    p.add_argument("--score", choices=["all", "tail"], default="all")
    p.add_argument("--tail-fraction", type=float, default=None,
                   help="--score tail: scored fraction of each window (default 0.25)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer's parts (compiles once per length; measured slower "
                        "than eager for SmolLM2 on an H100)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--out", help="write the results and settings as JSON here")
    p.set_defaults(func=cmd_ppl)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["longctx", *argv])  # what was run, as a shell would re-run it
    if getattr(args, "device", "unset") is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "device", None) is not None:  # every command's --device, before anything slow runs
        from .models import check_device

        try:
            check_device(args.device)
        except (ValueError, TypeError) as err:
            raise SystemExit(f"--{err}") from None
    dtype = getattr(args, "dtype", None)
    if isinstance(dtype, str) and args.command not in _OWN_DTYPES:  # load_model's dtypes, before anything slow runs
        from .models import DTYPES

        if dtype.lower() not in DTYPES:
            raise SystemExit(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
