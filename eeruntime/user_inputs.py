"""What the command line loads from the user: a model from a ``module:factory`` name, its weights,
and data from a file or a ``module:function`` name. Nothing is unpickled (``torch.load`` with
``weights_only=True``, safetensors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from eeruntime.model import is_multi_exit
from eeruntime.names import lookup, split_name


class InputError(ValueError):
    """Something the user named cannot be loaded or is not what the command needs."""


def resolve(spec: str, what: str):
    """The object named ``module:attr`` (``attr`` may be dotted). The current directory is
    importable, as with ``python -m``, so ``mymodels:build`` finds ``./mymodels.py``."""
    if split_name(spec) is not None and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    messages = {
        "syntax": f"{what} must be given as module:name (e.g. mymodels:build_model), got {{spec!r}}",
        "import": f"cannot import {{module!r}} for {what} {{spec!r}}: {{error}}",
        "attribute": f"{{module!r}} has no {{attr!r}} (named by {what} {{spec!r}})",
    }
    return lookup(spec, messages, InputError)


def load_model(spec: str, weights: Optional[str] = None, device=None) -> nn.Module:
    """Call the factory ``module:factory`` (no arguments) for a multi-exit model; load
    ``weights`` (a safetensors state dict) into it when given; move it to ``device``; eval mode."""
    factory = resolve(spec, "--model")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not is_multi_exit(model):
        raise InputError(
            f"--model {spec!r} must name a function returning an ee.MultiExitModel (stages and exits), "
            f"got {type(model).__name__}"
        )
    if weights is not None:
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise InputError(f"--weights {weights!r}: no such file")
        try:
            model.load_state_dict(load_file(weights, device="cpu"), strict=True)
        except Exception as e:  # noqa: BLE001  (safetensors header errors, missing/unexpected keys)
            raise InputError(f"--weights {weights!r} do not load into the model of {spec!r}: {e}") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def _pair(obj, source: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(obj, dict):
        if "x" not in obj:
            raise InputError(f"{source} holds {sorted(obj)}; it needs a tensor 'x' (and 'y' for labels)")
        x, y = obj["x"], obj.get("y")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor):
        x, y = obj
    elif isinstance(obj, torch.Tensor):
        x, y = obj, None
    else:
        batches = list(obj) if hasattr(obj, "__iter__") else None
        if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
            raise InputError(
                f"{source} must give x, (x, y), {{'x': ..., 'y': ...}} or (x, y) batches; got {type(obj).__name__}"
            )
        x = torch.cat([torch.as_tensor(b[0]) for b in batches])
        y = torch.cat([torch.as_tensor(b[1]) for b in batches])
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise InputError(f"{source}: x must be a non-empty tensor with samples along dim 0")
    if y is not None:
        y = torch.as_tensor(y)
        if y.shape[:1] != x.shape[:1] or y.dtype.is_floating_point:
            raise InputError(
                f"{source}: y must be integer labels, one per row of x ({x.shape[0]}), "
                f"got {y.dtype} of shape {tuple(y.shape)}"
            )
        y = y.long()
    return x, y


def load_data(spec: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inputs ``x`` and labels ``y`` (None when absent) from a ``.safetensors`` file (tensors
    ``x`` and ``y``), a ``.pt`` file (a dict or an ``(x, y)`` pair, read with ``weights_only``) or a
    ``module:function`` returning one of those or an iterable of ``(x, y)`` batches."""
    path = Path(spec)
    if path.suffix in (".safetensors", ".pt", ".pth"):
        if not path.is_file():
            raise InputError(f"--data {spec!r}: no such file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except Exception as e:  # noqa: BLE001  (safetensors' own error, a traceback before)
                raise InputError(f"--data {spec!r} cannot be read as safetensors: {e}") from None
            return _pair(tensors, f"--data {spec!r}")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"--data {spec!r} cannot be read as tensors (weights_only): {e}") from None
        return _pair(obj, f"--data {spec!r}")
    if ":" not in spec:
        raise InputError(f"--data must be a .safetensors or .pt file or a module:function, got {spec!r}")
    fn = resolve(spec, "--data")
    return _pair(fn() if callable(fn) else fn, f"--data {spec!r}")
