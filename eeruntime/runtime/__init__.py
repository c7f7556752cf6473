"""The runtime: :class:`EERuntime` and the machinery under it (see docs/design.md, "Layout").

- ``api``: ``EERuntime``, the public object (checks, thresholds, stats; hands calls to executors)
- ``spec``: ``RunSpec``, what an executor needs (model, scorer, final mode, pack backend)
- ``loop``: the stage loop, written once
- ``step``: the stage step ``run_stage`` (the public seam) and ``StageResult``
- ``executors``: the eager passes (dispatched ops; fused CPU ops)
- ``graphs``: the CUDA-graph executor (capture / replay of one step per stage and bucket)
- ``results``: ``InferenceResult``
"""

from ..criteria import FINAL_MODES
from ..state import cat_rows, take_rows
from .api import EERuntime
from .results import InferenceResult
from .step import StageResult

__all__ = ["EERuntime", "InferenceResult", "StageResult", "cat_rows", "take_rows", "FINAL_MODES"]
