"""The TorchServe adapter: ``eeruntime torchserve-archive`` writes a model directory, a real
TorchServe (Java frontend + Python worker, its own processes) serves it on 127.0.0.1, and
concurrent HTTP requests get rt.infer's answers row for row, in both worker modes (async: the
stage scheduler; batch: TorchServe's batches through rt.infer); bad bodies get a 4xx with a
message. Skipped where java or torchserve is missing (make test installs torchserve)."""

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from serve_models import free_port

import eeruntime as ee
from eeruntime.cli import main as cli_main
from eeruntime.zoo import digits_cnn

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "eeruntime.zoo:digits_cnn"
NAME = "digits"

needs_torchserve = pytest.mark.skipif(
    shutil.which("java") is None or importlib.util.find_spec("ts") is None,
    reason="TorchServe needs java (17+) and the torchserve package (pip install 'eeruntime[torchserve]')",
)


def make_runtime(tmp_path):
    torch.manual_seed(7)
    # random weights give near-uniform logits; inputs x30 (below) spread the entropies so that these
    # thresholds send rows to every exit, each row far (>1e-2) from a threshold
    rt = ee.EERuntime(digits_cnn(), thresholds=[0.45, 1.95], criterion="entropy")
    rt.save(tmp_path / "bundle", weights=True)
    return rt


