"""The one generic training loop. Task-specific code lives in tasks; this file knows none of it."""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dopr.optim import build_optimizer
from dopr.records import RunRecorder
from dopr.tasks.base import Task

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainerConfig:
    steps: int = 1000
    eval_every: int = 250
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = None  # evaluate an EMA copy of the weights when set
    progress: bool = True
    threads: int | None = None  # torch.set_num_threads, e.g. 1 per job in parallel sweeps

    def __post_init__(self):
        if self.steps < 1 or self.eval_every < 1 or self.warmup_steps < 0:
            raise ValueError(f"trainer: steps and eval_every must be >= 1 and warmup_steps >= 0 (got {self})")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"trainer.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"trainer.grad_clip must be > 0 or null, got {self.grad_clip}")


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],  # plain lists load with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Temp file + rename: a run killed mid-write keeps its previous checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def evaluate_model(task: Task, model: nn.Module) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = dict(task.validate(model))
        metrics.update(task.evaluate(model))
    return metrics


def train(task: Task, opt: dict, trainer: TrainerConfig, run_dir: Path, config: dict,
          logger: dict | None = None, resume: bool = False) -> dict:
    """Train ``task`` with optimizer ``opt`` (``{"name": ..., "lr": ..., ...}``); returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    if trainer.threads:
        torch.set_num_threads(int(trainer.threads))
    seed_everything(task.seed)

    model = task.build_model()
    ema = copy.deepcopy(model).requires_grad_(False) if trainer.ema_decay else None  # before AP hooks exist
    optimizer = build_optimizer(model, **opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, trainer))

    start, elapsed, ckpt = 0, 0.0, None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, elapsed = int(ckpt["step"]), float(ckpt["wall_time"])
    recorder = RunRecorder(run_dir, config, task.headline_metric, task.higher_is_better, logger,
                           resume_step=start if ckpt is not None else None)

    batches = task.train_batches()
    for _ in range(start):  # the batch stream draws from the task's own seeded generator
        next(batches)
    if ckpt is not None:
        set_rng_state(ckpt["rng"])

    n_params = sum(p.numel() for p in model.parameters())
    print(f"[dopr] task={config.get('task', {}).get('name')} opt={optimizer!r} params={n_params:,} run_dir={run_dir}"
          + (f" (resumed at step {start})" if start else ""))
    progress = _progress(trainer, start)
    loss_sum, loss_count, t0 = 0.0, 0, time.time() - elapsed
    for step in range(start, trainer.steps):
        model.train()
        loss = task.loss(model, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {step}; the last good checkpoint is "
                f"{ckpt_path if ckpt_path.exists() else 'not written yet'}. Lower opt.lr, set trainer.grad_clip, "
                f"or raise opt.damping for dopr_* optimizers.")
        loss.backward()
        if trainer.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, trainer.ema_decay)
        loss_sum += loss.item()
        loss_count += 1
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4g}")
        if done % trainer.eval_every == 0 or done == trainer.steps:
            metrics = evaluate_model(task, ema if ema is not None else model)
            record = {"step": done, "train/loss": loss_sum / loss_count, **metrics,
                      "lr": optimizer.param_groups[0]["lr"], "wall_time": time.time() - t0}
            recorder.log(record)
            loss_sum, loss_count = 0.0, 0
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "step": done, "wall_time": record["wall_time"],
                "config": config, "task_state": task.state(),
            })
            shown = {k: v for k, v in record.items() if k in ("step", "train/loss", "val/loss", task.headline_metric)}
            (progress.write if progress is not None else print)("[dopr] " + "  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    if progress is not None:
        progress.close()
    mem = optimizer.memory_bytes()
    return recorder.finish(extra={"optimizer_state_bytes": mem, "parameters": n_params})


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def _progress(cfg: TrainerConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
