"""Multi-turn streaming chat on a bounded sink cache, and the ``generate`` / ``chat`` commands.

    session = StreamingSession(model, tokenizer, sink_size=4, window_size=2044)
    for piece in session.chat("Tell me about Emma Woodhouse.", max_new_tokens=200):
        print(piece, end="", flush=True)

Each turn feeds only the new tokens (the cache holds the conversation so far), first making room
for the prompt plus ``max_new_tokens`` so that nothing is evicted while the reply is generated.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
import warnings
from typing import Iterator

import torch

from .methods.streaming import SinkCache, check_sizes, prefill


class StreamingSession:
    def __init__(self, model, tokenizer, sink_size: int = 4, window_size: int = 2044, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cache = SinkCache(model, sink_size, window_size)
        self.cache.managed = True  # this session makes room and sets positions itself
        self.messages = [{"role": "system", "content": system}] if system else []
        self.fed_text = ""  # the rendered conversation whose tokens are in the cache (or evicted)
        self.last_logits: torch.Tensor | None = None

    def __setstate__(self, state: dict) -> None:
        # torch.save / pickle keep a SinkCache's model out of it (see SinkCache), and the patch's forward, which
        # binds a loaded cache, leaves this session's managed cache alone: bound here to the session's model
        self.__dict__.update(state)
        self._bind()

    def _bind(self) -> None:
        """Bind a loaded cache (or one bound to another model: it moves after ``SinkCache.bind``'s checks) to the
        session's model; a session saved without its model (``model = None``, to
        keep the weights out of the file) loads, and binds on its next turn once ``session.model`` is set."""
        if isinstance(self.cache, SinkCache) and self.model is not None:
            self.cache._bind_for(self.model)

    def eos_ids(self) -> set[int]:
        """Ids that end a reply: the tokenizer's eos and the model's generation_config eos ids (end-of-turn
        tokens such as Phi-3's <|end|> or Gemma's <end_of_turn> are often declared only there)."""
        config = getattr(self.model, "generation_config", None)
        return eos_set(self.tokenizer.eos_token_id) | eos_set(getattr(config, "eos_token_id", None))

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed token ids (1, n) in window-sized pieces; returns the logits of the last token (V,)."""
        self._bind()
        device = next(self.model.parameters()).device
        step = self.cache.window_size
        for start in range(0, ids.shape[1], step):
            x = ids[:, start:start + step].to(device)
            self.cache.to_device(device)
            self.cache.make_room(x.shape[1], device=device)
            positions = self.cache.places[:, -x.shape[1]:]
            out = self.model(x, past_key_values=self.cache, position_ids=positions, use_cache=True)
            self.last_logits = out.logits[0, -1]
        return self.last_logits

    def _new_text(self, rendered: str) -> str:
        """The part of ``rendered`` (the whole conversation as the template renders it now) that the cache
        does not hold yet: what follows the longest common prefix with the text fed so far, where whitespace
        on either side may differ (whitespace fed that the rendering lacks: ``content | trim`` drops a
        reply's trailing newline; whitespace rendered that the fed text lacks: a SentencePiece decoder drops
        the space of a reply's first token, "▁w5" decodes to "w5", while the cache holds it). Templates may
        also render earlier turns differently from what was fed (Qwen3 drops earlier reasoning); the cache
        keeps what was fed (the model's own text) and only the rest is fed, from the start of the word where
        they differ (a word of letters and digits, at most 32 characters back), never the whole conversation
        again. A template that rewrites an earlier reply (Qwen3) still gets that reply's rendering fed once
        more after it: the cache cannot drop text from its middle. A warning says so."""
        fed = self.fed_text
        i, j = self._align(fed, rendered)
        if not fed[i:].strip():  # all that was fed is there, up to whitespace
            return rendered[j:]
        # they differ inside a word of what was fed ("w100" fed, "w5" rendered): start the new piece at that
        # word (at most 32 characters back), so that no token is cut
        k = j
        while k > 0 and j - k < 32 and rendered[k - 1].isalnum():
            k -= 1
        if k > 0 and rendered[k - 1].isalnum():
            k = j  # no boundary near: feed from the difference
        warnings.warn(f"StreamingSession: the chat template renders the conversation differently from what "
                      f"the cache holds ({len(fed) - i} characters from character {i} differ); the cache "
                      f"keeps what was fed and gets the rest of the conversation from there", stacklevel=3)
        return rendered[k:]

    @staticmethod
    def _align(fed: str, rendered: str) -> tuple[int, int]:
        """How far ``fed`` and ``rendered`` agree, whitespace present on one side only skipped: (i, j)
        with fed[:i] matching rendered[:j]."""
        i = j = 0
        while i < len(fed) and j < len(rendered):
            common = len(os.path.commonprefix([fed[i:i + 4096], rendered[j:j + 4096]]))
            if common:
                i, j = i + common, j + common
            elif fed[i].isspace():
                i += 1
            elif rendered[j].isspace():
                j += 1
            else:
                break
        return i, j

    def _ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as it tokenizes where it goes: at the start of the conversation, or in its
        middle, after a special token (the tokenizer's eos): a SentencePiece tokenizer (Metaspace,
        prepend_scheme="first") gives text tokenized on its own a word-start "▁" that it has not in the
        middle of the conversation ("</s>[INST]" is "</s>", "[", "INST]", not "▁[INST]")."""
        tok = self.tokenizer
        anchor = tok.eos_token if isinstance(getattr(tok, "eos_token", None), str) else None
        if not self.fed_text or not anchor or not text:
            return list(tok(text, add_special_tokens=False)["input_ids"])
        head = list(tok(anchor, add_special_tokens=False)["input_ids"])
        ids = list(tok(anchor + text, add_special_tokens=False)["input_ids"])
        if ids[:len(head)] != head:  # the anchor does not stand apart: tokenize the text alone
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return ids[len(head):]

    def _feed_text(self, rendered: str, new: str | None = None) -> None:
        """Feed what the cache lacks of ``rendered`` (``new``: that part, if already worked out)."""
        new = self._new_text(rendered) if new is None else new
        ids = self._ids(new)
        if ids:
            self.feed(torch.tensor([ids], dtype=torch.long))
        self.fed_text = rendered

    def chat(self, message: str, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Add a user turn and stream the reply's text as it is generated."""
        check_sampling(max_new_tokens, temperature, top_p, "StreamingSession.chat")
        prompt = self.tokenizer.apply_chat_template(self.messages + [{"role": "user", "content": message}],
                                                    add_generation_prompt=True, tokenize=False)
        self.messages.append({"role": "user", "content": message})
        new = self._new_text(prompt)
        n_new = len(self._ids(new))
        # evict up front: nothing is evicted mid-reply while prompt + reply fit the window (beyond it, the
        # window slides during the reply as in any streaming generation)
        self._bind()
        self.cache.reserve(n_new + max_new_tokens)
        self._feed_text(prompt, new)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = self.eos_ids()
        reply_ids, shown = [], ""
        for _ in range(max_new_tokens):
            token = sample(self.last_logits, temperature, top_p, generator)
            if token in eos:
                break
            reply_ids.append(token)
            text = self.tokenizer.decode(reply_ids)  # exactly what the cache holds
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                yield text[len(shown):]
                shown = text
            self.feed(torch.tensor([[token]]))
        reply = self.tokenizer.decode(reply_ids)
        if len(reply) > len(shown):
            yield reply[len(shown):]
        self.fed_text = prompt + reply  # what the cache holds now
        self.messages.append({"role": "assistant", "content": reply})
        # close the assistant turn in the cache the way the template renders it
        self._feed_text(self.tokenizer.apply_chat_template(self.messages, tokenize=False))