def start_torchserve(tmp_path, store):
    """The ``torchserve`` launcher in the foreground, everything it writes under tmp_path (logs,
    pid file, worker socket, config), all three endpoints on 127.0.0.1 with OS-chosen ports, and
    its two gRPC servers too (on fixed ports 7070 and 7071 by default: a second TorchServe running
    at once, another test's or a user's, failed to start)."""
    ports = {k: free_port() for k in ("inference", "management", "metrics")}
    grpc = {k: free_port() for k in ("inference", "management")}
    config = tmp_path / "config.properties"
    config.write_text(
        "".join(f"{k}_address=http://127.0.0.1:{p}\n" for k, p in ports.items())
        + "".join(f"grpc_{k}_address=127.0.0.1\ngrpc_{k}_port={p}\n" for k, p in grpc.items())
        + "disable_token_authorization=true\ndisable_system_metrics=true\ninstall_py_dep_per_model=false\n"
        + "vmargs=-Xmx512m -XX:+UseSerialGC -XX:-UsePerfData\n"
    )
    (tmp_path / "logs").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)),
        "LOG_LOCATION": str(tmp_path / "logs"),
        "METRICS_LOCATION": str(tmp_path / "logs"),
        "TEMP": str(tmp_path / "tmp"),  # the JVM's java.io.tmpdir: the worker's socket, model links
        "TMPDIR": str(tmp_path / "tmp"),  # the launcher's pid file
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-c", "from ts.model_server import start; start()", "--start", "--foreground"]
    cmd += ["--ts-config", str(config), "--model-store", str(store), "--models", f"{NAME}={NAME}", "--ncs"]
    out = open(tmp_path / "torchserve.out", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return proc, ports


def stop(proc):
    """The launcher, the JVM and the worker share a process group: SIGTERM it, bounded waits."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 20  # the JVM and the worker outlive the launcher by a moment
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(client, ports, proc, tmp_path, limit_s=180):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "torchserve.out").read_text()[-4000:]
        try:
            r = client.get(f"http://127.0.0.1:{ports['management']}/models/{NAME}")
            if r.status_code == 200 and r.json()[0]["workers"][0]["status"] == "READY":
                return
        except (httpx.TransportError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"TorchServe not ready in {limit_s} s: " + (tmp_path / "torchserve.out").read_text()[-4000:])


@needs_torchserve
@pytest.mark.parametrize("mode", ["async", "batch"])
def test_torchserve_serves_a_bundle_row_for_row(tmp_path, mode):
    rt = make_runtime(tmp_path)
    args = ["torchserve-archive", str(tmp_path / "bundle"), "--model", FACTORY, "--out", str(tmp_path / "store")]
    args += ["--name", NAME, "--max-batch", "8"] + (
        ["--batch-mode", "--max-batch-delay-ms", "20"] if mode == "batch" else []
    )
    assert cli_main(args) == 0
    cfg = json.loads((tmp_path / "store" / NAME / "model-config.yaml").read_text())
    assert cfg["asyncCommunication"] is (mode == "async")
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 30
    want = rt.infer(x)
    assert set(want.exit_index.tolist()) == {0, 1, 2}, "the inputs should leave at every exit"

    t0 = time.monotonic()
    proc, ports = start_torchserve(tmp_path, tmp_path / "store")
    try:
        with httpx.Client(timeout=60) as c:
            wait_ready(c, ports, proc, tmp_path)
            print(f"TorchServe ({mode}) ready in {time.monotonic() - t0:.1f} s")
            url = f"http://127.0.0.1:{ports['inference']}/predictions/{NAME}"
            bad = {
                0: ({"inputs": [[1.0, 2.0], [3.0]]}, 422, "rectangular"),
                1: ({"inputs": [[[1.0, 2.0]]]}, 422, "each row must have shape [1, 8, 8]"),
                2: ({"input": []}, 422, '"inputs" field'),
            }

            def send(i):  # eight 3-row requests, with three bad ones in flight among them
                if i >= 8:
                    return c.post(url, json=bad[i - 8][0])
                return c.post(url, json={"inputs": x[3 * i : 3 * i + 3].tolist()})

            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(send, range(11)))
            for i, r in enumerate(answers[:8]):
                assert r.status_code == 200, r.text
                rows = slice(3 * i, 3 * i + 3)
                assert r.json()["exit_index"] == want.exit_index[rows].tolist()
                torch.testing.assert_close(torch.tensor(r.json()["logits"]), want.logits[rows], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(
                    torch.tensor(r.json()["confidence"]), want.confidence[rows], rtol=1e-4, atol=1e-5
                )
            for (_, status, words), r in zip(bad.values(), answers[8:]):
                assert r.status_code == status and words in r.json()["error"], r.text
                assert "Traceback" not in r.text

            from safetensors.torch import load, save

            body = save({"input": x[:5].contiguous()})
            r = c.post(
                url,
                content=body,
                headers={"content-type": "application/vnd.safetensors", "accept": "application/vnd.safetensors"},
            )
            assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.safetensors", r.text
            got = load(r.content)
            assert torch.equal(got["exit_index"], want.exit_index[:5])
            torch.testing.assert_close(got["logits"], want.logits[:5], rtol=1e-4, atol=1e-5)
            for body, ctype, status in [
                (b"{nope", "application/json", 400),
                (b"hello", "text/plain", 415),
                # JSON documents TorchServe's worker parses into a number, a string, null
                (b"5.5", "application/json", 422),
                (b"1000000000000000", "application/json", 422),
                (b'"hello"', "application/json", 422),
                (b"null", "application/json", 422),
            ]:
                r = c.post(url, content=body, headers={"content-type": ctype})
                assert r.status_code == status and r.json()["error"] and "Traceback" not in r.text, (body, r.text)
            r = c.post(url, json={"inputs": x[:3].tolist()})  # and it still answers
            assert r.status_code == 200 and r.json()["exit_index"] == want.exit_index[:3].tolist(), r.text
    finally:
        stop(proc)
    how = "the stage scheduler" if mode == "async" else "rt.infer per TorchServe batch"
    assert f"through {how}" in (tmp_path / "logs" / "model_log.log").read_text()  # the worker took that path
    assert not (ROOT / "logs").exists() and not Path("logs").exists()


def test_torchserve_archive_writes_a_model_dir(tmp_path):
    make_runtime(tmp_path)
    out = tmp_path / "store"
    args = [
        "torchserve-archive",
        str(tmp_path / "bundle"),
        "--model",
        FACTORY,
        "--out",
        str(out),
        "--input-shape",
        "1,8,8",
        "--max-wait-ms",
        "2",
        "--max-defer-ms",
        "6",
        "--scheduler-workers",
        "2",
    ]
    assert cli_main(args) == 0
    manifest = json.loads((out / "eeruntime" / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["handler"] == "eeruntime.serve.torchserve_handler"
    cfg = json.loads((out / "eeruntime" / "model-config.yaml").read_text())
    assert cfg["eeruntime"]["model"] == FACTORY and cfg["eeruntime"]["input_shape"] == [1, 8, 8]
    assert cfg["asyncCommunication"] is True and cfg["batchSize"] == 1
    assert cfg["eeruntime"]["policy"] == "deepest" and cfg["eeruntime"]["max_wait_ms"] == 2
    assert cfg["eeruntime"]["max_defer_ms"] == 6 and cfg["eeruntime"]["scheduler_workers"] == 2
    # the copied bundle loads like the original
    x = torch.randn(4, 1, 8, 8)
    a, b = ee.load(tmp_path / "bundle", FACTORY).infer(x), ee.load(out / "eeruntime" / "bundle", FACTORY).infer(x)
    assert torch.equal(a.logits, b.logits)
    assert cli_main(args) == 1  # the target exists: refused, nothing overwritten
    assert cli_main(["torchserve-archive", str(tmp_path / "missing"), "--model", FACTORY, "--out", str(out)]) == 1
    # options the scheduler would refuse are refused before anything is written
    other = tmp_path / "other"
    bad = ["torchserve-archive", str(tmp_path / "bundle"), "--model", FACTORY, "--out", str(other)]
    assert cli_main(bad + ["--policy", "fill", "--max-defer-ms", "5"]) == 1 and not other.exists()
    assert cli_main(bad + ["--policy", "fill", "--max-wait-ms", "3"]) == 0
    assert json.loads((other / "eeruntime" / "model-config.yaml").read_text())["eeruntime"]["policy"] == "fill"


# -- the handler alone, called as TorchServe's worker calls it (no java, no torchserve needed) -----


class FakeContext:
    """What the handler uses of TorchServe's ts.context.Context: the model config and directory,
    each request's headers (RequestProcessor.get_request_properties) and per-request replies."""

    def __init__(self, model_dir, config, headers=()):
        self.model_yaml_config = config
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.request_processor = [SimpleNamespace(get_request_properties=lambda h=h: h) for h in headers]
        self.status, self.ctype = {}, {}

    def for_batch(self, headers):
        return FakeContext(self.system_properties["model_dir"], self.model_yaml_config, headers)

    def set_response_status(self, code, phrase, idx):
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx, value):
        self.ctype[idx] = value


