"""Saving and loading a runtime's settings: ``rt.save(path)`` and ``ee.load(path, model)``.

A saved runtime is a directory holding

- ``runtime.json``: format name and version, number of exits, thresholds, criterion, final mode
  and the calibration summary (``Calibration.to_dict``), strict JSON (infinite thresholds as the
  strings ``"inf"`` / ``"-inf"``);
- ``weights.safetensors``: the criterion's weights when it is a module (an EENet scorer).
  Confidence heads and gates (``ee.train.confidence_criterion`` / ``gate_criterion``) live in the
  model, so their weights come with the model and ``load`` rebuilds the criterion from it.

Only JSON and safetensors are read back; nothing is unpickled. The model's own weights are added
by ``rt.save(path, weights=True)`` (``model.safetensors``, see :mod:`eeruntime.bundle`); ``load``
then takes the model's constructor instead of the model.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Optional, Tuple

from torch import nn

from ._json import enc_float as _enc
from .bundle import ModelSource, build_model, save_model_weights
from .bundle_schema import (
    FORMAT as SCHEMA_FORMAT,
)
from .bundle_schema import (
    FORMAT_VERSION as SCHEMA_VERSION,
)
from .bundle_schema import (
    check_runtime_doc,
    check_safetensors,
    read_json,
)
from .criteria import CRITERIA, criterion_name, is_per_exit, uses_history

FORMAT, FORMAT_VERSION = SCHEMA_FORMAT, SCHEMA_VERSION  # the schema module holds the one definition
JSON_NAME = "runtime.json"
WEIGHTS_NAME = "weights.safetensors"


def _paths(path) -> Tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        return p, p.with_name(WEIGHTS_NAME)
    return p / JSON_NAME, p / WEIGHTS_NAME


def _criterion_entry(criterion) -> dict:
    if isinstance(criterion, str):
        return {"kind": "builtin", "name": criterion}
    entry = {
        "name": criterion_name(criterion),
        "per_exit": is_per_exit(criterion),
        "uses_history": uses_history(criterion),
    }
    if isinstance(criterion, nn.Module):
        cls = type(criterion)
        entry.update(
            kind="module",
            cls=f"{cls.__module__}.{cls.__qualname__}",
            config=criterion.to_config() if hasattr(criterion, "to_config") else None,
        )
    else:
        entry["kind"] = "callable"
    return entry


def save_runtime(rt, path, weights: bool = False, factory=None) -> Path:
    """Write ``rt``'s thresholds, criterion, final mode, calibration summary (``rt.calibration``
    when set, e.g. by ``Calibration.runtime``) and criterion weights under ``path`` (a directory,
    created if needed; or a ``*.json`` file name with the weights beside it); with ``weights`` the
    model's weights too (``factory``: the constructor's name, kept as a hint). Returns the JSON path."""
    json_path, weights_path = _paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    criterion = rt.criterion
    entry = _criterion_entry(criterion)
    calibration = getattr(rt, "calibration", None)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "num_exits": int(rt.num_exits),
        "thresholds": [_enc(t) for t in rt.thresholds],
        "criterion": entry,
        "final": rt.final,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "weights": None,
        "model": save_model_weights(rt.model, json_path.parent, factory) if weights else None,
    }
    if isinstance(criterion, nn.Module):
        from safetensors.torch import save_file

        # clones: safetensors refuses tensors that share storage, and it must not see device memory
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in criterion.state_dict().items()}
        save_file(tensors, str(weights_path), metadata={"format": FORMAT, "criterion": entry["cls"]})
        doc["weights"] = weights_path.name
    text = json.dumps(doc, indent=1, allow_nan=False)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, json_path)
    return json_path


def _read(json_path: Path) -> dict:
    # The whole file is checked against the schema before anything is built from it.
    return check_runtime_doc(read_json(json_path), json_path)


def _load_weights(module: nn.Module, weights_path: Path) -> None:
    from safetensors.torch import load_file

    if not weights_path.is_file():
        raise FileNotFoundError(f"the saved criterion's weights {weights_path} are missing")
    check_safetensors(weights_path)
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as e:  # the reader's own errors name neither the file nor what is wrong in it
        raise ValueError(f"{weights_path}: cannot be read as safetensors ({e})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights in {weights_path} do not fit the criterion module: {e}") from None


def _rebuild_module(entry: dict) -> Optional[nn.Module]:
    """A module criterion of eeruntime's own that can rebuild itself from its config (a class
    with ``from_config``); None for anything else. Only ``eeruntime.*`` modules are imported."""
    qual = entry.get("cls") or ""
    config = entry.get("config")
    mod_name, _, cls_name = qual.rpartition(".")
    if config is None or not (mod_name == "eeruntime" or mod_name.startswith("eeruntime.")):
        return None
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        return None
    return cls.from_config(config)


# Criteria that read heads inside the model (PTEE confidence heads, differentiable-branching
# gates): their weights are the model's, so load rebuilds them from the model by name. PABEE's
# patience has no weights at all: its factory ignores the model.
_MODEL_CRITERIA = {
    "confidence_criterion": "eeruntime.train.scorers",
    "gate_criterion": "eeruntime.train.scorers",
    "patience": "eeruntime.exit_rules.patience",
}


def _rebuild_from_model(entry: dict, model):
    mod_name = _MODEL_CRITERIA.get(entry.get("name"))
    if mod_name is None:
        return None
    try:
        factory = getattr(importlib.import_module(mod_name), entry["name"])
    except (ImportError, AttributeError):
        return None
    return factory(model)


def load(path, model: ModelSource, **runtime_kwargs):
    """An :class:`~eeruntime.EERuntime` for ``model`` with the settings saved by ``rt.save(path)``.

    ``model`` is the model itself (used as given), or, for a bundle saved with ``weights=True``,
    its constructor: a callable or a ``"module:factory"`` name, called with no arguments; the new
    model gets the saved weights after their names and shapes are checked against it.

    ``runtime_kwargs`` go to ``EERuntime`` (``graphs``, ``buckets``, backends) and may override
    ``final`` or ``thresholds``; ``criterion=`` supplies a criterion that cannot be rebuilt from
    the file (a user callable or module; a module gets the saved weights). Raises ``ValueError``
    for a file made for a different number of exits, an unknown format version, or a criterion it
    cannot rebuild.
    """
    from .calibrate import Calibration
    from .model import model_device
    from .runtime import EERuntime

    json_path, _ = _paths(path)
    doc = _read(json_path)
    weights_path = json_path.with_name(doc["weights"]) if doc.get("weights") else None
    model = build_model(model, doc.get("model"), json_path.parent)
    if not (hasattr(model, "stages") and hasattr(model, "exits")):
        raise TypeError(f"load needs the MultiExitModel the runtime was saved for, got {type(model).__name__}")
    K = len(model.stages)
    if int(doc["num_exits"]) != K:
        raise ValueError(f"{json_path} was saved for a model with {doc['num_exits']} exits, but this model has {K}")

    entry = doc["criterion"]
    criterion = runtime_kwargs.pop("criterion", None)
    if criterion is None:
        kind = entry.get("kind")
        if kind == "builtin":
            if entry.get("name") not in CRITERIA:
                raise ValueError(f"{json_path} names an unknown criterion {entry.get('name')!r}; accepted: {CRITERIA}")
            criterion = entry["name"]
        elif kind == "module":
            criterion = _rebuild_module(entry)
            if criterion is None:
                raise ValueError(
                    f"{json_path} was saved with the criterion module {entry.get('cls')!r}, which load cannot "
                    f"rebuild; construct it and pass it: ee.load(path, model, criterion=module) (its weights are "
                    f"loaded from {WEIGHTS_NAME})"
                )
        else:
            criterion = _rebuild_from_model(entry, model)
            if criterion is None:
                raise ValueError(
                    f"{json_path} was saved with the callable criterion {entry.get('name')!r}, which load "
                    "cannot rebuild; pass it: ee.load(path, model, criterion=fn)"
                )
    if isinstance(criterion, nn.Module) and weights_path is not None:
        _load_weights(criterion, weights_path)
    if isinstance(criterion, nn.Module):
        criterion.eval()
        device = model_device(model)
        if device is not None:
            criterion = criterion.to(device)

    thresholds = runtime_kwargs.pop("thresholds", [float(t) for t in doc["thresholds"]])
    final = runtime_kwargs.pop("final", doc["final"])
    rt = EERuntime(model, thresholds=thresholds, criterion=criterion, final=final, **runtime_kwargs)
    cal = doc.get("calibration")
    rt.calibration = (
        Calibration.from_dict(cal, scorer=None if isinstance(criterion, str) else criterion) if cal else None
    )
    return rt
