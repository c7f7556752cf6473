"""eeruntime: batched early-exit inference for PyTorch classifiers.

import eeruntime as ee
model = ee.MultiExitModel(stages=[s1, s2, s3], exits=[e1, e2, e3])
rt = ee.EERuntime(model, thresholds=[0.3, 0.5], criterion="entropy")
logits = rt(x)
"""

from . import (
    exit_rules,
    ops,
    plot,
    serve,  # noqa: E402  (after the runtime it schedules; fastapi is imported only by its server)
    train,
)
from .attach import SplitPoint, attach_exits, split_points
from .calibrate import calibrate
from .cost import CostModel, measure_costs
from .io import load
from .model import MultiExitModel
from .runtime import EERuntime, InferenceResult, StageResult
from .stats import RuntimeStats

__version__ = "0.1.0"

__all__ = [
    "MultiExitModel",
    "EERuntime",
    "InferenceResult",
    "StageResult",
    "RuntimeStats",
    "CostModel",
    "measure_costs",
    "ops",
    "attach_exits",
    "split_points",
    "SplitPoint",
    "train",
    "calibrate",
    "load",
    "plot",
    "exit_rules",
    "serve",
]
