"""The eager executors: how one batch goes through the stage loop (:mod:`.loop`) without CUDA
graphs (see docs/design.md, "Hot paths").

- :class:`EagerPass`: the ops with backend dispatch (``ee.ops.exit_decision``, ``scatter_rows``,
  ``compact``): any device, any criterion.
- :class:`FusedCpuPass`: on CPU with a named criterion, the compiled ``exit_scatter`` (score,
  decide and scatter the leavers in one call) and ``compact_``, which packs a stage's output
  where it lies when nothing but the runtime can see it (:mod:`eeruntime.ownership`).

A pass holds one batch: the live rows' state, their ids in the batch and their carry (running
logit sum, earlier exits' logits), and the outputs the leavers are written into.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .. import ops
from ..ops._ext_backend import FUSED_LOGITS_DTYPES, CpuLoopOps, cpu_loop_ops, rows_writable
from ..ownership import sole_owner
from ..rows_layout import keep_layouts, row_order, to_rows
from ..state import as_tuple, dtype_name, from_tuple
from .loop import run_stages
from .results import InferenceResult
from .spec import RunSpec


def mixed_logits_dtypes(k: int, got: torch.dtype, first: int, want: torch.dtype) -> str:
    """Why a batch whose exits return logits of different dtypes is refused (every executor)."""

    return (
        f"exit {k} returns {dtype_name(got)} logits but exit {first} returns {dtype_name(want)}; every exit must "
        "return one dtype (the answers share one tensor): cast in the exit heads, e.g. with .float()"
    )


class EagerPass:
    """One batch of ``B`` rows through the loop with the dispatched ops; ``thr`` is the call's
    thresholds snapshot as a float32 [K-1] tensor on the input's device."""

    def __init__(self, spec: RunSpec, x, B: int, thr: torch.Tensor):
        self.spec = spec
        self.K = spec.num_exits
        self.B = self.alive = B
        self.thr = thr
        self.state = x
        device = as_tuple(x)[0].device
        self.rows = torch.arange(B, device=device)
        # Every row's entry is written at the exit it takes (at the latest the final one).
        self.exit_index = torch.empty(B, dtype=torch.int64, device=device)
        self.confidence = torch.empty(B, dtype=torch.float32, device=device)
        self.out: Optional[torch.Tensor] = None
        self.acc: Optional[torch.Tensor] = None  # running sum of the live rows' logits (final="average")
        self.history: Optional[List[torch.Tensor]] = (
            [] if spec.scorer.uses_history else None
        )  # earlier exits' logits of the live rows
        self.keep: Optional[torch.Tensor] = None
        self.packed = None

    def run(self):
        counts = run_stages(self, self.K)
        return InferenceResult(self.out, self.exit_index, self.confidence), counts

    def step(self, k: int) -> int:
        spec = self.spec
        self.state, logits, C = spec.forward(k, self.state, self.alive)
        if self.out is None:
            self.out = logits.new_empty((self.B, C))
        elif logits.dtype != self.out.dtype:
            # Every row's logits are written into this one tensor, of exit 0's dtype: a wider
            # exit's were cast down without a word (float32 logits beyond float16's range became
            # inf). Checked per call (a stage step returns each exit's own logits, any dtype).
            raise ValueError(mixed_logits_dtypes(k, logits.dtype, 0, self.out.dtype))
        if self.B == 0:
            return 0
        final = k == self.K - 1
        if spec.average:
            self.acc = logits.float() if self.acc is None else self.acc + logits.float()
            if final:
                logits = (self.acc / self.K).to(logits.dtype)
        # The loop needs the count anyway (the next stage's batch size): it is read once here,
        # so a stage where nobody leaves skips the pack altogether.
        self.keep, left = self.exit_step(logits, k, final)
        self.alive -= left
        if self.history is not None and not final:
            self.history.append(logits)
        return left

    def exit_step(self, logits, k: int, final: bool):
        """Decide exit ``k`` for the live rows and write the leavers (logits, score, k) into the
        outputs: ``(keep, left)``, ``keep`` bool [n] the rows that go on."""
        scorer, history = self.spec.scorer, self.history or ()
        rows = self.rows
        assert self.out is not None  # allocated by step() before the first exit
        if final:
            self.out.index_copy_(0, rows, logits.to(self.out.dtype))
            self.confidence.index_copy_(0, rows, scorer.score(logits, self.state, k, history))
            self.exit_index.index_fill_(0, rows, k)
            return None, rows.shape[0]
        score, exited = scorer.decide(logits, self.state, k, history, self.thr)
        left = int(exited.sum())
        if left:
            ops.scatter_rows(
                exited,
                rows,
                [logits, score, torch.full_like(rows, k)],
                [self.out, self.confidence, self.exit_index],
                backend=self.spec.compact_backend,
            )
        return ~exited, left

    def compact(self, tensors):
        return ops.compact(self.keep, tensors, backend=self.spec.compact_backend)[1]

    def pack(self) -> None:
        parts = as_tuple(self.state)
        self.unpack(self.compact([*parts, self.rows, *self.extra()]), len(parts))

    def extra(self):
        return ([self.acc] if self.acc is not None else []) + (self.history or [])

    def unpack(self, packed, n_parts: int) -> None:
        # The packed list lives until the next pack, as it always has: a tensor a stage passes
        # through unchanged is still held here then, so that pack copies it instead of packing it
        # in place (ownership.sole_owner counts this reference).
        self.packed = packed
        self.state = from_tuple(packed[:n_parts], self.state)
        self.rows = packed[n_parts]
        rest = packed[n_parts + 1 :]
        if self.acc is not None:
            self.acc, rest = rest[0], rest[1:]
        if self.history is not None:
            self.history = list(rest)


