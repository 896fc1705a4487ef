"""A study's comparisons and verdicts from its runs.csv: paired DoPr-minus-base cells, the settings each
optimizer would be tuned to (by the test metric and by val loss), the headline comparison with its verdict
word, the paper's three observations, Spearman decoupling (per optimizer and across arms), the headline's
direction and the study's row of the top README.

Every comparison a study README quotes comes from these functions (``dopr.analysis.results`` calls them);
the tables' text comes from ``dopr.analysis.markdown``, provenance.json from ``dopr.analysis.provenance`` and
the figures from ``dopr.analysis.figures``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dopr.analysis.stats import (Interval, bootstrap_spearman, higher_is_better, is_log_scale, mean_interval,
                                 paired_difference, spearman_of_arm_means)
from dopr.analysis.sweep import PICKS, Sweep


def _side(runs: pd.DataFrame, column: str, label: str) -> dict:
    """seed -> value for one side of a comparison; a seed twice means the cell is under-specified."""
    counts = runs["seed"].value_counts()
    if (counts > 1).any():
        raise SystemExit(f"{label}: seed {counts.idxmax()} appears {counts.max()} times; add the setting that tells "
                         f"those runs apart to cell_keys= or ap_keys= (e.g. opt.lr)")
    return dict(zip(runs["seed"], runs[column]))


def setting_label(row: pd.Series | dict, keys: list[str]) -> str:
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
                     "by val/loss": setting_label(by_val, keys), f"best/{metric} there": by_val["test"]})
    return pd.DataFrame(rows)


def _at_edge(cells: pd.DataFrame, keys: list[str], chosen: pd.Series) -> str:
    """Which swept settings the choice sits at the edge of (STUDIES §2 asks to extend such a grid)."""
    edges = []
    for k in keys:
        values = sorted(cells[k].dropna().unique())
        if len(values) >= 2 and chosen[k] in (values[0], values[-1]):
            edges.append(k.removeprefix("opt."))
    return ", ".join(edges) or "no"


def at_choice(group: pd.DataFrame, name: str, pick_row, keys: list[str], stage: str) -> pd.DataFrame:
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
                         f"({setting_label(pick_row, keys)}); they ran {ran}")
    return side


def comparison_pool(runs: pd.DataFrame, choice: pd.DataFrame, setting_keys: list[str]):
    """What every comparison at the chosen settings reads: the stage (verdict when it ran, else tune),
    that stage's runs, the setting keys recorded, and each (task, optimizer)'s chosen row."""
    stage = "verdict" if (runs["stage"] == "verdict").any() else "tune"
    chosen = {(r["task"], r["opt.name"]): r for _, r in choice.iterrows()}
    return stage, runs[runs["stage"] == stage], [k for k in setting_keys if k in runs], chosen


def headline_comparison(runs: pd.DataFrame, metric: str, better: bool, choice: pd.DataFrame,
                        setting_keys: list[str], pick: str = "best") -> pd.DataFrame:
    """Each GP against DoPr with it, both at their chosen settings, paired by seed: on the verdict seeds
    when there are any, else on the tuning seeds (then flagged: the choice flatters both arms)."""
    stage, pool, keys, chosen = comparison_pool(runs, choice, setting_keys)
    rows = []
    for (task, gp), group in pool.groupby(["task", "gp"], sort=True, dropna=False):
        names = {bool(a): n for a, n in group.groupby("ap")["opt.name"].first().items()}
        if set(names) != {False, True}:
            continue
        sides = {ap: at_choice(group, name, chosen.get((task, name)), keys, stage) for ap, name in names.items()}
        column = f"{pick}/{metric}"
        result = paired_difference(_side(sides[True], column, f"{names[True]} at its chosen setting"),
                                   _side(sides[False], column, f"{names[False]} at its chosen setting"), metric, better)
        rows.append({"task": task, "gp": gp, "stage": stage, "pick": pick,
                     "base setting": setting_label(sides[False].iloc[0], keys) if len(sides[False]) else "",
                     "dopr setting": setting_label(sides[True].iloc[0], keys) if len(sides[True]) else "",
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
    stage, pool, keys, chosen = comparison_pool(runs, choice, setting_keys)
    rows = []
    for task, group in pool.groupby("task", sort=True):
        bases = sorted(group.loc[~group["ap"].astype(bool), "opt.name"].unique())
        if len(bases) >= 2:
            sides = {b: _side(at_choice(group, b, chosen.get((task, b)), keys, stage), f"best/{metric}", b) for b in bases}
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
    stage, pool, keys, chosen = comparison_pool(runs, choice, setting_keys)
    rows = []
    for task, group in pool.groupby("task", sort=True):
        arms = sorted(group["opt.name"].unique())
        sides = {a: at_choice(group, a, chosen.get((task, a)), keys, stage).set_index("seed") for a in arms}
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
