"""Passkey retrieval and needle-in-a-haystack accuracy at fixed prompt lengths (in tokens).

Passkey (the landmark-attention prompt used by LongLoRA and YaRN; Mohtashami & Jaggi 2023)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.
    I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 53721. Remember it. 53721 is the pass key.          <- at `depth` of the filler
    ... The grass is green. The sky is blue. ...
    What is the pass key? The pass key is

Needle in a haystack (``task="needle"``): the filler is running text of a corpus (``load_corpus``
documents, default ``austen``, from a seeded random place, wrapping around from the corpus's end to
its start as from one document to the next), the needle is
"The special magic number is 53721." and the question "What is the special magic number mentioned
in the text? The special magic number is".

Length: the prompt is tokenized with ``add_special_tokens=False`` (filler text spelling a special token
stays text, as in ``encode_documents``) and holds at most ``length``
tokens; the filler is cut at a word, so it falls short by less than one word's tokens (a tokenizer
whose tokens span several words gets more filler words; a length the prompt cannot reach is a
ValueError naming the length it reaches). Depth: the
needle goes at the sentence boundary of the filler closest to ``depth * (filler words)`` (0 = right
after the instructions, 1 = right before the question).

Scoring: greedy decoding of ``max_new_tokens`` tokens (``model.generate``, stopping at eos, with none
of the checkpoint's generation options such as repetition_penalty; with an active
``streaming`` patch, the prompt is prefilled in window-sized chunks into the patch's cache and the
tokens decoded one by one, stopping at the eos ids of the generation config and the tokenizer);
the answer is the first 5-digit number (a run of exactly 5 digits) in
the decoded text; a trial is correct iff it equals the key. Keys are 5-digit numbers drawn from a
``random.Random`` seeded with (seed, task, length, depth, trial): deterministic given ``seed``.
"""

from __future__ import annotations

import bisect
import contextlib
import numbers
import random
import re
import sys
import time
from dataclasses import dataclass

import torch

from ..methods.rope import reset_rotary_state

TASKS = ("passkey", "needle")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NEEDLE_INTRO = ("There is a special magic number hidden inside the following text. Find it and memorize it. "
                "I will quiz you about it.")
NEEDLE_NEEDLE = "The special magic number is {key}."
NEEDLE_QUESTION = "What is the special magic number mentioned in the text? The special magic number is"

_UNIT = re.compile(r"\S+\s*")                 # a word with the whitespace after it
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")  # "blue." / "said." / 'it!"'
_KEY = re.compile(r"(?<!\d)\d{5}(?!\d)")


@dataclass
class Prompt:
    """One passkey/needle prompt. Token positions index ``input_ids``."""

    text: str
    input_ids: list[int]
    key: str
    depth: float            # requested depth
    filler_words: int       # words of filler in the prompt
    needle_word: int        # the needle sits before this filler word (0..filler_words)
    filler_start: int       # first filler token (or the needle's, at depth 0)
    needle_start: int       # first token of the needle sentence
    needle_end: int         # one past its last token
    question_start: int     # first token of the question

    @property
    def actual_depth(self) -> float:
        """Where the needle is, as a fraction of the filler tokens."""
        filler = (self.needle_start - self.filler_start) + (self.question_start - self.needle_end)
        return (self.needle_start - self.filler_start) / filler if filler else 0.0


def _words(text: str) -> list[str]:
    return _UNIT.findall(text)


def _texts(corpus) -> list[str]:
    if corpus is None:
        corpus = "austen"
    if isinstance(corpus, str):
        from ..data import load_corpus

        return [d.text for d in load_corpus(corpus)]
    return [getattr(d, "text", d) for d in corpus]


