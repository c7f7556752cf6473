"""The files of a saved runtime: their format, and writing them (``rt.save``; reading is
:func:`eeruntime.io.load`).

A saved runtime is a directory holding

- ``runtime.json``: format name and version, number of exits, thresholds, criterion, final mode
  and the calibration summary (``Calibration.to_dict``), strict JSON (infinite thresholds as the
  strings ``"inf"`` / ``"-inf"``). A learned criterion is named by its registered name
  (``eeruntime.criteria.register_criterion``), never by a module path;
- ``weights.safetensors``: the criterion's weights when it is a module (an EENet scorer).
  Confidence heads and gates (``ee.train.confidence_criterion`` / ``gate_criterion``) live in the
  model, so their weights come with the model and ``load`` rebuilds the criterion from it;
- ``model.safetensors`` with ``rt.save(path, weights=True)``: the model's (eeruntime/bundle.py).

Saved as ``NAME.json`` instead of a directory, the files beside it are ``NAME.weights.safetensors``
and ``NAME.model.safetensors``; the JSON names them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import List, Tuple

from torch import nn

from ._json import enc_float as _enc
from .bundle import MODEL_WEIGHTS_NAME, save_model_weights
from .bundle_schema import FORMAT as SCHEMA_FORMAT
from .bundle_schema import FORMAT_VERSION as SCHEMA_VERSION
from .criteria import MODEL_CRITERIA, criterion_name, is_per_exit, uses_history

FORMAT, FORMAT_VERSION = SCHEMA_FORMAT, SCHEMA_VERSION  # the schema module holds the one definition
JSON_NAME = "runtime.json"
WEIGHTS_NAME = "weights.safetensors"


def _paths(path) -> Tuple[Path, Path]:
    """The JSON and the criterion weights of a saved runtime at ``path``: ``runtime.json`` and
    ``weights.safetensors`` in a directory, or ``NAME.json`` and ``NAME.weights.safetensors``
    beside it, so that two runtimes saved as JSON files in one folder keep their own weights (the
    JSON names its files: a file saved before keeps loading as it was written)."""
    p = Path(path)
    if p.suffix == ".json":
        return p, p.with_name(f"{p.stem}.{WEIGHTS_NAME}")
    return p / JSON_NAME, p / WEIGHTS_NAME


def _model_path(json_path: Path) -> Path:
    """Where ``weights=True`` writes the model's weights: ``model.safetensors`` in a directory,
    ``NAME.model.safetensors`` beside ``NAME.json``."""
    if json_path.name == JSON_NAME:
        return json_path.with_name(MODEL_WEIGHTS_NAME)
    return json_path.with_name(f"{json_path.stem}.{MODEL_WEIGHTS_NAME}")


def _criterion_entry(criterion, model) -> dict:
    if isinstance(criterion, str):
        return {"kind": "builtin", "name": criterion}
    entry = {
        "name": criterion_name(criterion),
        "per_exit": is_per_exit(criterion),
        "uses_history": uses_history(criterion),
    }
    if isinstance(criterion, nn.Module):
        to_config = getattr(criterion, "to_config", None)
        entry.update(
            kind="module",
            # the class's own registration: a subclass inherits the attribute, and ee.load would
            # rebuild the registered parent in its place
            registered=vars(type(criterion)).get("registered_name"),
            config=to_config() if callable(to_config) else None,
        )
    else:
        entry["kind"] = "callable"
        _refuse_a_name_load_rebuilds_otherwise(criterion, criterion_name(criterion), model)
    return entry


def _refuse_a_name_load_rebuilds_otherwise(criterion, name: str, model) -> None:
    """``ee.load`` rebuilds a callable criterion by its name from ``MODEL_CRITERIA``; a user's own
    function that happens to carry a registered name (``def patience(logits, state)``) would come
    back as the registered criterion, deciding other exits without a word. Refused here, where the
    name can still be changed."""
    factory = MODEL_CRITERIA.get(name)
    if factory is None:
        return
    try:
        rebuilt = factory(model)
    except Exception:  # noqa: BLE001  (a factory that cannot rebuild from this model: not the same criterion)
        rebuilt = None
    if rebuilt is None or type(rebuilt) is not type(criterion):
        raise ValueError(
            f"the callable criterion {criterion!r} is named {name!r}, the name of a registered criterion that "
            f"ee.load rebuilds by that name ({factory.__module__}.{factory.__qualname__}); the file would load as "
            "that one. Rename the function (a saved file names a callable by its name) and pass it to ee.load "
            "with criterion=..."
        )


def save_runtime(rt, path, weights: bool = False, factory=None) -> Path:
    """Write ``rt``'s thresholds, criterion, final mode, calibration summary (``rt.calibration``
    when set, e.g. by ``Calibration.runtime``) and criterion weights under ``path`` (a directory,
    created if needed; or a ``*.json`` file name with the weights beside it); with ``weights`` the
    model's weights too (``factory``: the constructor's name, kept as a hint). Returns the JSON path.

    Every file is written under a temporary name first and renamed into place once all are
    written, the JSON last: a save that fails (a criterion whose config is not JSON, a model that
    cannot be copied, a full disk) leaves a runtime saved there before as it was, and no
    temporary files."""
    json_path, weights_path = _paths(path)
    folder = json_path.parent
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"cannot save a runtime in {folder}: it is a file; give a directory (created if needed) or a *.json file name"
        )
    if json_path.is_dir():  # refused before a file is renamed into place beside it
        raise IsADirectoryError(f"cannot save a runtime as {json_path}: it is a directory")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staged: List[Tuple[Path, Path]] = []  # (temporary, final) in the order they are renamed

    def stage(final: Path) -> Path:
        # hidden and per process: a listing or another process saving there never sees it half-written
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        staged.append((tmp, final))
        return tmp

    try:
        criterion = rt.criterion
        entry = _criterion_entry(criterion, rt.model)
        calibration = getattr(rt, "calibration", None)
        model_entry = None
        if weights:
            model_path = _model_path(json_path)
            model_entry = save_model_weights(rt.model, stage(model_path), model_path.name, factory)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_exits": int(rt.num_exits),
            "thresholds": [_enc(t) for t in rt.thresholds],
            "criterion": entry,
            "final": rt.final,
            "calibration": calibration.to_dict() if calibration is not None else None,
            "weights": None,
            "model": model_entry,
        }
        if isinstance(criterion, nn.Module):
            from safetensors.torch import save_file

            # clones: safetensors refuses tensors that share storage, and it must not see device memory
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in criterion.state_dict().items()}
            save_file(
                tensors,
                str(stage(weights_path)),
                metadata={"format": FORMAT, "criterion": entry["registered"] or entry["name"]},
            )
            doc["weights"] = weights_path.name
        text = json.dumps(doc, indent=1, allow_nan=False)
        json_tmp = stage(json_path)
        json_tmp.write_text(text)
        # safetensors creates its files readable by their owner only (0600); give them the JSON's
        # mode (the umask's), so a bundle one user saves is readable where its JSON is.
        mode = stat.S_IMODE(json_tmp.stat().st_mode)
        for tmp, _ in staged:
            os.chmod(tmp, mode)
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if created:
            try:
                folder.rmdir()  # made for this save and left empty: nothing half-made stays behind
            except OSError:
                pass
        raise
    return json_path
