"""The HTTP server on 127.0.0.1 (ephemeral ports), real HTTP requests: answers equal rt.infer,
bad bodies get 4xx saying what was wrong (never a traceback), the admin endpoint needs its token,
and `python -m eeruntime serve` serves a bundle from a fresh process."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from models import mlp_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from serve_models import C, scripted_model, scripted_rows, thresholds_for

import eeruntime as ee
from eeruntime.serve import StageScheduler
from eeruntime.serve.codec import InputSpec, decode_body, decode_json
from eeruntime.serve.server import create_app

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"


class Served:
    """A uvicorn server in a thread on a socket the OS gave a port to."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=30)
        for _ in range(600):
            if self.server.started:
                break
            threading.Event().wait(0.05)
        assert self.server.started, "server did not start"

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=3)
    x = torch.randn(200, 6)
    rt = ee.EERuntime(model, thresholds=thresholds_for(model, x, [0.3, 0.3], "max_prob"), criterion="max_prob")
    ref_rt = ee.EERuntime(model, thresholds=rt.thresholds, criterion="max_prob")
    sched = StageScheduler(rt, max_batch=16, timeout_s=30)
    app = create_app(sched, admin_token=TOKEN, max_body_bytes=4096, max_rows=32, input_spec=InputSpec([(6,)]))
    s = Served(app)
    s.x, s.ref_rt, s.sched = x, ref_rt, sched
    yield s
    s.stop()
    assert sched.closed and sched.pending() == 0  # the app's shutdown drained the scheduler


def no_traceback(r):
    assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_safetensors_answers_read_back_with_safetensors_itself(dtype, rows):
    """The server writes the safetensors answer itself (codec.encode_safetensors); the library's
    own reader must get back exactly the tensors given, views of a larger batch and a transposed
    (non-contiguous) block included, and the same as the library's own writer's bytes hold."""
    from eeruntime.runtime import InferenceResult
    from eeruntime.serve.codec import encode_safetensors

    batch = torch.randn(rows + 3, 7).to(dtype)
    cases = [
        InferenceResult(batch[1 : 1 + rows], torch.arange(rows + 3)[2 : 2 + rows], batch[:rows, 3].clone()),
        InferenceResult(torch.randn(7, rows).to(dtype).t(), torch.zeros(rows, dtype=torch.int64), batch[:rows, 0]),
    ]
    for res in cases:
        got = st_load(encode_safetensors(res))
        ref = st_load(st_save({k: getattr(res, k).contiguous() for k in ("logits", "exit_index", "confidence")}))
        assert sorted(got) == ["confidence", "exit_index", "logits"]
        for k in got:
            assert got[k].dtype == ref[k].dtype == getattr(res, k).dtype and torch.equal(got[k], ref[k]), k
            assert torch.equal(got[k], getattr(res, k)), k


