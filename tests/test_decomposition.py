"""dopr/analysis/decomposition.py (docs/STUDIES.md §3b) on synthetic curves with known answers: speed, matched
loss (per seed and pooled), converged or budget-limited, equal compute, and the table."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from dopr.analysis import decomposition as dc

METRIC = "test/return"


def run(vals, metric=None, steps=None, seconds_per_step=1.0, train=None):
    """One run's curve: evaluations at steps 100, 200, ... unless given; wall_time = steps x seconds_per_step."""
    steps = steps or [100 * (i + 1) for i in range(len(vals))]
    frame = pd.DataFrame({"step": steps, "wall_time": [s * seconds_per_step for s in steps], "val/loss": vals,
                          METRIC: metric if metric is not None else [0.0] * len(vals)})
    if train is not None:
        frame["train/loss"] = train
    return frame


# base best 0.2 at step 400; DoPr best 0.05, crossing 0.2 halfway (in log loss) between steps 200 and 300
BASE = dict(vals=[1.0, 0.5, 0.25, 0.2], metric=[0.0, 0.1, 0.2, 0.3])
DOPR = dict(vals=[0.8, 0.4, 0.1, 0.05], metric=[0.1, 0.4, 0.7, 0.8])


def test_first_reach_interpolates_in_log_loss_and_says_never_and_at_or_before():
    dopr = run(**DOPR, seconds_per_step=2.0)
    hit = dc.first_reach(dopr, 0.2)
    assert hit.step == pytest.approx(250) and hit.seconds == pytest.approx(500) and not hit.censored
    assert dc.first_reach(dopr, 0.01) is None  # never reached
    early = dc.first_reach(dopr, 0.9)  # already below at its first evaluation: at or before step 100
    assert early.step == 100 and early.censored


def test_speed_per_seed_and_summary_with_a_never_reached_side():
    dopr = {s: run(**DOPR) for s in (1, 2)}
    base = {1: run(**BASE), 2: run([1.0, 0.5, 0.3, 0.2], BASE["metric"])}
    out = dc.speed(dopr, base)
    assert out["dopr_reached"] == 2 and out["dopr_step_median"] == pytest.approx(250)
    assert out["dopr_s_median"] == pytest.approx(250)
    assert out["base_reached"] == 0 and math.isnan(out["base_step_median"])  # the base never gets to 0.05
    assert [r["base_to_dopr_best_step"] for r in out["seeds"]] == [None, None]
    assert out["base_best_step_median"] == 400


def test_matched_loss_reads_both_arms_at_the_larger_best_val_loss():
    # level 0.2 (the base's best): base 0.3 at its last checkpoint; DoPr halfway 0.4 -> 0.7 = 0.55
    dopr = {1: run(**DOPR), 2: run(DOPR["vals"], [m + 0.1 for m in DOPR["metric"]])}
    base = {1: run(**BASE), 2: run(**BASE)}
    m = dc.matched_loss(dopr, base, METRIC, higher=True)
    assert [r["level"] for r in m.seeds] == pytest.approx([0.2, 0.2])
    assert [r["dopr"] for r in m.seeds] == pytest.approx([0.55, 0.65])
    assert [r["base"] for r in m.seeds] == pytest.approx([0.3, 0.3])
    assert m.result.diff.mean == pytest.approx(0.30) and m.result.diff.n == 2 and not m.unmatched


def test_matched_loss_says_where_the_ranges_do_not_overlap():
    dopr = {1: run([0.1, 0.05], [0.5, 0.6]), 2: run(**DOPR)}  # seed 1: DoPr starts below the base's best
    base = {1: run(**BASE), 2: run(**BASE)}
    m = dc.matched_loss(dopr, base, METRIC, higher=True)
    assert len(m.unmatched) == 1 and "do not overlap" in m.unmatched[0]["why"] and m.unmatched[0]["seed"] == 1
    assert m.result.diff.n == 1 and m.result.seeds == [2]
    none = dc.matched_loss({1: run([0.1, 0.05])}, {1: run(**BASE)}, METRIC, higher=True)
    assert none.result is None and "no seed" in dc._matched_text(none)


