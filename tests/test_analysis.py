"""dopr/analysis and the scripts on it: runs.csv per the data contract, best/final/valpick, the rule for
infinite and missing values, paired intervals, verdict words, bootstrap Spearman, provenance."""

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dopr.analysis import (bootstrap_spearman, higher_is_better, mean_interval, paired_difference, read_runs_csv,
                           read_sweep, runs_table)
from dopr.analysis.stats import Interval, verdict
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 40


def write_run(root: Path, opt: str, seed: int, evals: list[dict], status="finished", lr=1e-3):
    run = root / f"opt={opt},seed={seed}"
    run.mkdir(parents=True)
    opt_cfg = {"name": opt, "lr": lr}
    if opt.startswith("dopr_"):
        opt_cfg.update({"ap": {"damping": 0.01}})
    config = {"seed": seed, "task": {"name": "lds", "eval_episodes": 8}, "opt": opt_cfg, "trainer": {"steps": 30}}
    summary = {"status": status, "headline_metric": "test/cost_ratio", "higher_is_better": False, "config": config,
               "git": {"sha": SHA, "dirty": seed == 0}, "versions": {"torch": "2.x"}, "threads": 1}
    (run / "summary.json").write_text(json.dumps(summary))
    # NaN is written as null by records.py, inf as Infinity (Python's json reads both)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))


def evals(costs, vals, median=None):
    return [{"step": 10 * (i + 1), "val/loss": v, "test/cost_ratio": c, "test/median_cost_ratio": c if median is None
             else median[i], "lr": 0.0} for i, (c, v) in enumerate(zip(costs, vals))]


@pytest.fixture
def sweep_dir(tmp_path):
    """4 seeds x {adamw, dopr_adamw}, 3 evaluations each; DoPr's cost is 0.5 lower, a diverged (inf)
    evaluation in adamw seed 1, a missing (null) value in dopr seed 2, one unfinished run."""
    root = tmp_path / "sweep"
    for seed in range(4):
        write_run(root, "adamw", seed, evals([3.0 + seed, 2.0 + seed, 2.5 + seed], [1.0, 0.5, 0.7]))
        write_run(root, "dopr_adamw", seed, evals([2.5 + seed, 1.5 + seed + 0.1 * seed, 2.0 + seed],
                                                  [1.2, 0.9, 0.8], median=[1.0, None if seed == 2 else 1.0, 1.0]))
    (root / "opt=adamw,seed=1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals(
        [3.0, math.inf, 2.5], [1.0, 0.4, 0.7])))
    write_run(root, "adamw", 9, evals([1.0], [1.0]), status="running")
    return root


def test_runs_table_has_the_contract_columns_and_best_final_valpick(sweep_dir):
    sweep = read_sweep(sweep_dir)
    assert sweep.left_out == [{"run": "opt=adamw,seed=9", "why": "status 'running', not finished"}]
    runs = runs_table(sweep, "toy", {s: "tune" for s in range(4)}).set_index("run")
    for column in ("study", "task", "opt.name", "ap", "opt.lr", "opt.ap.damping", "seed", "stage", "eval_episodes",
                   "steps", "final/val/loss", "best/val/loss", "final/test/cost_ratio", "best/test/cost_ratio",
                   "valpick/test/cost_ratio"):
        assert column in runs, column
    base0 = runs.loc["opt=adamw,seed=0"]
    assert (base0["final/test/cost_ratio"], base0["best/test/cost_ratio"], base0["valpick/test/cost_ratio"]) == (
        2.5, 2.0, 2.0)  # last, lowest, at the lowest val/loss (0.5, step 20)
    assert (base0["final/val/loss"], base0["best/val/loss"], base0["task"], base0["eval_episodes"]) == (0.7, 0.5,
                                                                                                         "lds", 8)
    diverged = runs.loc["opt=adamw,seed=1"]
    assert diverged["valpick/test/cost_ratio"] == math.inf  # the lowest val loss rolled out to a diverged cost
    assert diverged["best/test/cost_ratio"] == 2.5  # inf is the worst cost, not a missing one
    assert runs.loc["opt=dopr_adamw,seed=2", "final/test/median_cost_ratio"] == 1.0
    assert runs.loc["opt=dopr_adamw,seed=2", "best/test/median_cost_ratio"] == 1.0  # the null evaluation is skipped
    assert runs.loc["opt=dopr_adamw,seed=0", "opt.ap.damping"] == 0.01
    assert math.isnan(base0["opt.ap.damping"]) and bool(runs.loc["opt=dopr_adamw,seed=0", "ap"]) and not base0["ap"]


