"""What one request sends from tier t to tier t+1: its surviving rows' state, their row ids, the
criterion's carry and the thresholds snapshot the request started with (so a request never mixes
two threshold sets, even when tiers are reconfigured at different moments).

Tensors travel as numpy arrays: Ray serializes those without pickling their bytes (zero-copy out
of the object store for large ones). The state may be sent in a lower precision
(``transfer_dtype="bf16"`` or ``"fp16"``) to halve the bytes; the receiver casts it back to the
dtype the stage expects. The carry (running logits sums, earlier exits' logits) decides exits, so
it always travels exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ...state import as_tuple, dtype_name, from_tuple

TRANSFER_DTYPES = {"same": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# numpy has no bfloat16 nor float8: those bytes travel as integers of their width and are viewed
# back (a float8 state failed to encode: "Got unsupported ScalarType Float8_e4m3fn").
_NUMPY_VIEW = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NUMPY_VIEW[getattr(torch, _name)] = torch.uint8


def check_transfer_dtype(name: str) -> Optional[torch.dtype]:
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"unknown transfer_dtype {name!r}; accepted: {', '.join(map(repr, TRANSFER_DTYPES))}")
    return TRANSFER_DTYPES[name]


@dataclass
class WireTensor:
    """One tensor on the wire: ``array`` holds ``wire_dtype`` values; ``dtype`` is the tensor's own."""

    array: np.ndarray
    dtype: str
    wire_dtype: str

    @classmethod
    def encode(cls, t: torch.Tensor, lower: Optional[torch.dtype] = None) -> WireTensor:
        t = t.detach()
        src = t.dtype
        if lower is not None and t.is_floating_point() and t.element_size() > torch.finfo(lower).bits // 8:
            t = t.to(lower)
        wire = t.dtype
        # (a conjugate or negative view is a lazy flag numpy cannot take: materialize it)
        t = t.resolve_conj().resolve_neg().contiguous().cpu()
        if wire in _NUMPY_VIEW:
            t = t.view(_NUMPY_VIEW[wire])
        return cls(t.numpy(), dtype_name(src), dtype_name(wire))

    def decode(self) -> torch.Tensor:
        arr = self.array if self.array.flags.writeable else self.array.copy()
        t = torch.from_numpy(arr)
        wire = getattr(torch, self.wire_dtype)
        if wire in _NUMPY_VIEW:
            t = t.view(wire)
        return t.to(getattr(torch, self.dtype))

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass
class Survivors:
    """The rows of one request that go on to the next tier (see the module docstring)."""

    state: Tuple[WireTensor, ...]
    state_is_tuple: bool
    rows: np.ndarray  # int64 [n], the request's own row ids (0-based, input order)
    carry: Tuple[WireTensor, ...]
    thresholds: Tuple[float, ...]
    stage: int  # the first stage the receiver runs
    sent_at: float = 0.0  # time.time() when sent, for the transfer time (same clock on one host)

    @classmethod
    def encode(
        cls, state, rows: torch.Tensor, carry, thresholds, stage: int, lower: Optional[torch.dtype] = None
    ) -> Survivors:
        return cls(
            state=tuple(WireTensor.encode(t, lower) for t in as_tuple(state)),
            state_is_tuple=isinstance(state, tuple),
            rows=rows.detach().cpu().numpy().astype(np.int64, copy=True),
            carry=tuple(WireTensor.encode(t) for t in (carry or ())),
            thresholds=tuple(float(v) for v in thresholds),
            stage=int(stage),
        )

    def decode(self):
        """``(state, rows, carry)`` as tensors."""
        parts = [w.decode() for w in self.state]
        state = from_tuple(parts, tuple(parts) if self.state_is_tuple else parts[0])
        return state, torch.from_numpy(self.rows.copy()), tuple(w.decode() for w in self.carry)

    def stamp(self) -> Survivors:
        self.sent_at = time.time()
        return self

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data on the wire (state, row ids and carry)."""
        return sum(w.nbytes for w in self.state) + int(self.rows.nbytes) + sum(w.nbytes for w in self.carry)
