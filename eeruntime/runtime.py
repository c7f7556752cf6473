"""``EERuntime``: run a multi-exit model stage by stage, packing the survivors between stages."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import ops
from .cost import CostModel, measure_costs
from .criteria import CRITERION_CODE, Criterion, check_criterion, criterion_name, is_per_exit, uses_history
from .ops._ext_backend import FUSED_LOGITS_DTYPES, cpu_loop_ops, rows_writable
from .ops.exit_decision import confidence_ref, exits_from_scores
from .state import as_tuple, call, check_state, from_tuple
from .model import model_device
from .ownership import sole_owner
from .stats import RuntimeStats

FINAL_MODES = ("last", "average")

# Conservative defaults for ``EERuntime(model)`` with no thresholds: few samples leave early
# until the user calibrates (``ee.calibrate``). A callable's default follows the gates of
# differentiable branching, which exit at g >= 0.5.
DEFAULT_THRESHOLDS = {"entropy": 0.05, "max_prob": 0.99, "margin": 0.98, "norm_entropy": 0.98}
DEFAULT_CALLABLE_THRESHOLD = 0.5


@dataclass
class InferenceResult:
    """``logits`` [B, C] in input order; ``exit_index`` int64 [B] (0-based exit taken);
    ``confidence`` float32 [B], the criterion's score at the exit taken."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor


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
        self.graphs = graphs
        self.decision_backend = decision_backend
        self.compact_backend = compact_backend
        self.num_exits = len(model.stages)
        model.eval()
        self._device = model_device(model)
        self._lock = threading.Lock()
        self._thr_values = self._normalise_thresholds(thresholds)
        self._thr: Dict[torch.device, torch.Tensor] = {}
        self._stats = RuntimeStats([0] * self.num_exits)
        self._example = None
        self._cost: Optional[CostModel] = None
        self._num_classes: Optional[int] = None
        self._graph_runner = None
        self.buckets = buckets

    # ------------------------------------------------------------------ thresholds
    def _normalise_thresholds(self, thresholds) -> List[float]:
        n = self.num_exits - 1
        if thresholds is None:
            default = (
                DEFAULT_CALLABLE_THRESHOLD if callable(self.criterion) else DEFAULT_THRESHOLDS[self.criterion]
            )
            return [default] * n
        if isinstance(thresholds, torch.Tensor):
            if thresholds.dim() == 0:
                thresholds = float(thresholds)
            else:
                thresholds = thresholds.detach().cpu().reshape(-1).tolist()
        if isinstance(thresholds, (bool, str, bytes)):
            raise TypeError(f"thresholds must be a float or a sequence of {n} floats, got {type(thresholds).__name__}")
        if isinstance(thresholds, (int, float)):
            values = [float(thresholds)] * n
        else:
            try:
                values = [float(t) for t in thresholds]
            except (TypeError, ValueError):
                raise TypeError(
                    f"thresholds must be a float or a sequence of {n} floats, got {type(thresholds).__name__}"
                ) from None
            if len(values) != n:
                raise ValueError(
                    f"got {len(values)} thresholds for a model with {self.num_exits} exits; give one per "
                    f"early exit ({n}) or a single float for all"
                )
        for v in values:
            if math.isnan(v):
                raise ValueError("thresholds must not be NaN")
        return values

    @property
    def thresholds(self) -> List[float]:
        return list(self._thr_values)

    def set_thresholds(self, thresholds) -> None:
        """New thresholds, used from the next call. The device tensors are updated in place, so
        captured graphs see them without re-capture."""
        values = self._normalise_thresholds(thresholds)
        with self._lock:
            self._thr_values = values
            new = torch.tensor(values, dtype=torch.float32)
            with torch.inference_mode(False), torch.no_grad():
                for t in self._thr.values():
                    t.copy_(new)

    def thresholds_tensor(self, device) -> torch.Tensor:
        """The float32 [K-1] device tensor of thresholds that the exit kernels read."""
        device = torch.device(device)
        t = self._thr.get(device)
        if t is None:
            with self._lock:
                t = self._thr.get(device)
                if t is None:
                    # A normal tensor (not an inference tensor) so set_thresholds can update it in place.
                    with torch.inference_mode(False):
                        t = torch.tensor(self._thr_values, dtype=torch.float32, device=device)
                    self._thr[device] = t
        return t

    # ------------------------------------------------------------------ public calls
    def __call__(self, x) -> torch.Tensor:
        return self.infer(x).logits

    def infer(self, x) -> InferenceResult:
        """Run ``x`` (a tensor, or a tuple of tensors sharing batch dim 0) with early exits."""
        if isinstance(x, list):
            x = tuple(x)
        B = check_state(x, "EERuntime input")
        self._check_device(x)
        if self.model.training:
            self.model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            runner = self._graph_runner_for(x)
            if runner is not None:
                result, counts = runner.infer(x)
            else:
                result, counts = self._infer_eager(x, B)
        self._record(x, B, counts, time.perf_counter() - t0)
        return result

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

    def save(self, path) -> None:
        """Save thresholds, criterion, calibration summary and learned scorer weights (JSON +
        safetensors; see :func:`eeruntime.load`)."""
        from .io import save_runtime

        save_runtime(self, path)

    @property
    def stats(self) -> RuntimeStats:
        """Exits per exit point, samples seen, wall time, and the FLOPs cost model (ideal cost)."""
        with self._lock:
            snap = RuntimeStats(list(self._stats.exit_counts), self._stats.samples, self._stats.calls, self._stats.wall_time_s)
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
        with self._lock:
            if self._example is None and B > 0:
                self._example = from_tuple([t[:1].detach().clone() for t in as_tuple(x)], x)
            for k, c in enumerate(counts):
                self._stats.exit_counts[k] += c
            self._stats.samples += B
            self._stats.calls += 1
            self._stats.wall_time_s += dt

    def _check_logits(self, logits, n: int, k: int) -> int:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"exit {k} must return 2-D logits [B, C], got {shape}")
        if logits.shape[0] != n:
            raise ValueError(f"exit {k} returned {logits.shape[0]} rows for a batch of {n}")
        C = logits.shape[1]
        if self._num_classes is None:
            self._num_classes = C
        elif C != self._num_classes:
            raise ValueError(
                f"exit {k} returns {C} classes but earlier exits return {self._num_classes}; "
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
            if not isinstance(s, torch.Tensor) or s.shape != (logits.shape[0],):
                raise ValueError(
                    f"criterion {criterion_name(self.criterion)} must return a [B] tensor, got "
                    f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}"
                )
            return s.float()
        return confidence_ref(logits, self.criterion) if logits.shape[0] == 0 else ops.exit_decision(
            logits, 0.0, self.criterion, backend=self.decision_backend
        )[0]

    def decide(self, logits: torch.Tensor, state, k: int, history=()):
        """Score and exit flag at early exit ``k`` against the device threshold tensor."""
        thr = self.thresholds_tensor(logits.device)[k]
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

    def _exit_step(self, fused, thr, logits, state, k: int, final: bool, history, rows, out, confidence,
                   exit_index):
        """Score and decide exit ``k`` for the ``n`` rows that reached it and write the leaving
        rows (logits, score, k) into the outputs. Returns ``(keep, n_exit)``: ``keep`` bool [n],
        the rows that go on (None from the final exit without the compiled op). ``thr`` is the
        CPU thresholds tensor the compiled op reads when ``fused`` is given."""
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
        score, exited = self.decide(logits, state, k, history)
        n_exit = int(exited.sum())
        if n_exit:
            ops.scatter_rows(
                exited, rows, [logits, score, torch.full_like(rows, k)], [out, confidence, exit_index],
                backend=self.compact_backend,
            )
        return ~exited, n_exit

    def _pack(self, fused, keep, carried):
        if fused is not None and all(t.layout == torch.strided for t in carried):
            return fused.compact(keep, carried)
        return ops.compact(keep, carried, backend=self.compact_backend)[1]

    def _infer_eager(self, x, B: int):
        K = self.num_exits
        model = self.model
        state = x
        device = as_tuple(x)[0].device
        fused = self._fused_ops(device)
        thr = self.thresholds_tensor(device) if fused is not None else None
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
            state = call(model.stages[k], state)
            if isinstance(state, list):
                state = tuple(state)
            logits = call(model.exits[k], state)
            C = self._check_logits(logits, n, k)
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
            in_place = fused is not None and sole_owner(parts, named=int(parts is not state))
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