def test_a_run_under_the_equal_compute_dir_is_of_that_stage(tmp_path):
    """run_study's layout: <sweep>/verdict/<run> takes its seed's stage, <sweep>/equal_compute/<run> (a verdict
    seed's base re-run for more steps) the stage equal_compute, so it is no second verdict run of its seed."""
    for stage in ("verdict", "equal_compute"):
        write_run(tmp_path / "sweep" / stage, "adamw", 10, evals([3.0, 2.0, 1.5], [1.0, 0.5, 0.4]))
    runs = runs_table(read_sweep(tmp_path / "sweep"), "toy", {10: "verdict"}).set_index("run")
    assert runs.loc["verdict/opt=adamw,seed=10", "stage"] == "verdict"
    assert runs.loc["equal_compute/opt=adamw,seed=10", "stage"] == "equal_compute"


def test_seed_in_no_stage_is_an_error(sweep_dir):
    with pytest.raises(SystemExit, match=r"seeds \[3\] are in neither tune_seeds= nor verdict_seeds="):
        runs_table(read_sweep(sweep_dir), "toy", {0: "tune", 1: "tune", 2: "verdict"})


def test_paired_interval_is_scipys_t_interval_of_the_per_seed_differences():
    dopr = {0: 1.0, 1: 2.5, 2: 2.0, 3: 4.1, 7: 9.0}
    base = {0: 2.0, 1: 3.0, 2: 3.5, 3: 4.0}  # seed 7 has no partner
    result = paired_difference(dopr, base, "test/error", higher=False)
    d = np.array([-1.0, -0.5, -1.5, 0.1])
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert result.seeds == [0, 1, 2, 3] and result.diff.n == 4
    assert result.diff.mean == pytest.approx(d.mean())
    assert (result.diff.low, result.diff.high) == (pytest.approx(low), pytest.approx(high))
    assert result.dopr_better_fraction == 0.75  # lower error is better: 3 of 4 seeds
    assert (result.base_mean, result.dopr_mean) == (pytest.approx(3.125), pytest.approx(2.4))
    assert result.verdict == "inconclusive" and result.resolution == pytest.approx((high - low) / 2)


def test_ratio_metrics_are_paired_as_log_ratios_and_inf_makes_the_interval_unbounded():
    result = paired_difference({0: 1.0, 1: 2.0, 2: 1.5}, {0: 10.0, 1: 20.0, 2: 30.0}, "test/cost_ratio", False)
    assert result.scale == "log" and result.diff.mean == pytest.approx(np.mean(np.log([0.1, 0.1, 0.05])))
    assert result.verdict == "held"
    diverged = paired_difference({0: 1.0, 1: 2.0, 2: math.inf}, {0: 10.0, 1: 20.0, 2: 30.0}, "test/cost_ratio", False)
    assert diverged.diff.mean == math.inf and (diverged.diff.low, diverged.diff.high) == (-math.inf, math.inf)
    assert diverged.verdict == "inconclusive" and "unbounded" in diverged.diff.format()
    missing = paired_difference({0: 1.0, 1: 2.0, 2: math.nan}, {0: 10.0, 1: 20.0, 2: 30.0}, "test/cost_ratio", False)
    assert missing.seeds == [0, 1] and missing.diff.left_out == 1 and math.isfinite(missing.diff.mean)


def test_verdict_words_follow_the_claimed_direction():
    above, below, straddle = Interval(2.0, 1.0, 3.0, 8), Interval(-2.0, -3.0, -1.0, 8), Interval(0.1, -1.0, 1.2, 8)
    assert [verdict(i, dopr_better_is_positive=True) for i in (above, below, straddle)] == [
        "held", "reversed", "inconclusive"]
    assert [verdict(i, dopr_better_is_positive=False) for i in (above, below, straddle)] == [
        "reversed", "held", "inconclusive"]
    returns = paired_difference({s: 10.0 + s + 0.1 * (s % 2) for s in range(8)}, {s: 5.0 + s for s in range(8)},
                                "test/return", higher=True)
    assert returns.verdict == "held" and returns.dopr_better_fraction == 1.0
    assert verdict(Interval(5.0, math.nan, math.nan, 1), True) == "inconclusive"  # one seed: no interval


