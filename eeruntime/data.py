"""Bundled real data: scikit-learn's handwritten digits (8x8, 10 classes, shipped with the package,
no download), as tensors and as an iterable of ``(x, y)`` batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DigitsSplit:
    x_train: torch.Tensor  # float32 [N, 1, 8, 8] in [0, 1]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """A fixed, stratified train/test split of the 1797 digits."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=d.target
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return DigitsSplit(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


class Batches:
    """Re-iterable ``(x, y)`` mini-batches; reshuffled each epoch from ``seed`` when ``shuffle``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = True, seed: int = 0):
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                what = type(t).__name__ if not isinstance(t, torch.Tensor) else "a 0-d tensor"
                raise TypeError(f"Batches needs {name} as a tensor with one row per sample, got {what}")
        # 0 failed with a ZeroDivisionError in len(), a negative size with "__len__() should return >= 0"
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (self.x.shape[0] + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            j = order[i : i + self.batch_size]
            yield self.x[j], self.y[j]
