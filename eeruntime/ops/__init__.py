"""The runtime's fast ops, each with a plain-PyTorch ``*_ref`` and its backend table beside it,
selected by :func:`dispatch.select` (see docs/design.md, "Ops and backends")."""

from . import dispatch
from .compact import (
    compact,
    compact_,
    compact_inplace_ref,
    compact_into,
    compact_into_ref,
    compact_ref,
    scatter_rows,
    scatter_rows_ref,
)
from .dispatch import BackendUnavailable, backends, explain
from .exit_decision import confidence_ref, exit_decision, exit_decision_ref
from .exit_scatter import exit_scatter, exit_scatter_ref

__all__ = [
    "BackendUnavailable",
    "backends",
    "explain",
    "dispatch",
    "exit_decision",
    "exit_decision_ref",
    "confidence_ref",
    "compact",
    "compact_ref",
    "compact_",
    "compact_inplace_ref",
    "compact_into",
    "compact_into_ref",
    "scatter_rows",
    "scatter_rows_ref",
    "exit_scatter",
    "exit_scatter_ref",
]
