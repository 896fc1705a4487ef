"""scripts/run_study.py: every committed plan loads, and a run's overrides are the plan's for its stage."""

from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
run_study = load_script("run_study")


@pytest.mark.parametrize("plan", sorted(p.stem for p in (ROOT / "configs" / "study").glob("*.yaml")))
def test_committed_plans_load(plan):
    loaded = run_study.load_plan(plan)
    assert set(loaded["optimizers"]) <= {p.stem for p in (ROOT / "configs" / "opt").glob("*.yaml")}
    assert run_study.verdict_cells(loaded)  # at least the tuning cell


def test_stage_overrides_reach_only_their_stage(tmp_path):
    plan = {"task": "lds", "overrides": ["trainer.steps=10"], "tune_overrides": ["task.eval_episodes=20"],
            "verdict_overrides": ["task.eval_episodes=50"], "default_damping": 1e-3}
    tune = run_study.job(tmp_path, "tune", plan, "dopr_adamw", 0, {"opt.lr": 1e-3, "opt.ap.damping": 1e-3}, {})
    verdict = run_study.job(tmp_path, "verdict", plan, "dopr_adamw", 10, {"opt.lr": 1e-3, "opt.ap.damping": 1e-2}, {})
    assert "task.eval_episodes=20" in tune.overrides and "task.eval_episodes=50" not in tune.overrides
    assert "task.eval_episodes=50" in verdict.overrides and "task.eval_episodes=20" not in verdict.overrides
    assert "trainer.steps=10" in tune.overrides and "trainer.steps=10" in verdict.overrides
    # the default damping is the lr stage's run: not named twice, not passed twice
    assert "opt.ap.damping" not in tune.run_dir.name and "opt.ap.damping=0.01" in verdict.run_dir.name
    # the stage's settings come last, so they win over a plan-wide override of the same key
    assert verdict.overrides[-1] == "opt.ap.damping=0.01"


def test_overlapping_seeds_are_refused(tmp_path, monkeypatch):
    (tmp_path / "configs" / "study").mkdir(parents=True)
    (tmp_path / "configs" / "study" / "bad.yaml").write_text(
        "task: lds\noptimizers: [adamw]\nlrs: [1e-3]\ndampings: [1e-3]\ntune_seeds: [0, 1]\n"
        "verdict_seeds: [1, 2]\nmetric: test/cost_ratio\n")
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"seeds \[1\] are both tuning and verdict seeds"):
        run_study.load_plan("bad")
