"""Request and response bodies shared by the HTTP server and the LitServe adapter.

Inputs (batch first; one sample is a batch of one):

- JSON ``{"inputs": <nested list>}``: one tensor, numbers only, converted to the model's dtype;
- safetensors bytes: ``input`` (one tensor) or ``input_0``, ``input_1``, ... (a tuple state).

A text model attached with ``ee.attach_exits`` (an input adapter whose ``names`` start with
``input_ids``: :class:`TokenInputSpec`) also takes its inputs by name, as ``rt.infer`` takes a
dict: safetensors tensors named ``input_ids``, ``attention_mask``, ... or JSON ``"inputs"`` as an
object of nested lists (``{"inputs": {"input_ids": [[...]], "attention_mask": [[...]]}}``);
decoded, such a request is a dict, which the scheduler's ``submit`` maps through the adapter.

Outputs: JSON ``{"logits": [[...]], "exit_index": [...], "confidence": [...]}`` or the same three
tensors as safetensors bytes. Every refusal is an :class:`InputError` whose message says what
was wrong and what is accepted; it never carries a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from itertools import chain
from typing import Optional, Sequence, Tuple

import torch

from .._json import enc_float
from ..state import dtype_name
from .scheduler import SchedulerClosed, SchedulerFull, StageFailed

SAFETENSORS_TYPES = ("application/vnd.safetensors", "application/octet-stream")


class InputError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def parse_json(body: bytes):
    """``body`` as JSON, or an :class:`InputError` (400) saying why not. Nesting deeper than the
    parser's recursion limit is refused as such (a client's error, not the server's)."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"the body is not valid JSON: {e}", status=400) from None
    except RecursionError:
        raise InputError("the body's JSON is nested too deeply to be read", status=400) from None


