"""``exit_decision``: softmax, confidence score and exit flag for every row of a logits batch.

Backends, in priority order: ``triton`` (CUDA tensors; CPU tensors only when forced and
``TRITON_INTERPRET=1``), ``cpp`` (the fused C++ CPU kernel of ``eeruntime._C``), ``torch`` (the
reference below, any device).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from ..criteria import CRITERIA, Criterion, check_criterion
from . import dispatch
from ._ext_backend import EXIT_DECISION_CPP
from ._triton_backend import EXIT_DECISION_TRITON

Threshold = Union[float, int, torch.Tensor]


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, C], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one class (C >= 1)")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")


def _check_threshold_tensor(threshold: torch.Tensor) -> None:
    if threshold.numel() != 1:
        raise ValueError(f"threshold must be a float or a one-element tensor, got shape {tuple(threshold.shape)}")
    # a complex threshold has no order to compare with (its .to(float32) would drop the imaginary
    # part with only a warning), and a meta tensor has no value to read
    if threshold.is_complex():
        raise TypeError(f"threshold must be a real number, got a {threshold.dtype} tensor")
    if threshold.device.type == "meta":
        raise ValueError("threshold is a meta tensor (no value); give a float or a one-element tensor with a value")


def _threshold_tensor(threshold: Threshold, device: torch.device) -> torch.Tensor:
    """The threshold as a 0-dim float32 tensor on ``device`` (no copy when already so)."""
    if isinstance(threshold, torch.Tensor):
        _check_threshold_tensor(threshold)
        return threshold.reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(threshold, (float, int)) and not isinstance(threshold, bool):
        return torch.tensor(float(threshold), dtype=torch.float32, device=device)
    raise TypeError(f"threshold must be a float or a one-element tensor, got {type(threshold).__name__}")


def confidence_ref(logits: torch.Tensor, criterion: str = "entropy") -> torch.Tensor:
    """Reference confidence score per row, float32 [B], with ``torch.softmax`` semantics.

    p = softmax(logits) computed in float32;
    entropy      H = -sum_c p_c log p_c (0 log 0 = 0, nats)
    max_prob     max_c p_c
    margin       p_(1) - p_(2), the two largest (p_(2) = 0 when C = 1)
    norm_entropy 1 - H / log C  (1 when C = 1)
    A row holding NaN (or +inf, whose softmax is NaN) scores NaN.
    """
    x = logits.float()
    p = torch.softmax(x, dim=1)
    if criterion == "entropy":
        return -torch.special.xlogy(p, p).sum(dim=1)
    if criterion == "max_prob":
        return p.max(dim=1).values
    if criterion == "margin":
        if p.shape[1] == 1:
            return p[:, 0]
        top = p.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    if criterion == "norm_entropy":
        h = -torch.special.xlogy(p, p).sum(dim=1)
        C = p.shape[1]
        if C == 1:
            return torch.where(torch.isnan(h), h, torch.ones_like(h))
        return 1.0 - h / math.log(C)
    raise ValueError(f"unknown criterion {criterion!r}; accepted: {', '.join(map(repr, CRITERIA))}")


def exits_from_scores(conf: torch.Tensor, threshold: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """The exit flag from a score: entropy exits when below, the rest when at or above. NaN never exits."""
    if criterion == "entropy":
        return conf < threshold
    return conf >= threshold


def exit_decision_ref(
    logits: torch.Tensor, threshold: Threshold, criterion: str = "entropy", return_argmax: bool = False
) -> Tuple[torch.Tensor, ...]:
    """Plain-PyTorch exit decision: the CPU fallback and the test oracle of the fast backends."""
    conf = confidence_ref(logits, criterion)
    mask = exits_from_scores(conf, _threshold_tensor(threshold, logits.device), criterion)
    if return_argmax:
        return conf, mask, logits.argmax(dim=1)
    return conf, mask


def _torch_why_not(
    logits: torch.Tensor, threshold: Threshold, criterion: str, return_argmax: bool, *, forced: bool
) -> Optional[str]:
    return None


# The backend table, tried in this order by ``auto``: Triton (CUDA tensors), the fused C++ CPU
# kernel, the reference.
dispatch.table(
    "exit_decision",
    [EXIT_DECISION_TRITON, EXIT_DECISION_CPP, dispatch.Backend("torch", exit_decision_ref, _torch_why_not)],
)


def exit_decision(
    logits: torch.Tensor,
    threshold: Threshold,
    criterion: str = "entropy",
    *,
    backend: str = "auto",
    return_argmax: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Confidence score (float32 [B]) and exit flag (bool [B]) of each row of ``logits`` [B, C].

    ``criterion``: ``"entropy"`` exits when H < threshold; ``"max_prob"``, ``"margin"`` and
    ``"norm_entropy"`` exit when score >= threshold. ``threshold`` is a real number (Python or
    numpy) or a one-element real tensor (a device tensor lets a captured CUDA graph see new
    values). With ``return_argmax`` a third tensor, the int64 argmax per row, is returned. ``backend``: ``"auto"`` or one of
    ``dispatch.backends("exit_decision")``.
    """
    _check_logits(logits)
    if not isinstance(criterion, str) or callable(criterion):
        raise ValueError(
            f"exit_decision takes a named criterion ({', '.join(map(repr, CRITERIA))}); "
            "a callable criterion is applied by EERuntime itself"
        )
    check_criterion(criterion)
    if not isinstance(threshold, (torch.Tensor, float, int)):
        # a real number of another type (numpy's float32, int64, ...): a Python float for every
        # backend (numpy's bool is no numbers.Real: it falls through to the backends' TypeError)
        if isinstance(threshold, numbers.Real):
            threshold = float(threshold)
    b = dispatch.select("exit_decision", backend, logits, threshold, criterion, return_argmax)
    return b.fn(logits, threshold, criterion, return_argmax)
