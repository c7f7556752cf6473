"""HTTP bodies of the Ray Serve deployments (Ray's HTTP proxy hands the replica a Starlette
``Request``). A request is

- JSON: ``{"inputs": [[...], ...]}`` (one float32 tensor, batch dim first), or
- ``application/octet-stream``: safetensors bytes with a tensor ``inputs`` (any dtype), or
  ``input_0``, ``input_1``, ... for a tuple input.

The answer is JSON ``{"logits": [[...]], "exit_index": [...], "confidence": [...]}`` plus the
serving facts in ``meta``. A bad body gets a 400 saying what was wrong; an overloaded tier a 503;
a timeout a 504; never a traceback.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import torch

MAX_BODY_BYTES = 64 << 20


class BadRequest(ValueError):
    """The client's body cannot be served (HTTP 400)."""


def is_http_request(obj) -> bool:
    try:
        from starlette.requests import Request
    except ImportError:  # pragma: no cover - Ray Serve ships starlette
        return False
    return isinstance(obj, Request)


def _from_safetensors(body: bytes):
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(body)
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's
        raise BadRequest(f"the body is not valid safetensors bytes ({type(e).__name__})") from None
    if "inputs" in tensors:
        return tensors["inputs"]
    parts: List[torch.Tensor] = []
    while f"input_{len(parts)}" in tensors:
        parts.append(tensors[f"input_{len(parts)}"])
    if not parts:
        raise BadRequest(f"safetensors body needs a tensor 'inputs' (or input_0, input_1, ...); got {sorted(tensors)}")
    return tuple(parts)


def _from_json(body: bytes):
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    except RecursionError:  # (nested past the parser's limit: the client's error, not a 500)
        raise BadRequest("the body's JSON is nested too deeply to be read") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequest('a JSON body is an object with "inputs": a nested list of numbers, batch dim first')
    try:
        x = torch.tensor(doc["inputs"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise BadRequest(f'"inputs" must be a rectangular nested list of numbers ({e})') from None
    if x.dim() < 2:
        raise BadRequest(f'"inputs" needs a batch dimension: shape [batch, ...], got {list(x.shape)}')
    return x


async def read_inputs(request, max_bytes: int = MAX_BODY_BYTES):
    """The input tensor (or tuple) of an HTTP request; :class:`BadRequest` when it is not one."""
    if request.method != "POST":
        raise BadRequest(f"send inputs with POST, got {request.method}")
    body = await request.body()
    if len(body) > max_bytes:
        raise BadRequest(f"body of {len(body)} bytes is over the limit of {max_bytes}")
    if not body:
        raise BadRequest('empty body: send JSON {"inputs": [...]} or safetensors bytes')
    ctype = request.headers.get("content-type", "")
    return _from_safetensors(body) if ctype.startswith("application/octet-stream") else _from_json(body)


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
        out[key] = value
    return out


def error_response(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)
