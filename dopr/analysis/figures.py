"""A study's figures: ``lr_figure`` (each metric against opt.lr per GP, with and without AP),
``val_vs_test_figure`` (final val loss against the test metric, per optimizer), ``trajectories_figure``
(docs/STUDIES.md §3b: the test metric along training against val/loss and against wall-clock, per verdict
pair, every verdict seed) and ``arms_time_figure`` (every arm's test metric against wall-clock on one axis)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dopr.analysis.decomposition import run_hosts
from dopr.analysis.stats import is_log_scale, mean_interval

PICK_WORDS = {"best": "best checkpoint by the metric itself", "final": "last evaluation",
              "valpick": "checkpoint with the lowest val/loss"}


def lr_figure(runs: pd.DataFrame, metrics: list[str], path: Path, title: str) -> None:
    """Per GP (columns) and metric (rows): mean ± 95% interval over seeds against opt.lr, with and without
    AP, at the best checkpoint of the test metric and the last evaluation of the one-step losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gps = sorted(runs["gp"].unique())
    fig, axes = plt.subplots(len(metrics), len(gps), figsize=(3.6 * len(gps), 2.8 * len(metrics)), squeeze=False)
    for j, gp in enumerate(gps):
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            column = f"{'best' if metric.startswith('test/') else 'final'}/{metric}"
            for ap, style in ((False, "o--"), (True, "s-")):
                side = runs[(runs["gp"] == gp) & (runs["ap"] == ap)]
                if side.empty or side["opt.lr"].isna().all():
                    continue
                lrs = sorted(side["opt.lr"].dropna().unique())
                cis = [mean_interval(side.loc[side["opt.lr"] == lr, column]) for lr in lrs]
                half = [c.half_width if math.isfinite(c.half_width) else 0.0 for c in cis]
                ax.errorbar(lrs, [c.mean for c in cis], yerr=half, fmt=style, capsize=3,
                            label=side["opt.name"].iloc[0])
            ax.set_xscale("log")
            if not metric.startswith("test/") or is_log_scale(metric):
                ax.set_yscale("log")
            ax.set_title(f"{gp}: {column}", fontsize=8)
            ax.set_xlabel("opt.lr", fontsize=8)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def val_vs_test_figure(runs: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    """Per optimizer: final val/loss against the test metric at the final and best checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, pick in zip(axes, ("final", "best")):
        for i, (name, group) in enumerate(runs.groupby("opt.name", sort=True)):
            y = group[f"{pick}/{metric}"].replace([np.inf, -np.inf], np.nan)
            ax.scatter(group["final/val/loss"], y, s=28, color=f"C{i}", marker="s" if name.startswith("dopr_") else "o",
                       label=name, alpha=0.8, edgecolor="k", linewidth=0.4)
        ax.set_xscale("log")
        values = runs[f"{pick}/{metric}"].replace([np.inf, -np.inf], np.nan).dropna()
        if len(values) and (values > 0).all() and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.set_xlabel("final val/loss (one-step)")
        ax.set_title(f"{metric} at the {PICK_WORDS[pick]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectories_figure(evals: pd.DataFrame, pairs: list, metric: str, path: Path, title: str) -> None:
    """Per verdict pair (rows): the test metric at every evaluation against val/loss (left; training runs
    right to left) and against wall-clock seconds (right), one line per verdict seed, base dashed and DoPr
    solid. Where the DoPr line sits above the base's at equal val/loss, it deploys better at matched loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 3.6 * len(pairs)), squeeze=False)
    by_run = {run: points.sort_values("step") for run, points in evals.groupby("run", sort=False)}
    for row, pair in zip(axes, pairs):
        for runs, name, style, color in ((pair.base, pair.base_name, "--", "C0"), (pair.dopr, pair.dopr_name, "-", "C3")):
            for i, run in enumerate(runs.values()):
                points = by_run[run]
                y = points[metric].replace([np.inf, -np.inf], np.nan)
                label = name if i == 0 else None
                row[0].plot(points["val/loss"], y, style, color=color, marker=".", alpha=0.6, lw=1, label=label)
                if "wall_time" in points:
                    row[1].plot(points["wall_time"], y, style, color=color, marker=".", alpha=0.6, lw=1, label=label)
        row[0].set_xscale("log")
        row[0].set_xlabel("val/loss (one-step), at each evaluation")
        row[1].set_xlabel("wall-clock seconds")
        for ax in row:
            ax.set_ylabel(metric)
            ax.set_title(f"{pair.task} {pair.gp}: {pair.dopr_setting} vs {pair.base_setting}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def arm_time_curves(evals: pd.DataFrame, pairs: list, metric: str,
                    reruns: dict[str, dict[int, tuple[str, float]]] | None = None) -> dict[str, pd.DataFrame]:
    """Every arm of the verdict pairs (GPs, DoPr variants, peers; each at its chosen setting, each once):
    per evaluation step, the mean wall-clock seconds to reach it over the verdict seeds and the mean of
    ``metric`` with its 95% t-interval. Label "name (setting)" -> columns step, seeds, wall_time, mean,
    low, high; its ``attrs["hosts"]``: the machines and thread counts its runs' records name (``run_hosts``),
    since wall-clocks compare only within one. ``reruns``: further arms, label -> seed -> (run, seconds per
    step): the base's equal-compute re-runs, placed at step x the seconds per step of the seed's verdict run
    (their own clocks may have run beside other work), at the steps every re-run reached, then one point
    from each re-run's last evaluation (each ends at its seed's DoPr wall-clock)."""
    arms: dict[str, dict] = {}
    for pair in pairs:
        arms.setdefault(f"{pair.base_name} ({pair.base_setting})", pair.base)
        arms.setdefault(f"{pair.dopr_name} ({pair.dopr_setting})", pair.dopr)
    clocks = {}
    for label, runs in (reruns or {}).items():
        arms.setdefault(label, {seed: run for seed, (run, _) in runs.items()})
        clocks.update({run: sps for run, sps in runs.values()})
    hosts = run_hosts(evals)
    curves = {}
    for label, runs in arms.items():
        points = evals[evals["run"].isin(list(runs.values()))].replace([np.inf, -np.inf], np.nan)
        rerun = label in (reruns or {})
        if rerun:
            points = points.assign(wall_time=points["step"] * points["run"].map(clocks))
        if "wall_time" not in points or points["wall_time"].isna().all():
            continue
        rows = []
        for step, at in points.groupby("step", sort=True):
            if rerun and at["run"].nunique() < len(runs):
                continue  # the re-runs end at different steps: a mean over the remaining seeds would mislead
            interval = mean_interval(at[metric])
            rows.append(dict(step=step, seeds=interval.n, wall_time=float(at["wall_time"].mean()),
                             mean=interval.mean, low=interval.low, high=interval.high))
        if rerun:  # then where each ended, at its seed's DoPr wall-clock: the equal-compute point
            last = points.sort_values("step").groupby("run").tail(1)
            interval = mean_interval(last[metric])
            rows.append(dict(step=int(last["step"].max()), seeds=interval.n, wall_time=float(last["wall_time"].mean()),
                             mean=interval.mean, low=interval.low, high=interval.high))
        curves[label] = pd.DataFrame(rows)
        curves[label].attrs["hosts"] = frozenset(hosts[r] for r in runs.values() if hosts.get(r) is not None)
    return curves


def arms_time_figure(evals: pd.DataFrame, pairs: list, metric: str, path: Path, title: str,
                     reruns: dict[str, dict[int, tuple[str, float]]] | None = None) -> None:
    """``arm_time_curves`` on one axis, each interval a band: what each arm reaches for the time it costs
    (a run's wall-clock includes its evaluations and the machine's load). DoPr arms solid, others dashed.
    Where the runs name more than one machine the legend says how many per arm and the title says that
    clocks compare only within one machine (``run_hosts``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = arm_time_curves(evals, pairs, metric, reruns)
    machines = len(frozenset().union(*(curve.attrs["hosts"] for curve in curves.values())))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        n = len(curve.attrs["hosts"])
        where = f", on {n} machine{'s' if n != 1 else ''}" if machines > 1 else ""
        ax.plot(curve["wall_time"], curve["mean"], "-" if label.startswith("dopr") else "--", color=color,
                marker=".", label=f"{label}, {int(curve['seeds'].max())} seeds{where}")
        ax.fill_between(curve["wall_time"], curve["low"], curve["high"], color=color, alpha=0.12)
    ax.set_xlabel("wall-clock seconds (mean over verdict seeds)")
    ax.set_ylabel(f"{metric} (mean, 95% interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if machines > 1:
        title += f"\nruns on {machines} machines (CPU, kernel set, threads): clocks compare only within one"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
