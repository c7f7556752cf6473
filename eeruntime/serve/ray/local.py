"""Starting a local Ray instance for the CLI, the tests and the benchmark."""

from __future__ import annotations

import time
from typing import Dict, Optional


def start_local_ray(
    resources: Optional[Dict[str, float]] = None, num_cpus: Optional[int] = None, attempts: int = 3, **kwargs
) -> None:
    """``ray.init`` of a new local instance on 127.0.0.1 without the dashboard.

    On a heavily loaded machine Ray's own start can fail: the raylet waits a fixed 15 s for
    its metrics agent (a Python process with heavy imports) to write its port file and aborts
    when it does not, so the driver sees "The current node timed out during startup". A failed
    start is retried (``attempts`` in all; the first one has warmed the page cache) after the
    half-started processes are shut down; then :class:`RayStartError` says why."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(
                num_cpus=num_cpus, resources=resources, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs
            )
            return
        except Exception as e:  # noqa: BLE001 - only the startup timeout is retried
            ray.shutdown()
            if "timed out during startup" not in str(e):
                raise
            if attempt == attempts - 1:
                raise RayStartError(
                    f"Ray could not start a local node in {attempts} attempts ({e}); the machine is probably "
                    "too loaded for the raylet's fixed 15 s wait on its metrics agent"
                ) from e
            time.sleep(2.0)


class RayStartError(RuntimeError):
    """A local Ray node did not come up (Ray's own startup timeouts)."""
