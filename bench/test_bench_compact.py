"""Benchmark of row compaction: the eeruntime ops vs boolean indexing vs ``nonzero`` + ``index_select``.

    pytest bench/test_bench_compact.py --benchmark-json=bench/results/<device>-<date>-compact.json

GPU cases: B in {256, 4096, 65536} x rows of 64 B / 4 KB / 64 KB (float32), half the rows kept at
random. Each case times, side by side in one process with CUDA events:

* ``compact`` (backend ``cuda``: stable select, one host read of the count, vectorized gather),
* ``compact_into`` (the same into preallocated buffers; no host sync, what a captured graph runs)
  on each of its two CUDA paths: ``fused`` (one kernel, the default up to
  ``_C.FUSED_COMPACT_MAX_ROWS`` rows) and ``cub`` (CUB select + gather, the default above), each
  timed two ways: eagerly (back-to-back Python calls) and as a CUDA graph (``inner`` calls captured
  once, the graph replayed: ``common.graph_per_call_seconds``),
* ``x[keep]`` (boolean indexing) and ``x.index_select(0, keep.nonzero().squeeze(1))``,

and records in ``extra_info`` the seconds of each, the achieved bandwidth (bytes of kept rows read
+ written, per second), the device's copy bandwidth measured in the same run
(``common.copy_bandwidth``, read + write), their ratios, the speedups over boolean indexing, and
the issue's targets: >= 70% of copy bandwidth for rows >= 4 KB at B = 4096; faster than boolean
indexing at every size. Targets are recorded, not asserted (timings vary by device and load).

Which figure DESIGN's 70 % target is about: ``copy_fraction_graph``, ``compact_into`` on the path
``auto`` takes, timed by graph replay. The runtime's graph executor replays compact_into inside
its captured stage graphs (DESIGN "The hot path": no host sync inside a captured graph;
eeruntime/runtime/graphs.py ``_pack``), so the device's time is what the target measures.
``copy_fraction`` (the same op timed by eager calls) is kept beside it: at 4 KB rows the 16.7 MB
moved take ~4 us of copy while each eager call costs ~80 us of host work (Python wrapper,
dispatch, scratch allocation, launches), so it measures the host, which is what an eager caller
of the op pays. ``copy_fraction_<path>`` / ``copy_fraction_graph_<path>`` give each path's figures.
pytest-benchmark's own row is eager ``compact_into`` for a batch of ``inner`` back-to-back calls.

The CPU case (B = 4096, 4 KB rows) compares the C++ op with boolean indexing, quick enough for CI.
"""

from __future__ import annotations

import time

import pytest
import torch
from common import CUDA, benchmark_record, copy_bandwidth, graph_per_call_seconds, per_call_seconds

import eeruntime as ee
from eeruntime import _ext
from eeruntime.ops._ext_backend import _compact_into_path

BATCHES = (256, 4096, 65536)
ROW_BYTES = (64, 4096, 65536)
KEEP_FRACTION = 0.5
TARGET_COPY_FRACTION = 0.7
PATHS = ("fused", "cub")  # compact_into's CUDA paths, both timed in every case
GRAPH_INNER = 200  # compact_into calls per captured graph: the replay's launch cost is spread over them


@pytest.fixture(scope="module")
def copy_bw() -> float:
    """The device's copy bandwidth (bytes/s, read + write), measured once in this run."""
    return copy_bandwidth("cuda")


def _gpu_cases():
    for B in BATCHES:
        for rb in ROW_BYTES:
            yield pytest.param(B, rb, id=f"B{B}-row{rb}B")