def stream_generate(model, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                    generator=None, eos_token_id: int | list[int] | None = None, ignore_eos: bool = False,
                    decoder: bool = False, compile: bool | dict = False) -> Iterator[int]:
    """Generate from ``ids`` (1, n) on a model with the ``streaming`` patch: yields the new token ids.

    The prompt goes into a fresh sink cache in chunks as ``model.generate`` feeds it under the patch
    (window-sized chunks, the last ``window_size`` tokens as one), then tokens are sampled (``sample``:
    greedy at temperature 0, else nucleus sampling with ``top_p``) and fed one at a time. Generation
    stops after ``max_new_tokens`` or at an ``eos_token_id`` (an id or a list; not yielded; None, the default:
    no eos, unlike ``model.generate``, which stops at ``model.generation_config.eos_token_id``: pass that
    or ``tokenizer.eos_token_id`` to stop there too). With
    ``ignore_eos`` those ids are never sampled instead, as ``min_new_tokens`` does in ``model.generate``.
    No logits processor of ``model.generation_config`` (repetition penalty, top-k, ...) is applied: with
    greedy decoding and a neutral generation config the tokens are ``model.generate``'s (tested).

    With ``decoder=False`` every step goes through the SinkCache, as ``model.generate`` does. With
    ``decoder=True``, once the cache is full the steps go through a ``SinkDecoder`` (static ring
    buffers, one CUDA graph per step on CUDA; ``compile``: also torch.compile, see SinkDecoder): the same
    tokens, faster on a GPU. Per token on the H100 (7B shape, cache 4096, benchmarks/README.md): 21-48 ms
    through the SinkCache, 9.0 ms as a graph, 6.9 ms compiled, 6.2 ms with ``compile={"mode":
    "max-autotune-no-cudagraphs"}``; SmolLM2-135M with a 1024-token cache: 3.3 ms against 25-33 ms
    (experiments/streaming_generate). Tokens decoded before the cache is full go through the SinkCache.
    Greedy decoding is pipelined (``greedy_loop``): the next step is queued before the host reads a token.
    Arguments are checked when this is called, before the first token.
    """
    from .methods.sink_decoder import check_compile, check_supported
    from .registry import active_patches, check_language_model

    check_language_model(model, "stream_generate")
    patch = next((p for p in active_patches(model) if p.method == "streaming"), None)
    if patch is None:
        raise ValueError("stream_generate needs the streaming patch: longctx.apply(model, 'streaming', ...)")
    check_sampling(max_new_tokens, temperature, top_p, "stream_generate")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"stream_generate: ids must have shape (1, n) with n >= 1, got {tuple(ids.shape)}")
    if compile is not False and not decoder:
        raise ValueError("stream_generate: compile applies to the SinkDecoder; pass decoder=True with it")
    check_compile(compile)
    cache = patch.new_cache()
    if decoder:
        check_supported(cache)
    eos = eos_set(eos_token_id, "stream_generate: eos_token_id")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if ignore_eos and vocab is not None and any(not 0 <= t < vocab for t in eos):
        raise ValueError(f"stream_generate: with ignore_eos, eos_token_id must be token ids in [0, {vocab}), "
                         f"got {sorted(eos)}")
    return _stream(model, cache, ids, max_new_tokens, temperature, top_p, generator, eos, ignore_eos, decoder, compile)