def test_json_and_safetensors_answers_equal_infer(served):
    x, ref = served.x[:20], served.ref_rt.infer(served.x[:20])
    r = served.client.post("/v1/infer", json={"inputs": x[:7].tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit_index"] == ref.exit_index[:7].tolist()
    torch.testing.assert_close(torch.tensor(body["logits"]), ref.logits[:7])
    r = served.client.post(
        "/v1/infer",
        content=st_save({"input": x[7:20].contiguous()}),
        headers={"content-type": "application/vnd.safetensors", "accept": "application/vnd.safetensors"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.safetensors"
    out = st_load(r.content)
    assert torch.equal(out["exit_index"], ref.exit_index[7:20])
    torch.testing.assert_close(out["logits"], ref.logits[7:20])
    torch.testing.assert_close(out["confidence"], ref.confidence[7:20])
    # a NaN row is served (it never exits early); strict JSON spells its NaNs as strings
    r = served.client.post(
        "/v1/infer",
        content=json.dumps({"inputs": [[float("nan")] * 6, x[0].tolist()]}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["exit_index"] == [2, ref.exit_index[0].item()] and r.json()["logits"][0] == ["nan"] * 5


@pytest.mark.parametrize(
    "kwargs,status,message",
    [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(json={"input": [[0.0] * 6]}), 422, 'an "inputs" field'),
        (dict(json={"inputs": [[0.0] * 6], "extra": 1}), 422, "unknown field"),
        (dict(json={"inputs": "abc"}), 422, "must be a list of samples"),
        (dict(json={"inputs": [[0.0] * 6, [0.0] * 5]}), 422, "rectangular nested list"),
        (dict(json={"inputs": [["a"] * 6]}), 422, "rectangular nested list"),
        (dict(json={"inputs": [[0.0] * 5]}), 422, r"each row must have shape [6], got [5]"),
        (dict(json={"inputs": [0.0] * 6}), 422, r"each row must have shape [6], got []"),
        (dict(json={"inputs": []}), 422, "no rows"),
        (dict(json={"inputs": [[0.0] * 6] * 33}), 413, "at most 32 rows"),
        (dict(content=b"x" * 5000, headers={"content-type": "application/json"}), 413, "at most 4096 are accepted"),
        (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "unsupported Content-Type"),
        (  # deeper than the JSON parser's recursion limit, within the size limit
            dict(
                content=b'{"inputs":' + b"[" * 2000 + b"]" * 2000 + b"}", headers={"content-type": "application/json"}
            ),
            400,
            "nested too deeply",
        ),
        (
            dict(
                content=b"\x10\x00\x00\x00\x00\x00\x00\x00garbage", headers={"content-type": "application/octet-stream"}
            ),
            400,
            "not a valid safetensors",
        ),
        (
            dict(content=st_save({"x": torch.zeros(1, 6)}), headers={"content-type": "application/octet-stream"}),
            422,
            "named 'input'",
        ),
    ],
)
def test_bad_bodies_get_4xx_saying_what_was_wrong(served, kwargs, status, message):
    r = served.client.post("/v1/infer", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    no_traceback(r)


def test_inputs_of_another_kind_than_the_model_has_taken_get_a_422_saying_which(served):
    """Once the model has answered float rows, integer, boolean or uint8 rows sent as safetensors
    are refused with 422 naming the dtype it takes (they reached the model, which raised: a 500
    "the model failed", for the client's error); float64 rows are cast, as before."""
    r = served.client.post("/v1/infer", json={"inputs": served.x[:2].tolist()})
    assert r.status_code == 200  # (the model's dtype is learned from an answered request)
    headers = {"content-type": "application/vnd.safetensors"}
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        r = served.client.post("/v1/infer", content=st_save({"input": served.x[:3].abs().to(dtype)}), headers=headers)
        want = f"inputs has dtype {str(dtype)[6:]}; this model takes float32"
        assert r.status_code == 422 and want in r.json()["error"], (dtype, r.text)
        assert "JSON numbers are converted" in r.json()["error"]
        no_traceback(r)
    r = served.client.post("/v1/infer", content=st_save({"input": served.x[:3].double()}), headers=headers)
    assert r.status_code == 200 and r.json()["exit_index"] == served.ref_rt.infer(served.x[:3]).exit_index.tolist()


def test_the_learned_dtypes_refuse_floats_where_integer_ids_were_taken():
    """A model that takes token ids (learned from its answered requests): integers of another
    width are cast to it, floats (or booleans) are refused with 422 saying which dtype it takes;
    before any answer nothing is assumed."""
    spec = InputSpec()
    ids = torch.tensor([[3, 1, 4]], dtype=torch.int32)
    assert spec.check(ids, 8).dtype == torch.int32  # nothing learned yet: as sent
    spec.learn((torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool)))
    got = spec.check((ids, torch.tensor([[True, True, False]])), 8)
    assert [t.dtype for t in got] == [torch.int64, torch.bool] and got[0].tolist() == [[3, 1, 4]]
    assert got[1].tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="input_0 has dtype float32; this model takes int64") as e:
        spec.check((ids.float(), got[1]), 8)
    assert e.value.status == 422
    with pytest.raises(ValueError, match="input_1 has dtype int64; this model takes bool"):  # (2 is not a bool)
        spec.check((ids, got[1].long()), 8)
    # JSON to a model of one integer input: ints as sent, a float among them refused
    spec = InputSpec([(3,)])
    spec.learn(torch.zeros(1, 3, dtype=torch.int64))
    x = decode_json({"inputs": [[3, 1, 4]]}, spec, 8)
    assert x.dtype == torch.int64 and x.tolist() == [[3, 1, 4]]
    with pytest.raises(ValueError, match="inputs has dtype float32; this model takes int64"):
        decode_json({"inputs": [[3, 1.5, 4]]}, spec, 8)


@pytest.mark.parametrize(
    "inputs,where",
    [
        ([[0.5, True, 2.0]], "inputs[0][1]"),  # a float model: true was 1.0
        ([[0.5, 2.0, 3.0], [1.0, 0.0, False]], "inputs[1][2]"),  # false among the numbers 1 and 0
        ([[True, False, True]], "inputs[0][0]"),  # all booleans: torch made a bool tensor
        ([[[1, 2], [3, True]]], "inputs[0][1][1]"),
    ],
)
@pytest.mark.parametrize("takes", ["floats", "ids", "nothing yet"])
def test_json_booleans_are_refused_as_not_numbers_saying_where(inputs, where, takes):
    """JSON true / false in "inputs" became 1 / 0 (torch.tensor reads a bool as a number): a
    client's mistake answered as if it were data. Now a 422 naming the first one and saying
    booleans are not numbers, for a float model, one that takes token ids, and before any answer."""
    spec = InputSpec()
    if takes != "nothing yet":
        spec.learn(
            torch.zeros(1, *torch.tensor(inputs).shape[1:], dtype=torch.float32 if takes == "floats" else torch.int64)
        )
    with pytest.raises(ValueError, match=re.escape(where) + ".*booleans are not numbers") as e:
        decode_json({"inputs": inputs}, spec, 8)
    assert e.value.status == 422
    # the same numbers without the booleans are served as before (0 and 1 included)
    numbers = json.loads(json.dumps(inputs).replace("true", "1").replace("false", "0"))
    if takes == "ids" and "." in json.dumps(numbers):
        return  # (floats where token ids were taken: refused as another kind, tested above)
    x = decode_json({"inputs": numbers}, spec, 8)
    assert x.tolist() == torch.tensor(numbers, dtype=x.dtype).tolist()


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [[0.5, true, 2.0]]}',
        b'{"inputs":[[1,0,false]]}',
        b'{"inputs": [[0.5, 2.0, 3.0]]}',
        b'{"inputs": [[0, 1, 0.25]]}',
        b'{"inputs": [[1e0, -0.0, 7]], "x": "true"}',  # (refused for its field, not scanned wrongly)
        # json.loads reads UTF-16 and UTF-32 bodies too (with or without a BOM), where true is not
        # the bytes b"true": the shortcut skipped the check and true was served as 1.0
        '{"inputs": [[0.5, true, 2.0]]}'.encode("utf-16"),
        '{"inputs": [[0.5, true, 2.0]]}'.encode("utf-16-be"),
        '{"inputs":[[1,0,false]]}'.encode("utf-32-le"),
        '{"inputs": [[0.5, 2.0, 3.0]]}'.encode("utf-32"),
        '{"inputs": [[0.5, 2.0, 3.0]]}'.encode("utf-8-sig"),
        '{"inputs": [[0.5, true, 2.0]]}'.encode("utf-8-sig"),
        b' \n{"inputs": [[1e-05, false, 2.5e3]]}',  # (exponents hold an "e" too; leading whitespace)
        b'{"inputs": [[1E+2, 0, 1]]}',
    ],
    ids=[
        "true",
        "false",
        "numbers",
        "0-1",
        "field",
        "utf16-true",
        "utf16be-true",
        "utf32le-false",
        "utf32",
        "bom",
        "bom-true",
        "space-exponent-false",
        "exponent",
    ],
)
def test_the_raw_body_shortcut_decodes_as_the_full_check_does(body):
    """decode_body skips the boolean check for a body without the substrings true / false
    (may_hold_booleans): every body decodes, or is refused with the same message, as with the
    check always run (decode_json of the parsed body), in every encoding json.loads reads."""

    def outcome(f):
        try:
            return f().tolist()
        except ValueError as e:
            return str(e)

    spec = InputSpec()
    fast = outcome(lambda: decode_body(body, "application/json", spec, 8))
    full = outcome(lambda: decode_json(json.loads(body), spec, 8))
    assert fast == full


def test_json_booleans_stay_booleans_for_a_model_that_takes_booleans():
    """A model whose one input has been booleans (learned from a safetensors request) takes them
    as JSON true / false too; a number among them is refused as another kind, as before."""
    spec = InputSpec()
    spec.learn(torch.zeros(1, 3, dtype=torch.bool))
    x = decode_json({"inputs": [[True, False, True]]}, spec, 8)
    assert x.dtype == torch.bool and x.tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="inputs has dtype int64; this model takes bool"):
        decode_json({"inputs": [[True, 2, True]]}, spec, 8)


