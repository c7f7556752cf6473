"""Floats as strict JSON (no bare Infinity/NaN, which many parsers reject)."""

import math


def enc_float(x: float):
    """A float as strict JSON: non-finite values as the strings 'inf', '-inf', 'nan'."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def dec_float(x) -> float:
    return float(x)
