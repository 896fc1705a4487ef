"""scripts/run_study.py: every committed plan loads, and a run's overrides are the plan's for its stage."""

import json
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


def _write_plan(root: Path, text: str) -> None:
    (root / "configs" / "study").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "study" / "p.yaml").write_text(
        "task: lds\noptimizers: [adamw, dopr_adamw, muon]\nlrs: [1e-3]\ndampings: [1e-3]\ntune_seeds: [0]\n"
        "verdict_seeds: [10]\nmetric: test/cost_ratio\n" + text)


def test_verdict_cut_runs_only_the_listed_optimizers_in_matching_cells(tmp_path, monkeypatch):
    _write_plan(tmp_path, "verdict_axes: {task.train_episodes: [10, 2], task.noise: [0, 1]}\n"
                          "verdict_cut: [{where: {task.train_episodes: 2}, optimizers: [adamw, dopr_adamw]}]\n")
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    plan = run_study.load_plan("p")
    ran = {(c["task.train_episodes"], c["task.noise"]): run_study.verdict_optimizers(plan, c)
           for c in run_study.verdict_cells(plan)}
    assert ran == {(10, 0): ["adamw", "dopr_adamw", "muon"], (10, 1): ["adamw", "dopr_adamw", "muon"],
                   (2, 0): ["adamw", "dopr_adamw"], (2, 1): ["adamw", "dopr_adamw"]}


@pytest.mark.parametrize("cut", ["[{where: {task.noise: 0}, optimizers: [signum]}]",  # not in the plan
                                 "[{where: {task.noise: 0}}]",  # no optimizers
                                 "[{task.noise: 0, optimizers: [adamw]}]"])  # no where
def test_a_malformed_verdict_cut_is_refused(tmp_path, monkeypatch, cut):
    _write_plan(tmp_path, f"verdict_cut: {cut}\n")
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="verdict_cut entry"):
        run_study.load_plan("p")


def test_running_some_optimizers_keeps_the_others_choices(tmp_path, monkeypatch):
    """optimizers=[...] tunes one GP pair; choice.json keeps what earlier runs chose for the others."""
    _write_plan(tmp_path, "")
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    tuned = []

    def fake_grid(plan, root, stage, opt, key, grid, fixed, seeds, where, jobs, extend, log):
        tuned.append((opt, key))
        return {"opt.lr": 3e-3, "opt.ap.damping": 1e-2}[key], {}

    monkeypatch.setattr(run_study, "run_grid", fake_grid)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "choice.json").write_text('{"muon": {"opt.lr": 0.01, "lr_scores": {}}}\n')
    run_study.main(["plan=p", "stage=tune", f"sweep_root={sweep}", "optimizers=[adamw,dopr_adamw]"])
    assert tuned == [("adamw", "opt.lr"), ("dopr_adamw", "opt.lr"), ("dopr_adamw", "opt.ap.damping")]
    choice = json.loads((sweep / "choice.json").read_text())
    assert choice["muon"]["opt.lr"] == 0.01  # kept
    assert choice["dopr_adamw"]["opt.ap.damping"] == 1e-2 and choice["adamw"]["opt.lr"] == 3e-3
    with pytest.raises(SystemExit, match=r"optimizers=\['signum'\]"):
        run_study.main(["plan=p", f"sweep_root={sweep}", "optimizers=[signum]"])


def test_the_verdict_stage_refuses_optimizers_not_yet_tuned(tmp_path, monkeypatch):
    _write_plan(tmp_path, "")
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "choice.json").write_text('{"adamw": {"opt.lr": 0.01}}\n')
    with pytest.raises(SystemExit, match=r"no choice for \['dopr_adamw', 'muon'\]"):
        run_study.main(["plan=p", "stage=verdict", f"sweep_root={sweep}"])


PLAN = ("task: lds\noptimizers: [adamw, dopr_adamw]\nlrs: [1e-3]\ndampings: [1e-3]\ntune_seeds: [0]\n"
        "verdict_seeds: [10]\nmetric: test/cost_ratio\n")


@pytest.mark.parametrize("line, message", [
    ("verdict_axis: {task.noise: [0, 1]}", r"unknown key 'verdict_axis' \(did you mean 'verdict_axes'\?\)"),
    ("tune_overides: [task.eval_episodes=20]", r"unknown key 'tune_overides' \(did you mean 'tune_overrides'\?\)"),
    ("extend: two", r"extend: 'two' is not of type int"),
    ("verdict_axes: [1, 2]", r"verdict_axes: \[1, 2\] is not of type dict\[str, list\[int \| float \| str \| bool\]\]"),
    ("overrides: trainer.steps=10", r"overrides: 'trainer.steps=10' is not of type list\[str\]"),
    ("tune_at: {task.noise: [0, 1]}", r"tune_at: .* is not of type dict\[str, int \| float \| str \| bool\]"),
])
def test_a_plan_key_that_is_unknown_or_of_the_wrong_type_is_refused(tmp_path, monkeypatch, line, message):
    """A typo'd optional key would otherwise be ignored (verdict_axis: 2 verdict runs instead of 4)."""
    (tmp_path / "configs" / "study").mkdir(parents=True)
    (tmp_path / "configs" / "study" / "p.yaml").write_text(PLAN + line + "\n")
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=rf"configs/study/p\.yaml: {message}"):
        run_study.load_plan("p")


@pytest.mark.parametrize("lrs", ["1e-3", "[1e-3, fast]"])
def test_a_required_list_given_wrongly_is_refused(tmp_path, monkeypatch, lrs):
    (tmp_path / "configs" / "study").mkdir(parents=True)
    (tmp_path / "configs" / "study" / "p.yaml").write_text(PLAN.replace("lrs: [1e-3]", f"lrs: {lrs}"))
    monkeypatch.setattr(run_study, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"configs/study/p\.yaml: lrs: .* is not of type list\[float\]"):
        run_study.load_plan("p")


def test_score_names_a_damaged_metrics_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "val/loss": 1.0, "test/cost_ratio": 2.0}\n{"step": 20, "val')
    summary = {"headline_metric": "test/cost_ratio", "higher_is_better": False}
    with pytest.raises(SystemExit, match=rf"{run_dir / 'metrics.jsonl'}, line 2: not a JSON record"):
        run_study.score([run_study.Job(run_dir, ())], [summary], "test/cost_ratio")
