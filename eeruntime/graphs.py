"""Old import path of :mod:`eeruntime.runtime.graphs` (the CUDA-graph executor), kept so that
``from eeruntime.graphs import GraphRunner`` keeps working; new code imports the runtime package."""

from .runtime.graphs import *  # noqa: F403  (its public names)
from .runtime.graphs import __all__  # noqa: F401
