"""The files of a saved runtime: their format, and writing them (``rt.save``; reading is
:func:`eeruntime.io.load`).

A saved runtime is a directory holding

- ``runtime.json``: format name and version, number of exits, thresholds, criterion, final mode
  and the calibration summary (``Calibration.to_dict``), strict JSON (infinite thresholds as the
  strings ``"inf"`` / ``"-inf"``). A learned criterion is named by its registered name
  (``eeruntime.criteria.register_criterion``), never by a module path;
- ``weights.safetensors``: the criterion's weights when it is a module (an EENet scorer).
  Confidence heads and gates (``ee.train.confidence_criterion`` / ``gate_criterion``) live in the
  model, so their weights come with the model and ``load`` rebuilds the criterion from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Tuple

from torch import nn

from ._json import enc_float as _enc
from .bundle import save_model_weights
from .bundle_schema import FORMAT as SCHEMA_FORMAT
from .bundle_schema import FORMAT_VERSION as SCHEMA_VERSION
from .criteria import criterion_name, is_per_exit, uses_history

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
        to_config = getattr(criterion, "to_config", None)
        entry.update(
            kind="module",
            registered=getattr(type(criterion), "registered_name", None),
            config=to_config() if callable(to_config) else None,
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
        save_file(
            tensors, str(weights_path), metadata={"format": FORMAT, "criterion": entry["registered"] or entry["name"]}
        )
        doc["weights"] = weights_path.name
    text = json.dumps(doc, indent=1, allow_nan=False)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, json_path)
    return json_path
