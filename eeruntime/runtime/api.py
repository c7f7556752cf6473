"""``EERuntime``: the public object. It checks what the user gives, holds the thresholds (one
immutable snapshot at a time) and the statistics, and hands each call to an executor: the CUDA
graph executor for CUDA inputs, else an eager pass (see docs/design.md)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union, cast

import torch
from torch import nn

from ..compiled import compile_options, refuse_if_traced
from ..cost import CostModel, measure_costs
from ..criteria import Criterion
from ..devices import device_guard
from ..exit_rules.learned import check_pool_for
from ..model import StagedModel, is_multi_exit, model_device
from ..model_guard import ModelGuard
from ..runtime_file import save_runtime
from ..scoring import Scorer
from ..state import State, as_tuple, check_state, from_tuple
from ..stats import RuntimeStats
from ..thresholds import ThresholdSnapshot, coerce_thresholds
from .executors import cpu_loop_ops_for, eager_pass
from .results import InferenceResult
from .spec import RunSpec
from .step import StageResult, check_carry, stage_step

if TYPE_CHECKING:  # the graph executor is imported only when a CUDA model asks for graphs
    from .graphs import GraphRunner

# What ``infer`` / ``run_stage(0, ...)`` take: a state (a tensor, or a tuple or list of tensors
# sharing batch dim 0) or, for a model with an ``input_adapter`` (an attached HF encoder),
# whatever the adapter takes (a dict, a ``BatchEncoding``): checked at run time, not by type.
ModelInput = Any


class CalibrationRecord(Protocol):
    """What a runtime keeps of the calibration that chose its thresholds (an ``ee.Calibration``, set
    by ``Calibration.runtime`` and ``ee.load``): ``rt.save`` writes its dict. A protocol, so this
    module need not import eeruntime.calibrate (which imports the runtime)."""

    def to_dict(self) -> Dict[str, Any]: ...


class EERuntime:
    """Batched early-exit inference for a :class:`~eeruntime.MultiExitModel`.

    Args:
        model: a ``MultiExitModel`` (any ``nn.Module`` with ``stages`` and ``exits`` module lists).
        thresholds: one per early exit (``num_exits - 1`` values) or one float for all; ``None``
            takes a conservative default for the criterion.
        criterion: ``"entropy"`` (exit when H < T), ``"max_prob"``, ``"margin"``,
            ``"norm_entropy"`` (exit when score >= T), or a callable ``f(logits, state) -> [B]``
            score (exit when score >= T).
        final: ``"last"`` (a sample reaching the final exit gets its logits) or ``"average"``
            (the mean of all exits' logits).
        graphs: ``"auto"`` replays each stage as a CUDA graph per batch bucket for CUDA inputs;
            ``False`` runs eagerly everywhere.
        buckets: the batch sizes captured as graphs (default: 1, 2, 4, 8, then multiples of 8
            up to 256).
        decision_backend, compact_backend: force an ops backend (default ``"auto"``).
        compile: ``True`` compiles each stage and exit head once with ``torch.compile`` and a
            dynamic batch (a dict passes ``torch.compile`` options, e.g. ``{"mode": "max-autotune"}``);
            the loop, decisions and packing stay eager (see :mod:`eeruntime.compiled`). Not with
            ``graphs=True``.

    The model is put in eval mode and runs under ``torch.inference_mode()``; its weights and the
    input are never written.
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Union[None, float, Sequence[float], torch.Tensor] = None,
        criterion: Criterion = "entropy",
        final: str = "last",
        *,
        graphs: Union[str, bool] = "auto",
        buckets: Optional[Sequence[int]] = None,
        decision_backend: str = "auto",
        compact_backend: str = "auto",
        compile: Union[bool, Dict[str, Any]] = False,
    ) -> None:
        # An nn.Module: the runtime puts its modules in eval mode and finds its device from its parameters.
        if not is_multi_exit(model):
            raise TypeError(
                f"EERuntime needs a MultiExitModel (an nn.Module with stages and exits), got {type(model).__name__}; "
                "build one with ee.MultiExitModel(stages, exits) or ee.attach_exits(backbone, at=[...])"
            )
        # Checked: it has stages and exits (any nn.Module that does is walked as a MultiExitModel).
        staged = cast(StagedModel, model)
        if len(staged.stages) != len(staged.exits) or len(staged.stages) == 0:
            raise ValueError(
                f"stages and exits must have the same, non-zero length; got {len(staged.stages)} and {len(staged.exits)}"
            )
        scorer = Scorer(criterion, decision_backend)
        check_pool_for(scorer.criterion, model)
        if graphs not in ("auto", True, False):
            raise ValueError(f"graphs must be 'auto', True or False, got {graphs!r}")
        self._compile = compile_options(compile)
        if self._compile is not None:
            if graphs is True:
                raise ValueError(
                    "compile=True runs the stages as torch.compile graphs; it cannot be combined with graphs=True"
                )
            graphs = False
        self.spec = RunSpec(staged, scorer, final, compact_backend, self._compile)
        self.model = model
        self.criterion = scorer.criterion
        self.final = final
        self.graphs = graphs
        self.decision_backend = decision_backend
        self.compact_backend = compact_backend
        self.num_exits = len(staged.stages)
        self._guard = ModelGuard(model, self.num_exits)  # eval mode everywhere, said out loud
        self._device = model_device(model)
        self._lock = threading.Lock()
        self._snapshot = ThresholdSnapshot(coerce_thresholds(thresholds, self.num_exits - 1, self.criterion))
        self._stats = RuntimeStats([0] * self.num_exits)
        self._example: Any = None  # one row of the first input, for graph capture
        self._cost: Optional[CostModel] = None
        self._graph_runner: Optional[GraphRunner] = None
        self.buckets = buckets
        # The calibration that chose the thresholds (set by Calibration.runtime and ee.load), saved by rt.save.
        self.calibration: Optional[CalibrationRecord] = None

    # ------------------------------------------------------------------ thresholds
    @property
    def thresholds(self) -> List[float]:
        return list(self._snapshot.values)

    def thresholds_snapshot(self) -> ThresholdSnapshot:
        """The current thresholds as one immutable whole (pass it to :meth:`run_stage`)."""
        return self._snapshot

    def set_thresholds(self, thresholds: Union[float, Sequence[float], torch.Tensor]) -> None:
        """New thresholds, used from the next call (a call under way keeps the set it started
        with). Captured graphs read them from a buffer each call fills: no re-capture."""
        snap = ThresholdSnapshot(coerce_thresholds(thresholds, self.num_exits - 1, self.criterion))
        with self._lock:
            self._snapshot = snap

    def thresholds_tensor(self, device: Union[str, torch.device]) -> torch.Tensor:
        """The current thresholds as a float32 [K-1] tensor on ``device`` (read-only: a write to it is
        never used, the runtime remakes it from ``rt.thresholds``)."""
        return self._snapshot.tensor(device)

    # ------------------------------------------------------------------ public calls
    def __call__(self, x: ModelInput) -> torch.Tensor:
        return self.infer(x).logits

    def infer(self, x: ModelInput) -> InferenceResult:
        """Run ``x`` (a tensor, or a tuple of tensors sharing batch dim 0; for a model with an
        input adapter, e.g. an attached HF encoder, whatever it takes: a dict / BatchEncoding)
        with early exits.

        The thresholds are read once per call (one snapshot), so a concurrent ``set_thresholds``
        applies to a call as a whole or not at all."""
        refuse_if_traced()
        return self._infer(x, self._snapshot)[0]

    def _infer(
        self, x: ModelInput, snap: ThresholdSnapshot, check: bool = True, adapt: bool = True
    ) -> Tuple[InferenceResult, List[int]]:
        """:meth:`infer` with the thresholds snapshot ``snap`` (the stage scheduler runs a batch of
        requests admitted under one snapshot through every stage in one call this way);
        ``check=False`` skips validating a state the caller has checked; ``adapt=False`` skips the
        input adapter (an attached HF encoder's) for a state it already made: its tuple is in the
        stage's input order, which the adapter would read as the model's forward order. Returns the
        result and how many rows left at each exit."""
        adapter = getattr(self.model, "input_adapter", None)
        if adapter is not None and adapt:
            x = adapter(x)
        if isinstance(x, list):
            x = tuple(x)
        if check:
            B = check_state(x, "EERuntime input")
            self._check_device(x)
        else:
            B = as_tuple(x)[0].shape[0]
        self._guard.check()
        t0 = time.perf_counter()
        with torch.inference_mode(), device_guard(as_tuple(x)[0].device):
            runner = self._graph_runner_for(x)
            if runner is not None:
                result, counts = runner.infer(x, thresholds=snap)
            else:
                result, counts = self._infer_eager(x, B, snap)
        self.record_exits(counts, B, wall_time_s=time.perf_counter() - t0, example=x)
        return result, counts

    def run_stage(
        self,
        k: int,
        state: ModelInput,
        rows: torch.Tensor,
        carry: Optional[Sequence[torch.Tensor]] = None,
        thresholds: Optional[ThresholdSnapshot] = None,
        record: bool = False,
        *,
        check: bool = True,
    ) -> StageResult:
        """Run stage ``k`` and exit ``k`` on the rows of ``state`` and say who leaves.

        ``state``: stage k's input (the model input at k == 0, else the ``state`` an earlier
        ``run_stage(k - 1, ...)`` returned, possibly rows of several joined with
        :func:`~eeruntime.runtime.cat_rows`); ``rows``: int64 [n] caller-chosen ids, returned
        subset in order; ``carry``: the ``carry`` of the earlier step (None at k == 0);
        ``thresholds``: a :meth:`thresholds_snapshot` (None: the current one). Returns a
        :class:`StageResult`. Inputs are never written; ``rt.stats`` is updated only with
        ``record=True`` (the leavers count as samples, see :meth:`record_exits`). The same step
        as :meth:`infer`'s, row for row.

        ``check=False`` skips validating ``state``, ``rows``, ``carry`` and ``thresholds``: for a
        caller that passes what earlier steps returned, joined with ``cat_rows`` (the stage
        scheduler, whose per-step Python time is its throughput on a CPU); the state must then
        be what stage ``k`` takes (no input adapter is applied). The model's structure and eval
        mode are still checked.
        """
        K = self.num_exits
        if not check:
            self._guard.check(stage=k)
            snap = self._snapshot if thresholds is None else thresholds
            return self._run_stage(k, state, rows, () if carry is None else tuple(carry), snap, record)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < K:
            raise ValueError(f"stage index k must be an int in [0, {K}), got {k!r}")
        adapter = getattr(self.model, "input_adapter", None)
        if k == 0 and adapter is not None:  # the model input as users pass it (e.g. an HF dict)
            state = adapter(state)
        if isinstance(state, list):
            state = tuple(state)
        n = check_state(state, f"run_stage({k}) state")
        self._check_device(state)
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (n,):
            got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"rows must be an int64 tensor of shape [{n}] (one id per state row), got {got}")
        carry = check_carry(self.spec, k, carry, n)
        snap = self._snapshot if thresholds is None else thresholds
        if not isinstance(snap, ThresholdSnapshot) or len(snap) != K - 1:
            raise TypeError(
                f"thresholds must be a snapshot of {K - 1} thresholds from rt.thresholds_snapshot(), got {snap!r}"
            )
        self._guard.check(stage=k)
        return self._run_stage(k, state, rows, carry, snap, record)

    def _run_stage(
        self,
        k: int,
        state: State,
        rows: torch.Tensor,
        carry: Tuple[torch.Tensor, ...],
        snap: ThresholdSnapshot,
        record: bool,
    ) -> StageResult:
        K = self.num_exits
        res = None
        runner = self._graph_runner_for(state)  # on CUDA: the graphs infer replays (None: eager)
        if runner is not None:
            res = runner.run_stage(k, state, rows, carry, snap)
        if res is None:
            loop_ops = cpu_loop_ops_for(self.spec, as_tuple(state)[0].device)
            with torch.inference_mode():
                res = stage_step(self.spec, k, state, rows, carry, snap, loop_ops)
        if record:
            counts = [0] * K
            counts[k] = res.exit_rows.shape[0]
            self.record_exits(counts, calls=0, example=state if k == 0 else None)
        return res

    def record_exits(
        self,
        counts_per_exit: Sequence[int],
        samples: Optional[int] = None,
        *,
        wall_time_s: float = 0.0,
        calls: int = 1,
        example: Optional[State] = None,
    ) -> None:
        """Add exits seen outside :meth:`infer` (e.g. by a scheduler calling :meth:`run_stage`) to
        ``rt.stats``: ``counts_per_exit[k]`` rows left at exit k; ``samples`` defaults to their
        sum. ``example``: a model input, kept (one row) to measure the FLOPs cost model."""
        counts = [int(c) for c in counts_per_exit]
        if len(counts) != self.num_exits or any(c < 0 for c in counts):
            raise ValueError(f"counts_per_exit must hold {self.num_exits} counts >= 0, got {list(counts_per_exit)}")
        samples = sum(counts) if samples is None else int(samples)
        with self._lock:
            if self._example is None and example is not None and samples > 0:
                self._example = from_tuple([t[:1].detach().clone() for t in as_tuple(example)], example)
            for k, c in enumerate(counts):
                self._stats.exit_counts[k] += c
            self._stats.samples += samples
            self._stats.calls += calls
            self._stats.wall_time_s += wall_time_s

    def warmup(self, max_batch: int, example: ModelInput = None) -> None:
        """Capture the CUDA graphs of every bucket up to ``max_batch`` ahead of traffic."""
        from .graphs import GraphRunner, graphs_supported

        if self._device is None or self._device.type != "cuda" or self.graphs is False:
            raise RuntimeError("warmup captures CUDA graphs; it needs a model on a CUDA device and graphs enabled")
        why = graphs_supported(self)
        if why is not None:
            raise RuntimeError(f"warmup cannot capture CUDA graphs: {why}")
        if self._graph_runner is None:
            self._graph_runner = GraphRunner(self, buckets=self.buckets)
        self._graph_runner.warmup(max_batch, example)

    def save(
        self,
        path: Union[str, os.PathLike[str]],
        weights: bool = False,
        factory: Union[None, str, Callable[..., nn.Module]] = None,
    ) -> Path:
        """Save thresholds, criterion, calibration summary and learned scorer weights (JSON +
        safetensors; see :func:`eeruntime.load`); ``weights=True`` adds the model's weights, so
        ``ee.load(path, factory)`` rebuilds the whole runtime from the model's constructor
        (``factory``, a callable or ``"module:factory"`` name, is recorded as a hint). Returns the
        path of the JSON file written."""
        return save_runtime(self, path, weights=weights, factory=factory)

    @property
    def stats(self) -> RuntimeStats:
        """Exits per exit point, samples seen, wall time, and the FLOPs cost model (ideal cost)."""
        with self._lock:
            snap = RuntimeStats(
                list(self._stats.exit_counts), self._stats.samples, self._stats.calls, self._stats.wall_time_s
            )
            example = self._example
        if self._cost is None and example is not None:
            self._cost = measure_costs(self.model, example)
        snap.cost_model = self._cost
        return snap

    @property
    def example(self) -> Optional[State]:
        """One row of the first input seen (None before any), kept to measure the cost model and
        to capture graphs at ``warmup`` without an example."""
        return self._example

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = RuntimeStats([0] * self.num_exits)

    def score(self, logits: torch.Tensor, state: State, k: int, history: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The criterion's float32 score per row at exit ``k`` (see :mod:`eeruntime.scoring`)."""
        return self.spec.scorer.score(logits, state, k, history)

    def decide(
        self,
        logits: torch.Tensor,
        state: State,
        k: int,
        history: Sequence[torch.Tensor] = (),
        thresholds: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Score and exit flag at early exit ``k`` against ``thresholds[k]`` (a float32 [K-1]
        tensor on the logits' device; None: the current snapshot's)."""
        thr = self.thresholds_tensor(logits.device) if thresholds is None else thresholds
        return self.spec.scorer.decide(logits, state, k, history, thr)

    # ------------------------------------------------------------------ internals
    def _check_device(self, x: State) -> None:
        if self._device is None:
            return
        for t in as_tuple(x):
            if t.device.type != self._device.type or (
                self._device.index is not None and t.device.index not in (None, self._device.index)
            ):
                raise ValueError(
                    f"input is on {t.device} but the model is on {self._device}; "
                    f"move the input with x.to({str(self._device)!r})"
                )

    def _graph_runner_for(self, x: State) -> Optional[GraphRunner]:
        if self.graphs is False or not as_tuple(x)[0].is_cuda:
            return None
        if self._graph_runner is None:
            from .graphs import GraphRunner, graphs_supported

            why = graphs_supported(self)
            if why is not None:
                if self.graphs is True:
                    raise RuntimeError(f"graphs=True but CUDA graphs cannot be used: {why}")
                return None
            with self._lock:
                if self._graph_runner is None:
                    self._graph_runner = GraphRunner(self, buckets=self.buckets)
        return self._graph_runner

    def _infer_eager(
        self, x: State, B: int, snap: Optional[ThresholdSnapshot] = None
    ) -> Tuple[InferenceResult, List[int]]:
        """``(InferenceResult, counts)`` of ``x`` without CUDA graphs (the eager executors)."""
        snap = self._snapshot if snap is None else snap
        return eager_pass(self.spec, x, B, snap.tensor(as_tuple(x)[0].device)).run()
