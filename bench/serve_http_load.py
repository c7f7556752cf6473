"""Open-loop load benchmark of ``python -m eeruntime serve`` over HTTP on 127.0.0.1: Poisson
arrivals of single samples, sent from this process to a server in another process.

For each model (bench/serve_load.py's MODELS: built under torch.manual_seed(0), thresholds for its
exit fractions as serve_load.run_model sets them, saved with rt.save(..., weights=True)) and each
system (a name and the extra command-line options of its server), a server is started as
``python -m eeruntime serve BUNDLE --model serve_http_load:<model>_factory --port 0 ...`` with
OMP_NUM_THREADS=1; every system's server of a model is alive at once, idle while another is
measured. The default systems:

  stage:     the server's defaults (no extra options; no deferral since session 14),
  ee-req:    ``--policy request``: request-level dynamic batching in the same scheduler, every
             stage-0 batch run whole through rt.infer (the "(b)" baseline); a server that refuses
             the option (an older eeruntime) is reported as unavailable, with its reason,
  stage-x2:  ``--scheduler-workers 2``.

``--systems`` takes names of these (or of stage-fill, stage-nodefer, stage-defer: ``--max-defer-ms
20``, the scheduler's CPU default, the server's before session 14) and ``name=OPTIONS`` pairs,
e.g. ``--systems "stage,wait1=--max-wait-ms 1"``.

The load generator is this process's asyncio event loop (--client-loop) on raw
``asyncio.Protocol`` connections: HTTP/1.1 keep-alive, every request's bytes encoded once before
a run (one sample ``[1, *shape]`` as safetensors, the answer asked for as safetensors; ``--body
json`` sends and asks for JSON), responses parsed by their status line and Content-Length. Its own
CPU per request stays small (it shares the machine with the server) and is measured.

Measured, per model and system:

  answers:    a few samples over HTTP against rt.infer in this process on the same device (on the
              CPU exit index equal, logits within 1e-4; on a GPU logits within 1e-3, an exit
              different only where the row's score is within 1e-3 of a threshold: ANSWER_TOLERANCE),
              before any load;
  light load: one request at a time over one connection (closed loop, --light-requests) against
              rt.infer at batch 1 in this process on the same samples: what the HTTP front end
              adds to p50;
  saturated:  closed loop, --sat-conns connections each sending back to back for --sat-seconds
              (after 0.3 s of warm-up), --repeats times in a rotated order: req/s (median), and
              the server process's CPU time (utime + stime of every thread) and this process's
              per answered request; beside it, serve_load's in-process saturated run of the same
              scheduler (its worker thread's CPU per request): what serving over HTTP costs;
  open loop:  arrivals at fractions (--fractions) of ee-req's saturated req/s (stage's if ee-req
              is unavailable), each request sent at its scheduled time on an idle connection, a
              new one opened when none is idle (at most --max-conns; beyond that requests queue in
              the generator, counted as client_queued). Latency = completion - *scheduled*
              arrival (a late generator or a full connection pool does not hide queueing; how
              late the generator sent is reported as send lag). At most --seconds of arrivals and
              --max-requests per run, then at most --drain-s for the answers; a request not
              answered 200 (unanswered, a lost connection, 503 from a full scheduler) counts as an
              error, its latency as infinite. Each rate runs --repeats times per system, the
              systems in a rotated order each repeat (a slow spell of the shared VM hits them
              alike); the row shown is the median-p99 run. --preopen connections are opened
              before a run's first arrival. Per run: throughput (answered / (last completion -
              first scheduled arrival)), p50, p99, server and generator CPU per answered
              request, the mean batch per stage (the server's /stats before and after the run);
              after the grid, each server's /stats.

Every run also records the cores that other processes took meanwhile (/proc/stat's busy time
less the server's and the generator's) and the hypervisor's steal, so that on a shared VM a run
that met another job says so, and the machine's TCP retransmissions (a segment dropped on
loopback costs a retransmission timeout, 200 ms at least).

The SLO is serve_load's: p99 <= 10x the plain model's batch-1 latency, measured in this process
(serve_load.median_call_ms) before and after each rate's runs; a rate is sustained when p99 <= the
SLO and every request was answered 200.

``--device cuda`` runs the models on the GPU: every server gets ``--device cuda`` (requests and
answers still cross HTTP as host bytes), and this process's rt.infer (answers, light load, the SLO's
plain model) and in-process twins run there too, warmed first as serve_load warms its own (graphs
captured, every batch size once); each server is sent one request of every batch size up to
--max-batch after the answers' check, since it captures its graphs at first use. Without CUDA it is
refused at once; with --before, a revision whose server has no --device (before 1c92e64) runs on
the CPU only.

    python bench/serve_http_load.py                          # digits and resnet, every system
    python bench/serve_http_load.py --quick                  # a smoke run (seconds)
    python bench/serve_http_load.py --seconds 2 --repeats 3 --systems stage,stage-x2
    python bench/serve_http_load.py --device cuda --models resnet,resnet18 --max-batch 64   # on a GPU

Writes bench/results/serve-http-<device>-<date><tag>.{json,md} and a latency-vs-throughput PNG.
Only 127.0.0.1 is ever bound or connected to.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import http.client
import json
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

HOST = "127.0.0.1"  # the only address this bench binds or connects to

# name -> the server's extra options (``--systems`` may add others as name=OPTIONS)
KNOWN_SYSTEMS: Dict[str, List[str]] = {
    "stage": [],
    "stage-defer": ["--max-defer-ms", "20"],
    "ee-req": ["--policy", "request"],
    "stage-x2": ["--scheduler-workers", "2"],
    "stage-fill": ["--policy", "fill"],
    "stage-nodefer": ["--max-defer-ms", "0"],
}
DEFAULT_SYSTEMS = "stage,ee-req,stage-x2"
# the known systems' in-process twins in serve_load (the same scheduler settings; its ee-req:
# request-level batching of rt.infer in a thread of its own), for the in-process reference. The
# server's default is no deferral (eeruntime/serve/cli.py, SERVE_MAX_DEFER_MS); serve_load's
# "stage" keeps the scheduler's default (20 ms on a CPU, but 0 on a GPU), so the server's
# stage-defer (20 ms) is serve_load's stage-defer (20 ms on either).
INPROC_SYSTEMS = {
    "stage": "stage-nodefer",
    "stage-nodefer": "stage-nodefer",
    "stage-defer": "stage-defer",
    "ee-req": "ee-req",
    "stage-x2": "stage-nodefer-x2",
}


# --------------------------------------------------------------------------- the servers' models
# Zero-argument factories for ``eeruntime serve --model serve_http_load:<name>_factory`` (the
# server's PYTHONPATH holds bench/): serve_load's MODELS architectures, the weights from the bundle.


def _build(name: str):
    from serve_load import MODELS

    spec: Dict[str, Any] = MODELS[name]
    return spec["build"]()


def digits_factory():
    return _build("digits")


def resnet_factory():
    return _build("resnet")


def resnet18_factory():
    return _build("resnet18")


FACTORIES = {
    "digits": "digits_factory",
    "resnet": "resnet_factory",
    "resnet18": "resnet18_factory",
    "resnet18-224": "resnet18_factory",  # the same net at 224x224
}


# --------------------------------------------------------------------------- HTTP on the wire
class ProtocolError(Exception):
    """A response this client cannot read (not HTTP/1.x, no Content-Length)."""


class Response:
    __slots__ = ("status", "body", "close")

    def __init__(self, status: int, body: Optional[bytes], close: bool):
        self.status, self.body, self.close = status, body, close


class ResponseParser:
    """Incremental HTTP/1.1 response parser: bytes in as they arrive (a response split over many
    reads, or several responses in one), whole responses out. Bodies are framed by Content-Length
    (the eeruntime server always sends it); a chunked or unframed body is a ProtocolError."""

    MAX_HEAD = 65536

    def __init__(self, keep_body: bool = False):
        self.keep_body = keep_body
        self._buf = bytearray()
        self._status = -1  # the status of the response whose body is awaited, -1 between responses
        self._need = 0
        self._close = False

    def feed(self, data: bytes) -> List[Response]:
        buf = self._buf
        buf += data
        out: List[Response] = []
        while True:
            if self._status < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self.MAX_HEAD:
                        raise ProtocolError(f"no end of the response head in {len(buf)} bytes")
                    return out
                self._head(bytes(buf[:end]))
                del buf[: end + 4]
            if len(buf) < self._need:
                return out
            body = bytes(buf[: self._need]) if self.keep_body else None
            del buf[: self._need]
            out.append(Response(self._status, body, self._close))
            self._status = -1

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status, length, close = int(parts[1]), None, parts[0] == "HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                if not value.isdigit():
                    raise ProtocolError(f"bad Content-Length {value!r}")
                length = int(value)
            elif name == "connection":
                close = value.lower() == "close"
            elif name == "transfer-encoding" and value.lower() != "identity":
                raise ProtocolError(f"Transfer-Encoding {value} is not read here (the server sends Content-Length)")
        if length is None:
            if status in (204, 304) or 100 <= status < 200:
                length = 0
            else:
                raise ProtocolError(f"a {status} response without Content-Length")
        self._status, self._need, self._close = status, length, close


def encode_request(x, body: str = "safetensors", path: str = "/v1/infer") -> bytes:
    """The whole HTTP/1.1 request (head and body) for the batch ``x`` (on any device), encoded once."""
    x = x.cpu()
    if body == "safetensors":
        from safetensors.torch import save

        payload = save({"input": x.contiguous()})
        ctype = accept = "application/vnd.safetensors"
    elif body == "json":
        payload = json.dumps({"inputs": x.tolist()}).encode()
        ctype = accept = "application/json"
    else:
        raise ValueError(f"body must be safetensors or json, got {body!r}")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\nAccept: {accept}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode("latin-1") + payload


def decode_answer(body: bytes, fmt: str = "safetensors") -> Tuple[Any, Any]:
    """(logits, exit_index) tensors of an answer."""
    import torch

    if fmt == "safetensors":
        from safetensors.torch import load

        d = load(body)
        return d["logits"], d["exit_index"]
    doc = json.loads(body)
    return torch.tensor(doc["logits"]), torch.tensor(doc["exit_index"])


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time (``current``: its index)."""

    def __init__(self, run):
        self.run = run
        self.parser = ResponseParser(run.keep_body)
        self.transport: Any = None
        self.current = -1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.parser.feed(data)
        except ProtocolError as e:
            self.run.protocol_error = str(e)
            self.transport.close()
            return
        for r in responses:
            self.run.on_response(self, r)

    def connection_lost(self, exc) -> None:
        self.run.on_lost(self)

    def send(self, i: int, data: bytes) -> None:
        self.current = i
        self.transport.write(data)


