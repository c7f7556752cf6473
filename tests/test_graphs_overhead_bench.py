"""bench/graphs_overhead.py (the no-exits gap of the CUDA-graph runtime, broken down): its CPU
smoke run, so the script a GPU session runs does not rot between device sessions."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def graphs_overhead(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("graphs_overhead", None)
    import graphs_overhead

    return graphs_overhead


def test_quick_run_writes_every_variant_and_the_parts(graphs_overhead, tmp_path):
    assert graphs_overhead.main(["--quick", "--out", str(tmp_path), "--tag=-t"]) == 0
    (js,) = tmp_path.glob("graphs-overhead-*-t.json")
    doc = json.loads(js.read_text())
    nchw, row = doc["rows"]  # one per layout: contiguous, then channels_last
    assert (nchw["layout"], row["layout"]) == ("contiguous", "channels_last")
    assert row["batch"] == 8 and set(row["ms"]) == set(graphs_overhead.VARIANTS)
    assert all(v > 0 for v in row["ms"].values()) and row["ratio_to_plain_graph"]["plain_graph"] == 1.0
    # nothing exits: reading every count, the runner waits after every stage but the last; with
    # launch-ahead (the counts never shrank the bucket) it waits once, at the end
    assert row["host_syncs_per_call_read_all"] == 3 and row["host_syncs_per_call"] == 1
    parts = row["parts_of_plain_graph"]
    r = row["ratio_to_plain_graph"]
    # the parts add up to the whole gap, less the graph boundaries (measured beside, not on the path)
    assert sum(v for k, v in parts.items() if k != "graph_boundaries") == pytest.approx(r["runtime_read_all"] - 1)
    assert row["launch_ahead_gain"] > 0
    md = js.with_suffix(".md").read_text()
    assert "| channels_last | 8 |" in md and "no CUDA device: no kernel table" in md
