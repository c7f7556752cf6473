"""Backend dispatch for the fast ops, in the xformers style.

Each op keeps a priority list of backends. A backend says, for concrete inputs, either ``None``
(it can run them) or a sentence saying why it cannot. ``backend="auto"`` takes the first backend
that can run; naming a backend that cannot run raises :class:`BackendUnavailable` with its reason
and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run the given inputs."""


@dataclass
class Backend:
    name: str
    fn: Callable
    # why_not(*args, forced=bool, **kwargs) -> None when it can run, else the reason.
    why_not: Callable[..., Optional[str]]
    # what the user should do when this backend is forced but cannot run.
    fix: str = ""


_REGISTRY: Dict[str, List[Backend]] = {}


def register(op: str, backend: Backend, *, priority: Optional[int] = None) -> None:
    """Register ``backend`` for ``op``; lower ``priority`` index is tried first (default: last)."""
    backends = _REGISTRY.setdefault(op, [])
    backends[:] = [b for b in backends if b.name != backend.name]
    if priority is None:
        backends.append(backend)
    else:
        backends.insert(priority, backend)


def backends(op: str) -> List[str]:
    """Names of the backends registered for ``op``, in priority order."""
    return [b.name for b in _REGISTRY.get(op, [])]


def explain(op: str, *args, **kwargs) -> Dict[str, Optional[str]]:
    """For each backend of ``op``: ``None`` if it would run these inputs under ``auto``, else why not."""
    return {b.name: b.why_not(*args, forced=False, **kwargs) for b in _REGISTRY.get(op, [])}


def select(op: str, backend: str, *args, **kwargs) -> Backend:
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
                if b.fix:
                    msg += f". {b.fix}"
                raise BackendUnavailable(msg)
            return b
    known = ", ".join(repr(n) for n in ["auto", *backends(op)])
    raise ValueError(f"unknown backend {backend!r} for {op}; accepted: {known}")
