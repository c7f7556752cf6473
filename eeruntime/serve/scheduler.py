"""``StageScheduler``: a worker thread (or several, ``workers``) runs the runtime's stage step on
rows gathered from every request waiting at a stage, so the survivors of many small requests
share one batch (E3's "keep every block's batch full", done inside one process).

How a request travels (see docs/serving.md for the measurements behind the policy):

- ``submit`` validates the input, takes the request's thresholds snapshot and puts its rows, as
  one *chunk* (row ids, state, carry), in stage 0's queue. Row ids encode the request
  (``seq << ROW_BITS | local row``), so a result can only reach the request its id names.
- The worker picks a stage: the **deepest stage that is ready** (its rows go on to free memory
  and finish requests first). A stage is ready when it holds ``max_batch`` rows or its oldest row
  has waited ``max_wait_ms`` (default 0: any waiting row is ready; waiting for fuller batches
  costs latency under tight SLOs on a CPU, whose cost per row barely falls with batch size).
  Once stage 0 falls behind (it holds a full batch per worker: arrivals outpace the workers), full batches
  go first, so survivors of successive stage-0 batches share the deeper batches (E3's gain at
  saturation), each row passed over for at most ``max_defer_ms``. Several workers share the
  queues: each takes its batch under ``_qlock`` and runs it while the others take theirs.
- It gathers chunks from that queue's head up to ``max_batch`` rows (splitting the last one) that
  share one thresholds snapshot and one input layout, concatenates them, and calls
  ``rt.run_stage``. Leavers' logits go to their requests; a request whose rows have all left
  resolves. Survivors go, as one chunk, to the next stage's queue.
- **One pass when nothing could join** (``fused=True``, the default): a stage-0 batch whose
  survivors would meet no other row at any deeper stage (no row waits deeper, and none of its
  rows would wait for a fuller batch) would run every later step at once on just its own
  survivors, which is what ``rt.infer`` does in one call with its fused ops (or whole-model CUDA
  graph): so the worker makes that one call. With ``max_wait_ms=0`` and ``policy="deepest"``
  this is every batch while stage 0 keeps up; the steps differ from it only when rows wait for
  fuller batches (``max_wait_ms``, or ``max_defer_ms`` once stage 0 is behind: then a full
  stage-0 batch runs step by step, so that its survivors can meet the next batch's).

Thresholds: **one snapshot per request**, taken when it is admitted; a batch never mixes
snapshots, so every request is answered with one set of thresholds, exactly as ``rt.infer``
would be. ``set_thresholds`` swaps the snapshot atomically for requests admitted after it.

Failure isolation: an exception in a stage step fails exactly the requests with rows in that
batch (a pass that raises is run again step by step, so the same holds). Timeouts and
cancellation mark a request dead; its rows are dropped from every queue before the next batch
(a pass under way finishes its batch; the request is answered at its deadline all the same).
``close`` drains or fails every pending request; none is left pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import math
import numbers
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union, cast

import torch

from ..runtime import EERuntime, InferenceResult, cat_rows, take_rows
from ..state import check_state
from .stats import SchedulerStats

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]  # a request's input, or rows of a stage's state
Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a request's rows of logits, confidence, exit index

ROW_BITS = 24  # rows per request < 2**24; the request's sequence number sits above
ROW_MASK = (1 << ROW_BITS) - 1
INLINE_MODES = ("blocking", "always", "never")
# The longest one wait of a scheduler's thread on a condition: past threading.TIMEOUT_MAX (about
# 292 years) the wait raises OverflowError, and a finite timeout_s or max_wait_ms may be that long
# (timeout_s=1e10 stopped the timeout thread: no request timed out any more). Every such wait is
# in a loop that re-checks what it waits for, so waking early only waits again.
MAX_WAIT_S = 3600.0
POLICIES = ("deepest", "fill", "request")
# _views makes the answers' views with one split per output from this many parts on
# (measured: a split costs about half a Python slice per view, plus a fixed ~2 us)
SPLIT_MIN_ROWS = 4
# max_defer_ms passes a partial stage over only while the rows upstream are expected to fill it;
# "expected" uses each stage's measured share of rows that go on, from counts that decay by this
# factor per batch at that stage (about the last ten batches weigh: thresholds or traffic change)
SURVIVAL_DECAY = 0.9
# max_defer_ms=None: on a CPU, 20 ms (measured on the 2-core VM's ResNet-style model: 5 and 10 ms
# bought nothing, as a stage-3 batch needs about seven stage-0 batches of 3-4 ms to fill; 20 ms
# gave 1.08-1.27x (b)'s saturated throughput; docs/serving.md, "Session 8" and "Session 9"). Off
# elsewhere: on a GPU the one pass replays the runtime's CUDA graphs, and re-batched steps lost to it
# (an H100, session 12: max_defer_ms=20 at 0.42x and 0.85x request batching's saturated throughput,
# the worker spending more host time per request on the steps than fuller batches saved; docs/serving.md,
# "Session 12: on an NVIDIA H100"; and on an H200 with a ViT-S/16, whose small batches leave the GPU
# underused: max_defer_ms 5 and 20 at 0.91x and 0.86x, "Session 18").
DEFAULT_MAX_DEFER_MS_CPU = 20.0
# How many queued chunks a batch's gathering looks through, past chunks of another input layout
# or thresholds snapshot, for more rows like the oldest chunk's (requests of several shapes, e.g.
# text of several padded lengths, would otherwise run in small batches whenever they interleave);
# bounded so a long mixed queue costs each batch a bounded scan.
GATHER_LOOKAHEAD = 256


class SchedulerError(RuntimeError):
    """Base of the scheduler's own refusals."""


class SchedulerFull(SchedulerError):
    """Admitting the request would exceed ``max_queue_rows`` (backpressure)."""


class SchedulerClosed(SchedulerError):
    """The scheduler is shut down (or shutting down) and takes no new requests."""


class StageFailed(SchedulerError):
    """A stage step raised while this request's rows were in its batch (``__cause__`` holds it)."""


class _RequestFuture(concurrent.futures.Future):
    """A request's future: cancelling it frees the request's rows at every stage (an override,
    not a done-callback per request: a callback costs a lock and a call at every answer). The
    submit sets ``_ee_sched`` and ``_ee_seq`` right after making it (no ``__init__`` of its own:
    one Python frame less per submit, measured 0.1-0.2 us of its 1.3)."""

    _ee_sched: StageScheduler
    _ee_seq: int

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._ee_sched._forget(self._ee_seq, "cancelled")
        return True


class _LoopAnswer:
    """An asyncio caller's answer (:meth:`StageScheduler.submit`): an asyncio future on its event
    loop, which the worker sets from its own thread. A ``concurrent.futures.Future`` wrapped by
    ``asyncio.wrap_future`` would make one ``call_soon_threadsafe`` per request, each a write to
    the loop's self-pipe (a syscall that lets the GIL go, so the loop's thread takes it and the
    worker waits to get it back, once per request); a batch's answers for one loop take one call
    instead (:func:`_post`, from :meth:`StageScheduler._finish`)."""

    __slots__ = ("loop", "afut", "seq", "posted", "abandoned")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.afut, self.seq, self.posted = loop, loop.create_future(), 0, False
        # its caller was cancelled while the admission waited for room in another thread
        # (when_full="wait"): set under _cv, and an admission that sees it admits nothing
        self.abandoned = False

    def done(self) -> bool:
        return self.posted

    def set_exception(self, exc: BaseException) -> None:
        self.posted = True
        _post(self.loop, [(self.afut, None, exc)])


def _post(loop: asyncio.AbstractEventLoop, answers: list) -> None:
    """Hand ``answers`` [(asyncio future, result, exception)] to their loop in one call."""
    try:
        loop.call_soon_threadsafe(_settle, answers)
    except RuntimeError:  # the loop is closed: nothing awaits these answers any more
        pass


def _drop(afut: asyncio.Future) -> None:
    """On the loop, its caller cancelled before it awaited ``afut``: no answer is to be set on it
    any more, and one already set (a timeout or a failure) is read, as nobody else will (asyncio
    would log its error as never retrieved). (A caller cancelled while awaiting ``afut`` needs
    none of this: its task cancels ``afut``, or reads the answer set just before.)"""
    if not afut.cancel() and not afut.cancelled():
        afut.exception()


def _settle(answers: list) -> None:
    """On the loop: set each future not cancelled meanwhile (its awaiting task may have been)."""
    for afut, result, exc in answers:
        if not afut.done():
            if exc is None:
                afut.set_result(result)
            else:
                afut.set_exception(exc)


