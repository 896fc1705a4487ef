#!/usr/bin/env python
"""One command per study: its runs.csv, provenance.json, tables, figure and top-README row.

    python scripts/study.py study=lm_arith_len45           # a committed study (dopr/analysis/studies.py)
    python scripts/study.py study=lm_arith_len45 sweep=multirun/lm_tune,multirun/lm_verdict \\
        out=results/lm_rerun tune_seeds=0,1,2 verdict_seeds=10-17
    python scripts/study.py study=my_study sweep=multirun/x out=results/my_study metric=test/return \\
        claim="DoPr raises return" readme=experiments/my/README.md
    python scripts/study.py help

Keys (a registered study supplies them all; any given here wins):
  study=NAME            the study's name (the study column of runs.csv)
  task=NAME             the task config's name, for records that lack it (CSVs)
  sweep=A,B             sweep dirs (run.py -m) and/or evals.csv files (scripts/aggregate.py), tuning and verdict
  out=DIR               where the files go
  metric=test/...       the headline test metric (its direction: the runs' summary.json, else its name)
  tune_seeds=0-4        seeds used to choose settings; verdict_seeds=10-17: fresh seeds for the verdict
                        (lists "0,1,2", ranges "10-17"; a seed in the data that is in neither is an error)
  cell_keys=opt.lr      settings both sides of a pair share ("none" for no key)
  ap_keys=opt.ap.damping  DoPr-only settings: each value is its own row against the same base runs
  claim="..."  readme=PATH  commands="cmd one;cmd two"  (for provenance and the README row)
  secondary=test/a,test/b  further test metrics paired in every cell (at the last evaluation)
  predictors=val/loss   one-step metrics whose Spearman rho with the test metric is reported
  resamples=2000        bootstrap resamples for the Spearman interval
  similar_margin=0.1    observation 1's band: base GPs are "similar" when every pairwise interval is within
                        this fraction of the best base GP's mean
  verdict_where="task.noise_cond=1e2"  keep only the verdict runs at these settings (";" between several):
                        one cell of a verdict axis (scripts/run_study.py's verdict_axes), tuning runs untouched

Writes to out/: evals.csv (every evaluation point, with each run's git SHA, versions and threads; only
when every source is a sweep dir, so that the study can be re-made from committed files), runs.csv (data contract, docs/STUDIES.md §5: one row per run, final/, best/ and
valpick/ of every metric), provenance.json, cells.{csv,md} (DoPr − base paired by seed in every cell),
choice.{csv,md} (each optimizer's setting chosen on the tuning seeds by the test metric and by val loss),
headline.{csv,md} (each GP vs DoPr at their chosen settings, with the verdict), observations.{csv,md} (the paper's
three Fig. 7 observations with verdict words), decoupling.{csv,md} (Spearman over each optimizer's runs),
arms.{csv,md} (Spearman across optimizers of their seed means: does the arm that fits better deploy better),
val_vs_test.png, lr_curves.png (when lr varies), study.md (all tables) and readme_row.{json,md} (for scripts/results_table.py).
"""

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dopr.analysis import report
from dopr.analysis.stats import higher_is_better
from dopr.analysis.studies import STUDIES, StudySpec
from dopr.analysis.sweep import concat, directions, read_sweep, runs_table
from dopr.cli import parse_script_args
from dopr.records import atomic_write_text


@dataclass
class StudyArgs:
    """The keys of the module docstring; None: not given, the registered study's value stands."""
    study: str
    task: str | None = None
    sweep: str | None = None
    out: str | None = None
    metric: str | None = None
    tune_seeds: str | None = None
    verdict_seeds: str | None = None
    cell_keys: str | None = None
    ap_keys: str | None = None
    claim: str | None = None
    readme: str | None = None
    commands: str | None = None
    resamples: int = 2000
    predictors: str | None = None
    secondary: str | None = None
    verdict_where: str | None = None
    similar_margin: float | None = None