def test_json_booleans_get_a_422_over_http(served):
    r = served.client.post("/v1/infer", json={"inputs": [[0.5, 1.0, True, 0.0, 2.0, 3.0]]})
    assert r.status_code == 422 and "inputs[0][2]" in r.json()["error"], r.text
    assert "booleans are not numbers" in r.json()["error"]
    no_traceback(r)


def test_concurrent_clients_each_get_their_own_rows_from_shared_batches():
    """Six clients at once over real HTTP, JSON and safetensors alike, requests of 1-4 rows: every
    answer holds exactly the client's own rows (the scripted model's class and exit per row),
    while the rows of several requests shared the scheduler's batches."""
    model, hook = scripted_model(3)
    hook.fail_if = lambda k, ids: time.sleep(0.002)  # (a slow stage: requests meet in batches)
    sched = StageScheduler(ee.EERuntime(model, thresholds=0.9, criterion="max_prob"), max_batch=16)
    s = Served(create_app(sched, max_rows=8))
    lock, next_id, wrong = threading.Lock(), [0], []

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(base_url=s.url, timeout=30) as c:
            for i in range(40):
                n = rng.randint(1, 4)
                with lock:
                    ids = list(range(next_id[0], next_id[0] + n))
                    next_id[0] += n
                exits = [rng.randrange(3) for _ in ids]
                x = scripted_rows(ids, exits)
                if i % 2:
                    r = c.post("/v1/infer", json={"inputs": x.tolist()})
                    got = r.json() if r.status_code == 200 else None
                else:
                    r = c.post(
                        "/v1/infer",
                        content=st_save({"input": x}),
                        headers={
                            "content-type": "application/vnd.safetensors",
                            "accept": "application/vnd.safetensors",
                        },
                    )
                    got = {k: v.tolist() for k, v in st_load(r.content).items()} if r.status_code == 200 else None
                if (
                    got is None
                    or got["exit_index"] != exits
                    or torch.tensor(got["logits"]).argmax(1).tolist() != [j % C for j in ids]
                ):
                    wrong.append((ids, exits, r.status_code, r.text[:200]))

    try:
        threads = [threading.Thread(target=client, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = sched.stats_dict()
    finally:
        s.stop()
    assert not wrong, wrong[:3]
    assert stats["requests"]["completed"] == 240 and stats["pending_requests"] == 0
    assert max(stats["max_batch_seen"]) > 4  # (a request has at most 4 rows: these batches were shared)


def test_a_wrong_method_gets_405_saying_which_are_allowed(served):
    r = served.client.get("/v1/infer")
    assert r.status_code == 405 and r.json()["error"] == "Method Not Allowed" and r.headers["allow"] == "POST"
    no_traceback(r)


def test_chunked_body_over_the_limit_is_refused():
    r = None

    def chunks():
        for _ in range(10):
            yield b"[" * 1000

    sched = StageScheduler(ee.EERuntime(mlp_model(K=2, d_in=6, width=8, C=3), thresholds=0.5), max_batch=4)
    s = Served(create_app(sched, max_body_bytes=4096))
    try:
        r = s.client.post("/v1/infer", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]
        # without an admin token configured, the admin route is refused whatever is sent
        r = s.client.post("/admin/thresholds", json={"thresholds": 0.1}, headers={"authorization": "Bearer x"})
        assert r.status_code == 403 and "disabled" in r.json()["error"]
        # a stage that raises: 500, no traceback, the server goes on serving
        r = s.client.post("/v1/infer", json={"inputs": [[0.0] * 5]})  # no spec given: the model itself refuses
        assert r.status_code == 500 and r.json()["error"] == "the model failed on this request"
        no_traceback(r)
        assert s.client.post("/v1/infer", json={"inputs": [[0.0] * 6]}).status_code == 200
        assert s.client.post("/v1/infer", json={"inputs": [[0.0] * 7]}).status_code == 422  # shape learned
    finally:
        s.stop()


def test_health_stats_and_prometheus_metrics(served):
    assert served.client.get("/health").json()["status"] == "ok"
    served.client.post("/v1/infer", json={"inputs": served.x[:10].tolist()})
    stats = served.client.get("/stats").json()
    assert stats["requests"]["completed"] >= 1 and sum(stats["exits"]) >= 10
    assert len(stats["queue_depths"]) == 3 and stats["latency_ms"]["p50"] > 0
    text = served.client.get("/metrics").text
    assert served.client.get("/metrics").headers["content-type"].startswith("text/plain")
    for line in (
        "# TYPE eeruntime_exits_total counter",
        'eeruntime_exits_total{exit="0"} ',
        'eeruntime_queue_rows{stage="2"} ',
        'eeruntime_latency_ms{quantile="0.99"} ',  # (Prometheus' spelling of a quantile; was "99")
        'eeruntime_batch_rows_mean{stage="1"} ',
        'eeruntime_gc_collections_total{generation="2"} ',
        "eeruntime_gc_frozen_objects ",
    ):
        assert line in text, line
    assert set(stats["gc"]) == {"switch_interval_ms", "frozen_objects", "collections", "collected"}


def test_admin_threshold_swap_needs_the_token(served):
    x = served.x[20:50]  # 30 rows: under the 32-row limit
    url = "/admin/thresholds"
    r = served.client.post(url, json={"thresholds": [0.0, 0.0]})
    assert r.status_code == 401 and "missing token" in r.json()["error"]
    r = served.client.post(url, json={"thresholds": [0.0, 0.0]}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = served.client.post(url, json={"thresholds": [0.1, 0.2, 0.3]}, headers=auth)
    assert r.status_code == 422 and "got 3 thresholds" in r.json()["error"]
    before = served.sched.thresholds
    r = served.client.post(url, json={"thresholds": None}, headers=auth)  # was 200: the criterion's default (0.99)
    assert r.status_code == 422 and "null" in r.json()["error"] and served.sched.thresholds == before
    r = served.client.post(url, content=b'{"thresholds":' + b"[" * 2000 + b"]" * 2000 + b"}", headers=auth)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    no_traceback(r)
    old = served.sched.thresholds
    try:
        r = served.client.post(url, json={"thresholds": [0.0, 0.0]}, headers=auth)  # max_prob >= 0: all leave at 0
        assert r.status_code == 200 and r.json()["thresholds"] == [0.0, 0.0]
        body = served.client.post("/v1/infer", json={"inputs": x.tolist()}).json()
        assert body["exit_index"] == [0] * len(x)
    finally:
        assert served.client.post(url, json={"thresholds": old}, headers=auth).status_code == 200
    body = served.client.post("/v1/infer", json={"inputs": x.tolist()}).json()
    assert body["exit_index"] == served.ref_rt.infer(x).exit_index.tolist()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device, none here")
        ),
    ],
)
def test_cli_serves_a_bundle_from_a_fresh_process(tmp_path, device):
    from eeruntime.zoo import digits_cnn

    torch.manual_seed(5)
    rt = ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy")
    rt.save(tmp_path / "bundle", weights=True)
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eeruntime",
            "serve",
            str(tmp_path / "bundle"),
            "--model",
            "eeruntime.zoo:digits_cnn",
            "--port",
            "0",
            "--input-shape",
            "1,8,8",
            "--admin-token-file",
            str(tmp_path / "token"),
            "--log-level",
            "warning",
            "--device",
            device,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        if "on http://127.0.0.1:" not in line:
            proc.wait(30)
            pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
        url = line.split("on ")[1].split()[0]
        x = torch.randn(5, 1, 8, 8)
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(200):
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    threading.Event().wait(0.05)
            # the server froze its startup objects (torch, the model) out of the cyclic GC, and
            # set its GIL switch interval (eeruntime/serve/process.py)
            gc_doc = c.get("/stats").json()["gc"]
            assert gc_doc["frozen_objects"] > 10_000 and gc_doc["switch_interval_ms"] == pytest.approx(0.1)
            r = c.post("/v1/infer", json={"inputs": x.tolist()})
            assert r.status_code == 200, r.text
            want = rt.infer(x)
            assert r.json()["exit_index"] == want.exit_index.tolist()
            torch.testing.assert_close(torch.tensor(r.json()["logits"]), want.logits, rtol=1e-4, atol=1e-5)
            bad = c.post("/v1/infer", json={"inputs": torch.randn(1, 8, 8).tolist()})
            assert bad.status_code == 422 and "[1, 8, 8]" in bad.json()["error"]
            assert (
                c.post(
                    "/admin/thresholds", json={"thresholds": 1.0}, headers={"authorization": f"Bearer {TOKEN}"}
                ).status_code
                == 200
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, proc.stderr.read()


@pytest.mark.parametrize(
    "device,message",
    [
        ("gpu0", "is not a device"),
        pytest.param(
            "cuda",
            "torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device"),
        ),
    ],
)
def test_cli_refuses_a_device_it_cannot_use(tmp_path, capsys, device, message):
    from eeruntime.serve.cli import main
    from eeruntime.zoo import digits_cnn

    rt = ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy")
    rt.save(tmp_path / "bundle", weights=True)
    rc = main([str(tmp_path / "bundle"), "--model", "eeruntime.zoo:digits_cnn", "--port", "0", "--device", device])
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_policy_choices_are_the_schedulers_and_reach_it(tmp_path, capsys, monkeypatch):
    from eeruntime.serve import cli, scheduler

    assert cli.POLICIES == scheduler.POLICIES  # cli.py spells them out to import no torch
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["b", "--model", "m:f", "--policy", "fullest"])
    assert e.value.code == 2 and "invalid choice: 'fullest'" in capsys.readouterr().err
    # the chosen policy reaches the scheduler the server builds (stopped before it serves)
    from eeruntime.zoo import digits_cnn

    ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy").save(tmp_path / "bundle", weights=True)
    made = []

    def fake_app(sched, **kw):
        made.append(sched)
        raise RuntimeError("stop here")

    monkeypatch.setattr("eeruntime.serve.server.create_app", fake_app)
    before = sys.getswitchinterval()  # (the server sets it after building the app: restored anyway)
    base = [str(tmp_path / "bundle"), "--model", "eeruntime.zoo:digits_cnn", "--port", "0"]
    try:
        for extra in (
            ["--policy", "fill", "--max-wait-ms", "3"],
            ["--max-wait-ms", "2", "--max-defer-ms", "4", "--scheduler-workers", "2"],
            ["--policy", "request", "--max-wait-ms", "1"],
            [],
        ):
            with pytest.raises(RuntimeError, match="stop here"):
                cli.main(base + extra)
    finally:
        sys.setswitchinterval(before)
        for s in made:
            s.close()
    assert [(s.policy, s.max_wait_s, s.max_defer_s, s.workers) for s in made] == [
        ("fill", 0.003, 0.0, 1),
        ("deepest", 0.002, 0.004, 2),
        ("request", 0.001, 0.0, 1),
        ("deepest", 0.0, 0.0, 1),  # the server's default: no deferral (cli.SERVE_MAX_DEFER_MS), on a CPU too
    ]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])  # (inf: Python set it to 0)
