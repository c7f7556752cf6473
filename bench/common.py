"""Shared helpers of the benchmark suites: device and version info, synchronised timing, and the
device's measured copy bandwidth (the yardstick for the memory-bound kernels)."""
from __future__ import annotations

import platform
import time

import torch

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

CUDA = torch.cuda.is_available()
needs_cuda = None
try:
    import pytest

    needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU benchmark: needs a CUDA device, none on this machine")
except ImportError:  # pragma: no cover
    pass


def device_info() -> dict:
    info = {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call of ``fn``, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device="cuda", nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * nbytes / t


def benchmark_record(benchmark, **extra) -> None:
    """Attach device, versions and the case's parameters to a pytest-benchmark result."""
    benchmark.extra_info.update(device_info())
    benchmark.extra_info.update(extra)
