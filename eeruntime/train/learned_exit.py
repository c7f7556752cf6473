"""Training BERxiT's learning-to-exit head (:class:`eeruntime.exit_rules.LearnedExit`).

The model (backbone and every exit) is frozen and runs in eval mode: only the LTE head trains.
For each early exit k, with z_k its logits and u_k = sigmoid(LTE(h_k)) the head's certainty,

    t_k = 1[argmax z_k == y],      L = sum_k mean_i (u_k - t_k)^2        (BERxiT's MSE)

so u_k learns to tell whether exit k gets the sample right, and ``u_k >= T`` is an exit rule.
BERxiT alternates this with the exits' own training; here the exits are trained first (any
method of :mod:`eeruntime.train`) and the head after, on their fixed predictions.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..state import call, stage_forward
from ._loop import History, StepResult, check_common, freeze, run


def learned_exit(
    model,
    lte,
    data: Iterable,
    epochs: int,
    lr: float,
    *,
    optimizer="adam",
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
    progress: bool = True,
) -> History:
    """Train ``lte`` (a :class:`~eeruntime.exit_rules.LearnedExit`, moved to the model's device)
    on ``model``'s frozen exits; see the module docstring. Other arguments as in
    :func:`eeruntime.train.joint`. The model's weights, buffers and modes are unchanged afterwards.
    History terms: ``mse_<k>`` per early exit with a head."""
    from ..exit_rules import LearnedExit
    from ..exit_rules.learned import check_pool_for

    if not isinstance(lte, LearnedExit):
        raise TypeError(f"learned_exit trains an ee.exit_rules.LearnedExit, got {type(lte).__name__}")
    check_pool_for(lte, model)
    check_common(model, epochs, lr, weight_decay, optimizer)
    K = len(model.exits)
    was_training = lte.training

    def prepare(x):
        unfreeze = freeze(model.parameters())
        model.eval()
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            lte.to(ref.device)
        lte.train()
        return list(lte.parameters()), unfreeze

    def step(x, y):
        states, outs, state = [], [], x
        with torch.no_grad():
            for stage, head in zip(model.stages, model.exits):
                state = stage_forward(stage, state)
                states.append(state)
                outs.append(call(head, state))
        terms = {}
        for k in range(K - 1):
            a = lte.unit_logit(states[k], k)
            if a is not None:
                right = (outs[k].argmax(dim=1) == y).to(a.dtype)
                terms[f"mse_{k}"] = ((torch.sigmoid(a) - right) ** 2).mean()
        if not terms:
            raise ValueError("the LearnedExit has no head for any early exit of this model")
        return StepResult(sum(terms.values()), terms, outs)

    try:
        return run(
            model,
            data,
            method="learned_exit",
            epochs=epochs,
            lr=lr,
            prepare=prepare,
            step=step,
            optimizer=optimizer,
            weight_decay=weight_decay,
            seed=seed,
            progress=progress,
        )
    finally:
        lte.train(was_training)
