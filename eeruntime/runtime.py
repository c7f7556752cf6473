"""``EERuntime``: run a multi-exit model stage by stage, packing the survivors between stages."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .compiled import CompiledModel, compile_options, refuse_if_traced
from .cost import CostModel, measure_costs
from .criteria import CRITERION_CODE, Criterion, check_criterion, criterion_name, is_per_exit, uses_history
from .devices import device_guard
from .model import model_device
from .model_guard import ModelGuard
from .ops._ext_backend import FUSED_LOGITS_DTYPES, cpu_loop_ops, rows_writable
from .ops.exit_decision import confidence_ref, exits_from_scores
from .ownership import sole_owner
from .state import State, as_tuple, call, cat_rows, check_stage_output, check_state, from_tuple, take_rows  # noqa: F401  (cat_rows, take_rows: public here)
from .stats import RuntimeStats
from .thresholds import ThresholdSnapshot, coerce_thresholds

FINAL_MODES = ("last", "average")


@dataclass
class InferenceResult:
    """``logits`` [B, C] in input order; ``exit_index`` int64 [B] (0-based exit taken);
    ``confidence`` float32 [B], the criterion's score at the exit taken."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor


@dataclass
class StageResult:
    """What one stage step (:meth:`EERuntime.run_stage`) gives back.

    ``exit_rows`` int64 [E]: the ids (from the step's ``rows``) of the rows that left at exit
    ``k``, in order; ``logits`` [E, C] and ``confidence`` float32 [E]: theirs. ``rows`` int64
    [n - E]: the survivors' ids, in order; ``state``: their packed state for stage k + 1 (None
    at the final stage or when none survive); ``carry``: their carry (a tuple row-aligned with
    ``rows``) for the next step."""

    k: int
    exit_rows: torch.Tensor
    logits: torch.Tensor
    confidence: torch.Tensor
    rows: torch.Tensor
    state: Optional[State]
    carry: Tuple[torch.Tensor, ...]


