"""The Task contract: everything the generic trainer needs to know about a problem.

A task owns its data, its model family, its one-step training loss and its test-time
(rollout / generation) metrics. The trainer owns the loop, the optimizer, EMA, checkpoints
and records. A task never sees the optimizer; the trainer never sees task internals.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


class Task:
    """Base class for tasks. Subclasses implement the five methods below.

    Constructor arguments come from the Hydra ``task`` config group (``configs/task/<name>.yaml``);
    every task receives ``seed`` and ``device`` from the top-level config.

    Contract:
      build_model() -> nn.Module           a fresh model on ``self.device``
      train_batches() -> Iterator[batch]   an endless iterator of training batches (seeded)
      loss(model, batch) -> scalar Tensor  the one-step training objective (model is in train mode)
      validate(model) -> {"val/loss": float, ...}   held-out one-step loss (called in eval mode, no grad)
      evaluate(model) -> {"test/<metric>": float, ...}  rollout / generation metrics (eval mode, no grad)

    Optional:
      state() -> dict            extra, JSON/tensor-serializable state stored in checkpoints
                                 (e.g. normalization statistics), so a checkpoint rebuilds the policy.
      headline_metric: str       the test metric printed at the end of a run and used as "best".
      higher_is_better: bool     direction of ``headline_metric``.
    """

    headline_metric: str = "test/score"
    higher_is_better: bool = True

    def __init__(self, seed: int = 0, device: str = "cpu", name: str | None = None):
        # name: the task config's own name (configs/task/<name>.yaml). No **kwargs here: a misspelled
        # task key must be an error (dopr/config_check.py names it), not a setting silently ignored.
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed={seed}: use a non-negative integer (seed=0, 1, 2, ...); numpy's seeded "
                             f"generators reject negative seeds")
        self.seed = int(seed)
        self.device = check_device(device)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """``{"test/<metric>": float, ...}`` from rollouts or generation; with ``task.video`` also
        ``test/video`` (frames), which the recorder writes as a video instead of a metric."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or an error naming ``device=`` when it is not usable here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device}: not a torch device ({exc}); use device=cpu or device=cuda") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device}: CUDA is not available here (torch {torch.__version__}, built for "
                             f"CUDA {torch.version.cuda or 'none'}); use device=cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use device=cuda or device=cuda:0")
    return resolved


def require_at_least(minimum: int, **values: Any) -> None:
    """A clear error for the first ``task.<key>`` below ``minimum`` (None means unset and passes)."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"task.{key}={value}: set task.{key} to an integer >= {minimum}")