LOST, CONNECT_FAILED = -1, -2  # the statuses of a request whose connection died / never opened


class _OpenLoop:
    """One open-loop run's state: requests dispatched at their scheduled times (``times``, on
    perf_counter's clock) to idle connections, new ones opened up to ``max_conns``, then queued."""

    def __init__(self, loop, port: int, requests: Sequence[bytes], n: int, max_conns: int, keep_body: bool):
        self.loop, self.port, self.requests = loop, port, requests
        self.times: List[float] = []  # set once the connections are open
        self.max_conns, self.keep_body = max_conns, keep_body
        self.sent_at = [math.nan] * n
        self.done_at = [math.inf] * n
        self.status = [0] * n
        self.bodies: Dict[int, Optional[bytes]] = {}
        self.idle: List[_Conn] = []
        self.conns: set = set()
        self.opening = 0
        self.backlog: collections.deque = collections.deque()
        self.outstanding = 0
        self.arrivals_done = False
        self.all_done = asyncio.Event()
        self.client_queued = self.max_backlog = self.max_open = 0
        self.protocol_error = ""

    async def preopen(self, k: int) -> None:
        k = min(k, self.max_conns)
        conns = await asyncio.gather(*(self._connect() for _ in range(k)), return_exceptions=True)
        for c in conns:
            if isinstance(c, _Conn):
                self.idle.append(c)

    async def _connect(self) -> _Conn:
        _, conn = await self.loop.create_connection(lambda: _Conn(self), HOST, self.port)
        self.conns.add(conn)
        self.max_open = max(self.max_open, len(self.conns))
        return conn

    async def arrivals(self) -> None:
        for i, t in enumerate(self.times):
            # never before its time: uvloop's timers (whole milliseconds from a clock read at the
            # start of the loop's iteration) may fire up to a millisecond early, and this loop then
            # spins (--client-loop uvloop costs CPU here); asyncio's epoll timeouts round up, never
            # early, so each request goes 0-1 ms late (its send lag, reported)
            while (delay := t - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            self.outstanding += 1
            self.dispatch(i)
        self.arrivals_done = True
        if self.outstanding == 0:
            self.all_done.set()

    def dispatch(self, i: int) -> None:
        if self.idle:
            self._send(self.idle.pop(), i)
        elif len(self.conns) + self.opening < self.max_conns:
            self.opening += 1
            self.loop.create_task(self._open_and_send(i))
        else:
            self.backlog.append(i)
            self.client_queued += 1
            self.max_backlog = max(self.max_backlog, len(self.backlog))

    async def _open_and_send(self, i: int) -> None:
        try:
            conn = await self._connect()
        except OSError:
            self.opening -= 1
            self._finish(i, CONNECT_FAILED)
            return
        self.opening -= 1
        self._send(conn, i)

    def _send(self, conn: _Conn, i: int) -> None:
        self.sent_at[i] = time.perf_counter()
        conn.send(i, self.requests[i % len(self.requests)])

    def _finish(self, i: int, status: int) -> None:
        if status > 0:
            self.done_at[i] = time.perf_counter()
        self.status[i] = status
        self.outstanding -= 1
        if self.outstanding == 0 and self.arrivals_done:
            self.all_done.set()

    def on_response(self, conn: _Conn, r: Response) -> None:
        i, conn.current = conn.current, -1
        if i < 0:
            self.protocol_error = "a response with no request in flight"
            return
        if self.keep_body:
            self.bodies[i] = r.body
        self._finish(i, r.status)
        if r.close:
            conn.transport.close()  # connection_lost forgets it
        elif self.backlog:
            self._send(conn, self.backlog.popleft())
        else:
            self.idle.append(conn)

    def on_lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.current >= 0:
            i, conn.current = conn.current, -1
            self._finish(i, LOST)
        while self.backlog and len(self.conns) + self.opening < self.max_conns:
            self.opening += 1
            self.loop.create_task(self._open_and_send(self.backlog.popleft()))

    def close(self) -> None:
        for c in list(self.conns):
            c.transport.close()


class _ClosedLoop:
    """``conns`` connections, each sending its next request as soon as its answer is in, until
    ``stop_at`` (perf_counter) or ``max_requests`` requests are sent."""

    def __init__(self, loop, port, requests, conns, stop_at=None, max_requests=None, keep_body=False):
        self.loop, self.port, self.requests, self.nconns = loop, port, requests, conns
        self.stop_at, self.max_requests, self.keep_body = stop_at, max_requests, keep_body
        self.next_i = 0
        self.sent_at: List[float] = []
        self.done_at: List[float] = []
        self.status: List[int] = []
        self.bodies: List[Optional[bytes]] = []
        self.outstanding = 0
        self.all_done = asyncio.Event()
        self.protocol_error = ""

    async def start(self) -> None:
        made = await asyncio.gather(
            *(self.loop.create_connection(lambda: _Conn(self), HOST, self.port) for _ in range(self.nconns))
        )
        for _, conn in made:
            self._next(conn)
        if self.outstanding == 0:
            self.all_done.set()

    def _more(self) -> bool:
        return (self.max_requests is None or self.next_i < self.max_requests) and (
            self.stop_at is None or time.perf_counter() < self.stop_at
        )

    def _next(self, conn: _Conn) -> None:
        if not self._more():
            return
        i = self.next_i
        self.next_i += 1
        self.sent_at.append(time.perf_counter())
        self.done_at.append(math.inf)
        self.status.append(0)
        self.bodies.append(None)
        self.outstanding += 1
        conn.send(i, self.requests[i % len(self.requests)])

    def _finish(self, i: int, status: int) -> None:
        self.status[i] = status
        if status > 0:
            self.done_at[i] = time.perf_counter()
        self.outstanding -= 1

    def on_response(self, conn: _Conn, r: Response) -> None:
        i, conn.current = conn.current, -1
        self._finish(i, r.status)
        if self.keep_body:
            self.bodies[i] = r.body
        if r.close:
            conn.transport.close()
        else:
            self._next(conn)
        if self.outstanding == 0:
            self.all_done.set()

    def on_lost(self, conn: _Conn) -> None:
        if conn.current >= 0:
            i, conn.current = conn.current, -1
            self._finish(i, LOST)
            if self.outstanding == 0:
                self.all_done.set()


def new_loop(kind: str = "asyncio") -> asyncio.AbstractEventLoop:
    """An event loop for the generator: uvloop's where installed ("auto"), else asyncio's."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise
    return asyncio.new_event_loop()


def loop_name(kind: str = "asyncio") -> str:
    """Which event loop ``new_loop(kind)`` makes: "uvloop" or "asyncio"."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: F401

            return "uvloop"
        except ImportError:
            pass
    return "asyncio"


def _run(coro_fn: Callable[[asyncio.AbstractEventLoop], Any], loop_kind: str):
    """Run ``coro_fn(loop)`` on a fresh loop; tasks left (a connection still opening when the
    drain time ran out) are cancelled before the loop closes."""
    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        left = asyncio.all_tasks(loop)
        for t in left:
            t.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()


def _pct(values: List[float], q: float) -> float:
    from eeruntime.serve.stats import percentile

    v = percentile(values, q)
    return math.inf if v is None else v


def poisson_times(rate: float, seconds: float, max_requests: int, seed: int) -> List[float]:
    """Arrival offsets (s from the start) of a Poisson process at ``rate``/s: those within
    ``seconds``, at most ``max_requests``."""
    rng = random.Random(seed)
    out: List[float] = []
    t = 0.0
    while len(out) < max_requests:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        out.append(t)
    return out


def open_loop(
    port: int,
    requests: Sequence[bytes],
    rate: float,
    seconds: float,
    max_requests: int,
    drain_s: float,
    seed: int = 0,
    max_conns: int = 512,
    preopen: int = 16,
    loop_kind: str = "asyncio",
    cpu_pid: Optional[int] = None,
    keep_latencies: bool = False,
) -> dict:
    """One open-loop run against 127.0.0.1:``port`` (see the module docstring); ``cpu_pid``: a
    process (the server) whose CPU time per answered request is reported too."""
    offsets = poisson_times(rate, seconds, max_requests, seed)

    async def go(loop):
        run = _OpenLoop(loop, port, requests, len(offsets), max_conns, keep_body=False)
        await run.preopen(preopen)
        t0 = time.perf_counter() + 0.002  # the schedule starts once the pool is open
        run.times = [t0 + o for o in offsets]
        cpu = cpu_mark(cpu_pid)
        await run.arrivals()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.all_done.wait(), drain_s)
        cpu_end = cpu_mark(cpu_pid)
        run.close()
        await asyncio.sleep(0.001)  # the closed connections' callbacks
        return run, t0, cpu, cpu_end

    run, t0, cpu0, cpu1 = _run(go, loop_kind)
    n = len(offsets)
    ok = [i for i in range(n) if run.status[i] == 200]
    lat = [(run.done_at[i] - run.times[i]) if run.status[i] == 200 else math.inf for i in range(n)]
    lat_sorted = sorted(lat)
    lag = sorted(run.sent_at[i] - run.times[i] for i in range(n) if not math.isnan(run.sent_at[i]))
    finish = max((run.done_at[i] for i in ok), default=t0)
    statuses = collections.Counter(
        {LOST: "lost", CONNECT_FAILED: "connect failed", 0: "unanswered"}.get(s, str(s)) for s in run.status if s != 200
    )
    answered = len(ok)
    out = {
        "offered_rate": rate,
        "arrival_rate": n / offsets[-1] if n > 1 else 0.0,
        "sent": n,
        "answered": answered,
        "errors": n - answered,
        "statuses": dict(statuses),
        "throughput": answered / max(finish - run.times[0], 1e-9) if answered else 0.0,
        "p50_ms": _pct(lat_sorted, 50) * 1e3,
        "p99_ms": _pct(lat_sorted, 99) * 1e3,
        "send_lag_p50_ms": _pct(lag, 50) * 1e3 if lag else math.nan,
        "send_lag_p99_ms": _pct(lag, 99) * 1e3 if lag else math.nan,
        "max_connections": run.max_open,
        "client_queued": run.client_queued,
        "max_client_queue": run.max_backlog,
        **cpu_figures(cpu0, cpu1, answered, n),
    }
    if run.protocol_error:
        out["protocol_error"] = run.protocol_error
    if keep_latencies:
        out["latencies_ms"] = [v * 1e3 for v in lat]
    return out


