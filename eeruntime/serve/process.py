"""Process-wide settings a server applies once its model is loaded (see docs/serving.md,
"Garbage collection" and "The GIL's switch interval").

Python's cyclic garbage collector runs a full collection once enough objects have survived the
younger generations, and a full collection walks every tracked object in the process while it
holds the GIL. With torch (and triton) imported that is about 300,000 objects: a 0.23 s pause on
the 2-core VM of bench/results/serve-amd-*, during which no request moves. Under load a
scheduler keeps thousands of objects alive (pending requests, futures, rows), so such pauses come
about once per few thousand requests and set the p99. ``gc.freeze()`` moves every object alive
now into a permanent generation that collections skip: the pause then scales with what serving
allocated since, not with the libraries imported at start.
"""

from __future__ import annotations

import gc
import sys

# The interval after which a thread waiting for the GIL makes the holder drop it (CPython's
# default: 5 ms). The scheduler's worker lets the GIL go at every torch op; when a submitting
# thread (the load generator, an HTTP event loop) then runs Python, the worker waits for it up to
# this long before each of its next ops, and a burst of arrivals can stall it for milliseconds
# per op. 0.1 ms bounds that wait (bench/results/serve-amd-2026-11-26-session6*.md).
SERVING_SWITCH_INTERVAL_S = 1e-4


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object alive now (the imported libraries, the model) out of
    the cyclic collector's reach; returns how many objects are frozen. Call it after the model is
    loaded and before traffic; calling it again freezes what was created in between too.

    The frozen objects are never freed by the cyclic collector (reference counting still frees
    them): call it once the startup garbage is gone, which the ``gc.collect()`` here ensures."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def gc_stats() -> dict:
    """The collector's counters, for a server's stats: frozen objects, and collections and
    collected objects per generation since the process started."""
    generations = gc.get_stats()
    return {
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "frozen_objects": gc.get_freeze_count(),
        "collections": [g["collections"] for g in generations],
        "collected": [g["collected"] for g in generations],
    }


def set_switch_interval(seconds: float = SERVING_SWITCH_INTERVAL_S) -> float:
    """Set the interpreter's thread switch interval (``sys.setswitchinterval``) for a serving
    process; returns the previous one. Process-wide: call it in a process that serves, not in a
    library user's process unasked."""
    if not seconds > 0:
        raise ValueError(f"the switch interval must be > 0 seconds, got {seconds!r}")
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    return before
