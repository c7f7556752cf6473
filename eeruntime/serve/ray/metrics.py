"""A replica's statistics, exported as Ray Serve metrics (``ray.serve.metrics``; counters get Ray's ``_total`` suffix: Prometheus
through Ray's metrics agent, tagged with the deployment and replica) and kept as a plain dict for
``stats()`` calls. Both are updated by the same call, so what a scrape shows is what ``stats()``
returns."""

from __future__ import annotations

import threading
from typing import Dict, List, Sequence

# Histogram bucket edges: rows per batch, milliseconds, bytes.
_ROWS: List[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
_BYTES: List[float] = [256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216]


class ReplicaMetrics:
    def __init__(self, num_exits: int, tier: int = 0):
        from ray.serve import metrics

        self.num_exits = num_exits
        self.tier = tier
        self._lock = threading.Lock()
        self._exit_counts = [0] * num_exits
        self._requests = 0
        self._rows = 0
        self._batches = 0
        self._batch_rows: List[int] = []
        self._sent_rows = 0
        self._sent_bytes = 0
        self._sent_requests = 0
        self._errors = 0
        self._retries = 0
        tags = {"tier": str(tier)}
        self._m_requests = metrics.Counter("eeruntime_requests", "requests answered", tag_keys=("tier",))
        self._m_rows = metrics.Counter("eeruntime_rows", "rows that entered this tier", tag_keys=("tier",))
        self._m_exits = metrics.Counter("eeruntime_exits", "rows that left at each exit", tag_keys=("tier", "exit"))  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        self._m_errors = metrics.Counter("eeruntime_errors", "requests failed", tag_keys=("tier",))
        self._m_retries = metrics.Counter(
            "eeruntime_retries", "survivors sent again after the next tier's replica died", tag_keys=("tier",)
        )
        self._m_batch = metrics.Histogram(
            "eeruntime_batch_rows", "rows per batch", boundaries=_ROWS, tag_keys=("tier",)
        )
        self._m_latency = metrics.Histogram(
            "eeruntime_batch_ms", "compute time per batch (ms)", boundaries=_MS, tag_keys=("tier",)
        )
        self._m_sent = metrics.Histogram(
            "eeruntime_transfer_bytes",
            "bytes of survivor state sent to the next tier per request",
            boundaries=_BYTES,
            tag_keys=("tier",),
        )
        self._m_transfer = metrics.Histogram(
            "eeruntime_transfer_ms",
            "time from send to the next tier's receipt (ms)",
            boundaries=_MS,
            tag_keys=("tier",),
        )
        self._m_thr = metrics.Gauge(
            "eeruntime_threshold",
            "current threshold per early exit",
            tag_keys=("tier", "exit"),  # type: ignore[arg-type]  # Ray annotates Tuple[str] though it takes any number
        )
        for m in (
            self._m_requests,
            self._m_rows,
            self._m_errors,
            self._m_retries,
            self._m_batch,
            self._m_latency,
            self._m_sent,
            self._m_transfer,
        ):
            m.set_default_tags(dict(tags))  # a copy each: Ray adds its own tags to the dict

    def batch(self, rows: int, exits_per_exit: Sequence[int], seconds: float) -> None:
        with self._lock:
            self._batches += 1
            self._rows += rows
            self._batch_rows.append(rows)
            del self._batch_rows[:-1000]
            for k, c in enumerate(exits_per_exit):
                self._exit_counts[k] += int(c)
        if rows:  # (Ray's Counter.inc refuses 0: a request of 0 rows would fail on its metrics)
            self._m_rows.inc(rows)
        self._m_batch.observe(rows)
        self._m_latency.observe(seconds * 1e3)
        for k, c in enumerate(exits_per_exit):
            if c:
                self._m_exits.inc(int(c), tags={"tier": str(self.tier), "exit": str(k)})

    def request(self, ok: bool = True) -> None:
        with self._lock:
            if ok:
                self._requests += 1
            else:
                self._errors += 1
        (self._m_requests if ok else self._m_errors).inc()

    def sent(self, rows: int, nbytes: int) -> None:
        with self._lock:
            self._sent_requests += 1
            self._sent_rows += rows
            self._sent_bytes += nbytes
        self._m_sent.observe(nbytes)

    def retried(self) -> None:
        with self._lock:
            self._retries += 1
        self._m_retries.inc()

    def received(self, transfer_ms: float) -> None:
        self._m_transfer.observe(transfer_ms)

    def thresholds(self, values: Sequence[float]) -> None:
        for k, v in enumerate(values):
            self._m_thr.set(float(v), tags={"tier": str(self.tier), "exit": str(k)})

    def snapshot(self) -> Dict:
        with self._lock:
            sizes = list(self._batch_rows)
            return {
                "tier": self.tier,
                "requests": self._requests,
                "errors": self._errors,
                "retries": self._retries,
                "rows": self._rows,
                "batches": self._batches,
                "exit_counts": list(self._exit_counts),
                "mean_batch_rows": (sum(sizes) / len(sizes)) if sizes else 0.0,
                "sent_requests": self._sent_requests,
                "sent_rows": self._sent_rows,
                "sent_bytes": self._sent_bytes,
            }
