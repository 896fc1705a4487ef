#!/usr/bin/env python
"""Sample quality against ODE step count, per optimizer, from an aggregated flow sweep.

    python scripts/aggregate.py sweep=multirun/flow_2d out=results/flow/flow_2d
    python scripts/plot_flow.py evals=results/flow/flow_2d/evals.csv floor=multirun/flow_2d
    python scripts/plot_flow.py evals=<csv> out=<dir> group=opt.name pairs=dopr_adamw:adamw,dopr_muon:muon title="..."
    python scripts/plot_flow.py help

Reads the tidy ``evals.csv`` written by scripts/aggregate.py (one row per run x eval point), keeps each
run's last eval point, and writes (to out=, default next to the CSV):
  quality_vs_steps.png   one panel per metric (test/<metric>@k), mean and 95% t-interval over seeds
  steps_table.md/.csv    the same numbers as a table, val/loss included
  paired.md/.csv         DoPr minus its base optimizer per step count, paired over seeds (same seed =
                         same init and minibatches), with a 95% t-interval and a two-sided p-value
Means and intervals follow dopr.analysis.stats' rule: NaN is left out, an infinite value makes the
interval unbounded.
``floor=<sweep dir>`` rebuilds the task from one run's resolved config and draws its
``reference_floor()`` (the metric of a perfect sampler at the same sample size) as a dashed line.
"""

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from dopr.analysis import mean_interval
from dopr.cli import parse_script_args

STEP_KEY = re.compile(r"^test/(?P<metric>[a-z]+(?:_[a-z]+)?)@(?P<steps>\d+)$")
DEFAULT_PAIRS = ("dopr_adamw:adamw", "dopr_muon:muon", "dopr_signum:signum", "dopr_adamuon:adamuon")
OPT_ORDER = ("adamw", "dopr_adamw", "muon", "dopr_muon", "signum", "dopr_signum", "adamuon", "dopr_adamuon")


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    interval = mean_interval(values)
    return interval.mean, interval.half_width


def step_metrics(columns) -> dict[str, list[tuple[int, str]]]:
    """{metric: [(steps, column), ...]} for every test/<metric>@<steps> column, sorted by steps."""
    found: dict[str, list[tuple[int, str]]] = {}
    for column in columns:
        match = STEP_KEY.match(column)
        if match:
            found.setdefault(match["metric"], []).append((int(match["steps"]), column))
    return {metric: sorted(cols) for metric, cols in found.items()}


def last_eval(frame: pd.DataFrame, group: str) -> pd.DataFrame:
    if group not in frame:
        raise SystemExit(f"evals.csv has no column {group!r}; aggregate with group={group}")
    return frame.sort_values("step").groupby("run").tail(1)


def ordered(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (OPT_ORDER.index(n) if n in OPT_ORDER else len(OPT_ORDER), n))


def steps_table(last: pd.DataFrame, group: str, metrics: dict) -> pd.DataFrame:
    rows = []
    for opt in ordered(last[group]):
        runs = last[last[group] == opt]
        for column in ["val/loss"] + [c for cols in metrics.values() for _, c in cols]:
            mean, half = mean_ci(runs[column].to_numpy(dtype=float))
            rows.append({group: opt, "key": column, "mean": mean, "ci95": half, "seeds": int(runs["seed"].nunique())})
    return pd.DataFrame(rows)