def test_mean_interval_rule_for_nan_and_inf():
    kept = mean_interval([1.0, 2.0, math.nan, 3.0])
    assert (kept.n, kept.left_out, kept.mean) == (3, 1, 2.0)
    assert kept.half_width == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    worst = mean_interval([1.0, math.inf])
    assert worst.mean == math.inf and worst.half_width == math.inf
    assert worst.format() == "inf (interval unbounded)"
    assert Interval(3897.3, 3897.3 - 2612, 3897.3 + 2612, 5).format() == "+3897 ± 2600"  # mean one place finer
    assert Interval(-0.0887, -0.2987, 0.1213, 5).format() == "-0.089 ± 0.21"


def test_direction_rule_and_summary_override():
    assert [higher_is_better(m) for m in ("test/return", "test/success_rate_k9", "test/exact_match_len4",
                                          "test/accuracy", "test/acc@4")] == [True] * 5
    assert [higher_is_better(m) for m in ("val/loss", "test/cost_ratio", "test/final_state_error", "test/fid@8",
                                          "test/w2", "test/nll", "test/ttf_shift", "test/swd_midpoint@2")] == [False] * 8
    assert higher_is_better("test/return_std") is None and higher_is_better("test/episode_length") is None
    assert higher_is_better("test/score") is None
    assert higher_is_better("test/score", "test/score", True) is True  # summary.json's own statement wins


def test_bootstrap_spearman_is_seeded_and_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = x + rng.normal(size=20)
    a, b, c = bootstrap_spearman(x, y, 300, seed=1), bootstrap_spearman(x, y, 300, seed=1), bootstrap_spearman(
        x, y, 300, seed=2)
    assert a == b and (a.low, a.high) != (c.low, c.high)
    assert a.rho == pytest.approx(stats.spearmanr(x, y).statistic) and a.low < a.rho < a.high
    assert bootstrap_spearman([1.0, 2.0, math.nan, 3.0], [1.0, 2.0, 5.0, math.inf], 50).n == 3


