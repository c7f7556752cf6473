"""``ee.calibrate``: thresholds that meet a stated goal, found on one cached pass of the model.

    cal = ee.calibrate(model, (x, y), "accuracy", max_drop=0.005)   # lose at most 0.5 points
    cal = ee.calibrate(model, loader, "budget", budget=0.5)         # half the full model's cost
    rt = cal.runtime(model)                                         # an EERuntime with them
    rt.save("my_runtime")                                           # JSON + safetensors

Methods (see ``eeruntime/calibration/``): ``"greedy"`` (the O/E + (I/N)(1 - E/N) objective,
branch by branch), ``"accuracy"`` (cheapest within ``max_drop`` of the final exit's accuracy),
``"budget"`` (EENet scorers and thresholds meeting an average cost), ``"sweep"`` (the Pareto
frontier of accuracy against expected cost; its chosen point is the one ``"accuracy"`` with the
same ``max_drop`` would take on that grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._json import dec_float as _dec
from ._json import enc_float as _enc
from .calibration.methods import METHODS, MethodArgs
from .cost import CostModel
from .criteria import CRITERIA, Criterion, criterion_name

if TYPE_CHECKING:  # for annotations only: calibrate() imports the cache and Calibration.runtime the runtime when called
    from .calibration.cache import Outcome, ScoreCache
    from .runtime import EERuntime

MAX_SAVED_GRID = 20000

Point = Tuple[List[float], float, float]  # (thresholds, accuracy, expected cost)

# What ``calibrate`` reads labelled data from: an (x, y) pair of tensors, an iterable of (x, y)
# batches (x may be anything the model's input adapter takes), or a ready ScoreCache.
CalibrationData = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Any], "ScoreCache"]


def _enc_points(points: Optional[Sequence[Point]]) -> Optional[List[List[Any]]]:
    return None if points is None else [[[_enc(t) for t in th], float(a), float(c)] for th, a, c in points]


def _dec_points(points: Optional[Sequence[Sequence[Any]]]) -> Optional[List[Point]]:
    return None if points is None else [([_dec(t) for t in th], float(a), float(c)) for th, a, c in points]


@dataclass
class Calibration:
    """What a calibration found, measured on the calibration data.

    ``thresholds``: one per early exit (exit k < K-1 taken when ``score < T`` for entropy,
    ``score >= T`` otherwise). ``criterion``: the criterion name, or the learned scorer module
    (method ``"budget"``). ``exit_fractions``, ``accuracy``, ``expected_cost``: what a runtime with
    these thresholds does on the calibration data; ``final_accuracy``: with no early exit.
    Costs are per sample in ``cost_unit`` (FLOPs, seconds, or a user cost model's unit);
    ``exit_costs[k]`` is the cost of leaving at exit k and ``plain_cost`` the full model's.
    ``candidates``: (thresholds, accuracy, cost) points weighed (at most ``max_candidates``);
    ``frontier``: the Pareto points (method ``"sweep"``); ``grid``: the candidate thresholds per
    exit the search enumerated.
    """

    method: str
    criterion: Any
    final: str
    thresholds: List[float]
    exit_fractions: List[float]
    accuracy: float
    final_accuracy: float
    expected_cost: float
    plain_cost: float
    exit_costs: List[float]
    cost_unit: str
    num_samples: int
    candidates: List[Point] = field(default_factory=list, repr=False)
    frontier: Optional[List[Point]] = field(default=None, repr=False)
    grid: Optional[List[List[float]]] = field(default=None, repr=False)
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def relative_cost(self) -> float:
        """Expected cost as a fraction of the full model's (plain) cost."""
        return self.expected_cost / self.plain_cost if self.plain_cost else float("nan")

    @property
    def criterion_name(self) -> str:
        return criterion_name(self.criterion)

    @property
    def scorer(self) -> Optional[Callable[..., Any]]:
        """The criterion when it is not a name: the learned EENet scorer of method ``"budget"``,
        or the callable the calibration was given; None for a named criterion."""
        return None if isinstance(self.criterion, str) else self.criterion

    @property
    def num_exits(self) -> int:
        return len(self.exit_fractions)

    def runtime(self, model: nn.Module, **kwargs: Any) -> EERuntime:
        """An :class:`~eeruntime.EERuntime` for ``model`` with these thresholds, criterion and
        final mode (``kwargs`` go to the runtime). A scorer criterion is moved to the model's
        device. The runtime keeps this calibration as ``rt.calibration`` for ``rt.save``."""
        from .model import model_device
        from .runtime import EERuntime

        n = len(getattr(model, "stages", ()))
        if n != self.num_exits:
            raise ValueError(f"this calibration is for a model with {self.num_exits} exits, got one with {n}")
        criterion = self.criterion
        device = model_device(model)
        if device is not None and hasattr(criterion, "to"):
            criterion = criterion.to(device)
        kwargs.setdefault("final", self.final)
        rt = EERuntime(model, thresholds=list(self.thresholds), criterion=criterion, **kwargs)
        rt.calibration = self
        return rt

    def summary(self) -> str:
        fr = ", ".join(f"{f:.3f}" for f in self.exit_fractions)
        return (
            f"{self.method} ({self.criterion_name}): accuracy {self.accuracy:.4f} (final exit {self.final_accuracy:.4f}), "
            f"cost {self.relative_cost:.3f} of the full model, exits [{fr}], thresholds {self.thresholds}"
        )

    def to_dict(self) -> Dict[str, Any]:
        """Strict-JSON-able dict (non-finite floats as strings); a scorer is described by its
        config, its weights are saved by ``rt.save``."""
        scorer = self.scorer
        return {
            "method": self.method,
            "criterion": self.criterion_name,
            "scorer_config": scorer.to_config() if scorer is not None and hasattr(scorer, "to_config") else None,
            "final": self.final,
            "thresholds": [_enc(t) for t in self.thresholds],
            "exit_fractions": [float(f) for f in self.exit_fractions],
            "accuracy": float(self.accuracy),
            "final_accuracy": float(self.final_accuracy),
            "expected_cost": float(self.expected_cost),
            "relative_cost": float(self.relative_cost),
            "plain_cost": float(self.plain_cost),
            "exit_costs": [float(c) for c in self.exit_costs],
            "cost_unit": self.cost_unit,
            "num_samples": int(self.num_samples),
            "candidates": _enc_points(self.candidates),
            "frontier": _enc_points(self.frontier),
            # the full candidate lists of a large calibration set would swamp the file
            "grid": None
            if self.grid is None or sum(map(len, self.grid)) > MAX_SAVED_GRID
            else [[_enc(t) for t in g] for g in self.grid],
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any], scorer: Optional[Callable[..., Any]] = None) -> Calibration:
        """Inverse of :meth:`to_dict`; ``scorer`` supplies the module of a learned criterion."""
        criterion = d["criterion"]
        if d.get("scorer_config") is not None or criterion not in CRITERIA:
            if scorer is None:
                raise ValueError(f"this calibration's criterion is a learned module ({criterion}); pass it as scorer=")
            criterion = scorer
        return cls(
            method=d["method"],
            criterion=criterion,
            final=d["final"],
            thresholds=[_dec(t) for t in d["thresholds"]],
            exit_fractions=[float(f) for f in d["exit_fractions"]],
            accuracy=float(d["accuracy"]),
            final_accuracy=float(d["final_accuracy"]),
            expected_cost=float(d["expected_cost"]),
            plain_cost=float(d["plain_cost"]),
            exit_costs=[float(c) for c in d["exit_costs"]],
            cost_unit=d["cost_unit"],
            num_samples=int(d["num_samples"]),
            candidates=_dec_points(d.get("candidates")) or [],
            frontier=_dec_points(d.get("frontier")),
            grid=None if d.get("grid") is None else [[_dec(t) for t in g] for g in d["grid"]],
            settings=dict(d.get("settings") or {}),
        )


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_args(
    method: str,
    max_drop: float,
    budget: Optional[float],
    budget_cost: Optional[float],
    budget_tol: float,
    grid: int,
    max_combos: int,
    max_candidates: int,
    cost: Union[str, CostModel],
    scorer_epochs: int,
    scorer_hidden: int,
    seed: int,
) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; accepted: {', '.join(map(repr, METHODS))}")
    max_drop = _number("max_drop", max_drop)
    if not 0.0 <= max_drop <= 1.0:
        raise ValueError(
            f"max_drop must be in [0, 1] (accuracy points as a fraction: 0.01 = one point), got {max_drop}"
        )
    if method == "budget":
        if (budget is None) == (budget_cost is None):
            raise ValueError(
                "method='budget' needs exactly one of budget= (a fraction of the full model's cost, in (0, 1]) "
                "or budget_cost= (an absolute average cost per sample in the cost unit, e.g. FLOPs)"
            )
        if budget is not None:
            b = _number("budget", budget)
            if not 0.0 < b <= 1.0:
                raise ValueError(
                    f"budget must be a fraction of the full model's cost in (0, 1], got {b}; "
                    "for an absolute cost pass budget_cost= instead"
                )
        else:
            b = _number("budget_cost", budget_cost)
            if not (b > 0 and math.isfinite(b)):
                raise ValueError(f"budget_cost must be a positive, finite average cost per sample, got {b}")
        tol = _number("budget_tol", budget_tol)
        if not 0.0 < tol < 1.0:
            raise ValueError(f"budget_tol must be in (0, 1), got {tol}")
    elif budget is not None or budget_cost is not None:
        raise ValueError(f"budget / budget_cost only apply to method='budget', not {method!r}")
    for name, v, lo in (
        ("grid", grid, 2),
        ("max_combos", max_combos, 4),
        ("max_candidates", max_candidates, 1),
        # 0 epochs failed with "'NoneType' object has no attribute 'detach'", 0 hidden units
        # trained an empty scorer; a seed that is not an int failed inside int()
        ("scorer_epochs", scorer_epochs, 1),
        ("scorer_hidden", scorer_hidden, 1),
        ("seed", seed, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not (isinstance(cost, CostModel) or cost in ("flops", "latency")):
        raise ValueError(f"unknown cost {cost!r}; accepted: 'flops', 'latency' or an ee.CostModel")


def calibrate(
    model: Optional[nn.Module],
    data: CalibrationData,
    method: str,
    criterion: Optional[Criterion] = None,
    *,
    final: Optional[str] = None,
    max_drop: float = 0.01,
    budget: Optional[float] = None,
    budget_cost: Optional[float] = None,
    budget_tol: float = 0.02,
    cost: Union[str, CostModel] = "flops",
    grid: int = 64,
    max_combos: int = 1 << 20,
    batch_size: int = 256,
    max_candidates: int = 1000,
    scorer_epochs: int = 300,
    scorer_hidden: int = 16,
    seed: int = 0,
    progress: bool = True,
    decision_backend: str = "auto",
) -> Calibration:
    """Find exit thresholds for ``model`` on labelled ``data``.

    Args:
        model: a ``MultiExitModel`` with at least one early exit (``None`` when ``data`` is a
            ready :class:`~eeruntime.calibration.ScoreCache`).
        data: an ``(x, y)`` pair of tensors, an iterable of ``(x, y)`` batches (DataLoader,
            ``ee.data.Batches``), or a ``ScoreCache`` from
            :func:`eeruntime.calibration.build_cache` to calibrate several ways on one pass.
        method: ``"greedy"``, ``"accuracy"``, ``"budget"`` or ``"sweep"``.
        criterion: a named criterion or a callable (default ``"entropy"``); ``"budget"`` learns
            its own (EENet scorers) and takes none.
        final: ``"last"`` (default) or ``"average"``, as in ``EERuntime``.
        max_drop: ``"accuracy"`` and ``"sweep"``: largest accepted accuracy loss against the final
            exit alone, as a fraction (0.01 = one point).
        budget: ``"budget"``: average cost as a fraction of the full model's, in (0, 1]; or
            ``budget_cost``: an absolute average cost per sample in the cost unit (FLOPs, or
            seconds with ``cost="latency"``). ``budget_tol``: the average cost on the calibration
            data lands in [budget (1 - tol), budget] (a warning says when the data is too small).
        cost: ``"flops"`` (the FLOP cost model of docs/design.md), ``"latency"`` (each stage and head
            timed on the model's device at ``batch_size``), or an ``ee.CostModel``.
        grid: threshold candidates per exit for the grid searches (sample quantiles of the
            cached scores); fewer when more than ``max_combos`` combinations would result.
        max_candidates: how many weighed points the result keeps for plots.
        progress: tqdm bars for the model pass and the scorer training.

    The model runs once over ``data`` with every exit on; the searches run on the cached scores
    and correctness, never on the model. Raises ``ValueError`` for an unknown method, bad
    ``max_drop`` / budget, empty data or missing labels.
    """
    from .calibration.budget import warn_if_off
    from .calibration.cache import ScoreCache, build_cache

    _check_args(
        method,
        max_drop,
        budget,
        budget_cost,
        budget_tol,
        grid,
        max_combos,
        max_candidates,
        cost,
        scorer_epochs,
        scorer_hidden,
        seed,
    )
    if method == "budget" and criterion is not None:
        raise ValueError("method='budget' learns its own criterion (EENet scorers); leave criterion unset")
    if isinstance(data, ScoreCache):
        cache = data
        if criterion is not None and not (criterion is cache.criterion or criterion == cache.criterion):
            raise ValueError(
                f"the cache holds {criterion_name(cache.criterion)} scores, not {criterion_name(criterion)}"
            )
        if final is not None and final != cache.final:
            raise ValueError(f"the cache was built with final={cache.final!r}, not {final!r}")
        # The cache's costs were fixed when it was built; a cost asked for here was ignored
        # without a word (cost="flops", the default, cannot be told from no cost at all).
        if (isinstance(cost, CostModel) and cost != cache.cost) or (cost == "latency" and cache.cost_unit != "seconds"):
            raise ValueError(
                f"the cache holds costs in {cache.cost_unit!r} ({cache.cost}), not the cost={cost!r} asked for; "
                "a ScoreCache's costs are fixed when it is built: build_cache(model, data, cost=...)"
            )
    else:
        if model is None:
            raise TypeError("calibrate needs the model (or a ScoreCache as data)")
        cache = build_cache(
            model,
            data,
            "entropy" if criterion is None else criterion,
            final or "last",
            cost=cost,
            batch_size=batch_size,
            progress=progress,
            decision_backend=decision_backend,
        )

    budget_abs = None
    if method == "budget":  # _check_args made sure exactly one of budget and budget_cost is given
        if budget is not None:
            budget_abs = float(budget) * float(cache.cost.plain)
        elif budget_cost is not None:
            budget_abs = float(budget_cost)
    found = METHODS[method](
        MethodArgs(
            cache,
            float(max_drop),
            grid,
            max_combos,
            max_candidates,
            seed,
            progress,
            scorer_epochs,
            scorer_hidden,
            budget_abs,
            float(budget_tol),
        )
    )
    settings = {"grid": grid, "max_combos": max_combos, **found.settings}
    crit = cache.criterion if found.criterion is None else found.criterion
    scores = cache.scores if found.scores is None else found.scores
    out = _outcome(cache, scores, found.thresholds)
    if method == "budget":
        warn_if_off(
            out.expected_cost,
            settings["budget_cost"],
            settings["budget_tol"],
            float(cache.cumulative[-1]),
            cache.num_samples,
        )
    candidates = found.candidates
    if len(candidates) > max_candidates:
        step = len(candidates) / max_candidates
        candidates = [candidates[int(i * step)] for i in range(max_candidates)]
    return Calibration(
        method=method,
        criterion=crit,
        final=cache.final,
        thresholds=list(found.thresholds),
        exit_fractions=out.exit_fractions,
        accuracy=out.accuracy,
        final_accuracy=cache.final_accuracy,
        expected_cost=out.expected_cost,
        plain_cost=float(cache.cost.plain),
        exit_costs=[float(c) for c in cache.cumulative],
        cost_unit=cache.cost_unit,
        num_samples=cache.num_samples,
        candidates=candidates,
        frontier=found.frontier,
        grid=[[float(t) for t in g] for g in found.grids],
        settings=settings,
    )


def _outcome(cache: ScoreCache, scores: np.ndarray, thresholds: Sequence[float]) -> Outcome:
    """The cache's outcome of ``thresholds`` applied to ``scores`` (the cache's own or a scorer's)."""
    from dataclasses import replace

    view = cache if scores is cache.scores else replace(cache, scores=scores, criterion="learned")
    return view.outcome(thresholds)
