"""Shared helpers of the benchmark suites: device and version info, synchronised timing, and the
device's measured copy bandwidth (the yardstick for the memory-bound kernels)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re

import torch

from eeruntime.timing import median_seconds

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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device=None) -> str:
    """What ``device`` is: a CUDA device's GPU name, else the CPU's (model and cores); by default
    the GPU where CUDA is available."""
    if device is None:
        device = "cuda" if CUDA else "cpu"
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def device_info() -> dict:
    info = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def time_fn(fn, device="cpu", warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call of ``fn``, synchronising the device around each call."""
    return median_seconds(fn, torch.device(device), warmup=warmup, iters=iters)


def per_call_seconds(fn, target_s: float = 0.05, max_inner: int = 1000) -> tuple:
    """(seconds per call, inner) of a CUDA ``fn``: the median of 5 batches of ``inner``
    back-to-back calls timed with CUDA events, ``inner`` chosen so a batch lasts about ``target_s``."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    inner = int(min(max_inner, max(1, target_s / once)))
    times = []
    for _ in range(5):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    times.sort()
    return times[len(times) // 2], inner


def capture_graph(fn, pool=None, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``fn`` (warmed up on a side stream first, as the PyTorch docs require)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def graph_per_call_seconds(fn, inner: int = 200, target_s: float = 0.05) -> float:
    """Seconds per call of a CUDA ``fn`` as a captured CUDA graph runs it: ``inner`` calls captured
    into one graph (``capture_graph``), the graph replayed back to back and timed with CUDA events
    (``per_call_seconds``), divided by ``inner``. The host's Python, dispatch and launch costs are
    out of the loop: this is what the device runs when the runtime's graph executor replays the op."""

    def calls():
        for _ in range(inner):
            fn()

    graph = capture_graph(calls, warmup=1)
    t, _ = per_call_seconds(graph.replay, target_s=target_s, max_inner=100)
    del graph
    return t / inner


COPY_BYTES = 1 << 30  # 1 GiB: a copy long enough (~0.3 ms on an H100) that launch costs vanish


def copy_bandwidth(device="cuda", nbytes: int = COPY_BYTES) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted).

    Timed with CUDA events around back-to-back copies (``per_call_seconds``), not by wall clock
    around one synchronised copy: on a copy this short the launch and the sync would be counted as
    copy time and under-read the bandwidth, inflating every "fraction of copy bandwidth". The
    buffers shrink (by halves, down to 256 MiB) only when 2 x ``nbytes`` does not fit in free memory.
    """
    free, _ = torch.cuda.mem_get_info(device)
    while 2.2 * nbytes > free and nbytes > (1 << 28):
        nbytes //= 2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t, _ = per_call_seconds(functools.partial(dst.copy_, src), target_s=0.05, max_inner=200)
    del src, dst
    return 2 * nbytes / t


@contextlib.contextmanager
def cudnn_benchmark_on():
    """cuDNN autotuning inside the block only; the previous setting comes back after it (also on
    error), so suites that run later keep theirs."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def synced(fn, device):
    """``fn`` followed by a device synchronize on CUDA, so a pytest-benchmark row times the work
    and not only its launch (CUDA calls return before the GPU is done)."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def benchmark_record(benchmark, **extra) -> None:
    """Attach device, versions and the case's parameters to a pytest-benchmark result."""
    benchmark.extra_info.update(device_info())
    benchmark.extra_info.update(extra)


@torch.no_grad()
def thresholds_for_fractions(model, x, fractions, criterion: str = "entropy"):
    """Thresholds under which about ``fractions[k]`` of ``x`` leaves at early exit k (the last
    fraction is what reaches the final exit). Each exit's threshold is a quantile of the scores of
    the rows still running there. Fractions near zero give thresholds no row meets."""
    from eeruntime.ops import confidence_ref

    model.eval()
    outs = model(x)
    B = x.shape[0] if isinstance(x, torch.Tensor) else x[0].shape[0]
    alive = torch.ones(B, dtype=torch.bool, device=outs[0].device)
    thresholds = []
    for k in range(len(outs) - 1):
        s = confidence_ref(outs[k], criterion)
        want = fractions[k] * B
        live = s[alive]
        q = min(max(want / max(int(alive.sum()), 1), 0.0), 1.0)
        if want < 0.5 or live.numel() == 0:
            thr = -1.0 if criterion == "entropy" else 2.0
        elif criterion == "entropy":
            thr = float(live.float().quantile(q)) + 1e-6
        else:
            thr = float(live.float().quantile(1.0 - q))
        thresholds.append(thr)
        exits = (s < thr) if criterion == "entropy" else (s >= thr)
        alive &= ~exits
    return thresholds


def report_doc(argv=None, **fields) -> dict:
    """A bench report's header (the machine, today's date, the command line: ``argv``, else
    sys.argv's) followed by ``fields``; :func:`write_report` writes it."""
    import datetime
    import sys

    return {
        "device": device_info(),
        "date": datetime.date.today().isoformat(),
        "argv": sys.argv[1:] if argv is None else argv,
        **fields,
    }


def device_slug(name: str) -> str:
    """A device's word in result file names: a GPU's whole name (``nvidia-h200``,
    ``nvidia-h100-80gb-hbm3``: the vendor's word alone gave an H100's and an H200's runs of one day
    the same files), a CPU's first word (``amd``), as the CPU results have always been named: its
    leading letters and digits (``Intel(R) Xeon(R)`` gave ``intel(r)``, a file name the device tool
    does not bring back from a GPU machine's host, session 18; now ``intel``)."""
    if name.lower().startswith("nvidia"):
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    first = re.match(r"[a-z0-9]+", name.strip().lower())  # the first word's leading letters and digits
    return first.group(0) if first else "cpu"


def write_report(out_dir, name: str, doc: dict, markdown: str, tag: str = ""):
    """Write ``doc`` as JSON and ``markdown`` beside it, as ``<out_dir>/<name>-<device>-<date><tag>``
    (:func:`device_slug`; the date from ``doc["date"]``); returns the stem."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{device_slug(doc['device']['device'])}-{doc['date']}{tag}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.json, .md")
    return stem
