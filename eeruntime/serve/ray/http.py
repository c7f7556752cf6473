"""HTTP bodies of the Ray Serve deployments (Ray's HTTP proxy hands the replica a Starlette
``Request``). A request is

- JSON: ``{"inputs": [[...], ...]}`` (one tensor, batch dim first; numbers become the model's
  float dtype, or stay integers for a model that has taken integers), or
- safetensors bytes (``application/octet-stream`` or ``application/vnd.safetensors``) with a
  tensor ``inputs`` (or ``input``), or ``input_0``, ``input_1``, ... for a tuple input;
- for a text model attached with ``ee.attach_exits``, its inputs by name, as ``rt.infer`` takes a
  dict: JSON ``{"inputs": {"input_ids": [[...]], "attention_mask": [[...]]}}`` or safetensors
  tensors so named (read and checked by the shared codec, as ``eeruntime serve`` reads them).

The answer is JSON ``{"logits": [[...]], "exit_index": [...], "confidence": [...]}`` plus the
serving facts in ``meta``. A malformed body gets a 400 saying what was wrong; one over the size
limit a 413 (before it is read whole); an input unlike the ones the model has answered (row
shape, kind of dtype; the checks of ``eeruntime serve``, :class:`~eeruntime.serve.codec.InputSpec`)
a 422; an overloaded tier a 503; a timeout a 504; never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch

from ..codec import (
    SAFETENSORS_TYPES,
    InputError,
    InputSpec,
    json_named,
    json_tensor,
    may_hold_booleans,
    parse_json,
    read_body,
)

MAX_BODY_BYTES = 64 << 20


class BadRequest(InputError):
    """The client's body cannot be served (HTTP 400, or ``status``)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message, status=status)


def is_http_request(obj) -> bool:
    try:
        from starlette.requests import Request
    except ImportError:  # pragma: no cover - Ray Serve ships starlette
        return False
    return isinstance(obj, Request)


def _from_safetensors(body: bytes, spec: Optional[InputSpec] = None):
    from safetensors.torch import load as st_load

    spec = spec or InputSpec()
    try:
        tensors = st_load(body)
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's
        raise BadRequest(f"the body is not valid safetensors bytes ({type(e).__name__})") from None
    if spec.names and not set(tensors).isdisjoint(spec.names):
        # a text model's inputs by name (a positional name among them is refused as unknown: it
        # was read alone and the named ones, a mask, dropped without a word)
        return spec.check_named(tensors, sys.maxsize, "safetensors tensors")
    for name in ("inputs", "input"):  # (``input``: the name ``eeruntime serve`` reads)
        if name in tensors:
            return _floats_as_model(tensors[name], spec)
    parts: List[torch.Tensor] = []
    while f"input_{len(parts)}" in tensors:
        parts.append(_floats_as_model(tensors[f"input_{len(parts)}"], spec))
    if not parts:
        named = f", or by the model's input names {list(spec.names)}" if spec.names else ""
        raise BadRequest(
            f"safetensors body needs a tensor 'inputs' (or input_0, input_1, ...{named}); got {sorted(tensors)}"
        )
    return tuple(parts)


def _floats_as_model(t: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    # Float inputs in the model's float dtype, as JSON numbers are (float64 bytes for a float32
    # model reached the model and failed there, a 500); integers are checked, never cast here.
    return t.to(spec.dtype) if t.is_floating_point() else t


def _from_json(body: bytes, spec: Optional[InputSpec] = None):
    try:
        doc = parse_json(body)  # (nested past the parser's limit too: the client's error, not a 500)
    except InputError as e:
        raise BadRequest(str(e)) from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequest('a JSON body is an object with "inputs": a nested list of numbers, batch dim first')
    spec = spec or InputSpec()
    if isinstance(doc["inputs"], dict):  # a text model's inputs by name (a 422 for another model)
        return json_named(doc["inputs"], spec, sys.maxsize, malformed_status=400, maybe_bools=may_hold_booleans(body))
    try:  # (a JSON boolean too: a 422 naming it, as eeruntime serve answers)
        x = json_tensor(doc["inputs"], spec, malformed_status=400, maybe_bools=may_hold_booleans(body))
    except InputError as e:
        raise BadRequest(str(e), status=e.status) from None
    if x.dim() < 2:
        raise BadRequest(f'"inputs" needs a batch dimension: shape [batch, ...], got {list(x.shape)}')
    return x


async def read_inputs(request, spec: InputSpec, max_bytes: Optional[int] = None):
    """The input tensor (or tuple) of an HTTP request, checked against what the model has taken
    (``spec``); an :class:`~eeruntime.serve.codec.InputError` (:class:`BadRequest`) when it is
    not one, with the HTTP status it maps to."""
    if request.method != "POST":
        raise BadRequest(f"send inputs with POST, got {request.method}")
    body = await read_body(request, MAX_BODY_BYTES if max_bytes is None else max_bytes)
    if not body:
        raise BadRequest('empty body: send JSON {"inputs": [...]} or safetensors bytes')
    # media types are case-insensitive; parameters (; charset=...) do not change the format
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    x = _from_safetensors(body, spec) if ctype in SAFETENSORS_TYPES else _from_json(body, spec)
    # (a text model's inputs by name, a dict, were checked as they were read)
    return x if isinstance(x, dict) else spec.check(x, max_rows=sys.maxsize)


def answer_json(answer: Dict[str, Any]) -> Dict[str, Any]:
    """The answer as strict JSON: a float tensor's non-finite values (a NaN input row's logits)
    as "nan", "inf", "-inf", as the HTTP server spells them (JSON has no such numbers, and the
    response would fail to encode)."""
    from ..codec import strict_rows

    out = {}
    for key, value in answer.items():
        if isinstance(value, torch.Tensor):
            rows = value.tolist()
            value = strict_rows(rows) if value.is_floating_point() and isinstance(rows, list) else rows
        elif isinstance(value, list) and all(isinstance(v, float) for v in value):
            # the thresholds: inf is a valid one ("never exit there"), and Ray wrote it as the
            # bare Infinity no strict JSON parser reads
            value = strict_rows(value)
        out[key] = value
    return out


def error_response(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)
