"""BranchyNet joint training (``001_42c1b1a52ffc3920.txt``): every exit and the backbone train together.

    L = sum_n w_n * CE(exit_n(x), y)

CE is the batch mean of the cross-entropy of exit n's logits. Weights default to 1 for every exit
(BranchyNet's slides use 1 for the early exits and 0.3 for the last; pass ``weights`` for that).
Confidence heads and gates are not part of this loss and are left untouched.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..heads import ExitHead
from ._loop import History, StepResult, check_classes, check_common, run, unique_trainable


def joint_loss(logits: Sequence[torch.Tensor], y: torch.Tensor, weights: Sequence[float]):
    """``sum_n w_n CE(logits[n], y)`` and the per-exit CE values."""
    for lg in logits:
        check_classes(lg, y)
    ces = [F.cross_entropy(lg, y) for lg in logits]
    return sum(w * ce for w, ce in zip(weights, ces)), ces


def _check_weights(weights, K: int) -> List[float]:
    if weights is None:
        return [1.0] * K
    if isinstance(weights, (str, bytes)):  # "113" read as [1.0, 1.0, 3.0] before
        raise TypeError(f"weights must be a sequence of {K} floats (one per exit), got {type(weights).__name__}")
    try:
        w = [float(v) for v in weights]
    except TypeError:
        raise TypeError(
            f"weights must be a sequence of {K} floats (one per exit), got {type(weights).__name__}"
        ) from None
    if len(w) != K:
        raise ValueError(f"got {len(w)} weights for a model with {K} exits; give one per exit, the final exit last")
    if any(not (v >= 0) or v == float("inf") for v in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    if sum(w) == 0:
        raise ValueError("at least one exit weight must be > 0")
    return w


def exit_classifier_params(model) -> List[torch.nn.Parameter]:
    """Stages and exits, without confidence heads and gates (those have their own objectives)."""
    side: set = set()  # ids of the side heads' parameters
    for e in model.exits:
        if isinstance(e, ExitHead):
            for h in (e.confidence_head, e.gate_head):
                if h is not None:
                    side.update(id(p) for p in h.parameters())
    return [p for p in unique_trainable([model.stages, model.exits]) if id(p) not in side]


def joint(
    model,
    data: Iterable,
    epochs: int,
    lr: float,
    weights: Optional[Sequence[float]] = None,
    *,
    optimizer="adam",
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
    progress: bool = True,
) -> History:
    """Train the stages and the exits of ``model`` on ``data`` with BranchyNet's weighted loss.

    Args:
        model: a ``MultiExitModel``; trained in place on its own device.
        data: an iterable of ``(x, y)`` batches, iterated once per epoch.
        epochs, lr: passes over ``data`` and the learning rate.
        weights: one weight per exit, the final exit last (default all 1).
        optimizer: ``"adam"``, ``"sgd"`` (momentum 0.9) or ``f(params, lr) -> Optimizer``.
        weight_decay: L2 penalty of the built-in optimisers.
        seed: makes a run repeatable (same data order, same result on CPU) without touching the
            caller's global RNG.
        progress: tqdm bars per epoch.

    Parameters with ``requires_grad=False`` stay as they are. The model's train/eval modes are
    restored afterwards. Returns a :class:`~eeruntime.train.History` with terms ``ce_<k>``.
    """
    check_common(model, epochs, lr, weight_decay, optimizer)
    w = _check_weights(weights, len(model.exits))

    def prepare(x):
        model.train()
        return exit_classifier_params(model), None

    def step(x, y):
        outs = model(x)
        loss, ces = joint_loss(outs, y, w)
        return StepResult(loss, {f"ce_{k}": ce for k, ce in enumerate(ces)}, [o.detach() for o in outs])

    return run(
        model,
        data,
        method="joint",
        epochs=epochs,
        lr=lr,
        prepare=prepare,
        step=step,
        optimizer=optimizer,
        weight_decay=weight_decay,
        seed=seed,
        progress=progress,
    )
