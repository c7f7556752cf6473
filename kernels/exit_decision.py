"""Fused exit decision: softmax statistics, confidence score, exit flag and argmax in one read.

For every row x of ``logits`` [B, C] (any float dtype of fp32/fp16/bf16, math in fp32) the kernel
reads the row once and computes, with m = max_c x_c,

    S = sum_c e^(x_c - m)                 (the softmax denominator: p_c = e^(x_c - m) / S)
    T = sum_c e^(x_c - m) (x_c - m)       (so that sum_c p_c log p_c = T/S - log S)
    x2 = the second largest logit (equal to m when the maximum is tied; -inf when C = 1)

and from them the score of the criteria table in docs/design.md:

    entropy       H = log S - T / S                    exits when H <  threshold
    max_prob      1 / S                                exits when score >= threshold
    margin        p(1) - p(2) = (1 - e^(x2 - m)) / S   exits when score >= threshold
    norm_entropy  1 - H / log C  (1 when C = 1)        exits when score >= threshold

A row holding NaN or +inf, or only -inf, scores NaN (``torch.softmax`` gives NaN there) and never
exits, because every comparison with NaN is false. Entries equal to -inf are masked classes: they
add 0 to S and to T (the 0 * -inf of e^(x-m)(x-m) is taken as its limit, 0). The argmax follows
``torch.argmax``: the first index of the maximum, or the first NaN when the row holds one.

Two paths:

* one block (C <= ``ONE_BLOCK_MAX``): a tile of ``ROWS`` rows x ``BLOCK_C`` >= C columns is loaded
  once and reduced along the row; small vocabularies pack many rows into one program.
* chunked (wider rows, e.g. vocabularies of 32k-256k): one program per row walks the row in chunks
  of ``BLOCK_C`` (Milakov & Gimelshein's online softmax, as in Liger-Kernel's cross entropy, with
  the max taken per chunk). It keeps a scalar running max m, a reference r = fl(m log2 e), and
  per lane the sums

      s = sum 2^d,   t = sum 2^d d,   d = fl(x log2 e - r)   (one fma: d rounds once)

  For a chunk it first takes the chunk's max (one reduction per chunk). When that raises m to m'
  (a scalar branch, rare after the first chunks of a row), with r' = fl(m' log2 e) and
  delta = r - r' <= 0 the lanes are rescaled as

      s' = 2^delta s,   t' = 2^delta (t + delta s)           (d' = d + delta for every old value)

  Then, per element, only: d = fma(x, log2 e, -r), e = exp2(d), s += e, t = fma(e, max(d, -1024), t).
  In the sm_90 SASS of the loop (bf16, entropy, BLOCK_C 4096, 8 warps) that is ~10 instructions
  per element: these 5, 1.5 for the bf16 -> fp32 conversion, 1 for the chunk max and ~2 for the
  chunk max's shuffles, the loop and the addresses; the previous per-lane online state, with its
  selects, took ~24 and was compute bound at 42% of copy bandwidth on an H200. The clamp only
  matters for x = -inf: there e = 0 and 0 * -inf would be NaN; 2^-1024 is 0 in float32, so no
  finite d is changed by it. After the row,
  with delta = fma(M, log2 e, -r) (r's rounding error, exact by the fma) and k = 2^-delta,

      S = k sum s,   T = ln 2 k (sum t - delta sum s)        (relative to M, natural units)

  NaN never enters m (tl.maximum is maxnum), so a NaN x reaches S through its own e = 2^NaN; a
  +inf makes m = r = +inf and its own d = +inf - inf = NaN; a row of only -inf keeps r at a finite
  floor (so no -inf - (-inf) is formed on the way) and ends with delta = -inf, S = 0 * inf = NaN.
  The lanes' top two values and the first index of each lane's maximum, for the margin's x2 and
  the argmax, are tracked only when the criterion or ``return_argmax`` needs them. Whole chunks
  load without a mask; the rest of the row is one masked chunk whose padding (-inf) adds 0.
  ``PREFETCH`` loads each whole chunk one chunk ahead (more bytes in flight per program, more
  registers, fewer programs per SM); off by default until a device's sweep says otherwise.

The threshold is read from a device pointer (a one-element tensor, e.g. a view into the
runtime's [K-1] threshold tensor) so a captured CUDA graph sees new thresholds without
re-capture; a Python float is passed by value instead. Row offsets are int64; the row stride is
arbitrary (the column stride must be 1: the launcher makes other layouts contiguous first). The
launcher passes ``VEC``, the largest power of two (up to 16 bytes) dividing both C and the row
stride, so that the loads are vectorised whenever the layout allows it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from eeruntime.criteria import CRITERIA, CRITERION_CODE
from eeruntime.devices import device_guard

# Rows up to this many classes take the one-block path; wider rows are walked in chunks.
ONE_BLOCK_MAX = 4096
# Chunk width of the chunked path, and the number of elements one tile of the one-block path aims for.
# 2048 with 4 warps (16 elements a thread): the best of the 18 configurations the benchmark's sweep
# timed on an H200 (B=4096, C=32000, bf16, entropy: 75% of copy bandwidth, against 66% for the
# 4096 x 8 warps this kernel ran with; bench/results/nvidia-h200-2026-11-26-session5-b.md).
CHUNK = 2048
TILE_ELEMS = 2048
# The chunked path keeps its sums against r = fl(m log2 e) and corrects for r's rounding at the
# end; that is exact only if every product is rounded where the code says. The NVIDIA backend
# contracts a * b + c into one fma by default (the interpreter never does), e.g. r - m' log2 e in
# the rescale, which then no longer matches the rounded r' the sums continue against: on an H200
# float32 rows offset by 3e3-1e4 scored up to 2.3e-4 off (tests/test_kernel_exit_decision.py::
# test_chunked_large_offsets). The explicit tl.fma calls are kept either way.
CHUNKED_FP_FUSION = False
# Whether the chunked path loads each chunk one chunk ahead (see the kernel): off, the
# fewer registers, until the benchmark's sweep (which times both) says otherwise on a device.
PREFETCH = False

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# True when this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1 was
# set when triton.jit ran, i.e. when this module was first imported): they then run on CPU tensors.
INTERPRETED = False

_ENTROPY: tl.constexpr = tl.constexpr(CRITERION_CODE["entropy"])
_MAX_PROB: tl.constexpr = tl.constexpr(CRITERION_CODE["max_prob"])
_MARGIN: tl.constexpr = tl.constexpr(CRITERION_CODE["margin"])
_NORM_ENTROPY: tl.constexpr = tl.constexpr(CRITERION_CODE["norm_entropy"])


@triton.jit
def _score_and_store(rows, row_ok, M, S, T, X2, thr, inv_log_c, conf_ptr, mask_ptr, CRITERION: tl.constexpr):
    """Score from (m, S, T, x2) and the exit flag against ``thr``.

    S is NaN exactly for the rows that must score NaN (NaN, +inf, or only -inf in the row; see
    the kernels), and every score divides by S, so those rows score NaN and never exit."""
    if CRITERION == _MAX_PROB:
        score = 1.0 / S
    elif CRITERION == _MARGIN:
        score = (1.0 - tl.exp(X2 - M)) / S
    else:
        H = tl.log(S) - T / S
        # H >= 0 exactly (every p log p <= 0); clamp rounding below 0 as the reference's sum
        # and the C++ kernel do. A where, not a max: NaN < 0 is false, so NaN stays NaN.
        H = tl.where(H < 0.0, 0.0, H)
        if CRITERION == _NORM_ENTROPY:
            score = 1.0 - H * inv_log_c  # inv_log_c = 0 when C = 1, whose score is 1 (NaN * 0 stays NaN)
        else:
            score = H
    if CRITERION == _ENTROPY:
        exits = score < thr
    else:
        exits = score >= thr
    tl.store(conf_ptr + rows, score, mask=row_ok)
    tl.store(mask_ptr + rows, exits.to(tl.uint8), mask=row_ok)


@triton.jit
def _exit_decision_tile_kernel(
    x_ptr,
    thr_ptr,
    thr_value,
    conf_ptr,
    mask_ptr,
    argmax_ptr,
    B,
    C,
    stride_row,
    inv_log_c,
    CRITERION: tl.constexpr,
    THR_FROM_PTR: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    """One-block path: ROWS whole rows (C <= BLOCK_C) per program."""
    # VEC divides C and the row stride (the launcher checks), so these are identities; written so,
    # they tell the compiler that divisibility (tl.multiple_of on a scalar argument does not), and
    # with an aligned base pointer it loads VEC elements per instruction.
    C = (C // VEC) * VEC
    stride_row = (stride_row // VEC) * VEC
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    ok = row_ok[:, None] & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)

    # m over the non-NaN values (the reductions' NaN handling differs between GPU and interpreter).
    is_nan = x != x
    xm = tl.where(is_nan, float("-inf"), x)
    M = tl.max(xm, axis=1)
    # e^(x - m) is NaN where x is NaN, where x = m = +inf and where x = m = -inf (a row of -inf):
    # exactly the rows whose softmax is NaN, so S carries the NaN into every score.
    d = x - M[:, None]
    e = tl.exp(d)
    S = tl.sum(e, axis=1)
    T = tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)  # e^d d -> 0 as d -> -inf (masked classes)

    X2 = M
    if CRITERION == _MARGIN or WRITE_ARGMAX:
        first_max = tl.min(tl.where(xm == M[:, None], cols[None, :], BLOCK_C), axis=1)
        if CRITERION == _MARGIN:
            X2 = tl.max(tl.where(cols[None, :] == first_max[:, None], float("-inf"), xm), axis=1)
        if WRITE_ARGMAX:
            first_nan = tl.min(tl.where(is_nan, cols[None, :], BLOCK_C), axis=1)
            am = tl.where(first_nan < BLOCK_C, first_nan, first_max)
            tl.store(argmax_ptr + rows, am.to(tl.int64), mask=row_ok)

    if THR_FROM_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value
    _score_and_store(rows, row_ok, M, S, T, X2, thr, inv_log_c, conf_ptr, mask_ptr, CRITERION)


# Constants of the chunked path (see the module docstring).
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# The reference point while the row's running max is still -inf: finite, so that d, a and the
# rescale below never form -inf - (-inf) or 0 * -inf, and far enough below any logit (times
# log2 e it stays a finite float32) that e^(x - m) of every later finite x sees it as -inf.
_M_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)
# d (log2 units) is clamped to this before d * e: 2^-1024 underflows to 0 in float32 (the
# smallest denormal is 2^-149), so e = 0 below it and the clamp only turns 0 * -inf into 0.
_D_FLOOR: tl.constexpr = tl.constexpr(-1024.0)


@triton.jit
def _chunk_step(x, cols, m, r, s, t, lm, m2, idx, first_nan, CRITERION: tl.constexpr, WRITE_ARGMAX: tl.constexpr):
    """One chunk x [BLOCK_C] (fp32; padding is -inf) of the chunked path; returns the new state.

    m: the running max (scalar, NaN-free); r = fl(max(m, M_FLOOR) log2 e), the reference the lane
    sums s = sum 2^d, t = sum 2^d d with d = fl(x log2 e - r) are kept against. lm, m2, idx,
    first_nan: per-lane argmax / runner-up bookkeeping, updated only under their flags."""
    # NaN does not enter m: tl.maximum is maxnum on both GPU and interpreter (np.fmax); tl.max's
    # NaN handling may differ between them, and either way maxnum drops it. A NaN x reaches S
    # through its own e = 2^NaN below instead.
    m_new = tl.maximum(m, tl.max(x, axis=0))
    if m_new > m:  # a uniform scalar branch, taken only when the row max grows
        r_new = tl.maximum(m_new, _M_FLOOR) * _LOG2E
        delta = r - r_new  # <= 0; exact when the two maxima are within a factor 2 (Sterbenz)
        a = tl.exp2(delta)  # 0 on the first finite chunk (r is the floor), so s = t = 0 stay 0
        t = a * (t + delta * s)
        s = a * s
        r = r_new
    m = m_new
    # Per element: one fma, one exp2, one add, one max, one fma. d = x log2 e - r rounds once
    # (fma; the interpreter's fma rounds once too), so large offsets lose no digits.
    d = tl.fma(x, _LOG2E, -r)
    e = tl.exp2(d)  # NaN for x NaN, and for x = +inf (then r = +inf): S carries the NaN
    s += e
    t = tl.fma(e, tl.maximum(d, _D_FLOOR), t)  # e = 0 wherever the clamp bites (x = -inf)
    if CRITERION == _MARGIN or WRITE_ARGMAX:
        gt = x > lm  # false for NaN: lm never holds NaN
        if CRITERION == _MARGIN:
            m2 = tl.where(gt, lm, tl.where(x > m2, x, m2))
        if WRITE_ARGMAX:
            idx = tl.where(gt, cols, idx)  # strict >: keeps the earliest column of a tie
            first_nan = tl.minimum(first_nan, tl.where(x != x, cols, 2147483647))
        lm = tl.where(gt, x, lm)
    return m, r, s, t, lm, m2, idx, first_nan


@triton.jit
def _finish_row(
    row,
    M,
    S,
    T,
    lm,
    m2,
    idx,
    first_nan,
    lanes,
    C,
    thr_ptr,
    thr_value,
    inv_log_c,
    conf_ptr,
    mask_ptr,
    argmax_ptr,
    CRITERION: tl.constexpr,
    THR_FROM_PTR: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """End of a chunked row: x2 and the argmax from the lanes' bookkeeping (lm: lane max without
    NaN, m2: lane runner-up, idx: first column of lm, first_nan), then score and flag."""
    X2 = M
    if CRITERION == _MARGIN:
        lead = tl.min(tl.where(lm == M, lanes, BLOCK_C), axis=0)
        X2 = tl.max(tl.where(lanes == lead, m2, lm), axis=0)
    if WRITE_ARGMAX:
        nan_at = tl.min(first_nan, axis=0)
        first_max = tl.min(tl.where(lm == M, idx, 2147483647), axis=0)
        am = tl.where(nan_at < C, nan_at, first_max)
        tl.store(argmax_ptr + row, am.to(tl.int64))
    if THR_FROM_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value
    _score_and_store(row, True, M, S, T, X2, thr, inv_log_c, conf_ptr, mask_ptr, CRITERION)


@triton.jit
def _exit_decision_chunked_kernel(
    x_ptr,
    thr_ptr,
    thr_value,
    conf_ptr,
    mask_ptr,
    argmax_ptr,
    B,
    C,
    stride_row,
    inv_log_c,
    CRITERION: tl.constexpr,
    THR_FROM_PTR: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Chunked online path: one row per program, a scalar running max, per-lane sums against it."""
    C = (C // VEC) * VEC  # identities that carry VEC's divisibility (see the tile kernel)
    stride_row = (stride_row // VEC) * VEC
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK_C)
    m = tl.max(tl.full([BLOCK_C], float("-inf"), tl.float32), axis=0)  # a float32 scalar
    r = tl.maximum(m, _M_FLOOR) * _LOG2E  # the floor's reference (as _chunk_step sets it)
    s = tl.zeros([BLOCK_C], tl.float32)
    t = tl.zeros([BLOCK_C], tl.float32)
    lm = tl.full([BLOCK_C], float("-inf"), tl.float32)  # per-lane max (margin, argmax)
    m2 = tl.full([BLOCK_C], float("-inf"), tl.float32)  # runner-up per lane (margin)
    idx = tl.zeros([BLOCK_C], tl.int32)  # first column of the lane's maximum (argmax)
    first_nan = tl.full([BLOCK_C], 2147483647, tl.int32)  # (argmax)
    # Whole chunks load without a mask (no compare and select per element). PREFETCH loads each one
    # chunk ahead of the one being reduced (a register double buffer: its load is in flight during
    # this chunk's barrier and math), at 80 registers a thread instead of 64 at BLOCK_C 4096 and 8
    # warps, so 3 programs fit an SM instead of 4: which wins depends on the memory latency under
    # load, so the benchmark's sweep times both. The rest of the row (possibly nothing) is one
    # masked chunk whose padding, -inf, adds 0.
    full = (C // BLOCK_C) * BLOCK_C
    if PREFETCH:
        x = tl.load(base + lanes, mask=lanes < full, other=float("-inf"))  # all padding if full = 0
        for start in range(0, full - BLOCK_C, BLOCK_C):
            x_next = tl.load(base + (start + BLOCK_C + lanes))
            m, r, s, t, lm, m2, idx, first_nan = _chunk_step(
                x.to(tl.float32), start + lanes, m, r, s, t, lm, m2, idx, first_nan, CRITERION, WRITE_ARGMAX
            )
            x = x_next
        x_tail = tl.load(base + full + lanes, mask=full + lanes < C, other=float("-inf"))
        m, r, s, t, lm, m2, idx, first_nan = _chunk_step(
            x.to(tl.float32), tl.maximum(full - BLOCK_C, 0) + lanes, m, r, s, t, lm, m2, idx, first_nan,
            CRITERION, WRITE_ARGMAX,
        )  # fmt: skip
    else:
        for start in range(0, full, BLOCK_C):
            cols = start + lanes
            x = tl.load(base + cols)
            m, r, s, t, lm, m2, idx, first_nan = _chunk_step(
                x.to(tl.float32), cols, m, r, s, t, lm, m2, idx, first_nan, CRITERION, WRITE_ARGMAX
            )
        cols = full + lanes
        x_tail = tl.load(base + cols, mask=cols < C, other=float("-inf"))
    M, r, s, t, lm, m2, idx, first_nan = _chunk_step(
        x_tail.to(tl.float32), full + lanes, m, r, s, t, lm, m2, idx, first_nan, CRITERION, WRITE_ARGMAX
    )

    # From the reference r back to the max: d - delta = (x - M) log2 e with delta = M log2 e - r,
    # the rounding error of r (exact by the fma). Then S = 2^-delta sum s and, in natural units,
    # T = ln 2 2^-delta (sum t - delta sum s). M = -inf (nothing but -inf and NaN) gives
    # delta = -inf and S = 0 * inf = NaN; M = +inf gives delta = NaN: the rows whose softmax is NaN.
    delta = tl.fma(M, _LOG2E, -r)
    k = tl.exp2(-delta)
    s_sum = tl.sum(s, axis=0)
    S = k * s_sum
    T = (_LN2 * k) * (tl.sum(t, axis=0) - delta * s_sum)

    _finish_row(
        row, M, S, T, lm, m2, idx, first_nan, lanes, C, thr_ptr, thr_value, inv_log_c, conf_ptr, mask_ptr,
        argmax_ptr, CRITERION, THR_FROM_PTR, WRITE_ARGMAX, BLOCK_C,
    )  # fmt: skip


INTERPRETED = type(_exit_decision_tile_kernel).__name__ == "InterpretedFunction"


def _launch_config(C: int, one_block_max: int, chunk: int):
    """(path, BLOCK_C, ROWS, num_warps) for rows of C classes."""
    # The chunked path: 4 warps up to BLOCK_C 2048 (see CHUNK), 8 above; bench/
    # test_bench_exit_decision.py records a BLOCK_C x num_warps sweep of this kernel to retune it.
    if C <= one_block_max:
        block_c = triton.next_power_of_2(C)
        rows = max(1, TILE_ELEMS // block_c)
        tile = rows * block_c
        num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
        return "tile", block_c, rows, num_warps
    block_c = triton.next_power_of_2(chunk)
    return "chunked", block_c, 1, 8 if block_c >= 4096 else 4


def _vector_width(C: int, stride_row: int, elem_bytes: int) -> int:
    """The largest power of two, up to 16 bytes of elements, that divides C and the row stride."""
    g = math.gcd(C, stride_row)
    vec = 1
    while vec * 2 * elem_bytes <= 16 and g % (vec * 2) == 0:
        vec *= 2
    return vec


def exit_decision_triton(
    logits: torch.Tensor,
    threshold: Union[float, int, torch.Tensor],
    criterion: str = "entropy",
    return_argmax: bool = False,
    *,
    one_block_max: Optional[int] = None,
    chunk: Optional[int] = None,
    num_warps: Optional[int] = None,
    prefetch: Optional[bool] = None,
    _chunked_kernel=None,
) -> Tuple[torch.Tensor, ...]:
    """Launch the fused kernel: ``(conf float32 [B], exit bool [B])`` (+ ``argmax int64 [B]``).

    ``threshold``: a float (passed by value) or a one-element tensor (read through its pointer on
    the device, no host sync). ``one_block_max`` and ``chunk`` override the path choice (tests use
    them to run the chunked path on narrow rows); ``num_warps`` overrides the launch's warps, ``prefetch``
    the chunked kernel's ``PREFETCH`` (default: ``PREFETCH``; both for the benchmark's sweep). ``_chunked_kernel`` is for the benchmark only: it launches another
    kernel of the chunked kernel's signature in its place (the previous version, kept frozen in
    bench/, timed side by side with this one through the same launcher). Logits with a column stride other than 1 are
    copied to a contiguous tensor first; any row stride is read in place.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [B, C], got {getattr(logits, 'shape', type(logits).__name__)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton exit kernel takes float32, float16 or bfloat16 logits, got {logits.dtype}")
    if criterion not in CRITERION_CODE:
        raise ValueError(f"unknown criterion {criterion!r}; accepted: {', '.join(map(repr, CRITERIA))}")
    B, C = logits.shape
    if C < 1 or C >= 2**31 - 1:
        raise ValueError(f"logits must have between 1 and 2**31 - 2 classes (column offsets are int32), got C = {C}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")
    device = logits.device
    conf = torch.empty(B, dtype=torch.float32, device=device)
    mask = torch.empty(B, dtype=torch.bool, device=device)
    argmax = torch.empty(B, dtype=torch.int64, device=device) if return_argmax else None
    out = (conf, mask, argmax) if return_argmax else (conf, mask)
    if B == 0:
        return out
    if C > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()

    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a float or a one-element tensor, got shape {tuple(threshold.shape)}")
        if threshold.device != device or not threshold.is_floating_point():
            threshold = threshold.to(device=device, dtype=torch.float32)
        thr_ptr, thr_value, from_ptr = threshold, 0.0, True
    elif isinstance(threshold, (float, int)) and not isinstance(threshold, bool):
        thr_ptr, thr_value, from_ptr = conf, float(threshold), False  # conf: an unused valid pointer
    else:
        raise TypeError(f"threshold must be a float or a one-element tensor, got {type(threshold).__name__}")

    path, block_c, rows, warps = _launch_config(
        C, ONE_BLOCK_MAX if one_block_max is None else one_block_max, CHUNK if chunk is None else chunk
    )
    warps = warps if num_warps is None else num_warps
    args = (
        logits,
        thr_ptr,
        thr_value,
        conf,
        mask.view(torch.uint8),
        argmax if return_argmax else conf,
        B,
        C,
        logits.stride(0),
        1.0 / math.log(C) if C > 1 else 0.0,
    )
    flags = dict(
        CRITERION=CRITERION_CODE[criterion],
        THR_FROM_PTR=from_ptr,
        WRITE_ARGMAX=bool(return_argmax),
        # With one row the stride is never used (row 0 is at offset 0), so only C limits VEC.
        VEC=_vector_width(C, logits.stride(0) if B > 1 else 0, logits.element_size()),
    )
    # Triton launches on the current device and its current stream: make logits' device current.
    with device_guard(device):
        if path == "tile":
            grid = (triton.cdiv(B, rows),)
            _run(_exit_decision_tile_kernel, grid, args, dict(flags, ROWS=rows, BLOCK_C=block_c), warps)
        else:
            if _chunked_kernel is None:
                chunked = dict(flags, BLOCK_C=block_c, PREFETCH=PREFETCH if prefetch is None else bool(prefetch))
                _run(_exit_decision_chunked_kernel, (B,), args, chunked, warps, fp_fusion=CHUNKED_FP_FUSION)
            else:
                _run(_chunked_kernel, (B,), args, dict(flags, BLOCK_C=block_c), warps)
    return out


def _run(kernel, grid, args, constexprs, num_warps, fp_fusion: bool = True):
    """Launch ``kernel``; ``fp_fusion=False`` stops the compiler contracting a * b + c into fma
    (the interpreter never contracts, so there it changes nothing)."""
    if INTERPRETED:
        import numpy as np

        # The interpreter evaluates -inf - (-inf) and exp(NaN) in numpy, which warns; the kernel
        # handles those values (see the module docstring), so the warnings are noise.
        with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
            kernel[grid](*args, **constexprs, num_warps=num_warps)
    else:
        kernel[grid](*args, **constexprs, num_warps=num_warps, enable_fp_fusion=fp_fusion)
