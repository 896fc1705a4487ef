"""Load a sweep's records and reduce them to the data contract's ``runs.csv`` (docs/STUDIES.md §5).

Two sources give the same frames:
- a sweep directory: every run dir under it with a ``summary.json`` (resolved config, git, versions)
  and a ``metrics.jsonl`` (one line per evaluation point), as ``run.py`` writes them;
- a tidy ``evals.csv`` (one row per run x evaluation point, written by ``scripts/aggregate.py`` and
  ``scripts/study.py``) with the same columns, provenance ones (git.sha, versions, ...) included; a CSV
  without them is read, and provenance then says they were not recorded.

``evals``: one row per (run, evaluation point), meta columns first. ``runs_table``: one row per run
with ``final/<m>`` (last evaluation), ``best/<m>`` (the evaluation that is best by ``m`` itself) and,
for test metrics, ``valpick/<m>`` (``m`` at the evaluation with the lowest val/loss).

A damaged source is an error naming its file (and line), never fewer runs or a wrong step: a summary.json
or metrics.jsonl line that is not JSON, an evals.csv row cut short, a finished run whose evaluations end
before its trainer.steps (the trainer always evaluates at the last step, so its final/ values would
come from an earlier one). Runs that did not finish are left out and listed, their records unread.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from dopr.analysis.stats import higher_is_better
from dopr.records import RecordsError, read_metrics, read_summary

META = ["run", "task", "opt.name", "ap", "gp", "opt.lr", "opt.ap.damping", "seed", "status", "eval_episodes",
        "steps"]
# What provenance.json needs about each run, kept as columns so that an evals.csv carries it too.
PROVENANCE = ["git.sha", "git.dirty", "threads", "machine", "versions", "date"]
# The data contract's leading columns, in order (docs/STUDIES.md §5).
# dopr/study.py's stage (and dir under the sweep root) for a base GP re-run at its DoPr partner's wall-clock
EQUAL_COMPUTE_STAGE = "equal_compute"
CONTRACT = ["study", "task", "opt.name", "ap", "opt.lr", "opt.ap.damping", "seed", "stage", "eval_episodes", "steps"]
PICKS = ("best", "final", "valpick")  # which checkpoint of a run a runs.csv value is read at (summarize_run)


def uses_ap(opt_name: str) -> bool:
    """DoPr optimizers are the GP's name with a ``dopr_`` prefix (configs/opt/dopr_*.yaml)."""
    return str(opt_name).startswith("dopr_")


def gp_name(opt_name: str) -> str:
    """The gradient preconditioner a run used: ``dopr_muon`` -> ``muon``."""
    return str(opt_name).removeprefix("dopr_")


def config_value(config: dict, dotted: str):
    """``config["opt"]["ap"]["damping"]`` for ``"opt.ap.damping"``; None when absent."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class Sweep:
    """A sweep's evaluation points (with the PROVENANCE columns where the source recorded them)."""

    source: str
    evals: pd.DataFrame
    headlines: list[dict] = field(default_factory=list)  # per run: summary.json's headline_metric, higher_is_better
    left_out: list[dict] = field(default_factory=list)  # per run not tabled: run, why


def _metric_columns(columns) -> list[str]:
    return [c for c in columns if c.startswith(("train/", "val/", "test/"))]


def _rerun(path: Path) -> str:
    """The fix for a run's damaged record file."""
    return f"restore it, or delete {path.parent} and run that run again"


def _rewrite(path: Path) -> str:
    """The fix for a damaged evals.csv."""
    return (f"write it again from the sweep dirs (scripts/aggregate.py, or scripts/study.py for a study) or restore "
            f"the committed file (git checkout -- {path})")


def _exit_on_damage(read, path: Path):
    """A dopr.records reader, its error (naming the file, the line and the fix) ending the script cleanly."""
    try:
        return read(path)
    except RecordsError as error:
        raise SystemExit(str(error)) from None


def finished_metrics(path: Path) -> list[dict]:
    """A finished run's metrics.jsonl: a line that is not a record is damage (only a crash tears the last
    line, and a crashed run is not finished), an error naming it."""
    return _exit_on_damage(read_metrics, path)


