"""A study's results directory, written from its StudySpec (``scripts/study.py`` is the command):

evals.csv (every evaluation point, with each run's git SHA, versions and threads; only when every source is a
sweep dir, so that the study can be re-made from committed files), runs.csv (data contract, docs/STUDIES.md §5:
one row per run, final/, best/ and valpick/ of every metric), provenance.json, cells.{csv,md} (DoPr − base
paired by seed in every cell), choice.{csv,md} (each optimizer's setting chosen on the tuning seeds by the test
metric and by val loss), headline.{csv,md} (each GP vs DoPr at their chosen settings, with the verdict),
observations.{csv,md} (the paper's three Fig. 7 observations with verdict words), decoupling.{csv,md}
(Spearman over each optimizer's runs), arms.{csv,md} (Spearman across optimizers of their seed means: does the
arm that fits better deploy better), val_vs_test.png, lr_curves.png (when lr varies), study.md (all tables)
and readme_row.{json,md} (for scripts/results_table.py); decomposition.{csv,md} (docs/STUDIES.md §3b: speed,
matched loss, converged or budget-limited, equal compute; dopr.analysis.decomposition), trajectories.png
(the test metric along training against val/loss and wall-clock, per pair) and arms_vs_time.png (every arm's
test metric against wall-clock, one axis) when the study has verdict-stage DoPr/base pairs and evals.csv's
evaluation points.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dopr.analysis import decomposition, report
from dopr.analysis.figures import arms_time_figure, lr_figure, trajectories_figure, val_vs_test_figure
from dopr.analysis.markdown import fmt_cell, format_paired, markdown_table
from dopr.analysis.provenance import keep_analysis_date_if_unchanged, missing_values, provenance
from dopr.analysis.stats import higher_is_better
from dopr.analysis.studies import StudySpec
from dopr.analysis.sweep import PICKS, concat, directions, read_sweep, runs_table
from dopr.records import atomic_write_text


def keep_verdict_cell(runs: pd.DataFrame, where: dict) -> pd.DataFrame:
    """Drop verdict-seed runs (verdict and equal-compute stages) that are not at ``where``; tuning runs stay
    whatever their settings."""
    keep = runs["stage"] == "tune"
    at = pd.Series(True, index=runs.index)
    for key, value in where.items():
        if key not in runs:
            raise SystemExit(f"verdict_where: {key} is not recorded for these runs")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        column = pd.to_numeric(runs[key], errors="coerce") if numeric else runs[key].astype(str)
        at &= column == value
    if not (at & ~keep).any():
        raise SystemExit(f"verdict_where={where}: no verdict run is at these settings")
    return runs[keep | at]


def _rho_columns(table: pd.DataFrame) -> pd.DataFrame:
    """A Spearman table's rho and interval as printed (n/a where undefined)."""
    return table.assign(rho=table["rho"].map(lambda v: "n/a" if v != v else f"{v:+.2f}"),
                        interval=["n/a" if lo != lo else f"[{lo:+.2f}, {hi:+.2f}]"
                                  for lo, hi in zip(table["low"], table["high"])])