def closed_loop(
    port: int,
    requests: Sequence[bytes],
    conns: int,
    seconds: Optional[float] = None,
    max_requests: Optional[int] = None,
    warm_s: float = 0.0,
    warm_requests: int = 0,
    keep_body: bool = False,
    loop_kind: str = "asyncio",
    cpu_pid: Optional[int] = None,
) -> dict:
    """``conns`` connections sending back to back, for ``warm_s`` + ``seconds`` or ``max_requests``
    requests. Counted over the window after ``warm_s``: req/s (answered 200), the latencies (sent
    to answered) of the requests sent in it but the first ``warm_requests``, CPU per answered
    request (server: ``cpu_pid``, and this process). ``bodies`` (with ``keep_body``): every
    answer, in the order sent."""

    async def go(loop):
        start = time.perf_counter()
        stop = None if seconds is None else start + warm_s + seconds
        run = _ClosedLoop(loop, port, requests, conns, stop_at=stop, max_requests=max_requests, keep_body=keep_body)
        marks: Dict[str, tuple] = {}

        def mark(name):
            marks[name] = cpu_mark(cpu_pid)

        if warm_s > 0:
            loop.call_later(warm_s, mark, "start")
        else:
            mark("start")
        if seconds is not None:
            loop.call_later(warm_s + seconds, mark, "end")
        await run.start()
        await run.all_done.wait()
        if "end" not in marks:
            mark("end")
        return run, marks

    run, marks = _run(go, loop_kind)
    t0, t1 = marks["start"][0], marks["end"][0]
    window = [i for i in range(warm_requests, len(run.sent_at)) if run.sent_at[i] >= t0]
    done_in = [i for i in range(len(run.done_at)) if run.status[i] == 200 and t0 <= run.done_at[i] <= t1]
    lat = sorted(run.done_at[i] - run.sent_at[i] for i in window if run.status[i] == 200)
    errors = sum(1 for s in run.status if s != 200)
    return {
        "req_per_s": len(done_in) / max(t1 - t0, 1e-9),
        "answered_in_window": len(done_in),
        "requests": len(run.status),
        "errors": errors,
        "p50_ms": _pct(lat, 50) * 1e3,
        "p99_ms": _pct(lat, 99) * 1e3,
        **cpu_figures(marks["start"], marks["end"], len(done_in), len(done_in)),
        "statuses": run.status,
        "bodies": run.bodies if keep_body else None,
        "protocol_error": run.protocol_error,
    }