def test_matched_train_set_loss_uses_its_own_column():
    # on train/loss the DoPr run is worse (higher), so the level is DoPr's best 0.4 and the base is read there
    dopr = {1: run(**DOPR, train=[0.9, 0.6, 0.5, 0.4])}
    base = {1: run(**BASE, train=[1.0, 0.8, 0.4, 0.2])}
    m = dc.matched_loss(dopr, base, METRIC, higher=True, loss="train/loss")
    assert m.seeds[0]["level"] == pytest.approx(0.4)
    assert m.seeds[0]["dopr"] == pytest.approx(0.8) and m.seeds[0]["base"] == pytest.approx(0.2)


def _grid(offset, n=6, seed=0):
    """n runs whose metric is the same function of log val/loss, plus ``offset``."""
    rng = np.random.default_rng(seed)
    runs = {}
    for k in range(n):
        vals = np.exp(np.sort(rng.uniform(-5, 0, size=6))[::-1])
        runs[f"r{k}"] = run(list(vals), list(-np.log(vals) / 5 + offset))
    return runs


def test_pooled_comparison_finds_a_known_offset_and_none_when_arms_share_the_curve():
    same = dc.pooled_matched_loss(_grid(0.0, seed=1), _grid(0.0, seed=2), METRIC, resamples=200)
    shifted = dc.pooled_matched_loss(_grid(0.1, seed=1), _grid(0.0, seed=2), METRIC, resamples=200)
    assert abs(same.diff) < 0.05 and same.bins_shared >= 6 and same.runs == (6, 6)
    assert shifted.diff - same.diff == pytest.approx(0.1) and shifted.low > 0
    assert shifted.low <= shifted.diff <= shifted.high


def test_pooled_comparison_of_a_ratio_metric_is_of_its_log():
    grid = {f"r{k}": run([1.0, 0.1, 0.01], [4.0, 2.0, 1.0]).rename(columns={METRIC: "test/cost_ratio"})
            for k in range(3)}
    double = {k: c.assign(**{"test/cost_ratio": 2 * c["test/cost_ratio"]}) for k, c in grid.items()}
    out = dc.pooled_matched_loss(double, grid, "test/cost_ratio", resamples=50)
    assert out.diff == pytest.approx(math.log(2))


def test_pooled_comparison_says_when_the_ranges_do_not_overlap():
    low = {"a": run([0.01, 0.005], [0.9, 1.0])}
    high = {"b": run([1.0, 0.5], [0.0, 0.1])}
    out = dc.pooled_matched_loss(low, high, METRIC, resamples=50)
    assert "do not overlap" in out.note and math.isnan(out.diff) and out.outside == (2, 2)


def test_convergence_labels_converged_budget_limited_and_too_few_evaluations():
    flat = [1.0, 0.6, 0.4, 0.3, 0.25, 0.22, 0.215, 0.212]  # 8 evaluations: 0.22 (step 600) -> 0.212: -3.6%
    falling = [1.0, 0.6, 0.4, 0.3, 0.25, 0.22, 0.18, 0.15]  # 0.22 -> 0.15: -32%
    converged = dc.convergence({1: run(flat), 2: run(flat)})
    assert converged["label"] == "converged" and converged["median_change"] == pytest.approx(0.212 / 0.22 - 1)
    limited = dc.convergence({1: run(flat), 2: run(falling)})
    assert limited["label"] == "budget-limited" and "1/2 runs" in limited["why"]
    assert [r["label"] for r in limited["seeds"]] == ["flat", "still changing"]
    few = dc.convergence({1: run([1.0, 0.9, 0.895])})  # steps 100, 200, 300: only step 300 is at or after 225
    assert few["label"] == "budget-limited" and few["seeds"][0]["label"] == "too few evaluations"
    assert "too few evaluations" in few["why"] and few["seeds"][0]["change"] == pytest.approx(0.895 / 0.9 - 1)


