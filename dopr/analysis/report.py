"""A study's tables from its runs.csv: paired DoPr-minus-base cells, the settings each optimizer would be
tuned to (by the test metric and by val loss), the headline comparison with its verdict word,
Spearman decoupling, provenance, the val-vs-test figure and the study's row of the top README.

Every number a study README quotes comes from these functions (``scripts/study.py`` calls them).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from dopr.records import machine
from dopr.analysis.stats import (Interval, bootstrap_spearman, higher_is_better, is_log_scale, mean_interval,
                                 paired_difference, spearman_of_arm_means)
from dopr.analysis.sweep import Sweep, finite_or_none

PICKS = ("best", "final", "valpick")  # which checkpoint of a run a value is read at
PICK_WORDS = {"best": "best checkpoint by the metric itself", "final": "last evaluation",
              "valpick": "checkpoint with the lowest val/loss"}
ROOT = Path(__file__).resolve().parents[2]


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of ``frame`` as it stands (format cells before)."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def fmt_cell(value):
    """A table cell: floats to 4 significant digits, NaN (not recorded / not applicable) empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return value


def _side(runs: pd.DataFrame, column: str, label: str) -> dict:
    """seed -> value for one side of a comparison; a seed twice means the cell is under-specified."""
    counts = runs["seed"].value_counts()
    if (counts > 1).any():
        raise SystemExit(f"{label}: seed {counts.idxmax()} appears {counts.max()} times; add the setting that tells "
                         f"those runs apart to cell_keys= or ap_keys= (e.g. opt.lr)")
    return dict(zip(runs["seed"], runs[column]))


def _setting_label(row: pd.Series | dict, keys: list[str]) -> str:
    parts = [f"{k.removeprefix('opt.')}={row[k]:g}" if isinstance(row[k], float) else f"{k.removeprefix('opt.')}={row[k]}"
             for k in keys if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))]
    return ", ".join(parts) or "default"


def paired_cells(runs: pd.DataFrame, metric: str, better: bool, cell_keys: list[str], ap_keys: list[str],
                 picks=PICKS) -> pd.DataFrame:
    """DoPr minus base paired by seed in every cell: same task, stage, GP and ``cell_keys`` (settings both
    sides share, e.g. opt.lr); each DoPr setting of ``ap_keys`` (e.g. opt.ap.damping) is its own row
    against the same base runs."""
    rows = []
    group_keys = ["task", "stage", "gp"] + cell_keys
    for cell, members in runs.groupby(group_keys, dropna=False, sort=True):
        cell = dict(zip(group_keys, cell if isinstance(cell, tuple) else (cell,)))
        base = members[~members["ap"]]
        if base.empty:
            continue
        for setting, dopr in members[members["ap"]].groupby(ap_keys, dropna=False, sort=True) if ap_keys \
                else [((), members[members["ap"]])]:
            if dopr.empty:
                continue
            setting = dict(zip(ap_keys, setting if isinstance(setting, tuple) else (setting,)))
            for pick in picks:
                column = f"{pick}/{metric}"
                if column not in members:
                    continue
                label = f"{cell} {setting}"
                result = paired_difference(_side(dopr, column, f"DoPr runs of {label}"),
                                           _side(base, column, f"base runs of {label}"), metric, better)
                rows.append({**cell, **setting, "dopr": dopr["opt.name"].iloc[0], "base": base["opt.name"].iloc[0],
                             "pick": pick, **result.as_row()})
    return pd.DataFrame(rows)


def choose_settings(runs: pd.DataFrame, metric: str, better: bool, setting_keys: list[str]) -> pd.DataFrame:
    """Per optimizer, on the tuning seeds: the setting with the best mean ``best/<metric>`` (the paper's
    rule) and the one with the lowest mean ``best/val/loss`` (what picking by val loss gives), with the
    test metric each setting reaches."""
    tune = runs[runs["stage"] == "tune"]
    keys = [k for k in setting_keys if k in tune]
    rows = []
    for (task, opt), group in tune.groupby(["task", "opt.name"], sort=True, dropna=False):
        cells = group.groupby(keys, dropna=False).agg(
            test=(f"best/{metric}", "mean"), val=("best/val/loss", "mean"), seeds=("seed", "nunique")).reset_index()
        by_test = cells.loc[cells["test"].idxmax() if better else cells["test"].idxmin()]
        by_val = cells.loc[cells["val"].idxmin()]
        rows.append({"task": task, "opt.name": opt, **{k: by_test[k] for k in keys},
                     f"best/{metric}": by_test["test"], "seeds": int(by_test["seeds"]),
                     "settings tried": len(cells), "at edge of grid": _at_edge(cells, keys, by_test),
                     "by val/loss": _setting_label(by_val, keys), f"best/{metric} there": by_val["test"]})
    return pd.DataFrame(rows)


