#!/usr/bin/env python
"""Aggregate a sweep: a tidy CSV (one row per run x eval step) and a table of the final val/loss and
test metrics per optimizer (mean and 95% CI over seeds).

    python scripts/aggregate.py multirun/2026-11-23_08-00-00 --out results/lds
    python scripts/aggregate.py <dir> --group opt.name opt.lr      # group by other config keys

Reads each run's summary.json (resolved config) and metrics.jsonl; needs nothing from W&B.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


def _get(config: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def load_sweep(sweep_dir: Path, keys: list[str]) -> pd.DataFrame:
    """Tidy frame: one row per (run, eval step), with the config keys as columns."""
    rows = []
    for summary_path in sorted(Path(sweep_dir).rglob("summary.json")):
        run_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        metrics_path = run_dir / "metrics.jsonl"
        if not metrics_path.exists():
            continue
        config = summary.get("config", {})
        meta = {k: _get(config, k) for k in keys}
        meta.update(run=str(run_dir.relative_to(sweep_dir)), seed=config.get("seed"), status=summary.get("status"))
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                rows.append({**meta, **json.loads(line)})
    if not rows:
        raise SystemExit(f"no runs with summary.json and metrics.jsonl under {sweep_dir}")
    return pd.DataFrame(rows)


def mean_ci(values: pd.Series) -> tuple[float, float, int]:
    """Mean and half-width of a 95% t-interval; inf values make the mean inf and the CI undefined."""
    x = values.dropna().to_numpy(dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if not np.isfinite(x).all() or n == 1:
        return float(x.mean()), math.nan, n
    half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


def final_table(frame: pd.DataFrame, keys: list[str], metrics: list[str] | None = None,
                include_unfinished: bool = False) -> pd.DataFrame:
    """Mean and 95% CI of each run's last evaluation, per group; unfinished runs (killed, or still
    running) are left out unless asked for, since their last point is an early one."""
    if not include_unfinished:
        frame = frame[frame["status"] == "finished"]
    last = frame.sort_values("step").groupby("run").tail(1)
    metrics = metrics or [c for c in frame.columns if c in ("train/loss", "val/loss") or c.startswith("test/")]
    out = []
    for group, runs in last.groupby(keys, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        row = dict(zip(keys, group))
        row["seeds"] = runs["seed"].nunique()
        for m in metrics:
            if m in runs:
                mean, half, _ = mean_ci(runs[m])
                row[m] = mean
                row[f"{m} ±95%"] = half
        out.append(row)
    return pd.DataFrame(out)


def format_table(table: pd.DataFrame, keys: list[str]) -> str:
    metric_cols = [c for c in table.columns if c not in keys and c != "seeds" and not c.endswith("±95%")]
    header = keys + ["seeds"] + metric_cols
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in keys] + [str(r["seeds"])]
        for m in metric_cols:
            half = r.get(f"{m} ±95%")
            cells.append(f"{r[m]:.4g} ± {half:.2g}" if half == half and half is not None else f"{r[m]:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--group", nargs="+", default=["opt.name"], help="config keys to group by (default opt.name)")
    parser.add_argument("--metrics", nargs="+", default=None, help="columns for the table (default: losses and test/*)")
    parser.add_argument("--include-unfinished", action="store_true", help="also table runs whose summary is not 'finished'")
    parser.add_argument("--out", type=Path, default=None, help="directory for runs.csv and final.csv/final.md (default: the sweep dir)")
    args = parser.parse_args(argv)
    frame = load_sweep(args.sweep_dir, args.group)
    table = final_table(frame, args.group, args.metrics, args.include_unfinished)
    unfinished = frame.loc[frame["status"] != "finished", "run"].nunique()
    if unfinished and not args.include_unfinished:
        print(f"note: {unfinished} unfinished run(s) left out of the table (kept in runs.csv); --include-unfinished to add them")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "final.csv", index=False)
    text = format_table(table, args.group)
    (out / "final.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'runs.csv'} ({len(frame)} rows, {frame['run'].nunique()} runs), {out / 'final.csv'}, {out / 'final.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
