"""One LongLoRA training step, S2-Attn against full attention: tokens/s and peak GPU memory.

    python benchmarks/longlora_step.py --models smollm2 --out benchmarks/results/longlora_step_smollm2_h100.json
    python benchmarks/longlora_step.py --models smollm2 --smollm2-random        # same config, random weights, no GGUF
    python benchmarks/longlora_step.py --models llama2-7b --llama2-7b-layers 32 --lengths 32768
    python benchmarks/longlora_step.py --models smollm2 --smollm2-random --compile eager,layers --kernels cudnn
    python benchmarks/longlora_step.py --cpu-smoke                              # CPU, tiny random llama, seconds

The step is the recipe's (recipes/longlora_finetune.py), micro batch 1:
  forward with labels (loss on every position) -> backward -> clip_grad_norm_(1.0) -> AdamW step -> zero_grad,
  LoRA+ (longctx.lora.prepare: LoRA r=8 alpha=16 on q/k/v/o, embedding and norms trainable, trainable
  tensors kept in fp32), non-reentrant gradient checkpointing, bf16 autocast (the recipe's mixed precision).
Models:
  smollm2     SmolLM2-135M (longctx.load_model("smollm2-135m")), weights fp32 as configs/smollm2/*.yaml;
              --smollm2-random: random weights with the same LlamaConfig (same compute, no GGUF file needed)
  llama2-7b   Llama-2-7B shape (hidden 4096, 32 heads, intermediate 11008, vocab 32000), random weights in
              bf16 as configs/llama2/*.yaml, --llama2-7b-layers N decoder layers (32 = the whole model)
Attention, in one process on the same model:
  full        transformers' SDPA attention under each SDPA kernel alone (cuDNN, flash, efficient; via
              torch.nn.attention.sdpa_kernel); the fastest is the reference
  none        (the bound, --attention full,s2,none) an attention function returning each token's own value:
              the step with attention that costs nothing; none / full = the most any S2 kernel could give
  s2          longctx.apply(model, "s2attn", group_size_ratio=0.25), one case per --s2-backends entry
              (auto: flex on CUDA, sdpa on CPU); the sdpa backend runs under each SDPA kernel alone;
              flex-autotune: flex with flex_mode="max-autotune-no-cudagraphs" (block sizes tuned per shape);
              flex-general / sdpa-general: flex / sdpa with the fast path turned off (the mask function
              returns no BlockMask; the attention function runs S2 per call, outside any compiled graph:
              the code before the fast path, which sdpa got later than flex)
Compilation (--compile, each variant a case of every attention above):
  eager       the recipe's default
  layers      longctx.train.compile_layers(model): every decoder layer's attention module, MLP and norms
              through torch.compile (the recipe's train.compile: true). S2 flex without padding or packed
              documents is traced into the attention module's graph; otherwise S2's attention breaks it
  whole       compile_layers(model, scope="layer"): each decoder layer as one compiled module
Each compiled case compiles afresh (torch._dynamo.reset(), inside its SDPA kernel choice).
Each case: --warmup steps first (excluded: flex compilation, allocator growth, optimizer state creation),
then the median of --steps steps (CUDA events; benchmarks/timing.py). Peak memory:
torch.cuda.max_memory_allocated over the measured steps (reset after warm-up). The RoPE scaling of the
recipe (linear x4) is left out: it changes no compute. A case that runs out of memory is reported as OOM.
Target (issue 4): S2 tokens/s >= 1.8 x full attention (fastest kernel, same compilation) at 32k. Prints a Markdown table;
--out writes JSON with the GPU name and library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
import longctx  # noqa: E402
from longctx import lora, train  # noqa: E402
from longctx.estimate import PRESETS  # noqa: E402

MODELS = ("smollm2", "llama2-7b")
ATTENTIONS = ("full", "s2", "none")
TARGET_SPEEDUP, TARGET_LENGTH = 1.8, 32768
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, tie_word_embeddings=True, max_position_embeddings=64)


# -- models ------------------------------------------------------------------------------------------
def random_model(config: dict, dtype, device):
    """A llama with random weights built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def build_model(name: str, args, device):
    """(model, label, weights dtype name) before LoRA."""
    if name == "tiny":
        return random_model(TINY, torch.float32, device), "tiny llama (random)", "fp32"
    if name == "smollm2":
        if args.smollm2_random:
            return random_model(PRESETS["smollm2-135m"], torch.float32, device), "SmolLM2-135M (random)", "fp32"
        model, _ = longctx.load_model("smollm2-135m", dtype=torch.float32, device=device, attn_implementation="sdpa")
        return model, "SmolLM2-135M", "fp32"
    if name == "llama2-7b":
        n = args.llama2_7b_layers
        config = {**PRESETS["llama2-7b"], "num_hidden_layers": n}
        return random_model(config, torch.bfloat16, device), f"Llama-2-7B shape, {n} layers (random)", "bf16"
    raise ValueError(f"--models: unknown model {name!r}; allowed: {', '.join(MODELS)}")


