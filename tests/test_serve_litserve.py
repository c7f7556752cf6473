"""The LitServe adapter: a real LitServer (its own processes) on 127.0.0.1 serving a bundle through
the stage scheduler; concurrent HTTP requests get rt.infer's answers, bad bodies a 4xx."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from serve_models import free_port

import eeruntime as ee
from eeruntime.zoo import digits_cnn

httpx = pytest.importorskip("httpx")
pytest.importorskip("litserve")

ROOT = Path(__file__).resolve().parents[1]


def test_litserve_adapter_serves_a_bundle(tmp_path):
    torch.manual_seed(7)
    rt = ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy")
    rt.save(tmp_path / "bundle", weights=True)
    port = free_port()
    script = textwrap.dedent(f"""
        import litserve as ls
        from eeruntime.serve.litserve_api import EarlyExitLitAPI
        api = EarlyExitLitAPI({str(tmp_path / "bundle")!r}, "eeruntime.zoo:digits_cnn", max_batch=8, max_defer_ms=2.0)
        ls.LitServer(api, accelerator="cpu", devices=1, timeout=60).run(
            host="127.0.0.1", port={port}, generate_client_file=False, log_level="warning")
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(1200):
                assert proc.poll() is None, proc.stderr.read()
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.1)
            x = torch.randn(24, 1, 8, 8)
            want = rt.infer(x)
            with ThreadPoolExecutor(6) as pool:
                answers = list(
                    pool.map(lambda i: c.post("/predict", json={"inputs": x[i : i + 3].tolist()}), range(0, 24, 3))
                )
            for i, r in zip(range(0, 24, 3), answers):
                assert r.status_code == 200, r.text
                assert r.json()["exit_index"] == want.exit_index[i : i + 3].tolist()
                torch.testing.assert_close(
                    torch.tensor(r.json()["logits"]), want.logits[i : i + 3], rtol=1e-4, atol=1e-5
                )
            bad = c.post("/predict", json={"inputs": [[1.0, 2.0], [3.0]]})
            assert bad.status_code == 422 and "rectangular" in bad.text and "Traceback" not in bad.text
            bad = c.post("/predict", json={"inputs": [[[[0.5] * 8] * 7 + [[0.5] * 7 + [False]]]]})
            assert bad.status_code == 422 and "inputs[0][0][7][7] is false" in bad.json()["detail"], bad.text
            # bodies that are not JSON: a 4xx saying so (LitServe's own `await request.json()` gave 500)
            json_h = {"content-type": "application/json"}
            for body, headers, status, words in [
                (b"{nope", json_h, 400, "not valid JSON"),
                (b"[" * 100_000, json_h, 400, "nested too deeply"),
                (b"\xff\xfe\x00{", json_h, 400, "not valid JSON"),
                (b"", json_h, 400, "not valid JSON"),
                (b"null", json_h, 422, '"inputs" field'),
                (b"hello", {"content-type": "text/plain"}, 415, "application/json"),
                (b"a=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
                (b"\0" * 16, {"content-type": "application/vnd.safetensors"}, 415, "application/json"),
            ]:
                r = c.post("/predict", content=body, headers=headers)
                assert r.status_code == status and words in r.json()["detail"], (body[:20], r.text)
                assert "Traceback" not in r.text
            # and the server still answers, the same rows as before
            r = c.post("/predict", json={"inputs": x[:3].tolist()})
            assert r.status_code == 200 and r.json()["exit_index"] == want.exit_index[:3].tolist()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize("given,defer_s", [((), 0.0), ((None,), 0.02), ((5.0,), 0.005)])
def test_litserve_adapter_defers_as_eeruntime_serve_does_unless_told(tmp_path, given, defer_s):
    """No deferral by default (as `eeruntime serve`: its event loop bursts requests, docs/serving.md
    "Bundles, the HTTP server and LitServe"); None gives the scheduler's own default (20 ms on a
    CPU); a number is passed on."""
    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    rt = ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy")
    rt.save(tmp_path / "bundle", weights=True)
    kw = {"max_defer_ms": given[0]} if given else {}
    api = EarlyExitLitAPI(tmp_path / "bundle", "eeruntime.zoo:digits_cnn", max_batch=8, **kw)
    switch = sys.getswitchinterval()
    api.setup("cpu")  # (also sets up the process as a server's: undone below for the other tests)
    try:
        assert api.sched.max_defer_s == pytest.approx(defer_s)
    finally:
        api.sched.close()
        sys.setswitchinterval(switch)
        gc.unfreeze()


@pytest.mark.parametrize(
    "options,words",
    [
        ({"max_batch": 0}, "max_batch must be an integer >= 1"),
        ({"max_rows": 0}, "max_rows must be an integer >= 1"),
        ({"max_queue_rows": 0}, "max_queue_rows must be an integer >= 1"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"timeout_s": float("nan")}, "timeout_s must be > 0"),
        ({"max_wait_ms": -1}, "max_wait_ms must be >= 0"),
        ({"max_wait_ms": float("inf")}, "max_wait_ms must be finite"),
        ({"max_defer_ms": float("inf")}, "max_defer_ms must be finite"),
        ({"max_defer_ms": "5"}, "max_defer_ms must be >= 0"),
        ({"policy": "fastest"}, "policy must be one of deepest, fill, request"),
        ({"policy": "fill", "max_defer_ms": 5.0}, "max_defer_ms applies to policy deepest"),
        ({"workers": 0}, "workers must be >= 1"),
    ],
)
def test_litserve_adapter_refuses_bad_options_when_constructed(tmp_path, options, words):
    """In the caller's process, naming the keyword: before, max_batch, policy and the like failed
    only in LitServe's worker once the model was loaded, and max_rows=0 or timeout_s=0 not at all
    (every request then got 413 or 504)."""
    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    with pytest.raises(ValueError, match=words):
        EarlyExitLitAPI(tmp_path / "bundle", "eeruntime.zoo:digits_cnn", **options)


def test_litserve_adapter_takes_workers_as_docs_serving_says(tmp_path):
    """docs/serving.md ("Several workers"): workers=N is "a LitServe option like the others"; the
    adapter refused it (TypeError) and its scheduler always had one worker thread."""
    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    rt = ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy")
    rt.save(tmp_path / "bundle", weights=True)
    api = EarlyExitLitAPI(tmp_path / "bundle", "eeruntime.zoo:digits_cnn", workers=2)
    switch = sys.getswitchinterval()
    api.setup("cpu")
    try:
        assert api.sched.workers == 2
    finally:
        api.sched.close()
        sys.setswitchinterval(switch)
        gc.unfreeze()
