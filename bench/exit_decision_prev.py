"""The chunked exit-decision kernel as it was before the scalar-max rewrite (commit 32104c4), frozen
here for the benchmark only: bench/test_bench_exit_decision.py times it side by side with the
current kernel, in the same process and through the same launcher (``exit_decision_triton``'s
private ``_chunked_kernel``), so the figure it records is the rewrite's gain on that device.

Kept in bench/ rather than behind a switch in kernels/exit_decision.py so the shipped module holds
one chunked kernel; only the loop body differs (its end of row is the shipped ``_finish_row``).

Per lane it keeps an online (m, S, T) over the values that lane has seen; a new value x updates it
to m' = max(m, x) with S' = e^(m - m') S + e^(x - m'), T' = e^(m - m') (T + (m - m') S) +
e^(x - m') (x - m'), at one exponential but several selects per element (~24 SASS instructions per
element on sm_90 for bf16 entropy: compute bound, 42% of copy bandwidth on an H200).
"""

from __future__ import annotations

import triton
import triton.language as tl

from eeruntime.kernels.exit_decision import _MARGIN, _finish_row


@triton.jit
def chunked_kernel_prev(
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
):
    """Chunked online path: one row per program, per-lane online (m, S, T), lanes merged at the end."""
    C = (C // VEC) * VEC  # identities that carry VEC's divisibility (see the tile kernel)
    stride_row = (stride_row // VEC) * VEC
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    t = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.full([BLOCK_C], float("-inf"), tl.float32)  # runner-up per lane (margin)
    idx = tl.zeros([BLOCK_C], tl.int32)  # first column of the lane's maximum (argmax)
    first_nan = tl.full([BLOCK_C], 2147483647, tl.int32)  # (argmax)
    for start in range(0, C, BLOCK_C):
        cols = start + lanes
        x = tl.load(base + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        gt = x > m  # false for NaN: m never holds NaN
        if CRITERION == _MARGIN:
            m2 = tl.where(gt, m, tl.where(x > m2, x, m2))
        if WRITE_ARGMAX:
            idx = tl.where(gt, cols, idx)  # strict >: keeps the earliest column of a tie
            first_nan = tl.minimum(first_nan, tl.where(x != x, cols, 2147483647))
        # One exponential: when x is the new maximum the old state is rescaled by e^(m - x) and x
        # adds e^0 = 1; otherwise the state stays and x adds e^(x - m).
        d = tl.where(gt, m - x, x - m)
        # -inf adds nothing (its d is NaN when m is still -inf); a NaN x makes s NaN for good,
        # which is how a NaN row reaches S.
        e = tl.where(x == float("-inf"), 0.0, tl.exp(d))
        ed = tl.where(e > 0, e * d, 0.0)  # e^d d -> 0 as d -> -inf
        s_new = tl.where(gt, s * e + 1.0, s + e)
        t = tl.where(gt, e * t + ed * s, t + ed)
        s = s_new
        m = tl.where(gt, x, m)

    # Merge the lanes with the same rescaling. e^(m_lane - M) is NaN only where m_lane = M = +inf
    # (a +inf in the row) or M = -inf (nothing but -inf and NaN): the rows whose softmax is NaN.
    M = tl.max(m, axis=0)
    a = tl.exp(m - M)
    S = tl.sum(a * s, axis=0)
    T = tl.sum(tl.where(a > 0, a * (t + (m - M) * s), 0.0), axis=0)
    _finish_row(
        row, M, S, T, m, m2, idx, first_nan, lanes, C, thr_ptr, thr_value, inv_log_c, conf_ptr, mask_ptr,
        argmax_ptr, CRITERION, THR_FROM_PTR, WRITE_ARGMAX, BLOCK_C,
    )  # fmt: skip