def scripted_handler(tmp_path, asynchronous, hook_box):
    from serve_models import scripted_model

    from eeruntime.serve.torchserve_handler import EarlyExitHandler

    model, hook = scripted_model(3)
    hook_box.append(hook)
    ee.EERuntime(model, thresholds=0.9, criterion="max_prob").save(tmp_path / "bundle", weights=True)
    # the scheduler's options come from the model config (the archive tool writes them)
    options = {"max_batch": 32, "policy": "deepest", "max_wait_ms": 1.0, "max_defer_ms": 3.0, "scheduler_workers": 2}
    config = {"asyncCommunication": asynchronous, "eeruntime": {"model": lambda: model, **options}}
    ctx = FakeContext(tmp_path, config)
    handler = EarlyExitHandler()
    # initialize sets up the worker process (GC freeze, GIL switch interval); not this test process
    with (
        mock.patch("eeruntime.serve.torchserve_handler.freeze_startup_objects") as freeze,
        mock.patch("eeruntime.serve.torchserve_handler.set_switch_interval") as switch,
    ):
        handler.initialize(ctx)
    assert freeze.called and switch.called == asynchronous
    if asynchronous:
        sched = handler.sched
        assert (sched.policy, sched.max_wait_s, sched.max_defer_s, sched.max_batch, sched.workers) == (
            "deepest",
            1e-3,
            3e-3,
            32,
            2,
        )
    return handler, ctx, hook