def _at_edge(cells: pd.DataFrame, keys: list[str], chosen: pd.Series) -> str:
    """Which swept settings the choice sits at the edge of (STUDIES §2 asks to extend such a grid)."""
    edges = []
    for k in keys:
        values = sorted(cells[k].dropna().unique())
        if len(values) >= 2 and chosen[k] in (values[0], values[-1]):
            edges.append(k.removeprefix("opt."))
    return ", ".join(edges) or "no"


def _at_choice(group: pd.DataFrame, name: str, pick_row, keys: list[str], stage: str) -> pd.DataFrame:
    """``name``'s runs in ``group`` at the setting chosen for it on the tuning seeds (all of them when
    nothing was chosen); runs at another setting only are an error, not a silent empty side."""
    side = group[group["opt.name"] == name]
    if pick_row is None:
        return side
    for k in keys:
        value = pick_row[k]
        side = side[side[k].isna()] if isinstance(value, float) and math.isnan(value) else side[side[k] == value]
    if side.empty:
        ran = group.loc[group["opt.name"] == name, keys].drop_duplicates().to_dict("records")
        raise SystemExit(f"{stage} runs of {name} are not at the setting chosen on the tuning seeds "
                         f"({_setting_label(pick_row, keys)}); they ran {ran}")
    return side


def _comparison_pool(runs: pd.DataFrame, choice: pd.DataFrame, setting_keys: list[str]):
    """What every comparison at the chosen settings reads: the stage (verdict when it ran, else tune),
    that stage's runs, the setting keys recorded, and each (task, optimizer)'s chosen row."""
    stage = "verdict" if (runs["stage"] == "verdict").any() else "tune"
    chosen = {(r["task"], r["opt.name"]): r for _, r in choice.iterrows()}
    return stage, runs[runs["stage"] == stage], [k for k in setting_keys if k in runs], chosen


def headline_comparison(runs: pd.DataFrame, metric: str, better: bool, choice: pd.DataFrame,
                        setting_keys: list[str], pick: str = "best") -> pd.DataFrame:
    """Each GP against DoPr with it, both at their chosen settings, paired by seed: on the verdict seeds
    when there are any, else on the tuning seeds (then flagged: the choice flatters both arms)."""
    stage, pool, keys, chosen = _comparison_pool(runs, choice, setting_keys)
    rows = []
    for (task, gp), group in pool.groupby(["task", "gp"], sort=True, dropna=False):
        names = {bool(a): n for a, n in group.groupby("ap")["opt.name"].first().items()}
        if set(names) != {False, True}:
            continue
        sides = {ap: _at_choice(group, name, chosen.get((task, name)), keys, stage) for ap, name in names.items()}
        column = f"{pick}/{metric}"
        result = paired_difference(_side(sides[True], column, f"{names[True]} at its chosen setting"),
                                   _side(sides[False], column, f"{names[False]} at its chosen setting"), metric, better)
        rows.append({"task": task, "gp": gp, "stage": stage, "pick": pick,
                     "base setting": _setting_label(sides[False].iloc[0], keys) if len(sides[False]) else "",
                     "dopr setting": _setting_label(sides[True].iloc[0], keys) if len(sides[True]) else "",
                     **result.as_row()})
    return pd.DataFrame(rows)


def _band_verdict(intervals: list[Interval], margin: float) -> str:
    """Equivalence within +-margin: "held" when every 95% interval lies inside the band (stricter than
    the two one-sided tests' 90% interval), "reversed" when some interval lies wholly outside it,
    "inconclusive" otherwise."""
    if all(math.isfinite(i.low) and math.isfinite(i.high) and -margin <= i.low and i.high <= margin for i in intervals):
        return "held"
    if any(i.low > margin or i.high < -margin for i in intervals):
        return "reversed"
    return "inconclusive"


