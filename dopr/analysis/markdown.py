"""Markdown tables and the text of their cells: ``markdown_table`` writes a frame as a GitHub table,
``fmt``/``fmt_cell`` format numbers, ``format_paired`` turns paired DoPr-minus-base rows into display cells."""

from __future__ import annotations

import math

import pandas as pd

from dopr.analysis.stats import Interval


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
