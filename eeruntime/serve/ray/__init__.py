"""eeruntime on Ray Serve (``pip install eeruntime[ray]``).

- :func:`runtime_app`: the drop-in deployment, the whole runtime per replica, ``@serve.batch``
  dynamic batching, thresholds hot-swapped through ``user_config``, stats as Ray Serve metrics.
- :func:`tiered_app`: stages grouped into tiers, each its own deployment with its own resources;
  only the survivors' state travels on (:mod:`eeruntime.serve.ray.tiers`).
- :class:`RuntimeSpec`: how replicas build the runtime (a model factory and a saved bundle).

The README's "Scale-out with Ray" section shows the design, the commands and the results.
"""

try:
    import ray as _ray  # noqa: F401  (the package itself, not this module: absolute import)
    from ray import serve as _serve  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"eeruntime.serve.ray needs Ray Serve ({e}); install it with: pip install 'eeruntime[ray]'"
    ) from e

from .deployment import RuntimeReplica, runtime_app
from .spec import RuntimeSpec, resolve_factory
from .tiers import TierError, TierReplica, split_stages, tiered_app
from .wire import TRANSFER_DTYPES, Survivors

__all__ = [
    "RuntimeSpec",
    "resolve_factory",
    "runtime_app",
    "tiered_app",
    "split_stages",
    "RuntimeReplica",
    "TierReplica",
    "TierError",
    "Survivors",
    "TRANSFER_DTYPES",
]
