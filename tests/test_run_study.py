"""Study plans (dopr/analysis/plan.py), their staging (dopr/study.py, scripts/run_study.py) and the studies
derived from them (dopr/analysis/studies.py): every committed plan loads and builds the runs it built before,
a run's overrides are the plan's for its stage, and a plan's claim and cells name each verdict cell's study."""

import hashlib
import json
import math
from pathlib import Path

import pytest
from script_loader import load_script

import dopr.study
from dopr.analysis import plan as study_plan
from dopr.analysis.stats import higher_is_better
from dopr.analysis.studies import plan_studies, studies

ROOT = Path(__file__).resolve().parents[1]
run_study = load_script("run_study")
PLAN_NAMES = study_plan.plan_names()


@pytest.mark.parametrize("plan", PLAN_NAMES)
def test_committed_plans_load(plan):
    loaded = study_plan.load_plan(plan)
    assert set(loaded["optimizers"]) <= {p.stem for p in (ROOT / "configs" / "opt").glob("*.yaml")}
    assert study_plan.verdict_cells(loaded)  # at least the tuning cell
    assert (ROOT / loaded["readme"]).is_file()


def test_stage_overrides_reach_only_their_stage(tmp_path):
    plan = {"task": "lds", "overrides": ["trainer.steps=10"], "tune_overrides": ["task.eval_episodes=20"],
            "verdict_overrides": ["task.eval_episodes=50"], "default_damping": 1e-3}
    tune = dopr.study.job(tmp_path, "tune", plan, "dopr_adamw", 0, {"opt.lr": 1e-3, "opt.ap.damping": 1e-3}, {})
    verdict = dopr.study.job(tmp_path, "verdict", plan, "dopr_adamw", 10, {"opt.lr": 1e-3, "opt.ap.damping": 1e-2}, {})
    assert "task.eval_episodes=20" in tune.overrides and "task.eval_episodes=50" not in tune.overrides
    assert "task.eval_episodes=50" in verdict.overrides and "task.eval_episodes=20" not in verdict.overrides
    assert "trainer.steps=10" in tune.overrides and "trainer.steps=10" in verdict.overrides
    # the default damping is the lr stage's run: not named twice, not passed twice
    assert "opt.ap.damping" not in tune.run_dir.name and "opt.ap.damping=0.01" in verdict.run_dir.name
    # the stage's settings come last, so they win over a plan-wide override of the same key
    assert verdict.overrides[-1] == "opt.ap.damping=0.01"


PLAN = ("task: lds\nclaim: DoPr lowers the cost\nmetric: test/cost_ratio\nreadme: experiments/lds/README.md\n"
        "optimizers: [adamw, dopr_adamw]\nlrs: [1e-3]\ndampings: [1e-3]\ntune_seeds: [0]\nverdict_seeds: [10]\n")


@pytest.fixture
def plans(tmp_path, monkeypatch):
    """A configs/study of one's own: write(text) puts plan p there."""
    folder = tmp_path / "configs" / "study"
    folder.mkdir(parents=True)
    monkeypatch.setattr(study_plan, "PLANS", folder)

    def write(text: str, name: str = "p") -> Path:
        (folder / f"{name}.yaml").write_text(text)
        return folder

    return write


def test_a_plan_in_progress_runs_but_is_not_a_registered_study(plans):
    from dopr.analysis.studies import studies

    folder = plans(PLAN)
    plans(PLAN + "in_progress: true\n", name="q")
    assert set(studies(folder)) == {"p"}  # q has no committed results: nothing may be tabled from it
    assert study_plan.load_plan("q")["in_progress"] and not study_plan.load_plan("p")["in_progress"]


@pytest.mark.parametrize("extra, message", [
    ("peers: [soap]\nreferences: [adamw]\n", r"\['soap'\] are not"),
    ("peers: [dopr_adamw]\n", r"need references"),
    ("peers: [adamw]\nreferences: [adamw]\n", r"no optimizer can be both"),
])
def test_peers_and_references_are_checked_against_the_optimizers(plans, extra, message):
    plans(PLAN + extra)
    with pytest.raises(SystemExit, match=message):
        study_plan.load_plan("p")


def test_overlapping_seeds_are_refused(plans):
    plans(PLAN.replace("verdict_seeds: [10]", "verdict_seeds: [0, 2]"))
    with pytest.raises(SystemExit, match=r"seeds \[0\] are both tuning and verdict seeds"):
        study_plan.load_plan("p")


