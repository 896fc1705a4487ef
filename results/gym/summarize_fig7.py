"""Summarize the gym_fig7 sweep: per-GP comparison of DoPr (AP on) vs the plain GP.

    python results/gym/summarize_fig7.py multirun/gym_fig7 --out results/gym

Reads every run's summary.json + metrics.jsonl (final eval point) and writes
  fig7_by_lr.md     mean ± 95% t-CI over seeds of return, val loss, train-set loss, state shift per (optimizer, lr)
  fig7_best_lr.md   each optimizer at its best lr (by mean final return), and DoPr - GP differences
                    paired by seed with a 95% CI, for return, val loss and train-set loss
  fig7.png          return / val loss / train-set loss vs lr, one panel row per GP
With --holdout <dir> (runs on fresh seeds at each optimizer's best lr, chosen on the main sweep):
  fig7_holdout.md   the same DoPr − GP comparison on those seeds only, free of lr-selection bias
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

GPS = ["adamw", "muon", "signum", "adamuon"]
METRICS = {"test/return": "return", "val/loss": "val loss", "val/train_set_loss": "train-set loss",
           "train/loss": "train loss (raw model, run avg)", "test/state_shift": "state shift (KL)"}


def load_final(sweep: Path) -> pd.DataFrame:
    rows = []
    for summary_path in sorted(sweep.rglob("summary.json")):
        config = json.loads(summary_path.read_text()).get("config", {})
        lines = [json.loads(l) for l in (summary_path.parent / "metrics.jsonl").read_text().splitlines() if l.strip()]
        if not lines:
            continue
        last = max(lines, key=lambda r: r["step"])
        last = {k: v for k, v in last.items() if k != "lr"}  # the scheduled lr at the end (0 for cosine)
        rows.append({**last, "opt": config["opt"]["name"], "lr": float(config["opt"]["lr"]), "seed": int(config["seed"])})
    if not rows:
        raise SystemExit(f"no finished runs under {sweep}")
    return pd.DataFrame(rows)


def mean_ci(x) -> tuple[float, float, int]:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan, len(x)
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))), len(x)


def fmt(mean: float, half: float, digits: int = 4) -> str:
    return f"{mean:.{digits}g} ± {half:.2g}" if half == half else f"{mean:.{digits}g}"


def by_lr_table(df: pd.DataFrame) -> str:
    cols = [m for m in METRICS if m in df]
    lines = ["| optimizer | lr | seeds | " + " | ".join(METRICS[m] for m in cols) + " |", "|" + "---|" * (3 + len(cols))]
    for (opt, lr), g in sorted(df.groupby(["opt", "lr"]), key=lambda t: (GPS.index(t[0][0].removeprefix("dopr_")), t[0][0].startswith("dopr_"), t[0][1])):
        cells = [fmt(*mean_ci(g[m])[:2]) for m in cols]
        lines.append(f"| {opt} | {lr:g} | {g.seed.nunique()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_lr(df: pd.DataFrame, opt: str) -> float | None:
    sub = df[df.opt == opt]
    return None if sub.empty else float(sub.groupby("lr")["test/return"].mean().idxmax())


def paired_diff(df: pd.DataFrame, a: str, lr_a: float, b: str, lr_b: float, metric: str):
    x = df[(df.opt == a) & (df.lr == lr_a)].set_index("seed")[metric]
    y = df[(df.opt == b) & (df.lr == lr_b)].set_index("seed")[metric]
    common = x.index.intersection(y.index)
    return mean_ci((x[common] - y[common]).to_numpy())


def best_lr_table(df: pd.DataFrame) -> tuple[str, dict]:
    lines = ["| GP | lr (GP / DoPr) | return GP | return DoPr | Δreturn (DoPr−GP, paired) | val loss GP | val loss DoPr | Δval loss | train-set loss GP | train-set loss DoPr | Δtrain-set loss |",
             "|" + "---|" * 11]
    verdicts = {}
    for gp in GPS:
        dopr = f"dopr_{gp}"
        lr_g, lr_d = best_lr(df, gp), best_lr(df, dopr)
        if lr_g is None or lr_d is None:
            continue
        cell = lambda o, lr, m: fmt(*mean_ci(df[(df.opt == o) & (df.lr == lr)][m])[:2])  # noqa: E731
        diffs = {m: paired_diff(df, dopr, lr_d, gp, lr_g, m) for m in ("test/return", "val/loss", "val/train_set_loss")}
        verdicts[gp] = diffs
        lines.append(f"| {gp} | {lr_g:g} / {lr_d:g} | {cell(gp, lr_g, 'test/return')} | {cell(dopr, lr_d, 'test/return')} | "
                     f"{fmt(*diffs['test/return'][:2])} | {cell(gp, lr_g, 'val/loss')} | {cell(dopr, lr_d, 'val/loss')} | "
                     f"{fmt(*diffs['val/loss'][:2])} | {cell(gp, lr_g, 'val/train_set_loss')} | "
                     f"{cell(dopr, lr_d, 'val/train_set_loss')} | {fmt(*diffs['val/train_set_loss'][:2])} |")
    return "\n".join(lines), verdicts


def per_lr_wins(df: pd.DataFrame) -> str:
    """At every shared lr: how often DoPr's mean return / val loss / train-set loss beats the GP's."""
    lines = ["| GP | lr | Δreturn (DoPr−GP, paired) | Δval loss | Δtrain-set loss |", "|---|---|---|---|---|"]
    for gp in GPS:
        for lr in sorted(set(df[df.opt == gp].lr) & set(df[df.opt == f"dopr_{gp}"].lr)):
            d = [paired_diff(df, f"dopr_{gp}", lr, gp, lr, m) for m in ("test/return", "val/loss", "val/train_set_loss")]
            lines.append(f"| {gp} | {lr:g} | " + " | ".join(fmt(*x[:2]) for x in d) + " |")
    return "\n".join(lines)


def correlations(df: pd.DataFrame) -> str:
    """Spearman rank correlation, across all runs, of the final return with each one-step metric."""
    lines = ["| metric | Spearman ρ with final return (all runs) | p-value |", "|---|---|---|"]
    for metric in ("val/loss", "val/train_set_loss", "train/loss", "test/state_shift"):
        if metric in df:
            rho, p = stats.spearmanr(df[metric], df["test/return"], nan_policy="omit")
            lines.append(f"| {METRICS[metric]} | {rho:.3f} | {p:.2g} |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("test/return", "final return"), ("val/loss", "val loss (held-out demos)"), ("val/train_set_loss", "train-set loss")]
    fig, axes = plt.subplots(len(panels), len(GPS), figsize=(4 * len(GPS), 3 * len(panels)), squeeze=False)
    for j, gp in enumerate(GPS):
        for i, (metric, label) in enumerate(panels):
            ax = axes[i][j]
            for opt, style in ((gp, "o--"), (f"dopr_{gp}", "s-")):
                sub = df[df.opt == opt]
                if sub.empty:
                    continue
                lrs = sorted(sub.lr.unique())
                stats_ = [mean_ci(sub[sub.lr == lr][metric]) for lr in lrs]
                ax.errorbar(lrs, [s[0] for s in stats_], yerr=[0 if s[1] != s[1] else s[1] for s in stats_],
                            fmt=style, capsize=3, label=opt)
            ax.set_xscale("log")
            ax.minorticks_off()
            lrs_all = sorted(df.lr.unique())
            ax.set_xticks(lrs_all, [f"{lr:g}" for lr in lrs_all])
            if metric != "test/return":
                ax.set_yscale("log")
            ax.set_xlabel("lr")
            ax.set_title(f"{gp}: {label}", fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/gym"))
    parser.add_argument("--holdout", type=Path, default=None, help="sweep of fresh seeds at the chosen lrs")
    args = parser.parse_args()
    df = load_final(args.sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "fig7_final.csv", index=False)
    (args.out / "fig7_by_lr.md").write_text(by_lr_table(df) + "\n")
    table, verdicts = best_lr_table(df)
    (args.out / "fig7_best_lr.md").write_text(table + "\n\nPaired (same seed) DoPr − GP differences at every lr:\n\n"
                                              + per_lr_wins(df) + "\n\n" + correlations(df) + "\n")
    plot(df, args.out / "fig7.png")
    print(by_lr_table(df), "\n")
    print(table, "\n")
    print(per_lr_wins(df), "\n")
    print(correlations(df))
    if args.holdout is not None:
        held = load_final(args.holdout)
        held.to_csv(args.out / "fig7_holdout_final.csv", index=False)
        chosen = {opt: best_lr(df, opt) for opt in sorted(df.opt.unique())}
        ran = {opt: sorted(held[held.opt == opt].lr.unique()) for opt in sorted(held.opt.unique())}
        mismatch = {o: (chosen.get(o), lrs) for o, lrs in ran.items() if lrs != [chosen.get(o)]}
        if mismatch:
            raise SystemExit(f"holdout runs are not at the lrs chosen on the main sweep: {mismatch}")
        text, _ = best_lr_table(held)
        seeds = sorted(held.seed.unique())
        (args.out / "fig7_holdout.md").write_text(f"Fresh seeds {seeds}, each optimizer at the lr chosen on the main sweep:\n\n{text}\n")
        print(f"\nholdout (seeds {seeds}):\n{text}")
    print(f"\n{len(df)} runs; wrote {args.out}/fig7_final.csv, fig7_by_lr.md, fig7_best_lr.md, fig7.png")


if __name__ == "__main__":
    main()