def test_equal_compute_gives_the_base_dopr_wall_clock_or_says_it_is_too_short():
    # DoPr: 4 evaluations at 2 s/step (400 steps, 800 s, final 0.9). Seeds 1 and 2: the base ran 800 steps at
    # 1 s/step, metric 0.8 and 0.6 at 800 s; seed 3's base ran only 400 steps (400 s): too short.
    dopr = {s: run([0.8, 0.4, 0.2, 0.1], [0.1, 0.5, 0.8, 0.9], seconds_per_step=2.0) for s in (1, 2, 3)}
    base = {1: run([1.0] * 8, [0.1 * (i + 1) for i in range(8)]),
            2: run([1.0] * 8, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6]),
            3: run([1.0] * 4, [0.2] * 4)}
    out = dc.equal_compute(dopr, base, METRIC, higher=True)
    assert out["dopr_s_per_step"] == pytest.approx(2.0) and out["base_s_per_step"] < 2.0
    values = {r["seed"]: r["base"] for r in out["seeds"]}
    assert values[1] == pytest.approx(0.8) and values[2] == pytest.approx(0.6) and math.isnan(values[3])
    assert out["result"].diff.n == 2 and out["result"].diff.mean == pytest.approx(((0.9 - 0.8) + (0.9 - 0.6)) / 2)
    assert "base budget too short on 1/3 seeds" in out["status"] and "about 800" in out["status"]
    cheap = dc.equal_compute({1: run([1.0, 0.5])}, {1: run([1.0, 0.5], seconds_per_step=3.0)}, METRIC, higher=True)
    assert cheap["result"] is None and "not costlier" in cheap["status"]
    # Seed 3's base run flat by part 3's rule: its last value (0.2) stands at DoPr's wall-clock, said so.
    flat = dc.equal_compute(dopr, base, METRIC, higher=True, flat={3})
    assert {r["seed"]: r["carried"] for r in flat["seeds"]} == {1: False, 2: False, 3: True}
    assert [r["base"] for r in flat["seeds"]][2] == pytest.approx(0.2) and flat["result"].diff.n == 3
    assert "carried to DoPr's wall-clock on 1/3 seeds" in flat["status"] and "too short" not in flat["status"]


def test_equal_compute_takes_the_base_rerun_where_its_steps_reach_dopr_wall_clock():
    """The equal_compute stage's re-run of the base stands in for a verdict run that ended before DoPr's
    wall-clock, read at its last evaluation, only where its steps reach what that wall-clock buys the base by
    less than one evaluation more (a re-run made for that budget); its own (possibly loaded) clock is not read."""
    # DoPr: 400 steps at 2 s/step (800 s). The base's verdict runs: 400 steps at 1 s/step, so it needs 800 steps.
    dopr = {s: run([0.8, 0.4, 0.2, 0.1], [0.1, 0.5, 0.8, 0.9], seconds_per_step=2.0) for s in (1, 2, 3)}
    base = {s: run([1.0, 0.5, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]) for s in (1, 2, 3)}
    longer = {1: run([1.0, 0.5, 0.3, 0.2, 0.15, 0.11, 0.11, 0.11], [0.1 * i for i in range(8)],
                     seconds_per_step=5.0),  # 800 steps: made for this budget; its slow clock is ignored
              2: run([1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.11], [0.95] * 7),  # 700 steps: short of 800
              3: run([0.2] * 16, [0.95] * 16)}  # 1600 steps: twice DoPr's wall-clock, not this budget's run
    out = dc.equal_compute(dopr, base, METRIC, higher=True, longer=longer)
    by_seed = {r["seed"]: r for r in out["seeds"]}
    assert by_seed[1]["base"] == pytest.approx(0.7) and by_seed[1]["longer_steps"] == 800
    assert math.isnan(by_seed[2]["base"]) and by_seed[2]["longer_steps"] is None
    assert math.isnan(by_seed[3]["base"]) and by_seed[3]["longer_steps"] is None
    assert out["result"].diff.n == 1 and out["result"].diff.mean == pytest.approx(0.9 - 0.7)
    assert "on 1/3 seeds, its last evaluation taken: 1.00-1.00x the steps" in out["status"]
    assert "flat over its last quarter on 1/1 (converged)" in out["status"]  # 0.11 -> 0.11 from step 600
    assert "base budget too short on 2/3 seeds" in out["status"] and "stage=equal_compute" in out["status"]
    # Where the verdict run already covers DoPr's wall-clock it is read, not the re-run.
    long_enough = {1: run([1.0] * 8, [0.5] * 8)}
    covered = dc.equal_compute({1: dopr[1]}, long_enough, METRIC, higher=True, longer={1: longer[1]})
    assert covered["seeds"][0]["base"] == pytest.approx(0.5) and covered["seeds"][0]["longer_steps"] is None


