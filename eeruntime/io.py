"""Loading a saved runtime: ``ee.load(path, model)`` (the files and how ``rt.save`` writes them:
:mod:`eeruntime.runtime_file`).

Only JSON and safetensors are read back; nothing is unpickled. The model's own weights are added
by ``rt.save(path, weights=True)`` (``model.safetensors``, see :mod:`eeruntime.bundle`); ``load``
then takes the model's constructor instead of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .bundle import ModelSource, build_model
from .bundle_schema import check_runtime_doc, check_safetensors, read_json
from .calibrate import Calibration
from .criteria import CRITERIA, MODEL_CRITERIA, learned_criterion_class
from .model import is_multi_exit, model_device
from .runtime import EERuntime
from .runtime_file import FORMAT, FORMAT_VERSION, JSON_NAME, WEIGHTS_NAME, _paths, save_runtime  # noqa: F401


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
    """A registered learned criterion rebuilt from its config; None when the entry names none."""
    cls = learned_criterion_class(entry)
    config = entry.get("config")
    if cls is None or config is None:
        return None
    return cls.from_config(config)


def _rebuild_from_model(entry: dict, model):
    """A criterion that reads heads inside the model (PTEE confidence heads, differentiable-
    branching gates): their weights are the model's, so it is rebuilt from the model by name."""
    factory = MODEL_CRITERIA.get(entry.get("name"))
    return None if factory is None else factory(model)


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
    json_path, _ = _paths(path)
    doc = _read(json_path)
    weights_path = json_path.with_name(doc["weights"]) if doc.get("weights") else None
    model = build_model(model, doc.get("model"), json_path.parent)
    if not is_multi_exit(model):
        raise TypeError(
            f"load needs the MultiExitModel (an nn.Module with stages and exits) the runtime was saved for, "
            f"got {type(model).__name__}"
        )
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
                    f"{json_path} was saved with the criterion module {entry.get('registered') or entry.get('cls')!r}, which load cannot "
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