@pytest.mark.skipif(
    not (CUDA and _ext.with_cuda()),
    reason=(
        "GPU benchmark: needs a CUDA device, none on this machine"
        if not CUDA
        else f"eeruntime._C has no CUDA ops: {_ext.CUDA_BUILD_HINT}"
    ),
)
@pytest.mark.parametrize("B,row_bytes", list(_gpu_cases()))
def test_compact_bandwidth(benchmark, copy_bw, B, row_bytes):
    free, _ = torch.cuda.mem_get_info()
    in_bytes = B * row_bytes
    if 3 * in_bytes > 0.9 * free:  # input, the compact_into buffers, and one packed copy at a time
        pytest.skip(f"{3 * in_bytes / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, row_bytes // 4, device="cuda", generator=gen)
    keep = torch.rand(B, device="cuda", generator=gen) < KEEP_FRACTION
    n = int(keep.sum())
    out = torch.empty_like(x)
    index_out = torch.empty(B, dtype=torch.int64, device="cuda")
    count_out = torch.empty(1, dtype=torch.int64, device="cuda")

    # Correctness on this data before timing.
    index, (packed,) = ee.ops.compact(keep, [x], backend="cuda")
    assert torch.equal(packed, x[keep]) and torch.equal(index, keep.nonzero().squeeze(1))
    for path in PATHS:
        out.zero_()
        with _compact_into_path(path):
            ee.ops.compact_into(keep, [x], [out], index_out, count_out, backend="cuda")
        assert int(count_out) == n and torch.equal(out[:n], packed), path
        assert torch.equal(index_out[:n], index), path
    del index, packed

    def op():
        return ee.ops.compact(keep, [x], backend="cuda")

    def op_into():
        ee.ops.compact_into(keep, [x], [out], index_out, count_out, backend="cuda")

    t_op, _ = per_call_seconds(op, max_inner=500)
    t_path, t_graph = {}, {}
    for path in PATHS:
        with _compact_into_path(path):
            t_path[path], inner = per_call_seconds(op_into, max_inner=500)
            t_graph[path] = graph_per_call_seconds(op_into, inner=GRAPH_INNER)
    t_bool, _ = per_call_seconds(lambda: x[keep], max_inner=500)
    t_nz, _ = per_call_seconds(lambda: x.index_select(0, keep.nonzero().squeeze(1)), max_inner=500)
    auto = "fused" if B <= _ext._C.FUSED_COMPACT_MAX_ROWS else "cub"  # the path compact_into takes by default
    t_into, t_into_graph = t_path[auto], t_graph[auto]

    def timed():
        for _ in range(inner):
            op_into()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)

    moved = 2 * n * row_bytes  # kept rows read + written
    gbps_op, gbps_into, gbps_graph = moved / t_op, moved / t_into, moved / t_into_graph
    target_bw = B == 4096 and row_bytes >= 4096
    per_path = {}
    for path in PATHS:
        per_path[f"seconds_compact_into_{path}"] = t_path[path]
        per_path[f"seconds_compact_into_graph_{path}"] = t_graph[path]
        per_path[f"copy_fraction_{path}"] = moved / t_path[path] / copy_bw
        per_path[f"copy_fraction_graph_{path}"] = moved / t_graph[path] / copy_bw
    benchmark_record(
        benchmark,
        op="compact",
        impl="compact_into",
        path=auto,
        B=B,
        row_bytes=row_bytes,
        dtype="fp32",
        keep_fraction=KEEP_FRACTION,
        kept=n,
        inner=inner,
        graph_inner=GRAPH_INNER,
        seconds_compact=t_op,
        seconds_compact_into=t_into,
        seconds_compact_into_graph=t_into_graph,
        seconds_boolean=t_bool,
        seconds_nonzero_index_select=t_nz,
        bytes_moved=moved,
        gbps=gbps_into / 1e9,
        gbps_graph=gbps_graph / 1e9,
        gbps_compact=gbps_op / 1e9,
        copy_GBps=copy_bw / 1e9,
        copy_fraction=gbps_into / copy_bw,
        copy_fraction_graph=gbps_graph / copy_bw,
        copy_fraction_compact=gbps_op / copy_bw,
        **per_path,
        speedup_vs_boolean=t_bool / t_op,
        speedup_into_vs_boolean=t_bool / t_into,
        speedup_vs_nonzero_index_select=t_nz / t_op,
        target_copy_fraction=(gbps_graph / copy_bw >= TARGET_COPY_FRACTION) if target_bw else None,
        target_vs_boolean=t_op < t_bool and t_into < t_bool,
    )
    paths = ", ".join(
        f"{p} eager {t_path[p] * 1e6:.1f} us ({moved / t_path[p] / copy_bw:.0%}) "
        f"graph {t_graph[p] * 1e6:.1f} us ({moved / t_graph[p] / copy_bw:.0%})"
        for p in PATHS
    )
    print(
        f"\nB={B} row={row_bytes}B kept={n}: compact {t_op * 1e6:.1f} us ({gbps_op / copy_bw:.0%} of copy), "
        f"compact_into [{paths}; default {auto}], x[keep] {t_bool * 1e6:.1f} us, "
        f"nonzero+index_select {t_nz * 1e6:.1f} us; copy {copy_bw / 1e9:.0f} GB/s"
    )


def _cpu_seconds(fn, iters: int = 30) -> float:
    """Best of ``iters`` calls: on a shared CPU the minimum is the least noisy estimate."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.skipif(not _ext.available(), reason=f"{_ext.why_unavailable()}; {_ext.BUILD_HINT}")
def test_compact_cpu_vs_boolean_indexing(benchmark):
    B, row_bytes = 4096, 4096
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, row_bytes // 4, generator=gen)
    keep = torch.rand(B, generator=gen) < KEEP_FRACTION
    _, (packed,) = ee.ops.compact(keep, [x], backend="cpp")
    assert torch.equal(packed, x[keep])

    def op():
        return ee.ops.compact(keep, [x], backend="cpp")

    t_op = _cpu_seconds(op)
    t_bool = _cpu_seconds(lambda: x[keep])
    t_nz = _cpu_seconds(lambda: x.index_select(0, keep.nonzero().squeeze(1)))
    benchmark.pedantic(op, rounds=20, warmup_rounds=2, iterations=1)
    n = packed.shape[0]
    benchmark_record(
        benchmark,
        op="compact",
        impl="cpp",
        B=B,
        row_bytes=row_bytes,
        dtype="fp32",
        keep_fraction=KEEP_FRACTION,
        kept=n,
        seconds_compact=t_op,
        seconds_boolean=t_bool,
        seconds_nonzero_index_select=t_nz,
        gbps=2 * n * row_bytes / t_op / 1e9,
        speedup_vs_boolean=t_bool / t_op,
        speedup_vs_nonzero_index_select=t_nz / t_op,
    )
    print(
        f"\nCPU B={B} row={row_bytes}B: cpp {t_op * 1e6:.0f} us, x[keep] {t_bool * 1e6:.0f} us, "
        f"nonzero+index_select {t_nz * 1e6:.0f} us"
    )
