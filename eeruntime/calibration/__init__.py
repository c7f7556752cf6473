"""Calibration internals: the cached model pass and the threshold searches behind ``ee.calibrate``.

``cache`` (one model pass, scores and correctness per exit), ``search`` (candidates, exact
evaluation, grid and coordinate search), ``costs`` (FLOPs or latency per exit), and one module
per method: ``greedy``, ``accuracy``, ``budget``, ``sweep``.
"""

from .cache import Outcome, ScoreCache, build_cache

__all__ = ["ScoreCache", "Outcome", "build_cache"]
