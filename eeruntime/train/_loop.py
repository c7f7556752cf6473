"""The loop every training method shares: argument checks, device, seed, modes, tqdm, history.

A method supplies ``prepare(x)`` (called on the first batch: adds heads it needs, freezes what
it freezes, sets train/eval modes, returns the parameters to optimise and a callback that undoes
its temporary changes) and ``step(x, y)`` (returns a :class:`StepResult`). The loop owns the
optimiser, iterates ``data`` once per epoch and restores every module's train/eval mode at the end,
whatever happens.
"""

from __future__ import annotations

import collections.abc
import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..model import is_multi_exit
from ..model import model_device as _device_of

OPTIMIZERS = ("adam", "sgd")


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, differentiable
    terms: Dict[str, torch.Tensor]  # scalar parts of the loss, for the history
    logits: Sequence[torch.Tensor]  # every exit's logits [B, C], for per-exit accuracy
    pseudo_labels: Optional[torch.Tensor] = None  # post-training's targets, for agreement


@dataclass
class History:
    """What a training run saw, per epoch (means over the training samples of that epoch).

    ``loss``: total loss; ``terms``: each part of the loss by name; ``exit_accuracy[e][k]``:
    accuracy of exit k against the labels on the training batches of epoch e (taken in training
    mode, before each optimiser step); ``exit_agreement`` (post-training only): agreement of
    exit k with the pseudo-labels; ``samples``: samples per epoch. ``history["loss"]`` works too.
    """

    method: str
    num_exits: int
    loss: List[float] = field(default_factory=list)
    terms: Dict[str, List[float]] = field(default_factory=dict)
    exit_accuracy: List[List[float]] = field(default_factory=list)
    exit_agreement: Optional[List[List[float]]] = None
    samples: List[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "num_exits": self.num_exits,
            "loss": list(self.loss),
            "terms": {k: list(v) for k, v in self.terms.items()},
            "exit_accuracy": [list(a) for a in self.exit_accuracy],
            "exit_agreement": None if self.exit_agreement is None else [list(a) for a in self.exit_agreement],
            "samples": list(self.samples),
        }

    def __getitem__(self, key: str):
        return self.to_dict()[key]


def model_device(model) -> torch.device:
    return _device_of(model) or torch.device("cpu")


def check_common(model, epochs, lr, weight_decay, optimizer) -> None:
    if not is_multi_exit(model):
        raise TypeError(
            f"training needs a MultiExitModel (an nn.Module with stages and exits), got {type(model).__name__}; "
            "build one with ee.MultiExitModel(stages, exits) or ee.attach_exits(backbone, at=[...])"
        )
    if len(model.exits) < 2:
        raise ValueError(
            f"the model has {len(model.exits)} exit(s); early-exit training needs at least one early exit and the final one"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if not (optimizer in OPTIMIZERS or callable(optimizer)):
        raise ValueError(
            f"optimizer must be one of {OPTIMIZERS} or a callable (params, lr) -> torch.optim.Optimizer, got {optimizer!r}"
        )


def check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def _make_optimizer(optimizer, params, lr, weight_decay):
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    opt = optimizer(params, lr)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"the optimizer callable must return a torch.optim.Optimizer, got {type(opt).__name__}")
    return opt


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t.to(device, non_blocking=True) for t in x)
    raise TypeError(f"a batch's x must be a tensor or a tuple of tensors, got {type(x).__name__}")


class LabelError(ValueError):
    """Class indices a loss cannot index with; :func:`run` adds which batch carried them."""


# The labels of the batch the loop is stepping on and their largest value, found once before they
# moved to the device: the losses compare it with their logits' width without a reduction (and a
# device round trip) of their own. Only for that very tensor: pseudo-labels are other targets.
_BATCH_LABELS: contextvars.ContextVar[Optional[Tuple[torch.Tensor, int]]] = contextvars.ContextVar(
    "eeruntime_train_batch_labels", default=None
)


def _range_error(C: int, bad: int) -> LabelError:
    return LabelError(f"labels must be class indices in [0, {C}) (the exits' logits have {C} classes), got {bad}")


def check_classes(scores: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse integer targets ``y`` outside ``[0, C)`` for ``scores`` [B, C] with a
    :class:`LabelError`, before cross_entropy / nll_loss index with them (an IndexError on CPU, a
    device-side assert that ends the process's CUDA context on a GPU). Floating targets (class
    probabilities) are left to the loss. Inside :func:`run` the batch's maximum is known already
    (its minimum was checked there); elsewhere one min/max reduction finds both."""
    if y.is_floating_point() or y.numel() == 0:
        return
    C = int(scores.shape[-1])
    known = _BATCH_LABELS.get()
    if known is not None and known[0] is y:
        hi = known[1]
    else:
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0:
            raise _range_error(C, lo)
    if hi >= C:
        raise _range_error(C, hi)


def _labels(y, where: str, classes: Optional[int]) -> Optional[int]:
    """Check a batch's labels before anything runs on them: a 1-D integer tensor, no label
    negative. Returns the largest label (None for an empty batch), found where ``y`` lies (on the
    CPU before it moves, for the usual loaders: no device round trip). ``classes``: the logits'
    width seen on an earlier batch, for the message."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{where}: y must be a tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise TypeError(
            f"{where}: y must be a 1-D integer tensor of class indices [B], got {y.dtype} of shape {tuple(y.shape)}"
        )
    if y.numel() == 0:
        return None
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0:
        raise ValueError(f"{where}: labels must be class indices in [0, {classes or 'num_classes'}), got {lo}")
    return hi