def prepare(model, checkpointing: bool = True):
    """LoRA+ as the recipe: LoRA r=8 on q/k/v/o, embedding and norms trainable (fp32), checkpointing."""
    model = lora.prepare(model, r=8, alpha=16, dropout=0.0, trainable=("embed", "norm"), verbose=False)
    lora.upcast_trainable(model)  # fp32 master copies of the trained tensors (the recipe under bf16)
    if checkpointing:
        train.enable_activation_checkpointing(model)
    model.config.use_cache = False
    model.train()
    return model


# -- one case ----------------------------------------------------------------------------------------
def _no_attention(module, query, key, value, attention_mask=None, **kwargs):
    """(B, H, T, D) -> (B, T, H, D): every token gets its own value (its K/V head's), no scores. Not a
    model: the time of a step whose attention is free, i.e. the floor any attention kernel leaves."""
    rep = query.shape[1] // value.shape[1]
    out = value.repeat_interleave(rep, 1) if rep > 1 else value
    return out.transpose(1, 2), None


def no_attention_name() -> str:
    from transformers import AttentionInterface
    AttentionInterface.register("longctx_bench_no_attention", _no_attention)
    return "longctx_bench_no_attention"


KERNELS = ("cudnn", "flash", "efficient")
COMPILES = ("eager", "layers", "whole")
# flex-autotune: flex_mode max-autotune-no-cudagraphs; flex-general: flex without the BlockMask fast path
S2_BACKENDS = ("auto", "sdpa", "flex", "flash", "flex-autotune", "flex-general", "sdpa-general")


