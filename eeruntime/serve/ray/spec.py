"""How a Ray Serve replica builds its runtime: a :class:`RuntimeSpec` of plain values (strings,
numbers, paths), so it travels to replicas on other machines as a deployment argument and can be
written in a ``serve run`` config. The model's code comes from the user as ``module:factory``
(never pickled); its weights from a saved bundle or a safetensors file (README, "Scale-out with
Ray")."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from eeruntime.names import lookup
from eeruntime.thresholds import thresholds_from_json

_FACTORY_MESSAGES = {
    "syntax": "a model factory is named 'module:function' (e.g. 'eeruntime.zoo:digits_cnn'), got {spec!r}",
    "import": "cannot import {module!r} for the model factory {spec!r}: {error}; it must be importable on every "
    "Ray node (installed, or on PYTHONPATH when the cluster starts)",
    "attribute": "{module!r} has no attribute {attr!r} (model factory {spec!r})",
}


def resolve_factory(name: str) -> Callable:
    """``"package.module:function"`` -> the function (a model factory)."""
    obj = lookup(name, _FACTORY_MESSAGES)
    if not callable(obj):
        raise ValueError(f"model factory {name!r} is not callable")
    return obj


@dataclass
class RuntimeSpec:
    """Everything a replica needs to rebuild the runtime.

    Args:
        model: the model factory, ``"module:function"``; called with ``model_kwargs``.
        bundle: a directory written by ``rt.save`` (thresholds, criterion, calibration; the
            model's weights when saved with them). None: ``thresholds``/``criterion``/``final``.
        weights: a safetensors file of the model's ``state_dict`` (when the bundle has none).
        thresholds, criterion, final: the runtime's settings when there is no bundle;
            ``thresholds`` also overrides the bundle's.
        seed: ``torch.manual_seed`` before the factory runs (factories with random weights give
            the same model in every replica).
        torch_threads: ``torch.set_num_threads`` in the replica (None: torch's default). Several
            replicas on one machine each want fewer threads than it has cores.
    """

    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    bundle: Optional[str] = None
    weights: Optional[str] = None
    thresholds: Union[None, float, List[float]] = None
    criterion: str = "entropy"
    final: str = "last"
    seed: Optional[int] = 0
    torch_threads: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.model, str) or self.model.count(":") != 1:
            raise ValueError(f"model must name a factory as 'module:function', got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        if self.thresholds is not None:
            given = self.thresholds
            values = thresholds_from_json(
                list(given) if isinstance(given, Sequence) and not isinstance(given, str) else given
            )
            self.thresholds = [_threshold(t) for t in values] if isinstance(values, list) else _threshold(values)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value) -> RuntimeSpec:
        """A spec from a ``RuntimeSpec`` or a dict of its fields (a ``serve run`` config)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"unknown runtime spec field(s) {sorted(unknown)}; accepted: {sorted(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise TypeError(f"a runtime spec is a RuntimeSpec or a dict, got {type(value).__name__}")

    def build(self):
        """The :class:`~eeruntime.EERuntime` this spec describes (in eval mode, on CPU)."""
        import torch

        import eeruntime as ee

        if self.torch_threads is not None:
            torch.set_num_threads(int(self.torch_threads))
        factory = resolve_factory(self.model)

        def make():
            if self.seed is not None:
                torch.manual_seed(int(self.seed))
            return factory(**self.model_kwargs)

        kwargs = {} if self.thresholds is None else {"thresholds": self.thresholds}
        if self.bundle is not None and self.weights is None and _bundle_has_weights(self.bundle):
            # rt.save(path, weights=True): ee.load builds the model and checks the weights fit it.
            return ee.load(self.bundle, make, **kwargs)
        model = make()
        if self.weights is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(self.weights))
        if self.bundle is not None:
            return ee.load(self.bundle, model, **kwargs)
        return ee.EERuntime(model, thresholds=self.thresholds, criterion=self.criterion, final=self.final)


def _bundle_has_weights(path) -> bool:
    """Whether a saved runtime holds the model's weights (its JSON names them under "model")."""
    import json
    from pathlib import Path

    p = Path(path)
    doc = json.loads((p if p.suffix == ".json" else p / "runtime.json").read_text())
    return bool(doc.get("model"))


def _threshold(value: Any) -> float:
    """One threshold of a spec as a float: a number (not a bool: JSON's true is no threshold)
    or an infinity already read from its string; anything else refused here, when the app is
    built, rather than by every replica that fails to start on it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'thresholds must be numbers (or "inf" / "-inf"), got {value!r} ({type(value).__name__})')
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(
            'a threshold is too large for a float (an int past its range); "inf" means: never exit there'
        ) from None
    if math.isnan(number):  # (every replica's coerce_thresholds refuses it: refused here once)
        raise ValueError('a threshold is NaN; thresholds must be numbers (or "inf" / "-inf": never exit there)')
    return number
