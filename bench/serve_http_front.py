"""The HTTP server's own cost per request, without the network or the model, side by side in one
process: the ASGI app of ``eeruntime.serve.server.create_app`` called directly (no uvicorn, no
socket) in front of a stub scheduler that answers at once with a fixed result, so only the
routing, the body's decoding and the answer's encoding count. Four variants of the app:

  before        /v1/infer as a FastAPI route, answers written by ``safetensors.torch.save``
                (the server until session 14),
  route         a plain Starlette route (no per-request dependency solving), safetensors.save,
  encoder       the FastAPI route, answers written by ``codec.encode_safetensors`` (our writer),
  now           both (the server since session 14),

each for a safetensors body and answer and for a JSON body and answer. Every variant runs
``--requests`` requests (``--concurrency`` in flight on one asyncio loop), ``--repeats`` times in
a rotated order; the report gives the median CPU time per request.

    python bench/serve_http_front.py [--repeats 6] [--requests 2000]

Writes bench/results/serve-http-front-<device>-<date>[<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import report_doc, write_report  # noqa: E402
from serve_load import rotated  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.serve import server  # noqa: E402
from eeruntime.serve.codec import encode_safetensors  # noqa: E402
from eeruntime.zoo import digits_cnn  # noqa: E402

VARIANTS = ("before", "route", "encoder", "now")
BODIES = ("safetensors", "json")


class StubScheduler:
    """What create_app needs of a scheduler, answering every request at once with one result."""

    def __init__(self, rt):
        self.rt = rt
        self.result = rt.infer(torch.randn(1, 1, 8, 8))
        self.closed = False

    async def submit(self, x):
        return self.result

    def close(self, drain=True, timeout_s=None):
        self.closed = True


def library_save(result) -> bytes:
    from safetensors.torch import save

    return save({k: getattr(result, k).contiguous() for k in ("logits", "exit_index", "confidence")})


def make_app(sched, variant: str):
    app = server.create_app(sched, close_on_shutdown=False)
    if variant in ("before", "encoder"):  # /v1/infer back as a FastAPI route
        route = next(r for r in app.router.routes if getattr(r, "path", "") == "/v1/infer")
        app.router.routes.remove(route)
        app.add_api_route("/v1/infer", route.endpoint, methods=["POST"])
    return app


def request_of(body_kind: str):
    x = torch.randn(1, 1, 8, 8)
    if body_kind == "json":
        body = json.dumps({"inputs": x.tolist()}).encode()
        headers = [(b"content-type", b"application/json")]
    else:
        from safetensors.torch import save

        body = save({"input": x})
        headers = [(b"content-type", b"application/vnd.safetensors"), (b"accept", b"application/vnd.safetensors")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/infer",
        "raw_path": b"/v1/infer",
        "query_string": b"",
        "root_path": "",
        "headers": headers + [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    return scope, body


async def run(app, scope, body, n: int, concurrency: int) -> float:
    """CPU seconds per request of ``n`` requests, ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def one():
        status = []

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        async with gate:
            await app(dict(scope), receive, send)
        if status != [200]:
            raise RuntimeError(f"the app answered {status}")

    t = time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return (time.process_time() - t) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if min(args.requests, args.concurrency, args.repeats) < 1:
        p.error("--requests, --concurrency and --repeats must be >= 1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sched = StubScheduler(ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25], criterion="entropy"))
    apps = {v: make_app(sched, v) for v in VARIANTS}
    cells = list((v, b) for b in BODIES for v in VARIANTS)
    samples: dict = {f"{v}/{b}": [] for v, b in cells}

    async def measure():
        for rep in range(args.repeats + 1):  # the first round warms every path up, not counted
            for v, b in rotated(cells, rep):
                # the encoder is the server module's global, read per request
                server.encode_safetensors = library_save if v in ("before", "route") else encode_safetensors
                scope, body = request_of(b)
                us = await run(apps[v], scope, body, args.requests if rep else 100, args.concurrency) * 1e6
                if rep:
                    samples[f"{v}/{b}"].append(us)

    try:
        asyncio.run(measure())
    finally:
        server.encode_safetensors = encode_safetensors
    medians = {k: statistics.median(v) for k, v in samples.items()}
    for k, v in medians.items():
        print(f"{k:22s} {v:7.1f} us per request  (runs {[round(s, 1) for s in samples[k]]})")
    doc = report_doc(
        argv,
        us_per_request=medians,
        runs=samples,
        note=f"The ASGI app called directly in front of a stub scheduler, {args.requests} requests of one "
        f"digits sample per run, {args.concurrency} in flight, {args.repeats} runs per cell in a rotated order, "
        "median CPU time per request; torch on 1 thread.",
    )
    info = doc["device"]
    lines = [
        f"# The HTTP app's own cost per request ({info['device']}, torch {info['torch']}, {doc['date']})",
        "",
        doc["note"],
        "",
        "| body and answer | " + " | ".join(VARIANTS) + " | now / before |",
        "| --- | " + " | ".join("---:" for _ in VARIANTS) + " | ---: |",
    ]
    for b in BODIES:
        row = [f"{medians[f'{v}/{b}']:.1f} us" for v in VARIANTS]
        lines.append(f"| {b} | " + " | ".join(row) + f" | {medians[f'now/{b}'] / medians[f'before/{b}']:.2f} |")
    write_report(args.out, "serve-http-front", doc, "\n".join(lines) + "\n", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