class _Chunk:
    """Rows waiting at a stage: their ids, state and carry, the snapshot and input layout they
    share, and when they may run without a fuller batch (``ready_at``: entry time plus
    ``max_wait``, or the entry time itself for rows of a request admitted to an idle scheduler,
    which no other row could join).

    ``ids``: an int64 tensor [n] for survivors (from a stage step), or a ``range`` for a request's
    own rows at stage 0: a submitter makes no tensor (every torch call may hand the GIL to the
    worker, and the submitter then waits to get it back); the worker turns a batch's ranges into
    one tensor."""

    __slots__ = ("ids", "state", "carry", "snap", "layout", "ready_at", "urgent", "n")

    def __init__(
        self,
        ids: Union[torch.Tensor, range],
        state: Optional[State],
        carry: Optional[State],
        snap: Any,
        layout: Optional[tuple],
        ready_at: float,
        urgent: bool = False,
    ) -> None:
        self.ids, self.state, self.carry, self.snap, self.layout = ids, state, carry, snap, layout
        self.ready_at, self.urgent = ready_at, urgent
        self.n = len(ids)

    def split(self, r: int) -> _Chunk:
        """The first ``r`` rows as a new chunk; this one keeps the rest (views, no copy)."""
        head = _Chunk(
            self.ids[:r],
            _slice(self.state, 0, r),
            _slice(self.carry, 0, r),
            self.snap,
            self.layout,
            self.ready_at,
            self.urgent,
        )
        self.ids, self.state, self.carry = self.ids[r:], _slice(self.state, r, None), _slice(self.carry, r, None)
        self.n -= r
        return head


class _Request(_Chunk):
    """An admitted request, and (until its rows run) its rows' entry in stage 0's queue: one
    object per request where the submitter would otherwise make two (every submit makes it, in
    the submitting thread, holding the GIL: docs/serving.md, "The serving machinery's own cost").
    A request whose rows are split across batches is queued as a plain :class:`_Chunk` from then
    on (:meth:`as_chunk`), so a ``_Request`` in a batch always brings all its rows."""

    __slots__ = ("seq", "future", "t0", "deadline", "remaining", "logits", "exit_index", "confidence")

    def __init__(
        self,
        seq: int,
        n: int,
        future: Union[concurrent.futures.Future, _LoopAnswer],
        snap: Any,
        t0: float,
        deadline: Optional[float],
        layout: Optional[tuple],
        state: Optional[State] = None,
        ready_at: float = 0.0,
        urgent: bool = False,
    ) -> None:
        self.seq, self.n, self.future, self.snap, self.t0 = seq, n, future, snap, t0
        self.deadline, self.layout, self.state, self.carry = deadline, layout, state, None
        self.ids = range(seq << ROW_BITS, (seq << ROW_BITS) + n)
        self.ready_at, self.urgent = ready_at, urgent
        self.remaining = n
        # filled as the request's rows leave (the whole request's rows once it is answered)
        self.logits: Optional[torch.Tensor] = None
        self.exit_index: Optional[torch.Tensor] = None
        self.confidence: Optional[torch.Tensor] = None

    def as_chunk(self) -> _Chunk:
        """The request's rows as a chunk of their own (to be split: the request keeps its ``n``)."""
        return _Chunk(self.ids, self.state, None, self.snap, self.layout, self.ready_at, self.urgent)


def _slice(state: Optional[State], a: int, b: Optional[int]) -> Optional[State]:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(t[a:b] for t in state)
    return state[a:b]


def _timeout(timeout_s: Any) -> Optional[float]:
    """A request's timeout checked: seconds > 0, or None for none (inf). A NaN, zero or negative
    timeout is refused: it would fail every request, or (NaN, inf) break the order of the
    deadlines the timeout thread waits on (an inf one stopped that thread, so no request timed
    out any more)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"timeout_s must be seconds (a number > 0) or None, got {type(timeout_s).__name__}")
    if timeout_s == math.inf:
        return None
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds (or None: no timeout), got {timeout_s}")
    return float(timeout_s)


def _bounded(seconds: Optional[float]) -> Optional[float]:
    """A wait of ``seconds`` (None: until notified) at most :data:`MAX_WAIT_S`."""
    return None if seconds is None else min(seconds, MAX_WAIT_S)


def wait_ms_error(value: Any) -> Optional[str]:
    """What is wrong with a wait in milliseconds (``max_wait_ms``, ``max_defer_ms``), said after
    its name, or None. It must be a number >= 0 and finite: an infinite wait is no setting (the
    scheduler's worker stopped on it, timestamp out of range, and until then a partial batch
    waited to fill, a lone request until its timeout). Shared by the front ends' option checks (``cli.scheduler_options_error``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be >= 0, got {value!r}"
    try:
        ms = float(value)
    except OverflowError:  # an int past float's range
        return "must be finite (milliseconds), got an int past float's range"
    if not ms >= 0:
        return f"must be >= 0, got {value!r}"
    if ms == math.inf:
        return f"must be finite (milliseconds), got {value!r}"
    return None


def check_pad_to(pad_to: Optional[Sequence[int]], adapter: Any) -> Tuple[int, ...]:
    """``pad_to`` checked, as increasing lengths (() for None)."""
    if pad_to is None:
        return ()
    if isinstance(pad_to, int) or not isinstance(pad_to, (list, tuple)):
        pad_to = [pad_to]  # type: ignore[list-item]  # (one length; anything else is refused below)
    if not pad_to or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pad_to):
        raise ValueError(f"pad_to must be positive sequence lengths (ints), e.g. (32, 64, 128); got {pad_to!r}")
    if not getattr(adapter, "can_pad", False):
        raise ValueError(
            "pad_to pads token ids and their attention mask: it needs a text encoder attached with "
            "ee.attach_exits (an HF model that takes input_ids and attention_mask); this model "
            + ("has no input adapter" if adapter is None else f"takes {list(getattr(adapter, 'names', ()))}")
        )
    why = getattr(adapter, "length_dependent", None)  # (an adapter pickled before it had one: None)
    if why:
        raise ValueError(
            f"pad_to would change this model's answers: {why}, and a padded request would see a longer one; "
            "serve it without pad_to"
        )
    longest = getattr(adapter, "max_length", None)
    if longest is not None and max(pad_to) > longest:
        raise ValueError(
            f"pad_to {max(pad_to)} is longer than this model takes ({longest} tokens, as many as its position "
            "embeddings hold)"
        )
    return tuple(sorted(set(pad_to)))


def pad_tokens(x: Tuple[torch.Tensor, ...], pad_to: Tuple[int, ...], adapter: Any) -> State:
    """``x`` (a tuple ``adapter`` made: token ids first) right-padded to the shortest length of
    ``pad_to`` (:func:`check_pad_to`'s) that holds it, with ``adapter.pad``; a request longer
    than every length keeps its own (it batches with requests of its length). Shared by the
    scheduler and the Ray replicas."""
    if not isinstance(x[0], torch.Tensor) or x[0].dim() != 2:  # (not [B, S] ids: check_state and the model judge it)
        return x
    length = x[0].shape[1]
    for target in pad_to:
        if target >= length:
            return cast(State, adapter.pad(x, target))
    return x