def test_study_command_writes_the_contract_files(sweep_dir, tmp_path):
    out = tmp_path / "out"
    study = load_script("study")
    assert study.main([f"sweep={sweep_dir}", f"out={out}", "study=toy", "metric=test/cost_ratio",
                       "tune_seeds=0,1", "verdict_seeds=2-3", "resamples=50"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["ap"]) == {True, False} and list(runs.columns[:10]) == [
        "study", "task", "opt.name", "ap", "opt.lr", "opt.ap.damping", "seed", "stage", "eval_episodes", "steps"]
    assert (runs.groupby("stage")["seed"].unique().map(sorted).to_dict()) == {"tune": [0, 1], "verdict": [2, 3]}
    assert "true" in (out / "runs.csv").read_text()  # the contract's ap spelling
    assert read_runs_csv(out / "runs.csv")["ap"].dtype == bool
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["git"]["runs per sha"] == {f"{SHA} (dirty)": 2, SHA: 6}
    assert prov["left out"]["count"] == 1 and prov["seeds"] == {"tune": [0, 1], "verdict": [2, 3]}
    assert prov["versions"] == [{"torch": "2.x"}] and prov["threads"] == ["1"]
    assert prov["metric"]["higher is better"] is False
    headline = pd.read_csv(out / "headline.csv")
    best = headline[headline["pick"] == "best"].iloc[0]
    # verdict seeds 2, 3: best costs adamw 4.0, 5.0; dopr 3.7, 4.8 -> log ratios
    assert best["stage"] == "verdict" and best["diff"] == pytest.approx(np.mean(np.log([3.7 / 4.0, 4.8 / 5.0])))
    again = tmp_path / "again"  # re-made from the committed evals.csv alone: the same provenance and verdicts
    assert study.main([f"sweep={out / 'evals.csv'}", f"out={again}", "study=toy", "metric=test/cost_ratio",
                       "tune_seeds=0,1", "verdict_seeds=2-3", "resamples=50"]) == 0
    prov_again = json.loads((again / "provenance.json").read_text())
    assert prov_again["git"] == prov["git"] and prov_again["versions"] == prov["versions"]
    assert pd.read_csv(again / "headline.csv")["diff"].tolist() == pytest.approx(headline["diff"].tolist())
    row = json.loads((out / "readme_row.json").read_text())
    assert row["study"] == "toy" and "adamw:" in row["result"] and "fresh verdict seeds" in row["seeds"]
    assert (out / "val_vs_test.png").stat().st_size > 1000 and "## Each GP against DoPr" in (out / "study.md").read_text()


def test_study_rejects_overlapping_seed_sets(sweep_dir, tmp_path):
    study = load_script("study")
    with pytest.raises(SystemExit, match="in both tune_seeds= and verdict_seeds="):
        study.main([f"sweep={sweep_dir}", f"out={tmp_path}", "study=toy", "metric=test/cost_ratio",
                    "tune_seeds=0-2", "verdict_seeds=2,3"])


def test_aggregate_writes_every_eval_point_and_the_final_table(sweep_dir, tmp_path):
    aggregate = load_script("aggregate")
    assert aggregate.main([f"sweep={sweep_dir}", f"out={tmp_path}", "group=opt.name,opt.lr"]) == 0
    evals = pd.read_csv(tmp_path / "evals.csv")
    assert len(evals) == 8 * 3 and evals["run"].nunique() == 8  # the unfinished run is left out
    final = pd.read_csv(tmp_path / "final.csv").set_index("opt.name")
    assert final.loc["adamw", "test/cost_ratio"] == pytest.approx(np.mean([2.5, 2.5, 4.5, 5.5]))
    with pytest.raises(SystemExit, match="not key=value"):
        aggregate.main([str(sweep_dir)])


def test_results_table_replaces_only_the_marked_block(tmp_path):
    results_table = load_script("results_table")
    rows = tmp_path / "results"
    (rows / "a").mkdir(parents=True)
    (rows / "a" / "readme_row.json").write_text(json.dumps({"study": "a", "claim": "c", "metric": "best/test/x",
                                                            "result": "adamw: +1 ± 0.5 (held)", "seeds": "5-9",
                                                            "readme": "experiments/a/README.md"}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results-table:start -->\nstale row\n<!-- results-table:end -->\nrest\n")
    none = tmp_path / "no_experiments"
    assert results_table.main([f"readme={readme}", f"rows={rows}", f"experiments={none}"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results-table:start -->\n| study |") and text.endswith(
        "<!-- results-table:end -->\nrest\n")
    link = os.path.relpath(ROOT / "experiments/a/README.md", tmp_path)  # relative to the README holding the table
    assert "adamw: +1 ± 0.5 (held)" in text and "stale row" not in text and f"[a]({link})" in text
    assert results_table.main([f"readme={readme}", f"rows={rows}", "check=true", f"experiments={none}"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="results-table:start"):
        results_table.main([f"readme={readme}", f"rows={rows}"])


def test_verdict_where_keeps_one_cell_of_a_verdict_axis():
    from dopr.analysis.results import keep_verdict_cell

    study = load_script("study")
    runs = pd.DataFrame({"stage": ["tune", "tune", "verdict", "verdict", "verdict"],
                         "task.noise_cond": [1e6, 1e6, 1.0, 1e6, 1e6], "seed": [0, 1, 10, 10, 11]})
    where = study.parse_where("task.noise_cond=1e6")
    assert where == {"task.noise_cond": 1e6}
    kept = keep_verdict_cell(runs, where)
    assert kept["seed"].tolist() == [0, 1, 10, 11] and (kept.loc[kept["stage"] == "verdict", "task.noise_cond"] == 1e6).all()
    # an integer setting (a registered cell, e.g. task.train_episodes=10) matches a float column too
    runs["task.train_episodes"] = [10.0, 10.0, 2.0, 10.0, 2.0]
    assert keep_verdict_cell(runs, {"task.train_episodes": 10})["seed"].tolist() == [0, 1, 10]
    with pytest.raises(SystemExit, match="no verdict run"):
        keep_verdict_cell(runs, {"task.noise_cond": 3.0})
    with pytest.raises(SystemExit, match="not recorded"):
        keep_verdict_cell(runs, {"task.dataset": "x"})


def test_include_blocks_are_filled_from_the_named_file(tmp_path):
    results_table = load_script("results_table")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    text = "x\n<!-- include: results/t.md -->\nold\n<!-- /include -->\ny\n"
    assert results_table.fill_includes(text, tmp_path / "R.md", tmp_path) == (
        "x\n<!-- include: results/t.md -->\n| a |\n|---|\n| 1 |\n<!-- /include -->\ny\n")
    with pytest.raises(SystemExit, match="does not exist"):
        results_table.fill_includes("<!-- include: results/none.md -->\n<!-- /include -->", tmp_path / "R.md", tmp_path)


def test_committed_readmes_carry_the_current_study_tables():
    """README.md's results table and every included study table match the committed results files."""
    assert load_script("results_table").main(["check=true"]) == 0


# results/ directories that hold no study, and why; every other one holds registered studies only.
NOT_STUDIES = {
    "bench": "benchmark output (scripts/bench_optim.py, scripts/ap_accuracy.py), not a study",
    "gpu_check": "the GPU check's reports (scripts/gpu_check.sh), not a study",
}
RUN_SHA = re.compile(r"[0-9a-f]{40}( \(dirty\))?")


def contract_problems(study_dir: Path) -> list[str]:
    """What a committed study dir lacks of the data contract (docs/STUDIES.md §5); empty when it conforms."""
    from dopr.analysis.sweep import CONTRACT

    where = study_dir.relative_to(ROOT) if ROOT in study_dir.parents else study_dir
    if not (study_dir / "runs.csv").is_file() or not (study_dir / "provenance.json").is_file():
        return [f"{where}: needs runs.csv and provenance.json"]
    runs = read_runs_csv(study_dir / "runs.csv")
    prov = json.loads((study_dir / "provenance.json").read_text())
    metric = prov.get("metric", {}).get("name")
    problems = [f"runs.csv: no column {c}" for c in CONTRACT + ["final/val/loss", "best/val/loss", f"final/{metric}",
                                                                 f"best/{metric}"] if c not in runs]
    if problems:
        return [f"{where}/{p}" for p in problems]
    tests = {c.split("/", 1)[1] for c in runs if c.startswith(("final/test/", "best/test/"))}
    problems += [f"runs.csv: {m} lacks its final/ or best/ column" for m in sorted(tests)
                 if f"final/{m}" not in runs or f"best/{m}" not in runs]
    # every run names its study, task, optimizer, lr, seed, stage and steps; only DoPr runs have a damping
    # (eval_episodes may be empty: the flow and lm tasks name their evaluation count differently)
    required = [c for c in CONTRACT if c not in ("opt.ap.damping", "eval_episodes")]
    problems += [f"runs.csv: {c} is empty in {n} run(s)" for c, n in runs[required].isna().sum().items() if n]
    if not set(runs["stage"]) <= {"tune", "verdict"}:
        problems.append(f"runs.csv: stage values {sorted(set(runs['stage']))}, not tune/verdict")
    if runs.loc[runs["ap"], "opt.ap.damping"].isna().any() or runs.loc[~runs["ap"], "opt.ap.damping"].notna().any():
        problems.append("runs.csv: opt.ap.damping must be set for DoPr runs and empty for base ones")
    per_sha = prov.get("git", {}).get("runs per sha")
    if not isinstance(per_sha, dict) or not per_sha or not all(RUN_SHA.fullmatch(k) for k in per_sha):
        problems.append(f"provenance.json: the runs' git SHAs (with dirty flags) are not recorded: {per_sha!r}")
    elif sum(per_sha.values()) < len(runs) or prov.get("runs tabled") != len(runs):
        problems.append(f"provenance.json: {prov.get('runs tabled')} runs tabled and SHAs for {sum(per_sha.values())}, "
                        f"but runs.csv has {len(runs)}")
    commands = prov.get("commands", {})
    if not commands.get("sweep") or not commands.get("analysis"):
        problems.append("provenance.json: the sweep and analysis commands are not recorded")
    machines = prov.get("run machine")
    if not isinstance(machines, list) or not all(isinstance(m, dict) and m.get("cpu") for m in machines) \
            or not machines or not prov.get("threads"):
        problems.append("provenance.json: the runs' machine (CPU model) or thread count is not recorded")
    dates = prov.get("run dates")
    if not isinstance(dates, dict) or not dates.get("first") or not prov.get("analysis date"):
        problems.append("provenance.json: dates are not recorded")
    versions = prov.get("versions")
    if not isinstance(versions, list) or not versions \
            or not all(isinstance(v, dict) and v.get("torch") for v in versions):
        problems.append("provenance.json: package versions are not recorded")
    if set(prov.get("seeds", {})) != {"tune", "verdict"} or "count" not in (prov.get("left out") or {}):
        problems.append("provenance.json: the seeds or the runs left out are not recorded")
    return [f"{where}/{p}" for p in problems]


def test_every_committed_results_dir_meets_the_data_contract():
    """Each results/ dir holds registered studies, each with runs.csv and provenance.json per docs/STUDIES.md §5,
    and only those write a readme_row.json (the top README's table lists registered studies only)."""
    from dopr.analysis.studies import studies

    outs = {ROOT / spec.out for spec in studies().values()}
    tops = {p.name for p in (ROOT / "results").iterdir() if p.is_dir()}
    assert set(NOT_STUDIES) <= tops, f"stale NOT_STUDIES entries: {set(NOT_STUDIES) - tops}"
    for top in sorted(tops - set(NOT_STUDIES)):
        assert any(out == ROOT / "results" / top or ROOT / "results" / top in out.parents for out in outs), (
            f"results/{top} holds no study of a plan in configs/study (dopr/analysis/studies.py)")
    marked = {p.parent for name in ("runs.csv", "provenance.json", "readme_row.json")
              for p in (ROOT / "results").rglob(name)}
    assert marked <= outs, f"study files outside a registered study: {sorted(str(p) for p in marked - outs)}"
    problems = [p for out in sorted(outs) for p in contract_problems(out)]
    assert not problems, "\n".join(problems)


def test_the_contract_check_names_a_missing_column_and_unrecorded_provenance(tmp_path):
    """The below-standard records the check exists to keep out: a runs.csv short of a contract column, and a
    provenance.json from an aggregated CSV, which recorded no git SHA per run."""
    source = ROOT / "results/robomimic_lift_3demos"
    runs = pd.read_csv(source / "runs.csv")
    prov = json.loads((source / "provenance.json").read_text())
    runs.drop(columns=["best/val/loss"]).to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "provenance.json").write_text(json.dumps(prov))
    assert contract_problems(tmp_path) == [f"{tmp_path}/runs.csv: no column best/val/loss"]
    runs.to_csv(tmp_path / "runs.csv", index=False)
    assert contract_problems(tmp_path) == []
    prov["git"] = {"runs per sha": "not recorded (aggregated evals.csv)"}
    (tmp_path / "provenance.json").write_text(json.dumps(prov))
    assert [p.split(": ", 1)[1] for p in contract_problems(tmp_path)] == [
        "the runs' git SHAs (with dirty flags) are not recorded: 'not recorded (aggregated evals.csv)'"]


def observation_runs(base_returns: dict, dopr_gain: dict, dopr_val_change: dict, seeds=range(8)) -> pd.DataFrame:
    """Verdict-stage runs (and one tuning run per optimizer, so each has a chosen setting) of base GPs and
    their DoPr versions: DoPr's return is the base's plus ``dopr_gain[gp]`` (+ a little per-seed noise), its
    final val/loss the base's plus ``dopr_val_change[gp]``."""
    rng = np.random.default_rng(0)
    rows = []
    for gp, level in base_returns.items():
        for stage, stage_seeds in (("tune", [100]), ("verdict", list(seeds))):
            for seed in stage_seeds:
                base = level + 50 * rng.standard_normal()
                noise = 5 * rng.standard_normal()
                for ap in (False, True):
                    rows.append({"task": "gym", "stage": stage, "gp": gp, "ap": ap,
                                 "opt.name": f"dopr_{gp}" if ap else gp, "opt.lr": 1e-3, "seed": seed,
                                 "best/test/return": base + (dopr_gain[gp] + noise if ap else 0.0),
                                 "final/val/loss": 0.5 + (dopr_val_change[gp] + 0.001 * noise if ap else 0.0),
                                 "best/val/loss": 0.5})
    return pd.DataFrame(rows)


def observations(runs, margin=0.1):
    from dopr.analysis import report

    choice = report.choose_settings(runs, "test/return", True, ["opt.lr"])
    headline = pd.concat([report.headline_comparison(runs, "test/return", True, choice, ["opt.lr"], pick="best"),
                          report.headline_comparison(runs, "val/loss", False, choice, ["opt.lr"], pick="final")])
    table = report.paper_observations(runs, "test/return", True, choice, ["opt.lr"], headline, margin)
    return dict(zip(table["observation"].str[:1], table["verdict"]))


def test_the_papers_three_observations_get_their_verdict_words():
    # similar bases, DoPr better on every GP, val/loss better with DoPr for one GP and worse for the other
    words = observations(observation_runs({"adamw": 3000, "muon": 3010}, {"adamw": 400, "muon": 300},
                                          {"adamw": -0.1, "muon": +0.1}))
    assert words == {"1": "held", "2": "held", "3": "held"}
    # one base GP far better; DoPr worse for one GP; val/loss moves with the return for both
    words = observations(observation_runs({"adamw": 3000, "muon": 5000}, {"adamw": 400, "muon": -300},
                                          {"adamw": -0.1, "muon": +0.1}))
    assert words == {"1": "reversed", "2": "reversed", "3": "reversed"}
    # a gap inside the noise but wider than a tight band; DoPr's gain on one GP unresolved
    words = observations(observation_runs({"adamw": 3000, "muon": 3020}, {"adamw": 400, "muon": 1.0},
                                          {"adamw": -0.1, "muon": 0.0}), margin=0.001)
    assert words == {"1": "inconclusive", "2": "inconclusive", "3": "inconclusive"}
    # one base GP: observation 1 is not tested
    assert observations(observation_runs({"adamw": 3000}, {"adamw": 400}, {"adamw": -0.1}))["1"] == "not tested"


def test_a_gp_without_its_dopr_arm_joins_observation_1_and_is_named_in_observation_2():
    from dopr.analysis import report

    runs = observation_runs({"adamw": 3000, "muon": 3010}, {"adamw": 400, "muon": 300}, {"adamw": -0.1, "muon": +0.1})
    runs = runs[runs["opt.name"] != "dopr_muon"]  # Muon ran without AP only
    choice = report.choose_settings(runs, "test/return", True, ["opt.lr"])
    headline = report.headline_comparison(runs, "test/return", True, choice, ["opt.lr"], pick="best")
    table = report.paper_observations(runs, "test/return", True, choice, ["opt.lr"], headline)
    first, second = table.iloc[0], table.iloc[1]
    assert first["verdict"] == "held" and "muon" in first["evidence"]
    assert second["verdict"] == "held" and second["evidence"].endswith("muon: no DoPr run")


def test_a_re_analysis_that_changes_nothing_keeps_the_analysis_date(tmp_path):
    from dopr.analysis.provenance import keep_analysis_date_if_unchanged

    path = tmp_path / "provenance.json"
    path.write_text(json.dumps({"runs tabled": 4, "analysis date": "2026-01-01T00:00:00+00:00"}))
    same = {"runs tabled": 4, "analysis date": "2026-12-01T10:00:00+00:00"}
    keep_analysis_date_if_unchanged(same, path)
    assert same["analysis date"] == "2026-01-01T00:00:00+00:00"
    changed = {"runs tabled": 5, "analysis date": "2026-12-01T10:00:00+00:00"}
    keep_analysis_date_if_unchanged(changed, path)
    assert changed["analysis date"] == "2026-12-01T10:00:00+00:00"


def test_arms_spearman_ranks_seed_means_across_optimizers():
    """Four arms whose val/loss order is the reverse of their return order: rho -1 on the seed means, as
    scipy gives it, and a seeded bootstrap over seeds; an arm's missing seed leaves its mean defined."""
    from dopr.analysis import report
    from dopr.analysis.stats import spearman_of_arm_means

    runs = observation_runs({"adamw": 3000, "muon": 2000}, {"adamw": 400, "muon": 300}, {"adamw": -0.2, "muon": -0.1})
    runs.loc[runs["gp"] == "muon", "final/val/loss"] += 0.5  # the Muon arms fit worst and return least
    runs = runs.drop(runs.index[(runs["opt.name"] == "muon") & (runs["seed"] == 3) & (runs["stage"] == "verdict")])
    choice = report.choose_settings(runs, "test/return", True, ["opt.lr"])
    table = report.arms_spearman(runs, "test/return", choice, ["opt.lr"], ["val/loss"], resamples=200)
    row = table.iloc[0]
    verdict = runs[runs["stage"] == "verdict"]
    means = verdict.groupby("opt.name")[["final/val/loss", "best/test/return"]].mean()
    assert row["arms n"] == 4 and row["stage"] == "verdict"
    assert row["rho"] == pytest.approx(stats.spearmanr(means["final/val/loss"], means["best/test/return"]).statistic)
    assert row["rho"] == pytest.approx(-1.0) and row["high"] < 0
    assert row["arms"].startswith("dopr_adamw") and "muon" in row["arms"].split(";")[-1]
    x, y = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [5.0, 5.0, math.nan]]), np.array([[3.0, 2, 1], [1, 1, 1], [0, 1, 0]])
    a, b = spearman_of_arm_means(x, y, 100, seed=1), spearman_of_arm_means(x, y, 100, seed=1)
    assert a == b and a.n == 3 and a.rho == pytest.approx(-1.0)
    assert math.isnan(spearman_of_arm_means(x[:2], y[:2]).rho)  # two arms: no rank correlation


def test_one_seed_gives_a_difference_that_says_it_has_no_interval():
    one = paired_difference({4: 1.0, 5: math.nan}, {4: 3.0, 5: 2.0}, "test/error", higher=False)
    assert (one.diff.n, one.diff.mean, one.verdict) == (1, -2.0, "inconclusive")
    assert one.diff.format() == "-2 (one seed: no interval)" and one.diff.bounds() == "(one seed: no interval)"
    none = paired_difference({4: math.nan}, {4: 3.0}, "test/error", higher=False)
    assert none.diff.format() == "n/a" and none.diff.bounds() == "(no seed: no interval)"
    assert Interval(-0.0887, -0.2987, 0.1213, 5).bounds() == "[-0.299, +0.121]"


def aggregated(sweep_dir: Path, out: Path) -> Path:
    """The sweep's evals.csv as scripts/aggregate.py writes it."""
    assert load_script("aggregate").main([f"sweep={sweep_dir}", f"out={out}"]) == 0
    return out / "evals.csv"


@pytest.mark.parametrize("cut", ["after a comma", "inside the last value"])
def test_an_evals_csv_cut_mid_row_is_refused_naming_file_and_line(sweep_dir, tmp_path, cut):
    path = aggregated(sweep_dir, tmp_path / "agg")
    lines = path.read_text().splitlines(keepends=True)
    row = len(lines) // 2  # 0-based: file line row + 1
    kept = lines[row].index(",", len(lines[row]) // 2) + 1 if cut == "after a comma" else len(lines[row]) - 2
    path.write_text("".join(lines[:row]) + lines[row][:kept])
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))}, line {row + 1}: .*cut short.*aggregate.py"):
        read_sweep(path)


