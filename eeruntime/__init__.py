"""eeruntime: batched early-exit inference for PyTorch classifiers.

    import eeruntime as ee
    model = ee.MultiExitModel(stages=[s1, s2, s3], exits=[e1, e2, e3])
    rt = ee.EERuntime(model, thresholds=[0.3, 0.5], criterion="entropy")
    logits = rt(x)
"""
from . import ops
from .cost import CostModel, measure_costs
from .model import MultiExitModel
from .runtime import EERuntime, InferenceResult
from .stats import RuntimeStats

__version__ = "0.1.0"

__all__ = [
    "MultiExitModel", "EERuntime", "InferenceResult", "RuntimeStats", "CostModel", "measure_costs", "ops",
]

# Optional parts arrive through their own modules; each import is guarded so the core stays usable.
try:  # noqa: SIM105
    from .attach import attach_exits  # noqa: F401

    __all__.append("attach_exits")
except ImportError:  # pragma: no cover
    pass
try:
    from . import train  # noqa: F401

    __all__.append("train")
except ImportError:  # pragma: no cover
    pass
try:
    from .calibrate import calibrate  # noqa: F401
    from .io import load  # noqa: F401

    __all__ += ["calibrate", "load"]
except ImportError:  # pragma: no cover
    pass
try:
    from . import plot  # noqa: F401  (matplotlib is imported inside the plotting functions)

    __all__.append("plot")
except ImportError:  # pragma: no cover
    pass