def _carry_rows(carry: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a step's carry (``run_stage``'s tuple of tensors, or None / () before any exit)."""
    return None if carry is None else take_rows(carry, idx) if carry else ()


def _layout(x: State) -> tuple:
    """What rows must share to be concatenated: per member, the shape after dim 0, dtype, device."""
    if isinstance(x, torch.Tensor):  # (the common case, at every submit: no generator, no tuple())
        return ((x.shape[1:], x.dtype, x.device),)
    return tuple((t.shape[1:], t.dtype, t.device) for t in x)


def _batch_ids(chunks: List[_Chunk]) -> torch.Tensor:
    """The ids of a batch's chunks as one int64 tensor (stage 0's are ranges, see _Chunk)."""
    if not isinstance(chunks[0].ids, range):
        return chunks[0].ids if len(chunks) == 1 else torch.cat([cast(torch.Tensor, c.ids) for c in chunks])
    return torch.tensor([i for c in chunks for i in c.ids], dtype=torch.int64)


class StageScheduler:
    """Serve ``rt`` by stage: rows of all requests waiting at a stage run as one batch.

    Args:
        rt: the :class:`~eeruntime.EERuntime` to serve (its ``run_stage`` seam does the work).
        max_batch: most rows in one stage step (16-32 suits a small CPU model; see docs/serving.md).
        policy: which stage runs next (docs/serving.md, "Policy"). ``"deepest"`` (default): the
            deepest *ready* stage (``max_batch`` rows, or a row that waited ``max_wait_ms``); the
            worker sleeps while none is. ``"fill"``: keep every stage's batch full under load
            (E3's aim): the deepest stage with a row that waited ``max_wait_ms``, else the deepest
            full stage, else the stage holding the most rows (ties: the deepest); the worker never
            sleeps while rows wait, so ``max_wait_ms`` bounds how long rows may be passed over,
            and ``max_wait_ms=0`` makes it ``"deepest"``. ``"request"``: request-level dynamic
            batching inside this scheduler, the serving baseline: a batch gathered at stage 0
            (``max_batch`` rows, or a row that waited ``max_wait_ms``) runs whole, in one pass
            (``rt.infer``'s path), and its survivors are never re-batched with other requests'.
            The same machinery (timeouts, backpressure, failure isolation, statistics) around
            the batching servers use without this scheduler: where re-batching does not pay
            (docs/serving.md, "Session 12"), or to measure what it buys.
        max_wait_ms: how long a stage with fewer than ``max_batch`` rows may wait for more before
            it runs anyway (0: never wait). Finite, as ``max_defer_ms`` (inf is refused: no wait
            may be endless, a lone request's partial batch would never run).
        max_defer_ms: ``"deepest"`` policy, under a backlog: how long a ready stage with fewer
            than ``max_batch`` rows may be passed over while some stage holds a full batch. It is
            passed over only while stage 0 is behind (it holds ``max_batch`` rows for every
            worker: arrivals outpace the workers) and the rows upstream are expected to fill its batch (by the
            measured shares of rows that go on); then full stage-0 batches run first, step by
            step, and their survivors fill the deeper stages' batches (E3's aim: fewer stage
            calls per request, so more requests per second once arrivals outpace the worker).
            When stage 0 keeps up, nothing changes: the deepest ready stage runs first, and a
            stage-0 batch in one pass. 0: never; None (the
            default): ``DEFAULT_MAX_DEFER_MS_CPU`` (20) for a model on the CPU, 0 elsewhere (on an
            H100 it lost to the one pass: docs/serving.md, "Session 12"). ``policy="fill"`` bounds passed-over rows by ``max_wait_ms``
            instead and takes no ``max_defer_ms``. See docs/serving.md, "Policy" (and "Session 8",
            "Session 9" for what it measured).
        max_queue_rows: rows admitted and not yet answered, at most; beyond it ``submit`` raises
            :class:`SchedulerFull` (``when_full="error"``) or waits for room up to the request's
            timeout (``when_full="wait"``).
        timeout_s: default per-request timeout (None: none); ``submit(x, timeout_s=...)`` overrides.
        latency_window: how many recent request latencies the percentiles are computed over.
        inline: when a request may run whole in the submitting thread, as one ``rt.infer``,
            because the scheduler is idle (see :meth:`infer`): ``"blocking"`` (default: only
            :meth:`infer`, whose caller waits anyway), ``"always"`` (also :meth:`submit_nowait`
            and :meth:`submit`, which then return or resume only when it is done: on an asyncio
            loop, the loop is held for that request's time; and only once the scheduler has been
            idle for as long as an inline run takes, so that a lone submitting thread under
            load still lets batches form) or ``"never"``.
        fused: run a stage-0 batch through every stage in one pass (the runtime's ``infer`` path:
            its fused CPU ops or its whole-model CUDA graph, one call instead of one step per
            stage) when the step-by-step run would form exactly the same batches: no row waits at
            a deeper stage, none of the batch's rows would wait for a fuller batch
            (``max_wait_ms=0``, or rows admitted to an idle scheduler), and, with ``max_defer_ms``,
            the batch is not a full one taken from a backlog (whose survivors would be passed over
            at stage 1 while the next full batches run, to share its batch). The answers are the
            same; a stage that raises runs the batch again step by step, so it fails exactly the
            requests whose rows reached it. ``False``: always step by step (``rt.run_stage``),
            which also drops a request's rows between stages when it times out or is cancelled.
            See docs/serving.md, "One pass when nothing could join".
        workers: worker threads that run batches (default 1). More than one runs batches of
            different stages, or several stage-0 batches, at once: the model's work releases the
            GIL, so on a CPU with free cores (``torch.set_num_threads`` small enough to leave
            them free) the workers' compute overlaps while their Python bookkeeping takes turns.
            Every worker follows the same policy on the same queues, so the survivors of every
            worker's batches share the deeper batches. See docs/serving.md, "Several workers".
        pad_to: for a text encoder attached with :func:`~eeruntime.attach_exits` (HF token ids and
            an attention mask): sequence lengths, e.g. ``(32, 64, 128)``; each request is padded
            at submit to the shortest that holds it, as a tokenizer pads, so requests of different
            lengths share batches (rows batch only with rows of the same shape). A request longer
            than the longest keeps its length. None (default): no padding. Answers equal
            ``rt.infer`` of the unpadded request within float rounding (the padded tokens are
            masked out); refused for a decoder whose rotary scaling follows the sequence length
            (dynamic, longrope), whose answers the padding changes. See docs/serving.md, "Text models".

    A model with an input adapter (an attached HF encoder) takes at submit whatever ``rt.infer``
    takes (a dict or a tokenizer's ``BatchEncoding``, a tuple in the forward's order, the token
    ids alone): it is mapped to the stages' input there, so requests given in different forms
    share batches, and a request the adapter refuses is refused at submit.
    """

    def __init__(
        self,
        rt: EERuntime,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        *,
        max_queue_rows: int = 4096,
        when_full: str = "error",
        timeout_s: Optional[float] = None,
        latency_window: int = 10000,
        name: str = "eeruntime-stage-scheduler",
        inline: str = "blocking",
        policy: str = "deepest",
        fused: bool = True,
        max_defer_ms: Optional[float] = None,
        workers: int = 1,
        pad_to: Optional[Sequence[int]] = None,
    ):
        if not hasattr(rt, "run_stage"):
            raise TypeError(f"StageScheduler needs an EERuntime (with run_stage), got {type(rt).__name__}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int (worker threads), got {workers!r}")
        bad = wait_ms_error(max_wait_ms)
        if bad:
            raise ValueError(f"max_wait_ms {bad}")
        bad = None if max_defer_ms is None else wait_ms_error(max_defer_ms)
        if bad:
            raise ValueError(f"max_defer_ms {bad} (or None: the default)")
        if not isinstance(max_queue_rows, int) or max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be a positive int, got {max_queue_rows!r}")
        if when_full not in ("error", "wait"):
            raise ValueError(f"when_full must be 'error' or 'wait', got {when_full!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if policy == "fill" and max_defer_ms is not None and max_defer_ms > 0:
            raise ValueError(
                "max_defer_ms applies to policy='deepest'; policy='fill' already runs full batches first and "
                "bounds how long rows are passed over by max_wait_ms"
            )
        if policy == "request" and max_defer_ms is not None and max_defer_ms > 0:
            raise ValueError(
                "max_defer_ms applies to policy='deepest'; policy='request' never re-batches survivors, so "
                "there is no deeper batch to fill"
            )
        if policy == "request" and not fused:
            raise ValueError(
                "policy='request' runs every batch in one pass (rt.infer's path); fused=False asks for steps, "
                "whose survivors another request's rows could join: use policy='deepest' for that"
            )
        if inline not in INLINE_MODES:
            raise ValueError(f"inline must be one of {', '.join(map(repr, INLINE_MODES))}, got {inline!r}")
        self.rt = rt
        self.inline = inline
        self.fused = bool(fused)
        self.policy = policy
        self.num_stages = rt.num_exits
        # an attached HF encoder's: requests are mapped (and padded) at submit, in _check_input
        self._input_adapter = getattr(rt.model, "input_adapter", None)
        self.pad_to = check_pad_to(pad_to, self._input_adapter)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        # _submit's shortcut: a lone tensor on this device needs no other check
        # (a device with an index, or the CPU: a tensor's own device always names its index)
        dev = getattr(rt, "_device", None)
        if max_defer_ms is None:
            on_cpu = isinstance(dev, torch.device) and dev.type == "cpu"
            max_defer_ms = DEFAULT_MAX_DEFER_MS_CPU if on_cpu and policy == "deepest" else 0.0
        self.max_defer_s = max_defer_ms / 1000.0
        exact = isinstance(dev, torch.device) and (dev.type == "cpu" or dev.index is not None)
        # (not with an input adapter: every request of such a model is mapped in _check_input)
        self._fast_device = dev if exact and self._input_adapter is None else None
        self._max_rows = min(max_queue_rows, ROW_MASK)
        self.max_queue_rows = max_queue_rows
        self.when_full = when_full
        self.timeout_s = None if timeout_s is None else _timeout(timeout_s)
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # the worker sleeps on it
        self._room = threading.Condition(lock)  # submitters waiting for room (when_full="wait")
        self._room_waiting = 0  # how many (under _cv)
        self._reaper_cv = threading.Condition(lock)  # the timeout thread sleeps on it
        self._reaper: Optional[threading.Thread] = None
        self._inbox: Deque[_Chunk] = deque()  # stage-0 chunks from submitters, taken by the worker
        # the stage queues and the survival counts are the workers', under _qlock (which
        # submitters never take; where both locks are held, _cv is taken first)
        self._qlock = threading.Lock()
        self._queues: List[Deque[_Chunk]] = [deque() for _ in range(self.num_stages)]
        # a request's partial answers (its rows, split across batches, may leave in two workers at once)
        self._dlock = threading.Lock()
        self._requests: Dict[int, _Request] = {}  # admitted, not answered (worker and submitters, under _cv)
        self._deadlines: list = []  # heap of (deadline, seq)
        self._dead: set = set()  # seqs answered early (timeout, cancel, failure) whose rows may still wait
        self._admitted_rows = 0
        self._seq = itertools.count(1)
        self._sleeping = 0  # workers asleep on _cv (no stage ready)
        self._inline = False  # a caller runs a request in its own thread (infer() at idle)
        self._clock = time.perf_counter  # of the inline="always" rule (a test may replace it)
        self._last_answer = -float("inf")  # when the last request was answered
        self._last_inline_s = 0.0  # how long an inline run takes (moving average)
        self._after_inline = 0  # workers asleep until that caller is done
        self._closing = False
        self._drain = True
        self.stats = SchedulerStats(self.num_stages, latency_window)
        # rows that reached each stage and went on from it, decayed (see SURVIVAL_DECAY; worker
        # only); the prior is one full batch that went on whole, so until measured a partial stage
        # may be passed over (for at most max_defer_ms) as if its batch would fill
        self._reached = [float(max_batch)] * self.num_stages
        self._went_on = [float(max_batch)] * self.num_stages
        self.workers = workers
        self._workers = [
            threading.Thread(target=self._run, name=name if i == 0 else f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        self._worker = self._workers[0]  # (the timeout thread is named after it)
        for w in self._workers:
            w.start()

    # ------------------------------------------------------------------ submitting
    def submit_nowait(self, x: State, timeout_s: Optional[float] = None) -> concurrent.futures.Future:
        """Admit ``x`` (a tensor or a tuple of tensors sharing batch dim 0: one sample or a small
        batch) and return a :class:`concurrent.futures.Future` of its
        :class:`~eeruntime.InferenceResult`. Cancelling the future frees the request's rows at
        every stage. ``x`` must not be modified until the future is done. With
        ``inline="always"`` and an idle scheduler, it runs here and the future returned is done."""
        return self._submit(x, timeout_s, None)  # type: ignore[return-value]  # (answer None: a Future)

    def _submit(
        self, x: State, timeout_s: Optional[float], answer: Optional[_LoopAnswer], wait: bool = True
    ) -> Union[concurrent.futures.Future, _LoopAnswer, None]:
        """Admit ``x``; its answer goes to ``answer`` (an asyncio caller's) or, when None, to a
        new future returned (or a done future: run inline). ``wait=False``: None, admitting
        nothing, where ``when_full="wait"`` would wait for room (an event loop must not).

        Every request pays this in the submitting thread, holding the GIL, and the worker waits
        for the GIL meanwhile: where the host's Python is the bound (a small model on a GPU),
        the submit's cost is the server's throughput. So the common request (one tensor on the
        model's device) is checked in a few attribute reads, and the rest is inline (measured:
        bench/serve_machinery.py; docs/serving.md, "The serving machinery's own cost")."""
        dev = self._fast_device
        # the common request, one tensor on the model's device: _check_input's checks in a few
        # attribute reads, here (every submit pays them, in the submitting thread, holding the
        # GIL), its shape read once (each read makes a torch.Size: 0.35 of 0.88 us, measured); a
        # 0-dim tensor (empty shape) goes to the checks, which refuse it
        shape = x.shape if type(x) is torch.Tensor and dev is not None else None
        if shape and x.device == dev and 0 < shape[0] <= self._max_rows:  # type: ignore[union-attr]
            n, layout = shape[0], ((shape[1:], x.dtype, dev),)  # type: ignore[union-attr]  # (a tensor: shape)
        else:
            x, n, layout = self._check_input(x)
        if timeout_s is None:
            timeout_s = self.timeout_s
        elif type(timeout_s) not in (float, int) or not 0 < timeout_s < math.inf:  # (NaN fails it too)
            timeout_s = _timeout(timeout_s)
        if timeout_s is None:
            if self.inline == "always":
                done = self._run_inline(x, n, quiet=True)
                if done is not None:
                    return done
            deadline = None
            t0 = time.perf_counter()
        else:
            t0 = time.perf_counter()
            deadline = t0 + timeout_s
        # No torch call under the lock (none at all here, see _Chunk): a torch call may release
        # the GIL, and a submitter that lets the GIL go while holding the lock makes the worker
        # wait for both (measured: the worker spent a quarter of a burst waiting for this lock).
        seq = next(self._seq)  # (itertools.count: atomic under the GIL)
        future: Union[concurrent.futures.Future, _LoopAnswer]
        if answer is None:
            future = _RequestFuture()
            future._ee_sched, future._ee_seq = self, seq
        else:
            future, answer.seq = answer, seq
        # The request (its rows' entry in stage 0's queue: see _Request) is made before the lock:
        # the worker takes this lock at every batch, and a submitter that loses the GIL while
        # holding it (at a forced switch, or a GC pass its allocations start) makes the worker
        # wait for both; so only the admission itself is under it.
        req = _Request(seq, n, future, self.rt.thresholds_snapshot(), t0, deadline, layout, x)
        with self._cv:
            if self._closing or self._admitted_rows + n > self.max_queue_rows:
                if not wait and not self._closing and self.when_full == "wait":
                    return None
                self._wait_for_room(n, deadline, timeout_s)
            if answer is not None and answer.abandoned:
                return answer  # (its caller is gone: see submit)
            # Admitted to an idle scheduler (nothing pending): no other row can share this
            # request's batches but later arrivals, so it never waits max_wait for them.
            if self._admitted_rows:
                req.ready_at = t0 + self.max_wait_s
            else:
                req.ready_at, req.urgent = t0, True
            self._requests[seq] = req  # (_register, inline: every submit pays a call)
            self._admitted_rows += n
            self.stats.submitted += 1
            if deadline is not None:
                self._arm(deadline, seq)
            self._inbox.append(req)
            if self._sleeping:
                self._cv.notify()
        return future

    def _wait_for_room(self, n: int, deadline: Optional[float], timeout_s: Optional[float]) -> None:
        """Under ``_cv``: return once ``n`` more rows fit (``when_full="wait"``), else raise
        (closed, ``SchedulerFull``, or no room within the request's timeout)."""
        while True:
            if self._closing:
                raise SchedulerClosed("the scheduler is closed; it takes no new requests")
            if self._admitted_rows + n <= self.max_queue_rows:
                return
            if self.when_full == "error":
                self.stats.rejected += 1
                raise SchedulerFull(
                    f"the scheduler is full ({self._admitted_rows} of {self.max_queue_rows} rows pending); "
                    "retry later or raise max_queue_rows"
                )
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                self.stats.timeouts += 1
                raise TimeoutError(f"no room in the scheduler within the request's timeout of {timeout_s} s")
            self._room_waiting += 1
            try:
                self._room.wait(_bounded(left))
            finally:
                self._room_waiting -= 1

    async def submit(self, x: State, timeout_s: Optional[float] = None) -> InferenceResult:
        """Await the result of ``x``; cancelling the awaiting task frees its rows. The answers of
        one batch reach the event loop in one call (see :class:`_LoopAnswer`)."""
        loop = asyncio.get_running_loop()
        answer = _LoopAnswer(loop)
        got = self._submit(x, timeout_s, answer, wait=False)
        if got is None:
            # when_full="wait" and the scheduler is full: wait for room off the event loop (only
            # then: a thread hop per request cost about 100 us each in bursts, docs/serving.md,
            # "Asyncio callers")
            try:
                got = await loop.run_in_executor(None, self._submit, x, timeout_s, answer)
            except asyncio.CancelledError:
                # the admission goes on in its thread (a running call cannot be cancelled): it
                # admits nothing once it sees this flag, and what it admitted before is freed
                with self._cv:
                    answer.abandoned = True
                    admitted = answer.seq in self._requests
                if admitted:
                    self._forget(answer.seq, "cancelled")
                _drop(answer.afut)
                raise
        if got is not answer:  # run inline (inline="always"): done
            return cast(concurrent.futures.Future, got).result()
        try:
            return await answer.afut
        except asyncio.CancelledError:
            self._forget(answer.seq, "cancelled")
            raise

    def infer(self, x: State, timeout_s: Optional[float] = None) -> InferenceResult:
        """Blocking form of :meth:`submit`.

        When the scheduler is idle (no request pending), the request has at most ``max_batch``
        rows and no timeout, it runs at once in the calling thread as one ``rt.infer`` call (unless
        ``inline="never"``): no
        thread hand-off, and no other request's rows could have shared its batches anyway.
        Requests that arrive meanwhile wait for it (one request or batch runs at a time, as with
        the worker alone). See docs/serving.md ("Light load")."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.inline != "never" and timeout_s is None:
            # (a timeout must fire while the request runs: only the worker path can do that)
            # (the caller's x goes on to submit_nowait below, not the checked one: an input
            # adapter maps a request once, and its output read as an input again could differ)
            checked, n, _ = self._check_input(x)
            future = self._run_inline(checked, n)
            if future is not None:
                return future.result()
        return self.submit_nowait(x, timeout_s).result()

    def _check_input(self, x: Union[State, list]) -> Tuple[State, int, tuple]:
        """``x`` checked (a list becomes a tuple), its rows, and its layout (see :func:`_layout`).
        The common request (one tensor on the model's device) takes :meth:`_submit`'s shortcut
        instead; ``infer`` on an idle scheduler comes here, once per request at light load."""
        if self._input_adapter is not None:
            # in the submitting thread: a request the adapter refuses fails its caller here (a
            # bad request, not a stage failure), and requests given as a dict, a tuple or the
            # ids alone become one form, so they share batches
            x = self._input_adapter(x)
            if self.pad_to and isinstance(x, tuple):
                x = self._pad(x)
        if isinstance(x, list):
            x = tuple(x)
        n = check_state(x, "StageScheduler input")
        if n == 0:  # (no row would ever leave to answer it: refused, not left pending)
            raise ValueError("StageScheduler input has 0 rows; a request needs at least one row")
        if n > self.max_queue_rows or n > ROW_MASK:
            raise ValueError(
                f"a request of {n} rows can never be admitted: the scheduler holds at most "
                f"{min(self.max_queue_rows, ROW_MASK)} rows (max_queue_rows); split it"
            )
        self.rt._check_device(x)
        return x, n, _layout(x)

    def _pad(self, x: Tuple[torch.Tensor, ...]) -> State:
        """``x`` (the adapter's tuple) padded to the shortest of ``pad_to`` that holds it."""
        return pad_tokens(x, self.pad_to, self._input_adapter)

    def _register(self, req: _Request) -> None:
        """Count ``req`` as admitted and pending (under ``_cv``)."""
        self._requests[req.seq] = req
        self._admitted_rows += req.n
        self.stats.submitted += 1

    def _run_inline(self, x: State, n: int, quiet: bool = False) -> Optional[concurrent.futures.Future]:
        """Run ``x`` in this thread if the scheduler is idle (see :meth:`infer`); its future, done,
        or None when the request must take the worker's path. ``quiet``: also require that the
        scheduler has been idle since its last answer for at least as long as an inline run takes
        (a moving average; a non-blocking submitter may be the only thread that submits, e.g. an asyncio loop:
        while it runs a request inline nothing else can be admitted, so under load it would answer
        every request alone; a backlog shows as a request that arrives right after an answer)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        t0 = self._clock()
        with self._cv:
            if self._closing:
                raise SchedulerClosed("the scheduler is closed; it takes no new requests")
            # Idle: no request pending (so no live row in any queue: the worker has at most the
            # bookkeeping of its last batch left) and no other caller running inline.
            if self._inline or self._requests or n > self.max_batch:
                return None
            if quiet and t0 - self._last_answer < self._last_inline_s:
                return None
            req = _Request(next(self._seq), n, future, self.rt.thresholds_snapshot(), t0, None, None)
            self._register(req)
            self._inline = True  # the worker stays asleep until we are done
            self.stats.inline += 1
        try:
            # rt.infer's pass on the snapshot read at this admission (x was checked, and mapped
            # by the input adapter if any, in _check_input)
            res = self.rt._infer(x, req.snap, check=False, adapt=False)[0]
        except Exception as e:  # noqa: BLE001  (fails this request only, like a stage failure)
            self.stats.stage_failures += 1
            err = StageFailed(f"the model failed on a request of {n} rows run inline: {type(e).__name__}: {e}")
            err.__cause__ = e
            self._release_inline()
            self._fail(req.seq, err, "failed")
            return future
        except BaseException:
            self._release_inline()
            self._forget(req.seq, "interrupted")
            raise
        t1 = self._clock()
        # a moving average: one run stretched by a preemption must not keep requests off this
        # path for long
        self._last_inline_s = t1 - t0 if self._last_inline_s == 0 else 0.8 * self._last_inline_s + 0.2 * (t1 - t0)
        self._release_inline()
        self.stats.record_inline(res.exit_index.tolist(), t1 - t0)
        self._finish([(req, (res.logits, res.confidence, res.exit_index))], time.perf_counter())
        return future

    def _release_inline(self) -> None:
        with self._cv:
            self._inline = False
            # only a worker that waited for us: waking an idle one costs a thread switch (and the
            # GIL) for nothing, at every request
            if self._after_inline:
                self._cv.notify_all()

    def set_thresholds(self, thresholds: Any) -> None:
        """New thresholds for requests admitted from now on; requests already admitted finish with
        the snapshot they started with (no request mixes two sets)."""
        self.rt.set_thresholds(thresholds)

    @property
    def thresholds(self) -> List[float]:
        return list(self.rt.thresholds_snapshot())

    # ------------------------------------------------------------------ shutting down
    def close(self, drain: bool = True, timeout_s: Optional[float] = None) -> None:
        """Stop taking requests; ``drain`` answers every admitted request first, else they fail
        with :class:`SchedulerClosed`. Requests still pending after ``timeout_s`` fail too. Returns
        when the worker has stopped and no request is pending."""
        with self._cv:
            self._closing = True
            self._drain = self._drain and drain
            self._cv.notify_all()
            self._room.notify_all()
            self._reaper_cv.notify_all()
        end = None if timeout_s is None else time.perf_counter() + timeout_s
        for w in self._workers:
            w.join(None if end is None else max(0.0, end - time.perf_counter()))
        with self._cv:
            self._drain = False
            self._cv.notify_all()
        for w in self._workers:
            w.join()
        self._fail_all(SchedulerClosed("the scheduler was closed before this request was answered"))
        with self._cv, self._qlock:
            # the rows of requests failed at shutdown: no worker is left to purge them (else
            # queue_depths, and the statistics served over HTTP, would show them for good)
            self._inbox.clear()
            for q in self._queues:
                q.clear()
            self._dead.clear()
            self._reaper_cv.notify_all()
        if self._reaper is not None:
            self._reaper.join()

    def __enter__(self) -> StageScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def pending(self) -> int:
        """Requests admitted and not yet answered."""
        with self._cv:
            return len(self._requests)

    def queue_depths(self) -> List[int]:
        """Rows waiting at each stage (a racy but cheap look at the worker's queues)."""
        depths = [sum(c.n for c in list(q)) for q in self._queues]
        depths[0] += sum(c.n for c in list(self._inbox))
        return depths

    def stats_dict(self) -> dict:
        d = self.stats.as_dict()
        d.update(
            queue_depths=self.queue_depths(),
            pending_requests=len(self._requests),
            pending_rows=self._admitted_rows,
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_s * 1000,
            max_defer_ms=self.max_defer_s * 1000,
            policy=self.policy,
            workers=self.workers,
            thresholds=self.thresholds,
        )
        return d

    # ------------------------------------------------------------------ answering
    def _forget(self, seq: int, why: str) -> Optional[_Request]:
        """Remove a request from the pending set (its rows are dropped before the next batch)."""
        with self._cv:
            req = self._requests.pop(seq, None)
            if req is None:
                return None
            self._admitted_rows -= req.n
            if req.remaining:
                self._dead.add(seq)
            if why == "cancelled":
                self.stats.cancelled += 1
            self._room.notify_all()
            if self._sleeping:
                self._cv.notify()
        return req

    def _fail(self, seq: int, exc: BaseException, why: str) -> None:
        req = self._forget(seq, why)
        if req is not None and not req.future.done():
            try:
                req.future.set_exception(exc)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            seqs = list(self._requests)
        for seq in seqs:
            self._fail(seq, exc, "closed")

    def _deliver(
        self,
        k: int,
        exit_ids: List[int],
        logits: torch.Tensor,
        confidence: torch.Tensor,
    ) -> None:
        """Answer the rows that left at exit ``k`` of a stage step (``exit_ids``: their row ids,
        in the batch's order): when each is a one-row request's, straight to :meth:`_finish`;
        else grouped into runs of one request's rows, then :meth:`_answer`."""
        E = len(exit_ids)
        now = time.perf_counter()
        exit_col = torch.full((E,), k, dtype=torch.int64, device=logits.device)
        # Under load nearly every request is one sample: its one row leaving is its whole answer,
        # so the batch's leavers are answered from one view each, with no grouping and no write
        # (a loop step, a call and a lookup per row less: docs/serving.md, "The serving
        # machinery's own cost"). A request not found was answered meanwhile (_finish skips it).
        get = self._requests.get
        reqs = [get(r >> ROW_BITS) for r in exit_ids]
        if {1 if q is None else q.n for q in reqs} == {1}:
            views = _views([1] * E, logits, confidence, exit_col)
            self._finish([(q, v) for q, v in zip(reqs, views) if q is not None], now)
            return
        # the batch's runs of rows of one request (a request's rows in one batch are adjacent unless it
        # was split across batches at an earlier stage: then it has several runs)
        runs: List[Tuple[int, int, int, Sequence[int]]] = []  # (seq, first, end, local rows)
        i = 0
        while i < E:
            r = exit_ids[i]
            seq = r >> ROW_BITS
            j = i + 1
            while j < E and exit_ids[j] >> ROW_BITS == seq:
                j += 1
            lo, m = r & ROW_MASK, j - i
            # its local rows: a range when they follow each other in order (one row always does;
            # with two workers a request's rows split across batches may come back in another order)
            if m == 1 or exit_ids[i:j] == list(range(r, r + m)):
                local: Sequence[int] = range(lo, lo + m)
            else:
                local = [x & ROW_MASK for x in exit_ids[i:j]]
            runs.append((seq, i, j, local))
            i = j
        self._answer(runs, logits, confidence, exit_col, now)

    def _answer(
        self,
        runs: List[Tuple[int, int, int, Sequence[int]]],
        logits: torch.Tensor,
        confidence: torch.Tensor,
        exit_index: torch.Tensor,
        now: float,
    ) -> None:
        """Write leaving rows into their requests and resolve the requests now complete. ``runs``:
        (seq, first, end, local rows) per run of one request's rows in the outputs, ``first:end``,
        which are its rows ``local`` (a ``range`` when they follow each other).

        Under load one batch answers dozens of single-row requests, and every torch call or lock
        per request is a point where the worker may lose the GIL to the submitting thread (and
        wait for it back): so a request whose rows all leave here together gets views of the
        batch's outputs (exit index included), made by one ``split`` per output for the whole
        batch, and the batch's answers take one lock."""
        views = _views([j - i for _, i, j, _ in runs], logits, confidence, exit_index)
        done: List[Tuple[_Request, Outputs]] = []
        with self._dlock:  # (uncontended with one worker)
            for (seq, _, _, local), view in zip(runs, views):
                self._write(seq, local, view, logits, done)
        if done:
            self._finish(done, now)

    def _write(
        self,
        seq: int,
        local: Sequence[int],
        view: Outputs,
        logits: torch.Tensor,
        done: List[Tuple[_Request, Outputs]],
    ) -> None:
        """Write rows ``local`` of request ``seq`` (their outputs: ``view``, of the batch's
        ``logits`` and the rest) into it, under ``_dlock``; append it and its outputs to ``done``
        once complete."""
        req = self._requests.get(seq)
        if req is None:  # answered meanwhile (timeout, cancel)
            return
        m = len(local)
        lg, cf, ex = view
        if req.logits is None and m == req.n and type(local) is range and local.start == 0:
            # every row of the request left here, in order: its answer is views of the batch's
            req.remaining = 0
            done.append((req, view))
            return
        if req.logits is None:
            req.logits = logits.new_empty((req.n, logits.shape[1]))
            req.confidence = cf.new_empty(req.n)
            req.exit_index = torch.empty(req.n, dtype=torch.int64, device=logits.device)
        assert req.confidence is not None and req.exit_index is not None  # set with logits
        rows = torch.tensor(list(local), dtype=torch.int64).to(logits.device)
        req.logits.index_copy_(0, rows, lg)
        req.confidence.index_copy_(0, rows, cf)
        req.exit_index.index_copy_(0, rows, ex)
        req.remaining -= m
        if req.remaining == 0:
            done.append((req, (req.logits, req.confidence, req.exit_index)))

    def _finish(self, answers: List[Tuple[_Request, Outputs]], now: float) -> None:
        """Resolve complete requests, each with its outputs (those not answered otherwise
        meanwhile), under one lock."""
        with self._cv:
            pop = self._requests.pop
            answers = [a for a in answers if pop(a[0].seq, None) is not None]
            if not answers:
                return
            self._last_answer = self._clock()
            self._admitted_rows -= sum([r.n for r, _ in answers])  # (a list: a generator is a call per item)
            if self._room_waiting:  # (notify_all is Python code: not at every batch for no one)
                self._room.notify_all()
        self.stats.record_latencies([now - r.t0 for r, _ in answers])
        posts: Dict[asyncio.AbstractEventLoop, list] = {}
        for req, (logits, confidence, exit_index) in answers:
            result = InferenceResult(logits, exit_index, confidence)
            f = req.future
            if isinstance(f, _LoopAnswer):
                f.posted = True
                posts.setdefault(f.loop, []).append((f.afut, result, None))
                continue
            try:
                f.set_result(result)
            except concurrent.futures.InvalidStateError:  # cancelled at the last moment
                pass
        for loop, answers_ in posts.items():  # (one call per event loop for the whole batch)
            _post(loop, answers_)

    # ------------------------------------------------------------------ timeouts
    def _arm(self, deadline: float, seq: int) -> None:
        """Register a deadline (under ``_cv``). A separate thread fails late requests, so a
        timeout fires even while the worker is inside a long stage step."""
        heapq.heappush(self._deadlines, (deadline, seq))
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name=self._worker.name + "-timeouts", daemon=True)
            self._reaper.start()
        elif self._deadlines[0][1] == seq:
            self._reaper_cv.notify()

    def _reap(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closing and not self._requests:
                        return
                    now = time.perf_counter()
                    if self._deadlines and self._deadlines[0][0] <= now:
                        seq = heapq.heappop(self._deadlines)[1]
                        if seq in self._requests:
                            break
                        continue
                    self._reaper_cv.wait(_bounded(self._deadlines[0][0] - now) if self._deadlines else None)
            self.stats.timeouts += 1
            self._fail(seq, TimeoutError("the request timed out before all its rows left the model"), "timeout")

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as e:  # noqa: BLE001  (a bug in the loop itself: fail everyone, never hang)
            self._closing = True
            self._fail_all(SchedulerError(f"the scheduler's worker stopped: {type(e).__name__}: {e}"))

    def _step(self) -> bool:
        """One turn of a worker: take new requests, expire, purge, run one batch or sleep.
        Returns False when the worker should stop."""
        now = time.perf_counter()
        with self._cv:
            if self._inbox:
                with self._qlock:
                    self._take_inbox()
            closing, drain = self._closing, self._drain
        if self._dead:
            self._purge()
        if closing and not drain:
            self._fail_all(SchedulerClosed("the scheduler was closed before this request was answered"))
            return False
        if self._inline:
            # one executor at a time: the rows that arrive meanwhile gather for the next batch
            with self._cv:
                if self._inline and not (self._closing and not self._drain):
                    # not `_sleeping`: arrivals need not wake us, the caller will when it is done
                    self._after_inline += 1
                    self._cv.wait()
                    self._after_inline -= 1
            return True
        with self._qlock:
            k, wait = self._pick(now)
            if k is not None:
                chunks = self._gather(k)
                fuse = k == 0 and self._fusable(chunks)
                more = self.workers > 1 and any(self._queues)
            elif closing and not any(self._queues):
                return False  # (rows another worker still runs: that worker answers them)
        if k is None:
            with self._cv:
                # re-checked under the lock: a submit, cancel or close since this turn began
                # notified no one (this worker was not asleep yet)
                if self._inbox or self._dead or self._closing:
                    return True
                self._sleeping += 1
                self._cv.wait(_bounded(wait))
                self._sleeping -= 1
            return True
        if more and self._sleeping:
            # rows are left for another worker: wake one (a worker that runs its batch
            # otherwise finds them only after it)
            with self._cv:
                self._cv.notify()
        self._run_batch(k, chunks, fuse)
        return True

    def _pick(self, now: float) -> Tuple[Optional[int], Optional[float]]:
        """The stage to run next by the policy, or (None, seconds until one becomes ready by max_wait).

        ``"deepest"``: scanning from the deepest stage, the first that holds ``max_batch`` rows or
        is ready (its oldest row waited ``max_wait_ms``) and may not be passed over any longer: it
        has been for ``max_defer_ms``, stage 0 keeps up (:meth:`_backlogged`), or the rows upstream
        are not expected to fill its batch (:meth:`_fillable`); else the deepest ready stage."""
        if self.policy == "fill":
            return self._pick_fill(now), None
        if self.max_wait_s <= 0 and self.max_defer_s <= 0:
            # every stage holding a row is ready and none is passed over: the deepest (no counting)
            for k in range(self.num_stages - 1, -1, -1):
                if self._queues[k]:
                    return k, None
            return None, None
        soonest = partial = None
        behind = self.max_defer_s > 0 and self._backlogged()  # (never read without deferral)
        for k in range(self.num_stages - 1, -1, -1):
            q = self._queues[k]
            if not q:
                continue
            rows = 0
            ready_at = q[0].ready_at
            for c in q:
                rows += c.n
                if rows >= self.max_batch:
                    return k, None  # full batches first, the deepest of them
                ready_at = min(ready_at, c.ready_at)
            if ready_at <= now or self._closing:
                if (
                    now - ready_at >= self.max_defer_s  # passed over long enough (at once: max_defer_ms=0)
                    or self._closing
                    or not behind  # stage 0 keeps up: no reason to wait
                    or not self._fillable(k, self.max_batch - rows)  # waiting would not fill its batch
                ):
                    return k, None
                if partial is None:
                    partial = k
            else:
                soonest = ready_at - now if soonest is None else min(soonest, ready_at - now)
        return (partial, None) if partial is not None else (None, soonest)

    def _pick_fill(self, now: float) -> Optional[int]:
        """``policy="fill"``: the deepest stage with an overdue row (its chunk's ``ready_at`` has
        passed: waited max_wait, or admitted to an idle scheduler), else the deepest full stage,
        else the fullest (ties: the deepest); None when no row waits."""
        fullest, most = None, 0
        for k in range(self.num_stages - 1, -1, -1):
            q = self._queues[k]
            if not q:
                continue
            # chunks enter in time order, but a split keeps its ready_at: the head is the oldest
            if q[0].ready_at <= now:
                return k
            rows = self._rows_up_to_batch(q)
            if rows > most:  # strict: on ties the deeper stage, met first, stays
                fullest, most = k, rows
        # counts are capped at max_batch, so this is also the deepest full stage when one is full
        return fullest

    def _rows_up_to_batch(self, q: Deque[_Chunk], batches: int = 1) -> int:
        """Rows waiting in ``q``, counted up to ``batches`` x ``max_batch`` (capped: every full
        queue counts the same, and no more chunks are walked than those batches take)."""
        cap, rows = self.max_batch * batches, 0
        for c in q:
            rows += c.n
            if rows >= cap:
                return cap
        return rows

    def _survival(self, k: int) -> float:
        """The share of rows reaching stage ``k`` that went on from it, lately (SURVIVAL_DECAY)."""
        return self._went_on[k] / self._reached[k] if self._reached[k] > 0 else 1.0

    def _learn(self, k: int, reached: int, went_on: int) -> None:
        """Count a batch at stage ``k`` (under ``_qlock``: workers share the counts)."""
        self._reached[k] = self._reached[k] * SURVIVAL_DECAY + reached
        self._went_on[k] = self._went_on[k] * SURVIVAL_DECAY + went_on

    # Full stage-0 batches per worker at which stage 0 counts as behind (_backlogged). One: a
    # replay of deeper triggers (bench/serve_sim.py --behind) found 3-4 never worse than request
    # batching below saturation only with per-request Python as cheap as its, and worse than one
    # at this scheduler's (docs/serving.md, "Session 18: a deeper backlog trigger, replayed").
    _behind_batches = 1

    def _backlogged(self) -> bool:
        """Is stage 0 behind: does it hold a full batch (``max_batch`` rows) for every worker (with
        fewer, a worker that comes free takes them at once: no queue is forming)? Only then are partial
        stages passed over: arrivals outpace the worker, and running fewer, fuller deeper batches
        (fewer stage calls per request) raises how many requests it answers per second. A full
        batch, not a time: deferral then starts as a queue forms, while its throughput can still
        keep the queue short (bench/serve_sim.py replays this policy on measured stage costs:
        started once stage 0's oldest row had waited 4 x max_defer_ms instead, as before session
        11, p99 at (b)'s saturation rate was 3.9x (ResNet-style) and 4.9x (digits) higher;
        docs/serving.md, "Session 11"). When stage 0 keeps up, passing a stage over only adds
        latency (measured: docs/serving.md, "Policy")."""
        full = self.workers * self._behind_batches
        return self._rows_up_to_batch(self._queues[0], full) >= self.max_batch * full

    def _fillable(self, k: int, need: float) -> bool:
        """Are the rows waiting upstream of stage ``k`` expected to bring it ``need`` more rows
        (each queue's rows times the measured share that reaches ``k`` from there)? Passing a
        partial stage over only pays when they are: otherwise its rows would wait for a batch
        that does not fill (measured below saturation, when a burst fills stage 0: see
        docs/serving.md, "Policy")."""
        expected, share = 0.0, 1.0
        for j in range(k - 1, -1, -1):
            share *= self._survival(j)
            if share <= 0.0:
                return False
            for c in self._queues[j]:
                expected += c.n * share
                if expected >= need:
                    return True
        return False

    def _take_inbox(self) -> None:
        """Move the submitters' chunks to stage 0's queue (under ``_cv`` and ``_qlock``)."""
        self._queues[0].extend(self._inbox)
        self._inbox.clear()

    def _purge(self) -> None:
        """Drop the rows of dead requests from every queue."""
        with self._cv, self._qlock:
            self._take_inbox()  # a request may die between its admission and a worker's next turn
            dead, self._dead = self._dead, set()
            if dead:  # (another worker may have purged them since this one looked)
                self._purge_queues(dead)

    def _purge_queues(self, dead: set) -> None:
        """Drop the rows of the requests ``dead`` from every queue (under ``_qlock``)."""
        dead_t = torch.tensor(sorted(dead), dtype=torch.int64)
        for q in self._queues:
            kept: Deque[_Chunk] = deque()
            for c in q:
                if isinstance(c.ids, range):  # one request's own rows, not yet run
                    if c.ids.start >> ROW_BITS not in dead:
                        kept.append(c)
                    continue
                alive = ~torch.isin(c.ids >> ROW_BITS, dead_t)
                if bool(alive.all()):
                    kept.append(c)
                elif bool(alive.any()):
                    idx = alive.nonzero().squeeze(1)
                    kept.append(
                        _Chunk(
                            c.ids[idx],
                            take_rows(c.state, idx),
                            _carry_rows(c.carry, idx),
                            c.snap,
                            c.layout,
                            c.ready_at,
                            c.urgent,
                        )
                    )
            q.clear()
            q.extend(kept)

    def _gather(self, k: int) -> List[_Chunk]:
        """Up to ``max_batch`` rows from the head of stage ``k``'s queue that share the oldest
        chunk's thresholds snapshot and input layout (a batch must), oldest first. Chunks unlike
        it keep their order and place at the head; once one is passed over, the scan stops after
        GATHER_LOOKAHEAD chunks."""
        q = self._queues[k]
        head = q[0]
        taken: List[_Chunk] = []
        skipped: List[_Chunk] = []
        rows = 0
        while q and rows < self.max_batch and (not skipped or len(skipped) + len(taken) < GATHER_LOOKAHEAD):
            c = q.popleft()
            if c.snap is not head.snap or c.layout != head.layout:
                skipped.append(c)
                continue
            if rows + c.n > self.max_batch:
                if type(c) is _Request:  # (its rows split across batches: queued as a chunk from now on)
                    c = c.as_chunk()
                q.appendleft(c)  # its rest stays queued (behind the skipped chunks, put back below)
                c = c.split(self.max_batch - rows)
            taken.append(c)
            rows += c.n
        if skipped:
            q.extendleft(reversed(skipped))
        return taken

    def _run_batch(self, k: int, chunks: List[_Chunk], fuse: bool) -> None:
        """Run the gathered ``chunks`` at stage ``k`` (in one pass when ``fuse``: see _fusable)."""
        t0 = time.perf_counter()
        if len(chunks) == 1:
            state, carry = chunks[0].state, chunks[0].carry
        else:
            states = [c.state for c in chunks]
            # (a batch shares one layout, so one tensor per chunk or tuples alike: cat_rows's
            # checks are for the tuples)
            state = torch.cat(cast(List[torch.Tensor], states)) if type(states[0]) is torch.Tensor else cat_rows(states)
            carry = None if k == 0 else cat_rows([c.carry for c in chunks]) if chunks[0].carry else ()
        if fuse and state is not None:
            # a pass answers its rows by chunk (stage 0's ids are ranges): no id tensor, whose
            # making costs more than the rest of a lone request's bookkeeping (measured), and no
            # Python per row
            if self._run_fused(state, chunks, t0):
                return
        self._run_step(k, state, _batch_ids(chunks), carry, chunks, t0)

    def _run_step(
        self,
        k: int,
        state: Optional[State],
        ids: torch.Tensor,
        carry: Any,
        chunks: List[_Chunk],
        t0: float,
        alone: bool = False,
    ) -> None:
        """One stage step on rows ``ids`` of the batch gathered as ``chunks``: answer the leavers,
        queue the survivors. ``alone``: the rows of one request, run again on their own after
        their batch failed (:meth:`_run_alone`)."""
        n = int(ids.shape[0])
        try:
            # the carry is run_stage's own tuple of tensors (or None / () before any exit)
            # past stage 0 the rows are what earlier steps returned, at stage 0 inputs checked
            # (and mapped by the input adapter, if any) at submit: no need to validate them again
            res = self.rt.run_stage(
                k,
                state,
                ids,
                cast(Optional[Sequence[torch.Tensor]], carry),
                thresholds=chunks[0].snap,
                check=False,
            )
        except Exception as e:  # noqa: BLE001  (fail only the requests in this batch)
            self.stats.stage_failures += 1
            seqs = sorted(set((ids >> ROW_BITS).tolist()))
            if len(seqs) > 1 and not alone:
                # one request's rows may be what the model fails on (a poison input): each
                # request runs again alone, so only those the stage fails on alone fail
                self._run_alone(k, state, ids, carry, chunks, seqs)
                return
            what = f"a request's {n} rows, run alone after their batch failed" if alone else f"a batch of {n} rows"
            err = StageFailed(f"stage {k} failed on {what}: {type(e).__name__}: {e}")
            err.__cause__ = e
            for seq in seqs:
                self._fail(seq, err, "failed")
            return
        t1 = time.perf_counter()
        exit_ids = res.exit_rows.tolist()
        if exit_ids:
            # (tensors of their own: the graph executor's step copies them out of its buffers)
            self._deliver(k, exit_ids, res.logits, res.confidence)
        survivors = int(res.rows.shape[0])
        chunk = None
        if survivors and k + 1 < self.num_stages:
            head = chunks[0]
            # an idle-admitted request's survivors stay urgent: nothing was there to join them
            urgent = any(c.urgent for c in chunks)
            ready_at = t1 if urgent else t1 + self.max_wait_s
            chunk = _Chunk(res.rows, res.state, res.carry, head.snap, head.layout, ready_at, urgent)
        with self._qlock:
            self._learn(k, n, survivors)
            if chunk is not None:
                self._queues[k + 1].append(chunk)
        counts = [0] * self.num_stages
        counts[k] = len(exit_ids)
        self.rt.record_exits(counts, calls=0, example=state if k == 0 else None)
        self.stats.record_batch(k, n, len(exit_ids), t1 - t0, time.perf_counter() - t0)

    def _run_alone(
        self, k: int, state: Optional[State], ids: torch.Tensor, carry: Any, chunks: List[_Chunk], seqs: List[int]
    ) -> None:
        """Stage ``k`` failed on a batch holding the rows of requests ``seqs``: run each request's
        rows again on their own (those still pending), so a stage that fails on one request's
        input fails that request alone. Costs a step per request, only when a step fails."""
        self.stats.failure_reruns += 1
        owner = ids >> ROW_BITS
        for seq in seqs:
            if seq not in self._requests:  # answered meanwhile (a timeout, a cancel)
                continue
            idx = (owner == seq).nonzero().squeeze(1)
            rows = None if state is None else take_rows(state, idx)
            self._run_step(k, rows, ids[idx], _carry_rows(carry, idx), chunks, time.perf_counter(), alone=True)

    def _fusable(self, chunks: List[_Chunk]) -> bool:
        """Would a step-by-step run of this stage-0 batch form exactly the batches one pass does?
        Yes when no row waits at a deeper stage (nothing could join its survivors there) and none
        of its rows would wait for later arrivals (``max_wait`` 0, or rows admitted to an idle
        scheduler, which are due at once at every stage; and, with ``max_defer_ms``, no deferral
        ahead, see below): then every later step runs at once on just its survivors, as
        ``rt.infer`` does."""
        if self.policy == "request":
            return True  # (by definition: the batch runs whole, survivors never re-batched)
        if not self.fused or any(self._queues[1:]):
            return False
        if self.max_defer_s > 0 and sum(c.n for c in chunks) >= self.max_batch:
            behind = self.workers * self._behind_batches - 1  # full batches still queued behind this one
            if self._rows_up_to_batch(self._queues[0], behind) >= self.max_batch * behind and not all(
                c.urgent for c in chunks
            ):
                # a full batch, and stage 0 was behind when it was picked (_backlogged: that many full
                # batches for every worker, this one's included), so its survivors may be passed over at
                # stage 1 while the next full batches run, to share one batch there (which a pass
                # cannot wait for); if stage 0 has caught up by then, they run at once, and the steps
                # cost only their calls over the pass's. (With several workers a full batch alone
                # says no such thing: measured, two workers at 12,000 requests/s then ran nearly
                # every batch step by step, docs/serving.md, "Several workers".)
                return False
        # (the urgency scan only when it decides: max_wait 0, the common case, needs none)
        return self.max_wait_s <= 0 or all(c.urgent for c in chunks)

    def _run_fused(self, state: State, chunks: List[_Chunk], t0: float) -> bool:
        """Run a stage-0 batch through every stage in one pass and answer all its rows; False
        when a stage raised (the caller then runs the batch step by step: failure isolation)."""
        try:
            # the inputs were checked, and mapped by the input adapter if any, at submit
            res, counts = self.rt._infer(state, chunks[0].snap, check=False, adapt=False)
        except Exception:  # noqa: BLE001  (re-run step by step, which fails only who reached it)
            self.stats.fused_fallbacks += 1
            return False
        t1 = time.perf_counter()
        reached = state.shape[0] if type(state) is torch.Tensor else sum(c.n for c in chunks)
        with self._qlock:
            for k, left in enumerate(counts):
                if reached:
                    self._learn(k, reached, reached - left)
                reached -= left
        # Every row leaves, in the batch's order, one chunk after another. A _Request brings all
        # its rows (see _Request): it takes views of the outputs, with no lookup and no Python
        # per row (the common case under load: a batch of single-row requests).
        views = _views([c.n for c in chunks], res.logits, res.confidence, res.exit_index)
        done: List[Tuple[_Request, Outputs]] = []
        for c, view in zip(chunks, views):
            if type(c) is _Request:
                done.append((c, view))  # (_finish skips it if it was answered meanwhile)
            else:  # part of a request split across batches
                start = cast(range, c.ids).start
                with self._dlock:
                    self._write(
                        start >> ROW_BITS, range(start & ROW_MASK, (start & ROW_MASK) + c.n), view, res.logits, done
                    )
        self._finish(done, t1)
        self.stats.record_fused(counts, t1 - t0, time.perf_counter() - t0)
        return True


def _views(
    sizes: List[int], logits: torch.Tensor, confidence: torch.Tensor, exit_index: torch.Tensor
) -> Iterable[Outputs]:
    """Each part's rows (``sizes``, in order) of the three outputs, as views."""
    if len(sizes) == 1:  # one part, the whole batch (a lone request at light load)
        return ((logits, confidence, exit_index),)
    if len(sizes) >= SPLIT_MIN_ROWS:  # one call per output for all the views
        return zip(logits.split(sizes), confidence.split(sizes), exit_index.split(sizes))
    offsets = list(itertools.accumulate(sizes, initial=0))
    return ((logits[i:j], confidence[i:j], exit_index[i:j]) for i, j in zip(offsets, offsets[1:]))


__all__ = ["StageScheduler", "SchedulerError", "SchedulerFull", "SchedulerClosed", "StageFailed", "ROW_BITS"]
