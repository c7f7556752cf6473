"""Training multi-exit models: the three methods of the README ("Training exits and choosing thresholds") and their learned criteria.

    ee.train.joint(model, data, epochs, lr, weights=None)              # BranchyNet
    ee.train.post_train(model, data, epochs, lr, cost_weight, confidence)  # PTEE, frozen backbone
    ee.train.differentiable(model, data, epochs, lr, cost_weight)      # gates, soft-conditional output
    ee.train.two_stage(model, data, epochs, lr)                        # DeeBERT: final first, then exits
    ee.train.learned_exit(model, lte, data, epochs, lr)                # BERxiT's learning-to-exit head
    rt = ee.EERuntime(model, 0.5, criterion=ee.train.gate_criterion(model))

``data`` is any iterable of ``(x, y)`` batches, iterated once per epoch. Each method trains on
the model's device, shows tqdm bars (``progress=False`` turns them off), is repeatable with
``seed``, restores the model's train/eval modes and returns a :class:`History`. Empty batches
are skipped; a non-finite loss raises ``FloatingPointError`` before the optimiser steps on it.
"""

from ..heads import equip_heads
from ._loop import History
from .cost_terms import normalised_exit_costs, soft_cost
from .differentiable import differentiable, differentiable_loss, soft_conditional
from .head_criteria import HeadScorer, confidence_criterion, gate_criterion
from .joint import joint, joint_loss
from .learned_exit import learned_exit
from .post_train import post_train, post_train_loss
from .two_stage import two_stage


def add_gates(model, example=None, num_classes=None):
    """Give every early exit a gate (what :func:`differentiable` does first); call it before
    ``load_state_dict`` of a model trained with gates. Returns the indices of changed exits."""
    return equip_heads(model, gate=True, example=example, num_classes=num_classes)


def add_confidence_heads(model, example=None, num_classes=None):
    """Give every early exit a confidence head (what ``post_train(confidence=True)`` does first)."""
    return equip_heads(model, confidence=True, example=example, num_classes=num_classes)


__all__ = [
    "joint",
    "post_train",
    "differentiable",
    "two_stage",
    "learned_exit",
    "History",
    "confidence_criterion",
    "gate_criterion",
    "HeadScorer",
    "add_gates",
    "add_confidence_heads",
    "joint_loss",
    "post_train_loss",
    "differentiable_loss",
    "soft_conditional",
    "soft_cost",
    "normalised_exit_costs",
]
