"""Benchmark of the fused exit decision: Triton kernel vs eager reference vs torch.compile(reference).

    pytest bench/test_bench_exit_decision.py --benchmark-json=bench/results/<device>-<date>-exit_decision.json

Each case (B, C, dtype, criterion) times the three implementations side by side in the same
process with CUDA events, and records in the benchmark's ``extra_info``: seconds per call of each,
the kernel's achieved bandwidth (bytes of logits read + outputs written, per second), the device's
copy bandwidth measured in the same run (``common.copy_bandwidth``), their ratio, the speedups
over eager and over compile, and whether the issue's targets hold:

* B = 4096 and C >= 1000: achieved bandwidth >= 80% of copy bandwidth;
* >= 3x faster than eager; not slower than torch.compile.

Rows wide enough for the chunked path (C > ``ONE_BLOCK_MAX``) also time the previous chunked
kernel (bench/exit_decision_prev.py, frozen) through the same launcher, side by side:
``seconds_prev``, ``fraction_of_copy_prev`` and ``speedup_vs_prev``. The issue's case (B = 4096,
C = 32000, bf16, entropy) also records ``sweep_fraction_of_copy``: the current kernel's fraction of
copy bandwidth for BLOCK_C in {2048, 4096, 8192} x num_warps in {4, 8, 16}, each without and with
``PREFETCH`` (keys "4096x8" and "4096x8+prefetch"; None where the ``SWEEP_BUDGET_S`` time box ran
out or the config failed, see ``notes``), so the next retuning of ``CHUNK``, the warps and
``PREFETCH`` needs no extra GPU time.

Targets are recorded, not asserted (timings vary by device and load); pytest-benchmark's own
timing row is the Triton kernel's, for a batch of ``inner`` back-to-back launches.

The whole file needs CUDA: on CPU the kernel only runs in the Triton interpreter, whose timings
mean nothing, and compiling the reference for every shape would cost minutes.
"""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch
from common import benchmark_record, copy_bandwidth, needs_cuda, per_call_seconds

pytestmark = needs_cuda

BATCHES = (1, 64, 4096, 32768)
CLASSES = (10, 1000, 32000, 128256)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGET_COPY_FRACTION = 0.8
TARGET_SPEEDUP_EAGER = 3.0
TARGET_SPEEDUP_COMPILE = 1.0
THRESHOLD = 0.5
# The sweep's (BLOCK_C, num_warps) pairs, the likeliest first (the time box cuts the tail): each
# is timed without and with PREFETCH. 8192 x 4 needs ~200 registers a thread: last.
SWEEP_CONFIGS = ((4096, 8), (2048, 8), (4096, 16), (2048, 4), (8192, 16), (8192, 8), (2048, 16), (4096, 4), (8192, 4))
# Wall-clock box of the config sweep (its 18 compiles are most of it, ~1 s each): the bench-exit
# step of tools/gpu_check.py has 60 s for this whole case, eager and torch.compile included
# (~20 s before the sweep on an H200).
SWEEP_BUDGET_S = 22.0


@pytest.fixture(scope="module")
def copy_bw() -> float:
    """The device's copy bandwidth (bytes/s, read + write), measured once in this run."""
    return copy_bandwidth("cuda")


@functools.cache
def compiled_reference(criterion: str, backend: str = "inductor"):
    """torch.compile of the reference, one compiled function per criterion.

    The batch dimension is compiled dynamic and the class dimension static (see
    :func:`prepare_compiled`): one compile per (C, dtype) instead of one per (B, C, dtype) (~51 in
    this suite), with kernels still specialised to the row length, as a user would compile a
    classifier head. Dynamo caches compiled code per code object and, past its recompile limit,
    silently runs eager code, so the limit is raised and hitting it made an error instead."""
    from eeruntime.ops.exit_decision import exit_decision_ref

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True

    def ref(logits, thr):
        return exit_decision_ref(logits, thr, criterion)

    return torch.compile(ref, fullgraph=True, backend=backend)


def prepare_compiled(compiled, x, thr):
    """Compile ``compiled`` for ``x`` before it is timed: batch dim dynamic, every other dim static
    (automatic dynamic shapes off while it compiles, so a new C gets its own static kernels rather
    than turning C dynamic for all). Later calls with this (C, dtype), any batch > 1, reuse it."""
    torch._dynamo.maybe_mark_dynamic(x, 0)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        return compiled(x, thr)


