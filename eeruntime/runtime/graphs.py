"""CUDA graphs per stage and batch bucket: the GPU hot path of :class:`~eeruntime.EERuntime`.

For every stage k and batch bucket b one graph holds the whole step:

    state  = stage_k(input_k[:b])                    # input_k: static buffer of the largest bucket
    logits = exit_k(state)
    valid  = arange(b) < count_k                     # rows past the count are padding
    score, exited = exit_decision(logits, thresholds[k])   # thresholds: the call's snapshot, static
    exited &= valid
    out[rows_k[i]] = logits[i], score[i], k          for every exited row i   (scatter)
    input_{k+1}, rows_{k+1}, count_{k+1} = pack(valid & ~exited, state, rows_k)   (compact_into)

``rows_k`` holds each packed row's index in the caller's batch (it travels with the rows) and
``count_{k+1}`` stays on the device. The host reads it once after each early exit, the only host
sync, stops when it is zero and otherwise replays stage k+1 at the smallest bucket >= the count;
or, where the last call's read there kept the bucket, launches stage k+1 at the same bucket without
waiting and reads that count at the end of the call (launch-ahead, :class:`_GraphPass`).
The final stage writes every valid row (``final="average"``: the running float32 sum of all exits'
logits, packed like the state, divided by K). Each output row is written exactly once per call, by
the exit that row took, so the static outputs need no reset; a call copies them into fresh
tensors, so what it returns is never a view of a static buffer.

Graphs are captured per input signature (trailing shapes and dtypes, and the autocast state),
lazily or by :meth:`GraphRunner.warmup` (largest bucket first, all on one memory pool, with no
device sync between captures). Thresholds are read from a static buffer per signature that each
call fills once from its snapshot (a device copy), so ``set_thresholds`` needs no re-capture and
a call never mixes two sets.
With ``capture=False`` (and on any non-CUDA device) the very same static-buffer loop runs eagerly,
which is how its buffer, padding and chunking logic is tested on CPU.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import ops
from ..criteria import uses_history
from ..devices import device_guard
from ..rows_layout import new_rows
from ..state import as_tuple, check_state
from .executors import eager_pass, mixed_logits_dtypes
from .loop import run_stages
from .results import InferenceResult
from .step import StageResult

__all__ = [  # the public names, also the old import path eeruntime.graphs
    "CAPTURE_SAFE_BACKENDS", "GraphRunner", "autocast_state", "bucket_for", "check_buckets", "chunk_bounds",
    "compact_into_nosync", "default_buckets", "graphs_supported", "scatter_rows_nosync",
]  # fmt: skip

# The ops backends that run with no host sync, so they may sit inside a captured graph (the
# ``capturable`` rows of the ops' backend tables). The torch references call ``nonzero`` (a sync);
# when the selected backend is not capturable the graph packs and scatters with the sync-free
# torch formulations below instead.
CAPTURE_SAFE_BACKENDS = {op: tuple(ops.dispatch.capturable_backends(op)) for op in ("compact_into", "scatter_rows")}

# Eager runs of a (stage, bucket) body before its capture, as the CUDA-graph docs require: they
# trigger the lazy work (cuDNN autotuning, Triton compiles, cuBLAS handles) outside the capture.
WARMUP_RUNS = 2

# Input signatures (trailing shapes and dtypes) with their own buffers and graphs; a runtime fed
# more distinct shapes than this runs the extra ones eagerly rather than grow memory without bound.
MAX_SIGNATURES = 8

# Only one capture may be under way in a process (CUDA's rule), across all runners.
_CAPTURE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------- buckets
def _positive_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a positive int, got a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a positive int, got {type(value).__name__}") from None
    if v < 1:
        raise ValueError(f"{what} must be a positive int (>= 1), got {v}")
    return v


def default_buckets(max_batch: int = 256) -> Tuple[int, ...]:
    """The batch buckets that cover batches up to ``max_batch``.

    1, 2, 4, 8, then multiples of 8 up to 256 (at most 7 padded rows), then 8 buckets per doubling
    (steps of 32 up to 512, 64 up to 1024, ...: at most 1/8 of the rows padded); the list stops at
    the first bucket >= ``max_batch``. ``default_buckets(256)`` has 35 buckets.
    """
    m = _positive_int(max_batch, "max_batch")
    out = []
    b = 1
    while True:
        out.append(b)
        if b >= m:
            return tuple(out)
        if b < 8:
            b *= 2
        elif b < 256:
            b += 8
        else:
            b += 1 << (b.bit_length() - 1 - 3)  # an eighth of the octave [2^j, 2^(j+1)) b is in


def check_buckets(buckets: Sequence[int]) -> Tuple[int, ...]:
    """Validate user buckets: a non-empty collection of positive ints; returned sorted, unique."""
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(f"buckets must be a sequence of positive ints, got {type(buckets).__name__}")
    values = [_positive_int(b, f"bucket {b!r}") for b in buckets]
    if not values:
        raise ValueError("buckets must not be empty; e.g. buckets=[1, 2, 4, 8, 16, 32, 64]")
    return tuple(sorted(set(values)))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n`` (``buckets`` sorted ascending, as :func:`check_buckets` gives)."""
    n = _positive_int(n, "batch size")
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(
            f"batch size {n} is larger than the largest bucket {buckets[-1]}; run it in chunks of "
            f"{buckets[-1]} (chunk_bounds) or add a larger bucket"
        )
    return buckets[i]


