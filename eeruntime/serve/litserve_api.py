"""A LitServe ``LitAPI`` that serves a saved runtime bundle through the stage scheduler.

    import litserve as ls
    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    api = EarlyExitLitAPI("bundle_dir", "my_models:build", max_batch=32)
    ls.LitServer(api, accelerator="cpu").run(port=8000)   # POST /predict {"inputs": [[...]]}

LitServe's own request batching is left off (``max_batch_size=1``): the API runs in LitServe's
async mode, so every request in flight reaches the stage scheduler at once and is batched there,
stage by stage, with other requests' rows. The API object holds only the bundle path and the
factory name until ``setup`` (LitServe may start it in a new process).

The body is read in LitServe's HTTP process by :func:`read_json_body` (``decode_request``'s
annotation makes it a FastAPI dependency there), so that a body that is not JSON gets a 4xx
saying so; LitServe's own reading (``await request.json()``) answered it 500.
"""

# no `from __future__ import annotations`: LitServe copies decode_request's annotation onto its
# FastAPI route, and FastAPI would resolve a string annotation in LitServe's module, not this one
import argparse
from typing import Annotated, Any, Optional, Sequence

try:
    import litserve as ls
    from fastapi import Depends, HTTPException, Request  # (litserve's own dependency)
except ImportError as e:  # pragma: no cover - depends on the [serve] extra
    raise ImportError("the LitServe adapter needs litserve: pip install 'eeruntime[serve]'") from e

from .cli import SERVE_MAX_DEFER_MS, scheduler_options_error
from .codec import InputError, decode_json, encode_json, input_spec_for, parse_json, refusal


async def read_json_body(request: Request) -> Any:
    """The request's body as a JSON document, or an HTTPException saying what was wrong with it:
    415 for another Content-Type than JSON (an empty one is read as JSON), 400 for bytes that are
    not JSON (not UTF-8, malformed, nested too deeply). Runs in LitServe's HTTP process; what it
    returns is what LitServe sends to the worker (``decode_request``'s ``request``)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise HTTPException(415, f"unsupported Content-Type {ctype!r}; this LitServe API takes application/json")
    try:
        return parse_json(await request.body())
    except InputError as e:
        raise HTTPException(e.status, str(e)) from None


class EarlyExitLitAPI(ls.LitAPI):
    """``bundle``: a directory written by ``rt.save(path, weights=True)``; ``model``: the model's
    constructor (``"module:factory"`` or a picklable callable). Scheduler options as in
    :class:`~eeruntime.serve.StageScheduler` (``workers``: its worker threads), refused here when
    out of range, except ``max_defer_ms``, off by default as in
    ``eeruntime serve`` (``cli.SERVE_MAX_DEFER_MS``): LitServe's event loop submits requests in
    bursts too, and with the scheduler's CPU default (20 ms) LitServe served 0.97x and 1.01x the
    saturated req/s (digits, ResNet-style; docs/serving.md, "Bundles, the HTTP server and
    LitServe"); ``None`` gives the scheduler's own default."""

    def __init__(
        self,
        bundle,
        model,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        policy: str = "deepest",
        max_defer_ms: Optional[float] = SERVE_MAX_DEFER_MS,
        max_queue_rows: int = 4096,
        timeout_s: Optional[float] = 30.0,
        max_rows: int = 256,
        workers: int = 1,
        pad_to: Optional[Sequence[int]] = None,
        api_path: str = "/predict",
    ):
        # the scheduler's keyword arguments (pad_to is checked against the model when it loads)
        options = dict(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            policy=policy,
            max_defer_ms=max_defer_ms,
            max_queue_rows=max_queue_rows,
            timeout_s=timeout_s,
            workers=workers,
            pad_to=pad_to,
        )
        # refused here, in the caller's process, rather than in LitServe's worker once the model
        # is loaded (or, for max_rows and timeout_s, not at all: every request refused)
        checked = {k: v for k, v in options.items() if k not in ("workers", "pad_to")}
        bad = scheduler_options_error(
            argparse.Namespace(**checked, max_rows=max_rows, scheduler_workers=workers), style="keyword"
        )
        if bad:
            raise ValueError(f"EarlyExitLitAPI: {bad}")
        super().__init__(max_batch_size=1, api_path=api_path, enable_async=True)
        self.bundle, self.model_spec = str(bundle), model
        self.options = options
        self.max_rows = max_rows
        self.sched = None

    def setup(self, device):
        import eeruntime as ee

        from .process import freeze_startup_objects, set_switch_interval
        from .scheduler import StageScheduler

        rt = ee.load(self.bundle, self.model_spec)
        if device and device != "cpu":
            rt.model.to(device)
            rt = ee.load(self.bundle, rt.model)
        self.sched = StageScheduler(rt, **self.options)
        self.spec = input_spec_for(rt.model)  # (token ids for a text encoder: codec.TokenInputSpec)
        self.device_name = device
        # this worker process is ours to set up (eeruntime/serve/process.py): LitServe's event loop
        # submits, the scheduler's worker steps, both under one GIL
        freeze_startup_objects()
        set_switch_interval()

    async def decode_request(self, request: Annotated[Any, Depends(read_json_body)], **kwargs):
        try:
            x = decode_json(request, self.spec, self.max_rows)
        except InputError as e:
            raise HTTPException(e.status, str(e)) from None
        if self.device_name in (None, "cpu"):
            return x
        if isinstance(x, dict):  # a text model's inputs by name ({"inputs": {"input_ids": ...}})
            return {k: t.to(self.device_name) for k, t in x.items()}
        return x.to(self.device_name)

    async def predict(self, x, **kwargs):
        from .scheduler import SchedulerClosed, SchedulerFull, StageFailed

        try:
            result = await self.sched.submit(x)
        except (SchedulerFull, SchedulerClosed, TimeoutError, StageFailed, ValueError, TypeError) as e:
            raise HTTPException(*(refusal(e) or (500, "internal error"))) from None
        self.spec.learn(x)
        return result

    async def encode_response(self, output, **kwargs):
        return encode_json(output)
