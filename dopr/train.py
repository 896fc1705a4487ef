"""The one generic training loop. Task-specific code lives in tasks; this file knows none of it."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dopr.optim import build_optimizer
from dopr.records import RunRecorder, atomic_write
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
        for key, minimum in (("steps", 1), ("eval_every", 1), ("warmup_steps", 0)):
            if getattr(self, key) < minimum:
                raise ValueError(f"trainer.{key}={getattr(self, key)}: set trainer.{key} to an integer >= {minimum}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"trainer.warmup_steps={self.warmup_steps} is more than trainer.steps={self.steps}: "
                             f"lower trainer.warmup_steps or raise trainer.steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1] (the cosine schedule "
                             f"ends at min_lr_ratio * opt.lr)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"trainer.threads={self.threads}: set it >= 1, or null for torch's default")
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


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (parameters and buffers), updated by ``update_parameters(model)``.

    Build it before the optimizer: the copy must not carry AP's hooks. AveragedModel's first update
    copies the weights; making that update here, on the initial weights, starts the average at
    initialization (ema_1 = decay * w_0 + (1 - decay) * w_1), the average the committed runs report.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).requires_grad_(False)
    ema.update_parameters(model)
    return ema


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that torch cannot read back."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Temp file + rename: a run killed mid-write keeps its previous checkpoint."""
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails in many ways (zip, pickle, EOF, index, decode errors)
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}). It was written whole "
            f"(temp file + rename), so it was damaged afterwards (a partial copy, a full disk): restore it, or "
            f"delete it to train this run from the start") from exc


# Keys whose value may differ between a run and its resumption: they don't change what is trained
# (every key Hydra leaves out of a run dir's name must be here, or resume=true would refuse its own runs).
# Data locations are among them: the data is named by task.dataset, and a moved root holds the same files.
RESUME_MAY_CHANGE = ("resume", "overwrite", "logger", "trainer.progress", "trainer.threads", "device", "paths",
                     "task.datasets_path", "task.demos_dir", "task.cache_dir")


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for every config key that differs, except RESUME_MAY_CHANGE."""
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    conflicts = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            conflicts.append(f"{key}: {show(before)} -> {show(after)}")
    return conflicts


def check_resume_config(saved: dict, current: dict, run_dir: Path, source: str) -> None:
    """Refuse to resume ``run_dir`` (whose ``source`` recorded ``saved``) with a config that trains otherwise."""
    conflicts = resume_conflicts(saved, current)
    if conflicts:
        raise ValueError(
            f"resume: {run_dir} was trained with a different config ({len(conflicts)} keys differ, {source} -> now): "
            + "; ".join(conflicts) + ". Resume with the run's own settings, or start a new run with resume=false "
            f"and a new hydra.run.dir (overwrite=true replaces this run)")


def _holds_non_finite(batch: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return batch.is_floating_point() and not bool(torch.isfinite(batch).all())
    if isinstance(batch, dict):
        return any(_holds_non_finite(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(_holds_non_finite(v) for v in batch)
    return False


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
    ema = build_ema(model, trainer.ema_decay) if trainer.ema_decay else None  # before AP hooks exist
    optimizer = build_optimizer(model, **opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, trainer))

    start, elapsed, ckpt = 0, 0.0, None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        check_resume_config(ckpt.get("config") or {}, config, run_dir, "checkpoint")  # before touching the run dir
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, elapsed = int(ckpt["step"]), float(ckpt["wall_time"])
    else:  # a fresh run: a previous run's checkpoint must not outlive it (resume would continue that run)
        ckpt_path.unlink(missing_ok=True)
    recorder = RunRecorder(run_dir, config, task.headline_metric, task.higher_is_better, logger,
                           resume_step=start if ckpt is not None else None, threads=torch.get_num_threads())

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
    try:
        for step in range(start, trainer.steps):
            model.train()
            batch = next(batches)
            loss = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise _non_finite_loss_error(loss, batch, step, ckpt_path)
            loss.backward()
            if trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item()
            loss_count += 1
            done = step + 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4g}")
            if done % trainer.eval_every == 0 or done == trainer.steps:
                metrics = evaluate_model(task, ema.module if ema is not None else model)
                record = {"step": done, "train/loss": loss_sum / loss_count, **metrics,
                          "lr": optimizer.param_groups[0]["lr"], "wall_time": time.time() - t0}
                recorder.log(record)
                loss_sum, loss_count = 0.0, 0
                save_checkpoint(ckpt_path, {
                    # the EMA weights as a plain state dict of the task's model (what policy_from_checkpoint
                    # loads); AveragedModel's n_averaged is not needed: its EMA ignores the count
                    "model": model.state_dict(), "ema": None if ema is None else ema.module.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "step": done, "wall_time": record["wall_time"],
                    "config": config, "task_state": task.state(),
                })
                shown = [f"{k}={_fmt(v)}" for k, v in record.items()
                         if k in ("step", "train/loss", "val/loss", task.headline_metric)]
                (progress.write if progress is not None else print)("[dopr] " + "  ".join(shown))
    except BaseException as exc:  # Ctrl-C too: the summary says why the run stopped
        recorder.fail(exc)
        raise
    finally:
        if progress is not None:
            progress.close()
    mem = optimizer.memory_bytes()
    return recorder.finish(extra={"optimizer_state_bytes": mem, "parameters": n_params})


def _non_finite_loss_error(loss: torch.Tensor, batch: Any, step: int, ckpt_path: Path) -> Exception:
    if _holds_non_finite(batch):
        return ValueError(f"the training batch at step {step} holds NaN or inf values: the task's data is broken "
                          f"(check task.dataset), not the optimizer")
    return FloatingPointError(
        f"non-finite training loss ({loss.item()}) at step {step}; the last good checkpoint is "
        f"{ckpt_path if ckpt_path.exists() else 'not written yet'}. Lower opt.lr, set trainer.grad_clip, "
        f"or raise opt.ap.damping for dopr_* optimizers.")


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def _progress(cfg: TrainerConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
