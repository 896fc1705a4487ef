"""Run records: ``metrics.jsonl`` (one line per evaluation point) and ``summary.json`` in the run
directory, and the same dicts to W&B (offline unless asked). Aggregation and notebooks read the
files, so nothing depends on a W&B account."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import secrets
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, IO, Iterator

PACKAGES = ("torch", "numpy", "pytorch-optimizer", "hydra-core", "wandb", "gymnasium", "mujoco", "robosuite",
            "minari", "transformers", "peft", "h5py", "scikit-learn")
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WANDB_ID = "wandb_id.txt"
LOCK = ".lock"


class RecordsError(ValueError):
    """A record file (summary.json, metrics.jsonl) that cannot be read as one; the message names it."""


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (an exclusive flock, holding our pid and host) inside the block: two runs
    writing one dir interleave their records. The OS drops the lock when its process dies, so a killed
    run leaves none behind; the file stays (removing it would let a waiting writer lock a dead inode)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid, _, host = f.read().strip().partition(" ")
            owner = f"pid {pid} on {host}" if pid else "a process that has not yet written its pid"
            raise RunDirBusyError(
                f"{run_dir} is in use by another run ({owner}; {run_dir / LOCK} is locked): wait for that run to "
                f"end, or give this one its own hydra.run.dir") from None
        f.truncate(0)
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_summary(path: Path) -> dict:
    """A run's summary.json. It is written whole (temp file + rename), so one that does not parse was
    damaged or edited afterwards."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecordsError(f"{path}: not valid JSON ({error.msg}, line {error.lineno} column {error.colno}); "
                           f"restore it, or delete {path.parent} and run that run again") from None
    if not isinstance(summary, dict):
        raise RecordsError(f"{path}: not a run summary (a JSON object); restore it, or delete {path.parent} and "
                           f"run that run again")
    return summary