def test_decompose_finds_the_base_reruns_at_the_chosen_setting_and_keeps_them_out_of_the_pool():
    from dopr.analysis import report

    evals, runs = _study_frames(8)
    keys = ["opt.lr", "opt.ap.damping"]
    choice = report.choose_settings(runs, METRIC, True, keys)
    evals.loc[evals["run"].str.contains("dopr"), "wall_time"] *= 2  # DoPr's 800 steps buy the base 1600
    extra, rows = [], []
    for seed, lr in ((10, 1e-3), (11, 1e-3), (11, 3e-3)):  # the 3e-3 run is not at the chosen setting
        r = f"equal_compute/opt=adamw,opt.lr={lr},trainer.steps=1600,seed={seed}"  # evaluations every 100 steps
        extra.append(run([1.0, 0.5, 0.25] + [0.2] * 13, [0.5 if lr == 1e-3 else 0.9] * 16).assign(run=r))
        rows.append({"task": "toy", "stage": "equal_compute", "gp": "adamw", "opt.name": "adamw", "ap": False,
                     "opt.lr": lr, "opt.ap.damping": math.nan, "seed": seed, "run": r,
                     f"best/{METRIC}": 0.5, "best/val/loss": 0.2, "last_step": 1600})
    evals = pd.concat([evals, *extra], ignore_index=True)
    runs = pd.concat([runs, pd.DataFrame(rows)], ignore_index=True)
    part = dc.decompose(evals, runs, choice, keys, METRIC, True)[0]
    ec = part["equal_compute"]
    assert [(r["seed"], r["longer_steps"], r["base"]) for r in ec["seeds"]] == [(10, 1600, 0.5), (11, 1600, 0.5)]
    assert ec["longer"] == {"n": 2, "flat": 2, "label": "converged"}
    assert part["pooled"].runs == (3, 3)  # the pool stays the tuning and verdict runs
    assert "(re-run, step 1600)" in dc.decomposition_table([part])


def test_value_at_time_interpolates_in_wall_clock():
    base = run([1.0, 0.5, 0.2], [0.0, 1.0, 2.0])
    assert dc.value_at_time(base, 150, METRIC) == pytest.approx(0.5)
    assert math.isnan(dc.value_at_time(base, 301, METRIC))


def _study_frames(evaluations):
    """A toy study: 2 verdict seeds per arm (the runs' curves from ``run``) and one tuning run per arm."""
    rows, curves = [], {}
    for seed, stage in ((0, "tune"), (10, "verdict"), (11, "verdict")):
        for name, spec in (("adamw", BASE), ("dopr_adamw", DOPR)):
            r = f"{stage}/opt={name},seed={seed}"
            vals = np.interp(np.linspace(0, 3, evaluations), range(4), np.log(spec["vals"]))
            metric = np.interp(np.linspace(0, 3, evaluations), range(4), spec["metric"])
            curves[r] = run(list(np.exp(vals)), list(metric))
            rows.append({"task": "toy", "stage": stage, "gp": "adamw", "opt.name": name, "ap": name != "adamw",
                         "opt.lr": 1e-3, "opt.ap.damping": 0.01 if name != "adamw" else math.nan, "seed": seed,
                         "run": r, f"best/{METRIC}": 1.0, "best/val/loss": 0.1})
    runs = pd.DataFrame(rows)
    evals = pd.concat([c.assign(run=r) for r, c in curves.items()], ignore_index=True)
    return evals, runs


@pytest.mark.parametrize("evaluations, note", [(3, "3 evaluations per run: too few for §3b's curves (at least 8)"),
                                                (8, "8 evaluations per run |")])
