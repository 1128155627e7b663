"""Measured peak memory vs longctx.estimate, one process. Target: every ratio within 15%.

    python benchmarks/estimate_check.py --model smollm2-135m --out benchmarks/results/estimate_check_smollm2.json
    python benchmarks/estimate_check.py --llama2-7b-layers 4 --out benchmarks/results/estimate_check_llama2-7b-4l.json
    python benchmarks/estimate_check.py --cpu-smoke            # tiny random llama on CPU, seconds

Cases, each measured from a clean state (weights on the device, nothing else):
  infer-L   a prefill: model(x, use_cache=True, logits_to_keep=1) under inference_mode, x = 1 x L
            random tokens (lengths --infer-lengths, default 8192, 32768); vs estimate(train=None)
  lora-L    one LoRA training step at L (--train-length, default 8192): LoRA r=8 alpha=16 on
            q,k,v,o plus trainable embedding and norms (longctx.lora.prepare when present, else
            the same with peft), gradient checkpointing (non-reentrant), the model in bf16, torch
            AdamW, loss on all positions. Step 1 creates the optimizer states; the peak of step 2
            is measured. vs estimate(train="lora")
Peak: torch.cuda.max_memory_allocated() on CUDA (allocated, not reserved: the estimate has no
allocator slack); what is allocated before any model (a warm-up matmul's cuBLAS workspace) is
included in "measured" and shown apart (the ratio without it is printed too). On CPU (--cpu-smoke, or --device cpu) a TorchDispatchMode counts the bytes of
every live tensor storage (weak references to the storages) and keeps the peak; it runs the same
code, so the smoke mode checks the script and the estimate's bookkeeping, not CUDA kernels.
Models: --model NAME (longctx.load_model: smollm2-135m, a folder, ...); --llama2-7b-layers N: a
Llama-2-7B-shaped model (h 4096, 32 heads, f 11008, V 32000) with N layers and random weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from longctx.estimate import PRESETS, estimate, human  # noqa: E402

TARGET = 0.15


class PeakTracker(TorchDispatchMode):
    """Live bytes of tensor storages created by ops inside the mode, and their peak."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _add(self, t):
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, n)

    def _free(self, n):
        self.current -= n

    def track(self, *objs):
        """Count tensors that already exist (e.g. a model's parameters and buffers)."""
        for obj in objs:
            tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module) else tree_flatten(obj)[0]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self._add(t)

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        return out


class Meter:
    """Peak allocated bytes of a block, on CUDA (allocator stats) or CPU (PeakTracker)."""

    def __init__(self, device, model):
        self.device, self.model, self.tracker = torch.device(device), model, None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker = PeakTracker()
            self.tracker.track(self.model)
            self.tracker.__enter__()
        return self

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker.reset_peak()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.tracker.__exit__(*exc)
            self.peak = self.tracker.peak


def build_model(args, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.cpu_smoke:
        cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=1000,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
        name = "tiny-llama"
    elif args.llama2_7b_layers:
        cfg = AutoConfig.for_model(**{**PRESETS["llama2-7b"], "num_hidden_layers": args.llama2_7b_layers,
                                      "max_position_embeddings": 4096})
        name = f"llama2-7b-shaped-{args.llama2_7b_layers}l"
    else:
        from longctx.models import load_model

        model, _ = load_model(args.model, dtype=dtype, device=device, attn_implementation="sdpa")
        return model, args.model
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), name


def free(model):
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_infer(args, L, device, dtype):
    model, name = build_model(args, device, dtype)
    x = torch.randint(3, model.config.vocab_size, (1, L), device=device)
    with Meter(device, model) as m:
        with torch.inference_mode():
            out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        del out
    est = estimate(model.config, L, dtype=args.dtype)
    free(model)
    return name, m.peak, est


