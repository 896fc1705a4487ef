"""From a composed Hydra config to a finished run: pick the run dir, build the task, train, report."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dopr.train import CHECKPOINT, TrainerConfig, train


def resolve_run_dir(resume: bool | str, hydra_dir: Path) -> tuple[Path, bool]:
    """Where this run writes, and whether it continues a checkpoint.

    resume=false: the fresh Hydra dir. resume=<path>: that run dir. resume=true: the Hydra dir if it
    already holds a checkpoint (a re-launched sweep with the same hydra.sweep.dir), else the newest
    sibling run dir (same task/opt/overrides, earlier timestamp) that holds one.
    """
    if resume is False or resume is None:
        return hydra_dir, False
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        path = Path(resume)
        if not (path / CHECKPOINT).exists():
            raise FileNotFoundError(f"resume={resume}: no {CHECKPOINT} there; pass the run directory of the run to continue")
        return path, True
    if isinstance(resume, str) and resume.lower() == "false":
        return hydra_dir, False
    if (hydra_dir / CHECKPOINT).exists():
        return hydra_dir, True
    siblings = sorted(p for p in hydra_dir.parent.glob("*") if p != hydra_dir and (p / CHECKPOINT).exists())
    if not siblings:
        print(f"[dopr] resume=true but no checkpoint under {hydra_dir.parent}; starting fresh")
        return hydra_dir, False
    return siblings[-1], True


def launch(cfg: DictConfig) -> float | None:
    task = instantiate(cfg.task, _convert_="all")
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir, resuming = resolve_run_dir(cfg.resume, hydra_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    opt = OmegaConf.to_container(cfg.opt, resolve=True)
    trainer = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    summary = train(task, opt, trainer, run_dir, config, logger=logger, resume=resuming)
    last = summary["last"] or {}
    shown = {k: v for k, v in last.items() if k == "val/loss" or k.startswith("test/")}
    print("[dopr] final " + "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    print(f"[dopr] records: {run_dir}/metrics.jsonl, {run_dir}/summary.json")
    value = last.get(task.headline_metric)
    return float(value) if isinstance(value, (int, float)) else None