def test_decompose_pairs_the_verdict_runs_and_the_table_says_how_many_evaluations(evaluations, note):
    from dopr.analysis import report

    evals, runs = _study_frames(evaluations)
    keys = ["opt.lr", "opt.ap.damping"]
    choice = report.choose_settings(runs, METRIC, True, keys)
    parts = dc.decompose(evals, runs, choice, keys, METRIC, True)
    assert len(parts) == 1 and sorted(parts[0]["pair"].base) == [10, 11]  # verdict seeds only
    assert parts[0]["pooled"].runs == (3, 3)  # the pooled comparison takes the tuning run too
    table = dc.decomposition_table(parts)
    assert note in table and "| pair |" in table and "Per seed:" in table
    rows = dc.decomposition_rows(parts)
    assert rows.loc[0, "seeds"] == 2 and rows.loc[0, "matched_val_n"] == 2
    assert rows.loc[0, "evaluations_min"] == evaluations
    assert dc.decompose(evals, runs.assign(stage="tune"), choice, keys, METRIC, True) == []  # no verdict: nothing


def test_wall_clocks_of_runs_on_different_machines_are_not_compared():
    """A sweep spanning sessions can put a seed's two runs on different CPUs (AVX2 and AVX-512 kernels here):
    that seed keeps its steps but gets no seconds to the other's best and no equal-compute value, and the
    status says so; a run whose records do not name a machine is not taken as different."""
    import json

    from dopr.analysis import report

    evals, runs = _study_frames(8)
    machine = {"cpu": "AMD EPYC", "cores": 2, "aten_cpu_capability": "AVX2", "platform": "x", "python": "3.11"}
    evals["machine"], evals["threads"] = json.dumps(machine), 1
    moved = evals["run"] == "verdict/opt=dopr_adamw,seed=11"
    evals.loc[moved, "machine"] = json.dumps(machine | {"aten_cpu_capability": "AVX512"})
    hosts = dc.run_hosts(evals)
    assert hosts["verdict/opt=adamw,seed=11"] != hosts["verdict/opt=dopr_adamw,seed=11"]
    assert hosts["verdict/opt=adamw,seed=10"] == hosts["verdict/opt=dopr_adamw,seed=10"]

    keys = ["opt.lr", "opt.ap.damping"]
    choice = report.choose_settings(runs, METRIC, True, keys)
    # DoPr's steps cost twice the base's, so equal compute compares at DoPr's wall-clock.
    evals.loc[evals["run"].str.contains("dopr"), "wall_time"] *= 2
    part = dc.decompose(evals, runs, choice, keys, METRIC, True)[0]
    by_seed = {r["seed"]: r for r in part["speed"]["seeds"]}
    assert by_seed[10]["dopr_to_base_best_s"] is not None and by_seed[11]["dopr_to_base_best_s"] is None
    assert by_seed[11]["dopr_to_base_best_step"] == by_seed[10]["dopr_to_base_best_step"]  # steps still compare
    ec = part["equal_compute"]
    assert [r["seed"] for r in ec["seeds"]] == [10] and ec["other_host"] == 1
    assert "1/2 seeds left out: their two runs ran on different machines" in ec["status"]

    evals.loc[moved, "machine"] = float("nan")  # not recorded: no evidence the machines differ
    assert dc.other_hosts({11: "verdict/opt=dopr_adamw,seed=11"}, {11: "verdict/opt=adamw,seed=11"},
                          dc.run_hosts(evals)) == set()
    apart = dc.equal_compute({1: run([1.0, 0.5], seconds_per_step=2.0)}, {1: run([1.0, 0.5])}, METRIC,
                             higher=True, other_host={1})
    assert apart["result"] is None and "every seed's two runs ran on different machines" in apart["status"]