def fetch(port: int, requests: Sequence[bytes], loop_kind: str = "asyncio") -> List[Tuple[int, Optional[bytes]]]:
    """Send ``requests`` one at a time on one connection: (status, body) of each, in order."""
    r = closed_loop(port, requests, 1, max_requests=len(requests), keep_body=True, loop_kind=loop_kind)
    return list(zip(r["statuses"], r["bodies"]))


# --------------------------------------------------------------------------- processes
def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (every thread): psutil where installed,
    else /proc/<pid>/stat's utime + stime (what psutil reads on Linux)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> Tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, every core (/proc/stat; NaN where
    there is none): busy less the server's and the generator's is what other processes took."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / tick, steal / tick


def tcp_retransmits() -> float:
    """The machine's TCP segments retransmitted so far (/proc/net/snmp's Tcp RetransSegs; NaN
    where there is none): on loopback a retransmission means a segment was dropped, and costs at
    least the 200 ms minimum retransmission timeout unless a fast retransmit recovers it."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        return float(rows[1][rows[0].index("RetransSegs")])
    except (OSError, ValueError, IndexError):
        return math.nan


def cpu_mark(pid: Optional[int]) -> Tuple[float, ...]:
    """(wall, server process CPU, this process's CPU, machine busy, machine steal) seconds now,
    and the machine's TCP retransmissions so far."""
    return (
        time.perf_counter(),
        process_cpu_s(pid) if pid else math.nan,
        time.process_time(),
        *machine_cpu_s(),
        tcp_retransmits(),
    )


def cpu_figures(a: tuple, b: tuple, per_server: int, per_client: int) -> dict:
    """CPU between two cpu_marks: server and generator us per request (``per_*`` requests), and
    the cores other processes and the hypervisor (steal) took meanwhile, on average."""
    wall = max(b[0] - a[0], 1e-9)
    server, client = b[1] - a[1], b[2] - a[2]
    return {
        "server_cpu_us_per_request": server / max(per_server, 1) * 1e6,
        "client_cpu_us_per_request": client / max(per_client, 1) * 1e6,
        "server_cores": server / wall,
        "other_cores": max((b[3] - a[3]) - server - client, 0.0) / wall,
        "steal_cores": (b[4] - a[4]) / wall,
        "tcp_retransmits": b[5] - a[5],
    }


def http_get_json(port: int, path: str, timeout_s: float = 10.0) -> Tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body.decode("latin-1", "replace")
    finally:
        conn.close()


class ServerUnavailable(Exception):
    pass


def server_device(device: str, tree=None) -> Optional[str]:
    """The ``--device`` given to a server whose eeruntime comes from ``tree`` (a --before
    revision's; None: this checkout's): ``device``, or None (no option) where that revision's
    server has no --device (it came in 1c92e64) and ``device`` is the CPU, where such a server runs
    its model anyway; a ValueError saying so where ``device`` is not the CPU."""
    cli = Path(tree) / "eeruntime" / "serve" / "cli.py" if tree is not None else None
    if cli is None or (cli.is_file() and '"--device"' in cli.read_text()):
        return device
    if device == "cpu":
        return None
    raise ValueError(
        f"the `eeruntime serve` of {tree} has no --device option (it came in 1c92e64): its servers run on the CPU only"
    )


class Server:
    """``python -m eeruntime serve`` in a subprocess on 127.0.0.1 (--port 0: the port it prints),
    OMP_NUM_THREADS=1, bench/ and the repository on its PYTHONPATH (for ``--model``'s factory),
    its model on ``device`` (see server_device; ``extra`` may name another)."""

    def __init__(
        self,
        name: str,
        bundle,
        model: str,
        shape,
        max_batch: int,
        extra: Sequence[str],
        workdir,
        tree=None,
        device: str = "cpu",
    ):
        self.name, self.extra = name, list(extra)
        self.tree = Path(tree) if tree is not None else ROOT  # where its eeruntime is imported from
        self.device = server_device(device, tree)
        self.workdir = Path(workdir)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        self.out_path, self.err_path = self.workdir / f"{safe}.out", self.workdir / f"{safe}.err"
        self.cmd = [
            sys.executable,
            "-m",
            "eeruntime",
            "serve",
            str(bundle),
            "--model",
            model,
            "--host",
            HOST,
            "--port",
            "0",
            "--input-shape",
            ",".join(str(d) for d in shape),
            "--log-level",
            "warning",
            "--max-batch",
            str(max_batch),
            *(["--device", self.device] if self.device else []),
            *self.extra,
        ]
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.startup_s = math.nan

    def launch(self) -> Tuple[Dict[str, str], str]:
        """The server process's environment and working directory: ``python -m`` puts the working
        directory first on sys.path, ahead of PYTHONPATH, so it is the tree whose eeruntime runs."""
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.tree), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        )
        return env, str(self.tree)

    def start(self) -> None:
        env, cwd = self.launch()
        self._t0 = time.perf_counter()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _stderr_tail(self, lines: int = 1) -> str:
        """The last lines of the server's stderr (argparse's refusal is its last line)."""
        try:
            text = [t.strip() for t in self.err_path.read_text(errors="replace").splitlines() if t.strip()]
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the server said its port and answers GET /health with 200; ServerUnavailable
        (saying why) if it exits first or the time runs out."""
        assert self.proc is not None
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerUnavailable(f"the server exited with code {rc} at start: {self._stderr_tail()}")
            if not self.port:
                text = self.out_path.read_text(errors="replace")
                marker = f"on http://{HOST}:"
                if marker in text:
                    self.port = int(text.split(marker, 1)[1].split()[0].rstrip("/"))
            if self.port:
                try:
                    if http_get_json(self.port, "/health", timeout_s=2)[0] == 200:
                        self.startup_s = time.perf_counter() - self._t0
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise ServerUnavailable(f"not ready within {timeout_s:.0f} s: {self._stderr_tail()}")

    def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is pending on the server (GET /health), at most ``timeout_s``."""
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                status, doc = http_get_json(self.port, "/health", timeout_s=2)
                if status == 200 and isinstance(doc, dict) and doc.get("pending_requests") == 0:
                    return True
            except OSError:
                pass
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        """SIGTERM (the server drains its scheduler and exits), SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def running_servers(
    specs: Dict[str, List[str]],
    bundle,
    model: str,
    shape,
    max_batch: int,
    startup_timeout_s=120.0,
    trees=None,
    device: str = "cpu",
):
    """Every system's server started at once, its model on ``device`` (``trees``: {name: the
    source tree its eeruntime comes from}, this checkout's by default); yields ({name: Server} of
    those ready, {name: why not} of the others); every server stopped (SIGTERM, then SIGKILL) on
    the way out."""
    workdir = tempfile.mkdtemp(prefix="serve-http-")
    trees = trees or {}
    servers = {
        name: Server(name, bundle, model, shape, max_batch, extra, workdir, trees.get(name), device)
        for name, extra in specs.items()
    }
    ready: Dict[str, Server] = {}
    unavailable: Dict[str, str] = {}
    try:
        for s in servers.values():
            s.start()
        for name, s in servers.items():
            try:
                s.wait_ready(startup_timeout_s)
                ready[name] = s
            except ServerUnavailable as e:
                unavailable[name] = str(e)
                s.stop(5)
        yield ready, unavailable
    finally:
        for s in servers.values():
            s.stop()


def tree_at(rev: str, dest: Path) -> Path:
    """The package ``eeruntime`` of git revision ``rev`` of this checkout under ``dest`` (with
    this checkout's compiled extension beside it, so that only the Python differs), for
    ``--before``: its servers run that revision's server and scheduler beside today's."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "eeruntime"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    for built in list((ROOT / "eeruntime").glob("_C*.so")) + list((ROOT / "eeruntime").glob("_C_build.json")):
        (dest / "eeruntime" / built.name).write_bytes(built.read_bytes())
    return dest


# --------------------------------------------------------------------------- the bench
def parse_systems(text: str) -> Dict[str, List[str]]:
    """``"stage,ee-req,x=--max-wait-ms 1"`` -> {name: the server's extra options}."""
    out: Dict[str, List[str]] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, eq, opts = item.partition("=")
        name = name.strip()
        if eq:
            out[name] = shlex.split(opts)
        elif name in KNOWN_SYSTEMS:
            out[name] = list(KNOWN_SYSTEMS[name])
        else:
            raise ValueError(f"unknown system {name!r}: name one of {', '.join(KNOWN_SYSTEMS)} or give NAME=OPTIONS")
    if not out:
        raise ValueError("no systems given")
    return out


def mean_batches(before: dict, after: dict) -> List[float]:
    """The mean rows per batch of each stage between two /stats documents."""
    out = []
    for k in range(len(after.get("batches", []))):
        b = after["batches"][k] - before["batches"][k]
        rows = after["mean_batch"][k] * after["batches"][k] - before["mean_batch"][k] * before["batches"][k]
        out.append(round(rows / b, 2) if b > 0 else 0.0)
    return out


def _stats(server: Server) -> dict:
    try:
        status, doc = http_get_json(server.port, "/stats")
    except OSError as e:
        return {"error": str(e)}
    return doc if status == 200 and isinstance(doc, dict) else {"error": f"status {status}"}


# How close an answer over HTTP must be to rt.infer's here. On the CPU both run the same kernels
# on the same row: the exit equal, the logits within 1e-4. On a GPU the server's process may pick
# other cuDNN algorithms (TF32 convolutions by default), so the logits within 1e-3 (absolute and
# relative), and an exit may differ where the row's score is within 1e-3 of the threshold at which
# the two answers parted (an entropy moves about as far as the logits do).
ANSWER_TOLERANCE = {
    "cpu": {"atol": 1e-4, "rtol": 0.0, "near_threshold": 0.0},
    "cuda": {"atol": 1e-3, "rtol": 1e-3, "near_threshold": 1e-3},
}


def threshold_margin(rt, x, exit_index: int) -> float:
    """|score - threshold| of ``x``'s row at early exit ``exit_index``: how near a tie the decision
    there was. Two answers that left at exits a < b took the same decisions before a and parted at
    a, so noise can have flipped only that one."""
    import torch

    from eeruntime.ops import confidence_ref

    with torch.no_grad():
        logits = rt.model(x)[exit_index]
    return abs(float(confidence_ref(logits, rt.criterion)[0]) - rt.thresholds[exit_index])


def check_answers(server: Server, rt, pool, requests, body: str, loop_kind: str, device: str = "cpu") -> dict:
    """The first requests' answers over HTTP against rt.infer on the same samples here, its model
    on the server's ``device``, within ANSWER_TOLERANCE[device]: ``agree``. The logits are compared
    where the exits are equal; an exit that differs within the tolerance of a threshold is counted
    as ``near_threshold_exits``."""
    import torch

    tol = ANSWER_TOLERANCE[torch.device(device).type]
    got = fetch(server.port, requests, loop_kind)
    statuses = [s for s, _ in got]
    exit_equal, agree, diff, near = True, True, 0.0, 0
    for i, (status, data) in enumerate(got):
        if status != 200 or data is None:
            exit_equal = agree = False
            continue
        logits, exit_index = decode_answer(data, body)
        want = rt.infer(pool[i])
        want_logits, want_exit = want.logits.float().cpu(), want.exit_index.long().cpu()
        if not torch.equal(exit_index.long(), want_exit):
            exit_equal = False
            parted = min(int(exit_index[0]), int(want_exit[0]))
            if tol["near_threshold"] > 0 and threshold_margin(rt, pool[i], parted) <= tol["near_threshold"]:
                near += 1
            else:
                agree = False
            continue
        diff = max(diff, float((logits.float() - want_logits).abs().max()))
        agree &= torch.allclose(logits.float(), want_logits, rtol=tol["rtol"], atol=tol["atol"])
    return {
        "samples": len(got),
        "statuses": statuses,
        "exit_index_equal": exit_equal,
        "max_abs_logit_diff": diff,
        "near_threshold_exits": near,
        "tolerance": tol,
        "agree": agree,
    }


def warm_server(server: Server, pool, max_batch: int, body: str, loop_kind: str) -> List[int]:
    """Every batch size up to ``max_batch`` once over HTTP, a request of that many rows (the
    server runs it whole when idle): a CUDA server captures its graphs and cuDNN sets up its
    kernels at the first batch of each size, which would otherwise land in a measured run. The
    statuses."""
    import torch

    requests = [encode_request(torch.cat(pool[:b]), body) for b in range(1, max_batch + 1)]
    return [s for s, _ in fetch(server.port, requests, loop_kind)]


def light_infer_ms(rt, pool, n: int) -> dict:
    """rt.infer at batch 1 here, one sample after another over ``pool`` (the HTTP light load's
    samples; on a GPU each call until its work is done): p50 and p99 ms."""
    import torch

    sync = torch.cuda.synchronize if pool[0].is_cuda else (lambda: None)
    for x in pool[:20]:
        rt.infer(x)
    sync()
    ts = []
    for i in range(n):
        t = time.perf_counter()
        rt.infer(pool[i % len(pool)])
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"p50_ms": _pct(ts, 50) * 1e3, "p99_ms": _pct(ts, 99) * 1e3, "requests": n}


