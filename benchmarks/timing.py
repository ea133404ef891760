"""Device timing for the benchmarks: CUDA events on the GPU, the host clock elsewhere; the
matmul and copy ceilings each benchmark measures in its own process."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Per-step durations in ms: CUDA events on the GPU, the host clock after a sync elsewhere."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> "Timer":
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def ms(self) -> float:
        if self.device == "cuda":
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return (self.t1 - self.t0) * 1e3


def median_ms(device: str, fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls of ``fn`` after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            fn()
        times.append(timer.ms())
    return statistics.median(times)


def matmul_ceiling(device: str, n: int, repeats: int = 30) -> float:
    """TFLOP/s of an ``n^3`` bf16 matmul on random operands (median of ``repeats``)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            torch.matmul(a, b, out=out)
        times.append(timer.ms())
    del a, b, out
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def copy_ceiling(device: str, n_bytes: int, repeats: int = 20) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            dst.copy_(src)
        times.append(timer.ms())
    del src, dst
    return 2 * n_bytes / (statistics.median(times) * 1e-3) / 1e9