class _Haystack:
    """A filler source: ``units(start, n)`` = n words from word ``start``, wrapping around."""

    def __init__(self, words: list[str]):
        if not words:
            raise ValueError("empty filler text")
        words = list(words)
        if not words[-1][-1:].isspace():  # a stripped text: the wrap must not glue its last and first words
            words[-1] += "\n\n"
        self.words = words
        self.ends = [i + 1 for i, w in enumerate(words) if _SENTENCE_END.search(w.rstrip())]

    def units(self, start: int, n: int) -> list[str]:
        out, i = [], start % len(self.words)
        while len(out) < n:
            take = self.words[i:i + n - len(out)]
            out += take
            i = 0
        return out


_PASSKEY_HAYSTACK = _Haystack(_words(PASSKEY_FILLER + " "))


def _boundaries(units: list[str]) -> list[int]:
    """Indices i (0..len) such that a sentence starts at units[i] (0 and len always)."""
    b = [0] + [i + 1 for i, w in enumerate(units) if _SENTENCE_END.search(w.rstrip())]
    if b[-1] != len(units):
        b.append(len(units))
    return b


def _insertion(bounds: list[int], n: int, depth: float) -> int:
    """The sentence boundary <= n closest to depth * n (ties: the earlier one)."""
    target = depth * n
    upto = bounds[:bisect.bisect_right(bounds, n)]
    if upto[-1] != n:
        upto.append(n)
    return min(upto, key=lambda i: (abs(i - target), i))


def _encode(tokenizer, text: str) -> list[int]:
    # as encode_documents (perplexity, training): filler text spelling a special token ("</s>") stays text
    from ..data import plain_text_kwargs

    return list(tokenizer(text, add_special_tokens=False, verbose=False, **plain_text_kwargs(tokenizer))["input_ids"])


def _fixed_parts(task: str, key: str) -> tuple[str, str, str]:
    """The intro, needle and question of ``task``'s prompt for ``key``: the prompt without filler."""
    if task == "passkey":
        return PASSKEY_INTRO, PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION
    return NEEDLE_INTRO, NEEDLE_NEEDLE.format(key=key), NEEDLE_QUESTION