@torch.inference_mode()
def _stream(model, cache, ids, max_new_tokens, temperature, top_p, generator, eos, ignore_eos, decoder, compile):
    from .methods.sink_decoder import SinkDecoder, is_full

    device = next(model.parameters()).device
    ids = ids.to(device)
    head = max(0, ids.shape[1] - cache.window_size)  # chunked as the patch chunks a long prompt in generate
    if head:
        prefill(model, ids[:, :head], cache)
    logits, dec = model(ids[:, head:], past_key_values=cache, use_cache=True).logits[0, -1], None

    def feed(x):  # (1, 1) token on the device -> the next logits (vocab,)
        nonlocal dec
        if decoder and dec is None and is_full(cache):
            # the cache is this function's own: the decoder is dropped at the end, never handed back
            dec = SinkDecoder(model, cache, compile=compile)
        return (dec.step(x) if dec is not None else model(x, past_key_values=cache, use_cache=True).logits)[0, -1]

    ban = sorted(eos) if ignore_eos else []
    if temperature <= 0:
        yield from greedy_loop(logits, feed, max_new_tokens, eos=eos, ban=ban)
        return
    for i in range(max_new_tokens):
        if ban:
            logits = logits.clone()  # (the decoder's logits are its static output buffer)
            logits[ban] = float("-inf")
        token = sample(logits, temperature, top_p, generator)
        if token in eos:
            return
        yield token
        if i == max_new_tokens - 1:
            return  # the last token is not fed (as in model.generate)
        logits = feed(torch.tensor([[token]], device=device))