def paired_table(last: pd.DataFrame, group: str, metrics: dict, pairs: list[str]) -> pd.DataFrame:
    rows = []
    for pair in pairs:
        treated, base = pair.split(":")
        a = last[last[group] == treated].set_index("seed")
        b = last[last[group] == base].set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        if len(seeds) < 2:
            continue
        for column in ["val/loss"] + [c for cols in metrics.values() for _, c in cols]:
            diff = a.loc[seeds, column].to_numpy(dtype=float) - b.loc[seeds, column].to_numpy(dtype=float)
            mean, half = mean_ci(diff)
            finite = diff[np.isfinite(diff)]
            spread = len(finite) == len(diff) and np.std(diff) > 1e-9 * max(1.0, float(np.abs(diff).max()))
            p_value = float(stats.ttest_1samp(diff, 0.0).pvalue) if spread else math.nan
            rel = mean / float(b.loc[seeds, column].mean())
            rows.append({"pair": f"{treated} - {base}", "key": column, "diff": mean, "ci95": half,
                         "relative": rel, "p": p_value, "seeds": len(seeds)})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, index: str, value: str, half: str) -> str:
    """Wide markdown table: rows = ``index`` values, columns = keys, cells = value ± half."""
    keys = list(dict.fromkeys(table["key"]))
    lines = ["| " + " | ".join([index] + keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name in dict.fromkeys(table[index]):
        sub = table[table[index] == name].set_index("key")
        cells = []
        for key in keys:
            v, h = sub.loc[key, value], sub.loc[key, half]
            cells.append(f"{v:.4g} ± {h:.2g}" if h == h else f"{v:.4g}")
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    return "\n".join(lines) + "\n"


def reference_floor(sweep_dir: Path) -> dict[str, float]:
    from hydra.utils import instantiate

    summary = next(Path(sweep_dir).rglob("summary.json"), None)
    if summary is None:
        raise SystemExit(f"floor={sweep_dir}: no summary.json found to rebuild the task from")
    task = instantiate(json.loads(summary.read_text())["config"]["task"], _convert_="all")
    return task.reference_floor()


def plot(last: pd.DataFrame, group: str, metrics: dict, floor: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(metrics)) if len(metrics) > 2 else len(metrics)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    axes = [list(axes.ravel())]
    priority = ("swd", "fid", "acc", "nll")
    panels = sorted(metrics.items(), key=lambda item: (
        priority.index(item[0].split("_")[0]) if item[0].split("_")[0] in priority else len(priority), item[0]))
    for ax, (metric, cols) in zip(axes[0], panels):
        steps = [k for k, _ in cols]
        for opt in ordered(last[group]):
            runs = last[last[group] == opt]
            stats_ = [mean_ci(runs[c].to_numpy(dtype=float)) for _, c in cols]
            mean = np.array([m for m, _ in stats_])
            half = np.nan_to_num(np.array([h for _, h in stats_]))
            val, val_half = mean_ci(runs["val/loss"].to_numpy(dtype=float))
            style = "-" if opt.startswith("dopr_") else "--"
            line, = ax.plot(steps, mean, style, marker="o", ms=3,
                            label=f"{opt} (val {val:.4f}±{val_half:.1g}, n={runs['seed'].nunique()})")
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.15)
        base_metric = metric.split("_")[0]
        if base_metric in floor:
            ax.axhline(floor[base_metric], color="k", ls=":", lw=1, label="true samples in place of model samples")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ODE integration steps")
        ax.set_ylabel(metric)
        if base_metric in ("swd", "fid"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


@dataclass
class PlotFlowArgs:
    evals: str
    out: str | None = None  # default: the CSV's folder
    group: str = "opt.name"
    pairs: str = ",".join(DEFAULT_PAIRS)  # dopr:base pairs, comma-separated
    floor: str | None = None
    title: str | None = None


def main(argv: list[str] | None = None) -> int:
    args = parse_script_args(sys.argv[1:] if argv is None else argv, PlotFlowArgs, __doc__)
    evals_csv = Path(args.evals)
    frame = pd.read_csv(evals_csv)
    if "status" in frame:  # a run still training (or crashed) would enter with an early eval point
        unfinished = sorted(frame.loc[frame["status"] != "finished", "run"].unique())
        if unfinished:
            print(f"skipping {len(unfinished)} unfinished run(s): {', '.join(unfinished)}")
        frame = frame[frame["status"] == "finished"]
    last = last_eval(frame, args.group)
    metrics = step_metrics(frame.columns)
    if not metrics:
        raise SystemExit(f"{evals_csv} has no test/<metric>@<steps> columns; is it a flow sweep?")
    out = Path(args.out) if args.out is not None else evals_csv.parent
    out.mkdir(parents=True, exist_ok=True)

    table = steps_table(last, args.group, metrics)
    table.to_csv(out / "steps_table.csv", index=False)
    (out / "steps_table.md").write_text(markdown(table, args.group, "mean", "ci95"))
    paired = paired_table(last, args.group, metrics, args.pairs.split(","))
    if len(paired):
        paired.to_csv(out / "paired.csv", index=False)
        (out / "paired.md").write_text(markdown(paired, "pair", "diff", "ci95"))
    floor = reference_floor(Path(args.floor)) if args.floor is not None else {}
    if floor:
        (out / "floor.json").write_text(json.dumps(floor, indent=2) + "\n")
    title = args.title or f"{evals_csv.parent.name}: sample quality vs step count (last eval, mean ± 95% CI)"
    plot(last, args.group, metrics, floor, title, out / "quality_vs_steps.png")
    print((out / "steps_table.md").read_text())
    if len(paired):
        print((out / "paired.md").read_text())
    print(f"wrote {out}/quality_vs_steps.png, steps_table.*, paired.*" + (", floor.json" if floor else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