@pytest.mark.parametrize("given,defer_s", [((), 0.0), ((None,), 0.02), ((5.0,), 0.005)])
def test_handler_async_mode_defers_as_eeruntime_serve_does_unless_its_config_says(tmp_path, given, defer_s):
    """No deferral by default in async mode (its event loop submits as `eeruntime serve`'s does);
    max_defer_ms: null gives the scheduler's own default (20 ms on a CPU); a number is passed on."""
    from eeruntime.serve.torchserve_handler import EarlyExitHandler
    from eeruntime.zoo import digits_cnn

    # (a model with parameters: the scheduler's own default depends on the device they are on)
    ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy").save(tmp_path / "bundle", weights=True)
    section = {"model": digits_cnn, **({"max_defer_ms": given[0]} if given else {})}
    handler = EarlyExitHandler()
    with (
        mock.patch("eeruntime.serve.torchserve_handler.freeze_startup_objects"),
        mock.patch("eeruntime.serve.torchserve_handler.set_switch_interval"),
    ):
        handler.initialize(FakeContext(tmp_path, {"asyncCommunication": True, "eeruntime": section}))
    try:
        assert handler.sched.max_defer_s == pytest.approx(defer_s)
    finally:
        handler.sched.close()


def test_handler_batch_mode_one_infer_per_row_shape_and_a_status_per_request(tmp_path):
    from safetensors.torch import save
    from serve_models import scripted_rows

    handler, ctx, hook = scripted_handler(tmp_path, False, [])
    assert handler.sched is None
    a, b = scripted_rows([0, 1, 2], [0, 2, 1]), scripted_rows([10, 11, 12, 13], [1, 1, 0, 2])
    wide = torch.cat([scripted_rows([99], [1]), torch.zeros(1, 1)], 1)  # 4 columns: a call of its own
    hook.fail_if = lambda k, ids: 99 in ids
    data = [
        {"body": {"inputs": a.tolist()}},
        {"body": {"inputs": [[1.0], [2.0, 3.0]]}},
        {"body": save({"input": b})},
        {"body": {"inputs": wide.tolist()}},
        {"data": b"{broken"},
    ]
    jsonh, sth = {"content-type": "application/json"}, {"Content-Type": "application/vnd.safetensors"}
    call = ctx.for_batch([jsonh, jsonh, sth, jsonh, jsonh])
    out = handler.handle(data, call)
    assert [call.status[i][0] for i in range(5)] == [200, 422, 200, 500, 400]
    want = handler.rt.infer(torch.cat([a, b]))
    assert out[0]["exit_index"] == [0, 2, 1] == want.exit_index[:3].tolist()
    assert out[2]["exit_index"] == [1, 1, 0, 2] == want.exit_index[3:].tolist()
    torch.testing.assert_close(torch.tensor(out[2]["logits"]), want.logits[3:])
    assert "the model failed" in out[3]["error"] and "rectangular" in out[1]["error"] and "JSON" in out[4]["error"]
    assert all("Traceback" not in str(o) for o in out)
    # a and b (same row shape) ran as one batch at stage 0; the wide request on its own
    assert (0, [0, 1, 2, 10, 11, 12, 13]) in hook.batches and (0, [99]) in hook.batches


