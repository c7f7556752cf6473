"""Serving: the stage scheduler (``ee.serve.StageScheduler``), the HTTP server
(``python -m eeruntime serve``), the LitServe adapter and the TorchServe handler
(``eeruntime.serve.litserve_api``, ``eeruntime.serve.torchserve_handler``); Ray Serve in ``eeruntime.serve.ray``. See docs/serving.md."""

from .process import freeze_startup_objects, gc_stats, set_switch_interval
from .scheduler import ROW_BITS, SchedulerClosed, SchedulerError, SchedulerFull, StageFailed, StageScheduler
from .stats import SchedulerStats, prometheus_text

__all__ = [
    "StageScheduler",
    "SchedulerError",
    "SchedulerFull",
    "SchedulerClosed",
    "StageFailed",
    "SchedulerStats",
    "prometheus_text",
    "ROW_BITS",
    "freeze_startup_objects",
    "gc_stats",
    "set_switch_interval",
]