def make_prompt(tokenizer, length: int, depth: float, key, task: str = "passkey", *, haystack=None,
                start: int = 0) -> Prompt:
    """Build the prompt for ``task`` with ``key`` at ``depth`` and at most ``length`` tokens.

    ``haystack``: for ``task="needle"`` only (a ValueError with ``task="passkey"``, whose filler is fixed), the
    filler words (a list of word strings with trailing whitespace, or a text); ``start``: the filler's first
    word (wraps around).
    How the length is hit: the number of filler words ``n`` is the largest one for which the whole
    prompt tokenizes to <= ``length`` tokens (estimated from the tokens per word, then bracketed and
    bisected on the real tokenization, about 10 tokenizer calls). The words are taken ``length`` at a
    time (a word is at least a token in common tokenizers); while they tokenize to fewer than ``length``
    tokens (tokens spanning several words), twice as many are taken, up to 64x. A length still out of
    reach is a ValueError naming the tokens reached."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(key)
    if task == "passkey" and haystack is not None:
        raise ValueError("haystack applies to task='needle' only; task 'passkey' has its own fixed filler text")
    intro, needle, question = _fixed_parts(task, key)
    if task == "passkey":
        hay = _PASSKEY_HAYSTACK
    else:
        if haystack is None:
            raise ValueError("task='needle' needs haystack= (corpus text)")
        hay = haystack if isinstance(haystack, _Haystack) else _Haystack(
            _words(haystack) if isinstance(haystack, str) else list(haystack))

    # every word is usually >= 1 token, so `length` words are enough; a token spanning several words (an added
    # token, merges across spaces) needs more: they are doubled below until the filler can reach `length`
    units = hay.units(start, max(64, int(length)))
    bounds = _boundaries(units)

    def parts(n):
        p = _insertion(bounds, n, depth)
        prefix, suffix = "".join(units[:p]).strip(), "".join(units[p:n]).strip()
        return [intro, prefix, needle, suffix, question], p

    def text_of(n):
        segs, p = parts(n)
        return "\n".join(s for s in segs if s), p

    counts: dict[int, int] = {}

    def count(n):
        if n not in counts:
            counts[n] = len(_encode(tokenizer, text_of(n)[0]))
        return counts[n]

    if count(0) > length:
        raise ValueError(f"length {length} is too short: the prompt without filler has {count(0)} tokens")
    # more words give the same prompt for every n already counted (the same words, the same boundaries up to n)
    limit = 64 * max(64, int(length))
    while count(len(units)) < length:
        before = len(units)
        if 2 * before > limit:
            break
        units = hay.units(start, 2 * before)
        bounds = _boundaries(units)
        if count(len(units)) <= count(before):  # more words, no more tokens: it never gets there
            break
    if count(len(units)) < length:
        raise ValueError(f"length {length} is out of reach: with {len(units)} filler words the prompt has only "
                         f"{count(len(units))} tokens (this tokenizer's tokens span too many words)")
    top = len(units)
    probe = min(top, 256)
    rate = max((count(probe) - count(0)) / probe, 1e-3)       # tokens per filler word
    guess = min(top, max(0, int((length - count(0)) / rate)))
    step = max(4, guess // 64)
    if count(guess) <= length:                                 # bracket: count(lo) <= length < count(hi)
        lo, hi = guess, min(top, guess + step)
        while hi < top and count(hi) <= length:
            lo, hi, step = hi, min(top, hi + 2 * step), 2 * step
        if count(hi) <= length:
            lo = hi
    else:
        lo, hi = max(0, guess - step), guess
        while count(lo) > length:
            lo, hi, step = max(0, lo - 2 * step), lo, 2 * step
    while hi - lo > 1:                                         # bisect
        mid = (lo + hi) // 2
        if count(mid) <= length:
            lo = mid
        else:
            hi = mid
    n = lo
    text, p = text_of(n)
    ids = _encode(tokenizer, text)
    segs, _ = parts(n)
    # token positions of the pieces: token count of the text before each piece, up to its first
    # character (the joining "\n" included: it is a token of its own in most tokenizers)
    def upto(k, newline):
        return len(_encode(tokenizer, "\n".join(s for s in segs[:k] if s) + newline))

    return Prompt(text=text, input_ids=ids, key=key, depth=depth, filler_words=n, needle_word=p,
                  filler_start=upto(1, "\n"), needle_start=upto(2, "\n"), needle_end=upto(3, ""),
                  question_start=upto(4, "\n"))


def extract_key(text: str) -> str | None:
    """The first run of exactly 5 digits in ``text`` (None if there is none)."""
    m = _KEY.search(text)
    return m.group(0) if m else None


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def greedy_decode(model, input_ids: list[int], max_new_tokens: int, tokenizer=None) -> list[int]:
    """Greedy continuation of ``input_ids`` (new token ids only), with the model's own cache; it stops
    after an eos token (kept, as ``model.generate`` keeps it). Under an active ``streaming`` patch the
    tokens are decoded one by one on the patch's cache, stopping at the ids of
    ``model.generation_config.eos_token_id`` and ``tokenizer.eos_token_id``."""
    device = _model_device(model)
    x = torch.tensor([input_ids], dtype=torch.long, device=device)
    stream = None
    try:
        from ..registry import active_patches

        stream = next((p for p in active_patches(model) if hasattr(p, "new_cache")), None)
    except (TypeError, AttributeError):
        pass
    with torch.inference_mode():
        if stream is not None:                     # bounded cache: chunked prefill, then token by token
            from ..chat import eos_set
            from ..methods.streaming import prefill

            config = getattr(_generating_model(model), "generation_config", None)
            eos = eos_set(getattr(config, "eos_token_id", None)) | eos_set(getattr(tokenizer, "eos_token_id", None))
            cache = stream.new_cache()
            out = prefill(model, x, cache)
            new = []
            for _ in range(max_new_tokens):
                tok = out.logits[:, -1].argmax(-1)
                new.append(int(tok))
                if len(new) == max_new_tokens or new[-1] in eos:  # eos ends it, as in model.generate
                    break
                out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
            return new
        with _plain_generation(model, tokenizer, max_new_tokens) as config:
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
    return [int(t) for t in out[0, x.shape[1]:]]


def _generating_model(model):
    """The model whose generate() runs and whose generation_config counts (inside peft / torch.compile)."""
    try:
        from ..registry import unwrap_model

        return unwrap_model(model)
    except (TypeError, AttributeError):
        return model


@contextlib.contextmanager
def _plain_generation(model, tokenizer, max_new_tokens: int):
    """A GenerationConfig for greedy decoding with no logits processor. ``generate`` fills every option
    the given config leaves unset from ``model.generation_config``, where a checkpoint may set
    repetition_penalty, no_repeat_ngram_size, min_new_tokens, ...: so that one is swapped for a config
    holding only the special token ids while generating (decoding stops at eos, as before)."""
    from transformers import GenerationConfig

    owner = _generating_model(model)
    old = getattr(owner, "generation_config", None)
    ids = {k: getattr(old, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if getattr(tokenizer, "pad_token_id", None) is not None:
        ids["pad_token_id"] = tokenizer.pad_token_id
    from ..chat import eos_set

    eos = eos_set(ids["eos_token_id"]) | eos_set(getattr(tokenizer, "eos_token_id", None))
    ids["eos_token_id"] = sorted(eos) if eos else None  # the ids the streaming path stops at
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **ids)
    if old is None:
        yield config
        return
    owner.generation_config = GenerationConfig(**ids)
    try:
        yield config
    finally:
        owner.generation_config = old


def check_lengths(lengths) -> list[int]:
    """passkey_accuracy's ``lengths``: a non-empty list (or tuple) of distinct integers >= 1 (tokens)."""
    if not isinstance(lengths, (list, tuple)) or not lengths or any(
            isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 1 for L in lengths):
        raise ValueError(f"lengths must be a non-empty list of integers >= 1 (prompt tokens), got {lengths!r}")
    lengths = [int(L) for L in lengths]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must be distinct, got {lengths}")
    return lengths


