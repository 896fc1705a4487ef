#!/usr/bin/env python
"""A quick look at any sweep: every evaluation point as a tidy CSV, and a table of each run's last
evaluation per group (mean and 95% t-interval over seeds).

    python scripts/aggregate.py sweep=multirun/2026-11-23_08-00-00 out=results/lds
    python scripts/aggregate.py sweep=<dir> group=opt.name,opt.lr        # group by other config keys
    python scripts/aggregate.py sweep=<dir> metrics=val/loss,test/return  # only these columns in the table
    python scripts/aggregate.py help

Writes to out= (default: the sweep dir): evals.csv (one row per run x evaluation point, config keys as
columns), final.csv and final.md. Runs that did not finish are left out and listed. Reads each run's
summary.json and metrics.jsonl (dopr/analysis); needs nothing from W&B. A study's data-contract files
(runs.csv, provenance.json, paired verdicts) come from scripts/study.py.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dopr.analysis import mean_interval
from dopr.analysis.markdown import markdown_table
from dopr.analysis.sweep import last_evaluations, read_sweep_dir
from dopr.cli import parse_script_args


@dataclass
class AggregateArgs:
    sweep: str
    out: str | None = None  # default: the sweep dir
    group: str = "opt.name"
    metrics: str | None = None  # default: every recorded val/train loss and test metric


def final_table(evals: pd.DataFrame, group: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group: seeds, and for each metric the mean and 95% half-width of the runs' last evaluation."""
    last = last_evaluations(evals)
    rows = []
    for key, runs in last.groupby(group, dropna=False, sort=True):
        row = dict(zip(group, key if isinstance(key, tuple) else (key,)))
        row["seeds"] = runs["seed"].nunique()
        for m in metrics:
            interval = mean_interval(runs[m])
            row[m], row[f"{m} ±95%"] = interval.mean, interval.half_width
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, group: list[str], metrics: list[str]) -> str:
    shown = table[group + ["seeds"]].copy()
    for m in metrics:
        shown[m] = [f"{v:.4g}" if h != h else f"{v:.4g} ± {h:.2g}" for v, h in zip(table[m], table[f"{m} ±95%"])]
    return markdown_table(shown)


def main(argv: list[str] | None = None) -> int:
    args = parse_script_args(sys.argv[1:] if argv is None else argv, AggregateArgs, __doc__)
    sweep_dir = Path(args.sweep)
    group = [k for k in args.group.split(",") if k]
    sweep = read_sweep_dir(sweep_dir, keys=[k for k in group if k not in ("opt.name", "seed")])
    evals = sweep.evals
    available = [c for c in evals.columns if c in ("train/loss", "val/loss") or c.startswith("test/")]
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics is not None else available
    missing = [m for m in metrics if m not in evals]
    if missing:
        raise SystemExit(f"metrics={','.join(missing)}: not recorded in {sweep_dir}; recorded: {available}")
    for run in sweep.left_out:
        print(f"left out {run['run']}: {run['why']}")
    table = final_table(evals, group, metrics)
    out = Path(args.out if args.out is not None else sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals.to_csv(out / "evals.csv", index=False)
    table.to_csv(out / "final.csv", index=False)
    text = format_table(table, group, metrics)
    (out / "final.md").write_text(text)
    print(text)
    print(f"wrote {out / 'evals.csv'} ({len(evals)} rows, {evals['run'].nunique()} runs), {out / 'final.csv'}, "
          f"{out / 'final.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
