"""Shared timing for the benchmark scripts: median milliseconds of a callable."""

import statistics
import time

import torch


def median_ms(fn, n: int, device: torch.device, times: list | None = None) -> float:
    """Median wall time of ``fn()`` over ``n`` runs: CUDA events on a GPU, perf_counter elsewhere.
    ``times``: a list that receives every run's milliseconds."""
    times = [] if times is None else times
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