def read_metrics(path: Path, drop_torn_last: bool = False) -> list[dict]:
    """A run's metrics.jsonl, one evaluation record per line. A crash mid-append leaves the last line
    cut short: with ``drop_torn_last`` (resuming from a checkpoint, which never covers that line) it is
    dropped and said so; any other line that is not a record is damage, an error naming the line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if drop_torn_last and number == len(lines):
                print(f"[dopr] {path}: dropped a torn last line (line {number}, cut short by a crash mid-write; "
                      f"the checkpoint does not cover it)", flush=True)
                logging.getLogger(__name__).warning("%s: dropped a torn last line (line %d)", path, number)
                break
            raise RecordsError(f"{path}, line {number}: not a JSON record ({error.msg}); only a crash's last line "
                               f"can be cut short, so the file was damaged afterwards: restore it, or delete "
                               f"{path.parent} and run that run again") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RecordsError(f"{path}, line {number}: not an evaluation record (a JSON object with a step); "
                               f"restore it, or delete {path.parent} and run that run again")
        records.append(record)
    return records


def temp_path(path: Path) -> Path:
    """Where ``atomic_write`` stages ``path``: a hidden sibling, so a rename publishes it."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into a temp file in the same directory, then rename: readers never see half a
    file, and a run killed mid-write keeps the previous one. Plain ``open``, so the file gets the
    usual permissions (0644 under umask 022), not mkstemp's 0600; the temp file never outlives an
    exception."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete what a killed run left staged: ``atomic_write``'s ``.<name>.tmp`` files, and
    ``.<record file>.<random>`` files (mkstemp's naming), which run dirs written by older code may hold."""
    run_dir = Path(run_dir)
    stale = set(run_dir.glob(".*.tmp"))
    for name in (METRICS, SUMMARY, WANDB_ID):
        stale.update(run_dir.glob(f".{name}.*"))
    stale = sorted(p for p in stale if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_revision() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def machine() -> dict[str, Any]:
    """The machine a result came from: platform, CPU model, core count, Python, the ATen CPU kernel set
    (and GPU, if any). Floating-point sums, hence results, differ with the CPU's kernel set (default,
    AVX2, AVX-512: each orders them differently), not only with the thread count."""
    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _clean(value: Any) -> Any:
    """NaN becomes null; inf stays (Python's json writes and reads it as Infinity), since a diverged
    rollout's infinite cost is a result, not a missing value."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class RunRecorder:
    """Appends evaluation records and keeps ``summary.json`` current (rewritten atomically).

    ``status`` in the summary: running, then finished, or failed with the exception in ``error``.
    ``threads`` records torch's intra-op thread count: floating-point sums, hence results, depend on it.
    """

    def __init__(self, run_dir: Path, config: dict, headline: str, higher_is_better: bool,
                 logger: dict | None = None, resume_step: int | None = None, threads: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.run_dir)
        self.metrics_path = self.run_dir / METRICS
        self.summary_path = self.run_dir / SUMMARY
        self.config = config
        self.headline = headline
        self.higher_is_better = higher_is_better
        self.records: list[dict] = []
        self.provenance = {"git": git_revision(), "versions": package_versions(), "threads": threads,
                           "machine": machine()}
        if resume_step is not None and self.metrics_path.exists():
            # Keep what the checkpoint covers; lines written after it are re-earned by the resumed run.
            kept = read_metrics(self.metrics_path, drop_torn_last=True)
            self.records = [r for r in kept if r["step"] <= resume_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self.wandb = self._init_wandb(logger or {"name": "none"}, resume=resume_step is not None)

    def _init_wandb(self, logger: dict, resume: bool):
        if logger.get("name", "none") == "none":
            return None
        import wandb

        run_id_file = self.run_dir / WANDB_ID
        run_id = run_id_file.read_text().strip() if (resume and run_id_file.exists()) else secrets.token_hex(4)
        atomic_write_text(run_id_file, run_id)
        return wandb.init(
            project=logger.get("project", "dopr"),
            entity=logger.get("entity"),
            mode=logger.get("mode", "offline"),
            dir=str(self.run_dir),
            config=self.config,
            name=logger.get("run_name") or self.run_dir.name,
            group=logger.get("group"),
            tags=list(logger.get("tags") or []),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(quiet=True),  # its per-metric history and summary tables stay in its own log
        )

    def log(self, record: dict) -> None:
        from dopr.envs.video import RolloutVideo

        for key, video in [(k, v) for k, v in record.items() if isinstance(v, RolloutVideo)]:
            self.log_video(record["step"], key, video)  # a file and W&B media, not a number in the records
        record = {k: _clean(v) for k, v in record.items() if not isinstance(v, RolloutVideo)}
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        self.write_summary(status="running")

    def log_video(self, step: int, key: str, video) -> Path:
        """Write ``<run_dir>/videos/step<step>.mp4`` (``.gif`` without imageio-ffmpeg) and, with W&B on,
        log it as ``wandb.Video`` under ``key`` at ``step``."""
        path = video.write(self.run_dir / "videos" / f"step{step}")
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Video(str(path), format=path.suffix[1:])}, step=step)
        return path

    def best(self) -> dict | None:
        scored = [r for r in self.records if r.get(self.headline) is not None]
        if not scored:
            return None
        pick = max if self.higher_is_better else min
        return pick(scored, key=lambda r: r[self.headline])

    def write_summary(self, status: str, extra: dict | None = None) -> dict:
        summary = {
            "status": status,
            "headline_metric": self.headline,
            "higher_is_better": self.higher_is_better,
            "last": self.records[-1] if self.records else None,
            "best": self.best(),
            "config": self.config,
            **self.provenance,
            **(extra or {}),
        }
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, default=str))
        return summary

    def finish(self, extra: dict | None = None) -> dict:
        summary = self.write_summary(status="finished", extra=extra)
        if self.wandb is not None:
            for key, value in (summary["last"] or {}).items():
                self.wandb.summary[f"last/{key}"] = value
            self.wandb.finish()
        return summary

    def fail(self, error: BaseException) -> dict:
        """Mark the run failed, with the reason; the records up to the failure stay."""
        summary = self.write_summary(status="failed", extra={"error": f"{type(error).__name__}: {error}"})
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
        return summary
