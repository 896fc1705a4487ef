"""A linear policy on normalized observations: the expert format written by scripts/train_expert.py.

action = clip(W @ ((obs - obs_mean) / obs_std), low, high). Augmented Random Search (Mania et al.
2018) trains exactly this family, and it reaches expert-level returns on Hopper, HalfCheetah and
Walker2d with env steps only (no gradients, no GPU), which is what a small CPU box can afford.

Checkpoints are ``.npz`` files (a few KB) holding the arrays plus a JSON ``meta`` string (env id,
training command, measured return), so a checkpoint is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class LinearPolicy:
    """Deterministic linear policy with observation normalization; works on single or batched obs."""

    def __init__(self, weight: np.ndarray, obs_mean: np.ndarray, obs_std: np.ndarray,
                 action_low: np.ndarray, action_high: np.ndarray, meta: dict[str, Any] | None = None):
        self.weight = np.asarray(weight, dtype=np.float64)
        self.obs_mean = np.asarray(obs_mean, dtype=np.float64)
        self.obs_std = np.asarray(obs_std, dtype=np.float64)
        self.action_low = np.asarray(action_low, dtype=np.float64)
        self.action_high = np.asarray(action_high, dtype=np.float64)
        self.meta = dict(meta or {})
        act_dim, obs_dim = self.weight.shape
        if self.obs_mean.shape != (obs_dim,) or self.obs_std.shape != (obs_dim,):
            raise ValueError(f"obs_mean/obs_std must have shape ({obs_dim},), got "
                             f"{self.obs_mean.shape} and {self.obs_std.shape}")
        if self.action_low.shape != (act_dim,) or self.action_high.shape != (act_dim,):
            raise ValueError(f"action bounds must have shape ({act_dim},)")

    @property
    def obs_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def act_dim(self) -> int:
        return self.weight.shape[0]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        normalized = (np.asarray(obs, dtype=np.float64) - self.obs_mean) / self.obs_std
        action = normalized @ self.weight.T
        return np.clip(action, self.action_low, self.action_high)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file then rename so a crash never leaves a half-written expert.
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, weight=self.weight.astype(np.float32),
                            obs_mean=self.obs_mean.astype(np.float32),
                            obs_std=self.obs_std.astype(np.float32),
                            action_low=self.action_low.astype(np.float32),
                            action_high=self.action_high.astype(np.float32),
                            meta=np.array(json.dumps(self.meta, sort_keys=True)))
        tmp.replace(path)


def load_expert(path: str | Path) -> LinearPolicy:
    """Load an expert checkpoint written by ``scripts/train_expert.py``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"expert checkpoint {path} not found. Committed experts live in experts/<env>.npz "
            f"(see experts/returns.json); train one with `python scripts/train_expert.py env=<Gymnasium id>`.")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        return LinearPolicy(data["weight"], data["obs_mean"], data["obs_std"],
                            data["action_low"], data["action_high"], meta=meta)