class FusedCpuPass(EagerPass):
    """:class:`EagerPass` with the compiled CPU ops (``ops``: a ``CpuLoopOps``)."""

    def __init__(self, spec: RunSpec, x, B: int, thr: torch.Tensor, fused):
        super().__init__(spec, x, B, thr)
        self.fused = fused

    def exit_step(self, logits, k: int, final: bool):
        if logits.dtype not in FUSED_LOGITS_DTYPES:
            return super().exit_step(logits, k, final)
        keep, left = self.fused.exit_scatter(
            logits, self.thr, self.spec.scorer.code, k, final, self.rows, self.out, self.confidence, self.exit_index
        )
        return keep, int(left)

    def compact(self, tensors):
        if all(t.layout == torch.strided for t in tensors):
            return keep_layouts(lambda ts: self.fused.compact(self.keep, ts), tensors)
        return super().compact(tensors)

    def pack(self) -> None:
        parts = as_tuple(self.state)
        # Local names the ownership proof must count: `parts` (and `self.state` when it is the
        # tuple itself); `self.state` also holds the lone tensor of a tensor state.
        own = sole_owner(parts, named=int(parts is not self.state), tuple_names=1 + int(parts is self.state))
        # each part as its row-major view when its rows are dense in another order (channels_last:
        # eeruntime/rows_layout.py), so that it is packed in its own layout
        views = [to_rows(t, row_order(t)) for t in parts] if own else []
        if own and all(t.is_cpu and rows_writable(t) for t in views):
            # Nothing else can see this stage's output: pack it where it lies (no new memory; the
            # next stage reads the first n rows, as the oracle does). The ids are the pass's own;
            # acc and history may alias exit logits, so they are copied.
            self.fused.compact_(self.keep, [*views, self.rows])
            n, extra = self.alive, self.extra()
            packed = [t[:n] for t in (*parts, self.rows)] + (self.compact(extra) if extra else [])
        else:
            packed = self.compact([*parts, self.rows, *self.extra()])
        self.unpack(packed, len(parts))


def cpu_loop_ops_for(spec: RunSpec, device: torch.device) -> Optional[CpuLoopOps]:
    """The compiled CPU loop ops when a batch on ``device`` can use them (the CPU, a named
    criterion, no backend forced away from ``cpp``, the extension built), else None. The pass
    (:func:`eager_pass`) and the stage step (``rt.run_stage``) choose by the same rule."""
    if (
        device.type == "cpu"
        and spec.scorer.code is not None
        and spec.scorer.backend in ("auto", "cpp")
        and spec.compact_backend in ("auto", "cpp")
    ):
        return cpu_loop_ops()
    return None


def eager_pass(spec: RunSpec, x, B: int, thr: torch.Tensor) -> EagerPass:
    """The fused CPU pass when this batch can use it (:func:`cpu_loop_ops_for`), else the
    dispatched-ops pass."""
    fused = cpu_loop_ops_for(spec, as_tuple(x)[0].device)
    if fused is not None:
        return FusedCpuPass(spec, x, B, thr, fused)
    return EagerPass(spec, x, B, thr)