def _check_rows(x, y: torch.Tensor, where: str) -> None:
    rows = [int(t.shape[0]) if t.dim() else None for t in (x if isinstance(x, tuple) else (x,))]
    if any(r != y.shape[0] for r in rows):
        shown = rows[0] if len(set(rows)) == 1 else rows
        raise ValueError(f"{where}: {y.shape[0]} labels for {shown} samples; y must hold one class index per row of x")


def _seeded(seed: Optional[int], device: torch.device):
    if seed is None:
        return contextlib.nullcontext()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")

    @contextlib.contextmanager
    def ctx():
        # Own RNG stream for the run; the caller's global RNG state is left as it was.
        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return ctx()


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from ..progress import bar

    return bar(iterable, total=total, desc=desc)


def run(
    model,
    data: Iterable,
    *,
    method: str,
    epochs: int,
    lr: float,
    prepare: Callable,
    step: Callable[..., StepResult],
    optimizer="adam",
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
    progress: bool = True,
) -> History:
    device = model_device(model)
    K = len(model.exits)
    history = History(method=method, num_exits=K)
    if isinstance(data, collections.abc.Iterator) and epochs > 1:
        raise TypeError(
            f"data is a one-shot iterator but epochs={epochs}; pass something iterable once per epoch "
            "(a list of (x, y) batches, a DataLoader, ee.data.Batches)"
        )
    modes = {m: m.training for m in model.modules()}
    classes: Optional[int] = None  # the logits' width, once a batch has shown it
    undo = None
    opt = None
    try:
        with _seeded(seed, device):
            for epoch in range(epochs):
                sums: Dict[str, float] = {}
                correct = torch.zeros(K, dtype=torch.int64, device=device)
                agree = torch.zeros(K, dtype=torch.int64, device=device)
                seen = 0
                total = len(data) if isinstance(data, collections.abc.Sized) else None
                bar = _progress(data, total, f"{method} {epoch + 1}/{epochs}", progress)
                for i, batch in enumerate(bar):
                    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                        raise TypeError(f"data must yield (x, y) pairs, got {type(batch).__name__}")
                    where = f"{method}: batch {i} of epoch {epoch + 1}"
                    hi = _labels(batch[1], where, classes)
                    x = _to_device(batch[0], device)
                    _check_rows(x, batch[1], where)
                    y = batch[1].to(device, dtype=torch.int64, non_blocking=True)
                    if hi is None:
                        # An empty batch has a NaN mean loss (the epoch's history became NaN) and
                        # Adam still stepped on it (momentum moved the weights): skip it.
                        continue
                    if opt is None:
                        params, undo = prepare(x)
                        if not params:
                            raise ValueError(
                                f"{method}: nothing to train (every parameter it trains has requires_grad=False)"
                            )
                        opt = _make_optimizer(optimizer, params, lr, weight_decay)
                    buffers = [(b, b.detach().clone()) for b in model.buffers()]
                    token = _BATCH_LABELS.set((y, hi))
                    try:
                        out = step(x, y)
                        for lg in out.logits:  # methods that do not index a loss with y (post_train)
                            check_classes(lg, y)
                    except LabelError as e:
                        # The forward pass already fed the batch to BatchNorm's running statistics.
                        _restore(buffers)
                        raise ValueError(f"{where}: {e}") from None
                    finally:
                        _BATCH_LABELS.reset(token)
                    if not bool(torch.isfinite(out.loss.detach())):
                        # Stepping on it would turn every trained weight into NaN, silently; the
                        # forward pass already fed the batch to BatchNorm's running statistics.
                        _restore(buffers)
                        raise FloatingPointError(
                            f"{method}: the loss is {float(out.loss.detach())} on batch {i} of epoch {epoch + 1} "
                            "(NaN or inf in that batch's inputs, or a learning rate too high); training stopped "
                            "before stepping on it: the model keeps its weights and statistics of the last finite step"
                        )
                    classes = int(out.logits[-1].shape[-1])
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    B = y.shape[0]
                    seen += B
                    for name, v in (("loss", out.loss), *out.terms.items()):
                        sums[name] = sums.get(name, 0.0) + float(v.detach()) * B
                    with torch.no_grad():
                        for k, lg in enumerate(out.logits):
                            pred = lg.argmax(1)
                            correct[k] += (pred == y).sum()
                            if out.pseudo_labels is not None:
                                agree[k] += (pred == out.pseudo_labels).sum()
                    if progress and hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
                if seen == 0:
                    raise ValueError(
                        f"data yielded no batches in epoch {epoch + 1}"
                        + (
                            "; it must be iterable once per epoch (a list, a DataLoader, ee.data.Batches)"
                            if epoch
                            else ""
                        )
                    )
                history.loss.append(sums.pop("loss") / seen)
                for name, total_v in sums.items():
                    history.terms.setdefault(name, []).append(total_v / seen)
                history.exit_accuracy.append((correct.double() / seen).tolist())
                if out.pseudo_labels is not None:
                    history.exit_agreement = history.exit_agreement or []
                    history.exit_agreement.append((agree.double() / seen).tolist())
                history.samples.append(seen)
    finally:
        if opt is not None:  # no gradients left on the caller's parameters, whatever happened
            opt.zero_grad(set_to_none=True)
        if undo is not None:
            undo()
        top = modes.get(model, model.training)
        for m in model.modules():
            # Modules added during training (heads, gates) follow the model's own mode.
            m.training = modes.get(m, top)
    return history


def _restore(buffers) -> None:
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)


def freeze(params) -> Callable[[], None]:
    """Set ``requires_grad=False`` on ``params``; the returned callback restores each flag."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)

    def restore():
        for p, f in zip(params, flags):
            p.requires_grad_(f)

    return restore


def unique_trainable(modules) -> List[torch.nn.Parameter]:
    """Parameters of ``modules`` that require grad, each once, in registration order."""
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