def chunk_bounds(B: int, size: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` row ranges that split a batch of ``B`` rows into chunks of at most ``size``."""
    if B < 0:
        raise ValueError(f"batch size must be >= 0, got {B}")
    size = _positive_int(size, "chunk size")
    return [(s, min(s + size, B)) for s in range(0, B, size)]


# ------------------------------------------------------------------------- sync-free pack/scatter
def compact_into_nosync(keep: torch.Tensor, tensors, outs, count_out: torch.Tensor) -> None:
    """Stable compaction with no host sync, capturable in a CUDA graph.

    For B rows, n = sum(keep), c_i = sum_{j<=i} keep_j:
        dst_i = c_i - 1                    if keep_i   (kept rows to [0, n), in order)
        dst_i = n + (i + 1 - c_i) - 1      otherwise   (dropped rows to [n, B), in order)
        outs[t][dst_i] = tensors[t][i];  count_out = n
    dst is a permutation of [0, B): every write has its own row, so the result is deterministic.
    Rows [n, B) of each output hold the dropped rows; callers treat them as padding.
    """
    B = keep.shape[0]
    if B == 0:
        count_out.zero_()
        return
    kept = torch.cumsum(keep.to(torch.int64), 0)
    n = kept[-1:]
    dropped = torch.arange(1, B + 1, device=keep.device) - kept
    dst = torch.where(keep, kept - 1, n + dropped - 1)
    for t, o in zip(tensors, outs):
        o.index_copy_(0, dst, t)
    count_out.copy_(n.reshape(count_out.shape))


def scatter_rows_nosync(mask: torch.Tensor, rows: torch.Tensor, srcs, outs, spare_row: int) -> None:
    """``outs[j][rows[i]] = srcs[j][i]`` for every i with ``mask[i]``, with no host sync.

    Unmasked row i is written to ``outs[j][spare_row + i]`` instead: every output needs
    ``spare_row + B`` rows, rows from ``spare_row`` on being scratch. With distinct ``rows`` of the
    masked entries no two writes meet, so the result is deterministic.
    """
    B = mask.shape[0]
    if B == 0:
        return
    dst = torch.where(mask, rows, torch.arange(spare_row, spare_row + B, device=rows.device))
    for s, o in zip(srcs, outs):
        o.index_copy_(0, dst, s.to(o.dtype))


# --------------------------------------------------------------------------------- support check
def _runtime_reason(rt) -> Optional[str]:
    """Why the static-buffer loop cannot run this runtime at all (any device), or None."""
    if uses_history(rt.criterion):
        return (
            "the criterion is a per-exit scorer with uses_history=True: the earlier exits' logits "
            "it reads vary in number per stage, which a static graph cannot carry"
        )
    return None


def graphs_supported(rt) -> Optional[str]:
    """None when ``rt`` can replay its stages as CUDA graphs, else the reason (the runtime then
    runs eagerly). Input-dependent limits (a stage whose per-sample state shape changes between
    calls, a capture that fails, e.g. a callable criterion that syncs) are found at the first call
    and also fall back to eager, with a warning. A missing CUDA build of the extension is not a
    reason: the graphs then pack and scatter with :func:`compact_into_nosync` and
    :func:`scatter_rows_nosync` (sync-free, a little more memory traffic than CUB's select)."""
    why = _runtime_reason(rt)
    if why is not None:
        return why
    if getattr(rt, "graphs", "auto") is False:
        return "graphs=False was asked for"
    if not (hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda, "graph")):
        return "this torch build has no CUDA graphs (torch.cuda.CUDAGraph is missing)"
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device (torch.cuda.is_available() is False)"
    device = getattr(rt, "_device", None)
    if device is not None and device.type != "cuda":
        return f"the model is on {device}, not on a CUDA device"
    return None


def autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    """Whether autocast is on for ``device_type`` and its dtype: part of a graph's signature, since
    a graph captured under autocast replays its casts (and one captured outside it replays none),
    whatever the autocast state of the call that replays it."""
    if not torch.is_autocast_enabled(device_type):
        return (False, None)
    return (True, torch.get_autocast_dtype(device_type))


class _GraphsUnusable(RuntimeError):
    """This runner cannot go on with graphs (capture failed, state shapes vary): run eagerly."""


_aten = torch.ops.aten
# Ops that read device data on the host (.item(), float(), nonzero, ...): on CUDA each one syncs.
_HOST_READS = frozenset(
    (
        _aten._local_scalar_dense,
        _aten.item,
        _aten.nonzero,
        _aten.masked_select,
        _aten.is_nonzero,
        _aten.equal,
        _aten.allclose,
    )
)
# torch.tensor(v, device=...) / torch.as_tensor: the data is copied from the host before the op
# reaches a dispatch mode, which then sees lift_fresh on the tensor already on the device.
_LIFTS = frozenset((_aten.lift_fresh, _aten.lift_fresh_copy))


def _on_host(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _on_device(t) -> bool:
    """A tensor in device memory (CUDA, or any non-CPU device: tests stand meta tensors in for it)."""
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _host_read(func, args, kwargs) -> Optional[str]:
    """Why this aten call moves data between the host and the device, or None.

    Either way it cannot sit in a CUDA graph: a read of device data on the host (a copy to the CPU,
    ``.item()``, ``nonzero``, boolean indexing) syncs, which capture forbids; a host-to-device copy
    (``torch.tensor(v, device="cuda")``, ``t.to("cuda")``, ``cuda_buf.copy_(cpu_t)``) is a blocking
    pageable copy, which fails the capture too (and a replay would copy the captured host address,
    not the value the caller meant)."""
    packet = getattr(func, "overloadpacket", None)
    if packet in _HOST_READS:
        return f"{packet}"
    if packet in (_aten.index, _aten.index_put, _aten.index_put_) and len(args) > 1:
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or []):
            return "indexing with a bool mask"
    if packet in _LIFTS and args and _on_device(args[0]):
        return f"a tensor made from host data on the device ({packet}: torch.tensor(..., device=...))"
    if packet is _aten._to_copy and args and isinstance(args[0], torch.Tensor):
        device = kwargs.get("device")
        if device is not None:
            target = torch.device(device)
            if _on_device(args[0]) and target.type == "cpu":
                return "a copy to the CPU"
            if _on_host(args[0]) and target.type != "cpu":
                return "a host-to-device copy (.to(device) of a CPU tensor)"
    if packet is _aten.copy_ and len(args) > 1:
        dst, src = args[0], args[1]
        if _on_device(src) and _on_host(dst):
            return "a copy to the CPU"
        if _on_host(src) and _on_device(dst):
            return "a host-to-device copy (copy_ from a CPU tensor)"
    return None


class _HostReadProbe(TorchDispatchMode):
    """Raises _GraphsUnusable at the first op that reads device data on the host or copies host
    data to the device (see :func:`_host_read`).

    It runs over the first warm-up of every capture, so a body that cannot be captured is refused
    before capture starts: a capture that fails on a sync leaves the caching allocator of several
    torch releases believing a capture is still under way (every later ``empty_cache`` then fails
    and the graph pool leaks)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _host_read(func, args, kwargs)
        if why is not None:
            raise _GraphsUnusable(
                f"the stage, its exit head or the criterion moves data between host and device ({why}); a model "
                "or criterion that syncs with the host (.item(), nonzero, boolean indexing) or copies host data "
                "to the device (torch.tensor(v, device=...), .to(device)) cannot be captured"
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def _side_stream(side, current):
    """Run the block on ``side`` after the work already queued on ``current``; ``current`` then
    waits for it, also when the block raises: otherwise a buffer allocated on ``current`` (the
    saved inputs, the static buffers) could be freed and reused while ``side`` still has work
    queued on it."""
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


def _capture_into(graph, pool, stream, current, body) -> None:
    """Capture ``body()`` into ``graph`` on ``stream`` (after the work queued on ``current``), with
    its memory from ``pool``.

    ``torch.cuda.graph`` would also synchronize the device, run ``empty_cache`` and empty the host
    cache before every capture; warmup(256) makes ~140 captures, and none of that is needed for a
    correct capture (the stream wait orders it after the warm-ups). The caller's stream is restored
    even when the capture fails (``torch.cuda.graph`` skips that when ``capture_end`` raises)."""
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            body()
        except BaseException:
            try:
                graph.capture_end()  # ends the (invalidated) capture; its own error adds nothing
            except Exception:  # noqa: BLE001
                pass
            raise
        graph.capture_end()


# --------------------------------------------------------------------------------- static buffers
class _StageBuffers:
    """Static inputs of one stage: shared by all its buckets, which read their first b rows."""

    def __init__(self, parts, is_tuple: bool, rows, count, acc, head=None):
        self.inputs: Tuple[torch.Tensor, ...] = tuple(parts)  # [cap, *per-sample shape] each
        self.is_tuple = is_tuple
        self.rows = rows  # int64 [cap]: each packed row's index in the caller's batch
        self.count = count  # int64 [1]: valid rows; written by the previous stage's pack
        self.acc = acc  # float32 [cap, C]: running logit sum (final="average", stages >= 1)
        # stages >= 1: int64 [cap + 1], rows then count, so a stage step reads both in one copy
        self.head = head
        # rows holds 0..cap-1 (positions, what GraphRunner.run_stage needs) until the previous
        # stage packs into it again
        self.positions = False

    def state(self, b: int):
        parts = [t[:b] for t in self.inputs]
        return tuple(parts) if self.is_tuple else parts[0]

    def matches(self, parts, is_tuple: bool) -> bool:
        return (
            is_tuple == self.is_tuple
            and len(parts) == len(self.inputs)
            and all(p.shape[1:] == t.shape[1:] and p.dtype == t.dtype for p, t in zip(parts, self.inputs))
        )


class _Signature:
    """Buffers and graphs for one input signature (per-sample shapes and dtypes of the input)."""

    def __init__(self, x, cap: int, K: int, capture: bool):
        parts = as_tuple(x)
        self.device = parts[0].device
        self.cap = cap
        self.capture = capture
        dev = self.device
        self.arange = torch.arange(cap, device=dev)
        self.exit_ids = torch.arange(K, device=dev).unsqueeze(1).repeat(1, cap)  # [K, cap]
        self.zero_threshold = torch.zeros((), dtype=torch.float32, device=dev)
        self.thresholds = torch.zeros(K - 1, dtype=torch.float32, device=dev)  # the call's snapshot
        self.thresholds_of = None  # the snapshot last copied into it (calls with the same skip the copy)
        # GraphRunner.run_stage's leavers' positions, host (pinned on CUDA: made here, since
        # pinning host memory takes milliseconds) to device
        self.leave_host = torch.zeros(cap, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.leave_index = torch.zeros(cap, dtype=torch.int64, device=dev)
        self.stages: List[Optional[_StageBuffers]] = [None] * K
        self.stages[0] = _StageBuffers(
            [new_rows(p, cap) for p in parts],  # in the input's memory layout (rows_layout.py)
            isinstance(x, tuple),
            self.arange,  # stage 0's rows are the chunk's own rows, 0..n-1
            torch.zeros(1, dtype=torch.int64, device=dev),
            None,
        )
        # Outputs have cap scratch rows after the cap real ones (see scatter_rows_nosync).
        self.out_logits: Optional[torch.Tensor] = None
        self.out_logits_exit = 0  # the exit whose logits' dtype out_logits took
        self.out_conf = torch.zeros(2 * cap, dtype=torch.float32, device=dev)
        self.out_exit = torch.zeros(2 * cap, dtype=torch.int64, device=dev)
        self.pack_index = torch.zeros(cap, dtype=torch.int64, device=dev)  # compact_into's index_out
        # Launch-ahead (_GraphPass): whether the last read of stage k's survivors at bucket b kept
        # bucket b, and the counts copied to the host without a wait (pinned on CUDA), with the
        # event recorded after the last such copy.
        self.ahead: Dict[Tuple[int, int], bool] = {}
        self.count_host = torch.zeros(K, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.count_event = torch.cuda.Event() if dev.type == "cuda" else None
        self.graphs: Dict[Tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.ready = set()  # (k, b) already prepared (captured, or run once without capture)

    def tensors(self) -> List[torch.Tensor]:
        out = [self.out_conf, self.out_exit, self.pack_index, self.thresholds]
        if self.out_logits is not None:
            out.append(self.out_logits)
        for st in self.stages:
            if st is not None:
                out += [*st.inputs, st.rows, st.count] + ([st.acc] if st.acc is not None else [])
        return out


def _use_thresholds(sig: _Signature, snap) -> None:
    """Put the call's thresholds snapshot in the graphs' buffer (a device copy), unless it is there
    already: snapshots never change, and the buffer is written nowhere else."""
    if sig.thresholds_of is not snap:
        sig.thresholds.copy_(snap.tensor(sig.device))
        sig.thresholds_of = snap


def _no_alloc_while_capturing(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"internal error: {what} allocated during CUDA graph capture (it must exist before)")


# ------------------------------------------------------------------------------- one loop pass
class _GraphPass:
    """``n`` rows of a chunk through the stage loop on static buffers: a step replays stage k's
    graph at the bucket covering the live rows (which also packs the survivors into stage k+1's
    input) and reads the survivors' count, the one host sync per early exit.

    Launch-ahead: when the previous call's survivors of stage k at this bucket still needed the
    same bucket (``sig.ahead``), reading the count could not shrink stage k+1's batch and would
    only idle the GPU until the host launches it; the step then copies the count to the host
    asynchronously and returns 0 (no one known to leave), stage k+1 runs at the same bucket (its
    graph masks rows past the device-side count, so its results are the same), and
    :meth:`counts` reads every such count at the end, in one wait that the last stage's work
    does not hold up. Whatever the guess, the outputs and counts are exact; a wrong guess costs
    stage k+1 at a larger bucket than needed, once (docs/design.md, "Hot path on GPU")."""

    def __init__(self, runner: GraphRunner, sig: _Signature, n: int):
        self.runner, self.sig, self.alive = runner, sig, n
        self.last = runner.spec.num_exits - 1
        self.reach = [n]  # rows that reached stage k, for each stage run (None: count not read yet)
        self.buckets: List[int] = []  # the bucket each stage ran at
        self.sent = False  # some count is still on its way to the host (launch-ahead)

    def step(self, k: int) -> int:
        runner, sig = self.runner, self.sig
        b = runner._bucket(self.alive)
        runner._launch(sig, k, b)
        self.buckets.append(b)
        if k == self.last:
            return self.alive
        if runner.launch_ahead and sig.ahead.get((k, b), False):
            runner._count_to_host(sig, k + 1)
            self.reach.append(None)
            self.sent = True
            return 0
        n_next = runner._read_count(sig.stages[k + 1].count)
        sig.ahead[(k, b)] = n_next > 0 and runner._bucket(n_next) == b
        self.reach.append(n_next)
        left, self.alive = self.alive - n_next, n_next
        return left

    def pack(self) -> None:
        pass  # the step's graph packed the survivors already

    def counts(self, loop_counts: List[int]) -> List[int]:
        """The rows that left at each exit: the loop's own when every count was read as it came,
        else from the counts launch-ahead left on their way (read now, after one wait), which
        also teach ``sig.ahead`` whether each guess held."""
        if not self.sent:
            return loop_counts
        runner, sig = self.runner, self.sig
        host = runner._counts_on_host(sig)
        reach = [host[k] if r is None else r for k, r in enumerate(self.reach)]
        ran = len(self.buckets)  # stages run; the loop stops only after a count read as zero
        counts = [0] * (self.last + 1)
        for k in range(ran):
            nxt = reach[k + 1] if k + 1 < ran else 0
            counts[k] = reach[k] - nxt
            if k + 1 < ran and self.reach[k + 1] is None:
                sig.ahead[(k, self.buckets[k])] = nxt > 0 and runner._bucket(nxt) == self.buckets[k]
        return counts


# ------------------------------------------------------------------------------------- the runner
class GraphRunner:
    """Runs an :class:`~eeruntime.EERuntime` on static buffers, one CUDA graph per stage and bucket.

    Args:
        rt: the runtime: its ``spec`` (model, scorer, ``final``, pack backend) is what runs; its
            snapshot of thresholds is the default of a call; ``graphs=True`` on it makes a
            reason to fall back an error.
        buckets: batch sizes to capture (any positive ints; sorted and de-duplicated). ``None``:
            :func:`default_buckets` of 256, or of ``max_batch`` at :meth:`warmup`. A batch above the
            largest bucket runs in chunks of it, and the largest bucket sets the buffers' size.
        capture: ``None`` captures graphs for CUDA inputs and runs the same loop eagerly on other
            devices; ``False`` never captures; ``True`` requires CUDA inputs.
        pack: how the survivors are packed and exited rows scattered inside a graph: ``"auto"``
            uses ``ee.ops.compact_into`` / ``scatter_rows`` when their selected backend is
            sync-free (``CAPTURE_SAFE_BACKENDS``) and the sync-free torch formulations of this
            module otherwise (always the ops when not capturing); ``"ops"`` or ``"torch"`` force one.

    ``infer`` is thread-safe: one lock covers a call's use of the static buffers, and work on
    different CUDA streams is ordered through an event, so callers on any stream get their own
    result. ``launch_ahead`` (default True): a count read that could not shrink the next stage's
    bucket last time is made at the end of the call instead (:class:`_GraphPass`); False reads
    every count as it comes. Diagnostics: ``num_captures``, ``host_syncs`` (count reads, and the
    one wait for counts launch-ahead sent on), ``prepared`` (the
    ``(stage, bucket)`` pairs in the order they were captured or first run), ``disabled_reason``.
    """

    def __init__(
        self, rt, buckets: Optional[Sequence[int]] = None, *, capture: Optional[bool] = None, pack: str = "auto"
    ):
        why = _runtime_reason(rt)
        if why is not None:
            raise ValueError(f"GraphRunner cannot run this runtime: {why}; use EERuntime(..., graphs=False)")
        if capture not in (None, True, False):
            raise ValueError(f"capture must be None, True or False, got {capture!r}")
        if pack not in ("auto", "ops", "torch"):
            raise ValueError(f"pack must be 'auto', 'ops' or 'torch', got {pack!r}")
        self.spec = rt.spec
        self._snapshot = rt.thresholds_snapshot
        self._example = lambda: rt.example
        self._strict = rt.graphs is True
        self._auto_buckets = buckets is None
        self.buckets = default_buckets() if buckets is None else check_buckets(buckets)
        self.capture = capture
        self.pack = pack
        self.max_signatures = MAX_SIGNATURES
        self._lock = threading.Lock()
        self._sigs: Dict[tuple, _Signature] = {}
        self._pending_warmup: Optional[int] = None
        self._warmed_max: Optional[int] = None
        self._pool = None
        self._streams: Dict[torch.device, tuple] = {}
        self._done: Dict[torch.device, torch.cuda.Event] = {}
        self.num_captures = 0
        self.host_syncs = 0
        self.launch_ahead = True
        self._bucket_table: Tuple[Tuple[int, ...], List[int]] = ((), [])
        self.prepared: List[Tuple[int, int]] = []
        self.disabled_reason: Optional[str] = None

    # ------------------------------------------------------------------ public
    def infer(self, x, thresholds=None):
        """``(InferenceResult, counts)`` for ``x`` (a tensor or tuple of tensors, batch in dim 0);
        ``counts[k]`` is the number of rows that left at exit k. ``thresholds``: the call's
        snapshot (None: the runtime's current one), copied once into the graphs' buffer."""
        if isinstance(x, list):
            x = tuple(x)
        B = check_state(x, "GraphRunner input")
        snap = self._snapshot() if thresholds is None else thresholds
        if B == 0 or self.disabled_reason is not None:
            return self._eager(x, B, snap)
        device = as_tuple(x)[0].device
        capture = self._capture_for(device)

        def call():
            sig = self._signature(x, capture)
            return None if sig is None else self._run(sig, x, B, snap)

        out = self._on_buffers(device, call)
        return out if out is not None else self._eager(x, B, snap)

    def run_stage(self, k: int, state, rows: torch.Tensor, carry: Tuple[torch.Tensor, ...], snap):
        """The stage step (``EERuntime.run_stage``) on the graphs ``infer`` replays: stage ``k`` on
        the ``n`` rows of ``state`` (``rows``: their ids, ``carry``: checked by the caller) as the
        graph of the smallest bucket covering ``n``, the rows placed at positions 0..n-1 of stage
        k's static input. The survivors' positions and count come back in one host read (the step
        must say who leaves anyway); the leavers' outputs and the survivors' state and carry are
        copied out of the static buffers, which the next call overwrites. A :class:`StageResult`
        equal to the eager step's, or None when this step cannot use the graphs (more rows than
        the largest bucket, a stage-k input no signature's buffers hold yet, graphs disabled): the
        caller then runs the eager step."""
        n = int(rows.shape[0])
        if n == 0 or n > self.buckets[-1] or self.disabled_reason is not None:
            return None
        device = as_tuple(state)[0].device
        capture = self._capture_for(device)

        def step():
            sig = self._signature(state, capture) if k == 0 else self._signature_at(k, state, capture)
            return None if sig is None else self._run_stage(sig, k, state, n, rows, carry, snap)

        return self._on_buffers(device, step)

    def _on_buffers(self, device: torch.device, work):
        """``work()`` with the static buffers to itself: under the lock, after the previous call's
        work on them (whatever its stream; a device-side wait), and marked done for the next call.
        None when the graphs turn out unusable (they are disabled, with the reason)."""
        with torch.inference_mode(), device_guard(device):
            try:
                with self._lock:
                    self._after_previous_call(device)
                    try:
                        return work()
                    finally:
                        self._mark_call_done(device)
            except _GraphsUnusable as e:
                self._disable(str(e))
        return None

    def warmup(self, max_batch: int, example=None) -> None:
        """Prepare (capture) every bucket up to the one covering ``max_batch``, per stage, largest
        bucket first. ``example``: a batch (any size, e.g. ``x[:1]``) with the per-sample shape and
        dtype of the coming inputs; without it the runtime's first seen input is used, or capture
        happens at the first call. With default buckets, they become ``default_buckets(m)`` for the
        largest ``max_batch`` m warmed up so far (graphs of other buckets are dropped when they
        change); batches above it run in chunks of its largest bucket.
        """
        max_batch = _positive_int(max_batch, "max_batch")
        if example is not None and isinstance(example, list):
            example = tuple(example)
        with torch.inference_mode(), self._lock:
            if self._auto_buckets:
                # Default buckets fit the largest max_batch warmed up so far (they never shrink,
                # so a later, smaller warmup keeps what was captured).
                self._warmed_max = max_batch if self._warmed_max is None else max(self._warmed_max, max_batch)
                new = default_buckets(self._warmed_max)
                if new != self.buckets:
                    self._drop_signatures()
                    self.buckets = new
            if example is None:
                example = self._example()
            if example is None:
                self._pending_warmup = max_batch
                return
            if check_state(example, "warmup example") == 0:
                raise ValueError("warmup example must hold at least one row (e.g. x[:1])")
            device = as_tuple(example)[0].device
            with device_guard(device):
                try:
                    self._after_previous_call(device)
                    try:
                        sig = self._signature(example, self._capture_for(device))
                        if sig is None:
                            raise _GraphsUnusable(f"more than {self.max_signatures} input shapes")
                        self._warm(sig, max_batch)
                    finally:
                        self._mark_call_done(device)
                except _GraphsUnusable as e:
                    self.disabled_reason = str(e)
                    raise RuntimeError(f"CUDA graph warmup failed, the runtime will run eagerly: {e}") from e

    def static_buffers(self) -> List[torch.Tensor]:
        """Every static buffer of every signature (for diagnostics and tests). The caller may
        write them, so the next call copies its thresholds into theirs again."""
        with self._lock:
            for sig in self._sigs.values():
                sig.thresholds_of = None
            return [t for sig in self._sigs.values() for t in sig.tensors()]

    @property
    def num_signatures(self) -> int:
        return len(self._sigs)

    def __repr__(self) -> str:
        return (
            f"GraphRunner(buckets={list(self.buckets)}, signatures={len(self._sigs)}, "
            f"captures={self.num_captures}, disabled={self.disabled_reason!r})"
        )

    # ------------------------------------------------------------------ call sequence
    def _eager(self, x, B: int, snap):
        with torch.inference_mode():
            return eager_pass(self.spec, x, B, snap.tensor(as_tuple(x)[0].device)).run()

    def _disable(self, reason: str) -> None:
        if self._strict:
            raise RuntimeError(f"graphs=True but CUDA graphs cannot be used: {reason}")
        self.disabled_reason = reason
        warnings.warn(f"eeruntime: CUDA graphs disabled, running eagerly: {reason}", RuntimeWarning, stacklevel=3)

    def _capture_for(self, device: torch.device) -> bool:
        if self.capture is None:
            return device.type == "cuda"
        if self.capture and device.type != "cuda":
            raise ValueError(f"capture=True needs CUDA inputs, got a tensor on {device}")
        return bool(self.capture)

    def _after_previous_call(self, device: torch.device) -> None:
        # The previous call may have run on another stream: its work on the static buffers must
        # finish before this one writes them. Device-side wait, no host sync.
        ev = self._done.get(device)
        if ev is not None:
            torch.cuda.current_stream(device).wait_event(ev)

    def _mark_call_done(self, device: torch.device) -> None:
        if device.type == "cuda":
            ev = self._done.get(device)
            if ev is None:
                ev = self._done[device] = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))

    def _signature(self, x, capture: bool) -> Optional[_Signature]:
        parts = as_tuple(x)
        device = parts[0].device
        key = (
            isinstance(x, tuple),
            capture,
            tuple((tuple(p.shape[1:]), p.dtype, p.device) for p in parts),
            autocast_state(device.type),
        )
        sig = self._sigs.get(key)
        if sig is None:
            if len(self._sigs) >= self.max_signatures:
                return None  # beyond the limit: run eagerly rather than hold more buffers
            sig = self._sigs[key] = _Signature(x, self.buckets[-1], self.spec.num_exits, capture)
            _use_thresholds(sig, self._snapshot())  # for a warm-up run now
            if self._pending_warmup is not None:
                max_batch, self._pending_warmup = self._pending_warmup, None
                self._warm(sig, max_batch)
        return sig

    def _signature_at(self, k: int, state, capture: bool) -> Optional[_Signature]:
        """The signature whose stage-k input buffers fit ``state`` (made by an earlier call or
        warm-up of the stage before), or None."""
        parts = as_tuple(state)
        device = parts[0].device
        cast = autocast_state(device.type)
        for key, sig in self._sigs.items():
            st = sig.stages[k]
            if (
                key[1] == capture
                and key[3] == cast
                and sig.device == device
                and st is not None
                and st.matches(parts, isinstance(state, tuple))
            ):
                return sig
        return None

    def _run_stage(self, sig: _Signature, k: int, state, n: int, rows: torch.Tensor, carry, snap) -> StageResult:
        _use_thresholds(sig, snap)
        st = sig.stages[k]
        assert st is not None  # stage 0's exists with the signature; _signature_at checked the others
        for buf, p in zip(st.inputs, as_tuple(state)):
            buf[:n].copy_(p)
        if k > 0 and not st.positions:  # (stage 0's rows are the static arange itself)
            st.rows.copy_(sig.arange)  # positions: the leavers' outputs land in rows 0..n-1
            st.positions = True
        st.count.fill_(n)
        if self.spec.average and k > 0:
            assert st.acc is not None  # made with the stage's buffers when final="average"
            st.acc[:n].copy_(carry[0])
        self._launch(sig, k, bucket_for(n, self.buckets))
        assert sig.out_logits is not None  # made by the first body run
        if k == self.spec.num_exits - 1:  # every row leaves, at its position
            return StageResult(k, rows, sig.out_logits[:n].clone(), sig.out_conf[:n].clone(), rows[:0], None, ())
        nxt = sig.stages[k + 1]
        assert nxt is not None  # made by stage k's body
        # The one host read: the survivors' positions (ascending: the pack is stable) and their
        # count, adjacent in one buffer (one copy, no kernel to join them).
        head = nxt.head.to("cpu", copy=True)
        self.host_syncs += 1
        m = int(head[sig.cap])
        survivors = head[:m]
        leave = torch.ones(n, dtype=torch.bool)
        leave[survivors] = False
        left = leave.nonzero().squeeze(1)
        at = self._to_device_index(sig, left)
        logits = sig.out_logits.index_select(0, at)
        confidence = sig.out_conf.index_select(0, at)
        exit_rows = rows.index_select(0, at if rows.device == at.device else left.to(rows.device))
        if m == 0:
            return StageResult(k, exit_rows, logits, confidence, rows[:0], None, ())
        packed = nxt.state(m)
        new_state = tuple(t.clone() for t in packed) if isinstance(packed, tuple) else packed.clone()
        out_carry = (nxt.acc[:m].clone(),) if nxt.acc is not None else ()
        return StageResult(
            k, exit_rows, logits, confidence, rows.index_select(0, survivors.to(rows.device)), new_state, out_carry
        )

    @staticmethod
    def _to_device_index(sig: _Signature, left: torch.Tensor) -> torch.Tensor:
        """``left`` (int64, host) on the signature's device: on CUDA through a pinned buffer, an
        asynchronous copy rather than a pageable one that blocks the host. The pinned buffer is
        rewritten only by a later step after its own host read, which waits for this copy (the
        later call's stream waits for this call's work, see _on_buffers)."""
        if sig.device.type != "cuda":
            return left.to(sig.device)
        L = int(left.shape[0])
        sig.leave_host[:L].copy_(left)
        at = sig.leave_index[:L]
        at.copy_(sig.leave_host[:L], non_blocking=True)
        return at

    def _drop_signatures(self) -> None:
        if any(sig.device.type == "cuda" for sig in self._sigs.values()):
            torch.cuda.synchronize()  # no replay may still read buffers that are about to be freed
        self._sigs.clear()

    def _warm(self, sig: _Signature, max_batch: int) -> None:
        top = bucket_for(min(max_batch, self.buckets[-1]), self.buckets)
        sizes = [b for b in reversed(self.buckets) if b <= top]
        if sig.capture:
            # Once for all the captures that follow (torch.cuda.graph would do it per capture):
            # cached blocks go back to the driver, so the graph pool can take that memory.
            torch.cuda.synchronize(sig.device)
            torch.cuda.empty_cache()
        for k in range(self.spec.num_exits):
            for b in sizes:
                if (k, b) in sig.ready:
                    continue
                if k == 0:
                    sig.stages[0].count.fill_(b)  # a full batch, so the warm runs pack real rows
                self._prepare(sig, k, b)

    def _run(self, sig: _Signature, x, B: int, snap):
        # The graphs read the thresholds from this buffer: filled once per call (a device-side
        # copy, skipped when the call's snapshot is the one already there), so every stage of the
        # call decides against the same snapshot.
        _use_thresholds(sig, snap)
        parts = as_tuple(x)
        K = self.spec.num_exits
        counts = [0] * K
        first = sig.stages[0]
        logits = exit_index = confidence = None
        for start, stop in chunk_bounds(B, sig.cap):
            n = stop - start
            for buf, p in zip(first.inputs, parts):
                buf[:n].copy_(p[start:stop])
            first.count.fill_(n)
            for k, c in enumerate(self._run_stages(sig, n)):
                counts[k] += c
            if logits is None:
                logits = sig.out_logits.new_empty((B, sig.out_logits.shape[1]))
                exit_index = torch.empty(B, dtype=torch.int64, device=sig.device)
                confidence = torch.empty(B, dtype=torch.float32, device=sig.device)
            # Copies into fresh tensors: the caller never holds a view of a static buffer.
            logits[start:stop].copy_(sig.out_logits[:n])
            exit_index[start:stop].copy_(sig.out_exit[:n])
            confidence[start:stop].copy_(sig.out_conf[:n])
        return InferenceResult(logits, exit_index, confidence), counts

    def _run_stages(self, sig: _Signature, n: int) -> List[int]:
        batch = _GraphPass(self, sig, n)
        return batch.counts(run_stages(batch, self.spec.num_exits))

    def _bucket(self, n: int) -> int:
        """bucket_for(n, self.buckets) from a table (the host's time between two stages' graphs
        is time the GPU waits)."""
        buckets, table = self._bucket_table
        if buckets is not self.buckets:
            table = [0] + [bucket_for(i, self.buckets) for i in range(1, self.buckets[-1] + 1)]
            self._bucket_table = (self.buckets, table)
        return table[n]

    def _read_count(self, count: torch.Tensor) -> int:
        self.host_syncs += 1  # the one host sync per early exit
        return int(count.item())

    def _count_to_host(self, sig: _Signature, k: int) -> None:
        """Start copying stage k's count to ``sig.count_host[k]`` without waiting for it."""
        sig.count_host[k : k + 1].copy_(sig.stages[k].count, non_blocking=True)
        if sig.count_event is not None:
            sig.count_event.record()

    def _counts_on_host(self, sig: _Signature) -> List[int]:
        """The counts :meth:`_count_to_host` sent, once they have arrived (one host sync: it waits
        for the stages before the last copy, not for the ones launched after it)."""
        self.host_syncs += 1
        if sig.count_event is not None:
            sig.count_event.synchronize()
        return sig.count_host.tolist()

    def _launch(self, sig: _Signature, k: int, b: int) -> None:
        if not sig.capture:
            if (k, b) not in sig.ready:
                sig.ready.add((k, b))
                self.prepared.append((k, b))
            self._body(sig, k, b)
            return
        graph = sig.graphs.get((k, b))
        if graph is None:
            graph = self._capture(sig, k, b)
        if k + 1 < len(sig.stages) and sig.stages[k + 1] is not None:
            sig.stages[k + 1].positions = False  # the replay packs stage k's survivors there
        graph.replay()

    def _prepare(self, sig: _Signature, k: int, b: int) -> None:
        if sig.capture:
            self._capture(sig, k, b)
        else:
            self._body(sig, k, b)
            sig.ready.add((k, b))
            self.prepared.append((k, b))

    # ------------------------------------------------------------------ capture
    def _cuda_streams(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return s  # (side stream for the warm-up runs, capture stream)

    def _capture(self, sig: _Signature, k: int, b: int):
        device = sig.device
        side, capture_stream = self._cuda_streams(device)
        current = torch.cuda.current_stream(device)
        # Warm-up runs on real data mid-call write what the replay writes next, and read stage k's
        # input buffers; a stage that changes its input in place (x.mul_(s), x += emb) would
        # change them on every run, so each run, and the replay after the capture, starts from a
        # copy of the input as the call left it.
        inputs = [t[:b] for t in sig.stages[k].inputs]
        saved = [t.clone() for t in inputs]
        with _side_stream(side, current):
            for run in range(WARMUP_RUNS):
                for t, v in zip(inputs, saved):
                    t.copy_(v)
                with _HostReadProbe() if run == 0 else contextlib.nullcontext():
                    self._body(sig, k, b)
        for t, v in zip(inputs, saved):
            t.copy_(v)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with _CAPTURE_LOCK:
                _capture_into(graph, self._pool, capture_stream, current, lambda: self._body(sig, k, b))
        except Exception as e:
            if isinstance(e, _GraphsUnusable):
                raise
            raise _GraphsUnusable(
                f"capturing stage {k} at batch bucket {b} failed ({type(e).__name__}: {e}); a model or "
                "criterion that syncs with the host (.item(), nonzero, boolean indexing) cannot be captured"
            ) from e
        sig.graphs[(k, b)] = graph
        sig.ready.add((k, b))
        self.num_captures += 1
        self.prepared.append((k, b))
        return graph

    # ------------------------------------------------------------------ the graph body
    def _body(self, sig: _Signature, k: int, b: int) -> None:
        """Stage k at bucket b on static buffers: no host sync, no allocation that outlives it."""
        spec = self.spec
        K = spec.num_exits
        st = sig.stages[k]
        state, logits, C = spec.forward(k, st.state(b), b)
        self._ensure_outputs(sig, logits, C, k)
        valid = sig.arange[:b] < st.count
        rows = st.rows[:b]
        acc = None
        if spec.average:
            acc = logits.float() if st.acc is None else st.acc[:b] + logits.float()
        if k == K - 1:
            final_logits = (acc / K).to(logits.dtype) if acc is not None else logits
            conf = spec.scorer.score_at(final_logits, state, k, sig.zero_threshold)
            self._scatter(sig, valid, rows, [final_logits, conf, sig.exit_ids[k, :b]])
            return
        score, exited = spec.scorer.decide(logits, state, k, (), sig.thresholds)
        exited = exited & valid
        keep = valid & ~exited
        self._scatter(sig, exited, rows, [logits, score, sig.exit_ids[k, :b]])
        nxt = self._ensure_stage(sig, k + 1, state, b, C)
        nxt.positions = False  # this body packs into its rows
        carried = [*as_tuple(state), rows] + ([acc] if acc is not None else [])
        outs = [*nxt.inputs, nxt.rows] + ([nxt.acc] if acc is not None else [])
        self._pack(sig, keep, carried, outs, nxt.count)

    def _ensure_outputs(self, sig: _Signature, logits: torch.Tensor, C: int, k: int) -> None:
        if sig.out_logits is None:
            _no_alloc_while_capturing("the output buffer")
            sig.out_logits = torch.zeros((2 * sig.cap, C), dtype=logits.dtype, device=sig.device)
            sig.out_logits_exit = k
        elif logits.dtype != sig.out_logits.dtype:
            # The scatter would cast them into the one buffer without a word. Checked at each
            # body's first run (a capture fixes the dtypes it saw): the graphs give up and the
            # eager loop refuses the batch itself (its stage step takes each exit's own dtype).
            raise _GraphsUnusable(mixed_logits_dtypes(k, logits.dtype, sig.out_logits_exit, sig.out_logits.dtype))

    def _ensure_stage(self, sig: _Signature, k: int, state, b: int, C: int) -> _StageBuffers:
        parts = as_tuple(state)
        is_tuple = isinstance(state, tuple)
        for i, p in enumerate(parts):
            if not isinstance(p, torch.Tensor) or p.dim() == 0 or p.shape[0] != b:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"stage {k - 1} returned {got} as state part {i} for a batch of {b} rows")
        st = sig.stages[k]
        if st is None:
            _no_alloc_while_capturing(f"stage {k}'s input buffer")
            dev, cap = sig.device, sig.cap
            head = torch.zeros(cap + 1, dtype=torch.int64, device=dev)  # rows, then the count
            st = sig.stages[k] = _StageBuffers(
                [new_rows(p, cap) for p in parts],  # in the state's memory layout (rows_layout.py)
                is_tuple,
                head[:cap],
                head[cap:],
                torch.zeros((cap, C), dtype=torch.float32, device=dev) if self.spec.average else None,
                head,
            )
        elif not st.matches(parts, is_tuple):
            raise _GraphsUnusable(
                f"stage {k - 1}'s per-sample state changed shape or dtype for the same input shape "
                f"(was {[(tuple(t.shape[1:]), t.dtype) for t in st.inputs]}, now "
                f"{[(tuple(p.shape[1:]), p.dtype) for p in parts]}); static buffers need fixed shapes"
            )
        return st

    def _use_ops(self, sig: _Signature, op: str, *args) -> bool:
        if self.pack != "auto":
            return self.pack == "ops"
        return not sig.capture or ops.dispatch.capturable(op, self.spec.compact_backend, *args)

    def _scatter(self, sig: _Signature, mask, rows, srcs) -> None:
        outs = [sig.out_logits, sig.out_conf, sig.out_exit]
        srcs = [s.to(o.dtype) for s, o in zip(srcs, outs)]
        if self._use_ops(sig, "scatter_rows", mask, rows, srcs, outs):
            ops.scatter_rows(mask, rows, srcs, outs, backend=self.spec.compact_backend)
        else:
            scatter_rows_nosync(mask, rows, srcs, outs, spare_row=sig.cap)

    def _pack(self, sig: _Signature, keep, carried, outs, count_out) -> None:
        index_out = sig.pack_index
        if self._use_ops(sig, "compact_into", keep, carried, outs, index_out, count_out):
            ops.compact_into(keep, carried, outs, index_out, count_out, backend=self.spec.compact_backend)
        else:
            compact_into_nosync(keep, carried, outs, count_out)
