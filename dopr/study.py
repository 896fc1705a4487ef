"""Run a study plan's sweeps in the order docs/STUDIES.md asks for, resumably (``scripts/run_study.py``).

Stages (each resumes: finished runs are skipped, interrupted ones continue from their checkpoint):
  tune     every optimizer over the learning-rate grid on the tuning seeds (at the plan's tune_at
           settings); a grid whose best value (by the best checkpoint of the test metric, mean over
           tuning seeds) is at an edge is extended by one step that way, up to ``extend`` times; then
           each DoPr optimizer over the damping grid at its chosen learning rate, extended the same way
  verdict  every optimizer at its chosen setting on the fresh verdict seeds, in every cell of the
           plan's verdict_axes (their product, e.g. task.noise_cond, or task.dataset x task.train_episodes)
  equal_compute
           each base GP the plan lists under equal_compute, re-run on each verdict seed at its chosen setting
           for the steps its DoPr partner's wall-clock buys it on that seed (§3b's equal compute): DoPr's total
           wall_time over the base's seconds per step, from the seed's two verdict runs (finished, on one
           machine), rounded up to a whole evaluation interval. Finished records do not change, so a stage
           resumed in another session runs the same runs; seeds whose pair has not finished wait.
Plan keys ``overrides`` apply to every run, ``tune_overrides`` / ``verdict_overrides`` to one stage's runs;
``verdict_cut`` runs only the listed optimizers in the verdict cells that match ``where``
(dopr/analysis/plan.py). The choice of each stage is written to <sweep_root>/choice.json, merged: a
run for some optimizers keeps the others' choices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dopr.analysis.decomposition import host_of
from dopr.analysis.plan import verdict_cells, verdict_optimizers
from dopr.analysis.stats import higher_is_better, is_log_scale
from dopr.analysis.sweep import EQUAL_COMPUTE_STAGE, finished_metrics, summarize_run
from dopr.paths import REPO_ROOT
from dopr.records import atomic_write_text
from dopr.runner import Job, run_jobs

STAGES = ("tune", "verdict", EQUAL_COMPUTE_STAGE, "all")
CHOSEN = ("opt.lr", "opt.ap.damping")  # the settings tuning chooses, as choice.json names them
Log = Callable[[Job, dict, float], None]


def chosen_settings(choice: dict, opt: str) -> dict:
    """``opt``'s settings as tuning chose them (lr, damping), from choice.json's entry."""
    return {k: v for k, v in choice[opt].items() if k in CHOSEN}


def _dirname(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


def job(root: Path, stage: str, plan: dict, opt: str, seed: int, settings: dict, where: dict) -> Job:
    """One run of ``opt`` at ``settings`` (lr, damping) in the cell ``where``, in <root>/<stage>/."""
    # The default damping is what the lr stage ran: the same run, not a second copy of it.
    settings = {k: v for k, v in settings.items() if not (k == "opt.ap.damping" and v == plan["default_damping"])}
    run_dir = root / stage / _dirname({**where, "opt": opt, **settings, "seed": seed})
    # <stage>_overrides: e.g. more evaluation episodes for the verdict than for tuning (docs/STUDIES.md §4);
    # the equal-compute runs are verdict runs with more steps
    stage_overrides = plan["tune_overrides" if stage == "tune" else "verdict_overrides"]
    overrides = (f"task={plan['task']}", f"opt={opt}", f"seed={seed}", *plan["overrides"],
                 *stage_overrides, *(f"{k}={v}" for k, v in {**where, **settings}.items()))
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


def tune(plan: dict, root: Path, jobs: int, log: Log, choice: dict) -> dict:
    """The tuning stage: each optimizer's lr, then each DoPr optimizer's damping at its lr, into ``choice``."""
    where = dict(plan["tune_at"])
    for opt in plan["optimizers"]:
        lr, lr_scores = run_grid(plan, root, "tune", opt, "opt.lr", plan["lrs"], {}, plan["tune_seeds"],
                                 where, jobs, plan["extend"], log)
        choice[opt] = {"opt.lr": lr, "lr_scores": lr_scores}
        print(f"[study] {opt}: lr {lr:g} (scores {', '.join(f'{k:g}: {v:.4g}' for k, v in sorted(lr_scores.items()))})",
              flush=True)
    for opt in [o for o in plan["optimizers"] if o.startswith("dopr_")]:
        damping, d_scores = run_grid(plan, root, "tune", opt, "opt.ap.damping", plan["dampings"],
                                     {"opt.lr": choice[opt]["opt.lr"]}, plan["tune_seeds"], where, jobs,
                                     plan["extend"], log)
        choice[opt].update({"opt.ap.damping": damping, "damping_scores": d_scores})
        print(f"[study] {opt}: damping {damping:g} at lr {choice[opt]['opt.lr']:g} "
              f"(default {plan['default_damping']:g})", flush=True)
    return choice


def verdict_jobs(plan: dict, root: Path, choice: dict) -> list[Job]:
    """The verdict stage's runs: each cell's optimizers at their chosen settings, on every verdict seed.

    Seed by seed, every optimizer of a seed after the other: a seed's runs then share the machine and its
    load even when the stage spans sessions on different machines, and their wall-clocks compare (§3b's
    speed and equal compute, which leave out a seed whose runs' machines differ)."""
    todo = []
    for cell in verdict_cells(plan):
        where = {**plan["tune_at"], **cell}
        arms = [(opt, chosen_settings(choice, opt)) for opt in verdict_optimizers(plan, cell)]
        todo += [job(root, "verdict", plan, opt, s, settings, where)
                 for s in plan["verdict_seeds"] for opt, settings in arms]
    return todo


def _finished_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "finished" else None


def equal_compute_steps(plan: dict, root: Path, choice: dict, base: str, seed: int, where: dict) -> int | None:
    """The steps that give ``base`` its DoPr partner's wall-clock on ``seed`` in the cell ``where`` (the
    equal_compute stage's rule, module docstring); None until both verdict runs finished on one machine."""
    arms = [job(root, "verdict", plan, o, seed, chosen_settings(choice, o), where)
            for o in (base, f"dopr_{base}")]
    b, d = (_finished_summary(j.run_dir) for j in arms)
    if b is None or d is None:
        return None
    host = host_of(b.get("machine"), b.get("threads"))
    if host is None or host != host_of(d.get("machine"), d.get("threads")):
        return None
    b_time, d_time = b["last"].get("wall_time"), d["last"].get("wall_time")
    if not b_time or not d_time:
        return None
    needed = d_time / (b_time / b["last"]["step"])
    interval = b["config"]["trainer"]["eval_every"]
    return int(math.ceil(needed / interval) * interval)


def equal_compute_jobs(plan: dict, root: Path, choice: dict) -> list[Job]:
    """The equal_compute stage's runs (module docstring), seed by seed: each seed whose verdict pair has
    finished on one machine; the others are said, to be run by a later call."""
    todo = []
    for base in plan["equal_compute"]:
        if f"dopr_{base}" not in choice:
            raise SystemExit(f"equal_compute: dopr_{base} has no choice yet: tune it (optimizers=[{base},dopr_{base}])")
        settings = chosen_settings(choice, base)
        steps, waiting = {}, 0
        for cell in verdict_cells(plan):
            where = {**plan["tune_at"], **cell}
            for seed in plan["verdict_seeds"]:
                n = equal_compute_steps(plan, root, choice, base, seed, where)
                if n is None:
                    waiting += 1
                    continue
                steps[f"{_dirname(cell)} seed {seed}".strip()] = n
                todo.append(job(root, EQUAL_COMPUTE_STAGE, plan, base, seed, {**settings, "trainer.steps": n}, where))
        print(f"[study] equal_compute: {base} at DoPr's wall-clock, steps per seed {steps}"
              + (f"; {waiting} seed(s) wait for their verdict pair to finish on one machine (run this stage "
                 f"again after stage=verdict)" if waiting else ""), flush=True)
    return todo


def only_optimizers(plan: dict, optimizers: list[str] | None) -> dict:
    """The plan restricted to ``optimizers`` (None: all of the plan's), in the plan's order."""
    if optimizers is None:
        return plan
    unknown = sorted(set(optimizers) - set(plan["optimizers"]))
    if unknown or not optimizers:
        raise SystemExit(f"optimizers={optimizers}: choose a non-empty list from the plan's {plan['optimizers']}")
    return {**plan, "optimizers": [o for o in plan["optimizers"] if o in optimizers]}


def default_root(plan_name: str) -> Path:
    """Where a plan's runs go unless sweep_root= says otherwise: multirun/<plan>."""
    return REPO_ROOT / "multirun" / plan_name


def run_stages(plan: dict, root: Path, stage: str = "all", jobs: int = 2) -> None:
    """Run ``stage`` (tune, verdict, equal_compute or all) of ``plan`` (dopr.analysis.plan.load_plan) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    choice_path = root / "choice.json"

    def log(job: Job, summary: dict, seconds: float) -> None:
        if seconds:
            value = summary["last"].get(plan["metric"])
            print(f"[study] {job.run_dir.relative_to(root)}: {seconds:.0f} s, {plan['metric']}={value:.4g}", flush=True)

    if stage in ("tune", "all"):
        choice = tune(plan, root, jobs, log, json.loads(choice_path.read_text()) if choice_path.exists() else {})
        # atomically: a session killed mid-write must not lose the other optimizers' choices
        atomic_write_text(choice_path, json.dumps(choice, indent=1, default=str) + "\n")
    if stage in ("verdict", EQUAL_COMPUTE_STAGE, "all"):
        if not choice_path.exists():
            raise SystemExit(f"{choice_path} missing: run stage=tune first")
        choice = json.loads(choice_path.read_text())
        missing = [o for o in plan["optimizers"] if o not in choice]
        if missing:
            raise SystemExit(f"{choice_path} has no choice for {missing}: run stage=tune for them first")
    if stage in ("verdict", "all"):
        todo = verdict_jobs(plan, root, choice)
        print(f"[study] verdict: {len(todo)} runs", flush=True)
        run_jobs(todo, jobs, on_done=log)
    if stage in (EQUAL_COMPUTE_STAGE, "all") and plan["equal_compute"]:
        bases = [b for b in plan["equal_compute"] if b in plan["optimizers"]]
        todo = equal_compute_jobs({**plan, "equal_compute": bases}, root, choice)
        if todo:
            print(f"[study] equal_compute: {len(todo)} runs", flush=True)
            run_jobs(todo, jobs, on_done=log)
    print(f"[study] done; records under {root}")
