"""Profile one LongLoRA training step (the longlora_step.py step) with torch.profiler: the top CUDA
kernels and CPU ops, to see where a case's time goes.

    python benchmarks/profile_step.py --model smollm2 --length 16384 --attention s2 --s2-backend sdpa --kernel cudnn
    python benchmarks/profile_step.py --cpu-smoke

Prints two tables (by device time and by CPU time, top --rows), plus the step's wall time with and
without the profiler: without it, the median of --steps steps (benchmarks/timing.py; one step alone can
carry a garbage collection or another host pause), with it one step. --trace writes a Chrome trace.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import longlora_step as ls  # noqa: E402
from timing import median_ms  # noqa: E402

import longctx  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama2-7b"])
    ap.add_argument("--llama2-7b-layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--attention", default="s2", choices=["full", "s2"])
    ap.add_argument("--s2-backend", default="sdpa", choices=["sdpa", "flex"])
    ap.add_argument("--kernel", default="cudnn", choices=list(ls.KERNELS))
    ap.add_argument("--compile", action="store_true", help="longctx.utils.compile_layers first")
    ap.add_argument("--compile-scope", choices=["parts", "layer"], default="parts",
                    help="with --compile: each layer's parts, or each whole layer")
    ap.add_argument("--steps", type=int, default=5, help="unprofiled steps timed after the warm-up (median)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    args.smollm2_random = True
    if args.cpu_smoke:
        device, amp_dtype, name, args.length = torch.device("cpu"), None, "tiny", 256
    else:
        device, amp_dtype, name = torch.device("cuda"), torch.bfloat16, args.model
    model, label, _ = ls.build_model(name, args, device)
    model = ls.prepare(model)
    if args.attention == "s2":
        longctx.apply(model, "s2attn", group_size_ratio=0.25, backend=args.s2_backend)
    if args.compile:
        longctx.utils.compile_layers(model, scope=args.compile_scope)
    x = torch.randint(3, model.config.vocab_size, (1, args.length), device=device)
    kernels = ls.sdpa_kernels(device, [args.kernel])
    from torch.nn.attention import sdpa_kernel
    ctx = sdpa_kernel([kernels[args.kernel]]) if device.type == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with ctx:
        step, _ = ls.make_step(model, x, amp_dtype, device)
        for _ in range(3):
            step()
        sync()
        steps_ms = []
        plain = median_ms(step, args.steps, device, steps_ms) / 1e3
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            t = time.perf_counter()
            step()
            sync()
            profiled = time.perf_counter() - t
    print(f"{label}, T={args.length}, {args.attention}" + (f" ({args.s2_backend})" if args.attention == "s2" else "")
          + f", SDPA {args.kernel}{f', compiled ({args.compile_scope})' if args.compile else ''}: step {plain * 1e3:.1f} ms "
          f"(median of {len(steps_ms)}: {', '.join(f'{t:.1f}' for t in steps_ms)}; "
          f"{profiled * 1e3:.1f} ms under the profiler)")
    avg = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(avg.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    print(avg.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
