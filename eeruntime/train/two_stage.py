"""DeeBERT's two-stage highway training (Xin et al., ACL 2020).

Stage 1 trains the backbone and the final classifier alone, ``L_1 = CE(f_{K-1}(x), y)``: the
early exits ("highways") neither train nor move (they run in eval mode, without gradients, only
for the reported accuracy). Stage 2 freezes the backbone and the final classifier
(``requires_grad=False`` while it runs, eval mode so BatchNorm statistics stay) and trains the
early exits on the true labels, ``L_2 = sum_{k < K-1} CE(f_k(x), y)``. The final exit is then
exactly what stage 1 made it, bit for bit: adding exits never costs the full model accuracy.
At inference DeeBERT exits on entropy (``criterion="entropy"``).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..state import call, stage_forward
from ._loop import History, StepResult, check_classes, check_common, freeze, run, unique_trainable
from .joint import exit_classifier_params

STAGES = (None, "backbone", "exits")


def _stage_outputs(model, x, grad_stages: bool, grad_exits):
    """Every exit's logits; the stages run with gradients when ``grad_stages``, exit k with
    gradients when ``grad_exits(k)``."""
    outs, state = [], x
    for k, (stage, head) in enumerate(zip(model.stages, model.exits)):
        with torch.set_grad_enabled(grad_stages):
            state = stage_forward(stage, state)
        with torch.set_grad_enabled(grad_exits(k)):
            outs.append(call(head, state))
    return outs


def two_stage(
    model,
    data: Iterable,
    epochs: int,
    lr: float,
    exit_epochs: Optional[int] = None,
    exit_lr: Optional[float] = None,
    *,
    only: Optional[str] = None,
    optimizer="adam",
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
    progress: bool = True,
) -> Tuple[Optional[History], Optional[History]]:
    """Train ``model`` DeeBERT's way (module docstring): ``epochs`` / ``lr`` for stage 1 (backbone
    and final exit), ``exit_epochs`` / ``exit_lr`` for stage 2 (early exits on the frozen
    backbone; default: the same as stage 1). Other arguments as in :func:`eeruntime.train.joint`.
    ``only="backbone"`` or ``only="exits"`` runs one stage (its history in its slot, None in
    the other). Returns the two stages' histories (terms ``ce_final``; ``ce_<k>`` per early exit)."""
    if only not in STAGES:
        raise ValueError(f"only must be one of {STAGES}, got {only!r}")
    check_common(model, epochs, lr, weight_decay, optimizer)
    exit_epochs = epochs if exit_epochs is None else exit_epochs
    exit_lr = lr if exit_lr is None else exit_lr
    check_common(model, exit_epochs, exit_lr, weight_decay, optimizer)
    K = len(model.exits)
    early = list(model.exits)[:-1]
    head_ids = {id(p) for p in exit_classifier_params(model)}

    def prepare_backbone(x):
        model.train()
        for e in early:
            e.eval()  # the highways' BatchNorm statistics must not move in stage 1
        params = [p for p in unique_trainable([model.stages, model.exits[-1]]) if id(p) in head_ids]
        return params, None

    def step_backbone(x, y):
        outs = _stage_outputs(model, x, True, lambda k: k == K - 1)
        check_classes(outs[-1], y)
        ce = F.cross_entropy(outs[-1], y)
        return StepResult(ce, {"ce_final": ce}, [o.detach() for o in outs])

    def prepare_exits(x):
        frozen = list(model.stages) + [model.exits[-1]]
        unfreeze = freeze(p for m in frozen for p in m.parameters())
        model.train()
        for m in frozen:
            m.eval()
        params = [p for p in unique_trainable(early) if id(p) in head_ids]
        return params, unfreeze

    def step_exits(x, y):
        outs = _stage_outputs(model, x, False, lambda k: k < K - 1)
        for o in outs[:-1]:
            check_classes(o, y)
        ces = [F.cross_entropy(o, y) for o in outs[:-1]]
        return StepResult(sum(ces), {f"ce_{k}": ce for k, ce in enumerate(ces)}, [o.detach() for o in outs])

    common = dict(optimizer=optimizer, weight_decay=weight_decay, seed=seed, progress=progress)
    first = second = None
    if only != "exits":
        first = run(
            model,
            data,
            method="two_stage:backbone",
            epochs=epochs,
            lr=lr,
            prepare=prepare_backbone,
            step=step_backbone,
            **common,
        )
    if only != "backbone":
        second = run(
            model,
            data,
            method="two_stage:exits",
            epochs=exit_epochs,
            lr=exit_lr,
            prepare=prepare_exits,
            step=step_exits,
            **common,
        )
    return first, second
