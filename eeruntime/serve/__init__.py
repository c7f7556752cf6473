"""Serving: the stage scheduler (``ee.serve.StageScheduler``), the HTTP server
(``python -m eeruntime serve``) and the LitServe adapter. See docs/serving.md."""
from .scheduler import ROW_BITS, SchedulerClosed, SchedulerError, SchedulerFull, StageFailed, StageScheduler
from .stats import SchedulerStats, prometheus_text

__all__ = ["StageScheduler", "SchedulerError", "SchedulerFull", "SchedulerClosed", "StageFailed",
           "SchedulerStats", "prometheus_text", "ROW_BITS"]
