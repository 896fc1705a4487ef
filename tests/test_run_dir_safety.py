"""Nothing lost, nothing silent in a run directory: one writer at a time, a finished run never
overwritten unasked, a crash's torn metrics line recovered, and scripts that reuse finished runs
(dopr/runner.py) reuse only runs that are what they would run now (LDS runs of 20 steps)."""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from dopr.records import RunRecorder
from dopr.runner import Job, run_jobs
from dopr.tasks.lds import LDSTask
from dopr.train import CHECKPOINT, TrainerConfig, load_checkpoint, train
from crashing_task import Crash, CrashingLDS
from tiny_run import run_py

RECORDS = ("summary.json", "metrics.jsonl", CHECKPOINT)


def contents(run_dir):
    return {name: (run_dir / name).read_bytes() for name in RECORDS}


# --- one writer per run dir ----------------------------------------------------------------------
HOLD_THE_LOCK = """
import fcntl, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(f"{os.getpid()} {socket.gethostname()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_owner_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # another run holds <run_dir>/.lock (the lock file run.py takes)
    owner = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run_dir / ".lock")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        out = run_py(run_dir)
        assert out.returncode != 0
        assert str(run_dir) in out.stderr and f"pid {owner.pid}" in out.stderr, out.stderr[-3000:]
        assert socket.gethostname() in out.stderr
        assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == []  # refused before work
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    out = run_py(run_dir)  # the OS released the killed owner's lock
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


# --- a finished run is not overwritten unasked ---------------------------------------------------
@pytest.mark.slow  # >10 s on 2 cores
def test_a_finished_run_is_refused_then_overwritten_only_on_request(tmp_path):
    run_dir = tmp_path / "run"
    assert run_py(run_dir, "seed=0").returncode == 0
    before = contents(run_dir)
    out = run_py(run_dir, "seed=1")
    assert out.returncode != 0
    for choice in (str(run_dir), "resume=true", "hydra.run.dir", "overwrite=true"):
        assert choice in out.stderr, (choice, out.stderr[-3000:])
    assert contents(run_dir) == before
    hydra_record = (run_dir / ".hydra" / "config.yaml").read_text()  # Hydra's copy of the config too
    assert re.search(r"^seed: 0$", hydra_record, re.M) and not re.search(r"^seed: 1$", hydra_record, re.M)
    run_log = (run_dir / "run.log").read_bytes()
    out = run_py(run_dir, "seed=1", "resume=true")  # continuing it with other settings: refused as early
    assert out.returncode != 0 and "different config" in out.stderr and "seed: 0 -> 1" in out.stderr
    assert contents(run_dir) == before and (run_dir / ".hydra" / "config.yaml").read_text() == hydra_record
    assert (run_dir / "run.log").read_bytes() == run_log  # the task was never built
    out = run_py(run_dir, "seed=1", "overwrite=true")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["seed"] == 1 and summary["status"] == "finished"
    assert load_checkpoint(run_dir / CHECKPOINT)["config"]["seed"] == 1


@pytest.mark.parametrize("leftovers, held", [
    ({}, []),
    ({"stdout.log": "Killed", "run.log": ""}, []),
    ({"summary.json": {"status": "failed", "last": None}}, []),
    # killed between the first evaluation's line and its checkpoint: nothing can continue it
    ({"summary.json": {"status": "running", "last": {"step": 10}}, "metrics.jsonl": '{"step": 10}\n'}, []),
    ({"summary.json": {"status": "failed", "last": {"step": 10}}, CHECKPOINT: "x"}, [CHECKPOINT]),
    ({"summary.json": {"status": "finished", "last": {"step": 20}}}, ["a finished summary.json"]),
    ({"summary.json": "{torn"}, ["summary.json (unreadable)"]),
])
def test_what_a_fresh_run_may_not_replace(tmp_path, leftovers, held):
    from dopr.launch import held_records

    for name, content in leftovers.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    assert [h.split(" and ")[0] for h in held_records(tmp_path)] == held


def test_a_fresh_run_removes_a_previous_checkpoint(tmp_path):
    # overwrite=true: a crash before the new run's first checkpoint must not leave the old one to resume
    trainer = TrainerConfig(steps=20, eval_every=10, progress=False)
    train(LDSTask(seed=0, eval_episodes=4, max_episode_steps=20), {"name": "adamw"}, trainer, tmp_path, {"seed": 0})

    with pytest.raises(Crash):
        train(CrashingLDS(crash_at=0, seed=1, eval_episodes=4, max_episode_steps=20), {"name": "adamw"}, trainer, tmp_path,
              {"seed": 1})
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / "metrics.jsonl").exists()


# --- a torn metrics line after a crash -----------------------------------------------------------
TASK = dict(seed=3, eval_episodes=4, max_episode_steps=20)
TRAINER = TrainerConfig(steps=40, eval_every=10, progress=False)


@pytest.fixture
def crashed_run(tmp_path):
    """A run killed at step 25: checkpoint and records at step 20."""
    with pytest.raises(Crash):
        train(CrashingLDS(crash_at=25, **TASK), {"name": "adamw"}, TRAINER, tmp_path, {})
    return tmp_path


def test_a_torn_last_metrics_line_is_dropped_on_resume(crashed_run, capsys):
    metrics = crashed_run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 30, "train/loss": 0.12')  # a crash mid-append
    summary = train(LDSTask(**TASK), {"name": "adamw"}, TRAINER, crashed_run, {}, resume=True)
    assert summary["status"] == "finished"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [10, 20, 30, 40]
    out = capsys.readouterr().out
    assert "torn" in out and str(metrics) in out and "line 3" in out


def test_a_corrupt_middle_metrics_line_names_the_file_and_line(crashed_run):
    metrics = crashed_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{metrics}, line 1: not a JSON record")):
        train(LDSTask(**TASK), {"name": "adamw"}, TRAINER, crashed_run, {}, resume=True)


# --- dopr/runner.py: reuse a finished run only when it is what the job would run now --------------
JOB = ("task=lds", "opt=adamw", "seed=0", "trainer.steps=20", "trainer.eval_every=10", "task.eval_episodes=4",
       "task.max_episode_steps=20")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runner") / "adamw" / "seed0"
    (summary,) = run_jobs([Job(run_dir, JOB)], workers=1)
    assert summary["status"] == "finished"
    return run_dir


@pytest.fixture
def job_dir(finished_job, tmp_path):
    run_dir = tmp_path / "adamw" / "seed0"
    shutil.copytree(finished_job, run_dir)
    return run_dir


def test_a_finished_job_with_the_same_settings_is_reused(job_dir):
    seen = []
    (summary,) = run_jobs([Job(job_dir, JOB)], workers=1, on_done=lambda job, s, seconds: seen.append(seconds))
    assert seen == [0.0] and summary["last"]["step"] == 20


def test_a_finished_job_with_other_settings_is_refused_before_any_job_starts(job_dir, tmp_path):
    other = tmp_path / "adamw" / "seed1"
    with pytest.raises(SystemExit) as info:
        run_jobs([Job(other, (*JOB[:2], "seed=1", *JOB[3:])), Job(job_dir, (*JOB, "trainer.steps=40"))], workers=1)
    message = str(info.value)
    assert str(job_dir) in message and "trainer.steps: 20 -> 40" in message
    assert "out=" in message and "sweep_root=" in message and "delete" in message
    assert not other.exists()  # checked before the first job started


def test_a_hand_edited_summary_is_refused(job_dir):
    summary_path = job_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["last"]["val/loss"] = 1e-9
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="(?s)summary.json.*metrics.jsonl") as info:
        run_jobs([Job(job_dir, JOB)], workers=1)
    assert str(summary_path) in str(info.value)


def test_a_finished_summary_short_of_trainer_steps_is_refused(job_dir):
    summary_path, metrics_path = job_dir / "summary.json", job_dir / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines()
    metrics_path.write_text(lines[0] + "\n")  # records agree with each other, but end at step 10 of 20
    summary = json.loads(summary_path.read_text())
    summary["last"] = json.loads(lines[0])
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="step 10.*trainer.steps=20") as info:
        run_jobs([Job(job_dir, JOB)], workers=1)
    assert str(summary_path) in str(info.value)


@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl"])
def test_a_broken_record_file_is_named(job_dir, name):
    (job_dir / name).write_text("{half a record\n")
    with pytest.raises(SystemExit) as info:
        run_jobs([Job(job_dir, JOB)], workers=1)
    assert str(job_dir / name) in str(info.value) and "JSON" in str(info.value)


def test_a_job_that_died_before_its_first_checkpoint_runs_again(tmp_path):
    # a crash before any checkpoint leaves a stdout.log and a failed summary (maybe an eval line too):
    # nothing to resume, so the runner starts the job over
    run_dir = tmp_path / "adamw" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "stdout.log").write_text("Killed\n")
    recorder = RunRecorder(run_dir, {"seed": 0}, "test/cost_ratio", False)
    recorder.log({"step": 10, "val/loss": 1.0})
    recorder.fail(MemoryError("out of memory"))
    (summary,) = run_jobs([Job(run_dir, JOB)], workers=1)
    assert summary["status"] == "finished" and summary["config"]["trainer"]["steps"] == 20
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [10, 20]
