"""Process-wide settings a server applies once its model is loaded (see docs/serving.md, "GC").

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
    return {
        "frozen_objects": gc.get_freeze_count(),
        "collections": [g["collections"] for g in gc.get_stats()],
        "collected": [g["collected"] for g in gc.get_stats()],
    }
