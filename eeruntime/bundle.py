"""The model half of a self-contained saved runtime: ``rt.save(path, weights=True)`` and
``ee.load(path, model_factory)``.

A bundle is a saved runtime (see :mod:`eeruntime.io`) plus ``model.safetensors``: the model's
``state_dict`` (parameters and buffers, e.g. batch-norm statistics). The model's *code* is not
saved: ``load`` calls the user's constructor (a callable or a ``"module:factory"`` name) and fills
the new model with the saved tensors. The JSON records each tensor's name, shape and dtype, so a
constructor that builds a different model is refused with the names that differ, before any
tensor is read. Nothing is unpickled, and no module named in the file is ever imported: the
factory name saved as a hint is only quoted in error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Union

from torch import nn

from eeruntime.bundle_schema import check_safetensors
from eeruntime.names import lookup
from eeruntime.state import dtype_name

MODEL_WEIGHTS_NAME = "model.safetensors"
# torch's dtype names (as the JSON records them) to safetensors' (as a file's header has them)
_SAFETENSORS_DTYPE = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}

ModelSource = Union[nn.Module, Callable[[], nn.Module], str]


def _factory_name(factory) -> Optional[str]:
    """``module:qualname`` of a named top-level callable (a hint for whoever loads the bundle)."""
    if isinstance(factory, str):
        return factory
    mod, qual = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if mod and qual and "<" not in qual:
        return f"{mod}:{qual}"
    return None


def save_model_weights(model: nn.Module, path: Path, name: str, factory=None) -> dict:
    """Write ``model``'s state dict to ``path``; return the JSON entry that describes it as the
    file ``name`` (the caller renames ``path`` to it), with the factory hint and each tensor's
    shape and dtype."""
    from safetensors.torch import save_file

    # Copies on the host: safetensors refuses tensors that share storage (tied weights) and
    # device memory; the caller's model is never written.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "eeruntime.model"})
    return {
        "weights": name,
        "factory": _factory_name(factory),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in tensors.items()},
    }


_FACTORY_MESSAGES = {
    "syntax": "a model factory must be a callable or a 'module:factory' string such as "
    "'eeruntime.zoo:digits_cnn', got {spec!r}",
    "import": "cannot import the model factory's module {module!r} (from {spec!r}): {error}",
    "attribute": "{module!r} has no attribute {attr!r} (model factory {spec!r})",
}


def resolve_factory(spec) -> Callable[[], nn.Module]:
    """A ``"package.module:function"`` name (or ``"package.module:Class.method"``) imported and
    looked up; a callable is returned as it is."""
    if callable(spec) and not isinstance(spec, str):
        return spec
    obj = lookup(spec, _FACTORY_MESSAGES)
    if not callable(obj):
        raise ValueError(f"the model factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _check_fits(model: nn.Module, entry: dict, where: Path) -> None:
    """Compare the factory model's state dict with the saved one by name and shape; the error
    lists what is missing, extra and mis-shaped (the first few of each)."""
    saved: Dict[str, dict] = entry.get("tensors") or {}
    have = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in have if k not in saved]
    extra = [k for k in saved if k not in have]
    shapes = [
        f"{k}: saved {saved[k]['shape']}, model {have[k]}" for k in have if k in saved and saved[k]["shape"] != have[k]
    ]
    if not (missing or extra or shapes):
        return
    hint = f" (it was saved from {entry.get('factory')!r})" if entry.get("factory") else ""
    listed = _listed([("not in the bundle", missing), ("not in the model", extra), ("shape differs", shapes)])
    raise ValueError(f"the model built by the factory does not match the weights in {where}{hint}: {listed}")


def _listed(groups) -> str:
    """``what: a, b, c and 4 more; ...`` for each non-empty group (the first five of each)."""
    parts = []
    for what, items in groups:
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{what}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)


def _check_file(entry: dict, weights: Path) -> None:
    """The weights file must hold the tensors the JSON describes (names, shapes, dtypes): a file
    saved over by another save, copied from another bundle or edited is refused by name here,
    not loaded silently or failed on in ``load_state_dict``."""
    header = check_safetensors(weights)
    saved: Dict[str, dict] = entry["tensors"]
    missing = [k for k in saved if k not in header]
    extra = [k for k in header if k not in saved]
    differ = [
        f"{k}: described {saved[k]['dtype']} {saved[k]['shape']}, file {header[k]['dtype']} {header[k]['shape']}"
        for k in saved
        if k in header
        and (
            header[k]["shape"] != saved[k]["shape"]
            or _SAFETENSORS_DTYPE.get(saved[k]["dtype"], header[k]["dtype"]) != header[k]["dtype"]
        )
    ]
    if missing or extra or differ:
        raise ValueError(
            f"{weights} does not hold the tensors the bundle's JSON describes (written by another save, or "
            f"edited?): {_listed([('missing from the file', missing), ('not described', extra), ('differ', differ)])}"
            "; save the bundle again with rt.save(path, weights=True)"
        )


def build_model(source: ModelSource, entry: Optional[dict], directory: Path) -> nn.Module:
    """The model a saved runtime runs: ``source`` itself when it is a module (used as given, its
    weights untouched), else the factory's new model filled with the bundle's weights."""
    if isinstance(source, nn.Module):
        return source
    factory = resolve_factory(source)
    if entry is None:
        raise ValueError(
            f"{directory} holds no model weights (save with rt.save(path, weights=True)); pass the model "
            "itself instead of a factory"
        )
    weights = directory / entry["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"the bundle's model weights {weights} are missing")
    _check_file(entry, weights)  # before the factory runs: a broken bundle costs no model build
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned a {type(model).__name__}, not a torch.nn.Module")
    _check_fits(model, entry, weights)
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # the reader's own errors name neither the file nor what is wrong in it
        raise ValueError(f"{weights}: cannot be read as safetensors ({e})") from None
    model.load_state_dict(state, strict=True)
    return model