def test_verdict_cut_runs_only_the_listed_optimizers_in_matching_cells(plans):
    plans(PLAN.replace("[adamw, dopr_adamw]", "[adamw, dopr_adamw, muon]")
          + "verdict_axes: {task.train_episodes: [10, 2], task.noise: [0, 1]}\n"
            "cell: demos{task.train_episodes}_noise{task.noise}\n"
            "verdict_cut: [{where: {task.train_episodes: 2}, optimizers: [adamw, dopr_adamw]}]\n")
    plan = study_plan.load_plan("p")
    ran = {(c["task.train_episodes"], c["task.noise"]): study_plan.verdict_optimizers(plan, c)
           for c in study_plan.verdict_cells(plan)}
    assert ran == {(10, 0): ["adamw", "dopr_adamw", "muon"], (10, 1): ["adamw", "dopr_adamw", "muon"],
                   (2, 0): ["adamw", "dopr_adamw"], (2, 1): ["adamw", "dopr_adamw"]}


@pytest.mark.parametrize("cut", ["[{where: {task.noise: 0}, optimizers: [signum]}]",  # not in the plan
                                 "[{where: {task.noise: 0}}]",  # no optimizers
                                 "[{task.noise: 0, optimizers: [adamw]}]"])  # no where
def test_a_malformed_verdict_cut_is_refused(plans, cut):
    plans(PLAN + f"verdict_cut: {cut}\n")
    with pytest.raises(SystemExit, match="verdict_cut entry"):
        study_plan.load_plan("p")


def test_running_some_optimizers_keeps_the_others_choices(plans, tmp_path, monkeypatch):
    """optimizers=[...] tunes one GP pair; choice.json keeps what earlier runs chose for the others."""
    plans(PLAN.replace("[adamw, dopr_adamw]", "[adamw, dopr_adamw, muon]"))
    tuned = []

    def fake_grid(plan, root, stage, opt, key, grid, fixed, seeds, where, jobs, extend, log):
        tuned.append((opt, key))
        return {"opt.lr": 3e-3, "opt.ap.damping": 1e-2}[key], {}

    monkeypatch.setattr(dopr.study, "run_grid", fake_grid)
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


def test_the_verdict_stage_refuses_optimizers_not_yet_tuned(plans, tmp_path):
    plans(PLAN.replace("[adamw, dopr_adamw]", "[adamw, dopr_adamw, muon]"))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "choice.json").write_text('{"adamw": {"opt.lr": 0.01}}\n')
    with pytest.raises(SystemExit, match=r"no choice for \['dopr_adamw', 'muon'\]"):
        run_study.main(["plan=p", "stage=verdict", f"sweep_root={sweep}"])


@pytest.mark.parametrize("extra", ["equal_compute: [muon]\n", "equal_compute: [dopr_adamw]\n"])
def test_equal_compute_names_a_base_with_its_dopr_partner(plans, extra):
    plans(PLAN.replace("[adamw, dopr_adamw]", "[adamw, dopr_adamw, muon]") + extra)
    with pytest.raises(SystemExit, match="equal_compute: .* must be base GPs"):
        study_plan.load_plan("p")


def _finished(run_dir: Path, wall_time: float, steps: int, cpu: str = "Intel Xeon", eval_every: int = 100) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "finished", "last": {"step": steps, "wall_time": wall_time},
        "config": {"trainer": {"steps": steps, "eval_every": eval_every}}, "threads": 1,
        "machine": {"cpu": cpu, "aten_cpu_capability": "AVX512", "cores": 2}}))


