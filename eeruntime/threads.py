"""How many threads torch's CPU ops get in the demo and the command line.

torch starts one OpenMP thread per core. On a small machine that also runs anything else (a CI
runner, an editor, other jobs) those threads spin waiting for each other: the demo took 2 min 50 s
to 5 min 46 s on a busy 2-core VM with torch's default and 52 s with one thread. So the default
leaves a core free on machines of at most four CPUs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set; else one thread fewer than the CPUs on machines of at most
    four (1 on a 2-core machine), torch's own default (one per core) on larger ones."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    n = cpu_count()
    return max(1, min(torch.get_num_threads(), n - 1 if n <= 4 else n))


def check_threads(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    return n


@contextlib.contextmanager
def using_threads(n: Optional[int] = None):
    """Run the block with ``n`` torch threads (:func:`default_threads` when None); the caller's
    setting is restored afterwards."""
    n = default_threads() if n is None else check_threads(n)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