CPU_KEYS = ("server_cpu_us_per_request", "client_cpu_us_per_request", "server_cores", "other_cores", "steal_cores")
# the median run's own count is kept; the sum over a cell's runs is reported beside it
RUN_SUMS = ("errors", "client_queued", "tcp_retransmits")


def median_of(runs: List[dict]) -> dict:
    """serve_load.median_run (the median-p99 run; answered/sent summed), the CPU figures as medians
    over the runs, and errors, client-queued requests and TCP retransmissions summed."""
    from serve_load import median_run

    row = median_run(runs)
    for k in CPU_KEYS:
        row[k] = statistics.median(r[k] for r in runs)
    for k in RUN_SUMS:
        row[k] = sum(r[k] for r in runs)
    return row


def build_runtime(name: str, device: str = "cpu", max_batch: int = 32):
    """serve_load.build_runtime for MODELS[name] on ``device`` (on CUDA warmed as serve_load warms
    its own: serve_load.warm_cuda, batches up to ``max_batch``), its samples as single-sample
    batches there: (model, rt, pool, spec)."""
    import torch
    from serve_load import MODELS, warm_cuda
    from serve_load import build_runtime as build

    spec: Dict[str, Any] = MODELS[name]
    model, rt, pool_x = build(spec, torch.device(device))
    if pool_x.is_cuda:
        warm_cuda(model, rt, pool_x, max_batch)
    return model, rt, [pool_x[i : i + 1].clone() for i in range(pool_x.shape[0])], spec