def test_the_equal_compute_stage_gives_the_base_dopr_wall_clock_in_steps_per_seed(plans, tmp_path, monkeypatch,
                                                                                   capsys):
    """Per seed: DoPr's wall_time over the base's seconds per step, rounded up to an evaluation interval, from the
    seed's two finished verdict runs on one machine; other seeds wait for a later call."""
    plans(PLAN.replace("verdict_seeds: [10]", "verdict_seeds: [10, 11, 12, 13]") + "equal_compute: [adamw]\n")
    sweep = tmp_path / "sweep"
    (sweep / "verdict").mkdir(parents=True)
    (sweep / "choice.json").write_text(json.dumps({"adamw": {"opt.lr": 0.01}, "dopr_adamw": {"opt.lr": 0.001}}))
    # 1000-step runs: base 0.1 s/step; DoPr 251 s (2510 steps' worth) on seed 10, 230 s on seed 11; seed 12's
    # DoPr ran on another CPU (no comparable wall-clock); seed 13's DoPr has not finished.
    for seed, dopr_seconds, cpu in ((10, 251.0, "Intel Xeon"), (11, 230.0, "Intel Xeon"), (12, 900.0, "AMD EPYC")):
        _finished(sweep / "verdict" / f"opt=adamw,opt.lr=0.01,seed={seed}", 100.0, 1000)
        _finished(sweep / "verdict" / f"opt=dopr_adamw,opt.lr=0.001,seed={seed}", dopr_seconds, 1000, cpu)
    _finished(sweep / "verdict" / "opt=adamw,opt.lr=0.01,seed=13", 100.0, 1000)
    ran = []
    monkeypatch.setattr(dopr.study, "run_jobs", lambda jobs, n, on_done=None: ran.extend(jobs) or [])
    run_study.main(["plan=p", "stage=equal_compute", f"sweep_root={sweep}"])
    assert [str(j.run_dir.relative_to(sweep)) for j in ran] == [
        "equal_compute/opt=adamw,opt.lr=0.01,trainer.steps=2600,seed=10",
        "equal_compute/opt=adamw,opt.lr=0.01,trainer.steps=2300,seed=11"]
    assert ran[0].overrides.index("trainer.steps=2600") > ran[0].overrides.index("opt=adamw")  # after the plan's
    assert "2 seed(s) wait for their verdict pair" in capsys.readouterr().out
    # A later call, once seed 13's pair has finished, runs the same two and seed 13's.
    _finished(sweep / "verdict" / "opt=dopr_adamw,opt.lr=0.001,seed=13", 400.0, 1000)
    ran.clear()
    run_study.main(["plan=p", "stage=equal_compute", f"sweep_root={sweep}"])
    assert [str(j.run_dir.relative_to(sweep)).split(",")[2:] for j in ran] == [
        ["trainer.steps=2600", "seed=10"], ["trainer.steps=2300", "seed=11"], ["trainer.steps=4000", "seed=13"]]


def test_the_equal_compute_stage_waits_for_a_finished_pair(plans, tmp_path, monkeypatch, capsys):
    plans(PLAN + "equal_compute: [adamw]\n")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "choice.json").write_text(json.dumps({"adamw": {"opt.lr": 0.01}, "dopr_adamw": {"opt.lr": 0.001}}))
    monkeypatch.setattr(dopr.study, "run_jobs", lambda *a, **k: pytest.fail("nothing is ready to run"))
    run_study.main(["plan=p", "stage=equal_compute", f"sweep_root={sweep}"])
    assert "1 seed(s) wait for their verdict pair" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("verdict_axis: {task.noise: [0, 1]}", r"unknown key 'verdict_axis' \(did you mean 'verdict_axes'\?\)"),
    ("tune_overides: [task.eval_episodes=20]", r"unknown key 'tune_overides' \(did you mean 'tune_overrides'\?\)"),
    ("extend: two", r"extend: 'two' is not of type int"),
    ("verdict_axes: [1, 2]", r"verdict_axes: \[1, 2\] is not of type dict\[str, list\[int \| float \| str \| bool\]\]"),
    ("overrides: trainer.steps=10", r"overrides: 'trainer.steps=10' is not of type list\[str\]"),
    ("tune_at: {task.noise: [0, 1]}", r"tune_at: .* is not of type dict\[str, int \| float \| str \| bool\]"),
    ("notes: one note", r"notes: 'one note' is not of type list\[str\]"),
    # a cell's study needs a name of its own, and every {key} in the plan's text must be a verdict axis
    ("verdict_axes: {task.noise: [0, 1]}", r"cell: '' must name every verdict axis \(task.noise\)"),
    ("verdict_axes: {task.noise: [0, 1]}\ncell: noise{task.nois}",
     r"cell: \{task.nois\} is not one of the verdict_axes"),
    ("verdict_axes: {task.noise: [0, 1]}\ncell: noise{task.noise}\nvalue_labels: {task.noise: {2: {cell: two}}}",
     r"value_labels: task.noise: 2: .* must label one of \[0, 1\]"),
    ("verdict_axes: {task.noise: [0, 1]}\ncell: noise{task.noise}\nvalue_labels: {task.noise: {1: {name: one}}}",
     r"value_labels: task.noise: 1: \{'name': 'one'\} must label one of \[0, 1\] for cell and/or claim"),
    ("verdict_axes: {task.noise: [0, 1]}\ncell: noise{task.noise}\nvalue_labels: {task.noise: {1: {cell: 1e0}}}",
     r"value_labels: .* is not of type dict\[str, dict\[int \| float \| str \| bool, dict\[str, str\]\]\]"),
])
def test_a_plan_key_that_is_unknown_or_of_the_wrong_type_is_refused(plans, line, message):
    """A typo'd optional key would otherwise be ignored (verdict_axis: 2 verdict runs instead of 4)."""
    plans(PLAN + line + "\n")
    with pytest.raises(SystemExit, match=rf"configs/study/p\.yaml: {message}"):
        study_plan.load_plan("p")


