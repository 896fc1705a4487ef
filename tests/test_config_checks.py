"""The composed config is checked against one schema (the trainer's dataclass, the task class's
constructor annotations, the optimizer's own checks) before the task is built or the run dir touched."""

from pathlib import Path
from typing import Any, Optional, Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dopr.config_check import check_config, expected_type
from tiny_run import ROOT, run_py



@pytest.mark.parametrize("override, message", [
    ("trainer.steps=1.5", "trainer.steps=1.5: expected int (the annotation of TrainerConfig.steps); set trainer.steps"),
    ("seed=abc", "seed='abc': expected int"),
    ("task.horizon=1.5", "task.horizon=1.5: expected int (the annotation of LDSTask.__init__'s horizon); "
                         "set task.horizon"),
    ("opt.ap.damping=-1", "opt.ap.damping"),
])
def test_a_bad_value_is_named_before_the_run_dir_is_touched(tmp_path, override, message):
    out = run_py(tmp_path / "run", override)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-3000:]
    left = sorted(p.name for p in (tmp_path / "run").iterdir()) if (tmp_path / "run").exists() else []
    assert left == [], left  # no summary, no run.log: the task was never built


class _Base:
    def __init__(self, depth: int = 0, seed: int = 0, **kwargs: Any):
        pass


class _Task(_Base):
    def __init__(self, size: int = 1, rate: float = 0.1, name: str = "t", path: Path | None = None,
                 widths: Sequence[int] = (1,), pair: tuple[int, float] = (1, 0.5), maybe: Optional[float] = None,
                 flag: bool = False, either: int | str = 0, table: dict | None = None, anything=None, **kwargs: Any):
        super().__init__(**kwargs)


@pytest.mark.parametrize("annotation, value, expected", [
    (int, 3, None), (int, 1.5, "int"), (int, True, "int"), (int, "3", "int"),
    (float, 3, None), (float, 0.5, None), (float, True, "float"), (float, "abc", "float"),
    (bool, False, None), (bool, 0, "bool"),
    (str, "x", None), (str, 3, "str"),
    (Path, "/tmp/x", None), (Path | None, None, None), (Path, 3, "str or Path"),
    (Optional[int], None, None), (int | None, 1.5, "int or None"),
    (int | str, "a", None), (int | str, 0.5, "int or str"),
    (Sequence[int], [1, 2], None), (Sequence[int], [1, 2.5], "a list of int"), (Sequence[int], "12", "a list of int"),
    (list[str], ["a"], None), (tuple[int, float], [1, 2], None), (tuple[int, float], [1], "a list [int, float]"),
    (tuple[int, ...], [1, 2, 3], None), (dict, {"a": 1}, None), (dict | None, [1], "dict or None"),
    (Any, object(), None),
])
def test_expected_type(annotation, value, expected):
    assert expected_type(value, annotation) == expected


def test_task_values_are_checked_against_the_constructor_and_its_bases():
    target = f"{__name__}._Task"
    ok = {"_target_": target, "name": "t", "depth": 0, "size": 2, "rate": 1, "widths": [1, 2], "pair": [1, 2.0],
          "path": "/tmp", "either": "x", "anything": [object()], "unknown_but_kwargs": 1.5}
    check_config({"seed": 0, "task": ok, "trainer": {}})
    bad = {**ok, "depth": 0.5, "size": 1.5, "widths": [1, "x"], "flag": "yes"}
    with pytest.raises(ValueError) as info:
        check_config({"seed": 0, "task": bad, "trainer": {"steps": 1.5, "grad_clip": "x"}})
    text = str(info.value)
    for line in ("task.depth=0.5: expected int (the annotation of _Base.__init__'s depth)",
                 "task.size=1.5: expected int (the annotation of _Task.__init__'s size)",
                 "task.widths=[1, 'x']: expected a list of int", "task.flag='yes': expected bool",
                 "trainer.steps=1.5: expected int", "trainer.grad_clip='x': expected float or None"):
        assert line in text, (line, text)


@pytest.mark.parametrize("key, example", [("seed", "seed=1"), ("device", "device=cuda")])
def test_seed_and_device_go_down_from_the_top_level_only(key, example):
    # the task's constructor takes them, but from launch, once: a task.seed would be overridden unseen
    with pytest.raises(ValueError, match=rf"task\.{key}: give the run's {key} at the top level \({example}\)"):
        check_config({"seed": 0, "task": {"_target_": f"{__name__}._Task", key: 1}, "trainer": {}})


def test_unknown_trainer_keys_are_named():
    with pytest.raises(ValueError, match=r"trainer.stpes: TrainerConfig has no such field \(its fields: steps, "):
        check_config({"seed": 0, "trainer": {"stpes": 10}})


def _composed(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def test_every_committed_task_and_experiment_passes():
    for task in sorted(p.stem for p in (ROOT / "configs/task").glob("*.yaml")):
        check_config(_composed([f"task={task}"]))
    for experiment in sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml")):
        check_config(_composed([f"experiment={experiment}"]))


@pytest.mark.parametrize("task", sorted(p.stem for p in (ROOT / "configs/task").glob("*.yaml")))
def test_a_misspelled_task_key_is_named_for_every_task(task):
    """No task constructor swallows unknown keys: a typo is an error, not a silently ignored setting."""
    with pytest.raises(ValueError, match=r"task.hroizon: \w+.__init__ has no such parameter"):
        check_config(_composed([f"task={task}", "+task.hroizon=5"]))


def test_every_committed_study_plan_passes():
    from dopr.analysis.plan import load_plan, verdict_cells
    from dopr.study import job as study_job

    for plan_path in sorted((ROOT / "configs/study").glob("*.yaml")):
        plan = load_plan(plan_path.stem)
        settings = {"opt.lr": plan["lrs"][0], "opt.ap.damping": plan["dampings"][0]}
        for cell in verdict_cells(plan):
            where = {**plan.get("tune_at", {}), **cell}
            for stage in ("tune", "verdict"):
                job = study_job(Path("/nowhere"), stage, plan, plan["optimizers"][-1], 0, settings, where)
                check_config(_composed(list(job.overrides)))