def run_model(name: str, args) -> dict:
    from eeruntime.serve import freeze_startup_objects

    model, rt, pool, spec = build_runtime(name, args.device, args.max_batch)
    thr = rt.thresholds
    requests = [encode_request(x, args.body) for x in pool[: args.pool]]
    res: Dict[str, Any] = {
        "model": name,
        "input_shape": list(spec["shape"]),
        "exit_fractions": spec["fractions"],
        "thresholds": thr,
        "max_batch": args.max_batch,
        "device": args.device,
        "body": args.body,
        "request_bytes": len(requests[0]),
    }
    with tempfile.TemporaryDirectory(prefix="serve-http-bundle-") as tmp:
        bundle = Path(tmp) / name
        rt.save(bundle, weights=True)
        factory = f"serve_http_load:{FACTORIES[name]}"
        with running_servers(
            args.systems, bundle, factory, spec["shape"], args.max_batch, trees=args.trees, device=args.device
        ) as (servers, unavailable):
            res["systems"] = {
                s: {
                    "options": opts,
                    # None: an older server without --device (on the CPU)
                    "device": server_device(args.device, args.trees.get(s)),
                    "available": s in servers,
                    **({"startup_s": round(servers[s].startup_s, 2)} if s in servers else {}),
                    **({"reason": unavailable[s]} if s in unavailable else {}),
                }
                for s, opts in args.systems.items()
            }
            for s, why in unavailable.items():
                print(f"[{name}] {s}: unavailable ({why})", flush=True)
            freeze_startup_objects()
            res.update(measure(name, args, model, rt, pool, requests, servers, res))
    return res


def measure(name, args, model, rt, pool, requests, servers: Dict[str, Server], res: dict) -> dict:
    import torch
    from serve_load import make_system as inproc_system
    from serve_load import median_call_ms, rotated, saturated_capacity, sustained

    from eeruntime.oracle import plain_forward

    out: Dict[str, Any] = {}
    names = list(servers)
    plain1 = median_call_ms(lambda x: plain_forward(model, x), pool[0])
    ee1 = median_call_ms(lambda x: rt.infer(x), pool[0])
    out.update(plain_batch1_ms=plain1, infer_batch1_ms=ee1, slo_p99_ms=10 * plain1)
    print(f"[{name}] plain batch-1 {plain1:.3f} ms, rt.infer batch-1 {ee1:.3f} ms; SLO p99 <= {10 * plain1:.2f} ms")

    # answers over HTTP = rt.infer here (on the same device), before any load
    k = min(args.check_samples, len(requests))
    out["answers"] = {
        s: check_answers(srv, rt, pool, requests[:k], args.body, args.client_loop, args.device)
        for s, srv in servers.items()
    }
    for s, a in out["answers"].items():
        print(
            f"[{name}] {s}: answers of {a['samples']} samples over HTTP vs rt.infer: agree {a['agree']} (exit index "
            f"equal {a['exit_index_equal']}, {a['near_threshold_exits']} near a threshold; max |logit diff| "
            f"{a['max_abs_logit_diff']:.2e})",
            flush=True,
        )
    if args.device == "cuda":
        # this process's runtime was warmed when built; a server captures its graphs at first use
        out["warmup_statuses"] = {
            s: warm_server(srv, pool, args.max_batch, args.body, args.client_loop) for s, srv in servers.items()
        }
        for s, statuses in out["warmup_statuses"].items():
            bad = [b + 1 for b, st in enumerate(statuses) if st != 200]
            print(f"[{name}] {s}: warmed with batches 1-{args.max_batch}" + (f", not 200 at {bad}" if bad else ""))

    # light load: one request at a time over HTTP, and rt.infer at batch 1 here
    light: Dict[str, Any] = {"rt.infer": light_infer_ms(rt, pool[: args.pool], args.light_requests)}
    for s, srv in servers.items():
        r = closed_loop(
            srv.port, requests, 1, max_requests=20 + args.light_requests, warm_requests=20, loop_kind=args.client_loop
        )
        light[s] = {
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "requests": args.light_requests,
            "errors": r["errors"],
            "minus_infer_p50_ms": r["p50_ms"] - light["rt.infer"]["p50_ms"],
        }
    out["light_load"] = light
    for s, v in light.items():
        extra = f" ({v['minus_infer_p50_ms']:+.3f} ms over rt.infer)" if "minus_infer_p50_ms" in v else ""
        print(f"[{name}] light load {s:10s} p50 {v['p50_ms']:.3f} ms p99 {v['p99_ms']:.3f} ms{extra}", flush=True)

    # saturated: closed loop, sat_conns connections back to back, rotated repeats
    sat_runs: Dict[str, List[dict]] = {s: [] for s in names}
    for rep in range(args.sat_repeats):
        for s in rotated(names, rep):
            srv = servers[s]
            srv.wait_idle(args.drain_s)
            r = closed_loop(
                srv.port,
                requests,
                args.sat_conns,
                seconds=args.sat_seconds,
                warm_s=0.3,
                loop_kind=args.client_loop,
                cpu_pid=srv.pid,
            )
            del r["bodies"], r["statuses"]
            sat_runs[s].append(r)
    sat: Dict[str, Any] = {}
    for s, runs in sat_runs.items():
        sat[s] = {
            "req_per_s": statistics.median(r["req_per_s"] for r in runs),
            "runs": [round(r["req_per_s"]) for r in runs],
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            **{k: statistics.median(r[k] for r in runs) for k in CPU_KEYS},
            "tcp_retransmits": sum(r["tcp_retransmits"] for r in runs),
            "connections": args.sat_conns,
        }
        print(
            f"[{name}] saturated over HTTP {s:10s} {sat[s]['req_per_s']:8.0f} req/s (runs {sat[s]['runs']}); CPU per "
            f"request: server {sat[s]['server_cpu_us_per_request']:.0f} us, generator "
            f"{sat[s]['client_cpu_us_per_request']:.0f} us; server {sat[s]['server_cores']:.2f} cores, other "
            f"processes {sat[s]['other_cores']:.2f}, steal {sat[s]['steal_cores']:.2f}",
            flush=True,
        )
    out["saturated"] = sat

    # the same schedulers in this process (serve_load's saturated run): what HTTP adds per request
    known = [s for s in names if s in INPROC_SYSTEMS and args.systems[s] == KNOWN_SYSTEMS[s]]
    if args.inproc_requests > 0 and known:
        torch.set_num_threads(1)
        inproc = saturated_capacity(
            known,
            lambda s: inproc_system(INPROC_SYSTEMS[s], model, rt, args.max_batch),
            pool,
            args.inproc_requests,
            args.sat_repeats,
        )
        for s, v in inproc.items():
            print(
                f"[{name}] saturated in-process {s:10s} {v['req_per_s']:8.0f} req/s; CPU per request: worker "
                f"thread {v['worker_us']:.0f} us, submitting thread {v['submit_us']:.0f} us",
                flush=True,
            )
        out["saturated_in_process"] = inproc

    # the open-loop grid at fractions of ee-req's saturated req/s (else stage's, else the first's)
    base = next((s for s in ("ee-req", "stage") if s in sat), names[0] if names else None)
    if base is None:
        out.update(rows=[], rates=[], base_system=None, max_sustained_rate={})
        return out
    rates = [round(f * sat[base]["req_per_s"], 1) for f in args.fractions]
    out.update(base_system=base, base_req_per_s=sat[base]["req_per_s"], rates=rates)
    print(f"[{name}] open loop at {args.fractions} x {base}'s saturated req/s: {rates}", flush=True)

    def reference_ms():
        return median_call_ms(lambda x: plain_forward(model, x), pool[0], iters=60)

    rows = []
    for i, rate in enumerate(rates):
        ref_before = reference_ms()
        cell: Dict[str, List[dict]] = {s: [] for s in names}
        for rep in range(args.repeats):
            for s in rotated(names, rep):
                srv = servers[s]
                if not srv.alive():
                    continue
                srv.wait_idle(args.drain_s)
                before = _stats(srv)
                r = open_loop(
                    srv.port,
                    requests,
                    rate,
                    args.seconds,
                    args.max_requests,
                    args.drain_s,
                    seed=i * 1000 + rep,
                    max_conns=args.max_conns,
                    preopen=args.preopen,
                    loop_kind=args.client_loop,
                    cpu_pid=srv.pid,
                )
                after = _stats(srv)
                if "batches" in before and "batches" in after:
                    r["mean_batch_per_stage"] = mean_batches(before, after)
                cell[s].append(r)
        slo = 10 * (ref_before + reference_ms()) / 2
        for s in names:
            if not cell[s]:
                continue
            row = median_of(cell[s])
            row.update(system=s, slo_ms=slo, sustained=sustained(row, slo))
            rows.append(row)
            print(
                f"  {s:10s} rate {rate:8.1f}/s thr {row['throughput']:8.1f}/s p50 {row['p50_ms']:8.2f} ms p99 "
                f"{row['p99_ms']:9.2f} ms (SLO {slo:.2f}) {'ok' if row['sustained'] else '--'}"
                f" errors {row['errors']} server {row['server_cpu_us_per_request']:.0f} us/req"
                f" others {row['other_cores']:.2f} cores, {row['tcp_retransmits']:.0f} TCP retransmits"
                + (f" batches {row.get('mean_batch_per_stage')}" if "mean_batch_per_stage" in row else "")
                + (f" (p99 of {len(row['repeats'])} runs: {row['repeats']})" if len(row["repeats"]) > 1 else ""),
                flush=True,
            )
    out["rows"] = rows
    out["slo_p99_ms_range"] = [min(r["slo_ms"] for r in rows), max(r["slo_ms"] for r in rows)] if rows else []
    out["sustained_rates"] = {
        s: [r["offered_rate"] for r in rows if r["system"] == s and r["sustained"]] for s in names
    }
    out["max_sustained_rate"] = {s: max(v, default=0.0) for s, v in out["sustained_rates"].items()}
    out["stats_after_grid"] = {s: _stats(srv) for s, srv in servers.items()}
    for s, srv in servers.items():
        if not srv.alive():
            out.setdefault("died", {})[s] = f"exit code {srv.proc.returncode if srv.proc else None}"
    return out