def test_the_study_command_adds_decomposition_files_and_figure_for_a_verdict(tmp_path):
    import json

    from script_loader import load_script
    from test_analysis import write_run

    sweep = tmp_path / "sweep"
    for seed in range(4):
        for opt, costs in (("adamw", [3.0, 2.0, 1.5]), ("dopr_adamw", [2.5, 1.5, 1.0])):
            write_run(sweep, opt, seed, [{"step": 10 * (i + 1), "val/loss": v, "test/cost_ratio": c + seed,
                                          "wall_time": 10.0 * (i + 1) * (2 if opt == "dopr_adamw" else 1)}
                                         for i, (c, v) in enumerate(zip(costs, [1.0, 0.5, 0.3]))])
    args = [f"sweep={sweep}", "study=toy", "metric=test/cost_ratio", "resamples=50"]
    study = load_script("study")
    assert study.main(args + [f"out={tmp_path / 'tuned'}", "tune_seeds=0-3", "verdict_seeds="]) == 0
    assert not (tmp_path / "tuned" / "decomposition.md").exists()  # no verdict seeds: nothing to decompose
    assert not (tmp_path / "tuned" / "trajectories.png").exists()
    out = tmp_path / "out"
    assert study.main(args + [f"out={out}", "tune_seeds=0,1", "verdict_seeds=2,3"]) == 0
    table = (out / "decomposition.md").read_text()
    assert "3 evaluations per run: too few for §3b's curves (at least 8)" in table and "budget-limited" in table
    assert "base budget too short on 2/2 seeds" in table  # DoPr's step took twice as long
    assert pd.read_csv(out / "decomposition.csv").loc[0, "dopr_s_per_step"] == pytest.approx(2.0)
    assert "decomposition" not in (out / "study.md").read_text()
    assert (out / "trajectories.png").stat().st_size > 1000  # the verdict pair along training
    assert (out / "arms_vs_time.png").stat().st_size > 1000  # both arms against wall-clock
    assert json.loads((out / "provenance.json").read_text())["runs tabled"] == 8


def test_arm_time_curves_average_each_arm_over_its_verdict_seeds():
    """Two arms, two seeds each, two evaluations: mean wall-clock and mean metric per step, by hand."""
    from dopr.analysis.decomposition import Pair
    from dopr.analysis.figures import arm_time_curves

    rows = []
    for arm, slow in (("adamw", 1.0), ("dopr_adamw", 2.0)):
        for seed, offset in ((0, 0.0), (1, 0.2)):
            for step in (10, 20):
                rows.append({"run": f"{arm}/{seed}", "step": step, "wall_time": slow * step + seed,
                             "test/return": step / 10 + offset})
    pair = Pair("t", "adamw", "adamw", "dopr_adamw", "lr=1", "lr=2", {0: "adamw/0", 1: "adamw/1"},
                {0: "dopr_adamw/0", 1: "dopr_adamw/1"})
    curves = arm_time_curves(pd.DataFrame(rows), [pair, pair], "test/return")  # an arm in two pairs counts once
    assert list(curves) == ["adamw (lr=1)", "dopr_adamw (lr=2)"]
    dopr = curves["dopr_adamw (lr=2)"]
    assert dopr["step"].tolist() == [10, 20] and dopr["seeds"].tolist() == [2, 2]
    assert dopr["wall_time"].tolist() == pytest.approx([20.5, 40.5])
    assert dopr["mean"].tolist() == pytest.approx([1.1, 2.1])
    # two seeds 0.2 apart: t(0.975, 1) * sd / sqrt(2) = 12.706 * 0.1414 / 1.414 = 1.2706 each side
    assert (dopr["high"] - dopr["mean"]).tolist() == pytest.approx([1.2706, 1.2706], rel=1e-3)
    # Base re-runs (their own clocks 10x slow, beside other work) are placed at step x their verdict run's
    # s/step; steps only one of them reached are left out, and each one's last evaluation makes the end point.
    rows += [{"run": "rerun/0", "step": step, "wall_time": 10.0 * step, "test/return": 5.0} for step in (20, 40)]
    rows += [{"run": "rerun/1", "step": step, "wall_time": 10.0 * step, "test/return": 6.0} for step in (20, 40, 60)]
    reruns = {"adamw re-run": {0: ("rerun/0", 1.0), 1: ("rerun/1", 2.0)}}
    curve = arm_time_curves(pd.DataFrame(rows), [pair], "test/return", reruns)["adamw re-run"]
    assert curve["step"].tolist() == [20, 40, 60] and curve["seeds"].tolist() == [2, 2, 2]
    assert curve["wall_time"].tolist() == pytest.approx([30.0, 60.0, (40.0 + 120.0) / 2])
    assert curve["mean"].tolist() == pytest.approx([5.5, 5.5, 5.5])
    curves = arm_time_curves(pd.DataFrame(rows), [pair], "test/return", reruns)
    assert curves["adamw (lr=1)"]["wall_time"].tolist() == pytest.approx([10.5, 20.5])  # the others unchanged
    assert curves["adamw (lr=1)"].attrs["hosts"] == frozenset()  # these records name no machine