def paper_observations(runs: pd.DataFrame, metric: str, better: bool, choice: pd.DataFrame,
                       setting_keys: list[str], headline: pd.DataFrame, similar_margin: float = 0.1) -> pd.DataFrame:
    """The paper's three Fig. 7 observations, each with a verdict word, from the runs at the chosen settings:

    1. The base GPs reach similar ``metric``: every pair of base GPs, paired by seed (best checkpoint),
       has its 95% interval inside +-``similar_margin`` x the best base GP's mean (held; a ratio metric's
       band is +-``similar_margin`` in log units), some pair's interval lies wholly outside it (reversed),
       else inconclusive. Needs two base GPs.
    2. DoPr improves ``metric`` for every GP: held when every pair's headline verdict is held, reversed
       when any is reversed, else inconclusive.
    3. Val loss does not track the test metric: per GP, DoPr's val/loss verdict (last evaluation) against
       its metric verdict; "opposite" when both are decisive and disagree, "same" when both are decisive
       and agree. Held when some GP is opposite, reversed when every GP is same, else inconclusive.
    """
    stage, pool, keys, chosen = _comparison_pool(runs, choice, setting_keys)
    rows = []
    for task, group in pool.groupby("task", sort=True):
        bases = sorted(group.loc[~group["ap"].astype(bool), "opt.name"].unique())
        if len(bases) >= 2:
            sides = {b: _side(_at_choice(group, b, chosen.get((task, b)), keys, stage), f"best/{metric}", b) for b in bases}
            means = {b: mean_interval(list(v.values())).mean for b, v in sides.items()}
            best = (max if better else min)(means, key=lambda b: means[b])
            margin = similar_margin if is_log_scale(metric) else similar_margin * abs(means[best])
            pairs = [(a, b, paired_difference(sides[a], sides[b], metric, better))
                     for i, a in enumerate(bases) for b in bases[i + 1:]]
            word = _band_verdict([r.diff for _, _, r in pairs], margin)
            evidence = (f"means {', '.join(f'{b} {means[b]:.4g}' for b in bases)}; band ±{margin:.3g}; "
                        + "; ".join(f"{a}−{b} {r.diff.format()}" for a, b, r in pairs))
        else:
            word, evidence = "not tested", f"one base GP ({', '.join(bases)})"
        rows.append({"task": task, "observation": f"1. the base GPs reach similar {metric}", "verdict": word,
                     "evidence": evidence})

        mine = headline[(headline["task"] == task) & (headline["stage"] == stage)]
        test = mine[(mine["metric"] == metric) & (mine["pick"] == "best")].set_index("gp")
        val = mine[(mine["metric"] == "val/loss") & (mine["pick"] == "final")].set_index("gp")
        words = list(test["verdict"])
        word = ("held" if words and all(w == "held" for w in words) else
                "reversed" if "reversed" in words else "inconclusive")
        # a GP run without its DoPr arm (a plan's budget cut) is named, so "every GP" reads as every GP tested
        unpaired = sorted(gp for gp, arms in group.groupby("gp", dropna=False)["ap"] if arms.astype(bool).nunique() < 2)
        rows.append({"task": task, "observation": f"2. DoPr improves {metric} for every GP", "verdict": word,
                     "evidence": "; ".join([f"{gp}: {Interval(r['diff'], r['low'], r['high'], r['n']).format()} ({r['verdict']})"
                                            for gp, r in test.iterrows()] + [f"{gp}: no DoPr run" for gp in unpaired])})

        relations = {}
        for gp, r in test.iterrows():
            if gp not in val.index:
                continue
            t, v = r["verdict"], val.loc[gp, "verdict"]
            decisive = t != "inconclusive" and v != "inconclusive"
            relations[gp] = (("same" if t == v else "opposite") if decisive else "undecided", t, v)
        kinds = [k for k, _, _ in relations.values()]
        word = ("held" if "opposite" in kinds else
                "reversed" if kinds and all(k == "same" for k in kinds) else "inconclusive")
        rows.append({"task": task, "observation": f"3. val/loss does not track {metric} between DoPr and its GP",
                     "verdict": word,
                     "evidence": "; ".join(f"{gp}: val/loss {v}, {metric} {t} ({k})" for gp, (k, t, v) in relations.items())})
    return pd.DataFrame(rows)


