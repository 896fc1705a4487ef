#!/usr/bin/env python
"""Run a study's sweeps in the order docs/STUDIES.md asks for, resumably, two runs at a time.

    python scripts/run_study.py plan=lds_anisotropy            # configs/study/lds_anisotropy.yaml
    python scripts/run_study.py plan=lds_anisotropy jobs=2 stage=tune

Stages (each resumes: finished runs are skipped, interrupted ones continue from their checkpoint):
  tune     every optimizer over the learning-rate grid on the tuning seeds (at the plan's tune_at
           settings); a grid whose best value (by the best checkpoint of the test metric, mean over
           tuning seeds) is at an edge is extended by one step that way, up to ``extend`` times; then
           each DoPr optimizer over the damping grid at its chosen learning rate, extended the same way
  verdict  every optimizer at its chosen setting on the fresh verdict seeds, in every cell of the
           plan's verdict_axes (their product, e.g. task.noise_cond, or task.dataset x task.train_episodes)
Plan keys ``overrides`` apply to every run, ``tune_overrides`` / ``verdict_overrides`` to one stage's runs;
``verdict_cut`` ([{where: {key: value}, optimizers: [...]}]) runs only the listed optimizers in the
verdict cells that match ``where`` (a budget cut the plan states, rather than a sweep stopped short).
The keys, their types and defaults are StudyPlan's: an unknown key (a typo such as verdict_axis) or a
value of the wrong type is refused before any run, naming the key and the plan file.
Keys: plan (a configs/study name), jobs (runs at once, one thread each; default 2), stage (tune,
verdict or all; default all), sweep_root (default multirun/<plan>), optimizers (default all of the
plan's: run only these, e.g. ``optimizers=[muon,dopr_muon]`` to finish one GP pair's tuning and
verdict before the next starts, so a session that ends early leaves whole pairs).
The choice of each stage is written to <sweep_root>/choice.json (merged: a run for some optimizers
keeps the others' choices); scripts/study.py then makes the study's tables from the sweep directories.
"""

import dataclasses
import difflib
import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union, get_args, get_origin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dopr.analysis.stats import higher_is_better, is_log_scale  # noqa: E402
from dopr.analysis.sweep import finished_metrics, summarize_run  # noqa: E402
from dopr.cli import parse_script_args  # noqa: E402
from dopr.records import atomic_write_text  # noqa: E402
from dopr.runner import Job, run_jobs  # noqa: E402

STAGES = ("tune", "verdict", "all")


@dataclass
class RunStudyArgs:
    plan: str
    jobs: int = 2
    stage: str = "all"
    sweep_root: str = ""  # default: multirun/<plan>
    optimizers: list[str] | None = None  # default: the plan's

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")


Setting = int | float | str | bool  # a config value a plan sets (task.noise_cond: 1e6, task.dataset: <id>)


@dataclass
class StudyPlan:
    """A configs/study/<plan>.yaml: its keys, their types, and the optional keys' defaults."""
    task: str
    optimizers: list[str]
    lrs: list[float]
    dampings: list[float]
    tune_seeds: list[int]
    verdict_seeds: list[int]
    metric: str  # the test metric tuning chooses by
    overrides: list[str] = field(default_factory=list)  # every run
    tune_overrides: list[str] = field(default_factory=list)
    verdict_overrides: list[str] = field(default_factory=list)
    default_damping: float = 1e-3  # what the lr stage runs DoPr at
    extend: int = 2  # how many times a grid whose best value is at an edge is extended past it
    tune_at: dict[str, Setting] = field(default_factory=dict)  # the settings tuning runs at
    verdict_axes: dict[str, list[Setting]] = field(default_factory=dict)
    verdict_cut: list[dict] = field(default_factory=list)  # [{where: {key: value}, optimizers: [...]}]

    def __post_init__(self):
        for cut in self.verdict_cut:
            unknown = sorted(set(cut.get("optimizers", [])) - set(self.optimizers))
            if set(cut) != {"where", "optimizers"} or not isinstance(cut["where"], dict) or unknown:
                raise ValueError(f"verdict_cut entry {cut} needs exactly the keys where and optimizers, the latter "
                                 f"from the plan's optimizers {self.optimizers}")
        overlap = set(self.tune_seeds) & set(self.verdict_seeds)
        if overlap:
            raise ValueError(f"seeds {sorted(overlap)} are both tuning and verdict seeds")


