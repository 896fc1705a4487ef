"""Resume and run records: refused on a changed config, flag words, corrupt checkpoints, failed
status, leftover temp files, file permissions (LDS runs of a few dozen steps)."""

import json
import os

import numpy as np
import pytest
import torch

from dopr.launch import resolve_run_dir
from dopr.tasks.lds import LDSTask
from dopr.train import CHECKPOINT, CorruptCheckpointError, TrainerConfig, load_checkpoint, train

TASK = dict(seed=3, eval_episodes=4, max_episode_steps=20)
TRAINER = TrainerConfig(steps=20, eval_every=10, progress=False)
OPT = {"name": "adamw", "lr": 1e-3}
CONFIG = {"seed": 3, "resume": False, "device": "cpu", "logger": {"name": "none"},
          "task": {"name": "lds"}, "opt": OPT,
          "trainer": {"steps": 20, "eval_every": 10, "progress": False, "threads": None}}


def _with(config, **changes):
    """A deep copy of ``config`` with dotted keys changed: _with(c, **{"opt.lr": 3e-3})."""
    config = json.loads(json.dumps(config))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return config


@pytest.fixture
def finished_run(tmp_path):
    run_dir = tmp_path / "run"
    train(LDSTask(**TASK), OPT, TRAINER, run_dir, CONFIG)
    return run_dir


@pytest.mark.parametrize("changes, named", [
    ({"seed": 4}, ["seed: 3 -> 4"]),
    ({"opt.lr": 3e-3}, ["opt.lr: 0.001 -> 0.003"]),
    ({"task.name": "flow_2d"}, ["task.name: 'lds' -> 'flow_2d'"]),
])
def test_resume_with_a_changed_config_is_refused_and_touches_nothing(finished_run, changes, named):
    summary_before = (finished_run / "summary.json").read_text()
    metrics_before = (finished_run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="different config") as info:
        train(LDSTask(**TASK), OPT, TRAINER, finished_run, _with(CONFIG, **changes), resume=True)
    for text in named:
        assert text in str(info.value)
    assert "resume=false" in str(info.value)
    assert (finished_run / "summary.json").read_text() == summary_before
    assert (finished_run / "metrics.jsonl").read_text() == metrics_before


def test_resume_may_change_logger_device_threads_progress(finished_run):
    changed = _with(CONFIG, **{"resume": True, "logger.mode": "offline", "device": "cuda",
                               "trainer.threads": 2, "trainer.progress": True})
    summary = train(LDSTask(**TASK), OPT, TRAINER, finished_run, changed, resume=True)
    assert summary["status"] == "finished" and summary["last"]["step"] == 20


def test_resume_may_move_the_data_root(finished_run):
    # a run from before paths.data (no such keys) or on a machine whose data lives elsewhere resumes
    moved = json.loads(json.dumps(CONFIG))
    moved["paths"] = {"data": "/mnt/shared/dopr"}
    moved["task"].update(datasets_path="/mnt/shared/dopr/minari", demos_dir="/mnt/shared/dopr/robomimic",
                         cache_dir="/mnt/shared/dopr/cache")
    summary = train(LDSTask(**TASK), OPT, TRAINER, finished_run, moved, resume=True)
    assert summary["status"] == "finished" and summary["last"]["step"] == 20


@pytest.mark.parametrize("word", [False, 0, "0", "false", "False", "no", "NO", None])
def test_resume_off_words_start_fresh(tmp_path, word):
    old, new = tmp_path / "sweep" / "old", tmp_path / "sweep" / "new"
    old.mkdir(parents=True)
    (old / CHECKPOINT).write_bytes(b"")
    assert resolve_run_dir(word, new) == (new, False)