def greedy_loop(logits: torch.Tensor, feed, n: int, eos=(), ban=()) -> Iterator[int]:
    """Greedy decoding from ``logits`` (vocab,), pipelined: yields up to ``n`` token ids (ints); stops
    before an id in ``eos``; ids in ``ban`` are never chosen. ``feed(token)`` takes a (1, 1) token on the
    device and returns the next logits (vocab,).

    The token never goes through the host on its way back in: its argmax is fed on the device, and the
    next step is queued *before* the host reads the token (a non-blocking copy into pinned memory,
    waited for by an event). So the GPU always has the next step queued while the host checks eos and
    yields, and a CUDA graph's launch time overlaps the previous step. When eos comes, that one step
    ran for nothing (its result is dropped). The tokens are those of the plain loop: feed, sync, read."""
    if n <= 0:
        return
    device = logits.device
    cuda = device.type == "cuda"
    ban_idx = torch.tensor(list(ban), dtype=torch.long, device=device) if len(ban) else None
    host = torch.empty(1, dtype=torch.long, pin_memory=cuda)
    done = torch.cuda.Event() if cuda else None
    for i in range(n):
        if ban_idx is not None:
            logits = logits.index_fill(0, ban_idx, float("-inf"))  # a copy: the decoder's logits are its buffer
        token = logits.argmax().view(1, 1)
        host.copy_(token.view(1), non_blocking=cuda)
        if cuda:
            done.record()
        if i < n - 1:
            logits = feed(token)  # queued before the host waits for this token
        if cuda:
            done.synchronize()
        t = int(host[0])
        if t in eos:
            return
        yield t


def eos_set(eos, what: str = "eos_token_id") -> set[int]:
    """An eos id, a list/tuple/set of them, a tensor or numpy array of them, or None -> a set of ints."""
    if eos is None:
        return set()
    if torch.is_tensor(eos) or type(eos).__module__ == "numpy":
        eos = eos.tolist()
    items = eos if isinstance(eos, (list, tuple, set, frozenset)) else [eos]
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in items):
        raise TypeError(f"{what} must be a token id or a list of them, got {eos!r}")
    return {int(t) for t in items}


def check_sampling(max_new_tokens, temperature, top_p, where: str) -> None:
    """max_new_tokens an integer >= 0, temperature a finite number >= 0 (0: greedy), top_p in (0, 1]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"{where}: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"{where}: temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"{where}: top_p must be a number in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """Greedy for temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