def test_handler_async_mode_batches_rows_of_concurrent_requests(tmp_path):
    import asyncio

    from serve_models import scripted_rows

    handler, ctx, hook = scripted_handler(tmp_path, True, [])
    xs = [scripted_rows([10 * r + i for i in range(3)], [(r + i) % 3 for i in range(3)]) for r in range(6)]
    hook.hold(0, trigger=0)  # the first request waits at stage 0 while the others queue behind it

    async def serve():
        calls = [ctx.for_batch([{"content-type": "application/json"}]) for _ in xs]
        pending = [handler.handle([{"body": {"inputs": x.tolist()}}], c) for x, c in zip(xs, calls)]
        asyncio.get_running_loop().call_later(0.3, hook.gate.set)
        return await asyncio.wait_for(asyncio.gather(*pending), 60), calls

    try:
        outs, calls = asyncio.run(serve())
    finally:
        hook.gate.set()
        handler.sched.close()
    for x, out, call in zip(xs, outs, calls):
        assert call.status[0][0] == 200
        want = handler.rt.infer(x)
        assert out[0]["exit_index"] == want.exit_index.tolist()
        torch.testing.assert_close(torch.tensor(out[0]["logits"]), want.logits)
    # rows of different requests shared a stage's batch (ids 10r+i belong to request r)
    assert any(len({i // 10 for i in ids}) > 1 for _, ids in hook.batches)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_handler_answers_every_json_document_torchserve_parsed_with_its_own_status(tmp_path, asynchronous):
    """TorchServe's worker parses an application/json body itself (ts/protocol/otf_message_handler.py)
    into any JSON value, not only an object: a number, a string, a bool or null reach the handler
    as such. Each is refused with its own 422, the batch's good request still answered (a float
    once raised out of handle, failing the whole batch; an int n became bytes(n), an allocation of
    n bytes; a string holding JSON was parsed a second time)."""
    import asyncio

    from serve_models import scripted_rows

    handler, ctx, _ = scripted_handler(tmp_path, asynchronous, [])
    good = scripted_rows([0, 1, 2], [0, 2, 1])
    jsonh, text = {"content-type": "application/json"}, {"content-type": "text/plain"}
    bodies = [5.5, 10**15, "hello", json.dumps({"inputs": good.tolist()}), True, None, {"inputs": good.tolist()}]
    with_bool = good.tolist()
    with_bool[1][0] = True  # (a JSON true among the numbers: was read as 1.0)
    data = [{"body": b} for b in bodies] + [{"body": "hello"}, {"body": {"inputs": with_bool}}]
    call = ctx.for_batch([jsonh] * len(bodies) + [text, jsonh])
    try:
        out = handler.handle(data, call)
        if asynchronous:
            out = asyncio.run(asyncio.wait_for(out, 60))
    finally:
        if asynchronous:
            handler.sched.close()
    assert [call.status[i][0] for i in range(len(data))] == [422] * 6 + [200, 415, 422]
    assert "inputs[1][0] is true: JSON booleans are not numbers" in out[8]["error"], out[8]
    assert all('"inputs" field' in o["error"] for o in out[:6]), out[:6]
    want = handler.rt.infer(good)
    assert out[6]["exit_index"] == want.exit_index.tolist()
    torch.testing.assert_close(torch.tensor(out[6]["logits"]), want.logits)
    assert "Content-Type" in out[7]["error"] and all("Traceback" not in str(o) for o in out)


@pytest.mark.parametrize(
    "options,message",
    [
        (["--max-batch", "0"], "--max-batch must be an integer >= 1"),
        (["--max-rows", "0"], "--max-rows must be an integer >= 1"),
        (["--max-queue-rows", "0"], "--max-queue-rows must be an integer >= 1"),
        (["--timeout-s", "0"], "--timeout-s must be > 0"),
        (["--timeout-s", "nan"], "--timeout-s must be > 0"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--batch-mode", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--batch-mode", "--max-batch-delay-ms", "-1"], "--max-batch-delay-ms must be >= 0"),
        (["--response-timeout-s", "0"], "--response-timeout-s must be >= 1"),
        (["--input-shape=0,8,8"], "--input-shape takes sizes >= 1"),
        (["--name", "../escaped"], "--name must be letters"),
        (["--name", ""], "--name must be letters"),
        (["--name", "a=b"], "--name must be letters"),
        (["--pad-to", "8,x"], "--pad-to takes sequence lengths"),
        (["--pad-to", "16"], "has no input adapter"),  # (digits: no token ids to pad)
    ],
)
def test_torchserve_archive_refuses_options_no_archive_could_serve_and_writes_nothing(
    tmp_path, capsys, options, message
):
    """Each of these once wrote a model directory (exit 0) that TorchServe could not load (a worker
    failing at initialize, or none at all), that refused every request (413, 504), or that lay
    outside the store (--name ../x) or was the store itself (--name '')."""
    make_runtime(tmp_path)
    store = tmp_path / "store"
    args = ["torchserve-archive", str(tmp_path / "bundle"), "--model", FACTORY, "--out", str(store)] + options
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not store.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_torchserve_archive_writes_the_model_dir_whole_or_not_at_all(tmp_path, capsys):
    """A write that fails part way (here the disk filling up as the config is written) leaves no
    half-written model directory (before: the bundle's copy and the manifest, which TorchServe then
    tried to load) and keeps what the store already held; --out naming a file is refused (before:
    a NotADirectoryError traceback)."""
    import errno

    make_runtime(tmp_path)
    store = tmp_path / "store"
    base = ["torchserve-archive", str(tmp_path / "bundle"), "--model", FACTORY, "--out", str(store)]
    assert cli_main(base + ["--name", "first"]) == 0
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch("eeruntime.serve.torchserve_archive.model_config", full):
        assert cli_main(base + ["--name", "second"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in store.iterdir()) == ["first"]
    with mock.patch("eeruntime.serve.torchserve_archive.model_config", full):
        assert cli_main(base[:-1] + [str(tmp_path / "new_store")]) == 1
    assert not (tmp_path / "new_store").exists()  # (made for the archive, removed with it)

    (tmp_path / "a_file").write_text("keep")
    assert cli_main(base[:-1] + [str(tmp_path / "a_file")]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err and (tmp_path / "a_file").read_text() == "keep"


def test_torchserve_archive_with_its_store_inside_the_bundle_copies_the_bundle_alone(tmp_path):
    """--out inside the bundle's directory: the store is no part of the bundle (before, a second
    archive there copied the store, with its own directory, into itself until the path was too long)."""
    make_runtime(tmp_path)
    bundle = tmp_path / "bundle"
    store = bundle / "store"
    for name in ("one", "two"):
        assert (
            cli_main(["torchserve-archive", str(bundle), "--model", FACTORY, "--out", str(store), "--name", name]) == 0
        )
        copied = sorted(p.relative_to(store / name / "bundle") for p in (store / name / "bundle").rglob("*"))
        assert copied == sorted(p.relative_to(bundle) for p in bundle.iterdir() if p.name != "store")
    assert sorted(p.name for p in store.iterdir()) == ["one", "two"]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(
    "key,value,words",
    [
        ("max_rows", 0, "max_rows must be an integer >= 1"),
        ("max_rows", 2.5, "max_rows must be an integer >= 1"),
        ("timeout_s", 0, "timeout_s must be > 0"),
        ("max_batch", 0, "max_batch must be an integer >= 1"),
        ("scheduler_workers", 0, "scheduler_workers must be >= 1"),
        ("policy", "fastest", "policy must be one of"),
        ("max_wait_ms", float("inf"), "max_wait_ms must be finite"),  # (YAML's .inf)
        ("max_defer_ms", float("inf"), "max_defer_ms must be finite"),
    ],
)
def test_handler_refuses_a_hand_written_config_value_out_of_range(tmp_path, asynchronous, key, value, words):
    """model-config.yaml written by hand (or edited): the model's load fails naming the key (before,
    max_rows: 0 or timeout_s: 0 loaded a worker that refused every request with 413 or 504, and
    max_rows: 2.5 was read as 2)."""
    from eeruntime.serve.torchserve_handler import EarlyExitHandler

    ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy").save(tmp_path / "bundle", weights=True)
    config = {"asyncCommunication": asynchronous, "eeruntime": {"model": FACTORY, key: value}}
    handler = EarlyExitHandler()
    with (
        mock.patch("eeruntime.serve.torchserve_handler.freeze_startup_objects"),
        mock.patch("eeruntime.serve.torchserve_handler.set_switch_interval"),
        pytest.raises(ValueError, match=f"model-config.yaml, eeruntime: section: {words}"),
    ):
        handler.initialize(FakeContext(tmp_path, config))
    assert handler.sched is None and not handler.initialized


def text_handler(tmp_path, capsys, batch_mode: bool, *options: str):
    """A tiny BERT text runtime (seeded), its bundle archived by ``torchserve-archive`` with
    ``options`` (and ``--batch-mode``), and an ``EarlyExitHandler`` initialised from the archive
    as TorchServe would: (rt, handler, archive config)."""
    from serve_models import tiny_bert_text

    from eeruntime.serve.torchserve_handler import EarlyExitHandler

    torch.manual_seed(0)
    rt = ee.EERuntime(tiny_bert_text(), thresholds=[0.4, 0.45], criterion="max_prob")
    rt.save(tmp_path / "bundle", weights=True)
    args = ["torchserve-archive", str(tmp_path / "bundle"), "--model", "serve_models:tiny_bert_text"]
    args += ["--out", str(tmp_path / "store"), "--name", "text", *options]
    assert cli_main(args + (["--batch-mode"] if batch_mode else [])) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "store" / "text" / "model-config.yaml").read_text())
    handler = EarlyExitHandler()
    with (
        mock.patch("eeruntime.serve.torchserve_handler.freeze_startup_objects"),
        mock.patch("eeruntime.serve.torchserve_handler.set_switch_interval"),
    ):
        handler.initialize(FakeContext(tmp_path / "store" / "text", config))
    return rt, handler, config


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "batch-mode"])
def test_a_text_archive_pads_as_written_and_takes_json_token_ids(tmp_path, capsys, asynchronous):
    """torchserve-archive --pad-to writes pad_to into model-config.yaml; the handler's scheduler
    pads with it, and JSON numbers are token ids from the first request (docs/serving.md, "Text
    models")."""
    rt, handler, config = text_handler(tmp_path, capsys, not asynchronous, "--pad-to", "16,8")
    assert config["eeruntime"]["pad_to"] == [16, 8]
    try:
        if asynchronous:
            assert handler.sched.pad_to == (8, 16)
        ids = torch.randint(1, 60, (2, 5))
        ctx = FakeContext(tmp_path / "store" / "text", config, [{"content-type": "application/json"}])
        outs = handler.handle([{"body": {"inputs": ids.tolist()}}], ctx)
        if asynchronous:
            outs = asyncio.run(asyncio.wait_for(outs, 60))
        (out,) = outs
        assert ctx.status[0][0] == 200, out
        want = rt.infer(ids)
        assert out["exit_index"] == want.exit_index.tolist(), out
        torch.testing.assert_close(torch.tensor(out["logits"]), want.logits, rtol=1e-4, atol=1e-5)
    finally:
        if handler.sched is not None:
            handler.sched.close()


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "batch-mode"])
def test_the_handler_takes_a_text_models_inputs_by_name(tmp_path, capsys, asynchronous):
    """A text model's inputs by name (JSON "inputs" as an object TorchServe parsed, safetensors
    tensors named input_ids, attention_mask, ...) answer as rt.infer of the same dict; an
    unknown name is a 422 naming the accepted ones (its own status: the others are answered)."""
    from safetensors.torch import save

    rt, handler, config = text_handler(tmp_path, capsys, not asynchronous)
    try:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(2, 60, (4, 9), generator=g)
        mask = (torch.arange(9)[None] < torch.tensor([9, 4, 6, 2])[:, None]).long()
        ids = ids * mask  # (BERT's pad id, 0, where the mask pads)
        a = {"input_ids": ids[:2], "attention_mask": mask[:2]}
        b = {"input_ids": ids[2:], "attention_mask": mask[2:], "token_type_ids": torch.zeros_like(ids[2:])}
        data = [
            {"body": {"inputs": {k: v.tolist() for k, v in a.items()}}},
            {"body": save(b)},
            {"body": {"inputs": {"input_ids": ids[:1].tolist(), "segments": ids[:1].tolist()}}},
        ]
        jsonh, sth = {"content-type": "application/json"}, {"content-type": "application/vnd.safetensors"}
        ctx = FakeContext(tmp_path / "store" / "text", config, [jsonh, sth, jsonh])
        outs = handler.handle(data, ctx)
        if asynchronous:
            outs = asyncio.run(asyncio.wait_for(outs, 60))
        assert [ctx.status[i][0] for i in range(3)] == [200, 200, 422], outs
        for x, out in zip((a, b), outs):
            want = rt.infer(x)
            assert out["exit_index"] == want.exit_index.tolist(), out
            torch.testing.assert_close(torch.tensor(out["logits"]), want.logits, rtol=1e-4, atol=1e-5)
        assert "['segments']" in outs[2]["error"] and "'attention_mask'" in outs[2]["error"], outs[2]
        assert not torch.equal(torch.tensor(outs[0]["logits"]), rt.infer(a["input_ids"]).logits)  # (the mask is read)
    finally:
        if handler.sched is not None:
            handler.sched.close()