@pytest.mark.parametrize("word", [True, 1, "1", "true", "yes", "Yes"])
def test_resume_on_words_continue_the_newest_sibling(tmp_path, word):
    old, new = tmp_path / "sweep" / "old", tmp_path / "sweep" / "new"
    old.mkdir(parents=True)
    (old / CHECKPOINT).write_bytes(b"")
    assert resolve_run_dir(word, new) == (old, True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_names_the_file(finished_run, damage):
    path = finished_run / CHECKPOINT
    data = path.read_bytes()
    garbage = [np.random.default_rng(seed).bytes(4096) for seed in (0, 17, 54, 62)]  # 4 different loader errors
    for damaged in {"truncate": [data[: len(data) // 2]], "garbage": garbage, "empty": [b""]}[damage]:
        path.write_bytes(damaged)
        with pytest.raises(CorruptCheckpointError, match="corrupt or truncated") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        train(LDSTask(**TASK), OPT, TRAINER, finished_run, CONFIG, resume=True)


class _Boom(Exception):
    pass


def test_summary_says_failed_with_the_reason(tmp_path):
    class FailingEval(LDSTask):
        def evaluate(self, model):
            if self.calls == 1:
                raise _Boom("rollout exploded")
            self.calls += 1
            return super().evaluate(model)

    task = FailingEval(**TASK)
    task.calls = 0
    with pytest.raises(_Boom):
        train(task, OPT, TRAINER, tmp_path, CONFIG)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "_Boom: rollout exploded"
    assert summary["last"]["step"] == 10  # the records up to the failure stay


def test_leftover_temp_files_are_removed_and_files_are_0644(finished_run):
    leftovers = [finished_run / name for name in (".summary.json.k2j3_x", ".metrics.jsonl.abc123", ".checkpoint.pt.tmp",
                                                  ".summary.json.tmp")]
    for path in leftovers:
        path.write_text("half a file")
    previous = os.umask(0o022)
    try:
        train(LDSTask(**TASK), OPT, TRAINER, finished_run, CONFIG, resume=True)
        train(LDSTask(**TASK), OPT, TRAINER, finished_run / "fresh", CONFIG)
    finally:
        os.umask(previous)
    assert not [p for p in leftovers if p.exists()]
    for run_dir in (finished_run, finished_run / "fresh"):
        for name in ("summary.json", "metrics.jsonl", CHECKPOINT):
            assert (run_dir / name).stat().st_mode & 0o777 == 0o644, (run_dir, name)


def test_summary_records_the_thread_count(tmp_path):
    threads = torch.get_num_threads()
    summary = train(LDSTask(**TASK), OPT, TRAINER, tmp_path, CONFIG)
    assert summary["threads"] == threads and json.loads((tmp_path / "summary.json").read_text())["threads"] == threads
    assert "sha" in summary["git"] and "dirty" in summary["git"]


def test_keys_left_out_of_run_dir_names_may_change_on_resume():
    # resume=true finds a run by its dir name (hydra.job.override_dirname); a key left out of that name can
    # differ between the run and its resumption, so the config check must allow it
    from omegaconf import OmegaConf

    from dopr.train import RESUME_MAY_CHANGE

    config = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "config.yaml"))
    for key in config.hydra.job.config.override_dirname.exclude_keys:
        assert any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE), key


def test_ema_starts_from_the_initial_weights(tmp_path):
    # AveragedModel's first update copies the weights; the trainer makes that update at initialization,
    # so after one step ema = decay * w_0 + (1 - decay) * w_1, as with the hand-written EMA it replaced
    from dopr.train import seed_everything

    task = LDSTask(**TASK)
    seed_everything(task.seed)
    initial = task.build_model().state_dict()
    one_step = TrainerConfig(steps=1, eval_every=1, ema_decay=0.75, progress=False)
    train(LDSTask(**TASK), OPT, one_step, tmp_path, CONFIG)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert set(ckpt["ema"]) == set(ckpt["model"])  # a plain state dict of the task's model
    for name, after_one_step in ckpt["model"].items():
        assert not torch.equal(after_one_step, initial[name])
        torch.testing.assert_close(ckpt["ema"][name], 0.75 * initial[name] + 0.25 * after_one_step)
