"""PTEE post-training (``002_2ee1ab40923f913f.txt``): exits on a frozen, pretrained backbone.

The stages and the final exit are frozen: ``requires_grad=False`` while training (restored
afterwards) and run in eval mode, so neither their weights nor their BatchNorm running statistics
change (bit-identical afterwards). Pseudo-labels are the final exit's prediction,
``yhat = argmax f_{K-1}(x)``; the true labels are used only for the reported accuracy. With
``f_k`` the logits of early exit k (k = 0..K-2), ``h_k = sigmoid(confidence head k)`` and
``c_k = 1[argmax f_k = yhat]``:

    L = sum_k CE(f_k, yhat)
        + [confidence] sum_k BCE(h_k, c_k)
        + cost_weight * mean_i gamma~_0(x_i)

    gamma~_k = h_k gamma_k + (1 - h_k) gamma~_{k+1},   gamma~_{K-1} = gamma_{K-1}

gamma_k is the FLOPs of leaving at exit k over the backbone's plain FLOPs (see
``_costs.normalised_exit_costs``), so gamma~_0 is the expected cost of a sample when h_k is read
as the probability of leaving at exit k given that it reached it (the PTEE/EENet cost). The
cost term pulls confidences up (exiting earlier is cheaper); the BCE term keeps them honest;
``cost_weight`` is PTEE's lambda. Without confidence heads there is nothing for it to act on, so
``cost_weight > 0`` needs ``confidence=True``.

At inference, :func:`eeruntime.train.confidence_criterion` makes the confidence heads the
runtime's criterion: a sample leaves exit k when h_k >= T (PTEE's single knob T).
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F

from ..heads import ExitHead, equip_heads
from ..state import as_tuple, call, stage_forward
from ._loop import History, StepResult, check_common, check_nonneg, freeze, run, unique_trainable
from .cost_terms import normalised_exit_costs, soft_cost


def post_train_loss(early_logits, pseudo, conf_logits=None, costs=None, cost_weight: float = 0.0):
    """The loss of the module docstring and its parts. ``conf_logits``: the confidence heads'
    pre-sigmoid outputs (None: no confidence term); ``costs``: gamma_0..gamma_{K-1}."""
    terms = {}
    loss = 0.0
    for k, lg in enumerate(early_logits):
        ce = F.cross_entropy(lg, pseudo)
        terms[f"ce_{k}"] = ce
        loss = loss + ce
    if conf_logits is not None:
        for k, (lg, a) in enumerate(zip(early_logits, conf_logits)):
            right = (lg.detach().argmax(1) == pseudo).to(a.dtype)
            bce = F.binary_cross_entropy_with_logits(a, right)
            terms[f"bce_{k}"] = bce
            loss = loss + bce
    if cost_weight > 0:
        if conf_logits is None or costs is None:
            raise ValueError("the cost term needs confidence logits and exit costs")
        cost = soft_cost([torch.sigmoid(a) for a in conf_logits], costs).mean()
        terms["cost"] = cost
        loss = loss + cost_weight * cost
    return loss, terms


def _side_heads(model, keep_confidence: bool) -> List[torch.nn.Module]:
    side = []
    for e in model.exits:
        if isinstance(e, ExitHead):
            if e.gate_head is not None:
                side.append(e.gate_head)
            if e.confidence_head is not None and not keep_confidence:
                side.append(e.confidence_head)
    return side


def post_train(
    model,
    data: Iterable,
    epochs: int,
    lr: float,
    cost_weight: float = 0.0,
    confidence: bool = False,
    *,
    optimizer="adam",
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
    progress: bool = True,
) -> History:
    """Train the early exits of ``model`` (and, with ``confidence=True``, their confidence heads)
    on a frozen backbone, PTEE-style; see the module docstring for the loss.

    Exits that are not :class:`~eeruntime.heads.ExitHead` get wrapped when ``confidence=True``
    (their confidence head reads their logits). Other arguments as in
    :func:`eeruntime.train.joint`. History terms: ``ce_<k>``, ``bce_<k>``, ``cost``; it also
    records each exit's agreement with the pseudo-labels.
    """
    check_common(model, epochs, lr, weight_decay, optimizer)
    cost_weight = check_nonneg("cost_weight", cost_weight)
    if cost_weight > 0 and not confidence:
        raise ValueError(
            "cost_weight > 0 weights the exits by their confidence heads' outputs; pass confidence=True "
            "(or cost_weight=0 to train the early exits on pseudo-labels only)"
        )
    K = len(model.exits)
    costs = []

    def prepare(x):
        if confidence:
            equip_heads(model, confidence=True, example=x)
        if cost_weight > 0:
            costs[:] = normalised_exit_costs(model, x)
        frozen = list(model.stages) + [model.exits[-1]]
        unfreeze = freeze(p for m in frozen for p in m.parameters())
        model.train()
        for m in frozen:
            m.eval()  # BatchNorm statistics of the backbone must not move
        side = {id(p) for h in _side_heads(model, confidence) for p in h.parameters()}
        params = [p for p in unique_trainable(list(model.exits)[:-1]) if id(p) not in side]
        return params, unfreeze

    def step(x, y):
        state = x
        early, conf = [], []
        for k in range(K):
            with torch.no_grad():
                state = stage_forward(model.stages[k], state)
            if k < K - 1:
                head = model.exits[k]
                if confidence:
                    lg, a, _ = head.parts(*as_tuple(state))
                    conf.append(a)
                else:
                    lg = call(head, state)
                early.append(lg)
        with torch.no_grad():
            final = call(model.exits[-1], state)
        pseudo = final.argmax(1)
        loss, terms = post_train_loss(early, pseudo, conf if confidence else None, costs or None, cost_weight)
        return StepResult(loss, terms, [lg.detach() for lg in early] + [final], pseudo_labels=pseudo)

    return run(
        model,
        data,
        method="post_train",
        epochs=epochs,
        lr=lr,
        prepare=prepare,
        step=step,
        optimizer=optimizer,
        weight_decay=weight_decay,
        seed=seed,
        progress=progress,
    )
