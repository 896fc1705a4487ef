"""run.py, the trainer and the records, end to end on the LDS task (seconds per run)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dopr.tasks.lds import LDSTask
from dopr.train import CHECKPOINT, TrainerConfig, load_checkpoint, train
from crashing_task import Crash, CrashingLDS

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
TINY = ["trainer.steps=30", "trainer.eval_every=10", "trainer.progress=false", "task.eval_episodes=8", "task.max_episode_steps=30"]


def run_py(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_every_task_and_optimizer_config_composes():
    tasks = sorted(p.stem for p in (ROOT / "configs/task").glob("*.yaml"))
    opts = sorted(p.stem for p in (ROOT / "configs/opt").glob("*.yaml"))
    assert "lds" in tasks and {"adamw", "dopr_adamw", "muon", "dopr_muon", "signum", "adamuon", "adam", "dopr_adam"} <= set(opts)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for task in tasks:
            cfg = compose("config", overrides=[f"task={task}"])
            assert cfg.task.name and cfg.task._target_.startswith("dopr.tasks."), task
        for opt in opts:
            cfg = compose("config", overrides=[f"opt={opt}"])
            assert cfg.opt.name in (opt, {"adam": "adamw", "dopr_adam": "dopr_adamw"}.get(opt))
        for launcher in ("local", "slurm"):
            cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert "launcher" in cfg.hydra
        for experiment in sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml")):
            compose("config", overrides=[f"experiment={experiment}"])


def test_run_writes_records_and_prints_both_metrics(tmp_path):
    out = run_py("task=lds", "opt=dopr_adamw", "logger=none", f"hydra.run.dir={tmp_path}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/loss=" in out.stdout and "test/cost_ratio=" in out.stdout
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    for r in lines:
        assert {"train/loss", "val/loss", "test/cost_ratio", "test/ttf_shift", "wall_time"} <= set(r)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["last"]["step"] == 30
    assert summary["config"]["opt"]["name"] == "dopr_adamw" and summary["versions"]["torch"].startswith("2.13")
    assert summary["git"]["sha"] is None or len(summary["git"]["sha"]) == 40
    assert summary["optimizer_state_bytes"]["ap"] > 0
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)  # weights_only=True
    assert ckpt["step"] == 30 and "P" in json.dumps(list(ckpt["optimizer"]["preconditioner"]["layers"]["0"].keys()))


def test_wandb_offline_logger(tmp_path):
    pytest.importorskip("wandb")
    out = run_py("task=lds", "logger=wandb", f"hydra.run.dir={tmp_path}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "offline W&B run directory missing"


@pytest.mark.parametrize("opt", ["dopr_adamw", "dopr_muon"])
def test_resume_reaches_the_same_final_metrics(tmp_path, opt):
    kw = dict(seed=3, eval_episodes=8, max_episode_steps=30)
    cfg = TrainerConfig(steps=40, eval_every=10, warmup_steps=5, ema_decay=0.9, grad_clip=1.0, progress=False)
    full = train(LDSTask(**kw), {"name": opt, "lr": 3e-3}, cfg, tmp_path / "full", {})
    with pytest.raises(Crash):
        train(CrashingLDS(crash_at=25, **kw), {"name": opt, "lr": 3e-3}, cfg, tmp_path / "killed", {})
    assert load_checkpoint(tmp_path / "killed" / CHECKPOINT)["step"] == 20
    resumed = train(LDSTask(**kw), {"name": opt, "lr": 3e-3}, cfg, tmp_path / "killed", {}, resume=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_time"}  # noqa: E731
    assert strip(resumed["last"]) == strip(full["last"])
    ema_full, ema_resumed = (load_checkpoint(tmp_path / run / CHECKPOINT)["ema"] for run in ("full", "killed"))
    assert all(torch.equal(ema_full[k], ema_resumed[k]) for k in ema_full)  # the EMA weights, bit for bit
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_nan_loss_is_a_clear_error(tmp_path):
    class NaNTask(LDSTask):
        def loss(self, model, batch):
            return super().loss(model, batch) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite training loss.*Lower opt.lr"):
        train(NaNTask(eval_episodes=4), {"name": "adamw"}, TrainerConfig(steps=5, progress=False), tmp_path, {})


def test_unknown_task_and_optimizer_name_the_choices(tmp_path):
    out = run_py("task=nope", "logger=none", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "lds" in out.stderr  # Hydra lists the available tasks
    out = run_py("task=lds", "opt.name=nope", "logger=none", f"hydra.run.dir={tmp_path}", *TINY)
    assert out.returncode != 0 and "known: adamw" in out.stderr


def test_sweep_then_aggregate(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_py("-m", "task=lds", "opt=adamw,dopr_adamw", "seed=0,1", "logger=none", f"hydra.sweep.dir={sweep}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    agg = subprocess.run([sys.executable, str(ROOT / "scripts/aggregate.py"), f"sweep={sweep}",
                          f"out={tmp_path / 'agg'}"], env=ENV, capture_output=True, text=True, timeout=120)
    assert agg.returncode == 0, agg.stderr
    import pandas as pd

    runs = pd.read_csv(tmp_path / "agg" / "evals.csv")
    assert len(runs) == 4 * 3 and set(runs["opt.name"]) == {"adamw", "dopr_adamw"}
    final = pd.read_csv(tmp_path / "agg" / "final.csv")
    assert list(final["seeds"]) == [2, 2] and math.isfinite(final["val/loss"].iloc[0])
    assert "dopr_adamw" in agg.stdout and "±" in agg.stdout


def test_notebook_executes_on_a_sweep(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sweep = tmp_path / "sweep"
    out = run_py("-m", "task=lds", "opt=adamw,dopr_adamw", "seed=0", "logger=none", f"hydra.sweep.dir={sweep}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    subprocess.run([sys.executable, str(ROOT / "scripts/aggregate.py"), f"sweep={sweep}"], env=ENV, check=True,
                   capture_output=True)
    nb = nbformat.read(ROOT / "notebooks/val_vs_test.ipynb", as_version=4)
    os.environ["DOPR_EVALS_CSV"] = str(sweep / "evals.csv")
    os.environ["DOPR_FIGURE"] = str(tmp_path / "val_vs_test.png")
    try:
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    finally:
        os.environ.pop("DOPR_EVALS_CSV")
        os.environ.pop("DOPR_FIGURE")
    assert (tmp_path / "val_vs_test.png").stat().st_size > 1000
