"""The studies whose data are committed under results/, each derived from its plan (configs/study/*.yaml,
dopr/analysis/plan.py): where its records are, what it claims, the commands that made them, and which
verdict cell it is. ``scripts/study.py study=<name>`` reads an entry; every key can be overridden on
its command line (``sweep=``, ``out=``, ``tune_seeds=``, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from dopr.analysis.plan import load_plan, name_cell, plan_names, verdict_cells


@dataclass
class StudySpec:
    name: str
    task: str  # the task config's name; fills the task column of records that lack it (CSVs)
    claim: str  # one sentence, with metric and direction (STUDIES §1)
    metric: str  # the headline test metric
    sweep: list[str]  # sources: sweep dirs or evals.csv files (tuning and verdict seeds alike)
    out: str
    readme: str  # the experiment README that reports it
    commands: list[str]  # the sweep commands, as the experiment's script runs them
    tune_seeds: list[int] = field(default_factory=lambda: list(range(5)))
    verdict_seeds: list[int] = field(default_factory=list)
    cell_keys: list[str] = field(default_factory=lambda: ["opt.lr"])  # settings both sides of a pair share
    ap_keys: list[str] = field(default_factory=lambda: ["opt.ap.damping"])  # DoPr-only settings, one row each
    fixed: dict = field(default_factory=dict)  # columns the CSV lacks but the sweep command pinned
    predictors: list[str] = field(default_factory=lambda: ["val/loss"])  # one-step metrics correlated with the test one
    secondary: list[str] = field(default_factory=list)  # further test metrics paired in every cell (last evaluation)
    notes: list[str] = field(default_factory=list)
    verdict_where: dict = field(default_factory=dict)  # one cell of a verdict axis: the verdict runs kept
    similar_margin: float = 0.1  # observation 1's band: base GPs "similar" within this fraction of the best's mean
    peers: list[str] = field(default_factory=list)  # arms outside the GP pairs (dopr/analysis/plan.py)
    references: list[str] = field(default_factory=list)  # what each peer is compared with


def plan_studies(name: str, plan: dict) -> list[StudySpec]:
    """One study per verdict cell of a plan (dopr.analysis.plan.load_plan), each a verdict of its own, all
    read from the one evals.csv that scripts/aggregate.py wrote from the plan's sweep (the run dirs
    themselves are not committed; evals.csv keeps each run's SHA and versions). A cell's settings are
    taken in key order, as the aggregate command groups them and runs.csv carries them."""
    axes = sorted(plan["verdict_axes"])
    commands = [f"python scripts/run_study.py plan={name}",
                f"python scripts/aggregate.py sweep=multirun/{name} out=results/{name} "
                f"group={','.join(['opt.name', 'opt.lr', 'opt.ap.damping', *axes])}"]
    specs = []
    for cell in verdict_cells(plan):
        label = name_cell(plan, cell, "cell")
        specs.append(StudySpec(
            name=f"{name}_{label}" if label else name, task=plan["task"], claim=name_cell(plan, cell, "claim"),
            metric=plan["metric"], sweep=[f"results/{name}/evals.csv"], out=f"results/{name}/{label}".rstrip("/"),
            readme=plan["readme"], commands=commands, tune_seeds=list(plan["tune_seeds"]),
            verdict_seeds=list(plan["verdict_seeds"]), predictors=list(plan["predictors"]),
            secondary=list(plan["secondary"]), notes=list(plan["notes"]), verdict_where={k: cell[k] for k in axes},
            peers=list(plan["peers"]), references=list(plan["references"])))
    return specs


@functools.cache
def studies(plans: Path | None = None) -> dict[str, StudySpec]:
    """Every committed study by name: each plan's verdict cells, in the plans' order (plans in progress have
    no committed results yet, and are left out)."""
    plans_done = {name: plan for name in plan_names(plans) if not (plan := load_plan(name, plans))["in_progress"]}
    return {spec.name: spec for name, plan in plans_done.items() for spec in plan_studies(name, plan)}