def arms_spearman(runs: pd.DataFrame, metric: str, choice: pd.DataFrame, setting_keys: list[str],
                  predictors=("val/loss",), resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Across every optimizer of a task (GPs and DoPr alike) at its chosen setting: Spearman rho of each
    arm's mean final one-step ``predictor`` against its mean best-checkpoint ``metric``, over the verdict
    seeds (the tuning seeds, when there are none), with a bootstrap over seeds. Does the arm that fits the
    data better deploy better, across optimizers? (Within one GP and its DoPr, ``headline_comparison``
    answers it.) ``arms`` lists each arm's two means, in the predictor's order."""
    stage, pool, keys, chosen = _comparison_pool(runs, choice, setting_keys)
    rows = []
    for task, group in pool.groupby("task", sort=True):
        arms = sorted(group["opt.name"].unique())
        sides = {a: _at_choice(group, a, chosen.get((task, a)), keys, stage).set_index("seed") for a in arms}
        seeds = sorted(set().union(*(side.index for side in sides.values())))

        def by_seed(column: str) -> np.ndarray:  # arms x seeds, NaN where an arm lacks a seed
            return np.array([[sides[a][column].get(s, math.nan) for s in seeds] for a in arms], dtype=float)

        outcome = by_seed(f"best/{metric}")
        for predictor in predictors:
            column = f"final/{predictor}"
            if column not in runs:
                continue
            fit = by_seed(column)
            result = spearman_of_arm_means(fit, outcome, resamples, seed)
            means = sorted(zip(np.nanmean(fit, axis=1), np.nanmean(outcome, axis=1), arms))
            rows.append({"task": task, "stage": stage, "predictor": predictor, "arms n": result.n,
                         "seeds": len(seeds), "rho": result.rho, "low": result.low, "high": result.high,
                         "p": result.p_value,
                         "arms": "; ".join(f"{a} {f:.3g} → {m:.4g}" for f, m, a in means)})
    return pd.DataFrame(rows)


def spearman_table(runs: pd.DataFrame, metric: str, predictors=("val/loss",), resamples: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """Per optimizer over its runs (lr grid x seeds), and over all runs: Spearman rho of each final one-step
    ``predictor`` (val/loss first) against the final test metric, with a seeded bootstrap interval over
    runs (STUDIES §3's decoupling statistic)."""
    rows = []
    groups = [(name, group) for name, group in runs.groupby("opt.name", sort=True)] + [("all", runs)]
    for predictor in predictors:
        column = f"final/{predictor}"
        if column not in runs:
            raise SystemExit(f"predictor {predictor} is not recorded; recorded: "
                             f"{[c.removeprefix('final/') for c in runs if c.startswith('final/')]}")
        for name, group in groups:
            result = bootstrap_spearman(group[column], group[f"final/{metric}"], resamples, seed)
            rows.append({"predictor": predictor, "opt.name": name, "n": result.n, "rho": result.rho,
                         "low": result.low, "high": result.high, "p": result.p_value})
    return pd.DataFrame(rows)


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


def format_paired(table: pd.DataFrame, lead: list[str]) -> pd.DataFrame:
    """Paired rows as display cells: Δ ± half-width (with 'log' for log ratios), means, fraction, verdict."""
    shown = table[lead].copy() if len(table) else pd.DataFrame(columns=lead)
    for k in lead:
        if k in shown and shown[k].dtype == float:
            shown[k] = shown[k].map(lambda v: "" if math.isnan(v) else f"{v:g}")
    if not len(table):
        return shown
    shown["n"] = table["n"]
    shown["base mean"] = table["base_mean"].map(fmt)
    shown["DoPr mean"] = table["dopr_mean"].map(fmt)
    shown["Δ (DoPr − base)"] = [("log ratio " if s == "log" else "") + Interval(d, lo, hi, n).format()
                                for s, d, lo, hi, n in zip(table["scale"], table["diff"], table["low"], table["high"],
                                                           table["n"])]
    shown["DoPr better"] = table["dopr_better_fraction"].map(lambda f: "n/a" if math.isnan(f) else f"{f:.0%}")
    shown["verdict"] = table["verdict"]
    return shown


def data_commit(path: Path) -> dict:
    """The commit that first added a committed data file, following renames (what is known when no run
    recorded its SHA: the runs were made at or before it)."""
    try:
        out = subprocess.run(["git", "log", "--follow", "--diff-filter=A", "--format=%H %cI", "--", str(path)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        return {"sha": out[-2], "date": out[-1]} if out else {"sha": None, "date": None}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "date": None}


def provenance(sweep: Sweep, runs: pd.DataFrame, commands: list[str], analysis_command: str,
               tune_seeds: list, verdict_seeds: list, notes: list[str]) -> dict:
    """provenance.json (STUDIES §5): commands, git SHAs with dirty flags, machine, dates, seeds, versions,
    threads, and the runs left out with the reason. What the records lack is said, not filled in."""
    per_run = sweep.evals.groupby("run").first()
    not_recorded = ("not recorded: the source is an aggregated CSV made before evals.csv carried it; the run dirs "
                    "(multirun/) were never committed")

    def recorded(column):
        if column not in per_run or per_run[column].isna().all():
            return None
        return per_run[column].dropna()

    shas = recorded("git.sha")
    if shas is None:
        sources = [Path(p) for p in sweep.source.split(",") if not Path(p).is_dir()]
        run_git = {"runs per sha": not_recorded, "data first committed in": {str(p): data_commit(p) for p in sources}}
    else:
        dirty = per_run.loc[shas.index, "git.dirty"].map(lambda d: str(d).lower() == "true")
        run_git = {"runs per sha": dict(Counter(f"{sha}{' (dirty)' if d else ''}" for sha, d in zip(shas, dirty)))}
    versions, threads, machines, dates = (recorded(c) for c in ("versions", "threads", "machine", "date"))
    run_versions = [json.loads(v) for v in sorted(set(versions))] if versions is not None else not_recorded
    run_threads = sorted({str(int(float(t))) for t in threads}) if threads is not None else not_recorded
    run_machine = [json.loads(m) for m in sorted(set(machines))] if machines is not None else (
        not_recorded if shas is None else "not recorded in summary.json")
    run_dates = {"first": min(dates), "last": max(dates)} if dates is not None else not_recorded
    left_out = list(sweep.left_out)
    return {
        "study": runs["study"].iloc[0] if len(runs) else None,
        "sources": sweep.source.split(","),
        "commands": {"sweep": commands, "analysis": analysis_command},
        "git": run_git,
        "versions": run_versions,
        "run dates": run_dates,
        "run machine": run_machine,
        "threads": run_threads,
        "analysis machine": machine(),
        "analysis date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": {"tune": [finite_or_none(s) for s in tune_seeds], "verdict": [finite_or_none(s) for s in verdict_seeds]},
        "runs tabled": int(len(runs)),
        "left out": {"count": len(left_out), "runs": left_out},
        "notes": notes,
    }


def keep_analysis_date_if_unchanged(prov: dict, path: Path) -> None:
    """A re-analysis that changes nothing else keeps the committed provenance.json's analysis date, so
    re-running every study's command leaves no diff where no record changed."""
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return
    new = json.loads(json.dumps(prov, default=str))
    date = "analysis date"
    if date in old and {k: v for k, v in old.items() if k != date} == {k: v for k, v in new.items() if k != date}:
        prov[date] = old[date]


def missing_values(runs: pd.DataFrame, metric: str) -> list[dict]:
    """Runs kept in runs.csv whose value of a reported column is NaN: they drop out of that statistic."""
    out = []
    for pick in PICKS:
        column = f"{pick}/{metric}"
        if column in runs:
            for run in runs.loc[runs[column].isna(), "run"]:
                out.append({"run": run, "why": f"{column} is missing (NaN); left out of its paired differences"})
    return out


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


def readme_row(study: str, claim: str, metric: str, headline: pd.DataFrame, readme: str) -> dict:
    """The study's line of the top README's results table: per GP, Δ and verdict at the chosen settings."""
    if headline.empty:
        return {"study": study, "claim": claim, "metric": metric, "result": "no DoPr/base pair", "seeds": "",
                "readme": readme}
    stage = headline["stage"].iloc[0]
    parts = []
    for row in headline.itertuples():
        delta = Interval(row.diff, row.low, row.high, row.n).format()
        parts.append(f"{row.gp}: {'log ratio ' if row.scale == 'log' else ''}{delta} ({row.verdict})")
    seeds = sorted({s for cell in headline["seeds"] for s in str(cell).split(",") if s}, key=lambda s: float(s))
    return {"study": study, "claim": claim, "metric": f"{headline['pick'].iloc[0]}/{metric}",
            "result": "; ".join(parts),
            "seeds": f"{','.join(seeds)} ({'fresh verdict seeds' if stage == 'verdict' else 'tuning seeds only: no fresh-seed verdict'})",
            "readme": readme}


def metric_direction(metric: str, sweep: Sweep) -> bool:
    """The headline's direction: the runs' own summary.json statement when they made one, else the name rule."""
    stated = {s.get("higher_is_better") for s in sweep.headlines if s.get("headline_metric") == metric}
    stated.discard(None)
    if len(stated) > 1:
        raise SystemExit(f"runs disagree on whether higher {metric} is better ({stated}); they are not one study")
    better = stated.pop() if stated else higher_is_better(metric)
    if better is None:
        raise SystemExit(f"metric={metric} has no known better direction; use a metric named for it "
                         f"(return, success, exact_match, loss, cost, error, ...)")
    return bool(better)
