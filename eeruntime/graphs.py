"""Old import path of :mod:`eeruntime.runtime.graphs` (the CUDA-graph executor), kept so that
``from eeruntime.graphs import GraphRunner`` keeps working; new code imports the runtime package."""

from .runtime.graphs import (
    CAPTURE_SAFE_BACKENDS,
    GraphRunner,
    autocast_state,
    bucket_for,
    check_buckets,
    chunk_bounds,
    compact_into_nosync,
    default_buckets,
    graphs_supported,
    scatter_rows_nosync,
)

__all__ = [
    "CAPTURE_SAFE_BACKENDS",
    "GraphRunner",
    "autocast_state",
    "bucket_for",
    "check_buckets",
    "chunk_bounds",
    "compact_into_nosync",
    "default_buckets",
    "graphs_supported",
    "scatter_rows_nosync",
]