async def read_body(request, max_bytes: int) -> bytes:
    """A Starlette request's body, refused (413) as soon as it is known to exceed ``max_bytes``:
    from its Content-Length before any of it is read, else while it streams in (read whole first,
    a client could make the server hold any number of bytes). Shared by ``eeruntime serve`` and
    the Ray replicas."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError("Content-Length must be a number of bytes", status=400)
        if int(declared) > max_bytes:
            raise InputError(f"the body has {declared} bytes; at most {max_bytes} are accepted", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise InputError(f"the body exceeds {max_bytes} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


class InputSpec:
    """What one row of a request must look like: per member, its shape after the batch dim. Given
    at start (``--input-shape``) or learned from the first request the model answered, as is each
    member's dtype (``dtypes``; a float member's is ``dtype``, the model's: float inputs are cast
    to it as they are decoded). Until a request is answered, nothing of the dtypes is assumed.
    ``names``: the input names a request may give its tensors by (a text model's, as its input
    adapter lists them; none here: see :class:`TokenInputSpec`)."""

    names: Tuple[str, ...] = ()

    def __init__(self, shapes: Optional[Sequence[Tuple[int, ...]]] = None, dtype: torch.dtype = torch.float32):
        self.shapes = None if shapes is None else [tuple(int(d) for d in s) for s in shapes]
        self.dtype = dtype
        self.dtypes: Optional[list] = None

    def learn(self, x) -> None:
        parts = x if isinstance(x, tuple) else (x,)
        if self.shapes is None:
            self.shapes = [tuple(t.shape[1:]) for t in parts]
        if self.dtypes is None:
            self.dtypes = [t.dtype for t in parts]

    def json_dtype(self) -> Optional[torch.dtype]:
        """The dtype JSON numbers become: the model's float dtype, or None (as sent: ints stay
        ints, a float among them is refused by :meth:`check`) for a model of one input that has
        taken integers (token ids)."""
        ids = self.dtypes is not None and len(self.dtypes) == 1 and not self.dtypes[0].is_floating_point
        return None if ids else self.dtype

    def _conform(self, parts: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        """``parts`` in the dtypes the model has taken (``dtypes``). Another width of the same kind
        (an int32 where int64 was taken) is cast; another kind (integers or booleans where floats
        were taken, floats where token ids were) is refused, saying what the model takes: casting
        would be a guess at what the client meant (a model may read uint8 pixels as 0-255 and
        floats as 0-1), and the model itself would answer a 500 where the client erred."""
        assert self.dtypes is not None
        out = []
        for i, (t, want) in enumerate(zip(parts, self.dtypes)):
            if t.dtype != want:
                if _kind(t.dtype) != _kind(want):
                    name = "inputs" if len(parts) == 1 else f"input_{i}"
                    raise InputError(
                        f"{name} has dtype {dtype_name(t.dtype)}; this model takes "
                        f"{dtype_name(want)} (the dtype of the requests it has answered"
                        + ("; JSON numbers are converted to it)" if want.is_floating_point else ")")
                    )
                t = t.to(want)
            out.append(t)
        return tuple(out)

    def check(self, x, max_rows: int):
        parts = x if isinstance(x, tuple) else (x,)
        n = parts[0].shape[0] if parts[0].dim() else 0
        if any(t.dim() == 0 for t in parts):
            raise InputError("inputs need a batch dimension: send a list of samples, e.g. [[...]] for one sample")
        if n == 0:
            raise InputError("inputs hold no rows; send at least one sample")
        if n > max_rows:
            raise InputError(f"a request holds at most {max_rows} rows, got {n}; split it", status=413)
        for i, t in enumerate(parts):
            if t.shape[0] != n:
                raise InputError(f"input_{i} has {t.shape[0]} rows but input_0 has {n}; members share the batch dim")
        if self.shapes is not None:
            if len(parts) != len(self.shapes):
                raise InputError(f"the model takes {len(self.shapes)} input tensor(s), got {len(parts)}")
            for i, (t, want) in enumerate(zip(parts, self.shapes)):
                if tuple(t.shape[1:]) != want:
                    name = "inputs" if len(parts) == 1 else f"input_{i}"
                    raise InputError(
                        f"{name}: each row must have shape {list(want)}, got {list(t.shape[1:])} "
                        f"(the request's shape is {list(t.shape)}, batch first)"
                    )
        if self.dtypes is not None and len(self.dtypes) == len(parts):
            conformed = self._conform(parts)
            return conformed if isinstance(x, tuple) else conformed[0]
        for i, t in enumerate(parts):
            if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool)):
                raise InputError(f"input_{i} has dtype {t.dtype}; send floating-point (or integer) tensors")
        return x

    def check_named(self, given: dict, max_rows: int, what: str = "inputs") -> dict:
        """A request given by input names (``what``: how the body named them, for the messages),
        checked as :meth:`check` checks a tuple: names of ``names`` (a model without names
        refuses it), the first (``input_ids``) among them, a batch dim and the same rows in each,
        integer tensors (a mask may be bool; an empty one is left to the adapter, which says it
        has no tokens); returned in the adapter's order, a dict as ``rt.infer`` takes one (the
        adapter checks the rest at submit: shapes against input_ids', ids in the vocabulary, the
        length)."""
        check_names(given, self, what)
        named = {n: given[n] for n in self.names if n in given}
        main = self.names[0]
        for name, t in named.items():
            if t.dim() == 0:
                raise InputError(f"{name} needs a batch dimension: send a list of samples, e.g. [[...]] for one sample")
            ok = t.dtype in (torch.int64, torch.int32) or (t.dtype == torch.bool and name != main)
            if not ok and t.numel():
                raise InputError(
                    f"{name} has dtype {dtype_name(t.dtype)}; send integers (int64 or int32: token ids, "
                    "0/1 for attention_mask, which safetensors may also send as bool)"
                )
        n = named[main].shape[0]
        if n == 0:
            raise InputError(f"{main} holds no rows; send at least one sample")
        if n > max_rows:
            raise InputError(f"a request holds at most {max_rows} rows, got {n}; split it", status=413)
        for name, t in named.items():
            if t.shape[0] != n:
                raise InputError(f"{name} has {t.shape[0]} rows but {main} has {n}; the inputs share the batch dim")
        return named


class TokenInputSpec(InputSpec):
    """The requests of a text encoder attached with ``ee.attach_exits`` (its input adapter takes
    token ids, ``input_ids`` first): texts come in every length, so no row shape is learned, and
    JSON numbers are token ids (as sent), not the model's float dtype. The adapter checks the
    rest at submit (ids sent as floats, out of the vocabulary, too long: ``HFInputs``), whose
    refusal the front ends answer with a 4xx; the scheduler's ``pad_to`` lets lengths share
    batches. ``names``: the adapter's (``input_ids`` first), by which a request may name its
    tensors (:meth:`check_named`)."""

    def __init__(self, names: Sequence[str] = ("input_ids",)):
        super().__init__()
        self.names = tuple(names)

    def learn(self, x) -> None:
        pass

    def json_dtype(self) -> Optional[torch.dtype]:
        return None  # token ids: as sent


def input_spec_for(model) -> InputSpec:
    """What the server checks requests against by default: token ids for a text encoder
    attached with ``ee.attach_exits``, else learned shapes and dtypes (floats in the model's)."""
    adapter = getattr(model, "input_adapter", None)
    names = tuple(getattr(adapter, "names", ()))
    if names[:1] == ("input_ids",):
        return TokenInputSpec(names)
    return InputSpec(dtype=model_float_dtype(model))


def model_float_dtype(model) -> torch.dtype:
    """The model's floating-point dtype (its first float parameter's; float32 without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_names(given, spec: InputSpec, what: str) -> None:
    """An :class:`InputError` (422) unless ``given`` (a request's inputs by name: safetensors
    tensors, a JSON object) names only inputs of ``spec.names``, its first (``input_ids``)
    among them; a model without names refuses every named request, saying what it takes."""
    if not spec.names:
        raise InputError(
            f"{what} are named {sorted(map(str, given))[:8]}; this model takes no named inputs (inputs by name "
            'are for a text model attached with ee.attach_exits): send JSON "inputs" as a nested list '
            "(batch first), or safetensors tensors named 'input' or input_0, input_1, ..."
        )
    unknown = sorted(set(given) - set(spec.names))
    if unknown or spec.names[0] not in given:
        why = f"unknown input name(s) {unknown}" if unknown else f"no {spec.names[0]!r}"
        defaults = {"attention_mask": "every token real", "token_type_ids": "segment 0"}
        optional = "; ".join(
            f"{n} optional: {defaults[n]}" if n in defaults else f"{n} optional" for n in spec.names[1:]
        )
        raise InputError(
            f"{what}: {why}; this model takes {list(spec.names)} by name ({spec.names[0]} required"
            + (f"; {optional})" if optional else ")")
        )


def _ragged_message(e: Exception, label: str = "inputs") -> str:
    return f"{label} must be a rectangular nested list of numbers (batch first): {e}"


def json_tensor(
    data: list, spec: InputSpec, malformed_status: int = 422, maybe_bools: bool = True, label: str = "inputs"
) -> torch.Tensor:
    """JSON ``"inputs"`` (a nested list) as a tensor in the dtype JSON numbers become
    (:meth:`InputSpec.json_dtype`). A list that is not a rectangle of numbers is an
    :class:`InputError` (``malformed_status``: 422 for ``eeruntime serve``, LitServe and
    TorchServe, 400 for the Ray replicas); so is a JSON boolean (422), unless the model's one
    input has been booleans: ``torch.tensor`` reads true / false as 1 / 0, which answered a
    client's mistake as if it were data. Shared by every front end that reads JSON itself.
    ``maybe_bools=False``: the caller knows there is none (:func:`may_hold_booleans` of the raw
    body), and the check, about 8 us of a small request's decode (measured), is skipped.
    ``label``: what the messages call ``data`` (``inputs.attention_mask`` for a named input)."""
    try:
        x = torch.tensor(data, dtype=spec.json_dtype())
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise InputError(_ragged_message(e, label), status=malformed_status) from None
    if maybe_bools and spec.dtypes != [torch.bool]:
        _refuse_booleans(data, x, label)
    return x


def json_named(
    data: dict, spec: InputSpec, max_rows: int, malformed_status: int = 422, maybe_bools: bool = True
) -> dict:
    """JSON ``"inputs"`` given as an object of named nested lists (a text model's inputs by name,
    ``{"input_ids": [[...]], "attention_mask": [[...]]}``) as a dict of tensors, each read as
    :func:`json_tensor` reads ``"inputs"`` and checked by :meth:`InputSpec.check_named`;
    refused (422) for a model without named inputs. Shared by every front end that reads JSON."""
    check_names(data, spec, '"inputs" fields')
    tensors = {
        name: json_tensor(v, spec, malformed_status, maybe_bools, label=f"inputs.{name}") for name, v in data.items()
    }
    return spec.check_named(tensors, max_rows, '"inputs" fields')


def may_hold_booleans(body: bytes) -> bool:
    """Whether a JSON ``body`` may hold a boolean: JSON spells them ``true`` and ``false``, in
    lowercase and unescaped, so a UTF-8 body without either substring holds none (one scan in
    C). A body json.loads reads as UTF-16 or UTF-32 (a BOM, or zero bytes among its first four)
    spells them in other bytes: it may. Both literals hold an ``e``, which a body of plain
    numbers lacks: one ``memchr`` then answers (0.07 us for a 64-value body against 2 us for the
    two substring scans and the encoding's detection, measured)."""
    if body[:1] != b"{" or body[1:2] == b"\x00":  # not a UTF-8 object at its first byte: as json.loads detects
        if json.detect_encoding(body[:4]) not in ("utf-8", "utf-8-sig"):
            return True
    return b"e" in body and (b"true" in body or b"false" in body)


def _refuse_booleans(data: list, x: torch.Tensor, label: str = "inputs") -> None:
    """An :class:`InputError` naming the first JSON boolean in ``data`` (``x``: the tensor made
    of it), if there is one. Cheap for the common body: a boolean became exactly 0 or 1, so a
    tensor without either holds none (one comparison over the tensor); else one pass over the
    elements in C (``map(type, ...)``, the levels flattened by ``chain``: ``x`` is a rectangle),
    and a walk in Python only to say where the boolean is."""
    if not x.numel():
        return
    if x.dtype != torch.bool and not ((x == 0) | (x == 1)).any():
        return
    flat = [data] if x.dim() == 0 else data  # ("inputs" one number, or one boolean, itself)
    for _ in range(x.dim() - 1):
        flat = list(chain.from_iterable(flat))
    if bool not in map(type, flat):
        return
    at = next(i for i, v in enumerate(flat) if type(v) is bool)
    where = "".join(f"[{int(i)}]" for i in torch.unravel_index(torch.tensor(at), x.shape))
    raise InputError(
        f"{label}{where} is {json.dumps(flat[at])}: JSON booleans are not numbers; send the model's inputs as numbers"
    )


def decode_json(doc, spec: InputSpec, max_rows: int, maybe_bools: bool = True):
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise InputError('the JSON body must be an object with an "inputs" field: {"inputs": [[...], ...]}')
    unknown = sorted(set(doc) - {"inputs"})
    if unknown:
        raise InputError(f'unknown field(s) {unknown}; the body takes only "inputs"')
    data = doc["inputs"]
    if not isinstance(data, list):
        if isinstance(data, dict):  # a text model's inputs by name
            return json_named(data, spec, max_rows, maybe_bools=maybe_bools)
        named = f", or an object of {list(spec.names)} by name" if spec.names else ""
        raise InputError(f'"inputs" must be a list of samples (batch first){named}, got {type(data).__name__}')
    if spec.shapes is not None and len(spec.shapes) != 1:
        raise InputError("this model takes several input tensors; send them as safetensors (input_0, input_1, ...)")
    return spec.check(json_tensor(data, spec, maybe_bools=maybe_bools), max_rows)


def decode_safetensors(body: bytes, spec: InputSpec, max_rows: int):
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(body)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise InputError(f"the body is not a valid safetensors file: {e}", status=400) from None
    if "input" in tensors and len(tensors) == 1:
        parts: Tuple[torch.Tensor, ...] = (tensors["input"],)
    else:
        names = [f"input_{i}" for i in range(len(tensors))]
        if sorted(tensors) != sorted(names) or not names:
            if spec.names and not set(tensors).isdisjoint(spec.names):  # a text model's inputs by name
                return spec.check_named(tensors, max_rows, "safetensors tensors")
            named = f", or by the model's input names {list(spec.names)}" if spec.names else ""
            raise InputError(
                f"safetensors inputs must be named 'input' or input_0, input_1, ...{named}; got {sorted(tensors)}"
            )
        parts = tuple(tensors[n] for n in names)
    cast_parts = tuple(t.to(spec.dtype) if t.is_floating_point() else t for t in parts)
    return spec.check(cast_parts if len(cast_parts) > 1 else cast_parts[0], max_rows)


def decode_body(body: bytes, content_type: str, spec: InputSpec, max_rows: int):
    """A request body as its ``Content-Type`` says (JSON, or safetensors bytes; an empty type is
    read as JSON); shared by the HTTP server and the TorchServe handler."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in SAFETENSORS_TYPES:
        return decode_safetensors(body, spec, max_rows)
    if ctype not in ("application/json", ""):
        raise InputError(
            f"unsupported Content-Type {ctype!r}; send application/json or application/vnd.safetensors", status=415
        )
    return decode_json(parse_json(body), spec, max_rows, maybe_bools=may_hold_booleans(body))


def refusal(e: BaseException) -> Optional[Tuple[int, str]]:
    """The HTTP status and message for a request the scheduler did not answer (``submit``'s
    errors), or None for any other exception; a stage failure is logged here with its cause."""
    if isinstance(e, (SchedulerFull, SchedulerClosed)):
        return 503, str(e)
    if isinstance(e, TimeoutError):
        return 504, str(e)
    if isinstance(e, StageFailed):
        logging.getLogger("eeruntime.serve").error("%s", e, exc_info=e.__cause__)
        return 500, "the model failed on this request"
    if isinstance(e, InputError):
        return e.status, str(e)
    if isinstance(e, (ValueError, TypeError)):
        # submit's own checks refused the input (e.g. a text model's input adapter: an input its
        # stages do not take): the client's error, said as submit says it
        return 422, str(e)
    return None


def strict_rows(rows):
    """Nested lists of floats as strict JSON (non-finite values as "nan", "inf", "-inf", as in
    the saved runtimes); the common all-finite case is returned as it is."""
    return (
        rows
        if all(map(math.isfinite, _flat(rows)))
        else [strict_rows(r) if isinstance(r, list) else enc_float(r) for r in rows]
    )


def _flat(rows):
    for r in rows:
        if isinstance(r, list):
            yield from r
        else:
            yield r


def encode_json(result) -> dict:
    return {
        "logits": strict_rows(result.logits.float().tolist()),
        "exit_index": result.exit_index.tolist(),
        "confidence": strict_rows(result.confidence.float().tolist()),
    }


# safetensors' names of the dtypes an answer may hold (its format:
# https://github.com/huggingface/safetensors#format)
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def encode_safetensors(result) -> bytes:
    """The answer's three tensors (on the host) as safetensors bytes, written here rather than by
    ``safetensors.torch.save``, which spends most of a small answer's time in numpy reductions
    and ctypes (docs/serving.md, "The HTTP front end's own cost"). The format: the header's length
    as 8 little-endian bytes, the JSON header ``{name: {"dtype", "shape", "data_offsets"}}``
    padded with spaces to a multiple of 8 bytes, then each tensor's bytes in the header's order.
    Tests read it back with ``safetensors.torch.load``."""
    tensors = {"logits": result.logits, "exit_index": result.exit_index, "confidence": result.confidence}
    if sys.byteorder != "little" or any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()):
        from safetensors.torch import save  # (the format's bytes are little-endian)

        return save({k: t.contiguous() for k, t in tensors.items()})
    entries, blobs, offset = [], [], 0
    for name, t in tensors.items():
        t = t.detach()
        # numpy's bytes of the tensor itself, in C order (not its storage's: a view's storage may
        # be a whole batch's); bf16, which numpy lacks, as the int16 of the same bits
        data = (t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        shape = ",".join(map(str, t.shape))
        entries.append(
            f'"{name}":{{"dtype":"{_SAFETENSORS_DTYPES[t.dtype]}","shape":[{shape}],'
            f'"data_offsets":[{offset},{offset + len(data)}]}}'
        )
        blobs.append(data)
        offset += len(data)
    head = ("{" + ",".join(entries) + "}").encode()
    head += b" " * (-len(head) % 8)
    return b"".join([len(head).to_bytes(8, "little"), head, *blobs])