def sdpa_kernels(device, wanted) -> dict:
    """name -> SDPA backend for the full-attention cases, those of ``wanted`` that this torch has
    (CPU: PyTorch's default choice only)."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"default": None}
    available = {"cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {k: available[k] for k in wanted if available[k] is not None}


def make_step(model, x, autocast_dtype, device):
    """A closure running one optimizer step on the (1, T) token batch ``x``; fresh AdamW per case."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())

    def step():
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def runtime_counts(device) -> dict:
    """Counters whose change across the timed steps says what else happened there: dynamo compiles and graph
    breaks (a recompile, or a frame falling back to eager), and the CUDA caching allocator's calls to
    cudaMalloc / cudaFree and its retries (each synchronizes the device)."""
    import torch._dynamo.utils
    counters = torch._dynamo.utils.counters
    out = {"dynamo_frames": sum(counters["frames"].values()), "graph_breaks": sum(counters["graph_break"].values())}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats()
        out.update({k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")})
    return out


def compile_seconds() -> dict:
    """Seconds spent so far in each of dynamo's timed compile phases (dynamo tracing, AOT autograd, inductor,
    triton autotuning, ...), summed over calls: the difference across a warm-up says where its time went."""
    import torch._dynamo.utils
    return {name: float(sum(times)) for name, times in torch._dynamo.utils.compilation_time_metrics.items()}


@contextlib.contextmanager
def gc_watch(record: dict):
    """Count Python's garbage collections (and their wall time, by generation) inside the block."""
    started = {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            g = f"gen{info['generation']}"
            record[f"gc_{g}_n"] = record.get(f"gc_{g}_n", 0) + 1
            record[f"gc_{g}_ms"] = record.get(f"gc_{g}_ms", 0.0) + (time.perf_counter() - started.pop("t")) * 1e3

    gc.callbacks.append(callback)
    try:
        yield record
    finally:
        gc.callbacks.remove(callback)


def run_case(model, T: int, attention: str, kernel, args, device, autocast_dtype, s2_backend="auto",
             compile="eager") -> dict:
    """Warm-up, then the median step time and the peak memory of ``attention`` at ``T`` tokens."""
    from torch.nn.attention import sdpa_kernel

    vocab = model.config.vocab_size
    x = torch.randint(3, vocab, (1, T), device=device, generator=torch.Generator(device).manual_seed(T))
    patch, restore = None, None
    if attention == "none":  # the bound: the same step with attention that costs nothing
        base = model.get_base_model()
        restore = base.config._attn_implementation
        base.set_attn_implementation(no_attention_name())
    s2_module = importlib.import_module("longctx.methods.s2attn")
    fast_devices = s2_module._FAST_PATH_DEVICES
    if attention == "s2":  # on the model inside the peft wrapper, like the recipe (there before LoRA)
        general = s2_backend.endswith("-general")
        extra = {"backend": "flex", "flex_mode": "max-autotune-no-cudagraphs"} if s2_backend == "flex-autotune" \
            else {"backend": s2_backend.removesuffix("-general")}
        if general:
            s2_module._FAST_PATH_DEVICES = ()
        patch = longctx.apply(model, "s2attn", group_size_ratio=0.25, **extra)
    step = optimizer = None
    gc_was_enabled = gc.isenabled()
    if compile != "eager":
        torch._dynamo.reset()  # trace afresh under this case's attention and SDPA kernel
        train.compile_layers(model, scope="layer" if compile == "whole" else "parts")
    try:
        with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
            step, optimizer = make_step(model, x, autocast_dtype, device)
            label = f"T={T} {attention}" + (f" {s2_backend}" if attention == "s2" else "") + f" {kernel} {compile}"
            compile_before = compile_seconds()
            started = time.perf_counter()
            warmup_steps_s = []
            for i in range(args.warmup):
                step_started = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                warmup_steps_s.append(round(time.perf_counter() - step_started, 2))
                print(f"  [{label}] warm-up step {i + 1}: {warmup_steps_s[-1]:.1f} s", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            warmup_s = time.perf_counter() - started
            compile_after = compile_seconds()
            compile_s = {k: round(v - compile_before.get(k, 0.0), 2) for k, v in compile_after.items()
                         if v - compile_before.get(k, 0.0) >= 0.05}
            if args.gc_off:  # no automatic collection inside the steps (the recipe's train.gc_every adds a young one per step)
                gc.collect()
                gc.disable()
            before = runtime_counts(device)
            steps_ms = []
            with gc_watch({}) as collections:
                ms = median_ms(step, args.steps, device, steps_ms)
            during = {f"{k}_in_steps": v - before[k] for k, v in runtime_counts(device).items()}
        row = {"ms": ms, "steps_ms": [round(t, 2) for t in steps_ms], "tokens_per_s": T / (ms / 1e3),
               "warmup_s": warmup_s, "warmup_steps_s": warmup_steps_s, "compile_s": compile_s, **collections, **during,
               "attn_implementation": model.get_base_model().config._attn_implementation}
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if patch is not None:
            row["s2_backend"] = patch._state.backend(device, 0.0, None) + (
                "-autotune" if patch.options.flex_mode else "") + ("-general" if s2_backend.endswith("-general") else "")
        return row
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as err:  # a kernel that cannot run this shape/dtype
        return {"error": f"{type(err).__name__}: {err}"[:200]}
    finally:
        if patch is not None:
            patch.remove()
        s2_module._FAST_PATH_DEVICES = fast_devices
        if restore is not None:
            model.get_base_model().set_attn_implementation(restore)
        if compile != "eager":
            train.uncompile_layers(model)
        if gc_was_enabled:
            gc.enable()
        del step, optimizer, x
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_model(name: str, args, device, autocast_dtype) -> list[dict]:
    model, label, weights = build_model(name, args, device)
    model = prepare(model, checkpointing=not args.no_checkpointing)
    counts = lora.trainable_summary(model)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    rows = []
    for T in args.lengths:
        kernels = sdpa_kernels(device, args.kernels).items() if "full" in args.attention else []
        cases = [("full", k, kernel, None) for k, kernel in kernels]
        cases += [("none", None, None, None)] if "none" in args.attention else []
        if "s2" in args.attention:
            for b in args.s2_backends:  # S2 through sdpa: under each SDPA kernel alone, as full attention
                if b in ("sdpa", "sdpa-general") and device.type == "cuda":
                    cases += [("s2", k, kernel, b) for k, kernel in sdpa_kernels(device, args.kernels).items()]
                else:
                    cases.append(("s2", None, None, b))
        for compile in args.compile:
            for attention, kname, kernel, backend in cases:
                row = dict(model=label, T=T, attention=attention, kernel=kname, compile=compile, weights=weights,
                           trainable=counts["trainable"], params=counts["total"], model_gib=weights_gib)
                if backend is not None:
                    row["s2_backend"] = backend  # as asked; run_case replaces "auto" by what it resolved to
                row.update(run_case(model, T, attention, kernel, args, device, autocast_dtype, backend or "auto",
                                    compile))
                print(json.dumps(row), flush=True)
                rows.append(row)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# -- report ------------------------------------------------------------------------------------------
def add_speedups(rows: list[dict]) -> None:
    """S2 rows get ``speedup`` = S2 tokens/s / the fastest full-attention tokens/s (same model, T, compile);
    the "none" row (attention that costs nothing) gets the same ratio: the most any attention could give."""
    for r in rows:
        if r["attention"] not in ("s2", "none") or "tokens_per_s" not in r:
            continue
        full = [f["tokens_per_s"] for f in rows if f["model"] == r["model"] and f["T"] == r["T"]
                and f.get("compile", "eager") == r.get("compile", "eager")
                and f["attention"] == "full" and "tokens_per_s" in f]
        if full:
            r["speedup"] = r["tokens_per_s"] / max(full)
            if r["T"] == TARGET_LENGTH and r["attention"] == "s2":
                r["target_met"] = r["speedup"] >= TARGET_SPEEDUP


def format_table(rows: list[dict]) -> str:
    lines = ["| model | T | compile | attention | kernel | step ms | tokens/s | peak GiB | S2 / full (fastest) |",
             "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        kernel = "/".join(x for x in (r.get("s2_backend"), r["kernel"]) if x) or "-"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['T']} | {r.get('compile', 'eager')} | {r['attention']} | {kernel} | "
                         f"{r['error'][:60]} | | | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        ratio = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        if "target_met" in r:
            ratio += f" (target >= {TARGET_SPEEDUP}x: {'met' if r['target_met'] else '**missed**'})"
        lines.append(f"| {r['model']} | {r['T']} | {r.get('compile', 'eager')} | {r['attention']} | {kernel} | {r['ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {peak} | {ratio} |")
    return "\n".join(lines)


def environment(device) -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "peft", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    return {"device": name, "versions": versions}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama2-7b", help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--smollm2-random", action="store_true", help="SmolLM2's LlamaConfig with random weights")
    ap.add_argument("--llama2-7b-layers", type=int, default=32,
                    help="decoder layers of the Llama-2-7B shape (32: the whole model)")
    ap.add_argument("--lengths", default="16384,32768", help="comma-separated sequence lengths")
    ap.add_argument("--attention", default="full,s2", help=f"comma-separated, of: {', '.join(ATTENTIONS)}")
    ap.add_argument("--kernels", default=",".join(KERNELS),
                    help="SDPA kernels tried for full attention, each alone (the fastest is the reference)")
    ap.add_argument("--s2-backends", default="auto",
                    help="comma-separated s2attn backends, each a case (auto: flex on CUDA, sdpa on CPU); "
                         "on CUDA, sdpa runs once under each of --kernels; flex-autotune: flex with "
                         "flex_mode='max-autotune-no-cudagraphs'")
    ap.add_argument("--compile", default="eager",
                    help=f"comma-separated, of: {', '.join(COMPILES)} (layers: longctx.train.compile_layers)")
    ap.add_argument("--gc-off", action="store_true",
                    help="no automatic Python garbage collection during the timed steps (collected before)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="no activation checkpointing (the recipe's train.gradient_checkpointing: false)")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (flex compiles in the first)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, a tiny random llama, T=128,256, fp32, 1 warm-up + 2 steps: checks the code paths")
    ap.add_argument("--dump-stacks", type=float, default=0, metavar="SECONDS",
                    help="print every thread's Python stack to stderr every SECONDS (faulthandler): where a long "
                         "warm-up or a hang is")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.attention = [a.strip() for a in args.attention.split(",")]
    bad = [a for a in args.attention if a not in ATTENTIONS]
    if bad:
        ap.error(f"--attention: unknown {bad}; allowed: {', '.join(ATTENTIONS)}")
    args.kernels = [k.strip() for k in args.kernels.split(",")]
    bad = [k for k in args.kernels if k not in KERNELS]
    if bad:
        ap.error(f"--kernels: unknown {bad}; allowed: {', '.join(KERNELS)}")
    args.s2_backends = [b.strip() for b in args.s2_backends.split(",")]
    bad = [b for b in args.s2_backends if b not in S2_BACKENDS]
    if bad:
        ap.error(f"--s2-backends: unknown {bad}; allowed: {', '.join(S2_BACKENDS)}")
    args.compile = [c.strip() for c in args.compile.split(",")]
    bad = [c for c in args.compile if c not in COMPILES]
    if bad:
        ap.error(f"--compile: unknown {bad}; allowed: {', '.join(COMPILES)}")
    args.models = [m.strip() for m in args.models.split(",")]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; allowed: {', '.join(MODELS)}")
    if args.llama2_7b_layers < 1 or args.warmup < 0 or args.steps < 1:
        ap.error("--llama2-7b-layers and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dump_stacks > 0:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_stacks, repeat=True, file=sys.stderr)
    if args.cpu_smoke:
        device, autocast_dtype = torch.device("cpu"), None  # fp32: no autocast
        args.models, args.lengths, args.warmup, args.steps = ["tiny"], [128, 256], 1, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu-smoke for a CPU run")
        device, autocast_dtype = torch.device("cuda"), torch.bfloat16
    started = time.perf_counter()
    rows = [row for name in args.models for row in run_model(name, args, device, autocast_dtype)]
    add_speedups(rows)
    env = environment(device)
    meta = {**env, "autocast": "bf16" if autocast_dtype else "none (fp32)", "micro_batch": 1,
            "gradient_checkpointing": not args.no_checkpointing, "lora": {"r": 8, "alpha": 16, "trainable": ["embed", "norm"]},
            "s2attn": {"group_size_ratio": 0.25, "backends": args.s2_backends}, "compile": args.compile, "gc_off": args.gc_off,
            "warmup": args.warmup,
            "steps": args.steps, "target": f"S2 tokens/s >= {TARGET_SPEEDUP}x full attention at {TARGET_LENGTH}",
            "wall_s": round(time.perf_counter() - started, 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"\n{env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
          + f"; autocast {meta['autocast']}, micro batch 1, gradient checkpointing "
          + ("off" if args.no_checkpointing else "on") + ", LoRA+ r=8")
    print(f"Target (issue 4): S2 >= {TARGET_SPEEDUP}x the tokens/s of full attention (fastest kernel) at "
          f"{TARGET_LENGTH}" + ("" if TARGET_LENGTH in args.lengths else " (not in this run's lengths)"))
    print()
    print(format_table(rows))
    return {"meta": meta, "results": rows}


if __name__ == "__main__":
    main()
