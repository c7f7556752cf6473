"""Thresholds: coerced from what a user gives in one place, held as immutable snapshots.

A runtime holds one :class:`ThresholdSnapshot` at a time; ``set_thresholds`` swaps in a new one.
A call takes the current snapshot once and decides every exit against it, so a call never mixes
old and new thresholds (see docs/design.md, "Thresholds").
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Dict, Tuple

import numpy as np
import torch

# Conservative defaults for ``EERuntime(model)`` with no thresholds: few samples leave early
# until the user calibrates (``ee.calibrate``). A callable's default follows the gates of
# differentiable branching, which exit at g >= 0.5.
DEFAULT_THRESHOLDS = {"entropy": 0.05, "max_prob": 0.99, "margin": 0.98, "norm_entropy": 0.98}
DEFAULT_CALLABLE_THRESHOLD = 0.5


def coerce_thresholds(thresholds, num_early: int, criterion=None) -> Tuple[float, ...]:
    """``num_early`` floats from ``thresholds``: None (the criterion's default), one float (or a
    0-dim tensor) for every early exit, or a sequence / 1-D tensor of ``num_early`` floats."""
    n = num_early
    if thresholds is None:
        default = DEFAULT_CALLABLE_THRESHOLD if callable(criterion) else DEFAULT_THRESHOLDS[criterion]
        return (default,) * n
    if isinstance(thresholds, ThresholdSnapshot):
        thresholds = thresholds.values
    accepted = f"a float (one for every early exit) or a sequence of {n} floats, one per early exit, in exit order"
    if isinstance(thresholds, np.ndarray) and thresholds.ndim == 0:
        thresholds = thresholds[()]  # a 0-d array is one number, as a 0-dim tensor is (it cannot be iterated)
    if isinstance(thresholds, torch.Tensor):
        if thresholds.device.type == "meta":
            raise ValueError(f"thresholds are a meta tensor (no values); give {accepted}")
        if thresholds.layout != torch.strided:
            raise ValueError(f"thresholds are a {str(thresholds.layout).replace('torch.', '')} tensor; give {accepted}")
        if thresholds.dtype == torch.bool or thresholds.is_complex():
            raise TypeError(f"thresholds must be real numbers, got a {thresholds.dtype} tensor; give {accepted}")
        if thresholds.dim() > 1:  # flattened, a [2, 2] would pass as 4 per-exit values (a numpy array is refused too)
            raise ValueError(
                f"thresholds must be a 0-dim or 1-D tensor, got shape {list(thresholds.shape)}; give {accepted}"
            )
        if thresholds.dim() == 0:
            thresholds = float(thresholds)
        else:
            thresholds = thresholds.detach().cpu().tolist()
    if (
        isinstance(thresholds, (set, frozenset, dict))
        or not hasattr(thresholds, "__iter__")
        and not _is_number(thresholds)
    ):
        # A set has no order: which threshold belongs to which exit would be a guess.
        raise TypeError(f"thresholds must be {accepted}; got a {type(thresholds).__name__}")
    if _is_number(thresholds):
        values = [_number(thresholds, accepted)] * n
    else:
        if isinstance(thresholds, (str, bytes)):
            raise TypeError(f"thresholds must be {accepted}; got a {type(thresholds).__name__}")
        values = [_number(t, accepted, i) for i, t in enumerate(thresholds)]
        if len(values) != n:
            raise ValueError(
                f"got {len(values)} thresholds for a model with {n + 1} exits; give one per "
                f"early exit ({n}) or a single float for all"
            )
    for i, v in enumerate(values):
        if math.isnan(v):
            raise ValueError(f"threshold {i} is NaN; give {accepted} (inf means: never exit there)")
    return tuple(values)


_INFINITIES = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


def thresholds_from_json(value):
    """Thresholds as JSON sends them (``/admin/thresholds``, a Ray ``user_config``, a serve
    config's ``thresholds``): numbers, or the strings "inf" / "-inf" (any case; strict JSON has
    no infinite numbers, and the answers and ``/stats`` spell an infinite threshold so), as one
    value or a list. The infinities become floats; anything else is returned as it is, for
    :func:`coerce_thresholds` to take or refuse with its own message."""

    def one(v):
        return _INFINITIES.get(v.strip().lower(), v) if isinstance(v, str) else v

    return [one(v) for v in value] if isinstance(value, list) else one(value)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _number(x, accepted: str, i=None) -> float:
    """One threshold as a float: a real number (Python, numpy or a 0-dim tensor), not a bool and
    not a string ("0.5" would parse, but a file or a form field passing strings is a bug)."""
    where = "thresholds" if i is None else f"threshold {i}"
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x[()]  # as a 0-dim tensor is taken
    if isinstance(x, (bool, np.bool_)) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        raise TypeError(f"{where} is a bool ({x}); give {accepted}")
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.device.type != "meta" and not x.is_complex():
        return float(x)
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{where} is a {type(x).__name__} ({x!r}); give {accepted}")
    try:
        return float(x)
    except OverflowError:  # an int past float's range (float('inf') is how to say "never exit")
        raise ValueError(
            f"{where} is too large for a float (an int past its range); give {accepted} (inf means: never exit there)"
        ) from None


class ThresholdSnapshot:
    """One whole set of thresholds (one float per early exit), never changed after creation.

    ``values`` is the tuple of floats; :meth:`tensor` gives them as a float32 [K-1] tensor on a
    device (made once per device and cached; treat it as read-only)."""

    __slots__ = ("_values", "_tensors", "_lock")
    _values: Tuple[float, ...]
    _tensors: Dict[torch.device, torch.Tensor]
    _lock: threading.Lock

    def __init__(self, values):
        object.__setattr__(self, "_values", tuple(float(v) for v in values))
        object.__setattr__(self, "_tensors", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def __setattr__(self, name, value):
        raise AttributeError("a ThresholdSnapshot is immutable; take a new one with rt.thresholds_snapshot()")

    @property
    def values(self) -> Tuple[float, ...]:
        return self._values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, k: int) -> float:
        return self._values[k]

    def __iter__(self):
        return iter(self._values)

    def __eq__(self, other) -> bool:
        return isinstance(other, ThresholdSnapshot) and other._values == self._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"ThresholdSnapshot({list(self._values)})"

    def tensor(self, device) -> torch.Tensor:
        """The thresholds as a float32 [K-1] tensor on ``device`` (cached; one written in place is
        remade from the floats on the next call)."""
        device = torch.device(device)
        tensors: Dict[torch.device, torch.Tensor] = self._tensors
        t = tensors.get(device)
        # _version counts in-place writes: a caller who wrote the tensor it was given (rt.thresholds_tensor,
        # documented read-only) would otherwise move every later call's thresholds away from rt.thresholds
        # and from what rt.save writes. The snapshot's floats are the truth; the tensor is remade from them.
        if t is None or t._version:
            with self._lock:
                t = tensors.get(device)
                if t is None or t._version:
                    # Not an inference tensor, so callers may copy it into buffers made outside
                    # inference mode (the graph executor's static thresholds).
                    with torch.inference_mode(False):
                        t = torch.tensor(self._values, dtype=torch.float32, device=device)
                    tensors[device] = t
        return t