def _is(value, kind) -> bool:
    """Whether a YAML value is of a StudyPlan field's type (an int is a float; a bool is no number)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):
        return any(_is(value, k) for k in args)
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_is(k, args[0]) and _is(v, args[1]) for k, v in value.items())
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    return kind.__name__ if get_origin(kind) is None and isinstance(kind, type) else str(kind)


def load_plan(name: str) -> dict:
    """configs/study/<name>.yaml checked against StudyPlan, as a dict with every key (defaults filled in)."""
    path = ROOT / "configs" / "study" / f"{name}.yaml"
    if not path.exists():
        plans = sorted(p.stem for p in (ROOT / "configs" / "study").glob("*.yaml"))
        raise SystemExit(f"plan={name!r}: no {path.relative_to(ROOT)}; plans: {', '.join(plans)}")
    where = path.relative_to(ROOT)
    plan = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    fields = {f.name: f for f in dataclasses.fields(StudyPlan)}
    for key in plan:  # a typo'd optional key would otherwise be ignored, its default run instead
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SystemExit(f"{where}: unknown key {key!r}{hint}; a plan's keys are {', '.join(fields)}")
    missing = [k for k, f in fields.items() if k not in plan and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SystemExit(f"{where} lacks {missing}")
    for key, value in plan.items():
        if not _is(value, fields[key].type):
            raise SystemExit(f"{where}: {key}: {value!r} is not of type {_type_name(fields[key].type)}; "
                             f"write it as the committed plans do (e.g. configs/study/gym_hopper_noise.yaml)")
    try:
        return dataclasses.asdict(StudyPlan(**plan))
    except ValueError as error:
        raise SystemExit(f"{where}: {error}") from None


def _dirname(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


def job(root: Path, stage: str, plan: dict, opt: str, seed: int, settings: dict, where: dict) -> Job:
    # The default damping is what the lr stage ran: the same run, not a second copy of it.
    settings = {k: v for k, v in settings.items() if not (k == "opt.ap.damping" and v == plan["default_damping"])}
    run_dir = root / stage / _dirname({**where, "opt": opt, **settings, "seed": seed})
    # <stage>_overrides: e.g. more evaluation episodes for the verdict than for tuning (docs/STUDIES.md §4)
    overrides = (f"task={plan['task']}", f"opt={opt}", f"seed={seed}", *plan["overrides"],
                 *plan[f"{stage}_overrides"], *(f"{k}={v}" for k, v in {**where, **settings}.items()))
    return Job(run_dir, overrides)


def score(jobs: list[Job], summaries: list[dict], metric: str) -> float:
    """Mean over seeds of the metric at each run's best checkpoint (by that metric), larger is better;
    ratios are averaged as logs (dopr.analysis.stats.is_log_scale), +inf kept as the worst value."""
    higher = higher_is_better(metric, summaries[0]["headline_metric"], summaries[0]["higher_is_better"])
    values = []
    for j in jobs:  # the study tables' own best-checkpoint rule (dopr.analysis.sweep.summarize_run)
        records = finished_metrics(j.run_dir / "metrics.jsonl")
        points = pd.DataFrame(records).reindex(columns=["step", "val/loss", metric]).assign(run=str(j.run_dir))
        values.append(summarize_run(points, [metric], {metric: higher})[f"best/{metric}"])
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return math.nan
    with np.errstate(divide="ignore"):
        mean = float(np.exp(np.nanmean(np.log(values)))) if is_log_scale(metric) else float(np.nanmean(values))
    return mean if higher else -mean


def run_grid(plan, root, stage, opt, key, grid, fixed, seeds, where, jobs, extend, log):
    """Run ``opt`` over ``key``'s grid, extending it past an edge best; returns (best value, scores)."""
    grid = sorted(grid)
    scores: dict[float, float] = {}
    for _ in range(extend + 1):
        todo = {v: [job(root, stage, plan, opt, s, {**fixed, key: v}, where) for s in seeds] for v in grid if v not in scores}
        flat = [j for js in todo.values() for j in js]
        by_job = dict(zip(flat, run_jobs(flat, jobs, on_done=log)))
        for v, js in todo.items():
            scores[v] = score(js, [by_job[j] for j in js], plan["metric"])
        best = max(scores, key=lambda v: -math.inf if math.isnan(scores[v]) else scores[v])
        ordered = sorted(scores)
        step = ordered[1] / ordered[0] if len(ordered) > 1 else 10.0
        if best == ordered[0]:
            grid = [best / step]
        elif best == ordered[-1]:
            grid = [best * step]
        else:
            break
    return best, scores


