"""What the stage scheduler has done: requests, exits, batch sizes per stage, the worker's own
overhead, and latency percentiles over a window of recent requests; as a dict and in the
Prometheus text exposition format."""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Dict, Iterable, List, Optional, Tuple

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of sorted values (None for none): the smallest value with at least
    q % of the values at or below it (numpy's ``method="inverted_cdf"``)."""
    if not sorted_values:
        return None
    n = len(sorted_values)
    rank = math.ceil(q * n / 100.0 - 1e-9)  # (less rounding: 99.9 * 1000 / 100 is 999.0000000000001)
    return sorted_values[min(n, max(1, rank)) - 1]


class SchedulerStats:
    def __init__(self, num_stages: int, latency_window: int = 10000):
        self._lock = threading.Lock()
        self.num_stages = num_stages
        self.submitted = self.completed = self.rejected = self.timeouts = self.cancelled = 0
        self.stage_failures = 0
        self.exits = [0] * num_stages
        self.batches = [0] * num_stages
        self.rows = [0] * num_stages
        self.max_batch_seen = [0] * num_stages
        self.stage_seconds = [0.0] * num_stages
        self.overhead_seconds = 0.0  # worker time per batch outside the stage step (gather, cat, deliver)
        self.worker_batches = 0
        self.inline = 0  # requests run whole in the caller's thread (infer() on an idle scheduler)
        self.fused_batches = 0  # stage-0 batches the worker ran through every stage in one pass
        self.fused_fallbacks = 0  # of which a stage raised: run again step by step
        self.failure_reruns = 0  # failed steps of several requests' rows, run again one request at a time
        self.inline_seconds = 0.0
        self._latencies: deque = deque(maxlen=latency_window)

    def record_batch(self, k: int, n: int, exits: int, stage_s: float, total_s: float) -> None:
        with self._lock:
            self.batches[k] += 1
            self.rows[k] += n
            self.exits[k] += exits
            self.max_batch_seen[k] = max(self.max_batch_seen[k], n)
            self.stage_seconds[k] += stage_s
            self.overhead_seconds += total_s - stage_s
            self.worker_batches += 1

    def record_inline(self, exit_index: List[int], seconds: float) -> None:
        """A request run whole by ``rt.infer`` (one call): stage k ran on the rows that reached
        it, once, and the rows left where ``exit_index`` says."""
        counts = [0] * self.num_stages
        for e in exit_index:
            counts[e] += 1
        with self._lock:
            self._record_pass(counts)
            self.inline_seconds += seconds

    def record_fused(self, counts: List[int], stage_s: float, total_s: float) -> None:
        """A stage-0 batch the worker ran through every stage in one pass (``counts[k]`` rows
        left at exit k): stage k ran once on the rows that reached it."""
        with self._lock:
            self._record_pass(counts)
            self.stage_seconds[0] += stage_s  # (one call: its time is not split by stage)
            self.overhead_seconds += total_s - stage_s
            self.worker_batches += 1
            self.fused_batches += 1

    def _record_pass(self, counts: List[int]) -> None:
        reached = sum(counts)
        for k, c in enumerate(counts):
            if reached:
                self.batches[k] += 1
                self.rows[k] += reached
                self.max_batch_seen[k] = max(self.max_batch_seen[k], reached)
            self.exits[k] += c
            reached -= c

    def record_latency(self, seconds: float) -> None:
        self.record_latencies([seconds])

    def record_latencies(self, seconds: List[float]) -> None:
        with self._lock:
            self.completed += len(seconds)
            self._latencies.extend(seconds)

    def latency_percentiles_ms(self) -> Dict[str, Optional[float]]:
        """p50/p90/p99... of the recent latencies in ms (None for each while there are none)."""
        with self._lock:
            values = sorted(self._latencies)
        out: Dict[str, Optional[float]] = {}
        for q in PERCENTILES:
            p = percentile(values, q)
            out[f"p{q}"] = None if p is None else p * 1000.0
        return out

    def as_dict(self) -> dict:
        with self._lock:
            batches = self.worker_batches
            d = {
                "requests": {
                    "submitted": self.submitted,
                    "completed": self.completed,
                    "rejected": self.rejected,
                    "timeouts": self.timeouts,
                    "cancelled": self.cancelled,
                },
                "stage_failures": self.stage_failures,
                "exits": list(self.exits),
                "batches": list(self.batches),
                "mean_batch": [r / b if b else 0.0 for r, b in zip(self.rows, self.batches)],
                "max_batch_seen": list(self.max_batch_seen),
                "stage_seconds": list(self.stage_seconds),
                "overhead_ms_per_batch": 1000.0 * self.overhead_seconds / batches if batches else 0.0,
                "inline_requests": self.inline,
                "fused_batches": self.fused_batches,
                "fused_fallbacks": self.fused_fallbacks,
                "failure_reruns": self.failure_reruns,
            }
        d["latency_ms"] = self.latency_percentiles_ms()
        d["latency_window"] = self._latencies.maxlen
        return d


def _escape(text: str, quotes: bool = True) -> str:
    """A label value (or, without ``quotes``, a HELP text) as the text format requires: backslash,
    newline (and double quote) escaped."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quotes else text


def prometheus_text(d: dict, prefix: str = "eeruntime") -> str:
    """A ``stats_dict()`` in the Prometheus text exposition format (version 0.0.4)."""
    lines: List[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[Tuple[Dict[str, Any], Any]]) -> None:
        lines.append(f"# HELP {prefix}_{name} {_escape(help_, quotes=False)}")
        lines.append(f"# TYPE {prefix}_{name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{prefix}_{name}{lab} {'NaN' if value is None else repr(float(value))}")

    req = d["requests"]
    metric("requests_total", "counter", "Requests by outcome.", [({"outcome": k}, v) for k, v in req.items()])
    metric("stage_failures_total", "counter", "Stage steps that raised.", [({}, d["stage_failures"])])
    metric(
        "failure_reruns_total",
        "counter",
        "Failed steps of several requests' rows, run again one request at a time.",
        [({}, d["failure_reruns"])],
    )
    metric(
        "exits_total",
        "counter",
        "Rows that left at each exit.",
        [({"exit": str(k)}, v) for k, v in enumerate(d["exits"])],
    )
    metric(
        "batches_total",
        "counter",
        "Stage steps run per stage.",
        [({"stage": str(k)}, v) for k, v in enumerate(d["batches"])],
    )
    metric(
        "batch_rows_mean",
        "gauge",
        "Mean rows per stage step.",
        [({"stage": str(k)}, v) for k, v in enumerate(d["mean_batch"])],
    )
    metric(
        "queue_rows",
        "gauge",
        "Rows waiting at each stage.",
        [({"stage": str(k)}, v) for k, v in enumerate(d["queue_depths"])],
    )
    metric("pending_requests", "gauge", "Requests admitted and not answered.", [({}, d["pending_requests"])])
    metric(
        "overhead_ms_per_batch",
        "gauge",
        "Worker time per batch outside the stage step.",
        [({}, d["overhead_ms_per_batch"])],
    )
    metric(
        "inline_requests_total",
        "counter",
        "Requests run whole in the caller's thread (blocking infer on an idle scheduler).",
        [({}, d["inline_requests"])],
    )
    metric(
        "latency_ms",
        "gauge",
        f"Request latency percentiles over the last {d['latency_window']} requests.",
        # the quantile as a fraction, as Prometheus writes one (quantile="0.99"; /stats keeps "p99")
        [({"quantile": f"{int(k[1:]) / 100:g}"}, v) for k, v in d["latency_ms"].items()],
    )
    if "gc" in d:  # the server's process (eeruntime/serve/process.py)
        gcs = d["gc"]
        metric(
            "gc_frozen_objects", "gauge", "Objects frozen out of the cyclic GC at start.", [({}, gcs["frozen_objects"])]
        )
        metric(
            "gc_collections_total",
            "counter",
            "Cyclic GC collections per generation.",
            [({"generation": str(g)}, v) for g, v in enumerate(gcs["collections"])],
        )
    return "\n".join(lines) + "\n"
