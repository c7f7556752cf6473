"""Starting a local Ray instance for the CLI, the tests and the benchmark."""
from __future__ import annotations

import time
from typing import Dict, Optional


def start_local_ray(resources: Optional[Dict[str, float]] = None, num_cpus: Optional[int] = None,
                    attempts: int = 3, **kwargs) -> None:
    """``ray.init`` of a new local instance on 127.0.0.1 without the dashboard.

    Ray gives a starting raylet a fixed 30 s to register with the GCS; on a loaded machine it
    can miss that window ("The current node timed out during startup"). The start is then
    retried (``attempts`` in all) after the half-started processes are shut down."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=False,
                     _node_ip_address="127.0.0.1", **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - only the startup timeout is retried
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(2.0)