def test_arm_time_curves_name_the_machines_each_arm_ran_on():
    """Wall-clocks compare only within one machine and thread count: each curve carries the hosts its runs'
    records name, so a figure mixing them can say so."""
    from dopr.analysis.decomposition import Pair, host_of
    from dopr.analysis.figures import arm_time_curves

    avx2 = {"cpu": "AMD EPYC", "aten_cpu_capability": "AVX2", "cores": 2}
    avx512 = dict(avx2, aten_cpu_capability="AVX512")
    machine = {"adamw/0": avx2, "adamw/1": avx512, "dopr_adamw/0": avx512, "dopr_adamw/1": avx512}
    rows = [{"run": run, "step": step, "wall_time": float(step), "test/return": 1.0, "machine": json.dumps(m),
             "threads": 1} for run, m in machine.items() for step in (10, 20)]
    pair = Pair("t", "adamw", "adamw", "dopr_adamw", "lr=1", "lr=2", {0: "adamw/0", 1: "adamw/1"},
                {0: "dopr_adamw/0", 1: "dopr_adamw/1"})
    curves = arm_time_curves(pd.DataFrame(rows), [pair], "test/return")
    assert curves["adamw (lr=1)"].attrs["hosts"] == {host_of(avx2, 1), host_of(avx512, 1)}
    assert curves["dopr_adamw (lr=2)"].attrs["hosts"] == {host_of(avx512, 1)}


def _claim(dopr_metric, base_metric, train_dopr=None, train_base=None, steps=None, base_vals=None):
    """The paper-claim verdict of a pair of three seeds whose curves differ only in the metric (and train loss)."""
    vals = [1.0, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2]
    dopr = {s: run(vals, [m + 0.01 * s for m in dopr_metric], train=train_dopr) for s in range(3)}
    base = {s: run(base_vals or vals, base_metric, train=train_base) for s in range(3)}
    part = {"matched": dc.matched_loss(dopr, base, METRIC, True),
            "matched_train": dc.matched_loss(dopr, base, METRIC, True, "train/loss") if train_dopr else None,
            "train_column": "train/loss" if train_dopr else None, "convergence": dc.convergence(base)}
    return dc.paper_claim(part)


def test_the_paper_claim_gets_its_verdict_word_from_matched_loss_and_convergence():
    low, high = [0.0] * 8, [1.0] * 8
    assert _claim(high, low) == ("holds", "at matched val/loss: held")
    assert _claim(low, high)[0] == "reversed at matched val/loss"
    assert _claim(low, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.01])[0] == "not shown"
    # better at matched val/loss (0.6 vs 0.3 at val/loss 0.2), worse at matched train-set loss: DoPr fits its
    # training set sooner, and at train loss 0.1 it reads 0.2 against the base's 0.4
    rising_dopr, rising_base = [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8], [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4]
    fast, slow = [1.0, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01, 0.01], [1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]
    assert _claim(rising_dopr, rising_base, fast, slow) == (
        "reversed at matched train-set loss (train/loss)",
        "at matched val/loss: held; at matched train-set loss (train/loss): reversed")
    assert _claim(rising_dopr, rising_base, slow, slow)[0] == "holds"
    # a base still falling over its last quarter: the same comparison, labelled budget-limited
    assert _claim(high, low, base_vals=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2])[0] == "budget-limited: holds"
    # no overlap of the loss ranges on any seed
    assert _claim(high, low, base_vals=[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.5])[0] == "untestable"


