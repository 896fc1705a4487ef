"""From a composed Hydra config to a finished run: pick the run dir, build the task, train, report."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dopr.cli import parse_flag
from dopr.run_log import RUN_LOG, logs_to
from dopr.train import CHECKPOINT, TrainerConfig, train


def resolve_run_dir(resume: bool | int | str | None, hydra_dir: Path) -> tuple[Path, bool]:
    """Where this run writes, and whether it continues a checkpoint.

    resume=false (or 0/no): the fresh Hydra dir. resume=<path>: that run dir. resume=true (or 1/yes):
    the Hydra dir if it already holds a checkpoint (a re-launched sweep with the same
    hydra.sweep.dir), else the newest sibling run dir (same task/opt/overrides, earlier timestamp)
    that holds one.
    """
    flag = False if resume is None else parse_flag(resume)
    if flag is False:
        return hydra_dir, False
    if flag is None:
        path = Path(str(resume))
        if not (path / CHECKPOINT).exists():
            raise FileNotFoundError(f"resume={resume}: no {CHECKPOINT} there; pass the run directory of the run "
                                    f"to continue, or resume=true for the newest run with these overrides")
        return path, True
    if (hydra_dir / CHECKPOINT).exists():
        return hydra_dir, True
    siblings = sorted(p for p in hydra_dir.parent.glob("*") if p != hydra_dir and (p / CHECKPOINT).exists())
    if not siblings:
        print(f"[dopr] resume=true but no checkpoint under {hydra_dir.parent}; starting fresh")
        return hydra_dir, False
    return siblings[-1], True


def sweep_job_threads(threads: int | None, hydra: DictConfig) -> int | None:
    """trainer.threads for this job: one per job when a local joblib sweep runs jobs side by side
    (torch's default, one thread per core in every job, oversubscribes the cores several times over),
    unless the user set it."""
    if threads is not None or hydra.mode != RunMode.MULTIRUN:
        return threads
    launcher = hydra.launcher
    if "joblib" in str(launcher.get("_target_", "")).lower() and launcher.get("n_jobs", -1) != 1:
        return 1
    return threads


def launch(cfg: DictConfig) -> float | None:
    hydra = HydraConfig.get()
    run_dir, resuming = resolve_run_dir(cfg.resume, Path(hydra.runtime.output_dir))
    cfg.trainer.threads = sweep_job_threads(cfg.trainer.threads, hydra)
    trainer = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))  # its errors before any data work
    config = OmegaConf.to_container(cfg, resolve=True)
    opt = OmegaConf.to_container(cfg.opt, resolve=True)
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    with logs_to(run_dir / RUN_LOG):  # the task too: demo generation and env builds log
        task = instantiate(cfg.task, _convert_="all")
        summary = train(task, opt, trainer, run_dir, config, logger=logger, resume=resuming)
    last = summary["last"] or {}
    shown = {k: v for k, v in last.items() if k == "val/loss" or k.startswith("test/")}
    print("[dopr] final " + "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    print(f"[dopr] records: {run_dir}/metrics.jsonl, {run_dir}/summary.json")
    value = last.get(task.headline_metric)
    return float(value) if isinstance(value, (int, float)) else None