def write_study(spec: StudySpec, analysis_command: str, resamples: int = 2000) -> dict:
    """Every file of the module docstring, into ``spec.out``; returns the README row."""
    out = Path(spec.out)
    tune, verdict_seeds = spec.tune_seeds, spec.verdict_seeds
    if set(tune) & set(verdict_seeds):
        raise SystemExit(f"seeds {sorted(set(tune) & set(verdict_seeds))} are in both tune_seeds= and verdict_seeds=; "
                         f"a verdict needs seeds never used in tuning")
    settings = spec.cell_keys + spec.ap_keys  # what tuning chooses
    keys = settings + [k for k in spec.verdict_where if k not in settings]  # columns carried into runs.csv
    sweep = concat([read_sweep(s, keys, spec.fixed) for s in spec.sweep])
    if sweep.evals["task"].isna().any():
        if not spec.task:
            raise SystemExit(f"{sweep.source} does not record the task; give task=<task config name>")
        sweep.evals["task"] = sweep.evals["task"].fillna(spec.task)
    metric = spec.metric
    if metric not in sweep.evals:
        found = [c for c in sweep.evals.columns if c.startswith("test/")]
        raise SystemExit(f"metric={metric} is not in {sweep.source}; its test metrics are {found}")
    better = report.metric_direction(metric, sweep)
    metrics = [c for c in sweep.evals.columns if c.startswith(("val/", "test/"))]
    stage_of = {s: "tune" for s in tune} | {s: "verdict" for s in verdict_seeds}
    runs = runs_table(sweep, spec.name, stage_of, directions(metrics, metric, better), keys=keys)
    if spec.verdict_where:
        runs = keep_verdict_cell(runs, spec.verdict_where)
    out.mkdir(parents=True, exist_ok=True)
    if all(Path(source).is_dir() for source in spec.sweep):  # keep the evaluation points (and provenance) with the study
        sweep.evals.to_csv(out / "evals.csv", index=False)
    runs.assign(ap=runs["ap"].map({True: "true", False: "false"})).to_csv(out / "runs.csv", index=False)

    everyone = runs  # choice, arms and decomposition read every arm; the GP-pair tables leave the peers out
    runs = everyone[~everyone["opt.name"].isin(spec.peers)]
    cells = report.paired_cells(runs, metric, better, spec.cell_keys, spec.ap_keys)
    others = [report.paired_cells(runs, m, higher_is_better(m), spec.cell_keys, spec.ap_keys, picks=("final",))
              for m in spec.secondary + ["val/loss"]]
    cells_all = pd.concat([cells, *others], ignore_index=True)
    cells_all.to_csv(out / "cells.csv", index=False)
    lead = ["task", "stage", "gp"] + spec.cell_keys + spec.ap_keys + ["pick", "metric"]
    choice = report.choose_settings(everyone, metric, better, settings)
    choice.to_csv(out / "choice.csv", index=False)
    # The headline metric at every pick, then (at the last evaluation) the secondary metrics and val/loss
    # of the same runs: what else changed where the test metric's settings were chosen.
    headline = pd.concat([report.headline_comparison(runs, metric, better, choice, settings, pick=pick)
                          for pick in PICKS]
                         + [report.headline_comparison(runs, m, higher_is_better(m), choice, settings, pick="final")
                            for m in spec.secondary + ["val/loss"] if f"final/{m}" in runs], ignore_index=True)
    headline.to_csv(out / "headline.csv", index=False)
    observations = report.paper_observations(runs, metric, better, choice, settings, headline, spec.similar_margin)
    observations.to_csv(out / "observations.csv", index=False)
    grid = everyone[everyone["stage"] == "tune"] if (everyone["stage"] == "tune").any() else everyone  # the tuning grid
    spearman = report.spearman_table(grid, metric, spec.predictors, resamples)
    spearman.to_csv(out / "decoupling.csv", index=False)
    arms = report.arms_spearman(everyone, metric, choice, settings, spec.predictors, resamples)
    arms.to_csv(out / "arms.csv", index=False)

    sections = {
        "cells": ("DoPr − base, paired by seed, in every cell (Δ of log values for ratio metrics)",
                  markdown_table(format_paired(cells_all, lead))),
        "choice": ("Settings chosen on the tuning seeds: by the test metric (best checkpoint), and what val loss picks",
                   markdown_table(choice.map(fmt_cell))),
        "headline": ("Each GP against DoPr at their chosen settings, paired by seed",
                     markdown_table(format_paired(
                         headline, ["task", "gp", "stage", "pick", "base setting", "dopr setting", "metric"]))),
        "observations": ("The paper's three observations at the chosen settings, each with its verdict word "
                         "(dopr.analysis.report.paper_observations says how each is decided)",
                         markdown_table(observations)),
        "decoupling": (f"Spearman ρ of final one-step metrics against final {metric}, per optimizer over its runs "
                     f"(95% bootstrap over runs)",
                     markdown_table(_rho_columns(spearman).assign(
                         p=spearman["p"].map(lambda v: "n/a" if v != v else f"{v:.2g}"))
                         [["predictor", "opt.name", "n", "rho", "interval", "p"]])),
        "arms": (f"Across all optimizers at their chosen settings: Spearman ρ of each one's mean final one-step "
                 f"metric against its mean best {metric} (95% bootstrap over seeds; arms listed as predictor → metric)",
                 markdown_table(_rho_columns(arms)[["predictor", "arms n", "seeds", "rho", "interval", "arms"]])
                 if len(arms) else "no runs"),
    }
    for name, (_, text) in sections.items():
        (out / f"{name}.md").write_text(text)
    direction = "higher" if better else "lower"
    study_md = [f"# {spec.name}: {spec.claim}\n", f"Metric: `{metric}` ({direction} is better). Written by "
                f"`{analysis_command}` from {', '.join(spec.sweep)}; {len(everyone)} runs. Verdict words (STUDIES §3): "
                "held = the 95% interval excludes 0 on DoPr's better side, reversed = on the other side, "
                "inconclusive = includes 0 (its half-width is the smallest effect the study could have seen).\n"]
    for title, text in sections.values():
        study_md += [f"## {title}\n", text]
    (out / "study.md").write_text("\n".join(study_md))

    notes = list(spec.notes)
    left = missing_values(everyone, metric)
    prov = provenance(sweep, everyone, spec.commands, analysis_command, tune, verdict_seeds, notes)
    prov["left out"]["values"] = left
    prov["metric"] = {"name": metric, "higher is better": better,
                      "directions": {m: higher_is_better(m, metric, better) for m in metrics}}
    keep_analysis_date_if_unchanged(prov, out / "provenance.json")
    atomic_write_text(out / "provenance.json", json.dumps(prov, indent=2, default=str) + "\n")
    val_vs_test_figure(everyone, metric, out / "val_vs_test.png", f"{spec.name}: val loss vs {metric}")
    if everyone["opt.lr"].nunique() > 1:
        lr_figure(everyone[everyone["stage"] == "tune"], [metric, "val/loss"], out / "lr_curves.png",
                  f"{spec.name}: tuning seeds, mean ± 95% over seeds")
    row = report.readme_row(spec.name, spec.claim, metric, headline[headline["pick"] == "best"], spec.readme)
    (out / "readme_row.json").write_text(json.dumps(row, indent=2) + "\n")
    (out / "readme_row.md").write_text(f"| {row['study']} | {row['claim']} | {row['metric']} | {row['result']} | "
                                       f"{row['seeds']} |\n")
    parts = decomposition.decompose(sweep.evals, everyone, choice, settings, metric, better,
                                    [(peer, ref) for peer in spec.peers for ref in spec.references])
    if parts:  # §3b, for the verdict pairs; a study without verdict seeds has nothing to decompose
        decomposition.decomposition_rows(parts).to_csv(out / "decomposition.csv", index=False)
        (out / "decomposition.md").write_text(decomposition.decomposition_table(parts))
        trajectories_figure(sweep.evals, [part["pair"] for part in parts], metric, out / "trajectories.png",
                            f"{spec.name}: verdict seeds along training")
        reruns = {f"{part['pair'].base_name} ({part['pair'].base_setting}), re-run to DoPr's wall-clock":
                  part["reruns"] for part in parts if part["reruns"]}
        arms_time_figure(sweep.evals, [part["pair"] for part in parts], metric, out / "arms_vs_time.png",
                         f"{spec.name}: every arm against wall-clock", reruns)
    print("\n".join(study_md))
    print(f"wrote {out}/: runs.csv ({len(everyone)} runs), provenance.json, cells, choice, headline, decoupling, arms "
          f"(.csv/.md), study.md, val_vs_test.png, readme_row.json/.md")
    return row