def eager_peak_bytes(B: int, C: int, dtype) -> int:
    """Rough peak memory of the eager reference: the input, its fp32 copy, softmax and p log p."""
    n = B * C
    return n * torch.finfo(dtype).bits // 8 + 3 * 4 * n


def score_atol(C: int) -> float:
    """How far two launches' scores may differ: other configs sum in another order."""
    return 1e-4 * max(1.0, math.log(C))


def config_sweep(x, thr, criterion, moved, copy_bw, configs=SWEEP_CONFIGS, budget_s=SWEEP_BUDGET_S):
    """The chunked kernel's fraction of copy bandwidth on ``x`` per ``"<BLOCK_C>x<num_warps>"`` and
    ``"<BLOCK_C>x<num_warps>+prefetch"`` (``one_block_max=0``: the chunked path whatever the row
    length).

    Returns (fractions, notes, wrong): a config is None when the ``budget_s`` wall-clock box was
    spent before it started, or it raised (the error in ``notes``); ``wrong`` names the configs
    whose scores on the first rows disagree with the default launch's (recorded, then asserted by
    the caller, so the figures of the others are kept)."""
    from eeruntime.kernels.exit_decision import exit_decision_triton

    head = x[:64]
    want = exit_decision_triton(head, thr, criterion)[0]
    fractions, notes, wrong = {}, [], []
    start = time.perf_counter()
    for block, nw in configs:
        for prefetch in (False, True):
            key = f"{block}x{nw}" + ("+prefetch" if prefetch else "")
            fractions[key] = None
            if time.perf_counter() - start > budget_s:
                continue
            kw = dict(one_block_max=0, chunk=block, num_warps=nw, prefetch=prefetch)
            run = functools.partial(exit_decision_triton, x, thr, criterion, **kw)
            try:
                got = exit_decision_triton(head, thr, criterion, **kw)[0]
                seconds, _ = per_call_seconds(run, target_s=0.01, max_inner=200)
            except Exception as e:  # noqa: BLE001  a config that fails to build is a finding
                notes.append(f"sweep {key}: {type(e).__name__}: {e}"[:200])
                continue
            if not torch.allclose(got, want, atol=score_atol(x.shape[1]), rtol=0, equal_nan=True):
                wrong.append(key)
            fractions[key] = moved / seconds / copy_bw
    if time.perf_counter() - start > budget_s and any(v is None for v in fractions.values()):
        notes.append(f"sweep stopped at its {budget_s:.0f} s time box")
    return fractions, notes, wrong


def _cases():
    for B in BATCHES:
        for C in CLASSES:
            for name in DTYPES:
                yield pytest.param(B, C, name, "entropy", id=f"B{B}-C{C}-{name}-entropy")
    # The other criteria at one large, bandwidth-bound shape.
    for criterion in ("max_prob", "margin", "norm_entropy"):
        yield pytest.param(4096, 32000, "bf16", criterion, id=f"B4096-C32000-bf16-{criterion}")