def test_an_evals_csv_missing_a_runs_last_evaluation_is_refused(sweep_dir, tmp_path):
    """Without it, the run's final/ values would silently come from step 20 of 30."""
    path = aggregated(sweep_dir, tmp_path / "agg")
    frame = pd.read_csv(path)
    frame.drop(frame.index[(frame["run"] == "opt=adamw,seed=0") & (frame["step"] == 30)]).to_csv(path, index=False)
    study = load_script("study")
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))}: run opt=adamw,seed=0 is marked finished with "
                                         rf"trainer.steps=30 but its last evaluation is at step 20"):
        study.main([f"sweep={path}", f"out={tmp_path / 'out'}", "study=toy", "metric=test/cost_ratio",
                    "tune_seeds=0,1", "verdict_seeds=2-3", "resamples=50"])
    assert not (tmp_path / "out").exists()  # refused before any file is written


def test_a_finished_run_whose_metrics_end_early_is_refused(sweep_dir):
    path = sweep_dir / "opt=dopr_adamw,seed=1" / "metrics.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))  # steps 10 and 20 of 30
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))}: the run is marked finished with trainer.steps=30 but "
                                         rf"its last evaluation is at step 20"):
        read_sweep(sweep_dir)


def test_a_broken_summary_json_is_named_with_the_fix(sweep_dir):
    path = sweep_dir / "opt=adamw,seed=2" / "summary.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))}: not valid JSON \(.*line 1 column \d+\).*again"):
        read_sweep(sweep_dir)


def test_a_torn_metrics_line_is_corruption_in_a_finished_run_and_left_out_in_an_unfinished_one(sweep_dir):
    unfinished = sweep_dir / "opt=adamw,seed=9" / "metrics.jsonl"
    with open(unfinished, "a") as f:
        f.write('{"step": 20, "val/lo')  # a crash mid-append: the run is left out as unfinished
    sweep = read_sweep(sweep_dir)
    assert sweep.left_out == [{"run": "opt=adamw,seed=9", "why": "status 'running', not finished"}]
    finished = sweep_dir / "opt=muon,seed=0"
    write_run(sweep_dir, "muon", 0, evals([3.0, 2.0, 2.5], [1.0, 0.5, 0.7]))
    with open(finished / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "val/lo')
    metrics = re.escape(str(finished / "metrics.jsonl"))
    with pytest.raises(SystemExit, match=rf"{metrics}, line 4: not a JSON record .*cut short"):
        read_sweep(sweep_dir)
