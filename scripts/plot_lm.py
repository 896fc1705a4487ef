#!/usr/bin/env python
"""Validation loss against exact match for an lm_arith sweep (the paper's Figure 10 analog).

    python scripts/plot_lm.py multirun/lm_arith_lr_sweep --out results/lm

Reads every run's summary.json and metrics.jsonl under the sweep dir and writes to --out:
  final_points.csv          one row per run: optimizer, lr, seed, final val/loss and test metrics
  spearman.csv, spearman.md Spearman rank correlation between val/loss and each accuracy, per
                            optimizer: final points across lr x seed, final points within each lr
                            (seed-to-seed only), and every eval point
  residual_vs_val_loss.{csv,md}  accuracy beyond what val loss predicts, per optimizer (pooled
                            linear fit of accuracy on log10 val loss; mean residual +- 95% CI)
  val_loss_vs_exact_match.png  scatter: greedy and sampled exact match against val/loss

Under the paper's claim, accuracy falls as val loss rises for DoPr (rho strongly negative) but not
reliably for AdamW (rho weaker, or positive).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ACCURACIES = ("test/exact_match", "test/exact_match_sampled", "test/exact_match_len4")


def load_runs(sweep_dir: Path) -> pd.DataFrame:
    """One row per (run, eval step) with optimizer name, lr and seed."""
    rows = []
    for summary_path in sorted(sweep_dir.rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        config = summary.get("config", {})
        metrics_path = summary_path.parent / "metrics.jsonl"
        if not metrics_path.exists():
            continue
        meta = {"run": str(summary_path.parent.relative_to(sweep_dir)), "opt": config["opt"]["name"],
                "lr": config["opt"]["lr"], "seed": config["seed"],
                "finished": summary.get("status") == "finished"}
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "val/loss" in record and "test/exact_match" in record:
                rows.append({**record, **meta})  # the record's "lr" is the scheduled lr; keep opt.lr
    if not rows:
        raise SystemExit(f"no runs with evaluated metrics under {sweep_dir}")
    return pd.DataFrame(rows)


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
            rho, p = stats.spearmanr(group["val/loss"], group[metric])
            out.append({"points": label, "opt": opt, "accuracy": metric, "n": len(group),
                        "spearman_rho": float(rho), "p_value": float(p)})
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
            r = residual.loc[idx].to_numpy()
            half = stats.t.ppf(0.975, len(r) - 1) * r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else np.nan
            out.append({"accuracy": metric, "opt": opt, "n": len(r), "mean_residual": float(r.mean()),
                        "ci95": float(half)})
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the sweep dir)")
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)

    every = load_runs(args.sweep_dir)
    # "final" is the last evaluation of finished runs; every eval point includes runs still going
    final = every[every["finished"]].sort_values("step").groupby("run").tail(1).sort_values(["opt", "lr", "seed"])
    if final.empty:
        raise SystemExit(f"no finished runs under {args.sweep_dir} yet")
    columns = ["opt", "lr", "seed", "step", "val/loss", "val/sequence_nll"] + [
        c for c in final.columns if c.startswith("test/exact_match")]
    final[[c for c in columns if c in final]].to_csv(out / "final_points.csv", index=False)

    table = pd.DataFrame(spearman_table(final, "final, across lr x seed")
                         + spearman_table(final, "final, within lr (seed effects only)", within_lr=True)
                         + spearman_table(every, "every eval point"))
    table.to_csv(out / "spearman.csv", index=False)
    lines = ["| points | optimizer | accuracy | n | Spearman rho (val/loss vs accuracy) | p |", "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.points} | {row.opt} | {row.accuracy} | {row.n} | {row.spearman_rho:+.3f} | {row.p_value:.2g} |")
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
