"""What a run prints and records about its environment: library logs in <run_dir>/run.log, a short
terminal, the thread count, one thread per job in local parallel sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from dopr.launch import sweep_job_threads

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
ROBOSUITE_NOISE = ("robosuite", "controller config", "private macro")


def run(*args, timeout=300):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_demo_generation_prints_progress_not_robosuite(tmp_path):
    # what scripts/make_demos.py and the task's generation on first use run, in a fresh process
    printed = run("-c", "import sys; from dopr.envs.scripted import generate_demos; "
                        "generate_demos('Lift', 2, sys.argv[1], valid_fraction=0.5)", tmp_path / "lift.hdf5")
    assert "wrote" in printed
    assert not [line for line in printed.splitlines() if any(word in line for word in ROBOSUITE_NOISE)], printed
    assert (tmp_path / "lift.hdf5").exists()


@pytest.mark.slow  # >10 s on 2 cores
def test_robomimic_run_logs_robosuite_to_the_run_dir_and_prints_a_few_lines(lift_file, tmp_path):
    printed = run("run.py", "task=robomimic_lift", f"task.dataset={lift_file}", "logger=none",
                  f"hydra.run.dir={tmp_path}",
                  "trainer.steps=4", "trainer.eval_every=2", "trainer.warmup_steps=0", "trainer.progress=false",
                  "task.unet_channels=[8,16]", "task.time_embed_dim=8", "task.integration_steps=[1]",
                  "task.eval_episodes=1", "task.max_episode_steps=8", "task.batch_size=4", "task.val_samples=8")
    lines = printed.splitlines()
    assert not [line for line in lines if any(word in line for word in ROBOSUITE_NOISE)], printed
    assert len(lines) == 5, printed  # the run line, two evaluations, the final metrics, where the records are
    assert [line.startswith("[dopr]") for line in lines] == [True] * 5, printed
    log = (tmp_path / "run.log").read_text()
    assert "robosuite_logs WARNING" in log and "part_controller_config" in log


def test_local_parallel_sweep_runs_one_thread_per_job(tmp_path):
    run("run.py", "-m", "hydra/launcher=local", "task=lds", "seed=0,1", "logger=none", f"hydra.sweep.dir={tmp_path}",
        "trainer.steps=10", "trainer.eval_every=10", "trainer.progress=false", "task.eval_episodes=4",
        "task.max_episode_steps=10")
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary["config"]["trainer"]["threads"] == 1 and summary["threads"] == 1


def test_sweep_threads_respect_the_user_and_other_launchers():
    joblib = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {
        "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}})
    assert sweep_job_threads(None, joblib) == 1
    assert sweep_job_threads(4, joblib) == 4  # the user's trainer.threads wins
    basic = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {
        "_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}})
    assert sweep_job_threads(None, basic) is None  # one job at a time: torch's default
    single = OmegaConf.create({"mode": RunMode.RUN, "launcher": joblib.launcher})
    assert sweep_job_threads(None, single) is None


@pytest.mark.slow  # >10 s on 2 cores
def test_rollout_workers_exit_quietly_when_the_pool_is_never_closed():
    # a task drops its pool at exit without close(): gymnasium terminates the workers, silently
    printed = run("-c", "import time; import numpy as np; from dopr.envs.robosuite_envs import make_env_args; "
                        "from dopr.envs.rollout import EnvPool; pool = EnvPool(make_env_args('Lift'), num_workers=1); "
                        "pool.rollout(lambda w: np.zeros((1, 2, 7)), [0], 2, 1, 2, ['object']); del pool; "
                        "time.sleep(1); print('done')")
    assert printed.strip() == "done", printed


@pytest.mark.slow  # >10 s on 2 cores
def test_a_pool_made_in_a_child_process_leaves_that_process_threads_alone():
    # sweep jobs run in child processes; AsyncVectorEnv builds one env in the pool's own process, and
    # the one-thread setup meant for the rollout workers must not reach it (trainer.threads stays)
    printed = run("-c", "import multiprocessing as mp\n"
                        "def job():\n"
                        "    import numpy as np, torch\n"
                        "    from dopr.envs.robosuite_envs import make_env_args\n"
                        "    from dopr.envs.rollout import EnvPool\n"
                        "    torch.set_num_threads(2)\n"
                        "    pool = EnvPool(make_env_args('Lift'), num_workers=1)\n"
                        "    pool.rollout(lambda w: np.zeros((1, 2, 7)), [0], 2, 1, 2, ['object'])\n"
                        "    pool.close()\n"
                        "    print('threads', torch.get_num_threads())\n"
                        "process = mp.get_context('fork').Process(target=job); process.start(); process.join()")
    assert printed.strip() == "threads 2", printed
