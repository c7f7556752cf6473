"""``exit_scatter``: one exit of the runtime's loop in one call.

For the ``n`` rows that reached exit ``exit`` (``logits`` [n, C], their original batch rows
``rows`` [n]): score every row with the criterion, decide against ``thresholds[exit]`` (at the
final exit every row leaves, NaN scores included), write each leaving row's logits, score and exit
number at its original row of ``out`` / ``confidence`` / ``exit_index``, and return ``keep``, the
rows that go on, with the number that left.

Backends in priority order: ``cpp`` (the fused CPU kernel of ``eeruntime._C``: one read of the
logits, one call instead of the six of eager PyTorch), ``torch`` (the reference below, any device).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..criteria import CRITERIA
from . import dispatch
from ._ext_backend import EXIT_SCATTER_CPP
from .aliasing import inputs_apart, refuse_overlapping_outputs
from .compact import scatter_rows_ref
from .exit_decision import _check_logits, confidence_ref, exits_from_scores


def exit_scatter_ref(
    logits: torch.Tensor,
    thresholds: torch.Tensor,
    criterion: str,
    exit: int,
    final: bool,
    rows: torch.Tensor,
    out: torch.Tensor,
    confidence: torch.Tensor,
    exit_index: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ``confidence_ref``, the threshold compare and ``scatter_rows_ref``.
    Returns ``(keep bool [n], n_exit int64 0-d tensor)``."""
    score = confidence_ref(logits, criterion)
    if final:
        leaves = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    else:
        leaves = exits_from_scores(score, thresholds[exit].to(score.device, torch.float32), criterion)
    stamp = torch.full_like(rows, exit)
    scatter_rows_ref(leaves, rows, [logits, score, stamp], [out, confidence, exit_index])
    return ~leaves, leaves.sum()


def _torch_why_not(*args: Any, forced: bool) -> Optional[str]:
    return None


# The backend table, tried in this order by ``auto``: the fused C++ CPU kernel, the reference.
dispatch.table("exit_scatter", [EXIT_SCATTER_CPP, dispatch.Backend("torch", exit_scatter_ref, _torch_why_not)])


def _check(
    logits: torch.Tensor,
    thresholds: torch.Tensor,
    criterion: str,
    exit: int,
    final: bool,
    rows: torch.Tensor,
    out: torch.Tensor,
    confidence: torch.Tensor,
    exit_index: torch.Tensor,
) -> None:
    _check_logits(logits)
    if criterion not in CRITERIA:
        raise ValueError(
            f"exit_scatter takes a named criterion; got {criterion!r}, accepted: {', '.join(map(repr, CRITERIA))}"
        )
    n, C = logits.shape
    if not isinstance(thresholds, torch.Tensor) or thresholds.dim() != 1 or not thresholds.is_floating_point():
        raise ValueError("thresholds must be a 1-D float tensor, one per early exit")
    if not isinstance(exit, int) or isinstance(exit, bool) or exit < 0:
        raise ValueError(f"exit must be a non-negative int, got {exit!r}")
    if not final and exit >= thresholds.shape[0]:
        raise ValueError(
            f"exit {exit} has no threshold in thresholds of shape {tuple(thresholds.shape)} (one per early exit)"
        )
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (n,):
        raise ValueError(
            f"rows must be int64 [{n}] (one per row of logits), got "
            f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}"
        )
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != C or not out.is_floating_point():
        raise ValueError(
            f"out must be a floating [B, {C}] tensor (the logits' classes), got "
            f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
        )
    B = out.shape[0]
    for name, t, dtype in (("confidence", confidence, torch.float32), ("exit_index", exit_index, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != (B,):
            raise ValueError(
                f"{name} must be {dtype} [{B}] (one entry per row of out), got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
    for name, t in (("rows", rows), ("out", out), ("confidence", confidence), ("exit_index", exit_index)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")


def exit_scatter(
    logits: torch.Tensor,
    thresholds: torch.Tensor,
    criterion: str,
    exit: int,
    rows: torch.Tensor,
    out: torch.Tensor,
    confidence: torch.Tensor,
    exit_index: torch.Tensor,
    *,
    final: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, int]:
    """Decide exit ``exit`` for ``logits`` and scatter the leaving rows; returns ``(keep, n_exit)``.

    ``thresholds``: float [K-1], one per early exit (ignored when ``final``); ``criterion``: a
    name of ``CRITERIA`` (entropy leaves when H < T, the others when score >= T); ``rows`` int64
    [n]: each logits row's row of the outputs; ``out`` [B, C] (any float dtype; logits are
    converted), ``confidence`` float32 [B] and ``exit_index`` int64 [B] are written in place at
    the leaving rows only. ``keep`` is bool [n]; ``n_exit`` an int. An input on an output's
    memory (``out`` aliasing ``logits``) is read as it was when the call began; outputs that
    share memory are refused (``eeruntime/ops/aliasing.py``).
    """
    _check(logits, thresholds, criterion, exit, final, rows, out, confidence, exit_index)
    outputs = [("out", out), ("confidence", confidence), ("exit_index", exit_index)]
    refuse_overlapping_outputs("exit_scatter", outputs)
    logits, thresholds, rows = inputs_apart(
        [("logits", logits), ("thresholds", thresholds), ("rows", rows)], [t for _, t in outputs]
    )
    args = (logits, thresholds, criterion, exit, final, rows, out, confidence, exit_index)
    keep, n_exit = dispatch.select("exit_scatter", backend, *args).fn(*args)
    return keep, int(n_exit)
