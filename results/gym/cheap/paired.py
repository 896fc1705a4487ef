"""Paired (same seed) return and val-loss differences of each DoPr-Muon variant against Muon.

    python results/gym/cheap/paired.py     # reads results/gym/cheap/runs.csv, writes paired.md
"""

import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2] / "scripts"))
from aggregate import mean_ci  # noqa: E402
runs = pd.read_csv(HERE / "runs.csv")
final = runs.sort_values("step").groupby("run").tail(1)
variant = final["opt.name"] + final["opt.max_rows"].map(lambda r: "" if pd.isna(r) else f", rows {int(r)}")
variant += final["opt.stat_interval"].map(lambda k: "" if pd.isna(k) or k == 1 else f", every {int(k)} steps")
final = final.assign(variant=variant).set_index(["variant", "seed"])
base = final.loc["muon"]
lines = ["| variant | return | Δreturn vs Muon (paired) | val loss | Δval loss (paired) |", "|---|---|---|---|---|"]
for name in sorted(set(final.index.get_level_values(0)) - {"muon"}):
    rows = final.loc[name]
    cells = [name]
    for metric in ("test/return", "val/loss"):
        mean, half, _ = mean_ci(rows[metric] - base.loc[rows.index, metric])
        cells += [f"{rows[metric].mean():.4g}", f"{mean:+.4g} ± {half:.2g}"]
    lines.append("| " + " | ".join(cells) + " |")
lines.append(f"\nMuon: return {base['test/return'].mean():.4g}, val loss {base['val/loss'].mean():.4g}; "
             f"seeds {sorted(base.index)}; ± is the 95% t-interval of the paired difference.")
(HERE / "paired.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
