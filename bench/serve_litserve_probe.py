"""LitServe against ``eeruntime serve``, saturated, over HTTP on 127.0.0.1: the same bundle behind
``python -m eeruntime serve`` (one process: the HTTP front end and the scheduler's worker share
one interpreter) and behind LitServe with this package's ``EarlyExitLitAPI`` (LitServe's HTTP
front end in a process of its own, the scheduler in its inference worker process, requests passed
between them through LitServe's queues; ``--fast-queue``: its ZeroMQ queues). JSON bodies both
ways (the LitServe adapter takes JSON only), one sample per request, a closed loop of
``--conns`` connections sending back to back (bench/serve_http_load.py's generator), each system
``--repeats`` times in a rotated order. CPU is counted for the whole process tree of each server
(LitServe's children included) and for this process.

    python bench/serve_litserve_probe.py [--models digits,resnet] [--repeats 3] [--seconds 3]

Writes bench/results/serve-litserve-probe-<device>-<date>[<tag>].{json,md}. Only 127.0.0.1 is
bound or connected to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import serve_http_load as shl  # noqa: E402
from serve_load import rotated  # noqa: E402

LITSERVE = ("litserve", "litserve-fast-queue")
# LitServe with the scheduler's own deferral default (max_defer_ms=None: 20 ms on a CPU), which the
# adapter keeps when not told otherwise; the others run it as `eeruntime serve` does (no deferral)
LITSERVE_DEFER = "litserve-defer"
SYSTEMS = ("eeruntime", *LITSERVE, LITSERVE_DEFER)


def launch_litserve() -> None:
    """The LitServe server (run as ``python serve_litserve_probe.py --litserve BUNDLE MODEL PORT
    [--fast-queue]``): LitServe starts its processes by spawning, so this must be a main module."""
    import litserve as ls

    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    bundle, model, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
    # the scheduler as `eeruntime serve` runs it (no deferral: cli.SERVE_MAX_DEFER_MS), so that only
    # the front end's architecture differs
    api = EarlyExitLitAPI(bundle, model, max_batch=32, max_defer_ms=None if "--defer" in sys.argv else 0.0)
    server = ls.LitServer(api, accelerator="cpu", fast_queue="--fast-queue" in sys.argv)
    server.run(host=shl.HOST, port=port, log_level="warning", generate_client_file=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((shl.HOST, 0))
        return s.getsockname()[1]


def tree(pid: int) -> list:
    """``pid`` and every live process descended from it."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and every process descended from it, in seconds."""
    total = 0.0
    for p in tree(pid):
        try:
            total += shl.process_cpu_s(p)
        except OSError:  # (exited meanwhile)
            pass
    return total


