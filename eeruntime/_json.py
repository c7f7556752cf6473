"""Floats as strict JSON (no bare Infinity/NaN, which many parsers reject)."""

import math


def enc_float(x: float):
    """A float as strict JSON: non-finite values as the strings 'inf', '-inf', 'nan'."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def dec_float(x) -> float:
    return float(x)


def strict(doc):
    """``doc`` (dicts, lists, tuples, numbers, strings, None) with every non-finite float spelled
    as :func:`enc_float` spells it, so that ``json.dumps(..., allow_nan=False)`` takes it."""
    if isinstance(doc, float):
        return enc_float(doc)
    if isinstance(doc, dict):
        return {k: strict(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [strict(v) for v in doc]
    return doc