def check_settings(depths, trials, max_new_tokens, seed=0) -> list[float]:
    """Check passkey_accuracy's settings before any prompt is built; returns the depths as floats."""
    for name, value in (("trials", trials), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__"):
        raise ValueError(f"depths must be a list of numbers in [0, 1], got {depths!r}")
    depths = list(depths)
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d <= 1]
    if bad or not depths:
        raise ValueError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    depths = [float(d) for d in depths]
    if len(set(depths)) != len(depths):
        raise ValueError(f"depths must be distinct, got {depths}")
    return depths


def passkey_accuracy(model, tokenizer, lengths, depths=DEPTHS, trials: int = 5, seed: int = 0,
                     task: str = "passkey", corpus=None, *, max_new_tokens: int = 12,
                     progress: bool = True) -> dict[int, dict]:
    """Retrieval accuracy of ``model`` for prompts of each length (tokens) and needle depth.

    ``trials`` prompts per (length, depth), each with its own key (and, for ``task="needle"``,
    its own place in the corpus ``corpus``: a name or path for ``load_corpus``, or a list of
    Documents/strings; default ``austen``). Returns ``{length: {"accuracy", "correct", "total",
    "prompt_tokens" (mean), "by_depth": {depth: {"accuracy", "correct", "total"}}, "samples":
    [{"depth", "trial", "key", "answer", "output", "correct", "prompt_tokens", "needle_start"}]}}``.
    ``lengths``: a list of distinct integers >= 1. Dynamic RoPE state grown by earlier inputs is reset
    before each prompt (``longctx.methods.rope.reset_rotary_state``): a sample's result does not depend
    on the lengths, depths or trials evaluated before it (a prompt's generated tokens grow it too).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task != "needle" and corpus is not None:
        raise ValueError(f"corpus applies to task='needle' only; task {task!r} has its own fixed filler text")
    lengths = check_lengths(lengths)
    depths = check_settings(depths, trials, max_new_tokens, seed)
    hay = _Haystack(_words("\n\n".join(_texts(corpus)))) if task == "needle" else None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results = {}
    try:
        for L in lengths:
            samples = []
            t0 = time.time()
            for d in depths:
                for trial in range(trials):
                    prompt = _sample_prompt(tokenizer, task, seed, L, d, trial, hay)
                    reset_rotary_state(model)  # nothing grown by the previous prompt + its generated tokens
                    new = greedy_decode(model, prompt.input_ids, max_new_tokens, tokenizer)
                    output = tokenizer.decode(new, skip_special_tokens=True)
                    answer = extract_key(output)
                    samples.append({"depth": d, "trial": trial, "key": prompt.key, "answer": answer,
                                    "output": output, "correct": answer == prompt.key,
                                    "prompt_tokens": len(prompt.input_ids), "needle_start": prompt.needle_start})
            by_depth = {}
            for d in depths:
                hits = [s["correct"] for s in samples if s["depth"] == d]
                by_depth[d] = {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits)}
            correct = sum(s["correct"] for s in samples)
            results[L] = {"accuracy": correct / len(samples), "correct": correct, "total": len(samples),
                          "prompt_tokens": sum(s["prompt_tokens"] for s in samples) / len(samples),
                          "by_depth": by_depth, "samples": samples}
            if progress:
                print(f"{task} L={L}: {correct}/{len(samples)} correct "
                      f"({time.time() - t0:.0f}s)", file=sys.stderr)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return results


def _sample_rng(task, seed, L, d, trial) -> random.Random:
    """The random source of one sample of passkey_accuracy: its key first (then the needle filler start)."""
    return random.Random(f"longctx-{task}:{seed}:{L}:{d!r}:{trial}")


def _sample_prompt(tokenizer, task, seed, L, d, trial, hay) -> Prompt:
    """The prompt of one sample of passkey_accuracy: its key (and needle filler start) drawn from the sample."""
    rng = _sample_rng(task, seed, L, d, trial)
    key = rng.randint(10000, 99999)
    start = rng.randrange(len(hay.words)) if hay is not None else 0
    return make_prompt(tokenizer, L, d, key, task, haystack=hay, start=start)


def check_prompts(tokenizer, lengths, depths, trials: int, seed: int = 0, task: str = "passkey") -> None:
    """The ValueError passkey_accuracy would raise for a length too short for the prompt without filler, before any
    model runs: every length's samples (their keys, drawn per length, may tokenize to more tokens: a length above the
    shortest can be the one too short), counted without building the prompts (a 32k-token prompt: about a second)."""
    for L in sorted(check_lengths(lengths)):
        for d in check_settings(depths, trials, 1, seed):
            for trial in range(trials):
                key = str(_sample_rng(task, seed, L, d, trial).randint(10000, 99999))
                bare = len(_encode(tokenizer, "\n".join(_fixed_parts(task, key))))  # make_prompt's count(0)
                if bare > L:
                    raise ValueError(f"length {L} is too short: the prompt without filler has {bare} tokens")


def format_accuracy_table(results_by_method: dict[str, dict]) -> str:
    """Markdown table: one row per method, one column per length, cells = accuracy (0..1)."""
    lengths = sorted({int(L) for res in results_by_method.values() for L in res})
    lines = ["| method | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for name, res in results_by_method.items():
        res = {int(L): r for L, r in res.items()}
        cells = [f"{res[L]['accuracy']:.2f}" if L in res else "-" for L in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def cmd_passkey(args) -> int:
    from .. import registry
    from ..cli import apply_method, check_methods_on, command_line, load_model_or_exit, parse_methods
    from .perplexity import inactive_in_eval, save_json

    if args.task != "needle" and args.corpus is not None:
        raise SystemExit(f"--corpus applies to --task needle only (the {args.task} filler is fixed text)")
    specs = parse_methods(args.method or ["none"], args.factor)
    try:  # before the slow load; a message, not a traceback
        check_settings(args.depths, args.trials, args.max_new_tokens, args.seed)
    except ValueError as err:
        raise SystemExit(f"longctx passkey: {err}") from None
    for _, name, options in specs:  # check every option before the slow load
        reason = inactive_in_eval(name, options, with_cache=True)
        if reason:
            raise SystemExit(f"--method {name}: {reason}")
        if name != "none":
            try:
                registry.make_options(registry.get_method(name), **options)
            except (ValueError, TypeError) as err:
                raise SystemExit(f"--method {name}: {err}") from None
    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = None
    if args.task == "needle":  # the corpus before the (slower) model
        try:
            corpus = _texts(args.corpus if args.corpus is not None else "austen")
        except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:  # messages written for the user
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise SystemExit(f"--corpus {args.corpus!r}: {message}") from None
    model, tokenizer = load_model_or_exit(args, device)
    check_methods_on(model, specs)
    try:  # before any method runs: a length too short for this tokenizer's prompt was a traceback after the first
        check_prompts(tokenizer, args.lengths, args.depths, args.trials, args.seed, args.task)
    except ValueError as err:
        raise SystemExit(f"--lengths: {err}") from None
    results = {}
    for label, name, options in specs:
        patch = None if name == "none" else apply_method(model, label, name, options)
        try:
            results[label] = passkey_accuracy(model, tokenizer, args.lengths, depths=args.depths, trials=args.trials,
                                              seed=args.seed, task=args.task, corpus=corpus,
                                              max_new_tokens=args.max_new_tokens)
        finally:
            if patch is not None:
                patch.remove()
        print(f"{label}: " + ", ".join(f"{L}: {r['accuracy']:.2f}" for L, r in results[label].items()),
              file=sys.stderr)
    print(format_accuracy_table(results))
    if args.out:
        save_json(results, args.out, model=args.model, task=args.task, corpus=args.corpus if args.task == "needle" else None,
                  methods={label: {"method": n, **o} for label, n, o in specs}, lengths=args.lengths,
                  depths=args.depths, trials=args.trials, seed=args.seed, max_new_tokens=args.max_new_tokens,
                  dtype=args.dtype, device=device, command=command_line(args))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_commands(subparsers) -> None:
    from ..cli import _ints

    p = subparsers.add_parser("passkey", help="passkey retrieval / needle-in-a-haystack accuracy by prompt length")
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, .gguf file or hub id")
    p.add_argument("--task", choices=TASKS, default="passkey",
                   help="passkey: the landmark-attention prompt; needle: corpus text as filler")
    p.add_argument("--corpus", default=None, help="needle task: filler corpus (default austen)")
    p.add_argument("--method", action="append", help="NAME or NAME:key=value:... (repeatable; 'none' = unpatched)")
    p.add_argument("--factor", type=float, help="factor for methods that take one")
    p.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384, 32768], help="prompt lengths in tokens")
    p.add_argument("--depths", type=_floats, default=list(DEPTHS), help="needle depths in [0, 1], comma-separated")
    p.add_argument("--trials", type=int, default=5, help="prompts (keys) per length and depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--out", help="write the results and settings as JSON here")
    p.set_defaults(func=cmd_passkey)


if __name__ == "__main__":  # python -m longctx.eval.passkey --model ... (same options as `longctx passkey`)
    import argparse

    _parser = argparse.ArgumentParser(prog="longctx")
    add_commands(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["passkey", *sys.argv[1:]])
    sys.exit(_args.func(_args))