def prepare_lora(model, r):
    try:
        from longctx.lora import prepare

        return prepare(model, r=r, alpha=2 * r, dropout=0.0, verbose=False)
    except ImportError:
        from peft import LoraConfig, get_peft_model

        names = [n for n, _ in model.named_parameters() if "embed_tokens" in n or "norm" in n]
        params = dict(model.named_parameters())
        chosen = [params[n] for n in names]
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                      task_type="CAUSAL_LM"))
        for p in chosen:
            p.requires_grad_(True)
        return peft_model


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing of every decoder layer (transformers' own)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def measure_lora(args, L, device, dtype):
    model, name = build_model(args, device, dtype)
    config = model.config
    model.config.use_cache = False
    model = prepare_lora(model, args.lora_r)
    enable_checkpointing(model)
    model.train()
    x = torch.randint(3, config.vocab_size, (1, L), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with Meter(device, model) as m:
        for step in range(2):
            if step == 1:
                m.reset()  # the optimizer states exist now; measure a steady-state step
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    est = estimate(config, L, train="lora", dtype=args.dtype, lora_r=args.lora_r)
    del opt
    free(model)
    return name, m.peak, est


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--llama2-7b-layers", type=int, default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny random llama on CPU, short lengths")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--infer-lengths", default=None, help="default 8192,32768 (smoke: 256,1024)")
    p.add_argument("--train-length", type=int, default=None, help="default 8192 (smoke: 512)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--skip", default="", help="comma-separated: infer, lora")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = args.device or ("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    infer = [int(x) for x in (args.infer_lengths or ("256,1024" if args.cpu_smoke else "8192,32768")).split(",") if x]
    train_len = args.train_length or (512 if args.cpu_smoke else 8192)
    skip = set(filter(None, args.skip.split(",")))
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu-smoke (or --device cpu)")
    hw = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})"

    overhead = 0
    if device == "cuda":  # cuBLAS workspaces etc.: allocated on first use, kept; reported apart
        a = torch.ones(256, 256, device=device, dtype=dtype)
        (a @ a).sum().item()
        del a  # freed before any case is measured: not part of what every measured peak holds
        torch.cuda.synchronize()
        overhead = torch.cuda.memory_allocated()
    rows = []
    cases = ([("infer", L, measure_infer) for L in infer] if "infer" not in skip else []) + \
            ([("lora", train_len, measure_lora)] if "lora" not in skip else [])
    for kind, L, fn in cases:
        t0 = time.time()
        try:
            name, peak, est = fn(args, L, device, dtype)
        except torch.OutOfMemoryError as err:
            rows.append({"case": f"{kind}-{L}", "error": f"OOM: {err}"[:200]})
            print(f"{kind}-{L}: OOM", file=sys.stderr)
            free(None)
            continue
        ratio = peak / est.total
        rows.append({"case": f"{kind}-{L}", "model": name, "measured": peak, "estimate": est.total,
                     "ratio": ratio, "ok": abs(ratio - 1) <= TARGET, "seconds": time.time() - t0,
                     "overhead": overhead, "ratio_without_overhead": (peak - overhead) / est.total,
                     "breakdown": est.breakdown(), "peak_phase": est.peak_phase})
        print(f"{kind}-{L}: measured {human(peak)}, estimate {human(est.total)}, ratio {ratio:.3f} "
              f"({time.time() - t0:.0f}s)", file=sys.stderr)

    print(f"\n{hw}, torch {torch.__version__}, dtype {args.dtype}; target: measured/estimate within 1 +- {TARGET}")
    print(f"allocated before any model (cuBLAS workspace, ...): {human(overhead)}; included in 'measured'")
    print("| case | model | measured | estimate | measured/estimate | without that | within 15% |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | - | {r['error']} | | | | |")
        else:
            print(f"| {r['case']} | {r['model']} | {human(r['measured'])} | {human(r['estimate'])} | "
                  f"{r['ratio']:.3f} | {r['ratio_without_overhead']:.3f} | {'yes' if r['ok'] else 'NO'} |")
    if args.out:
        import transformers

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args), "device": hw,
                                             "torch": torch.__version__, "transformers": transformers.__version__},
                                            indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