def last_evaluations(evals: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluation (its row at the largest step): what final/ values are read from."""
    return evals.sort_values("step").groupby("run").tail(1)


def _ended_early(evals: pd.DataFrame) -> pd.DataFrame:
    """The last evaluations of runs that end before their recorded trainer.steps (runs without a
    recorded steps pass): the trainer evaluates at its last step, so these records lost their end."""
    last = last_evaluations(evals)
    steps = pd.to_numeric(last["steps"], errors="coerce") if "steps" in last else pd.Series(math.nan, last.index)
    return last[steps.notna() & (last["step"] != steps)]


def _check_csv_rows(path: Path) -> None:
    """pandas reads a row cut short as NaNs (and a value cut mid-number as a smaller number): every row
    must have the header's fields, and the file must end with its last row's newline."""
    fix = _rewrite(path)
    with open(path, newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise SystemExit(f"{path} is empty; {fix}")
            for row in reader:
                if row and len(row) != len(header):
                    raise SystemExit(f"{path}, line {reader.line_num}: {len(row)} fields where the header has "
                                     f"{len(header)}: the row is cut short or damaged; {fix}")
        except csv.Error as error:
            raise SystemExit(f"{path}, line {reader.line_num}: {error}: the file is cut short or damaged; "
                             f"{fix}") from None
        lines = reader.line_num
    with open(path, "rb") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            raise SystemExit(f"{path}, line {lines}: the last row has no newline: the file is cut short; {fix}")


def read_sweep_dir(sweep_dir: Path, keys: list[str] = ()) -> Sweep:
    """Every run under ``sweep_dir``; unfinished runs and runs without evaluations are left out (and
    listed with the reason). ``keys``: further config keys to carry as columns (e.g. opt.ap.max_rows)."""
    sweep_dir = Path(sweep_dir)
    rows, headlines, left_out, run_dirs = [], [], [], {}
    paths = sorted(sweep_dir.rglob("summary.json"))
    if not paths:
        raise SystemExit(f"sweep={sweep_dir}: no summary.json under it; point sweep= at a run.py -m sweep dir "
                         f"(hydra.sweep.dir) or at an evals.csv")
    for summary_path in paths:
        run_dir = summary_path.parent
        run = str(run_dir.relative_to(sweep_dir)) if run_dir != sweep_dir else run_dir.name
        run_dirs[run] = run_dir
        summary = _exit_on_damage(read_summary, summary_path)
        if summary.get("status") != "finished":
            left_out.append({"run": run, "why": f"status {summary.get('status')!r}, not finished"})
            continue
        metrics_path = run_dir / "metrics.jsonl"
        records = finished_metrics(metrics_path) if metrics_path.exists() else []
        if not records:
            left_out.append({"run": run, "why": "no evaluation records in metrics.jsonl"})
            continue
        config = summary.get("config", {})
        name = config_value(config, "opt.name")
        meta = {"run": run, "task": config_value(config, "task.name"), "opt.name": name, "ap": uses_ap(name),
                "gp": gp_name(name), "opt.lr": config_value(config, "opt.lr"),
                "opt.ap.damping": config_value(config, "opt.ap.damping") if uses_ap(name) else None,
                "seed": config_value(config, "seed"), "status": summary.get("status"),
                "eval_episodes": config_value(config, "task.eval_episodes"),
                "steps": config_value(config, "trainer.steps")}
        meta.update({k: config_value(config, k) for k in keys})
        git = summary.get("git") or {}
        meta.update({"git.sha": git.get("sha"), "git.dirty": git.get("dirty"),
                     "threads": summary.get("threads", config_value(config, "trainer.threads")),
                     "machine": json.dumps(summary["machine"], sort_keys=True) if summary.get("machine") else None,
                     "versions": json.dumps(summary.get("versions"), sort_keys=True) if summary.get("versions") else None,
                     "date": datetime.fromtimestamp(summary_path.stat().st_mtime, timezone.utc).isoformat(
                         timespec="seconds")})
        for record in records:
            rows.append({**meta, **{k: v for k, v in record.items() if k in ("step", "wall_time")
                                    or k.startswith(("train/", "val/", "test/"))}})
        headlines.append({"run": run, "headline_metric": summary.get("headline_metric"),
                          "higher_is_better": summary.get("higher_is_better")})
    if not rows:
        raise SystemExit(f"sweep={sweep_dir}: no finished run with evaluations ({len(left_out)} left out: "
                         f"{left_out[:3]})")
    evals = _typed(pd.DataFrame(rows))
    short = _ended_early(evals)
    if len(short):
        first = short.iloc[0]
        path = run_dirs[first["run"]] / "metrics.jsonl"
        raise SystemExit(f"{path}: the run is marked finished with trainer.steps={float(first['steps']):g} but "
                         f"its last evaluation is at step {first['step']} ({len(short)} such run(s): "
                         f"{', '.join(short['run'])}); its final values would come from the wrong step; {_rerun(path)}")
    return Sweep(str(sweep_dir), evals, headlines, left_out)


def read_evals_csv(path: Path, fixed: dict | None = None) -> Sweep:
    """A tidy CSV of evaluation points (the committed studies' format); ``fixed`` fills columns the CSV
    lacks but the sweep command pinned (e.g. ``{"opt.lr": 3e-3}``)."""
    _check_csv_rows(path)
    frame = pd.read_csv(path)
    missing = [c for c in ("opt.name", "seed", "step") if c not in frame]
    if missing:
        raise SystemExit(f"sweep={path}: no column(s) {missing}; expected an evals.csv from scripts/aggregate.py")
    if "run" not in frame:
        frame["run"] = [f"{o}/seed={s}" for o, s in zip(frame["opt.name"], frame["seed"])]
    for key, value in (fixed or {}).items():
        if key in frame and frame[key].notna().any():
            if not (frame[key] == value).all():
                raise SystemExit(f"sweep={path} records {key} = {sorted(frame[key].unique())}, not the {value} its "
                                 f"sweep command pinned; check the study's sources")
        else:
            frame[key] = value
    frame["ap"] = frame["opt.name"].map(uses_ap)
    frame["gp"] = frame["opt.name"].map(gp_name)
    for column in META:
        if column not in frame:
            frame[column] = None
    frame.loc[~frame["ap"], "opt.ap.damping"] = None
    left_out = []
    if "status" in frame and frame["status"].notna().any():
        unfinished = frame[frame["status"] != "finished"]
        for run, status in unfinished.groupby("run")["status"].first().items():
            left_out.append({"run": run, "why": f"status {status!r}, not finished"})
        frame = frame[frame["status"] == "finished"]
    frame = frame.drop(columns=[c for c in ("lr",) if c in frame])  # the scheduled lr, not a setting
    extra = [c for c in frame.columns if c not in META and c not in ("step", "wall_time") and c not in PROVENANCE
             and not c.startswith(("train/", "val/", "test/"))]
    ordered = META + extra + PROVENANCE + ["step", "wall_time"] + _metric_columns(frame.columns)
    short = _ended_early(frame)
    if len(short):
        first = short.iloc[0]
        raise SystemExit(f"{path}: run {first['run']} is marked finished with "
                         f"trainer.steps={float(first['steps']):g} but its last evaluation is at step {first['step']} "
                         f"({len(short)} such run(s): "
                         f"{', '.join(map(str, short['run']))}): rows are missing, and its final values would come "
                         f"from the wrong step; {_rewrite(path)}")
    return Sweep(str(path), _typed(frame[[c for c in ordered if c in frame]]), [], left_out)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Metric columns as floats (JSON's null becomes NaN, Infinity stays inf), the rest as they came."""
    frame = frame.copy()
    for column in _metric_columns(frame.columns):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in ("opt.lr", "opt.ap.damping"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["ap"] = frame["ap"].astype(bool)
    return frame


def read_sweep(source: str | Path, keys: list[str] = (), fixed: dict | None = None) -> Sweep:
    """A sweep directory or an evals.csv (see the module docstring)."""
    source = Path(source)
    if not source.exists():
        raise SystemExit(f"sweep={source} does not exist; give a run.py -m sweep dir or an evals.csv")
    if source.is_dir():
        if fixed:
            raise SystemExit(f"sweep={source}: fixed values are for CSVs without a config; a sweep dir has one")
        return read_sweep_dir(source, keys)
    return read_evals_csv(source, fixed)


def concat(sweeps: list[Sweep]) -> Sweep:
    """Several sources (e.g. tuning and verdict sweeps) as one; run names are prefixed by source when
    two sources share a run name."""
    if len(sweeps) == 1:
        return sweeps[0]
    frames = []
    names = [set(s.evals["run"]) for s in sweeps]
    clash = any(a & b for i, a in enumerate(names) for b in names[i + 1:])
    for s in sweeps:
        frame = s.evals.copy()
        if clash:
            frame["run"] = Path(s.source).name + ":" + frame["run"].astype(str)
        frames.append(frame)
    return Sweep(",".join(s.source for s in sweeps), pd.concat(frames, ignore_index=True),
                 [x for s in sweeps for x in s.headlines], [x for s in sweeps for x in s.left_out])


def directions(metrics: list[str], headline: str | None = None, headline_higher: bool | None = None) -> dict:
    return {m: higher_is_better(m, headline, headline_higher) for m in metrics}


def summarize_run(points: pd.DataFrame, metrics: list[str], better: dict) -> dict:
    """final/best/valpick values of one run's evaluation points (see the module docstring).

    An evaluation whose value of ``m`` is NaN cannot be best by ``m``; infinite values take part
    (inf is the worst cost). A metric without a known direction gets no best/ value."""
    points = points.sort_values("step")  # a val/loss tie picks the earlier evaluation
    last = last_evaluations(points).iloc[-1]
    out = {}
    val = points["val/loss"] if "val/loss" in points else None
    valpick = points.loc[val.idxmin()] if val is not None and val.notna().any() else None
    for m in metrics:
        out[f"final/{m}"] = last[m]
        values = points[m].dropna()
        if better.get(m) is None or values.empty:
            out[f"best/{m}"] = math.nan
        else:
            out[f"best/{m}"] = float(values.max() if better[m] else values.min())
        if m.startswith("test/"):
            out[f"valpick/{m}"] = valpick[m] if valpick is not None else math.nan
    return out


def stage_of_run(run: str, seed, stage_of_seed: dict) -> str:
    """A run's stage: "equal_compute" for a run under dopr/study.py's equal_compute dir (a verdict seed's base
    re-run for more steps), else its seed's stage."""
    return EQUAL_COMPUTE_STAGE if str(run).split("/")[0] == EQUAL_COMPUTE_STAGE else stage_of_seed[seed]


def runs_table(sweep: Sweep, study: str, stage_of_seed: dict, better: dict | None = None,
               keys: list[str] = ()) -> pd.DataFrame:
    """The data contract's runs.csv: one row per run (CONTRACT columns, ``keys``, then the metrics).

    ``stage_of_seed`` maps each seed to "tune" or "verdict"; a seed missing from it is an error. A run under
    <sweep>/equal_compute/ is of stage "equal_compute" (``stage_of_run``)."""
    evals = sweep.evals
    keys = [k for k in keys if k not in CONTRACT]
    unknown = sorted(set(evals["seed"]) - set(stage_of_seed))
    if unknown:
        raise SystemExit(f"seeds {unknown} are in neither tune_seeds= nor verdict_seeds=; add them to one")
    metrics = [m for m in _metric_columns(evals.columns) if m.startswith(("val/", "test/"))]
    better = better or directions(metrics)
    rows = []
    for run, points in evals.groupby("run", sort=False):
        first = points.iloc[0]
        row = {"study": study, **{c: first[c] for c in CONTRACT if c in first}, "stage": stage_of_run(run, first["seed"], stage_of_seed),
               "gp": first["gp"], "run": run, **{k: first[k] for k in keys if k in first},
               "evaluations": len(points), "last_step": int(points["step"].max())}
        row.update(summarize_run(points, metrics, better))
        rows.append(row)
    table = pd.DataFrame(rows)
    lead = CONTRACT + ["gp", "run"] + [k for k in keys if k in table] + ["evaluations", "last_step"]
    return table[lead + [c for c in table.columns if c not in lead]]


def read_runs_csv(path: Path) -> pd.DataFrame:
    """A runs.csv written by ``runs_table`` (one row per run), with ``ap`` as booleans."""
    table = pd.read_csv(path)
    missing = [c for c in CONTRACT if c not in table]
    if missing:
        raise SystemExit(f"{path}: not a runs.csv of the data contract (no column(s) {missing}); "
                         f"give the sweep dir or evals.csv instead")
    table["ap"] = table["ap"].map(lambda v: str(v).lower() == "true")
    if "gp" not in table:
        table["gp"] = table["opt.name"].map(gp_name)
    return table


def finite_or_none(value):
    """For JSON: NaN -> None; inf stays (Python's json writes Infinity, as records.py does)."""
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value
