#!/usr/bin/env python
"""Paired DoPr-minus-base differences per seed (same seed = same init, data order and eval scenes).

    python results/robomimic/paired.py results/robomimic/runs.csv > results/robomimic/paired.md

Reads the runs.csv written by scripts/aggregate.py; uses each run's last evaluation.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

PAIRS = [("adamw", "dopr_adamw"), ("muon", "dopr_muon")]
METRICS = ["val/loss", "val/action_mse", "test/success_rate", "test/success_rate_k1"]


def main(path: str) -> None:
    runs = pd.read_csv(path)
    last = runs.sort_values("step").groupby(["opt.name", "seed"]).tail(1).set_index(["opt.name", "seed"])
    print("| base -> DoPr | metric | seeds | mean diff (DoPr - base) | 95% CI | DoPr better / tied / worse |")
    print("|---|---|---|---|---|---|")
    for base, dopr in PAIRS:
        for metric in METRICS:
            if metric not in last.columns:
                continue
            seeds = sorted(set(last.loc[base].index) & set(last.loc[dopr].index))
            if not seeds:
                continue
            diff = np.array([last.loc[(dopr, s), metric] - last.loc[(base, s), metric] for s in seeds], dtype=float)
            diff = np.round(diff, 9)  # success rates are multiples of 1/episodes: no float-noise "wins"
            mean = diff.mean()
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            sign = -1.0 if metric.startswith("val/") else 1.0  # lower loss / higher success is better
            better, worse = int((sign * diff > 0).sum()), int((sign * diff < 0).sum())
            print(f"| {base} -> {dopr} | {metric} | {len(diff)} | {mean:+.3f} | [{mean - half:+.3f}, {mean + half:+.3f}] "
                  f"| {better} / {len(diff) - better - worse} / {worse} |")


if __name__ == "__main__":
    main(sys.argv[1])