def wait_health(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise shl.ServerUnavailable(f"the server exited with code {proc.returncode}")
        try:
            if shl.http_get_json(port, "/health", timeout_s=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise shl.ServerUnavailable(f"not ready within {timeout_s:.0f} s")


def start(system: str, bundle: Path, factory: str, shape, workdir: Path):
    """(process, port, path) of a started server: eeruntime serve (--port 0) or LitServe."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    if system == "eeruntime":
        port = free_port()
        cmd = [sys.executable, "-m", "eeruntime", "serve", str(bundle), "--model", factory, "--host", shl.HOST]
        cmd += ["--port", str(port), "--input-shape", ",".join(map(str, shape)), "--log-level", "warning"]
        path = "/v1/infer"
    else:
        port = free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--litserve", str(bundle), factory, str(port)]
        cmd += ["--fast-queue"] if system == "litserve-fast-queue" else []
        cmd += ["--defer"] if system == LITSERVE_DEFER else []
        path = "/predict"
    with open(workdir / f"{system}.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT), start_new_session=True
        )
    try:
        wait_health(port, proc)
    except BaseException:
        stop(proc)  # (a server that did not come up leaves nothing behind either)
        raise
    return proc, port, path


def group_members(pgid: int) -> list:
    """The live processes of process group ``pgid`` (zombies excluded: they are only waiting to
    be reaped)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (it was started in a session of its own, so
    LitServe's processes, forked or spawned, are in it), SIGKILL what is left after 20 s, and wait
    until none of them is alive."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.perf_counter() + 10
    while group_members(pgid) and time.perf_counter() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.wait(10)


def run_model(name: str, args) -> dict:
    _, rt, pool, spec = shl.build_runtime(name)
    systems = args.systems.split(",")
    out: dict = {"model": name, "systems": {}}
    with tempfile.TemporaryDirectory(prefix="serve-litserve-") as tmp:
        bundle = Path(tmp) / name
        rt.save(bundle, weights=True)
        factory = f"serve_http_load:{shl.FACTORIES[name]}"
        servers = {}
        try:
            for s in systems:
                try:
                    servers[s] = start(s, bundle, factory, spec["shape"], Path(tmp))
                except shl.ServerUnavailable as e:
                    out["systems"][s] = {"available": False, "reason": str(e)}
            runs: dict = {s: [] for s in servers}
            for rep in range(args.repeats):
                for s in rotated(list(servers), rep):
                    proc, port, path = servers[s]
                    requests = [shl.encode_request(x, "json", path) for x in pool[:64]]
                    shl.closed_loop(port, requests, 4, seconds=0.3)  # warm the connections' path
                    c0, t0 = tree_cpu_s(proc.pid), time.process_time()
                    r = shl.closed_loop(port, requests, args.conns, seconds=args.seconds)
                    c1, t1 = tree_cpu_s(proc.pid), time.process_time()
                    n = max(sum(1 for st in r["statuses"] if st == 200), 1)
                    runs[s].append(
                        {
                            "req_per_s": r["req_per_s"],
                            "p50_ms": r["p50_ms"],
                            "p99_ms": r["p99_ms"],
                            "errors": r["errors"],
                            "server_tree_cpu_us_per_request": (c1 - c0) / n * 1e6,
                            "generator_cpu_us_per_request": (t1 - t0) / n * 1e6,
                        }
                    )
            for s, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                out["systems"][s] = {"available": True, "median": med, "runs": rs}
                print(
                    f"[{name}] {s:20s} {med['req_per_s']:7.0f} req/s (runs {[round(r['req_per_s']) for r in rs]}), "
                    f"p50 {med['p50_ms']:.2f} ms, p99 {med['p99_ms']:.2f} ms, server tree "
                    f"{med['server_tree_cpu_us_per_request']:.0f} us/req, errors {sum(r['errors'] for r in rs)}",
                    flush=True,
                )
        finally:
            for proc, _, _ in servers.values():
                stop(proc)
    return out


def markdown(doc) -> str:
    lines = [
        f"# LitServe against eeruntime serve, saturated ({doc['device']['device']}, torch {doc['device']['torch']}, "
        f"{doc['date']})",
        "",
        doc["note"],
        "",
        "| model | server | req/s | runs | p50 ms | p99 ms | server CPU us/req (process tree) | errors |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for res in doc["results"]:
        for s, v in res["systems"].items():
            if not v["available"]:
                lines.append(f"| {res['model']} | {s} | unavailable: {v['reason']} | | | | | |")
                continue
            m = v["median"]
            lines.append(
                f"| {res['model']} | {s} | {m['req_per_s']:.0f} | {[round(r['req_per_s']) for r in v['runs']]} | "
                f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['server_tree_cpu_us_per_request']:.0f} | "
                f"{sum(r['errors'] for r in v['runs'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,resnet")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--conns", type=int, default=64)
    p.add_argument(
        "--systems",
        default="eeruntime," + ",".join(LITSERVE),
        help=f"comma-separated, of: {', '.join(SYSTEMS)} ({LITSERVE_DEFER}: the adapter's default deferral)",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(shl.FACTORIES)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; accepted: {', '.join(shl.FACTORIES)}")
    bad = set(args.systems.split(",")) - set(SYSTEMS)
    if bad:
        p.error(f"unknown systems {sorted(bad)}; accepted: {', '.join(SYSTEMS)}")
    if args.repeats < 1 or args.conns < 1 or not args.seconds > 0:
        p.error("--repeats and --conns must be >= 1, --seconds > 0")
    from common import report_doc, write_report

    results = [run_model(m, args) for m in args.models.split(",")]
    doc = report_doc(
        argv,
        results=results,
        note=f"Closed loop, {args.conns} connections, {args.seconds:g} s per run, {args.repeats} rotated runs per "
        "server, medians; JSON bodies; OMP_NUM_THREADS=1 in every server process; the same scheduler in every "
        f"server (max_batch 32, no deferral{'; ' + LITSERVE_DEFER + ': max_defer_ms 20' if LITSERVE_DEFER in args.systems.split(',') else ''}).",
    )
    write_report(args.out, "serve-litserve-probe", doc, markdown(doc), args.tag)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--litserve":
        launch_litserve()
    else:
        sys.exit(main())