def test_peers_are_compared_with_each_reference_and_left_out_of_the_gp_pair_tables(tmp_path):
    from script_loader import load_script
    from test_analysis import write_run

    sweep = tmp_path / "sweep"
    curves = {"adamw": [3.0, 2.0, 1.5], "dopr_adamw": [2.5, 1.5, 1.0], "soap": [2.8, 1.8, 1.2], "muon": [2.9, 2.1, 1.6]}
    for seed in range(4):
        for opt, costs in curves.items():
            write_run(sweep, opt, seed, [{"step": 10 * (i + 1), "val/loss": v, "test/cost_ratio": c + 0.1 * seed,
                                          "wall_time": 10.0 * (i + 1)}
                                         for i, (c, v) in enumerate(zip(costs, [1.0, 0.5, 0.3]))])
    out = tmp_path / "out"
    study = load_script("study")
    assert study.main([f"sweep={sweep}", "study=toy", "metric=test/cost_ratio", "resamples=50", f"out={out}",
                       "tune_seeds=0,1", "verdict_seeds=2,3", "peers=soap,muon", "references=adamw,dopr_adamw"]) == 0
    table = pd.read_csv(out / "decomposition.csv")
    assert list(table["gp"]) == ["adamw", "soap vs adamw", "soap vs dopr_adamw", "muon vs adamw", "muon vs dopr_adamw"]
    soap = table.set_index("gp").loc["soap vs adamw"]
    assert soap["dopr"] == "soap" and soap["base"] == "adamw" and soap["final_diff"] == pytest.approx(
        np.mean([math.log((1.2 + 0.1 * s) / (1.5 + 0.1 * s)) for s in (2, 3)]))  # cost ratios: log ratios
    assert "put the peer" in (out / "decomposition.md").read_text()
    # the GP-pair tables and the paper's observations see adamw and dopr_adamw only
    assert set(pd.read_csv(out / "headline.csv")["gp"]) == {"adamw"}
    assert "soap" not in (out / "observations.md").read_text() and "muon" not in (out / "observations.md").read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert {"soap", "muon"} <= set(runs["opt.name"]) and {"soap", "muon"} <= set(pd.read_csv(out / "choice.csv")["opt.name"])


def test_effects_table_puts_each_pairs_four_effects_in_one_row():
    """One decomposition.csv row (as decomposition_rows writes it) becomes one row of the cross-study table."""
    row = {"task": "t", "gp": "adamw", "base": "adamw", "dopr": "dopr_adamw", "base setting": "lr=0.001",
           "dopr setting": "lr=0.01", "metric": "test/return", "seeds": 8, "speed_dopr_reached": 1,
           "speed_base_reached": 7, "matched_val_n": 8, "matched_val_diff": 0.0715, "matched_val_low": -0.0313,
           "matched_val_high": 0.174, "matched_val_verdict": "inconclusive", "convergence": "converged",
           "equal_compute_n": 0, "equal_compute_status": "DoPr's step is not costlier: the fixed-budget verdict is "
           "the equal-compute one", "final_n": 8, "final_diff": -0.132, "final_low": -0.315, "final_high": 0.051,
           "final_verdict": "inconclusive", "paper_claim": "not shown"}
    text = dc.effects_table([("s", "../s", pd.DataFrame([row]))])
    cells = text.splitlines()[2].split(" | ")
    assert cells[0] == "| [s](../s)" and cells[3] == "converged"
    assert cells[4] == "DoPr to base's best on 1/8, base to DoPr's best on 7/8"
    assert cells[5] == "+0.0715 [-0.0313, +0.174] (inconclusive, n=8)"
    assert cells[6].startswith("-0.132 [-0.315, +0.051] (inconclusive, n=8), as at the last evaluation")
    rerun = row | {"equal_compute_n": 8, "equal_compute_diff": 0.2, "equal_compute_low": 0.1,
                   "equal_compute_high": 0.3, "equal_compute_verdict": "held", "equal_compute_status": "",
                   "equal_compute_reruns": 8, "equal_compute_reruns_flat": 3}
    cells = dc.effects_table([("s", "../s", pd.DataFrame([rerun]))]).splitlines()[2].split(" | ")
    assert cells[6] == ("+0.2 [+0.1, +0.3] (held, n=8); the base re-run to DoPr's wall-clock on 8/8 seeds, its "
                        "val/loss flat at the end on 3")
    assert cells[8] == "**not shown** |"