@pytest.mark.parametrize("lrs", ["1e-3", "[1e-3, fast]"])
def test_a_required_list_given_wrongly_is_refused(plans, lrs):
    plans(PLAN.replace("lrs: [1e-3]", f"lrs: {lrs}"))
    with pytest.raises(SystemExit, match=r"configs/study/p\.yaml: lrs: .* is not of type list\[float\]"):
        study_plan.load_plan("p")


def test_a_plan_without_its_claim_is_refused(plans):
    plans(PLAN.replace("claim: DoPr lowers the cost\n", ""))
    with pytest.raises(SystemExit, match=r"configs/study/p\.yaml lacks \['claim'\]"):
        study_plan.load_plan("p")


def test_score_names_a_damaged_metrics_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "val/loss": 1.0, "test/cost_ratio": 2.0}\n{"step": 20, "val')
    summary = {"headline_metric": "test/cost_ratio", "higher_is_better": False}
    with pytest.raises(SystemExit, match=rf"{run_dir / 'metrics.jsonl'}, line 2: not a JSON record"):
        dopr.study.score([dopr.study.Job(run_dir, ())], [summary], "test/cost_ratio")


def test_each_verdict_cell_is_a_study_named_and_claimed_from_the_plan(plans):
    """A plan's verdict cells become studies: results/<plan>/<cell>, the claim's {key} written as value_labels
    says (else as the value), the settings in key order, all read from the plan's one evals.csv."""
    plans(PLAN.replace("claim: DoPr lowers the cost", "claim: DoPr lowers the cost at noise {task.noise_cond} "
                                                      "({task.train_episodes} demos)")
          + "verdict_axes: {task.train_episodes: [10, 2], task.noise_cond: [1.0, 1e2]}\n"
            "cell: cond{task.noise_cond}_demos{task.train_episodes}\n"
            "value_labels: {task.noise_cond: {1.0: {cell: '1e0', claim: '1'}, 1e2: {cell: '1e2'}}}\n"
            "secondary: [test/x]\nnotes: [tuned at 1e2]\n", "q")
    specs = plan_studies("q", study_plan.load_plan("q"))
    assert [(s.name, s.out, s.claim) for s in specs] == [
        ("q_cond1e0_demos10", "results/q/cond1e0_demos10", "DoPr lowers the cost at noise 1 (10 demos)"),
        ("q_cond1e2_demos10", "results/q/cond1e2_demos10", "DoPr lowers the cost at noise 100.0 (10 demos)"),
        ("q_cond1e0_demos2", "results/q/cond1e0_demos2", "DoPr lowers the cost at noise 1 (2 demos)"),
        ("q_cond1e2_demos2", "results/q/cond1e2_demos2", "DoPr lowers the cost at noise 100.0 (2 demos)")]
    first = specs[0]
    assert list(first.verdict_where.items()) == [("task.noise_cond", 1.0), ("task.train_episodes", 10)]
    assert first.sweep == ["results/q/evals.csv"] and first.readme == "experiments/lds/README.md"
    assert first.commands == ["python scripts/run_study.py plan=q",
                              "python scripts/aggregate.py sweep=multirun/q out=results/q "
                              "group=opt.name,opt.lr,opt.ap.damping,task.noise_cond,task.train_episodes"]
    assert (first.tune_seeds, first.verdict_seeds) == ([0], [10])
    assert (first.secondary, first.notes) == (["test/x"], ["tuned at 1e2"])
    assert first.predictors == ["val/loss"] and first.task == "lds" and first.metric == "test/cost_ratio"


def test_a_plan_without_verdict_axes_is_one_study_under_its_own_name(plans):
    folder = plans(PLAN)
    assert [(s.name, s.out, s.claim, s.verdict_where) for s in studies(folder).values()] == [
        ("p", "results/p", "DoPr lowers the cost", {})]


def test_every_committed_plan_is_a_registered_study_once_it_is_done():
    names = {spec.out.split("/")[1] for spec in studies().values()}
    running = {name for name in PLAN_NAMES if study_plan.load_plan(name)["in_progress"]}
    assert names == set(PLAN_NAMES) - running
    assert not any((ROOT / "results" / name).exists() for name in running), "a plan with results is not in progress"


# The runs and choices of every committed plan as scripts/run_study.py built them before its staging moved into
# dopr/study.py (recorded from that code, commit c78985b): (runs, a digest of every run's dir and overrides in
# order and of the settings choice.json holds), for the whole plan and then for its last GP pair alone beside
# earlier choices. Since then only the verdict's order changed, to seed by seed (dopr.study.verdict_jobs): the
# same runs, each plan's verdict job set checked equal to the old per-optimizer order's when the digests moved;
# and gym_humanoid_converged's ``extend`` is 2.
# The runs are faked (staged_runs), each optimizer's best lr and damping below, inside or above its grid, so
# that grids are extended both ways up to ``extend`` times. A change here changes what a study runs.
EXPECTED_RUNS = {
    "flow_2d_checkerboard": (146, "751d1787510c3d19"),
    "flow_digits_unet": (92, "d67674567e8c2456"),
    "gym_hopper_noise": (460, "51788262e7c5ceb2"),
    "gym_walker2d_budget": (348, "8183a53dc527cda2"),
    "gym_hopper_converged": (214, "95482fc7d7230723"),
    "gym_humanoid_converged": (252, "a6bd0ad3c97d3fb2"),
    "lds_anisotropy": (408, "34d8dbddc33d0401"),
    "lm_arith_len45": (195, "e166768b8d71284b"),
    "lm_arith_converged": (214, "e8f298fa62249d39"),
    "robomimic_lift_3demos": (92, "b94e099f4e11986b"),
}


def staged_runs(main, set_run_jobs, plan: dict, name: str, root: Path) -> dict:
    """What ``main`` (a run_study main) runs for plan ``name`` and what it chooses, with the runner faked
    (``set_run_jobs(fake)`` puts it in place): each optimizer's best setting is below, inside or above its
    grid (by its index in the plan)."""
    metric, optimizers, higher = plan["metric"], plan["optimizers"], higher_is_better(plan["metric"])
    result = {}
    for variant, extra in [("all", []), ("pair", [f"optimizers=[{','.join(optimizers[-2:])}]"])]:
        sweep, calls = root / variant, []
        sweep.mkdir(parents=True)
        if variant == "pair":  # the others' choices, from an earlier run, are kept
            earlier = {o: {"opt.lr": 0.5, **({"opt.ap.damping": 0.25} if o.startswith("dopr_") else {})}
                       for o in optimizers[:-2]}
            (sweep / "choice.json").write_text(json.dumps(earlier))

        def run_jobs(jobs, n, on_done=None):
            calls.append([[str(j.run_dir.relative_to(sweep)), list(j.overrides)] for j in jobs])
            summaries = []
            for j in jobs:
                setting = dict(o.split("=", 1) for o in j.overrides)
                index = optimizers.index(setting["opt"])
                lr, damping = float(setting["opt.lr"]), float(setting.get("opt.ap.damping", plan["default_damping"]))
                best_lr = [1e-9, plan["lrs"][2], 1e3][index % 3]
                best_damping = [1e3, plan["dampings"][2], 1e-9][index % 3]
                closeness = (-abs(math.log10(lr / best_lr)) - abs(math.log10(damping / best_damping))
                             + 0.01 * int(setting["seed"]))
                score = math.exp(closeness if higher else -closeness)
                if index == 0 and setting["seed"] == "0" and lr == plan["lrs"][0]:
                    score = math.nan  # a missing value is skipped, not a zero
                j.run_dir.mkdir(parents=True, exist_ok=True)
                records = [{"step": 1, "val/loss": 1.0, metric: score / 2}, {"step": 2, "val/loss": 0.5, metric: score}]
                (j.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
                summaries.append({"status": "finished", "headline_metric": metric, "higher_is_better": None,
                                  "last": {"step": 2, metric: score}})
            return summaries

        set_run_jobs(run_jobs)
        main([f"plan={name}", f"sweep_root={sweep}", *extra])
        choice = json.loads((sweep / "choice.json").read_text())  # its scores' last digits are the machine's
        result[variant] = {"runs": calls, "choice": {o: {k: v for k, v in c.items() if k in dopr.study.CHOSEN}
                                                     for o, c in choice.items()}}
    return result


def digest(result: dict) -> tuple[int, str]:
    runs = sum(len(call) for variant in result.values() for call in variant["runs"])
    return runs, hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_every_committed_plan_runs_what_it_ran_before(name, tmp_path, monkeypatch):
    result = staged_runs(run_study.main, lambda fake: monkeypatch.setattr(dopr.study, "run_jobs", fake),
                         study_plan.load_plan(name), name, tmp_path)
    assert digest(result) == EXPECTED_RUNS[name]