# -- commands ------------------------------------------------------------------------------------------
def _methods(args) -> list[tuple[str, dict]]:
    """The --method values as (name, options), every option checked (SystemExit naming the method)."""
    from . import registry
    from .cli import parse_method

    out, slots = [], {}
    for spec in args.method or []:
        _, name, options = parse_method(spec, None, factor_hint="NAME:factor=F")  # (these commands have no --factor)
        if name != "none":
            method = registry.get_method(name)
            try:
                registry.make_options(method, **options)
            except (ValueError, TypeError) as err:
                raise SystemExit(f"--method {spec!r}: {err}") from None
            if method.name == "s2attn" and options.get("train_only", True) is not False:
                raise SystemExit(f"--method {spec!r}: s2attn is active only in training (train_only=True) and the "
                                 f"model generates in eval mode, so it would change nothing; use "
                                 f"s2attn:train_only=false to generate with S2-Attn")
            slot = method.patch.slot  # registry.apply would refuse the second only once the model has loaded
            if slot in slots:
                other_spec, other = slots[slot]
                raise SystemExit(f"--method {spec!r}: {name!r} and {other!r} (--method {other_spec!r}) both change "
                                 f"the model's {slot}; give only one of them")
            slots[slot] = (spec, name)
            out.append((name, options))
    return out


def _load(args):
    from .cli import apply_method, load_model_or_exit

    methods = _methods(args)  # before the slow load
    model, tokenizer = load_model_or_exit(args)
    for name, options in methods:
        apply_method(model, name, name, options)
    return model, tokenizer


# generation_config settings that model.generate applies and stream_generate does not
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None}


def cmd_generate(args) -> int:
    try:  # before the slow load; a message, not a traceback
        check_sampling(args.max_new_tokens, args.temperature, args.top_p, "longctx generate")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    _check_top_p(args, "longctx generate")
    if args.decoder and not any(spec.split(":")[0] == "streaming" for spec in args.method or []):
        raise SystemExit("longctx generate: --decoder needs --method streaming[:sink_size=N:window_size=M]")
    if args.prompt == "" and not args.chat_template:  # (before the slow load; text that tokenizes to nothing is
        # refused after it; with --chat-template an empty message still makes a prompt: the template's tokens)
        raise SystemExit("longctx generate: the prompt is empty (0 tokens): give --prompt TEXT or text on stdin")
    model, tokenizer = _load(args)
    if args.chat_template:
        check_chat_template(tokenizer, args.model, "longctx generate --chat-template")
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    if ids.shape[1] == 0:
        raise SystemExit("longctx generate: the prompt is empty (0 tokens): give --prompt TEXT or text on stdin")
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_set = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    start = time.perf_counter()
    if args.decoder:  # the streaming patch's sink cache, decoded through a SinkDecoder once full
        active = {k: getattr(config, k, None) for k, neutral in _PROCESSORS.items()
                  if getattr(config, k, None) not in (None, neutral)}
        if active:
            print(f"longctx generate: --decoder applies none of the model's generation_config processors "
                  f"({active}); model.generate (no --decoder) would", file=sys.stderr)
        compile = {"mode": "max-autotune-no-cudagraphs"} if args.decoder == "autotune" else args.decoder == "compile"
        new = list(stream_generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                   eos_token_id=list(eos_set), ignore_eos=args.ignore_eos, decoder=True,
                                   compile=compile))
    elif args.max_new_tokens == 0:  # model.generate refuses 0 (a ValueError after the load): nothing to generate
        new = []
    else:  # top_k=0: only --temperature and --top-p shape the sampling, as on the --decoder path (greedy: not
        # passed, transformers warns of a sampling flag given without sampling)
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=args.temperature > 0, temperature=args.temperature or None,
                             top_p=args.top_p, **({"top_k": 0} if args.temperature > 0 else {}),
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=sorted(eos_set) or None,  # the --decoder path's: the tokenizer's where
                             # generation_config has none
                             min_new_tokens=args.max_new_tokens if args.ignore_eos else None)[0, ids.shape[1]:].tolist()
        if new and new[-1] in eos_set:
            new = new[:-1]  # counted and printed like the --decoder path, which never yields it
    seconds = time.perf_counter() - start
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{ids.shape[1]} prompt tokens, {len(new)} new in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s, "
          f"prefill and any compilation included]", file=sys.stderr)
    return 0


