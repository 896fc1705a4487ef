#!/usr/bin/env python
"""Validation loss against exact match for an lm_arith sweep (the paper's Figure 10 analog).

    python scripts/plot_lm.py sweep=multirun/lm_arith_lr_sweep out=results/lm
    python scripts/plot_lm.py sweep=results/lm/evals.csv out=results/lm     # from the committed evals.csv
    python scripts/plot_lm.py help

Reads every finished run under the sweep dir (summary.json and metrics.jsonl), or an evals.csv written by
scripts/aggregate.py, and writes to out= (default: the sweep dir, or next to the CSV):
  final_points.csv          one row per run: optimizer, lr, seed, final val/loss and test metrics
  spearman.csv, spearman.md Spearman rank correlation between val/loss and each accuracy, per
                            optimizer, with a seeded 95% bootstrap interval over points: final points
                            across lr x seed, final points within each lr (seed-to-seed only), and
                            every eval point
  residual_vs_val_loss.{csv,md}  accuracy beyond what val loss predicts, per optimizer (pooled
                            linear fit of accuracy on log10 val loss; mean residual +- 95% CI)
  val_loss_vs_exact_match.png  scatter: greedy and sampled exact match against val/loss

Under the paper's claim, accuracy falls as val loss rises for DoPr (rho strongly negative) but not
reliably for AdamW (rho weaker, or positive).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dopr.analysis import bootstrap_spearman, mean_interval, read_sweep
from dopr.cli import parse_script_args

ACCURACIES = ("test/exact_match", "test/exact_match_sampled", "test/exact_match_len4")


@dataclass
class PlotLMArgs:
    sweep: str
    out: str | None = None  # default: the sweep dir, or the CSV's folder


def load_runs(source: Path) -> pd.DataFrame:
    """One row per (run, evaluation point) with optimizer name, lr and seed, from a sweep dir or evals.csv."""
    evals = read_sweep(source).evals
    if "test/exact_match" not in evals:
        raise SystemExit(f"sweep={source}: no test/exact_match; is it an lm_arith sweep?")
    evals = evals.dropna(subset=["val/loss", "test/exact_match"])
    return evals.rename(columns={"opt.name": "opt", "opt.lr": "lr"}).reset_index(drop=True)


def spearman_table(points: pd.DataFrame, label: str, within_lr: bool = False) -> list[dict]:
    """Spearman rho between val/loss and each accuracy, per optimizer and pooled.

    ``within_lr``: first subtract each (optimizer, lr) cell's mean from both quantities, so that only
    seed-to-seed differences at fixed hyperparameters count: does the lower-val-loss seed also
    generate better? (The across-lr correlation is dominated by under- vs well-trained runs.)
    """
    if within_lr:
        points = points.copy()
        for column in ("val/loss",) + ACCURACIES:
            if column in points:
                points[column] = points[column] - points.groupby(["opt", "lr"])[column].transform("mean")
    out = []
    groups = list(points.groupby("opt")) + [("all optimizers", points)]
    for opt, group in groups:
        for metric in ACCURACIES:
            if metric not in group:
                continue
            result = bootstrap_spearman(group["val/loss"], group[metric])
            out.append({"points": label, "opt": opt, "accuracy": metric, "n": result.n, "spearman_rho": result.rho,
                        "low": result.low, "high": result.high, "p_value": result.p_value})
    return out


def residual_table(final: pd.DataFrame) -> list[dict]:
    """Accuracy beyond what val loss predicts: fit accuracy ~ a + b*log10(val/loss) on all final points
    (both optimizers pooled), then each optimizer's mean residual with a 95% t-interval. A positive
    residual means more test-time accuracy than runs of the same validation loss get on average."""
    out = []
    for metric in ACCURACIES:
        if metric not in final:
            continue
        x = np.log10(final["val/loss"].to_numpy(dtype=float))
        y = final[metric].to_numpy(dtype=float)
        slope, intercept = np.polyfit(x, y, 1)
        residual = pd.Series(y - (intercept + slope * x), index=final.index)
        for opt, idx in final.groupby("opt").groups.items():
            interval = mean_interval(residual.loc[idx])
            out.append({"accuracy": metric, "opt": opt, "n": interval.n, "mean_residual": interval.mean,
                        "ci95": interval.half_width})
    return out


def plot(final: pd.DataFrame, every: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("test/exact_match", "test/exact_match_sampled") if m in final]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    colors = dict(zip(sorted(final["opt"].unique()), ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    markers = dict(zip(sorted(final["lr"].unique()), "os^Dv"))
    for ax, metric in zip(axes[0], metrics):
        early = every[~every.index.isin(final.index)]
        for opt, group in early.groupby("opt"):  # earlier eval points, faint
            ax.scatter(group["val/loss"], group[metric], color=colors[opt], alpha=0.2, s=14, marker=".")
        for (opt, lr), group in final.groupby(["opt", "lr"]):
            ax.scatter(group["val/loss"], group[metric], color=colors[opt], marker=markers[lr], s=36,
                       alpha=0.85, label=f"{opt} lr={lr:g}")
        ax.set_xscale("log")
        ax.set_xlabel("val/loss (teacher-forced NLL per answer token)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("lm_arith: validation loss vs whole-answer exact match (final points bold, earlier faint)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    args = parse_script_args(sys.argv[1:] if argv is None else argv, PlotLMArgs, __doc__)
    source = Path(args.sweep)
    out = Path(args.out if args.out is not None else source if source.is_dir() else source.parent)
    out.mkdir(parents=True, exist_ok=True)

    every = load_runs(source)  # finished runs only: an unfinished run's last point is an early one
    final = every.sort_values("step").groupby("run").tail(1).sort_values(["opt", "lr", "seed"])
    columns = ["opt", "lr", "seed", "step", "val/loss", "val/sequence_nll"] + [
        c for c in final.columns if c.startswith("test/exact_match")]
    final[[c for c in columns if c in final]].to_csv(out / "final_points.csv", index=False)

    table = pd.DataFrame(spearman_table(final, "final, across lr x seed")
                         + spearman_table(final, "final, within lr (seed effects only)", within_lr=True)
                         + spearman_table(every, "every eval point"))
    table.to_csv(out / "spearman.csv", index=False)
    lines = ["| points | optimizer | accuracy | n | Spearman rho (val/loss vs accuracy) | 95% bootstrap | p |",
             "|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.points} | {row.opt} | {row.accuracy} | {row.n} | {row.spearman_rho:+.3f} | "
                     f"[{row.low:+.2f}, {row.high:+.2f}] | {row.p_value:.2g} |")
    (out / "spearman.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    residuals = pd.DataFrame(residual_table(final))
    residuals.to_csv(out / "residual_vs_val_loss.csv", index=False)
    lines = ["| accuracy | optimizer | n | mean residual vs pooled fit on log10(val/loss) | ±95% |", "|---|---|---|---|---|"]
    for row in residuals.itertuples():
        lines.append(f"| {row.accuracy} | {row.opt} | {row.n} | {row.mean_residual:+.3f} | {row.ci95:.3f} |")
    (out / "residual_vs_val_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(final, every, out / "val_loss_vs_exact_match.png")
    print(f"wrote {out}/final_points.csv, spearman.*, residual_vs_val_loss.*, val_loss_vs_exact_match.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
