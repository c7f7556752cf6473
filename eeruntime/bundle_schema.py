"""The schema of a saved runtime's files, checked whole before anything is built from them.

``ee.load`` reads ``runtime.json`` (see :mod:`eeruntime.io`) and, for a learned criterion, a
safetensors file. A file that is not what ``rt.save`` writes (binary, truncated, hand-edited,
from another program) must fail with an error that names the file, the field and what is
accepted, not with a ``KeyError`` deep in the loader or a huge allocation from a size in a config.
:func:`check_runtime_doc` checks every field of ``runtime.json``; :func:`check_safetensors`
checks a safetensors file's header against the file's length before a byte of data is read.

Unknown top-level keys are left alone (a newer writer's additions, or a section another module
checks, such as the model weights of a bundle).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .criteria import CRITERIA

FORMAT = "eeruntime.runtime"
FORMAT_VERSION = 1
FINAL_MODES = ("last", "average")
CRITERION_KINDS = ("builtin", "module", "callable")
MAX_EXITS = 4096
MAX_JSON_BYTES = 256 << 20
# Sizes in a learned criterion's config: each bounds an allocation made before weights are read.
# Keyed by the registered name (eeruntime.criteria.register_criterion); files of format 1 named
# the class by its module path (``cls``), mapped here to the name it is registered under now.
CONFIG_FIELDS: Dict[str, Dict[str, tuple]] = {
    "eenet": {"num_exits": (2, MAX_EXITS), "top_k": (1, 1024), "hidden": (1, 1 << 16)},
}
LEGACY_CLASSES = {"eeruntime.scorers.EENetScorer": "eenet"}
SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_SAFETENSORS_HEADER = 100 << 20


class BadFile(ValueError):
    """A saved runtime's file does not follow the schema; the message names file, field, and what is accepted."""


def _fail(path, field: str, problem: str, accepted: str):
    raise BadFile(
        f"{path}: field {field!r} {problem}; accepted: {accepted}"
        if field != "the file"
        else f"{path}: the file {problem}; accepted: {accepted}"
    )


