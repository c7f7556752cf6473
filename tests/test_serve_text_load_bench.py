"""bench/serve_text_load.py: its padding collate against a hand-built batch, and a smoke run whose
report holds every system, each checked against rt.infer before it was timed."""

import gc
import json
import pathlib
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("transformers", reason="transformers is an optional dependency (make test installs it)")

import serve_text_load  # noqa: E402


def test_pad_collate_pads_each_request_to_the_longest_as_a_tokenizer_does():
    reqs = [(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.int64)), (torch.tensor([[9]]), torch.ones(1, 1))]
    ids, mask = serve_text_load.pad_collate(reqs)
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_texts_have_the_asked_lengths_and_no_padding():
    for ids, mask in serve_text_load.texts(50, 3, 9, seed=0):
        assert ids.shape == mask.shape and 3 <= ids.shape[1] <= 9 and bool(mask.all()) and int(ids.min()) >= 1


def test_a_request_batcher_runs_its_collate():
    from serve_load import RequestBatcher

    b = RequestBatcher(lambda x: x[0] * 10, 8, collate=serve_text_load.pad_collate)
    try:
        got = b.submit_nowait((torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.int64))).result(30)
    finally:
        b.close()
    assert got.tolist() == [[10, 20]]


def test_quick_run_reports_every_system_checked_against_rt_infer(tmp_path):
    t0 = time.perf_counter()
    switch = sys.getswitchinterval()
    try:
        assert serve_text_load.main(["--quick", "--out", str(tmp_path), "--max-len", "24", "--pad-to", "12,24"]) == 0
    finally:  # (the run sets the process up as a server's: undone for the other tests)
        sys.setswitchinterval(switch)
        gc.unfreeze()
    doc = json.loads(next(tmp_path.glob("serve-text-*-quick.json")).read_text())
    assert set(doc["saturated"]) == set(serve_text_load.SYSTEMS) == set(doc["correctness"])
    assert all(c["max_abs_logit_diff"] < 1e-4 for c in doc["correctness"].values())
    assert all(r["req_per_s"] > 0 and r["ratio_to_ee_req_pad"] > 0 for r in doc["saturated"].values())
    assert [c["fraction"] for c in doc["open_loop"]] == [0.5]
    assert "| stage-pad |" in next(tmp_path.glob("serve-text-*-quick.md")).read_text()
    assert time.perf_counter() - t0 < 300


def test_saturated_ratios_pair_each_run_with_ee_req_pads_run_next_to_it():
    sat = {"ee-req-pad": {"runs": [100, 200, 50]}, "stage-pad": {"runs": [150, 200, 100]}}
    serve_text_load.with_ratios(sat)
    assert sat["stage-pad"]["ratio_to_ee_req_pad"] == 1.5 and sat["ee-req-pad"]["ratio_to_ee_req_pad"] == 1.0