def test_batch_mode_a_text_request_the_adapter_refuses_is_a_422_and_its_batch_is_answered(tmp_path, capsys):
    """Batch mode ran every request of a TorchServe batch in one rt.infer, whose input adapter
    refused the whole batch for one request's ids out of the vocabulary (or a mask of another
    width than its ids: a call of its own): a 500 "the model failed" for every request in it,
    the good ones too. Now each request is mapped by the adapter as it is decoded (as the
    scheduler's submit maps it): the one refused gets a 422 saying why, the others their rows of
    rt.infer, plain and named requests sharing one batch."""
    rt, handler, config = text_handler(tmp_path, capsys, True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 60, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids = ids * mask
    named = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    plain = ids[2:]
    bodies = [
        {"inputs": {k: v.tolist() for k, v in named.items()}},
        {"inputs": {"input_ids": [[1000] * 6], "attention_mask": [[1] * 6]}},  # out of the vocabulary
        {"inputs": plain.tolist()},
        {"inputs": {"input_ids": ids[:2].tolist(), "attention_mask": [[1] * 4] * 2}},  # 4 mask columns for 6 ids
        {"inputs": [[1000] * 6]},
    ]
    ctx = FakeContext(tmp_path / "store" / "text", config, [{"content-type": "application/json"}] * len(bodies))
    outs = handler.handle([{"body": b} for b in bodies], ctx)
    assert [ctx.status[i][0] for i in range(len(bodies))] == [200, 422, 200, 422, 422], outs
    for x, out in ((named, outs[0]), (plain, outs[2])):
        want = rt.infer(x)
        assert out["exit_index"] == want.exit_index.tolist(), out
        torch.testing.assert_close(torch.tensor(out["logits"]), want.logits, rtol=1e-4, atol=1e-5)
    assert "token ids must be in [0, 60)" in outs[1]["error"] and "token ids must be in" in outs[4]["error"]
    assert "attention_mask has shape [2, 4]; it must match input_ids' [2, 6]" in outs[3]["error"], outs[3]
    assert all("Traceback" not in str(o) for o in outs)