def _show(v) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool)) or v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(path, field: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(path, field, f"is {_show(v)} ({type(v).__name__})", f"an integer in [{lo}, {hi}]")
    if not lo <= v <= hi:
        _fail(path, field, f"is {v}", f"an integer in [{lo}, {hi}]")
    return v


def _number(path, field: str, v, *, nan: bool = False, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    """A JSON number, or one of the strings ``rt.save`` writes for non-finite values."""
    specials = ("inf", "-inf") + (("nan",) if nan else ())
    accepted = "a number" + (
        f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
    )
    accepted += " or one of " + ", ".join(map(repr, specials))
    if isinstance(v, str) and v in specials:
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(path, field, f"is {_show(v)} ({type(v).__name__})", accepted)
    x = float(v)
    if math.isnan(x) and not nan:
        _fail(path, field, "is NaN", accepted)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        _fail(path, field, f"is {x}", accepted)
    return x


def _list(path, field: str, v, length: Optional[int], item: Callable[[str, Any], Any]) -> list:
    if not isinstance(v, list):
        _fail(
            path,
            field,
            f"is {_show(v)} ({type(v).__name__})",
            f"a list of {length if length is not None else 'any number of'} items",
        )
    if length is not None and len(v) != length:
        _fail(path, field, f"has {len(v)} items", f"{length} items")
    return [item(f"{field}[{i}]", x) for i, x in enumerate(v)]


def _str(path, field: str, v, choices=None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        _fail(path, field, f"is {_show(v)}", ", ".join(map(repr, choices)) if choices else "a string")
    return v


def _bool(path, field: str, v) -> bool:
    if not isinstance(v, bool):
        _fail(path, field, f"is {_show(v)}", "true or false")
    return v


def _obj(path, field: str, v, required=()) -> dict:
    if not isinstance(v, dict):
        _fail(path, field, f"is {_show(v)} ({type(v).__name__})", "a JSON object")
    for key in required:
        if key not in v:
            _fail(
                path,
                f"{field}.{key}" if field else key,
                "is missing",
                f"every {field or 'file'} has {', '.join(required)}",
            )
    return v


def read_json(path: Path) -> dict:
    """The JSON object in ``path``: refuses a missing, huge, binary or non-JSON file by name."""
    if not path.is_file():
        raise FileNotFoundError(f"no saved runtime at {path} (rt.save writes runtime.json in a directory)")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise BadFile(f"{path}: is {size} bytes; a saved runtime's JSON is at most {MAX_JSON_BYTES} bytes")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(
            f"{path}: is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); accepted: the JSON file rt.save writes"
        ) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"{path}: is not valid JSON ({e}); accepted: the JSON file rt.save writes") from None
    except RecursionError:
        raise BadFile(f"{path}: nests too deep to be a saved runtime") from None
    return _obj(path, "the file", doc)


def check_runtime_doc(doc: dict, path) -> dict:
    """Check every field of a ``runtime.json`` document (``path`` names it in errors); returns it."""
    _obj(path, "the file", doc)
    if doc.get("format") != FORMAT:
        raise BadFile(
            f"{path} is not a saved eeruntime runtime: field 'format' is {_show(doc.get('format'))}; "
            f"accepted: {FORMAT!r} (a file written by rt.save)"
        )
    version = doc.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise BadFile(
            f"{path} has format version {version!r}; this eeruntime reads version {FORMAT_VERSION}"
            + (" (it was written by a newer eeruntime: upgrade)" if newer else "")
        )
    _obj(path, "", doc, ("num_exits", "thresholds", "criterion", "final"))
    K = _int(path, "num_exits", doc["num_exits"], 1, MAX_EXITS)
    _list(path, "thresholds", doc["thresholds"], K - 1, lambda f, v: _number(path, f, v))
    _str(path, "final", doc["final"], FINAL_MODES)
    crit = _check_criterion(path, doc["criterion"], K)
    weights = doc.get("weights")
    if weights is not None:
        _file_name(path, "weights", weights)
    elif crit["kind"] == "module":
        _fail(
            path,
            "weights",
            "is null but the criterion is a learned module (its weights would be random)",
            "the name of the .safetensors file rt.save wrote beside the JSON",
        )
    if doc.get("calibration") is not None:
        _check_calibration(path, doc["calibration"], K)
    if doc.get("model") is not None:
        _check_model(path, doc["model"])
    return doc


def _file_name(path, field: str, v) -> str:
    """The name of a file beside the JSON: never a path, so a hand-edited file cannot make load
    read ``/etc/...`` or a file of another directory."""
    name = _str(path, field, v)
    if name in ("", ".", "..") or "/" in name or "\\" in name or not name.endswith(".safetensors"):
        _fail(path, field, f"is {_show(name)}", "the name of a .safetensors file beside the JSON (no directories)")
    return name


def _check_model(path, m) -> None:
    """The model weights of a bundle (``rt.save(path, weights=True)``, eeruntime/bundle.py): the
    file's name and each tensor's shape and dtype, which load compares with the factory's model
    and with the file's own header before a tensor is read."""
    _obj(path, "model", m, ("weights", "tensors"))
    _file_name(path, "model.weights", m["weights"])
    for key in ("factory", "class"):
        if m.get(key) is not None:
            _str(path, f"model.{key}", m[key])
    _obj(path, "model.tensors", m["tensors"])
    for name, entry in m["tensors"].items():
        field = f"model.tensors[{json.dumps(name)}]"
        _obj(path, field, entry, ("shape", "dtype"))
        _list(path, f"{field}.shape", entry["shape"], None, lambda f, d: _int(path, f, d, 0, 1 << 62))
        _str(path, f"{field}.dtype", entry["dtype"])


def _check_criterion(path, c, K: int) -> dict:
    _obj(path, "criterion", c, ("kind",))
    kind = _str(path, "criterion.kind", c["kind"], CRITERION_KINDS)
    if kind == "builtin":
        _obj(path, "criterion", c, ("name",))
        _str(path, "criterion.name", c["name"], CRITERIA)
        return c
    _obj(path, "criterion", c, ("name",))
    _str(path, "criterion.name", c["name"])
    for flag in ("per_exit", "uses_history"):
        if flag in c:
            _bool(path, f"criterion.{flag}", c[flag])
    if kind == "module":
        # Named by its registered name ("registered", null for a user's module) or, in files of
        # format 1, by its Python path ("cls", mapped to the name it is registered under now).
        if "registered" not in c and "cls" not in c:
            _fail(
                path, "criterion.registered", "is missing", "the name a learned criterion is registered under (or null)"
            )
        name = None
        if c.get("cls") is not None:
            cls = _str(path, "criterion.cls", c["cls"])
            name = LEGACY_CLASSES.get(cls, cls)
        if c.get("registered") is not None:
            name = _str(path, "criterion.registered", c["registered"])
        if c.get("config") is not None:
            _check_config(path, "criterion.config", c["config"], name, K)
    return c


def _check_config(path, field: str, config, cls: str, K: int) -> None:
    _obj(path, field, config)
    sizes = CONFIG_FIELDS.get(cls)
    if sizes is None:
        return  # a user's module: its own from_config judges its config
    _obj(path, field, config, tuple(sizes))
    for key, (lo, hi) in sizes.items():
        _int(path, f"{field}.{key}", config[key], lo, hi)
    if "num_exits" in sizes and config["num_exits"] != K:
        _fail(
            path, f"{field}.num_exits", f"is {config['num_exits']} but num_exits is {K}", f"{K}, the model's exit count"
        )


_CAL_NUMBERS = ("accuracy", "final_accuracy", "expected_cost", "plain_cost")


def _check_calibration(path, cal, K: int) -> None:
    f = "calibration"
    _obj(
        path,
        f,
        cal,
        (
            "method",
            "criterion",
            "final",
            "thresholds",
            "exit_fractions",
            "exit_costs",
            "cost_unit",
            "num_samples",
            *_CAL_NUMBERS,
        ),
    )
    _str(path, f"{f}.method", cal["method"])
    _str(path, f"{f}.criterion", cal["criterion"])
    _str(path, f"{f}.final", cal["final"], FINAL_MODES)
    _str(path, f"{f}.cost_unit", cal["cost_unit"])
    _list(path, f"{f}.thresholds", cal["thresholds"], K - 1, lambda g, v: _number(path, g, v))
    _list(path, f"{f}.exit_fractions", cal["exit_fractions"], K, lambda g, v: _number(path, g, v, lo=0.0, hi=1.0))
    _list(path, f"{f}.exit_costs", cal["exit_costs"], K, lambda g, v: _number(path, g, v, nan=True, lo=0.0))
    for key in _CAL_NUMBERS:
        bounds = {"lo": 0.0, "hi": 1.0} if "accuracy" in key else {"lo": 0.0}
        _number(path, f"{f}.{key}", cal[key], nan=True, **bounds)
    if cal.get("relative_cost") is not None:
        _number(path, f"{f}.relative_cost", cal["relative_cost"], nan=True, lo=0.0)
    _int(path, f"{f}.num_samples", cal["num_samples"], 0, 1 << 62)
    if cal.get("scorer_config") is not None:
        _obj(path, f"{f}.scorer_config", cal["scorer_config"])
    for key in ("candidates", "frontier"):
        if cal.get(key) is not None:
            _list(path, f"{f}.{key}", cal[key], None, lambda g, v: _point(path, g, v, K))
    if cal.get("grid") is not None:
        _list(
            path,
            f"{f}.grid",
            cal["grid"],
            K - 1,
            lambda g, v: _list(path, g, v, None, lambda h, t: _number(path, h, t)),
        )
    if cal.get("settings") is not None:
        _obj(path, f"{f}.settings", cal["settings"])


def _point(path, field: str, v, K: int):
    """A calibration candidate: [thresholds (K-1), accuracy, cost]."""
    if not isinstance(v, list) or len(v) != 3:
        _fail(path, field, f"is {_show(v)}", "[thresholds, accuracy, cost]")
    _list(path, f"{field}[0]", v[0], K - 1, lambda g, t: _number(path, g, t))
    _number(path, f"{field}[1]", v[1], nan=True)
    _number(path, f"{field}[2]", v[2], nan=True)
    return v


def check_safetensors(path: Path) -> Dict[str, dict]:
    """Check a safetensors file's header against its length before it is loaded: a truncated or
    foreign file fails here, by name, instead of in the reader (or in an allocation). Returns the
    header's tensors by name (each with ``dtype``, ``shape``, ``data_offsets``)."""
    if not path.is_file():
        raise FileNotFoundError(f"the saved weights {path} are missing")
    size = path.stat().st_size
    accepted = "a safetensors file as rt.save writes it"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFile(f"{path}: is {size} bytes, too short for a safetensors header; accepted: {accepted}")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise BadFile(
                f"{path}: declares a {n}-byte header but holds {size - 8} bytes after its length "
                f"(truncated or not safetensors); accepted: {accepted}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadFile(f"{path}: its header is not JSON (not a safetensors file); accepted: {accepted}") from None
    if not isinstance(header, dict):
        raise BadFile(f"{path}: its header is not a JSON object; accepted: {accepted}")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise BadFile(f"{path}: tensor {name!r} has no known dtype ({_show(entry)}); accepted: {accepted}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise BadFile(f"{path}: tensor {name!r} has shape {_show(shape)}; accepted: {accepted}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise BadFile(f"{path}: tensor {name!r} has data_offsets {_show(offsets)}; accepted: {accepted}")
        begin, end = offsets
        if not 0 <= begin <= end <= data or end - begin != math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]]:
            raise BadFile(
                f"{path}: tensor {name!r} ({entry['dtype']} {shape}) lies at bytes [{begin}, {end}) of "
                f"{data} data bytes (truncated or corrupt); accepted: {accepted}"
            )
    return {k: v for k, v in header.items() if k != "__metadata__"}