@pytest.mark.parametrize("B,C,dtype_name,criterion", list(_cases()))
def test_exit_decision_bandwidth(benchmark, copy_bw, B, C, dtype_name, criterion):
    from exit_decision_prev import chunked_kernel_prev

    from eeruntime.kernels.exit_decision import ONE_BLOCK_MAX, exit_decision_triton
    from eeruntime.ops.exit_decision import exit_decision_ref

    dtype = DTYPES[dtype_name]
    free, total = torch.cuda.mem_get_info()
    in_bytes = B * C * torch.finfo(dtype).bits // 8
    if in_bytes * 1.2 > free:
        pytest.skip(f"logits of {in_bytes / 2**30:.1f} GiB do not fit in {free / 2**30:.1f} GiB free device memory")
    x = torch.randn(B, C, device="cuda", dtype=dtype).mul_(3)  # in place: the largest case is 16 GiB
    thr = torch.full((1,), THRESHOLD, device="cuda")[0]  # a device scalar, as the runtime passes

    def triton_fn():
        return exit_decision_triton(x, thr, criterion)

    # Correctness first: the kernel agrees with the reference on this data (on a slice of rows,
    # so the reference's intermediates stay small).
    head = x[:256]
    conf_k, _ = exit_decision_triton(head, thr, criterion)
    conf_r, _ = exit_decision_ref(head, thr, criterion)
    torch.testing.assert_close(conf_k, conf_r, atol=score_atol(C), rtol=0)

    t_triton, inner = per_call_seconds(triton_fn)

    t_prev = None
    if C > ONE_BLOCK_MAX:  # the chunked path: the previous kernel, same launcher, same data

        def prev_fn():
            return exit_decision_triton(x, thr, criterion, _chunked_kernel=chunked_kernel_prev)

        conf_p, _ = exit_decision_triton(head, thr, criterion, _chunked_kernel=chunked_kernel_prev)
        torch.testing.assert_close(conf_k, conf_p, atol=score_atol(C), rtol=0)
        t_prev, _ = per_call_seconds(prev_fn)

    t_eager = None
    eager_note = None
    if eager_peak_bytes(B, C, dtype) < 0.8 * free:
        t_eager, _ = per_call_seconds(lambda: exit_decision_ref(x, thr, criterion), max_inner=100)
    else:
        eager_note = "eager reference skipped: its intermediates would not fit in device memory"

    t_compile = None
    compile_note = None
    try:
        compiled = compiled_reference(criterion)
        prepare_compiled(compiled, x, thr)
        t_compile, _ = per_call_seconds(lambda: compiled(x, thr), max_inner=200)
    except Exception as e:  # noqa: BLE001  a compile failure is a finding to record, not a crash
        compile_note = f"torch.compile failed: {type(e).__name__}: {e}"[:300]

    def timed():
        for _ in range(inner):
            triton_fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)

    moved = in_bytes + B * (4 + 1)  # logits read; float32 score and bool flag written
    gbps = moved / t_triton
    fraction = gbps / copy_bw
    speedup_eager = t_eager / t_triton if t_eager else None
    speedup_compile = t_compile / t_triton if t_compile else None
    bandwidth_target = B == 4096 and C >= 1000
    sweep, sweep_notes, sweep_wrong = None, [], []
    if (B, C, dtype_name, criterion) == (4096, 32000, "bf16", "entropy"):
        sweep, sweep_notes, sweep_wrong = config_sweep(x, thr, criterion, moved, copy_bw)
    benchmark_record(
        benchmark,
        op="exit_decision",
        B=B,
        C=C,
        dtype=dtype_name,
        criterion=criterion,
        inner=inner,
        seconds_triton=t_triton,
        seconds_eager=t_eager,
        seconds_compile=t_compile,
        bytes_moved=moved,
        achieved_GBps=gbps / 1e9,
        copy_GBps=copy_bw / 1e9,
        fraction_of_copy=fraction,
        seconds_prev=t_prev,
        fraction_of_copy_prev=moved / t_prev / copy_bw if t_prev else None,
        speedup_vs_prev=t_prev / t_triton if t_prev else None,
        sweep_fraction_of_copy=sweep,
        speedup_vs_eager=speedup_eager,
        speedup_vs_compile=speedup_compile,
        target_fraction_of_copy=(fraction >= TARGET_COPY_FRACTION) if bandwidth_target else None,
        target_vs_eager=(speedup_eager >= TARGET_SPEEDUP_EAGER) if speedup_eager else None,
        target_vs_compile=(speedup_compile >= TARGET_SPEEDUP_COMPILE) if speedup_compile else None,
        notes="; ".join(n for n in (eager_note, compile_note, *sweep_notes) if n) or None,
    )
    print(
        f"\nB={B} C={C} {dtype_name} {criterion}: triton {t_triton * 1e6:.1f} us "
        f"({gbps / 1e9:.0f} GB/s, {fraction:.0%} of copy {copy_bw / 1e9:.0f} GB/s)"
        + (f", eager x{speedup_eager:.1f}" if speedup_eager else "")
        + (f", compile x{speedup_compile:.2f}" if speedup_compile else "")
        + (f", previous kernel {moved / t_prev / copy_bw:.0%} of copy (x{t_prev / t_triton:.2f})" if t_prev else "")
    )
    if sweep:
        print("sweep (BLOCK_C x warps: fraction of copy):", {k: v and round(v, 3) for k, v in sweep.items()})
    assert not sweep_wrong, f"configs whose scores disagree with the default launch's: {sweep_wrong}"
