"""Objects named ``"package.module:attr"`` (``attr`` may be dotted: ``"mod:Class.build"``).

One lookup for every place a user names code by a string: ``ee.load``'s model factory
(eeruntime/bundle.py), the command line's ``--model``/``--data`` (eeruntime/user_inputs.py) and a
Ray replica's ``RuntimeSpec`` (eeruntime/serve/ray/spec.py). Each caller words its own errors (what
the name was for, what to do about it) through ``messages``; this module only finds the object.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping, Tuple

# The failures a caller words: the name is not "module:attr", the module does not import, or an
# attribute along the dotted path is missing. Templates are str.format'ted with spec, module,
# attr and error (the ImportError's text).
FAILURES = ("syntax", "import", "attribute")


def split_name(spec: Any) -> Tuple[str, str] | None:
    """``("package.module", "attr.path")`` for a well-formed name, None for anything else
    (not a string, no colon or several, an empty side)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return None
    module, attr = spec.split(":")
    if not module or not attr or not all(attr.split(".")):
        return None
    return module, attr


def lookup(
    spec: Any,
    messages: Mapping[str, str],
    error: Callable[[str], Exception] = ValueError,
) -> Any:
    """The object ``spec`` names, imported. Raises ``error(messages[kind].format(...))`` for the
    failure ``kind`` in :data:`FAILURES` (every kind must have a message); the import error's
    traceback is dropped (the message carries its text), so the user sees one line."""
    missing = [k for k in FAILURES if k not in messages]
    if missing:
        raise KeyError(f"lookup needs a message for each of {FAILURES}, missing {missing}")
    parts = split_name(spec)
    if parts is None:
        raise error(messages["syntax"].format(spec=spec, module="", attr="", error=""))
    module, attr = parts
    fields: Dict[str, Any] = {"spec": spec, "module": module, "attr": attr, "error": ""}
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise error(messages["import"].format(**{**fields, "error": e})) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(messages["attribute"].format(**fields))
        obj = getattr(obj, part)
    return obj
