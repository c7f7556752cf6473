"""A TorchServe custom handler that serves a saved runtime bundle (docs/serving.md, "TorchServe").

``python -m eeruntime torchserve-archive BUNDLE --model module:factory --out STORE`` writes a model
directory TorchServe loads as it is (no .mar needed): the bundle, ``MAR-INF/MANIFEST.json`` naming
this module as the handler, and ``model-config.yaml`` with TorchServe's settings and an
``eeruntime:`` section (the factory and the scheduler's options) read here in ``initialize``.

How it fits TorchServe's Python backend (ts/model_service_worker.py, ts/async_service.py of
TorchServe 0.12): one worker process calls ``handle(batch, context)``, where ``batch`` holds up to
the model's ``batchSize`` requests the Java frontend gathered within ``maxBatchDelay``.

- ``asyncCommunication: true`` (the archive tool's default, with ``batchSize: 1``): the frontend
  sends each request as soon as it arrives and the worker awaits every ``handle`` call
  concurrently on one event loop. Each request goes to the :class:`StageScheduler` with ``await
  sched.submit(x)``, so rows of every request in flight share each stage's batch, and survivors
  of different requests are batched together, as behind the HTTP server and LitServe.
- ``asyncCommunication: false`` (``--batch-mode``): TorchServe runs one batch at a time per
  worker, so a scheduler would only ever see that one batch; the handler runs ``rt.infer`` on
  the batch's rows (requests with the same row shape in one call) and splits the answers.

Every request gets its own status (``context.set_response_status``): a bad body gets a 4xx with
a message, a failing model call a 500 for the requests in that call, never a traceback. ``handle``
never raises: in async mode TorchServe answers a raised error on *every* request in flight.
"""

from __future__ import annotations

import argparse
import logging
import os
from http import HTTPStatus
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..state import as_tuple, cat_rows, from_tuple
from .cli import SERVE_MAX_DEFER_MS, scheduler_options_error
from .codec import (
    SAFETENSORS_TYPES,
    InputError,
    InputSpec,
    decode_body,
    decode_json,
    encode_json,
    encode_safetensors,
    input_spec_for,
    model_float_dtype,
    refusal,
)
from .process import freeze_startup_objects, set_switch_interval

log = logging.getLogger("eeruntime.serve.torchserve")

CONFIG_SECTION = "eeruntime"  # the section of model-config.yaml this handler reads
# model-config.yaml's keys for the scheduler's options (its `workers`, threads, is scheduler_workers:
# TorchServe's own workers are processes)
SCHEDULER_OPTIONS = {
    "max_batch": "max_batch",
    "max_wait_ms": "max_wait_ms",
    "policy": "policy",
    "max_defer_ms": "max_defer_ms",
    "max_queue_rows": "max_queue_rows",
    "timeout_s": "timeout_s",
    "scheduler_workers": "workers",
    "pad_to": "pad_to",
}

Reply = Tuple[int, str, Any]  # (status, content type, body)


def _header(context: Any, idx: int, name: str) -> str:
    """A request header (case-insensitive), or the body parameter's own, or ""."""
    props = context.request_processor[idx].get_request_properties() or {}
    for key, value in props.items():
        if key.lower() == name:
            return str(value)
    body = props.get("body")
    return str(body.get(name, "")) if isinstance(body, dict) else ""


def _error(status: int, message: str) -> Reply:
    return status, "application/json", {"error": message}


def _refused(x: Any) -> bool:
    """A Reply, not an input (an input tuple holds tensors); no class of its own: TorchServe
    wants exactly one class in a handler module."""
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], int)


