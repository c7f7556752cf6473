"""The calibration cache: one pass of the model over labelled data with every exit on.

Per sample and exit it keeps the criterion's score (computed exactly as the runtime computes it),
the prediction, whether it is right, and the EENet features; plus the cost of leaving at each exit.
Every threshold search then runs on these arrays, never on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch

from ..cost import CostModel
from ..criteria import FINAL_MODES, Criterion, check_criterion
from ..eenet import DEFAULT_TOP_K, exit_features
from ..model import is_multi_exit, model_device, set_eval
from ..ops.exit_decision import confidence_ref
from ..scoring import Scorer
from ..state import as_tuple, call, check_state, from_tuple, stage_forward
from .cost_source import resolve_costs


@dataclass
class ScoreCache:
    """Arrays over N samples and K exits (numpy, CPU).

    ``scores`` float32 [N, K]: the criterion's score of each exit's output (the final exit's is
    only reported, never compared). ``preds`` int64 [N, K] and ``correct`` bool [N, K]: the
    argmax of each exit's output and whether it equals the label; the final exit's output is the
    mean of all exits' logits when ``final == "average"``. ``features`` float64 [N, K, top_k+1]:
    :func:`eeruntime.eenet.exit_features` of each exit's output. ``cost``: the cost model whose
    ``cumulative[k]`` is the cost of a sample leaving at exit k.
    """

    criterion: Criterion
    final: str
    scores: np.ndarray
    preds: np.ndarray
    correct: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    cost: CostModel
    cost_unit: str = "flops"
    top_k: int = DEFAULT_TOP_K

    @property
    def num_samples(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.scores.shape[1])

    @property
    def cumulative(self) -> np.ndarray:
        return np.asarray(self.cost.cumulative, dtype=np.float64)

    @property
    def lower_is_confident(self) -> bool:
        return self.criterion == "entropy"

    @property
    def final_accuracy(self) -> float:
        return float(self.correct[:, -1].mean())

    @classmethod
    def from_logits(
        cls,
        exit_logits: Sequence[torch.Tensor],
        labels: torch.Tensor,
        cost: CostModel,
        criterion: str = "entropy",
        final: str = "last",
        *,
        cost_unit: str = "custom",
        top_k: int = DEFAULT_TOP_K,
    ) -> ScoreCache:
        """A cache from every exit's logits ([N, C] each) of a named criterion, without a model
        (scores from ``ops.confidence_ref``)."""
        criterion = check_criterion(criterion)
        if not isinstance(criterion, str):
            raise ValueError(
                "ScoreCache.from_logits takes a named criterion; a callable needs the model pass (build_cache)"
            )
        _check_final(final)
        if len(exit_logits) < 2:
            raise ValueError(f"calibration needs at least two exits (one early exit), got {len(exit_logits)}")
        acc = _Accumulator(len(exit_logits), criterion, final, top_k)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D tensor of integer class indices, got {labels.dtype} {tuple(labels.shape)}"
            )
        acc.add_outputs(_outputs(list(exit_logits), final), labels, lambda out, k: confidence_ref(out, criterion))
        return acc.finish(cost, cost_unit)

    def outcome(self, thresholds: Sequence[float]) -> Outcome:
        """Exit index, exit fractions, accuracy and expected cost of a threshold setting."""
        from .search import exit_indices

        t = np.asarray(thresholds, dtype=np.float32)
        if t.shape != (self.num_exits - 1,):
            raise ValueError(f"need {self.num_exits - 1} thresholds, got {t.shape[0] if t.ndim else 'a scalar'}")
        idx = exit_indices(self.scores, t, self.lower_is_confident)
        counts = np.bincount(idx, minlength=self.num_exits)
        N = self.num_samples
        n_correct = int(self.correct[np.arange(N), idx].sum())
        return Outcome(
            exit_index=idx,
            exit_fractions=[float(c) / N for c in counts],
            accuracy=n_correct / N,
            expected_cost=float(np.dot(counts, self.cumulative)) / N,
        )


@dataclass
class Outcome:
    exit_index: np.ndarray
    exit_fractions: List[float]
    accuracy: float
    expected_cost: float


def _check_final(final: str) -> None:
    if final not in FINAL_MODES:
        raise ValueError(f"unknown final mode {final!r}; accepted: {', '.join(map(repr, FINAL_MODES))}")


def _outputs(logits: List[torch.Tensor], final: str) -> List[torch.Tensor]:
    """Each exit's output as the runtime forms it: the final one averaged over exits in
    ``"average"`` mode (the same float32 running sum as the runtime)."""
    widths = [o.shape[1] if isinstance(o, torch.Tensor) and o.dim() == 2 else None for o in logits]
    for k, c in enumerate(widths):
        if c is not None and widths[0] is not None and c != widths[0]:
            # The runtime refuses such a model; a calibration of it compared exit 0's argmax with
            # labels checked against the final exit's classes only.
            raise ValueError(
                f"exit {k} returns {c} classes but exit 0 returns {widths[0]}; every exit must predict the same classes"
            )
    if final != "average":
        return logits
    acc = None
    for x in logits:
        acc = x.float() if acc is None else acc + x.float()
    return logits[:-1] + [(acc / len(logits)).to(logits[-1].dtype)]


class _Accumulator:
    def __init__(self, K: int, criterion, final: str, top_k: int):
        self.K, self.criterion, self.final, self.top_k = K, criterion, final, top_k
        self.scores, self.preds, self.labels, self.features = [], [], [], []

    def add_outputs(self, outs: List[torch.Tensor], y: torch.Tensor, score_fn) -> None:
        n = y.shape[0]
        for k, out in enumerate(outs):
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"exit {k} must give logits [B, C] with B = {n} rows, got {shape}")
        C = outs[-1].shape[1]
        if n and (int(y.min()) < 0 or int(y.max()) >= C):
            bad = y[(y < 0) | (y >= C)]
            seen = sum(len(v) for v in self.labels)
            first = int(((y < 0) | (y >= C)).nonzero()[0, 0]) + seen
            raise ValueError(
                f"calibration labels must be class indices in [0, {C}) (the model's exits give {C} classes); "
                f"got {int(bad[0])} for sample {first} ({bad.numel()} out of range in this batch)"
            )
        self.scores.append(torch.stack([score_fn(o, k).float().cpu() for k, o in enumerate(outs)], dim=1).numpy())
        self.preds.append(torch.stack([o.argmax(dim=1).cpu() for o in outs], dim=1).numpy())
        self.features.append(torch.stack([exit_features(o, self.top_k).cpu() for o in outs], dim=1).numpy())
        self.labels.append(y.detach().cpu().numpy().astype(np.int64))

    def finish(self, cost: CostModel, cost_unit: str) -> ScoreCache:
        if not self.labels or sum(len(y) for y in self.labels) == 0:
            raise ValueError("calibration data is empty: it yielded no samples")
        if cost.num_exits != self.K:
            raise ValueError(f"the cost model has {cost.num_exits} exits but the model has {self.K}")
        if not cost.plain > 0:
            # every threshold would cost the same (relative costs NaN, a budget a division by zero)
            raise ValueError(
                f"the cost model gives the full model a cost of {cost.plain}; calibration weighs exits by "
                "their cost and needs a full-model cost > 0"
            )
        labels = np.concatenate(self.labels)
        preds = np.concatenate(self.preds)
        return ScoreCache(
            criterion=self.criterion,
            final=self.final,
            scores=np.ascontiguousarray(np.concatenate(self.scores), dtype=np.float32),
            preds=preds,
            correct=preds == labels[:, None],
            labels=labels,
            features=np.concatenate(self.features),
            cost=cost,
            cost_unit=cost_unit,
            top_k=self.top_k,
        )


def _is_state(x) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, tuple) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)
    )


def _check_labels(y, B: int, where: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"{where}: labels are missing; calibration needs (inputs, labels) pairs")
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != B:
        raise ValueError(f"{where}: labels must be a 1-D tensor of {B} class indices, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be integer class indices, got {y.dtype}")
    return y.long()


def labelled_batches(data, batch_size: int) -> Iterator[Tuple[object, torch.Tensor]]:
    """``(x, y)`` batches from ``data``: one ``(x, y)`` pair of tensors (``x`` a tensor or a tuple
    of tensors), split into ``batch_size`` rows, or an iterable of such pairs (a DataLoader,
    ``eeruntime.data.Batches``)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and _is_state(data[0]) and not _is_pair(data[1]):
        x, y = data
        B = check_state(x, "calibration inputs")
        y = _check_labels(y, B, "calibration data")
        parts = as_tuple(x)
        for i in range(0, B, batch_size):
            yield from_tuple([t[i : i + batch_size] for t in parts], x), y[i : i + batch_size]
        return
    if _is_state(data):
        raise ValueError("calibration data holds inputs without labels; pass (x, y) or an iterable of (x, y) batches")
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(
            f"calibration data must be an (x, y) pair of tensors or an iterable of (x, y) batches, got {type(data).__name__}"
        ) from None
    for i, item in enumerate(it):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"calibration batch {i} must be an (inputs, labels) pair, got "
                f"{type(item).__name__}{' of length ' + str(len(item)) if isinstance(item, (tuple, list)) else ''}"
            )
        x, y = item
        if isinstance(x, list):
            x = tuple(x)
        B = check_state(x, f"calibration batch {i}")
        yield x, _check_labels(y, B, f"calibration batch {i}")