def _check_top_p(args, where: str) -> None:
    """--top-p shapes sampling only: with greedy decoding (--temperature 0) it would change nothing."""
    if args.top_p != 1 and args.temperature == 0:
        raise SystemExit(f"{where}: --top-p applies to sampling only (--temperature > 0); at --temperature 0 "
                         f"decoding is greedy")


def check_chat_template(tokenizer, model: str, where: str) -> None:
    """A SystemExit (before any input is read) if ``tokenizer`` has no chat template to render turns with."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SystemExit(f"{where}: the tokenizer of {model} has no chat template (a base model?); use a model "
                         f"with one, or `longctx generate` (without --chat-template) for plain text")


def chat_sizes(args) -> tuple[int, int]:
    """The session's cache sizes: --sink-size/--window-size, or the options of a ``--method streaming:...``
    (which the session's own cache replaces: it is taken out of args.method); both at once must agree."""
    from .cli import parse_method

    specs = [m for m in args.method or [] if m.split(":")[0] == "streaming"]
    args.method = [m for m in args.method or [] if m.split(":")[0] != "streaming"]
    sizes = {"sink_size": args.sink_size, "window_size": args.window_size}
    for spec in specs:
        options = parse_method(spec, None)[2]
        unknown = sorted(set(options) - set(sizes))
        if unknown:
            raise SystemExit(f"longctx chat: --method streaming takes sink_size and window_size here, got {unknown}")
        for key, value in options.items():
            if sizes[key] is not None and sizes[key] != value:
                raise SystemExit(f"longctx chat: {key} is {sizes[key]} from one option and {value} from another")
            sizes[key] = value
    sizes = (4 if sizes["sink_size"] is None else sizes["sink_size"],
             2044 if sizes["window_size"] is None else sizes["window_size"])
    try:
        check_sizes(*sizes)  # before the slow load
    except ValueError as err:
        raise SystemExit(f"longctx chat: {err}") from None
    return sizes


def cmd_chat(args) -> int:
    try:  # before the slow load; a message, not a traceback
        check_sampling(args.max_new_tokens, args.temperature, args.top_p, "longctx chat")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    _check_top_p(args, "longctx chat")
    sink_size, window_size = chat_sizes(args)
    args.sink_size, args.window_size = sink_size, window_size
    model, tokenizer = _load(args)
    check_chat_template(tokenizer, args.model, "longctx chat")
    session = StreamingSession(model, tokenizer, args.sink_size, args.window_size, system=args.system)
    print(f"longctx chat: {args.model}, cache {args.sink_size} sinks + {args.window_size} window. "
          f"Ctrl-D to quit.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            continue
        for piece in session.chat(line.strip(), max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p):
            print(piece, end="", flush=True)
        print(f"\n[cache {session.cache.get_seq_length()} tokens, {session.cache.seen_tokens} seen]",
              file=sys.stderr)
    return 0


def _common(p):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", action="append", help="NAME or NAME:key=value:... (repeatable), e.g. "
                   "streaming:sink_size=4:window_size=2044 or yarn:factor=4")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="patch a model (any methods) and generate from a prompt")
    _common(p)
    p.add_argument("--prompt", help="the prompt text (default: read stdin)")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens (timing)")
    p.add_argument("--decoder", choices=["graph", "compile", "autotune"], default=None,
                   help="with --method streaming: once the cache is full, decode through longctx.SinkDecoder "
                        "(static ring buffers, a CUDA graph per step on CUDA; compile: plus torch.compile; "
                        "autotune: torch.compile mode max-autotune-no-cudagraphs). Default: model.generate. "
                        "Greedy tokens are the same; generation_config's processors (repetition penalty ...) "
                        "are not applied")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat on a bounded sink cache (StreamingSession)")
    _common(p)
    p.add_argument("--sink-size", type=int, default=None, help="attention sinks (default 4; or --method "
                   "streaming:sink_size=N)")
    p.add_argument("--window-size", type=int, default=None, help="recent-token window (default 2044; or --method "
                   "streaming:window_size=N)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)