class EarlyExitHandler:
    """TorchServe instantiates this class (the module's only one) per worker and calls
    ``initialize(context)`` once, then ``handle(batch, context)`` per batch."""

    def __init__(self) -> None:
        self.rt: Any = None
        self.sched: Any = None
        self.spec = InputSpec()
        self.max_rows = 256
        self.device = torch.device("cpu")
        self._by_name = False
        self.initialized = False

    def initialize(self, context: Any) -> None:
        import eeruntime as ee
        from eeruntime.bundle import resolve_factory

        from .scheduler import StageScheduler

        config = context.model_yaml_config or {}
        opts: Dict[str, Any] = dict(config.get(CONFIG_SECTION) or {})
        if not opts.get("model"):
            raise ValueError(
                f"model-config.yaml needs an {CONFIG_SECTION}: section with model: 'module:factory' "
                "(python -m eeruntime torchserve-archive writes it)"
            )
        # a hand-written config's out-of-range value fails the model's load, saying which, rather
        # than a worker that refuses every request (max_rows: 0, timeout_s: 0)
        checked = {"max_batch": 32, "max_wait_ms": 0.0, "policy": "deepest", "max_defer_ms": None}
        checked.update(max_queue_rows=4096, timeout_s=None, scheduler_workers=1, max_rows=256)
        checked.update((k, opts[k]) for k in checked if k in opts)
        bad = scheduler_options_error(argparse.Namespace(**checked), style="config")
        if bad:
            raise ValueError(f"model-config.yaml, {CONFIG_SECTION}: section: {bad}")
        gpu = context.system_properties.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():  # TorchServe assigns each worker a GPU
            self.device = torch.device("cuda", int(gpu))
        source = opts["model"]
        if self.device.type != "cpu":
            factory = resolve_factory(source)
            source = lambda: factory().to(self.device)  # noqa: E731  (weights are loaded into it there)
        bundle = os.path.join(context.system_properties["model_dir"], opts.get("bundle", "bundle"))
        self.rt = ee.load(bundle, source)
        shape = opts.get("input_shape")
        # (without a shape given, token ids for a text encoder: codec.TokenInputSpec)
        self.spec = (
            InputSpec([tuple(shape)], dtype=model_float_dtype(self.rt.model))
            if shape
            else input_spec_for(self.rt.model)
        )
        self.max_rows = opts.get("max_rows", 256)
        # an input adapter with input names (an HF model's): batch mode maps each request by it
        self._by_name = bool(getattr(getattr(self.rt.model, "input_adapter", None), "names", ()))
        if config.get("asyncCommunication"):
            kwargs = {arg: opts[k] for k, arg in SCHEDULER_OPTIONS.items() if k in opts}
            # no deferral unless the config says (null: the scheduler's own default), as in
            # `eeruntime serve` and EarlyExitLitAPI: an event loop in this process submits the
            # requests, in bursts (docs/serving.md, "Bundles, the HTTP server and LitServe")
            kwargs.setdefault("max_defer_ms", SERVE_MAX_DEFER_MS)
            self.sched = StageScheduler(self.rt, **kwargs)
        freeze_startup_objects()  # this worker process is ours to set up (eeruntime/serve/process.py)
        if self.sched is not None:  # an event loop submits, the scheduler's worker steps: one GIL
            set_switch_interval()
        how = "the stage scheduler (async worker)" if self.sched is not None else "rt.infer per TorchServe batch"
        log.info("eeruntime: serving %s on %s through %s", bundle, self.device, how)
        self.initialized = True

    def handle(self, data: Optional[List[Any]], context: Any) -> Any:
        """A list of bodies (one per request), or in async mode a coroutine that returns it."""
        if self.sched is not None:
            return self._handle_async(data or [], context)
        return self._reply(context, self._run_batch(self._decode_all(data or [], context)))

    async def _handle_async(self, data: List[Any], context: Any) -> List[Any]:
        import asyncio

        try:
            decoded = self._decode_all(data, context)
            replies = list(await asyncio.gather(*(self._submit(x) for x in decoded)))
        except Exception:  # a bug here must not fail every request in flight (module docstring)
            log.exception("unexpected error serving %d request(s)", len(data))
            replies = [_error(500, "internal error")] * len(data)
        return self._reply(context, replies)

    # -- requests in, answers out -------------------------------------------------------------

    def _decode_all(self, data: List[Any], context: Any) -> List[Any]:
        """Per request: its input on the model's device, or a Reply refusing it."""
        out: List[Any] = []
        for idx, req in enumerate(data):
            try:
                x = self._decode(req, _header(context, idx, "content-type"))
            except InputError as e:
                out.append(_error(e.status, str(e)))
                continue
            except Exception:  # a bug here fails this request alone, not its batch (module docstring)
                log.exception("unexpected error decoding a request")
                out.append(_error(500, "internal error"))
                continue
            if self.sched is None and self._by_name:
                # batch mode: mapped by the input adapter here, on the host (as the scheduler's
                # submit maps each request), so that what it refuses (ids out of the vocabulary, a
                # mask of another shape) is this request's 422, not a 500 for its whole batch
                try:
                    x = self.rt.model.input_adapter(x)
                except (ValueError, TypeError) as e:
                    out.append(_error(422, str(e)))
                    continue
            if self.device.type != "cpu":
                x = (
                    {k: t.to(self.device) for k, t in x.items()}  # a text model's inputs by name
                    if isinstance(x, dict)
                    else from_tuple([t.to(self.device) for t in as_tuple(x)], x)
                )
            out.append(x)
        return out

    def _decode(self, req: Any, content_type: str) -> Any:
        key = next((k for k in ("body", "data") if isinstance(req, dict) and k in req), None)
        if key is None:
            raise InputError(
                'send the inputs as the request body: JSON {"inputs": [...]} or safetensors bytes', status=400
            )
        value = req[key]
        if isinstance(value, (bytes, bytearray)):
            return decode_body(bytes(value), content_type, self.spec, self.max_rows)
        if isinstance(value, str) and content_type.split(";")[0].strip().lower() != "application/json":
            # a text/* body TorchServe decoded as UTF-8 (refused by its Content-Type)
            return decode_body(value.encode(), content_type, self.spec, self.max_rows)
        # Anything else is the JSON document TorchServe parsed from an application/json body:
        # an object, or a list, a string, a number, a bool or null, which decode_json refuses
        # (a 422 saying what the body must be; never bytes(number), which would allocate that many)
        return decode_json(value, self.spec, self.max_rows)

    async def _submit(self, x: Any) -> Any:
        if _refused(x):
            return x
        try:
            result = await self.sched.submit(x)
        except Exception as e:  # never raised into TorchServe (see the module's docstring)
            why = refusal(e)
            if why is None:
                log.exception("unexpected error serving a request")
            return _error(*(why or (500, "internal error")))
        self.spec.learn(x)
        return result

    def _run_batch(self, decoded: List[Any]) -> List[Any]:
        """Batch mode: one ``rt.infer`` per group of requests whose rows have the same shapes."""
        replies: List[Any] = list(decoded)
        groups: Dict[Any, List[int]] = {}
        for i, x in enumerate(decoded):
            if not _refused(x):
                # (a text model's request by name, a dict, reaches here as the adapter's tuple: _decode_all)
                groups.setdefault(tuple((t.shape[1:], t.dtype) for t in as_tuple(x)), []).append(i)
        for idxs in groups.values():
            try:
                x = cat_rows([decoded[i] for i in idxs])
                if self._by_name and isinstance(x, tuple):  # the adapter's state, by name (its order is the stages')
                    x = dict(zip(self.rt.model.input_adapter.names, x))
                result = self.rt.infer(x)
            except Exception:  # a failing model answers 500 to the requests in this call, logged here
                log.exception("the model failed on a batch of %d requests", len(idxs))
                for i in idxs:
                    replies[i] = _error(500, "the model failed on the batch holding this request")
                continue
            start = 0
            for i in idxs:
                n = as_tuple(decoded[i])[0].shape[0]
                replies[i] = type(result)(
                    *(t[start : start + n] for t in (result.logits, result.exit_index, result.confidence))
                )
                start += n
                self.spec.learn(decoded[i])
        return replies

    def _reply(self, context: Any, replies: List[Any]) -> List[Any]:
        bodies: List[Any] = []
        for idx, r in enumerate(replies):
            if _refused(r):
                status, ctype, body = r
            else:
                if r.logits.device.type != "cpu":
                    r = type(r)(r.logits.cpu(), r.exit_index.cpu(), r.confidence.cpu())
                safetensors = any(t in _header(context, idx, "accept") for t in SAFETENSORS_TYPES)
                status = 200
                ctype = SAFETENSORS_TYPES[0] if safetensors else "application/json"
                body = encode_safetensors(r) if safetensors else encode_json(r)
            context.set_response_status(status, HTTPStatus(status).phrase, idx)
            context.set_response_content_type(idx, ctype)
            bodies.append(body)
        return bodies
