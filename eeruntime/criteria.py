"""Confidence criteria: their names, their score direction, and validation.

A criterion turns a row of logits into one score. ``entropy`` exits when the score is *below* the
threshold; every other criterion (and a user callable) exits when the score is *at or above* it.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

CRITERIA = ("entropy", "max_prob", "margin", "norm_entropy")
# What a sample that reaches the final exit gets: its logits, or the mean of all its exits' logits.
FINAL_MODES = ("last", "average")
# Integer codes shared with the Triton kernel (a tl.constexpr) so both agree on the meaning.
CRITERION_CODE = {name: i for i, name in enumerate(CRITERIA)}

Criterion = Union[str, Callable]


def check_criterion(criterion: Criterion) -> Criterion:
    """Validate a criterion.

    Accepted: a name of ``CRITERIA``; a callable ``f(logits, state) -> [B]`` score; or a
    *per-exit scorer*, a callable with attribute ``per_exit = True`` called as
    ``f(logits, state, k, history) -> [B]`` where ``k`` is the 0-based exit and ``history`` the
    list of the earlier exits' logits for the same rows (carried through compaction only when
    the scorer sets ``uses_history = True``; otherwise an empty list). Confidence heads, gates and
    EENet scorers are per-exit scorers. Callables exit when score >= threshold.
    """
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in CRITERIA:
        return criterion
    raise ValueError(
        f"unknown criterion {criterion!r}; accepted: {', '.join(map(repr, CRITERIA))} "
        "or a callable f(logits, state) -> [B] score (exits when score >= threshold)"
    )


def lower_is_confident(criterion: Criterion) -> bool:
    """True when a sample exits on ``score < threshold`` (entropy), False for ``score >= threshold``."""
    return criterion == "entropy"


def criterion_name(criterion: Criterion) -> str:
    if isinstance(criterion, str):
        return criterion
    return getattr(criterion, "__qualname__", None) or type(criterion).__name__


def is_per_exit(criterion: Criterion) -> bool:
    return callable(criterion) and bool(getattr(criterion, "per_exit", False))


def uses_history(criterion: Criterion) -> bool:
    return is_per_exit(criterion) and bool(getattr(criterion, "uses_history", False))


# ------------------------------------------------------------------ registered learned criteria
# Saved runtimes name a learned criterion by the name it is registered under here, never by a
# Python module path, so moving a class does not break saved files (see docs/design.md, "Saving").
LEARNED_CRITERIA: Dict[str, type] = {}  # name -> a module class with to_config / from_config
MODEL_CRITERIA: Dict[str, Callable] = {}  # name -> factory(model): a criterion reading heads of the model
_LEGACY_PATHS: Dict[str, str] = {}  # the module path a format-1 file wrote (cls=...) -> name


def register_criterion(name: str, *, legacy_path: Optional[str] = None):
    """Class decorator: a learned criterion module saved by ``name`` (it needs ``to_config`` and
    ``from_config``). ``legacy_path``: the module path files of format 1 named it by."""

    def register(cls):
        _refuse_taken(LEARNED_CRITERIA, name, cls, "register_criterion")
        LEARNED_CRITERIA[name] = cls
        cls.registered_name = name
        if legacy_path is not None:
            _LEGACY_PATHS[legacy_path] = name
        return cls

    return register


def register_model_criterion(factory: Callable) -> Callable:
    """Function decorator: ``factory(model)`` rebuilds a criterion whose weights live in the
    model; saved by the factory's name, which is also the criterion's ``criterion_name``."""
    _refuse_taken(MODEL_CRITERIA, factory.__name__, factory, "register_model_criterion")
    MODEL_CRITERIA[factory.__name__] = factory
    return factory


def _refuse_taken(table: Dict, name: str, obj, how: str) -> None:
    """A name names one criterion: a second registration under it would make ``ee.load`` rebuild
    files saved with the first as the second. The same definition registered again (its module
    re-imported or reloaded) replaces itself."""
    old = table.get(name)
    if old is None or (old.__module__, old.__qualname__) == (obj.__module__, obj.__qualname__):
        return
    raise ValueError(
        f"{how}: the name {name!r} is taken by {old.__module__}.{old.__qualname__}; saved runtimes name a "
        f"criterion by it, so {obj.__module__}.{obj.__qualname__} needs another name"
    )


def learned_criterion_class(entry: dict) -> Optional[type]:
    """The registered class a saved criterion entry names (``registered``, or a format-1 ``cls``)."""
    name = entry.get("registered") or _LEGACY_PATHS.get(entry.get("cls") or "")
    return LEARNED_CRITERIA.get(name) if name else None