def verdict_cells(plan: dict) -> list[dict]:
    """The settings the verdict runs at: the product of ``verdict_axes`` ({key: [values]}), or the tuning cell."""
    cells = [{}]
    for key, values in plan["verdict_axes"].items():
        cells = [{**cell, key: value} for cell in cells for value in values]
    return cells


def verdict_optimizers(plan: dict, cell: dict) -> list[str]:
    """The plan's optimizers that run in a verdict cell: all of them unless a ``verdict_cut`` entry matches it."""
    optimizers = list(plan["optimizers"])
    for cut in plan["verdict_cut"]:
        if all(cell.get(k) == v for k, v in cut["where"].items()):
            optimizers = [o for o in optimizers if o in cut["optimizers"]]
    return optimizers


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, RunStudyArgs, __doc__)
    plan = load_plan(args.plan)
    if args.optimizers is not None:
        unknown = sorted(set(args.optimizers) - set(plan["optimizers"]))
        if unknown or not args.optimizers:
            raise SystemExit(f"optimizers={args.optimizers}: choose a non-empty list from the plan's {plan['optimizers']}")
        plan = {**plan, "optimizers": [o for o in plan["optimizers"] if o in args.optimizers]}
    jobs, stage = args.jobs, args.stage
    root = Path(args.sweep_root or ROOT / "multirun" / args.plan)
    root.mkdir(parents=True, exist_ok=True)
    choice_path = root / "choice.json"
    extend = plan["extend"]

    def log(job: Job, summary: dict, seconds: float) -> None:
        if seconds:
            value = summary["last"].get(plan["metric"])
            print(f"[study] {job.run_dir.relative_to(root)}: {seconds:.0f} s, {plan['metric']}={value:.4g}", flush=True)

    if stage in ("tune", "all"):
        where = dict(plan["tune_at"])
        choice = json.loads(choice_path.read_text()) if choice_path.exists() else {}
        for opt in plan["optimizers"]:
            lr, lr_scores = run_grid(plan, root, "tune", opt, "opt.lr", plan["lrs"], {}, plan["tune_seeds"],
                                     where, jobs, extend, log)
            choice[opt] = {"opt.lr": lr, "lr_scores": lr_scores}
            print(f"[study] {opt}: lr {lr:g} (scores {', '.join(f'{k:g}: {v:.4g}' for k, v in sorted(lr_scores.items()))})",
                  flush=True)
        for opt in [o for o in plan["optimizers"] if o.startswith("dopr_")]:
            default = plan["default_damping"]
            damping, d_scores = run_grid(plan, root, "tune", opt, "opt.ap.damping", plan["dampings"],
                                         {"opt.lr": choice[opt]["opt.lr"]}, plan["tune_seeds"], where, jobs, extend, log)
            choice[opt].update({"opt.ap.damping": damping, "damping_scores": d_scores})
            print(f"[study] {opt}: damping {damping:g} at lr {choice[opt]['opt.lr']:g} (default {default:g})", flush=True)
        # atomically: a session killed mid-write must not lose the other optimizers' choices
        atomic_write_text(choice_path, json.dumps(choice, indent=1, default=str) + "\n")
    if stage in ("verdict", "all"):
        if not choice_path.exists():
            raise SystemExit(f"{choice_path} missing: run stage=tune first")
        choice = json.loads(choice_path.read_text())
        missing = [o for o in plan["optimizers"] if o not in choice]
        if missing:
            raise SystemExit(f"{choice_path} has no choice for {missing}: run stage=tune for them first")
        todo = []
        for cell in verdict_cells(plan):
            where = {**plan["tune_at"], **cell}
            for opt in verdict_optimizers(plan, cell):
                settings = {k: v for k, v in choice[opt].items() if k in ("opt.lr", "opt.ap.damping")}
                todo += [job(root, "verdict", plan, opt, s, settings, where) for s in plan["verdict_seeds"]]
        print(f"[study] verdict: {len(todo)} runs", flush=True)
        run_jobs(todo, jobs, on_done=log)
    print(f"[study] done; records under {root}")


if __name__ == "__main__":
    main(sys.argv[1:])
