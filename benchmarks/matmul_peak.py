"""Dense matmul throughput of this GPU: the ceiling the compute bounds in benchmarks/README.md use.

    python benchmarks/matmul_peak.py --out benchmarks/results/matmul_peak_h100.json     # H100, bf16
    python benchmarks/matmul_peak.py --cpu-smoke --out /tmp/mm.json                       # code path only

Times C = A @ B for square n x n matrices (A, B: (n, n), 2 n^3 FLOPs) after a warm-up, median of --repeats
runs of --inner back-to-back matmuls, and prints TFLOP/s per size; the largest is the figure quoted as
"the measured bf16 matmul speed".
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4096,8192,16384", help="comma-separated n of the n x n matmuls")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=20, help="matmuls per timed run")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    sizes = [64, 128] if args.cpu_smoke else [int(n) for n in args.sizes.split(",")]
    dtype = torch.float32 if args.cpu_smoke else DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
    rows = []
    for n in sizes:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))   # (n, n)
        c = torch.empty(n, n, dtype=dtype, device=device)

        def run():
            for _ in range(args.inner):
                torch.mm(a, b, out=c)
        run()                                                                        # warm-up
        times = []
        ms = median_ms(run, args.repeats, device, times)
        tflops = 2 * n**3 * args.inner / (ms / 1e3) / 1e12
        rows.append({"n": n, "ms_per_run": ms, "runs_ms": times, "tflops_per_s": tflops})
        print(f"n={n}: {ms / args.inner:.3f} ms per matmul, {tflops:.1f} TFLOP/s")
    meta = {"device": gpu, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
            "repeats": args.repeats, "inner": args.inner}
    print(f"\n{gpu} | torch {torch.__version__} | {meta['dtype']} | median of {args.repeats} runs of "
          f"{args.inner} matmuls\n\n| n | TFLOP/s |\n|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['tflops_per_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
