"""Run many ``run.py`` jobs at once on one machine: one torch thread each, resumable, quiet.

Used by the main job (scripts/compare.py) and by staged studies (scripts/run_study.py). Each job is a
run directory plus Hydra overrides. A job whose summary.json says ``finished`` is not run again; an
interrupted one continues from its own checkpoint (never a sibling's); one that died before its first
checkpoint starts over. A job's whole output goes to ``<run_dir>/stdout.log``; a failed job stops
everything with the end of that log.

Before any job starts, every job with records is checked: its recorded config must be what the job
would run now (a changed trainer.steps or plan must not pass off old runs as new ones), and a finished
run's records must agree with each other (summary.json's last record is metrics.jsonl's last line,
at trainer.steps).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dopr.records import METRICS, SUMMARY, RecordsError, read_metrics, read_summary
from dopr.train import CHECKPOINT, resume_conflicts

ROOT = Path(__file__).resolve().parents[1]
# Every job runs single-threaded: two multi-threaded torch processes on 2 cores run 5-20x slower.
JOB_OVERRIDES = ("logger=none", "trainer.progress=false", "trainer.threads=1")


@dataclass(frozen=True)
class Job:
    run_dir: Path
    overrides: tuple[str, ...]


def finished_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    if path.exists():
        summary = read_summary(path)
        if summary.get("status") == "finished":
            return summary
    return None


def job_config(job: Job) -> dict:
    """The config run.py would run ``job`` with (resolved), composed as run.py composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[*JOB_OVERRIDES, *job.overrides]), resolve=True)


_ABSENT = object()  # a key one record has and the other lacks


def check_records(job: Job) -> str | None:
    """Why ``job``'s existing records may not be reused or continued (None: they may, or there are none)."""
    summary_path, metrics_path = job.run_dir / SUMMARY, job.run_dir / METRICS
    try:
        summary = finished_summary(job.run_dir)
        resumable = (job.run_dir / CHECKPOINT).exists() and summary_path.exists()
        if summary is None and not resumable:
            return None  # nothing to reuse or continue: the job runs from the start
        saved = summary or read_summary(summary_path)
        conflicts = resume_conflicts(saved.get("config") or {}, job_config(job))
        if conflicts:
            return (f"{job.run_dir} holds a run with other settings ({len(conflicts)} keys differ, saved -> now: "
                    f"{'; '.join(conflicts)}). Write this comparison or study elsewhere (a new out=... for "
                    f"compare.py, sweep_root=... for run_study.py), or delete {job.run_dir} to run it again")
        if summary is None:
            return None
        records = read_metrics(metrics_path) if metrics_path.exists() else []
        last, line = summary.get("last") or {}, records[-1] if records else {}
        differ = [f"{k}: {last.get(k, '(absent)')!r} vs {line.get(k, '(absent)')!r}"
                  for k in sorted(set(last) | set(line)) if last.get(k, _ABSENT) != line.get(k, _ABSENT)]
        if differ or not records:
            return (f"{summary_path}: its last record is not the last line of {metrics_path} "
                    f"({'; '.join(differ) if records else 'that file holds no records'}): one of them was edited or "
                    f"damaged after the run; restore it, or delete {job.run_dir} to run it again")
        steps = (summary.get("config") or {}).get("trainer", {}).get("steps")
        if records[-1].get("step") != steps:
            return (f"{summary_path} says finished, but its last record is step {records[-1].get('step')} and its "
                    f"config's trainer.steps={steps}: the records lost their end; delete {job.run_dir} to run it again")
    except RecordsError as error:
        return str(error)
    return None


def check_jobs(jobs: list[Job]) -> None:
    """Refuse, before any job starts, jobs whose records ``check_records`` does not pass."""
    problems = [problem for problem in map(check_records, jobs) if problem is not None]
    if problems:
        raise SystemExit(f"{len(problems)} of {len(jobs)} runs cannot be reused or continued; nothing was run:\n  "
                         + "\n  ".join(problems))


def run_job(job: Job) -> tuple[dict, float]:
    """Run (or resume, or skip) one job; returns its summary and the seconds it took."""
    done = finished_summary(job.run_dir)
    if done is not None:
        return done, 0.0
    job.run_dir.mkdir(parents=True, exist_ok=True)
    # Quoted: a run dir named after its settings holds '=' and ',' (Hydra's override grammar).
    resume = f"resume='{job.run_dir}'" if (job.run_dir / CHECKPOINT).exists() else "resume=false"
    command = [sys.executable, str(ROOT / "run.py"), *JOB_OVERRIDES, *job.overrides,
               f"hydra.run.dir='{job.run_dir}'", resume]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    with open(job.run_dir / "stdout.log", "a") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    summary = finished_summary(job.run_dir)
    if code != 0 or summary is None:
        tail = (job.run_dir / "stdout.log").read_text().strip().splitlines()[-15:]
        raise SystemExit(f"run failed (exit {code}): {' '.join(job.overrides)}\nthe end of "
                         f"{job.run_dir / 'stdout.log'}:\n" + "\n".join(tail))
    return summary, time.time() - t0


def run_jobs(jobs: list[Job], workers: int = 2, on_done: Callable[[Job, dict, float], None] | None = None) -> list[dict]:
    """Run ``jobs`` with ``workers`` at a time; ``on_done(job, summary, seconds)`` after each."""
    check_jobs(jobs)
    lock = threading.Lock()  # one on_done at a time: their printed lines must not interleave

    def one(job: Job) -> dict:
        summary, seconds = run_job(job)
        if on_done is not None:
            with lock:
                on_done(job, summary, seconds)
        return summary

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, jobs))