# --------------------------------------------------------------------------- output
def markdown(doc: dict) -> str:
    nan = float("nan")
    model_device = doc.get("model_device", {"device": "cpu", "name": doc["device"]["device"]})
    lines = [
        f"# Serving over HTTP, open loop (models on {model_device['device']}: {model_device['name']}; torch "
        f"{doc['device']['torch']}, {doc['date']})",
        "",
        doc["note"],
        "",
    ]
    for res in doc["results"]:
        lines += [
            f"## {res['model']} (exit fractions {res['exit_fractions']}, max_batch {res['max_batch']}, "
            f"{res['body']} bodies of {res['request_bytes']} bytes)",
            "",
            "Systems: "
            + "; ".join(
                f"{s} `{' '.join(v['options']) or '(defaults)'}`"
                + ("" if v["available"] else f" **unavailable**: {v.get('reason', '')}")
                for s, v in res["systems"].items()
            ),
            "",
        ]
        if "plain_batch1_ms" not in res:
            continue
        tol = ANSWER_TOLERANCE[res.get("device", "cpu")]
        lines += [
            f"plain batch-1 {res['plain_batch1_ms']:.3f} ms, rt.infer batch-1 {res['infer_batch1_ms']:.3f} ms (this "
            "process); SLO p99 <= 10x plain batch-1, measured around each rate: "
            + ("{:.2f}-{:.2f} ms".format(*res["slo_p99_ms_range"]) if res.get("slo_p99_ms_range") else "-"),
            "",
            f"Answers over HTTP vs rt.infer on the same device (logits within {tol['atol']:.0e}"
            + (f", relative {tol['rtol']:.0e}" if tol["rtol"] else "")
            + "): "
            + "; ".join(
                f"{s}: {'agree' if a.get('agree', True) else '**DISAGREE**'}, exit index "
                f"{'equal' if a['exit_index_equal'] else 'DIFFERENT'} on {a['samples']} samples"
                + (
                    f" ({a['near_threshold_exits']} within float noise of a threshold)"
                    if a.get("near_threshold_exits")
                    else ""
                )
                + f", max |logit diff| {a['max_abs_logit_diff']:.1e}"
                for s, a in res["answers"].items()
            ),
            "",
            "Light load, one request at a time (closed loop, one connection; rt.infer at batch 1 in this process on "
            "the same samples):",
            "",
            "| path | p50 ms | p99 ms | p50 minus rt.infer's ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        for s, v in res["light_load"].items():
            lines.append(
                f"| {s} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v.get('minus_infer_p50_ms', nan):+.3f} |".replace(
                    "+nan", "-"
                )
            )
        inproc = res.get("saturated_in_process", {})
        lines += [
            "",
            f"Saturated (closed loop, {doc['args']['sat_conns']} connections back to back, median of the rotated runs; "
            "CPU time per answered request of the whole server process and of the generator, the cores the server "
            "and every other process (not the server, not the generator) used on average; in-process: serve_load's "
            "saturated run of the same scheduler, its worker thread's CPU per request):",
            "",
            "| system | HTTP req/s | runs | p50 ms | p99 ms | server CPU us/req | server cores | generator CPU us/req | "
            "other processes' cores | in-process req/s | in-process worker us/req |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s, v in res["saturated"].items():
            ip = inproc.get(s, {})
            lines.append(
                f"| {s} | {v['req_per_s']:.0f} | {v['runs']} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                f"{v['server_cpu_us_per_request']:.0f} | {v['server_cores']:.2f} | {v['client_cpu_us_per_request']:.0f} | "
                f"{v['other_cores']:.2f} | {ip.get('req_per_s', nan):.0f} | {ip.get('worker_us', nan):.0f} |".replace(
                    "nan", "-"
                )
            )
        if res.get("base_system"):
            lines += [
                "",
                f"Open loop at {doc['args']['fractions']} x {res['base_system']}'s saturated "
                f"{res['base_req_per_s']:.0f} req/s; the median-p99 run of {doc['args']['repeats']} per cell "
                "(systems rotated); latency from the scheduled arrival; errors: not answered 200; errors, client queued and TCP retransmits (the machine's, /proc/net/snmp) summed over the runs, the CPU figures their medians.",
                "",
                "Highest sustained rate (p99 <= SLO, every request answered): "
                + ", ".join(f"{s} {v:.0f}/s" for s, v in res["max_sustained_rate"].items()),
                "",
                "| offered /s | system | throughput /s | p50 ms | p99 ms | SLO ms | sustained | answered/sent | errors | "
                "send lag p50 / p99 ms | conns | client queued | server CPU us/req | generator CPU us/req | "
                "other processes' cores | TCP retransmits | mean batch per stage | p99 of each run |",
                "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                "| ---: | --- | --- |",
            ]
            for r in res["rows"]:
                lines.append(
                    f"| {r['offered_rate']:.0f} | {r['system']} | {r['throughput']:.0f} | {r['p50_ms']:.2f} | "
                    f"{r['p99_ms']:.2f} | {r['slo_ms']:.2f} | {'yes' if r['sustained'] else 'no'} | "
                    f"{r['answered']}/{r['sent']} | {r['errors']} | {r['send_lag_p50_ms']:.2f} / {r['send_lag_p99_ms']:.2f} | "
                    f"{r['max_connections']} | {r['client_queued']} | {r['server_cpu_us_per_request']:.0f} | "
                    f"{r['client_cpu_us_per_request']:.0f} | {r['other_cores']:.2f} | {r['tcp_retransmits']:.0f} | "
                    f"{r.get('mean_batch_per_stage', '')} "
                    f"| {r['repeats']} |"
                )
        stats = res.get("stats_after_grid", {})
        if stats:
            lines += ["", "Each server's /stats after the grid (every request it answered in this run):", ""]
            for s, d in stats.items():
                if "batches" in d:
                    lines.append(
                        f"- {s}: {d['requests']['completed']} requests completed, {d['requests']['rejected']} "
                        f"rejected; batches per stage {d['batches']}, mean batch {[round(b, 2) for b in d['mean_batch']]}, "
                        f"worker overhead {d['overhead_ms_per_batch']:.3f} ms/batch"
                    )
        lines.append("")
    return "\n".join(lines)


def plot(results: list, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [r for r in results if r.get("rows")]
    if not results:
        return
    fig = Figure(figsize=(6.0 * len(results), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for j, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), j + 1)
        for system in dict.fromkeys(r["system"] for r in res["rows"]):
            pts = [r for r in res["rows"] if r["system"] == system and math.isfinite(r["p99_ms"])]
            ax.plot([r["throughput"] for r in pts], [r["p99_ms"] for r in pts], "o-", label=f"{system} p99")
        lo, hi = res["slo_p99_ms_range"]
        ax.axhspan(lo, hi, color="grey", alpha=0.2, lw=0, label=f"SLO (10x plain batch-1) {lo:.1f}-{hi:.1f} ms")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s answered 200)")
        ax.set_ylabel("p99 latency (ms), from the scheduled arrival")
        ax.set_title(f"{res['model']} over HTTP: latency vs throughput")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_results(stem: Path, args, info: dict, date: str, results: list, load_before) -> None:
    from common import device_name
    from serve_load import _finite

    doc = {
        "device": info,
        "date": date,
        "argv": sys.argv[1:],
        "args": {
            k: getattr(args, k)
            for k in (
                "seconds",
                "max_requests",
                "drain_s",
                "repeats",
                "fractions",
                "max_batch",
                "body",
                "max_conns",
                "preopen",
                "sat_conns",
                "sat_seconds",
                "sat_repeats",
                "light_requests",
                "client_loop",
                "device",
            )
        },
        "model_device": {"device": args.device, "name": device_name(args.device)},
        "client_loop": loop_name(args.client_loop),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "results": results,
        "note": f"Over HTTP on 127.0.0.1: each server a `python -m eeruntime serve` process (OMP_NUM_THREADS=1, "
        f"--device {args.device}), the load generator this process's event loop; both on {device_name('cpu')}"
        + (
            f", the models (the servers', rt.infer's and the in-process references') on {device_name('cuda')}: "
            "this process's graphs captured and every batch size run before traffic, each server sent one "
            "request of every batch size after the answers' check"
            if args.device == "cuda"
            else ""
        )
        + f"; torch {info['torch']}. Load average {load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
    }
    stem.with_suffix(".json").write_text(json.dumps(_finite(doc), indent=1, allow_nan=False))
    stem.with_suffix(".md").write_text(markdown(doc))
    plot(results, str(stem) + "-latency.png")
    print(f"wrote {stem}.json, .md, -latency.png", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="digits,resnet", help=f"comma-separated, of: {', '.join(FACTORIES)}")
    p.add_argument(
        "--systems",
        default=DEFAULT_SYSTEMS,
        help=f"comma-separated: names of {', '.join(KNOWN_SYSTEMS)} or NAME=SERVER_OPTIONS",
    )
    p.add_argument(
        "--fractions",
        default="0.25,0.5,0.75,0.85,0.95,1.0",
        help="open-loop rates as fractions of ee-req's saturated req/s over HTTP (stage's without ee-req)",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="arrivals per open-loop run (bounded by --max-requests)")
    p.add_argument("--max-requests", type=int, default=6000)
    p.add_argument("--drain-s", type=float, default=10.0, help="after the arrivals, how long to wait for answers")
    p.add_argument("--repeats", type=int, default=3, help="runs per (rate, system), rotated; the median-p99 is shown")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--body", choices=("safetensors", "json"), default="safetensors")
    p.add_argument("--max-conns", type=int, default=512, help="connections at most; beyond, requests queue here")
    p.add_argument("--preopen", type=int, default=64, help="connections opened before each open-loop run")
    p.add_argument("--sat-conns", type=int, default=64, help="connections of the saturated closed loop")
    p.add_argument("--sat-seconds", type=float, default=3.0)
    p.add_argument("--sat-repeats", type=int, default=None, help="saturated runs per system (default: --repeats)")
    p.add_argument("--light-requests", type=int, default=200, help="requests of the light-load closed loop")
    p.add_argument(
        "--inproc-requests", type=int, default=2000, help="requests of the in-process saturated reference (0: none)"
    )
    p.add_argument("--pool", type=int, default=64, help="distinct samples the requests cycle through")
    p.add_argument("--check-samples", type=int, default=8, help="samples whose HTTP answers are checked")
    p.add_argument(
        "--client-loop",
        choices=("asyncio", "uvloop", "auto"),
        default="asyncio",
        help="the generator's event loop (auto: uvloop where installed); see open_loop's arrivals",
    )
    p.add_argument(
        "--before",
        metavar="REV",
        help="also run every system with the eeruntime of git revision REV (named NAME@REV), side by side with "
        "today's: the before/after of a change to the server or the scheduler",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the models run: every server's --device, and this process's rt.infer and in-process "
        "references (the load generator stays on the CPU)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: digits, two rates, 0.5 s each, one repeat")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="", help="appended to the output files' names")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # said here, before a tree is extracted or a server started
            p.error(f"--device cuda: CUDA is not available (torch {torch.__version__} sees no CUDA device)")
    if args.quick:
        args.models, args.fractions, args.seconds, args.repeats = "digits", "0.5,1.0", 0.5, 1
        args.sat_seconds, args.light_requests, args.inproc_requests, args.drain_s = 0.5, 50, 200, 5.0
    if args.sat_repeats is None:
        args.sat_repeats = args.repeats
    try:
        args.systems = parse_systems(args.systems)
    except ValueError as e:
        p.error(str(e))
    args.trees = {}
    if args.before:
        try:
            tree = tree_at(args.before, Path(tempfile.mkdtemp(prefix="serve-http-before-")))
        except subprocess.CalledProcessError as e:
            p.error(f"--before {args.before}: git archive failed: {e.stderr.decode(errors='replace').strip()}")
        try:
            server_device(args.device, tree)
        except ValueError as e:
            p.error(f"--before {args.before} with --device {args.device}: {e}; name a later revision or --device cpu")
        for name, opts in list(args.systems.items()):
            args.systems[f"{name}@{args.before}"] = opts
            args.trees[f"{name}@{args.before}"] = tree
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    unknown = {m for m in args.models.split(",")} - set(FACTORIES)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; accepted: {', '.join(FACTORIES)}")
    if min(args.repeats, args.sat_repeats, args.max_conns, args.sat_conns, args.pool, args.light_requests) < 1:
        p.error("--repeats, --sat-repeats, --max-conns, --sat-conns, --pool and --light-requests must be >= 1")
    if not all(f > 0 for f in args.fractions) or not args.seconds > 0:
        p.error("--fractions and --seconds must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from serve_load import run_models

    from eeruntime.serve import set_switch_interval

    torch.set_num_threads(1)
    set_switch_interval(1e-4)  # as serve_load and eeruntime serve: for the in-process reference
    run_models("serve-http", args, lambda m: run_model(m, args), write_results)
    gc.unfreeze()  # run_model froze what was loaded; extension types complain of frozen objects at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
