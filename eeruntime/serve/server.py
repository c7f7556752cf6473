"""The HTTP server: FastAPI routes around a :class:`StageScheduler` (``python -m eeruntime serve``).

Routes:

- ``POST /v1/infer``: a batch as JSON ``{"inputs": [...]}`` or safetensors bytes (Content-Type
  ``application/vnd.safetensors`` or ``application/octet-stream``); a text model's inputs may be
  given by name (``{"inputs": {"input_ids": [...], "attention_mask": [...]}}``, or safetensors
  tensors so named: :mod:`.codec`); the answer is JSON, or safetensors when the request's Accept
  header asks for it.
- ``GET /health``: 200 while the scheduler takes requests, 503 once it is closing.
- ``GET /stats``: the scheduler's and the runtime's statistics as JSON; ``GET /metrics``: the same
  in the Prometheus text format.
- ``POST /admin/thresholds``: ``{"thresholds": [...]}`` swaps the thresholds for requests admitted
  from then on; needs ``Authorization: Bearer <token>`` with the token given at start (without a
  token configured the route is refused).

Bodies above ``max_body_bytes`` get 413 before they are read whole; malformed ones 400, invalid
ones 422, each with a message saying what was wrong. Errors never carry a traceback: an
unexpected one is logged on the server and answered "internal error".
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at
# definition time, and they are imported inside create_app (fastapi is an optional extra)
import hmac
import logging
from typing import Optional

from .._json import strict
from ..model import model_device
from ..state import as_tuple, from_tuple
from ..thresholds import thresholds_from_json
from .codec import (
    SAFETENSORS_TYPES,
    InputError,
    InputSpec,
    decode_body,
    encode_json,
    encode_safetensors,
    input_spec_for,
    parse_json,
    read_body,
    refusal,
)
from .process import gc_stats
from .scheduler import SchedulerClosed, SchedulerFull, StageFailed, StageScheduler
from .stats import prometheus_text

log = logging.getLogger("eeruntime.serve")


def create_app(
    sched: StageScheduler,
    *,
    admin_token: Optional[str] = None,
    max_body_bytes: int = 8 << 20,
    max_rows: int = 256,
    input_spec: Optional[InputSpec] = None,
    close_on_shutdown: bool = True,
):
    """A FastAPI app serving ``sched``. ``input_spec`` fixes each row's shape (else the first
    answered request's shape is enforced from then on; for a text encoder attached with
    ``ee.attach_exits``, token ids of any length: ``codec.TokenInputSpec``); ``close_on_shutdown``
    drains the scheduler when the app stops."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    spec = input_spec or input_spec_for(sched.rt.model)
    # Requests arrive on the host; a model on a GPU gets them there and answers come back to the
    # host to be encoded (one copy each way per request).
    device = model_device(sched.rt.model)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_on_shutdown:
            sched.close(drain=True, timeout_s=30)

    app = FastAPI(title="eeruntime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # never a traceback to the client; the log keeps it
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))  # (405's Allow)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(422, "invalid request")

    def wants_safetensors(request: Request) -> bool:
        accept = request.headers.get("accept", "")
        return any(t in accept for t in SAFETENSORS_TYPES)

    # A plain Starlette route, not a FastAPI one: the endpoint takes the Request and returns a
    # Response itself, so FastAPI's per-request dependency solving buys nothing here and costs
    # about a fifth of the route's own time (docs/serving.md, "The HTTP front end's own cost").
    async def infer(request: Request):
        try:
            body = await read_body(request, max_body_bytes)
            x = decode_body(body, request.headers.get("content-type", ""), spec, max_rows)
        except InputError as e:
            return error(e.status, str(e))
        host_x = x
        if device is not None and device.type != "cpu":
            if isinstance(x, dict):  # a text model's inputs by name
                x = {k: t.to(device, non_blocking=True) for k, t in x.items()}
            else:
                x = from_tuple([t.to(device, non_blocking=True) for t in as_tuple(x)], x)
        try:
            result = await sched.submit(x)
        except (SchedulerFull, SchedulerClosed, TimeoutError, StageFailed, ValueError, TypeError) as e:
            # (ValueError, TypeError: submit's own checks refused the input, a 422)
            status, message = refusal(e) or (500, "internal error")
            return error(status, message, headers={"Retry-After": "1"} if isinstance(e, SchedulerFull) else None)
        spec.learn(host_x)
        if result.logits.device.type != "cpu":
            result = type(result)(result.logits.cpu(), result.exit_index.cpu(), result.confidence.cpu())
        if wants_safetensors(request):
            return Response(encode_safetensors(result), media_type=SAFETENSORS_TYPES[0])
        return JSONResponse(encode_json(result))

    app.add_route("/v1/infer", infer, methods=["POST"])

    @app.get("/health")
    async def health():
        if sched.closed:
            return error(503, "closing")
        return {"status": "ok", "pending_requests": sched.pending()}

    def scheduler_doc():
        """The scheduler's statistics and the process's GC counters (/stats and /metrics)."""
        return {**sched.stats_dict(), "gc": gc_stats()}

    def stats_doc():
        d = scheduler_doc()
        d["runtime"] = (
            sched.rt.stats.as_dict()
            if sched.rt.stats.cost_model is not None
            else {"exit_counts": sched.rt.stats.exit_counts, "samples": sched.rt.stats.samples}
        )
        return d

    @app.get("/stats")
    async def stats():  # strict JSON: an inf threshold (calibration's "never exit here") is "inf"
        return JSONResponse(strict(stats_doc()))

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(scheduler_doc()), media_type="text/plain; version=0.0.4")

    @app.post("/admin/thresholds")
    async def set_thresholds(request: Request):
        if not admin_token:
            return error(403, "the admin endpoint is disabled: start the server with an admin token")
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not given:
            return error(
                401, "missing token: send Authorization: Bearer <admin token>", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            return error(403, "wrong admin token")
        try:
            doc = parse_json(await read_body(request, max_body_bytes))
        except InputError as e:
            return error(e.status, str(e))
        if not isinstance(doc, dict) or "thresholds" not in doc:
            return error(422, 'send {"thresholds": [t1, ...]} (one per early exit) or {"thresholds": t}')
        if doc["thresholds"] is None:  # (coerce_thresholds reads None as "the criterion's default")
            return error(
                422, 'thresholds is null; send {"thresholds": [t1, ...]} (one per early exit) or {"thresholds": t}'
            )
        try:
            sched.set_thresholds(thresholds_from_json(doc["thresholds"]))
        except (TypeError, ValueError) as e:
            return error(422, str(e))
        return JSONResponse(strict({"thresholds": sched.thresholds}))

    return app
