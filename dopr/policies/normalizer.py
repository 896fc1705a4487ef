"""Per-dimension range normalization to [-1, 1], with statistics that travel in checkpoints."""

from __future__ import annotations

import numpy as np
import torch


class RangeNormalizer:
    """x -> 2 (x - min) / (max - min) - 1 per dimension; constant dimensions are only centred.

    Statistics are plain lists in ``state()`` (JSON-serializable), so a checkpoint rebuilds it.
    """

    def __init__(self, low: np.ndarray, high: np.ndarray, min_range: float = 1e-4):
        self.low = np.asarray(low, dtype=np.float32)
        self.high = np.asarray(high, dtype=np.float32)
        span = self.high - self.low
        self.scale = np.where(span > min_range, 2.0 / np.maximum(span, min_range), 1.0).astype(np.float32)
        self.offset = np.where(span > min_range, -1.0 - self.low * self.scale, -0.5 * (self.low + self.high)).astype(
            np.float32
        )

    @classmethod
    def fit(cls, data: np.ndarray) -> "RangeNormalizer":
        flat = np.asarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
        return cls(flat.min(axis=0), flat.max(axis=0))

    def normalize(self, x):
        if isinstance(x, torch.Tensor):
            return x * torch.as_tensor(self.scale, device=x.device) + torch.as_tensor(self.offset, device=x.device)
        return np.asarray(x, dtype=np.float32) * self.scale + self.offset

    def unnormalize(self, y):
        if isinstance(y, torch.Tensor):
            return (y - torch.as_tensor(self.offset, device=y.device)) / torch.as_tensor(self.scale, device=y.device)
        return (np.asarray(y, dtype=np.float32) - self.offset) / self.scale

    def state(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "RangeNormalizer":
        return cls(np.array(state["low"]), np.array(state["high"]))
