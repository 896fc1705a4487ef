"""Run many ``run.py`` jobs at once on one machine: one torch thread each, resumable, quiet.

Used by the main job (scripts/compare.py) and by staged studies (scripts/run_study.py). Each job is a
run directory plus Hydra overrides. A job whose summary.json says ``finished`` is not run again; an
interrupted one continues from its own checkpoint (never a sibling's). A job's whole output goes to
``<run_dir>/stdout.log``; a failed job stops everything with the end of that log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# Every job runs single-threaded: two multi-threaded torch processes on 2 cores run 5-20x slower.
JOB_OVERRIDES = ("logger=none", "trainer.progress=false", "trainer.threads=1")


@dataclass(frozen=True)
class Job:
    run_dir: Path
    overrides: tuple[str, ...]


def finished_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("status") == "finished":
            return summary
    return None


def run_job(job: Job) -> tuple[dict, float]:
    """Run (or resume, or skip) one job; returns its summary and the seconds it took."""
    done = finished_summary(job.run_dir)
    if done is not None:
        return done, 0.0
    job.run_dir.mkdir(parents=True, exist_ok=True)
    # Quoted: a run dir named after its settings holds '=' and ',' (Hydra's override grammar).
    resume = f"resume='{job.run_dir}'" if (job.run_dir / "checkpoint.pt").exists() else "resume=false"
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
    lock = threading.Lock()  # one on_done at a time: their printed lines must not interleave

    def one(job: Job) -> dict:
        summary, seconds = run_job(job)
        if on_done is not None:
            with lock:
                on_done(job, summary, seconds)
        return summary

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, jobs))
