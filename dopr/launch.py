"""From a composed Hydra config to a finished run: pick the run dir, check the config, take the run
dir, build the task, train, report. Everything that can refuse a run does so before the task is
built and before anything in the run dir is written."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dopr.cli import parse_flag
from dopr.config_check import check_config
from dopr.optim import check_optimizer_args
from dopr.records import METRICS, SUMMARY, RecordsError, atomic_write_text, read_summary, run_dir_lock
from dopr.run_log import RUN_LOG, logs_to
from dopr.train import CHECKPOINT, TrainerConfig, check_resume_config, train

HYDRA_RECORD = ".hydra"  # Hydra's copy of the config (hydra.output_subdir is null: launch writes it)


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


def held_records(run_dir: Path) -> list[str]:
    """What in ``run_dir`` a fresh run would destroy: a checkpoint (a run to continue) or a finished
    run's summary. Evaluation records of a run that died before its first checkpoint are not: nothing
    can continue them, and a resume would drop them too."""
    held = [CHECKPOINT] if (run_dir / CHECKPOINT).exists() else []
    if (run_dir / SUMMARY).exists():
        try:
            summary = read_summary(run_dir / SUMMARY)
        except RecordsError:
            return [*held, f"{SUMMARY} (unreadable)"]
        if summary.get("status") == "finished":
            held.append(f"a finished {SUMMARY} and its {METRICS}")
    return held


def check_run_dir(run_dir: Path, config: dict, resuming: bool, overwrite: bool) -> None:
    """Refuse a fresh run into a dir holding another run's records unless ``overwrite``, and a resumption
    with other settings (checked again against the checkpoint in ``train``; here before the task is built)."""
    if resuming:
        if (run_dir / SUMMARY).exists():
            saved = read_summary(run_dir / SUMMARY).get("config") or {}
            check_resume_config(saved, config, run_dir, SUMMARY)
        return
    held = [] if overwrite else held_records(run_dir)
    if held:
        raise FileExistsError(
            f"{run_dir} holds another run's records ({', '.join(held)}), which this run would overwrite. Continue "
            f"that run with resume=true (or resume='{run_dir}'), run this one elsewhere with a new hydra.run.dir=..., "
            f"or replace the records with overwrite=true")


def save_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra writes to ``.hydra/`` before the job starts, written once the run dir is this run's."""
    hydra = HydraConfig.instance().cfg
    (run_dir / HYDRA_RECORD).mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra), ("overrides.yaml", hydra.hydra.overrides.task)):
        atomic_write_text(run_dir / HYDRA_RECORD / name, OmegaConf.to_yaml(node))


def launch(cfg: DictConfig) -> float | None:
    hydra = HydraConfig.get()
    run_dir, resuming = resolve_run_dir(cfg.resume, Path(hydra.runtime.output_dir))
    cfg.trainer.threads = sweep_job_threads(cfg.trainer.threads, hydra)
    config = OmegaConf.to_container(cfg, resolve=True)
    check_config(config)
    trainer = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    opt = OmegaConf.to_container(cfg.opt, resolve=True)
    check_optimizer_args(**opt)
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    with run_dir_lock(run_dir):
        check_run_dir(run_dir, config, resuming, config["overwrite"])
        save_hydra_record(run_dir, cfg)
        with logs_to(run_dir / RUN_LOG):  # the task too: demo generation and env builds log
            task = instantiate(cfg.task, _convert_="all", seed=cfg.seed, device=cfg.device)
            summary = train(task, opt, trainer, run_dir, config, logger=logger, resume=resuming)
    last = summary["last"] or {}
    shown = {k: v for k, v in last.items() if k == "val/loss" or k.startswith("test/")}
    print("[dopr] final " + "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    print(f"[dopr] records: {run_dir}/metrics.jsonl, {run_dir}/summary.json")
    value = last.get(task.headline_metric)
    return float(value) if isinstance(value, (int, float)) else None
