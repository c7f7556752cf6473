"""Backend dispatch for the fast ops, in the xformers style.

Each op has one table of backends, declared in its module beside its ``*_ref``. A backend says, for concrete inputs, either ``None``
(it can run them) or a sentence saying why it cannot. ``backend="auto"`` takes the first backend
that can run; naming a backend that cannot run raises :class:`BackendUnavailable` with its reason, and the
backend's fix when the backend itself is missing (:class:`Missing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run the given inputs."""


class Missing(str):
    """A reason a backend cannot run that its ``fix`` addresses: the backend itself is absent or
    unusable here (the extension not built, triton not installed), whatever the inputs. A forced
    backend's error carries the fix for these only: for a refusal of the inputs (a dtype, a
    device, a layout) a build instruction would send the user the wrong way."""


def missing(reason: Optional[str]) -> Optional[Missing]:
    """``reason`` marked as one the backend's fix addresses (None stays None)."""
    return None if reason is None else Missing(reason)


@dataclass
class Backend:
    """One row of an op's backend table."""

    name: str
    fn: Callable
    # why_not(*args, forced=bool, **kwargs) -> None when it can run, else the reason.
    why_not: Callable[..., Optional[str]]
    # what the user should do when this backend is forced but cannot run for a :class:`Missing`
    # reason (the backend absent); refused inputs get their reason alone.
    fix: str = ""
    # it never reads device data on the host, so it may run inside a captured CUDA graph
    capturable: bool = False


# op -> its backend table, in the order ``auto`` tries them. Each op module declares its own
# table once, beside its ``*_ref`` (:func:`table`); nothing registers by import side effect.
_REGISTRY: Dict[str, List[Backend]] = {}


def table(op: str, rows: List[Backend]) -> List[Backend]:
    """Declare ``op``'s backend table (highest priority first; the torch reference last)."""
    _REGISTRY[op] = list(rows)
    return _REGISTRY[op]


def backends(op: str) -> List[str]:
    """Names of the backends registered for ``op``, in priority order."""
    return [b.name for b in _REGISTRY.get(op, [])]


def explain(op: str, *args: Any, **kwargs: Any) -> Dict[str, Optional[str]]:
    """For each backend of ``op``: ``None`` if it would run these inputs under ``auto``, else why not."""
    return {b.name: b.why_not(*args, forced=False, **kwargs) for b in _REGISTRY.get(op, [])}


def select(op: str, backend: str, *args: Any, **kwargs: Any) -> Backend:
    """The backend that runs ``op`` on these inputs; raises with the reason when none can."""
    candidates = _REGISTRY.get(op, [])
    if backend == "auto":
        reasons = []
        for b in candidates:
            why = b.why_not(*args, forced=False, **kwargs)
            if why is None:
                return b
            reasons.append(f"{b.name}: {why}")
        raise BackendUnavailable(f"no backend can run {op} on these inputs ({'; '.join(reasons)})")
    for b in candidates:
        if b.name == backend:
            why = b.why_not(*args, forced=True, **kwargs)
            if why is not None:
                msg = f"backend {backend!r} cannot run {op}: {why}"
                if b.fix and isinstance(why, Missing):
                    msg += f". {b.fix}"
                raise BackendUnavailable(msg)
            return b
    known = ", ".join(repr(n) for n in ["auto", *backends(op)])
    raise ValueError(f"unknown backend {backend!r} for {op}; accepted: {known}")


def capturable_backends(op: str) -> List[str]:
    """Names of ``op``'s backends that may run inside a captured CUDA graph."""
    return [b.name for b in _REGISTRY.get(op, []) if b.capturable]


def capturable(op: str, backend: str, *args: Any, **kwargs: Any) -> bool:
    """Whether the backend :func:`select` picks for these inputs may run in a captured CUDA graph
    (False when none can run them)."""
    try:
        return select(op, backend, *args, **kwargs).capturable
    except (BackendUnavailable, ValueError):
        return False