class EERuntime:
    """Batched early-exit inference for a :class:`~eeruntime.MultiExitModel`.

    Args:
        model: a ``MultiExitModel`` (anything with ``stages`` and ``exits`` module lists).
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
        model,
        thresholds: Union[None, float, Sequence[float], torch.Tensor] = None,
        criterion: Criterion = "entropy",
        final: str = "last",
        *,
        graphs: Union[str, bool] = "auto",
        buckets: Optional[Sequence[int]] = None,
        decision_backend: str = "auto",
        compact_backend: str = "auto",
        compile: Union[bool, dict] = False,
    ):
        if not (hasattr(model, "stages") and hasattr(model, "exits")):
            raise TypeError(
                f"EERuntime needs a MultiExitModel (stages and exits), got {type(model).__name__}; "
                "build one with ee.MultiExitModel(stages, exits) or ee.attach_exits(backbone, at=[...])"
            )
        if len(model.stages) != len(model.exits) or len(model.stages) == 0:
            raise ValueError(
                f"stages and exits must have the same, non-zero length; got {len(model.stages)} and {len(model.exits)}"
            )
        self.model = model
        self.criterion = check_criterion(criterion)
        self._criterion_code = CRITERION_CODE.get(self.criterion) if isinstance(self.criterion, str) else None
        if final not in FINAL_MODES:
            raise ValueError(f"unknown final mode {final!r}; accepted: {', '.join(map(repr, FINAL_MODES))}")
        self.final = final
        if graphs not in ("auto", True, False):
            raise ValueError(f"graphs must be 'auto', True or False, got {graphs!r}")
        self._compile = compile_options(compile)
        if self._compile is not None:
            if graphs is True:
                raise ValueError(
                    "compile=True runs the stages as torch.compile graphs; it cannot be combined with graphs=True"
                )
            graphs = False
        self.graphs = graphs
        self.decision_backend = decision_backend
        self.compact_backend = compact_backend
        self.num_exits = len(model.stages)
        self._guard = ModelGuard(model, self.num_exits)  # eval mode everywhere, said out loud
        self._device = model_device(model)
        self._lock = threading.Lock()
        self._snapshot = ThresholdSnapshot(coerce_thresholds(thresholds, self.num_exits - 1, self.criterion))
        self._stats = RuntimeStats([0] * self.num_exits)
        self._example = None
        self._cost: Optional[CostModel] = None
        self._num_classes: Optional[int] = None
        self._graph_runner = None
        self._compiled = None
        self.buckets = buckets

    # ------------------------------------------------------------------ thresholds
    @property
    def thresholds(self) -> List[float]:
        return list(self._snapshot.values)

    def thresholds_snapshot(self) -> ThresholdSnapshot:
        """The current thresholds as one immutable whole (pass it to :meth:`run_stage`)."""
        return self._snapshot

    def set_thresholds(self, thresholds) -> None:
        """New thresholds, used from the next call (a call under way keeps the set it started
        with). Captured graphs read them from a buffer each call fills: no re-capture."""
        snap = ThresholdSnapshot(coerce_thresholds(thresholds, self.num_exits - 1, self.criterion))
        with self._lock:
            self._snapshot = snap

    def thresholds_tensor(self, device) -> torch.Tensor:
        """The current thresholds as a float32 [K-1] tensor on ``device`` (read-only)."""
        return self._snapshot.tensor(device)

    # ------------------------------------------------------------------ public calls
    def __call__(self, x) -> torch.Tensor:
        return self.infer(x).logits

    def infer(self, x) -> InferenceResult:
        """Run ``x`` (a tensor, or a tuple of tensors sharing batch dim 0; for a model with an
        input adapter, e.g. an attached HF encoder, whatever it takes: a dict / BatchEncoding)
        with early exits.

        The thresholds are read once per call (one snapshot), so a concurrent ``set_thresholds``
        applies to a call as a whole or not at all."""
        refuse_if_traced()
        adapter = getattr(self.model, "input_adapter", None)
        if adapter is not None:
            x = adapter(x)
        if isinstance(x, list):
            x = tuple(x)
        B = check_state(x, "EERuntime input")
        self._check_device(x)
        self._guard.check()
        snap = self._snapshot
        t0 = time.perf_counter()
        with torch.inference_mode(), device_guard(as_tuple(x)[0].device):
            runner = self._graph_runner_for(x)
            if runner is not None:
                result, counts = runner.infer(x, thresholds=snap)
            else:
                result, counts = self._infer_eager(x, B, snap)
        self._record(x, B, counts, time.perf_counter() - t0)
        return result

    def run_stage(
        self,
        k: int,
        state,
        rows: torch.Tensor,
        carry=None,
        thresholds: Optional[ThresholdSnapshot] = None,
        record: bool = False,
    ) -> StageResult:
        """Run stage ``k`` and exit ``k`` on the rows of ``state`` and say who leaves.

        ``state``: stage k's input (the model input at k == 0, else the ``state`` an earlier
        ``run_stage(k - 1, ...)`` returned, possibly rows of several concatenated with
        :func:`cat_rows`); ``rows``: int64 [n] caller-chosen ids, returned subset in order;
        ``carry``: the ``carry`` of the earlier step (None at k == 0); ``thresholds``: a
        :meth:`thresholds_snapshot` (None: the current one). Returns a :class:`StageResult`.
        Inputs are never written; ``rt.stats`` is updated only with ``record=True`` (the leavers
        count as samples, see :meth:`record_exits`). The same step as :meth:`infer`'s, row for row.
        """
        K = self.num_exits
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
        carry = self._check_carry(k, carry, n)
        snap = self._snapshot if thresholds is None else thresholds
        if not isinstance(snap, ThresholdSnapshot) or len(snap) != K - 1:
            raise TypeError(
                f"thresholds must be a snapshot of {K - 1} thresholds from rt.thresholds_snapshot(), got {snap!r}"
            )
        self._guard.check()
        with torch.inference_mode():
            res = self._stage_step(k, state, rows, carry, snap)
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
        example=None,
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

    def warmup(self, max_batch: int, example=None) -> None:
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

    def save(self, path, weights: bool = False, factory=None) -> None:
        """Save thresholds, criterion, calibration summary and learned scorer weights (JSON +
        safetensors; see :func:`eeruntime.load`); ``weights=True`` adds the model's weights, so
        ``ee.load(path, factory)`` rebuilds the whole runtime from the model's constructor
        (``factory``, a callable or ``"module:factory"`` name, is recorded as a hint)."""
        from .io import save_runtime

        save_runtime(self, path, weights=weights, factory=factory)

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

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = RuntimeStats([0] * self.num_exits)

    # ------------------------------------------------------------------ internals
    def _check_device(self, x) -> None:
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

    def _graph_runner_for(self, x):
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

    def _record(self, x, B: int, counts: List[int], dt: float) -> None:
        self.record_exits(counts, B, wall_time_s=dt, example=x)

    def _check_logits(self, logits, n: int, k: int) -> int:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"exit {k} must return 2-D logits [B, C], got {shape}")
        if logits.shape[0] != n:
            raise ValueError(f"exit {k} returned {logits.shape[0]} rows for a batch of {n}")
        C = logits.shape[1]
        # Exit 0 of each call sets the class count the later exits must match, so exits replaced
        # between calls are judged against each other, not against an earlier call's.
        if k == 0 or self._num_classes is None:
            self._num_classes = C
        elif C != self._num_classes:
            raise ValueError(
                f"exit {k} returns {C} classes but exit 0 returns {self._num_classes}; "
                "every exit must predict the same classes"
            )
        return C

    def score(self, logits: torch.Tensor, state, k: int, history=()) -> torch.Tensor:
        """The criterion's float32 score per row at exit ``k`` (used at the final exit and by callables)."""
        if callable(self.criterion):
            if is_per_exit(self.criterion):
                s = self.criterion(logits, state, k, list(history))
            else:
                s = self.criterion(logits, state)
            if isinstance(s, torch.Tensor) and s.device.type == "meta":
                raise ValueError(
                    f"criterion {criterion_name(self.criterion)} returned a meta tensor (no values) at exit {k}; "
                    f"it must return a [B] tensor of scores on the logits' device ({logits.device})"
                )
            if not isinstance(s, torch.Tensor) or s.shape != (logits.shape[0],):
                raise ValueError(
                    f"criterion {criterion_name(self.criterion)} must return a [B] tensor, got "
                    f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}"
                )
            return s.float()
        return (
            confidence_ref(logits, self.criterion)
            if logits.shape[0] == 0
            else ops.exit_decision(logits, 0.0, self.criterion, backend=self.decision_backend)[0]
        )

    def decide(self, logits: torch.Tensor, state, k: int, history=(), thresholds: Optional[torch.Tensor] = None):
        """Score and exit flag at early exit ``k`` against ``thresholds[k]`` (a float32 [K-1]
        tensor on the logits' device; None: the current snapshot's)."""
        thr = (self.thresholds_tensor(logits.device) if thresholds is None else thresholds)[k]
        if callable(self.criterion):
            s = self.score(logits, state, k, history)
            return s, exits_from_scores(s, thr, self.criterion)
        return ops.exit_decision(logits, thr, self.criterion, backend=self.decision_backend)

    def _fused_ops(self, device: torch.device):
        """The compiled ops of the CPU loop (``CpuLoopOps``) when this call can use them (CPU
        tensors, a named criterion, no backend forced away from ``cpp``), else None."""
        if device.type != "cpu" or callable(self.criterion):
            return None
        if self.decision_backend not in ("auto", "cpp") or self.compact_backend not in ("auto", "cpp"):
            return None
        return cpu_loop_ops()

    def _exit_step(self, fused, thr, logits, state, k: int, final: bool, history, rows, out, confidence, exit_index):
        """Score and decide exit ``k`` for the ``n`` rows that reached it and write the leaving
        rows (logits, score, k) into the outputs. Returns ``(keep, n_exit)``: ``keep`` bool [n],
        the rows that go on (None from the final exit without the compiled op). ``thr``: the
        call's thresholds, a float32 [K-1] tensor on the logits' device."""
        if fused is not None and logits.dtype in FUSED_LOGITS_DTYPES:
            keep, n_exit = fused.exit_scatter(
                logits, thr, self._criterion_code, k, final, rows, out, confidence, exit_index
            )
            return keep, int(n_exit)
        n = logits.shape[0]
        if final:
            out.index_copy_(0, rows, logits.to(out.dtype))
            confidence.index_copy_(0, rows, self.score(logits, state, k, history))
            exit_index.index_fill_(0, rows, k)
            return None, n
        score, exited = self.decide(logits, state, k, history, thr)
        n_exit = int(exited.sum())
        if n_exit:
            ops.scatter_rows(
                exited,
                rows,
                [logits, score, torch.full_like(rows, k)],
                [out, confidence, exit_index],
                backend=self.compact_backend,
            )
        return ~exited, n_exit

    def _walked_model(self):
        """The model the loop walks: the user's, or its compiled parts with ``compile=True``."""
        if self._compile is None:
            return self.model
        with self._lock:
            if self._compiled is None or not self._compiled.matches(self.model):
                self._compiled = CompiledModel(self.model, self._compile)
            return self._compiled

    def _pack(self, fused, keep, carried):
        if fused is not None and all(t.layout == torch.strided for t in carried):
            return fused.compact(keep, carried)
        return ops.compact(keep, carried, backend=self.compact_backend)[1]

    def _forward(self, k: int, state, n: int):
        """Stage ``k`` then exit ``k`` on ``n`` rows: ``(state, logits, C)``."""
        model = self._walked_model()
        state = call(model.stages[k], state)
        if isinstance(state, list):
            state = tuple(state)
        check_stage_output(state, k, n)
        logits = call(model.exits[k], state)
        return state, logits, self._check_logits(logits, n, k)

    def _check_carry(self, k: int, carry, n: int) -> tuple:
        """The carry stage ``k`` needs: the running logit sum (final="average", k > 0), then the
        earlier exits' logits (a history criterion); each [n, C]."""
        want = int(self.final == "average" and k > 0) + (k if uses_history(self.criterion) else 0)
        carry = () if carry is None else tuple(carry) if isinstance(carry, (tuple, list)) else carry
        if (
            not isinstance(carry, tuple)
            or len(carry) != want
            or not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == n for t in carry)
        ):
            got = (
                [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in carry]
                if isinstance(carry, tuple)
                else type(carry).__name__
            )
            raise ValueError(
                f"carry for stage {k} must be a tuple of {want} [{n}, C] tensors (the carry the step of stage "
                f"{k - 1} returned, rows selected like the state), got {got}"
            )
        return carry

    def _stage_step(self, k: int, state, rows: torch.Tensor, carry: tuple, snap: ThresholdSnapshot) -> StageResult:
        K = self.num_exits
        n = rows.shape[0]
        state, logits, C = self._forward(k, state, n)
        final = k == K - 1
        acc = carry[0] if self.final == "average" and k > 0 else None
        history = list(carry[1 if acc is not None else 0 :])
        if self.final == "average":
            acc = logits.float() if acc is None else acc + logits.float()
            if final:
                logits = (acc / K).to(logits.dtype)
        if final:
            return StageResult(k, rows, logits, self.score(logits, state, k, history), rows[:0], None, ())
        score, exited = self.decide(logits, state, k, history, snap.tensor(logits.device))
        index, (exit_logits, exit_score) = ops.compact(exited, [logits, score], backend=self.compact_backend)
        exit_rows = rows.index_select(0, index.to(rows.device))
        n_exit = exit_rows.shape[0]
        if n_exit == n:
            return StageResult(k, exit_rows, exit_logits, exit_score, rows[:0], None, ())
        parts = as_tuple(state)
        carried = [
            *parts,
            *([acc] if acc is not None else []),
            *history,
            *([logits] if uses_history(self.criterion) else []),
        ]
        if n_exit:
            index, carried = ops.compact(~exited, carried, backend=self.compact_backend)
            rows = rows.index_select(0, index.to(rows.device))
        return StageResult(
            k,
            exit_rows,
            exit_logits,
            exit_score,
            rows,
            from_tuple(carried[: len(parts)], state),
            tuple(carried[len(parts) :]),
        )

    def _infer_eager(self, x, B: int, snap: Optional[ThresholdSnapshot] = None):
        K = self.num_exits
        state = x
        device = as_tuple(x)[0].device
        fused = self._fused_ops(device)
        thr = (self._snapshot if snap is None else snap).tensor(device)
        rows = torch.arange(B, device=device)
        # Every row's entry is written at the exit it takes (at the latest the final one).
        exit_index = torch.empty(B, dtype=torch.int64, device=device)
        confidence = torch.empty(B, dtype=torch.float32, device=device)
        counts = [0] * K
        out = None
        acc = None  # running sum of the survivors' logits, for final="average"
        history = [] if uses_history(self.criterion) else None  # earlier exits' logits of the survivors
        n = B
        for k in range(K):
            state, logits, C = self._forward(k, state, n)
            if out is None:
                out = logits.new_empty((B, C))
            if B == 0:
                break
            final = k == K - 1
            if self.final == "average":
                acc = logits.float() if acc is None else acc + logits.float()
                if final:
                    logits = (acc / K).to(logits.dtype)
            # The loop needs the count anyway (the next stage's batch size): it is read once
            # here, so a stage where nobody leaves skips the pack altogether.
            keep, n_exit = self._exit_step(
                fused, thr, logits, state, k, final, history or (), rows, out, confidence, exit_index
            )
            counts[k] = n_exit
            if final or n_exit == n:
                break
            if history is not None:
                history.append(logits)
            if n_exit == 0:
                continue
            parts = as_tuple(state)
            extra = ([acc] if acc is not None else []) + (history or [])
            n -= n_exit
            in_place = fused is not None and sole_owner(
                parts, named=int(parts is not state), tuple_names=1 + int(parts is state)
            )
            if in_place and all(t.is_cpu and rows_writable(t) for t in parts):
                # Nothing else can see this stage's output: pack it where it lies (no new memory;
                # the next stage reads the first n rows, as the oracle does). `rows` is the
                # runtime's own. acc and history may alias exit logits, so they are copied.
                fused.compact_(keep, [*parts, rows])
                packed = [t[:n] for t in (*parts, rows)] + (self._pack(fused, keep, extra) if extra else [])
            else:
                packed = self._pack(fused, keep, [*parts, rows, *extra])
            state = from_tuple(packed[: len(parts)], state)
            rows = packed[len(parts)]
            rest = packed[len(parts) + 1 :]
            if acc is not None:
                acc, rest = rest[0], rest[1:]
            if history is not None:
                history = list(rest)
        return InferenceResult(out, exit_index, confidence), counts