def _is_pair(obj) -> bool:
    """An (inputs, labels) batch: tells ``[(x1, y1), (x2, y2)]`` apart from one ``(x, y)``."""
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        return False
    x = tuple(obj[0]) if isinstance(obj[0], list) else obj[0]
    return _is_state(x)


def _to(x, device):
    if device is None:
        return x
    return from_tuple([t.to(device) for t in as_tuple(x)], x)


def build_cache(
    model,
    data,
    criterion="entropy",
    final: str = "last",
    *,
    cost="flops",
    batch_size: int = 256,
    progress: bool = True,
    decision_backend: str = "auto",
    top_k: int = DEFAULT_TOP_K,
) -> ScoreCache:
    """Run ``model`` once over ``data`` with every exit on and cache what calibration needs.

    Scores come from the runtime's own scoring (:class:`eeruntime.scoring.Scorer`: the same ops dispatch for a
    named criterion, the callable with the same arguments otherwise), so thresholds chosen on the
    cache reproduce on the runtime. The model runs in eval mode under ``torch.inference_mode``;
    its training flag is restored afterwards. ``cost``: ``"flops"``, ``"latency"`` (timed on the
    model's device at this batch size) or a :class:`~eeruntime.CostModel`.
    """
    from ..progress import bar as progress_bar

    if not is_multi_exit(model):
        raise TypeError(
            f"calibration needs a MultiExitModel (an nn.Module with stages and exits), got {type(model).__name__}"
        )
    K = len(model.stages)
    if K < 2:
        raise ValueError(f"calibration needs a model with at least one early exit; this one has {K} exit(s)")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    criterion = check_criterion(criterion)
    _check_final(final)
    device = model_device(model)
    restore = set_eval(model)
    scorer = Scorer(criterion, decision_backend)
    keep_history = scorer.uses_history
    acc = _Accumulator(K, criterion, final, top_k)
    first_batch = None
    try:
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and _is_state(data[0])
            and isinstance(data[1], torch.Tensor)
        ):
            total = -(-as_tuple(data[0])[0].shape[0] // batch_size)
        else:
            total = len(data) if hasattr(data, "__len__") else None
        bar = progress_bar(labelled_batches(data, batch_size), total=total, desc="calibration pass", enabled=progress)
        with torch.inference_mode():
            for x, y in bar:
                x = _to(x, device)
                if first_batch is None and y.shape[0] > 0:
                    first_batch = x
                state, logits, states = x, [], []
                for k in range(K):
                    state = stage_forward(model.stages[k], state)
                    logits.append(call(model.exits[k], state))
                    states.append(state)
                outs = _outputs(logits, final)
                acc.add_outputs(
                    outs,
                    y,
                    lambda out, k: scorer.score(out, states[k], k, logits[:k] if keep_history else ()),
                )
    finally:
        restore()
    if first_batch is None:
        raise ValueError("calibration data is empty: it yielded no samples")
    cost_model, unit = resolve_costs(cost, model, first_batch)
    cache = acc.finish(cost_model, unit)
    if isinstance(criterion, str):
        cache.criterion = criterion
    return cache