def parse_seeds(text: str, key: str) -> list[int]:
    """ "0,1,2" or "10-17" or a mix ("0-2,5") -> sorted ints; empty -> []."""
    seeds = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                seeds.update(range(low, high + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise SystemExit(f"{key}={text!r}: not seeds; write e.g. {key}=0,1,2 or {key}=10-17") from None
    return sorted(seeds)


def parse_where(text: str) -> dict:
    """ "task.noise_cond=1e2;task.dataset=x" -> {"task.noise_cond": 100.0, "task.dataset": "x"}."""
    where = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise SystemExit(f"verdict_where={text!r}: write key=value pairs separated by ';'")
        key, value = (x.strip() for x in part.split("=", 1))
        try:
            where[key] = float(value)
        except ValueError:
            where[key] = value
    return where


def keep_verdict_cell(runs: pd.DataFrame, where: dict) -> pd.DataFrame:
    """Drop verdict-stage runs that are not at ``where``; tuning runs stay whatever their settings."""
    keep = runs["stage"] != "verdict"
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


def parse_keys(text: str) -> list[str]:
    return [] if text.strip() in ("", "none") else [k.strip() for k in text.split(",") if k.strip()]


def spec_from(args: StudyArgs) -> StudySpec:
    given = {key: value for key, value in vars(args).items() if value is not None}
    spec = STUDIES.get(args.study)
    if spec is None:
        missing = [k for k in ("sweep", "out", "metric") if k not in given]
        if missing:
            raise SystemExit(f"study={args.study} is not registered ({', '.join(STUDIES)}); "
                             f"a new study needs {', '.join(k + '=' for k in missing)}")
        spec = StudySpec(name=args.study, task=given.get("task", ""), claim=given.get("claim", ""),
                         metric=args.metric, sweep=[], out="", readme=given.get("readme", ""), commands=[])
    overrides = {}
    for key in ("task", "claim", "metric", "out", "readme", "tune_seeds", "verdict_seeds", "similar_margin"):
        if key in given:
            overrides[key] = given[key]
    if "sweep" in given:
        overrides["sweep"] = parse_keys(args.sweep)
        overrides["fixed"] = {}  # pinned values belong to the registered sources
    if "commands" in given:
        overrides["commands"] = [c.strip() for c in args.commands.split(";") if c.strip()]
    for key in ("cell_keys", "ap_keys", "predictors", "secondary"):
        if key in given:
            overrides[key] = parse_keys(given[key])
    if "verdict_where" in given:
        overrides["verdict_where"] = parse_where(args.verdict_where)
    return StudySpec(**{**spec.__dict__, **overrides})


def _rho_columns(table: pd.DataFrame) -> pd.DataFrame:
    """A Spearman table's rho and interval as printed (n/a where undefined)."""
    return table.assign(rho=table["rho"].map(lambda v: "n/a" if v != v else f"{v:+.2f}"),
                        interval=["n/a" if lo != lo else f"[{lo:+.2f}, {hi:+.2f}]"
                                  for lo, hi in zip(table["low"], table["high"])])


def run_study(spec: StudySpec, analysis_command: str, resamples: int = 2000) -> dict:
    """Everything the module docstring lists; returns the README row."""
    out = Path(spec.out)
    tune = parse_seeds(spec.tune_seeds, "tune_seeds")
    verdict_seeds = parse_seeds(spec.verdict_seeds, "verdict_seeds")
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

    cells = report.paired_cells(runs, metric, better, spec.cell_keys, spec.ap_keys)
    others = [report.paired_cells(runs, m, higher_is_better(m), spec.cell_keys, spec.ap_keys, picks=("final",))
              for m in spec.secondary + ["val/loss"]]
    cells_all = pd.concat([cells, *others], ignore_index=True)
    cells_all.to_csv(out / "cells.csv", index=False)
    lead = ["task", "stage", "gp"] + spec.cell_keys + spec.ap_keys + ["pick", "metric"]
    choice = report.choose_settings(runs, metric, better, settings)
    choice.to_csv(out / "choice.csv", index=False)
    # The headline metric at every pick, then (at the last evaluation) the secondary metrics and val/loss
    # of the same runs: what else changed where the test metric's settings were chosen.
    headline = pd.concat([report.headline_comparison(runs, metric, better, choice, settings, pick=pick)
                          for pick in report.PICKS]
                         + [report.headline_comparison(runs, m, higher_is_better(m), choice, settings, pick="final")
                            for m in spec.secondary + ["val/loss"] if f"final/{m}" in runs], ignore_index=True)
    headline.to_csv(out / "headline.csv", index=False)
    observations = report.paper_observations(runs, metric, better, choice, settings, headline, spec.similar_margin)
    observations.to_csv(out / "observations.csv", index=False)
    grid = runs[runs["stage"] == "tune"] if (runs["stage"] == "tune").any() else runs  # across the tuning grid
    spearman = report.spearman_table(grid, metric, spec.predictors, resamples)
    spearman.to_csv(out / "decoupling.csv", index=False)
    arms = report.arms_spearman(runs, metric, choice, settings, spec.predictors, resamples)
    arms.to_csv(out / "arms.csv", index=False)

    sections = {
        "cells": ("DoPr − base, paired by seed, in every cell (Δ of log values for ratio metrics)",
                  report.markdown_table(report.format_paired(cells_all, lead))),
        "choice": ("Settings chosen on the tuning seeds: by the test metric (best checkpoint), and what val loss picks",
                   report.markdown_table(choice.map(report.fmt_cell))),
        "headline": ("Each GP against DoPr at their chosen settings, paired by seed",
                     report.markdown_table(report.format_paired(
                         headline, ["task", "gp", "stage", "pick", "base setting", "dopr setting", "metric"]))),
        "observations": ("The paper's three observations at the chosen settings, each with its verdict word "
                         "(dopr.analysis.report.paper_observations says how each is decided)",
                         report.markdown_table(observations)),
        "decoupling": (f"Spearman ρ of final one-step metrics against final {metric}, per optimizer over its runs "
                     f"(95% bootstrap over runs)",
                     report.markdown_table(_rho_columns(spearman).assign(
                         p=spearman["p"].map(lambda v: "n/a" if v != v else f"{v:.2g}"))
                         [["predictor", "opt.name", "n", "rho", "interval", "p"]])),
        "arms": (f"Across all optimizers at their chosen settings: Spearman ρ of each one's mean final one-step "
                 f"metric against its mean best {metric} (95% bootstrap over seeds; arms listed as predictor → metric)",
                 report.markdown_table(_rho_columns(arms)[["predictor", "arms n", "seeds", "rho", "interval", "arms"]])
                 if len(arms) else "no runs"),
    }
    for name, (_, text) in sections.items():
        (out / f"{name}.md").write_text(text)
    direction = "higher" if better else "lower"
    study_md = [f"# {spec.name}: {spec.claim}\n", f"Metric: `{metric}` ({direction} is better). Written by "
                f"`{analysis_command}` from {', '.join(spec.sweep)}; {len(runs)} runs. Verdict words (STUDIES §3): "
                "held = the 95% interval excludes 0 on DoPr's better side, reversed = on the other side, "
                "inconclusive = includes 0 (its half-width is the smallest effect the study could have seen).\n"]
    for title, text in sections.values():
        study_md += [f"## {title}\n", text]
    (out / "study.md").write_text("\n".join(study_md))

    notes = list(spec.notes)
    left = report.missing_values(runs, metric)
    prov = report.provenance(sweep, runs, spec.commands, analysis_command, tune, verdict_seeds, notes)
    prov["left out"]["values"] = left
    prov["metric"] = {"name": metric, "higher is better": better,
                      "directions": {m: higher_is_better(m, metric, better) for m in metrics}}
    report.keep_analysis_date_if_unchanged(prov, out / "provenance.json")
    atomic_write_text(out / "provenance.json", json.dumps(prov, indent=2, default=str) + "\n")
    report.val_vs_test_figure(runs, metric, out / "val_vs_test.png", f"{spec.name}: val loss vs {metric}")
    if runs["opt.lr"].nunique() > 1:
        report.lr_figure(runs[runs["stage"] == "tune"], [metric, "val/loss"], out / "lr_curves.png",
                         f"{spec.name}: tuning seeds, mean ± 95% over seeds")
    row = report.readme_row(spec.name, spec.claim, metric, headline[headline["pick"] == "best"], spec.readme)
    (out / "readme_row.json").write_text(json.dumps(row, indent=2) + "\n")
    (out / "readme_row.md").write_text(f"| {row['study']} | {row['claim']} | {row['metric']} | {row['result']} | "
                                       f"{row['seeds']} |\n")
    print("\n".join(study_md))
    print(f"wrote {out}/: runs.csv ({len(runs)} runs), provenance.json, cells, choice, headline, decoupling, arms "
          f"(.csv/.md), study.md, val_vs_test.png, readme_row.json/.md")
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_script_args(argv, StudyArgs, __doc__)
    spec = spec_from(args)
    if not spec.out or not spec.sweep:
        raise SystemExit("sweep= and out= are needed (a registered study has them)")
    command = "python scripts/study.py " + " ".join(shlex.quote(a) for a in argv)
    run_study(spec, command, args.resamples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
