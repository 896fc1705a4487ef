"""A study's provenance.json (docs/STUDIES.md §5): what made its runs and its analysis (``provenance``,
``data_commit`` for data files whose runs recorded no SHA), which values dropped out (``missing_values``), and
the rule that keeps the analysis date when a re-analysis changes nothing else."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from dopr.analysis.sweep import PICKS, Sweep, finite_or_none
from dopr.records import machine

ROOT = Path(__file__).resolve().parents[2]


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
