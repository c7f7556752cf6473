"""Differentiable branching (``004_8592c8e84313b9cf.txt``): gates learn where samples exit.

Each early exit b (0-based k = 0..K-2) has a gate g_k(x) = sigmoid(a_k) in (0, 1), a one-unit head
on the exit's features (``ExitHead.gate_head``; added by this method when missing). The soft-
conditional output mixes the exits' *class probabilities* p_k = softmax(f_k):

    p~_{K-1} = p_{K-1}                        (the final exit, gate 1)
    p~_k     = g_k p_k + (1 - g_k) p~_{k+1}

A mixture of distributions is a distribution, so the loss is the NLL of its log (mixing logits
instead would mix scales that mean nothing across exits). It is computed in log space,
log p~_k = logaddexp(log g_k + log p_k, log(1 - g_k) + log p~_{k+1}), with log g = logsigmoid(a)
and log(1 - g) = logsigmoid(-a), so no probability underflows. The cost follows the same
recursion with gamma_k the FLOPs of leaving at exit k over the plain backbone's FLOPs:

    gamma~_k = g_k gamma_k + (1 - g_k) gamma~_{k+1},   gamma~_{K-1} = gamma_{K-1}
    L = -mean_i log p~_0(x_i)[y_i] + cost_weight * mean_i gamma~_0(x_i)

Everything trains: stages, exits and gates (confidence heads are left alone). At inference,
:func:`eeruntime.train.gate_criterion` makes the gates the runtime's criterion: a sample leaves
exit k when g_k >= T (0.5 by default, the runtime's default for callables).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..heads import ExitHead, equip_heads
from ..state import as_tuple, call, stage_forward
from ._loop import History, StepResult, check_classes, check_common, check_nonneg, run, unique_trainable
from .cost_terms import normalised_exit_costs, soft_cost


def soft_conditional(logits: Sequence[torch.Tensor], gate_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log p~_0 [B, C] from every exit's logits (K of them, final last) and the K-1 early gates'
    pre-sigmoid outputs a_k [B]."""
    if len(gate_logits) != len(logits) - 1:
        raise ValueError(f"need one gate per early exit ({len(logits) - 1}), got {len(gate_logits)}")
    log_p = F.log_softmax(logits[-1], dim=1)
    for k in range(len(logits) - 2, -1, -1):
        a = gate_logits[k].unsqueeze(1)
        log_p = torch.logaddexp(F.logsigmoid(a) + F.log_softmax(logits[k], dim=1), F.logsigmoid(-a) + log_p)
    return log_p


def differentiable_loss(logits, gate_logits, y, costs=None, cost_weight: float = 0.0):
    """The loss of the module docstring and its parts (``ce``, ``cost``)."""
    for lg in logits:
        check_classes(lg, y)
    ce = F.nll_loss(soft_conditional(logits, gate_logits), y)
    terms = {"ce": ce}
    loss = ce
    if cost_weight > 0:
        cost = soft_cost([torch.sigmoid(a) for a in gate_logits], costs).mean()
        terms["cost"] = cost
        loss = loss + cost_weight * cost
    return loss, terms


def differentiable(
    model,
    data: Iterable,
    epochs: int,
    lr: float,
    cost_weight: float = 0.0,
    *,
    optimizer="adam",
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
    progress: bool = True,
) -> History:
    """Train ``model`` end to end through its gates' soft-conditional output; see the module
    docstring for the loss. Early exits without a gate get one (exits that are not
    :class:`~eeruntime.heads.ExitHead` are wrapped; their gate reads their logits), so the gates
    are saved with ``model.state_dict()`` (``exits.<k>.gate_head.*``). Other arguments as in
    :func:`eeruntime.train.joint`. History terms: ``ce``, ``cost``.
    """
    check_common(model, epochs, lr, weight_decay, optimizer)
    cost_weight = check_nonneg("cost_weight", cost_weight)
    K = len(model.exits)
    costs = []

    def prepare(x):
        equip_heads(model, gate=True, example=x)
        if cost_weight > 0:
            costs[:] = normalised_exit_costs(model, x)
        model.train()
        conf = {
            id(p)
            for e in model.exits
            if isinstance(e, ExitHead) and e.confidence_head is not None
            for p in e.confidence_head.parameters()
        }
        return [p for p in unique_trainable([model.stages, model.exits]) if id(p) not in conf], None

    def step(x, y):
        state = x
        logits, gates = [], []
        for k in range(K):
            state = stage_forward(model.stages[k], state)
            if k < K - 1:
                lg, _, a = model.exits[k].parts(*as_tuple(state))
                gates.append(a)
            else:
                lg = call(model.exits[k], state)
            logits.append(lg)
        loss, terms = differentiable_loss(logits, gates, y, costs or None, cost_weight)
        return StepResult(loss, terms, [lg.detach() for lg in logits])

    return run(
        model,
        data,
        method="differentiable",
        epochs=epochs,
        lr=lr,
        prepare=prepare,
        step=step,
        optimizer=optimizer,
        weight_decay=weight_decay,
        seed=seed,
        progress=progress,
    )