def test_cli_refuses_a_switch_interval_that_is_not_positive(tmp_path, capsys, value):
    from eeruntime.serve.cli import main

    before = sys.getswitchinterval()
    rc = main([str(tmp_path / "missing"), "--model", "eeruntime.zoo:digits_cnn", "--switch-interval-ms", value])
    assert rc == 2 and "--switch-interval-ms must be > 0" in capsys.readouterr().err
    assert sys.getswitchinterval() == before  # refused before anything was set


@pytest.mark.parametrize(
    "options,message",
    [
        (["--policy", "fill", "--max-defer-ms", "5"], "--max-defer-ms applies to --policy deepest"),
        (["--policy", "request", "--max-defer-ms", "5"], "--policy request never re-batches survivors"),
        (["--max-defer-ms", "-1"], "--max-defer-ms must be >= 0, got -1.0"),
        (["--max-wait-ms", "-2"], "--max-wait-ms must be >= 0, got -2.0"),
        (["--max-wait-ms", "nan"], "--max-wait-ms must be >= 0, got nan"),
        # (inf held a partial batch until it filled: a lone request waited for its timeout, a 504)
        (["--max-wait-ms", "inf"], "--max-wait-ms must be finite (milliseconds), got inf"),
        (["--max-defer-ms", "inf"], "--max-defer-ms must be finite (milliseconds), got inf"),
        (["--scheduler-workers", "0"], "--scheduler-workers must be >= 1 (the scheduler's worker threads), got 0"),
        # (these the scheduler took, and the server then refused every request: 413, 504)
        (["--max-rows", "0"], "--max-rows must be an integer >= 1 (the most rows per request), got 0"),
        (["--timeout-s", "0"], "--timeout-s must be > 0 (seconds a request may take), got 0.0"),
    ],
)
def test_cli_refuses_scheduler_options_the_scheduler_would_refuse(tmp_path, capsys, options, message):
    from eeruntime.serve.cli import main

    rc = main([str(tmp_path / "missing"), "--model", "eeruntime.zoo:digits_cnn"] + options)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "options,message",
    [
        (["--port", "-1"], "--port must be in [0, 65535] (0: a free one), got -1"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-batch", "0"], "--max-batch must be an integer >= 1 (the most rows per stage step), got 0"),
        (["--max-queue-rows", "-3"], "--max-queue-rows must be an integer >= 1"),
        (["--max-rows", "0"], "--max-rows must be an integer >= 1"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1, got 0"),
        (["--timeout-s", "0"], "--timeout-s must be > 0 (seconds a request may take), got 0.0"),
        (["--timeout-s", "nan"], "--timeout-s must be > 0 (seconds a request may take), got nan"),
        (["--input-shape", "1,0,8"], "--input-shape takes sizes >= 1 separated by commas"),
        (["--input-shape", ""], "--input-shape takes sizes >= 1 separated by commas"),
        (["--admin-token-file", "{tmp}/no-token"], "--admin-token-file {tmp}/no-token: cannot read it"),
        (["--admin-token-file", "{tmp}/empty-token"], "--admin-token-file {tmp}/empty-token is empty"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    ],
)
def test_cli_refuses_bad_options_in_a_line_before_loading(tmp_path, capsys, options, message):
    """Each of these used to start a server that failed every request (a timeout of 0 or nan, 0
    rows, an impossible shape, an empty token silently turning the admin endpoint off), or end
    in a traceback (a missing token file, --max-batch 0, a port out of range, a log level uvicorn
    does not know, found only after the port was announced)."""
    from eeruntime import cli

    (tmp_path / "empty-token").write_text("\n")
    options = [o.format(tmp=tmp_path) for o in options]
    rc = cli.main(["serve", str(tmp_path / "missing"), "--model", "eeruntime.zoo:digits_cnn"] + options)
    err = capsys.readouterr().err
    assert rc == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert "cannot load" not in err  # refused before the bundle was looked at


def test_cli_says_when_it_cannot_listen_and_leaves_no_scheduler_running(tmp_path, capsys):
    """A port in use or a host that is not this machine's: one line and exit 1 (it was a traceback
    from socket.bind, after the scheduler's threads had started)."""
    from eeruntime.serve.cli import main
    from eeruntime.zoo import digits_cnn

    ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25]).save(tmp_path / "bundle", weights=True)
    base = [str(tmp_path / "bundle"), "--model", "eeruntime.zoo:digits_cnn"]
    threads = set(threading.enumerate())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for extra, words in (
            (["--port", str(port)], f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use"),
            (["--host", "999.1.1.1", "--port", "0"], "cannot listen on --host 999.1.1.1 --port 0"),
        ):
            rc = main(base + extra)
            err = capsys.readouterr().err
            assert rc == 1 and words in err and "Traceback" not in err, err
    assert set(threading.enumerate()) <= threads  # no scheduler worker left behind


def test_cli_names_the_file_of_a_broken_bundle(tmp_path, capsys):
    """A truncated model.safetensors: the loader's message and exit 2 (was safetensors' own
    SafetensorError with a traceback)."""
    from eeruntime.serve.cli import main
    from eeruntime.zoo import digits_cnn

    ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25]).save(tmp_path / "bundle", weights=True)
    weights = tmp_path / "bundle" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc = main([str(tmp_path / "bundle"), "--model", "eeruntime.zoo:digits_cnn", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot load {tmp_path / 'bundle'}: {weights}" in err and "Traceback" not in err, err


def _strict_json(text):
    def bare(name):
        raise AssertionError(f"bare {name} in a JSON answer (not strict JSON)")

    return json.loads(text, parse_constant=bare)


def _metric_samples(text):
    """/metrics read by prometheus_client's own parser: {(family type, sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (f.type, s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_stats_and_metrics_stay_readable_and_counters_only_go_up_in_every_state():
    """/metrics parses with prometheus_client and /stats is strict JSON in every state a server
    goes through: fresh, after answers, refusals, a failing stage, a timeout and threshold swaps
    (an infinite threshold, as `eeruntime calibrate` often chooses, included: it made /stats a
    500 and the swap's own answer a 500 after the swap had taken effect); counters never fall."""
    model, hook = scripted_model(3)
    sched = StageScheduler(ee.EERuntime(model, thresholds=[0.9, float("inf")], criterion="max_prob"), timeout_s=0.5)
    s = Served(create_app(sched, admin_token=TOKEN, max_rows=8))
    auth = {"authorization": f"Bearer {TOKEN}"}
    seen, last = [], {}

    def check(state):
        m = s.client.get("/metrics")
        assert m.status_code == 200, (state, m.text)
        samples = _metric_samples(m.text)
        st = s.client.get("/stats")
        assert st.status_code == 200, (state, st.text)
        doc = _strict_json(st.text)
        for key, value in samples.items():
            if key[0] == "counter":
                assert value >= last.get(key, 0.0), (state, key, last.get(key), value)
                last[key] = value
        seen.append(state)
        return samples, doc

    def counter(samples, name, **labels):
        return samples[("counter", f"eeruntime_{name}", tuple(sorted(labels.items())))]

    try:
        samples, doc = check("fresh")
        assert doc["thresholds"] == [0.9, "inf"]
        r = s.client.post("/v1/infer", json={"inputs": scripted_rows([0, 1, 2], [0, 1, 2]).tolist()})
        assert r.status_code == 200 and r.json()["exit_index"] == [0, 2, 2]  # (inf at exit 1: nobody leaves there)
        samples, _ = check("answered")
        assert counter(samples, "requests_total", outcome="completed") == 1.0
        assert counter(samples, "exits_total", exit="0") == 1.0 and counter(samples, "exits_total", exit="2") == 2.0
        assert s.client.post("/v1/infer", json={"inputs": [[1.0]]}).status_code == 422
        check("refused")
        hook.fail_if = lambda k, ids: k == 1
        assert s.client.post("/v1/infer", json={"inputs": scripted_rows([3], [2]).tolist()}).status_code >= 500
        hook.fail_if = None
        samples, _ = check("stage failed")
        assert counter(samples, "stage_failures_total") >= 1.0
        hook.hold(0)
        try:
            r = s.client.post("/v1/infer", json={"inputs": scripted_rows([4], [0]).tolist()})
            assert r.status_code == 504, r.text
            samples, _ = check("timed out")
            assert counter(samples, "requests_total", outcome="timeouts") == 1.0
        finally:
            hook.gate.set()
        for sent, want in (
            ([0.5, 0.5], [0.5, 0.5]),
            ([float("inf"), "-inf"], ["inf", "-inf"]),
            (["inf", 0.2], ["inf", 0.2]),
        ):
            r = s.client.post("/admin/thresholds", content=json.dumps({"thresholds": sent}), headers=auth)
            assert r.status_code == 200, (sent, r.text)
            assert _strict_json(r.text)["thresholds"] == want
            _, doc = check(f"swapped to {sent}")
            assert doc["thresholds"] == want
        r = s.client.post("/v1/infer", json={"inputs": scripted_rows([5, 6], [0, 1]).tolist()})
        assert r.status_code == 200 and r.json()["exit_index"] == [2, 1]  # (inf at exit 0 now)
        check("answered after the swaps")
    finally:
        s.stop()
    assert len(seen) == 9


@pytest.mark.parametrize("n", [1, 2, 10, 99, 100, 101, 1000, 2500])
def test_latency_percentiles_are_numpys_nearest_rank(n):
    """The p50/p90/p99 that /stats and /metrics serve are the nearest-rank percentiles of the
    window's latencies (numpy's inverted_cdf). Before, ``round(x + 0.5)`` rounded half to even:
    the p99 of 100 latencies was the largest, the p50 of 10 the 6th."""
    import numpy as np

    from eeruntime.serve.stats import PERCENTILES, SchedulerStats

    rng = np.random.default_rng(n)
    latencies = rng.exponential(0.002, n).tolist()
    stats = SchedulerStats(num_stages=2)
    stats.record_latencies(latencies)
    got = stats.latency_percentiles_ms()
    for q in PERCENTILES:
        assert got[f"p{q}"] == pytest.approx(1000.0 * float(np.percentile(latencies, q, method="inverted_cdf"))), q
    served = _metric_samples(
        ee.serve.stats.prometheus_text({**stats.as_dict(), "queue_depths": [0, 0], "pending_requests": 0})
    )
    # the labels as Prometheus writes a quantile (a fraction: "0.5", "0.9", "0.99"; were "50", ...)
    quantiles = {float(labels[0][1]): v for (_, name, labels), v in served.items() if name == "eeruntime_latency_ms"}
    assert quantiles == pytest.approx({q / 100: got[f"p{q}"] for q in PERCENTILES})


def test_metrics_label_values_are_escaped_as_the_text_format_requires():
    """A label value holding a double quote, a backslash or a newline reads back whole with
    prometheus_client's parser (before, it was written raw and the exposition did not parse)."""
    from eeruntime.serve.stats import SchedulerStats, prometheus_text

    d = {**SchedulerStats(num_stages=2).as_dict(), "queue_depths": [0, 0], "pending_requests": 0}
    odd = 'say "hi"\\ to\nme'
    d["requests"] = {**d["requests"], odd: 7}
    samples = _metric_samples(prometheus_text(d))
    assert samples[("counter", "eeruntime_requests_total", (("outcome", odd),))] == 7.0


def test_cli_serves_a_runtime_saved_without_weights_given_weights(tmp_path, capsys, monkeypatch):
    """`eeruntime calibrate` saves thresholds, not the model's weights: `serve --weights` loads a
    state dict into the factory's model, as `calibrate` and `time` take it; without it the refusal
    says so. (Before, a command-line user could not serve what `calibrate` wrote.)"""
    from safetensors.torch import save_file

    from eeruntime.serve import cli
    from eeruntime.zoo import digits_cnn

    torch.manual_seed(3)
    model = digits_cnn().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    ee.EERuntime(model, thresholds=[2.2, 2.25], criterion="entropy").save(tmp_path / "rt")  # no weights
    base = [str(tmp_path / "rt"), "--model", "eeruntime.zoo:digits_cnn", "--port", "0"]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "holds no model weights" in err and "--weights" in err and "Traceback" not in err
    made = []

    def fake_app(sched, **kw):  # (stops the server before it serves)
        made.append(sched)
        raise RuntimeError("stop here")

    monkeypatch.setattr("eeruntime.serve.server.create_app", fake_app)
    before = sys.getswitchinterval()
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            cli.main([*base, "--weights", str(tmp_path / "w.safetensors")])
    finally:
        sys.setswitchinterval(before)
        if made:
            made[0].close()
    x = torch.rand(6, 1, 8, 8)
    want = ee.EERuntime(model, thresholds=[2.2, 2.25], criterion="entropy").infer(x)
    got = made[0].rt.infer(x)
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits)
    assert cli.main([*base, "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
