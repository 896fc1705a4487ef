"""docs/STUDIES.md §3b, "Faster, or better?": for every DoPr/base pair of a study's verdict, four questions
answered from the evaluation points (evals.csv), paired by seed.

1. **Speed** (``speed``): the first step, and the wall-clock seconds, at which DoPr's val/loss reaches the
   base's best val/loss, and the base reaches DoPr's best. Between two evaluations the crossing is found by
   linear interpolation of log val/loss against step (and against wall_time for the seconds); a run already
   below the target at its first evaluation reached it "at or before" that step (``censored``); a run that
   never gets there gives None. Summary: median over the seeds that reached it, and how many did.
2. **Matched loss** (``matched_loss``): per seed, the test metric of both arms at one val/loss level both runs
   reach: the larger of the two runs' best val/loss (``matched_level``). Each run's metric there is read where
   its val/loss first reaches that level, linearly interpolated in log loss between the two checkpoints around
   the crossing (for the run whose best it is: its best-val checkpoint itself). When one run's lowest val/loss
   is above the other's highest, the ranges do not overlap and the seed has no matched value (said, not
   filled). DoPr − base paired by seed with a 95% interval (``stats.paired_difference``). The same at matched
   train-set loss, from the first column of ``TRAIN_SET_COLUMNS`` the records carry.
   ``pooled_matched_loss``: every checkpoint of every run of both optimizers over the learning-rate grid (tuning
   and verdict runs), binned in log val/loss over the range both arms cover (``POOLED_BINS`` equal-width bins);
   per shared bin the difference of the arms' mean metric, averaged over shared bins weighted by their
   checkpoint count; a 95% percentile bootstrap over runs (each arm's runs resampled with replacement,
   ``RESAMPLES`` times, seeded). The checkpoints outside the shared range are counted and reported.
3. **Converged or budget-limited** (``convergence``): per base run, the relative change of val/loss from the
   evaluation nearest 75% of its last step to its last evaluation. A run with fewer than 2 evaluations at or
   after 75% of its last step has "too few evaluations" to tell a plateau. The cell is "converged" only when
   every base run has enough evaluations and changed by less than ``PLATEAU_FRACTION``; otherwise it is
   "budget-limited" (§3b: a verdict not shown to be converged is budget-limited), with the reason.
4. **Equal compute** (``equal_compute``): seconds per step are a run's last wall_time over its last step
   (evaluation time included, as wall_time counts it). Where DoPr's mean over seeds exceeds the base's, DoPr's
   final metric is compared with the base's metric at the wall_time equal to DoPr's total (linear in wall_time
   between the base's evaluations), paired by seed. A base run that stopped before that wall_time is replaced
   by the base's re-run with more steps where the study has one (dopr/study.py's equal_compute stage, stage
   "equal_compute" in runs.csv): its last evaluation stands when its steps reach those DoPr's wall-clock buys
   the base at its verdict run's seconds per step, by less than one evaluation interval more (a re-run made
   for that budget; its own clock is not read: it may have run beside other work), and part 3's plateau rule
   is applied to those re-runs too. Without one, the base keeps its last
   value where part 3 found that run flat (its schedule had ended on a plateau: "carried"), and gives None
   otherwise ("base budget too short; rerun the base with more steps"). Where DoPr's step is not costlier,
   the fixed-budget verdict already is the equal-compute one.

The paper's claim, "DoPr improves the test metric at equal or worse training/validation loss", gets one verdict
word per pair from parts 2 and 3 (``paper_claim``), beside the fixed-budget verdict (DoPr − base at the last
evaluation, paired by seed): "holds" when DoPr is better at matched val/loss and at matched train-set loss
(where that is recorded), "holds at matched <loss> only" when one is and the other is not shown, "reversed"
when either is worse, "not shown" when neither interval excludes 0, and "untestable" when no seed's loss
ranges overlap; "budget-limited: " comes first where part 3 did not find the base converged.

``decomposition_table`` writes one markdown row per pair and ``decompose`` runs the four over a study's
verdict pairs (the base and DoPr at their chosen settings, as ``report.headline_comparison`` pairs them);
``effects_table`` puts every study's pairs in one table from their decomposition.csv files
(results/faster_or_better.md, by scripts/results_table.py).
Wall-clock numbers are only comparable between runs made on the same machine and thread count: a seed whose
two runs' records name different CPUs, ATen kernel sets, core or thread counts (``run_hosts``; a sweep can span
sessions on different machines) gets no seconds in part 1 and no equal-compute value in part 4, and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dopr.analysis.markdown import markdown_table
from dopr.analysis.report import at_choice, comparison_pool, setting_label
from dopr.analysis.sweep import EQUAL_COMPUTE_STAGE
from dopr.analysis.stats import Interval, PairedResult, percentile_interval, is_log_scale, paired_difference

LOSS = "val/loss"
# §3b: "at least 8 evaluation points per run, so that these curves exist"; fewer is said in every table.
MIN_EVALUATIONS = 8
# The plateau rule: the base's val/loss moved by less than 5% of its value over the last quarter of training.
# 5% is about the spread of final val/loss between seeds of one setting in the committed studies, so a smaller
# change is not distinguishable from the end of training; a larger one means more steps would still help.
PLATEAU_FRACTION = 0.05
LAST_QUARTER = 0.75  # the plateau is measured from the evaluation nearest this fraction of the last step
# Train-set loss, in order of preference: the gym tasks' full pass over the training set, else the training
# minibatch loss logged at each evaluation.
TRAIN_SET_COLUMNS = ("val/train_set_loss", "train/loss")
POOLED_BINS = 8  # equal-width bins of log val/loss over the range both arms cover
RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# ---------------------------------------------------------------- one run's curve


def curve(points: pd.DataFrame, columns) -> pd.DataFrame:
    """One run's evaluation points in step order, only the columns asked for (and step, wall_time)."""
    keep = ["step"] + [c for c in ["wall_time", *columns] if c in points and c != "step"]
    return points.sort_values("step")[list(dict.fromkeys(keep))].reset_index(drop=True)


def _positive(values) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return np.where(x > 0, x, np.nan)


@dataclass
class Crossing:
    """Where a run's loss first reaches a target: step and wall-clock seconds, and whether the run was already
    there at its first evaluation (then the true crossing is at or before that step)."""

    step: float
    seconds: float
    censored: bool = False


def first_reach(run: pd.DataFrame, target: float, loss: str = LOSS) -> Crossing | None:
    """The first point at which ``run``'s ``loss`` is at or below ``target``, linearly interpolated in log loss
    between the evaluation before and the one at the crossing; None when the run never gets there."""
    if not math.isfinite(target) or target <= 0:
        return None
    v = np.log(_positive(run[loss]))
    steps = run["step"].to_numpy(dtype=float)
    times = run["wall_time"].to_numpy(dtype=float) if "wall_time" in run else np.full(len(run), math.nan)
    goal = math.log(target)
    hit = np.flatnonzero(v <= goal + 1e-12)
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0:
        return Crossing(steps[0], times[0], censored=True)
    before = i - 1
    while before > 0 and np.isnan(v[before]):
        before -= 1
    if np.isnan(v[before]):
        return Crossing(steps[i], times[i], censored=True)
    frac = (v[before] - goal) / (v[before] - v[i]) if v[before] != v[i] else 1.0
    return Crossing(steps[before] + frac * (steps[i] - steps[before]),
                    times[before] + frac * (times[i] - times[before]))


def value_at_level(run: pd.DataFrame, level: float, metric: str, loss: str = LOSS) -> float:
    """``metric`` where ``run``'s ``loss`` first reaches ``level``: linear in log loss between the checkpoint
    before the crossing and the one at it; NaN when the run never gets there (or starts below it: then no
    checkpoint brackets the level)."""
    v = np.log(_positive(run[loss]))
    m = run[metric].to_numpy(dtype=float)
    goal = math.log(level)
    hit = np.flatnonzero(v <= goal + 1e-12)
    if not len(hit):
        return math.nan
    i = int(hit[0])
    if abs(v[i] - goal) <= 1e-12:
        return float(m[i])
    if i == 0:
        return math.nan
    frac = (v[i - 1] - goal) / (v[i - 1] - v[i])
    return float(m[i - 1] + frac * (m[i] - m[i - 1]))


def matched_level(a: pd.DataFrame, b: pd.DataFrame, loss: str = LOSS) -> tuple[float, str]:
    """(the loss both runs reach, "") or (NaN, why not): the larger of the two runs' best loss, provided each
    run's range of loss along its checkpoints contains it (the ranges overlap)."""
    la, lb = _positive(a[loss]), _positive(b[loss])
    if np.isnan(la).all() or np.isnan(lb).all():
        return math.nan, f"no {loss} recorded"
    level = max(np.nanmin(la), np.nanmin(lb))
    if level > np.nanmax(la) or level > np.nanmax(lb):
        high, low = ("DoPr", "base") if np.nanmin(la) > np.nanmax(lb) else ("base", "DoPr")
        return math.nan, (f"{loss} ranges do not overlap: {low}'s highest {np.nanmax(lb if low == 'base' else la):.3g} "
                          f"is below {high}'s lowest {np.nanmin(la if high == 'DoPr' else lb):.3g}")
    return float(level), ""


def relative_change(run: pd.DataFrame, loss: str = LOSS) -> tuple[float, int]:
    """(relative change of ``loss`` from the evaluation nearest ``LAST_QUARTER`` of the last step to the last
    evaluation, how many evaluations lie at or after ``LAST_QUARTER`` of the last step)."""
    run = run[np.isfinite(run[loss].to_numpy(dtype=float))]
    if len(run) < 2:
        return math.nan, len(run)
    steps = run["step"].to_numpy(dtype=float)
    last = steps[-1]
    mark = LAST_QUARTER * last
    start = int(np.argmin(np.abs(steps[:-1] - mark)))  # nearest earlier evaluation (never the last itself)
    v = run[loss].to_numpy(dtype=float)
    change = (v[-1] - v[start]) / abs(v[start]) if v[start] != 0 else math.nan
    return float(change), int((steps >= mark - 1e-9).sum())


def value_at_time(run: pd.DataFrame, seconds: float, metric: str) -> float:
    """``metric`` at wall_time ``seconds``, linear in wall_time between evaluations; NaN past the run's end."""
    if "wall_time" not in run:
        return math.nan
    t = run["wall_time"].to_numpy(dtype=float)
    m = run[metric].to_numpy(dtype=float)
    if not len(t) or seconds > t[-1] + 1e-9:
        return math.nan
    if seconds <= t[0]:
        return float(m[0]) if abs(seconds - t[0]) < 1e-9 else math.nan
    return float(np.interp(seconds, t, m))


def seconds_per_step(run: pd.DataFrame) -> float:
    """The run's last wall_time over its last step (NaN without wall_time)."""
    if "wall_time" not in run or not len(run):
        return math.nan
    last = run.iloc[-1]
    return float(last["wall_time"]) / float(last["step"]) if float(last["step"]) > 0 else math.nan


# What makes two runs' wall-clocks comparable: the machine fields that set kernel speed, and the thread count.
HOST_FIELDS = ("cpu", "aten_cpu_capability", "cores")


def host_of(machine, threads) -> str | None:
    """The machine and thread count a run's wall-clock belongs to (``HOST_FIELDS`` of its record's ``machine``
    and its ``threads``), or None where the record does not say; equal strings mean comparable clocks."""
    if not isinstance(machine, dict) or not machine or threads is None or pd.isna(threads):
        return None
    return ", ".join(f"{k} {machine.get(k)}" for k in HOST_FIELDS) + f", threads {int(float(threads))}"


def run_hosts(evals: pd.DataFrame) -> dict:
    """run -> a description of the machine and thread count it ran on (``HOST_FIELDS`` of the record's
    ``machine`` and ``threads``), or None where the records do not say."""
    if "machine" not in evals:
        return {}
    hosts = {}
    for run, points in evals.groupby("run", sort=False):
        first = points.iloc[0]
        try:
            machine = json.loads(first["machine"]) if isinstance(first["machine"], str) else None
        except json.JSONDecodeError:
            machine = None
        hosts[run] = host_of(machine, first.get("threads"))
    return hosts


def other_hosts(dopr_runs: dict, base_runs: dict, hosts: dict) -> set:
    """The seeds whose DoPr and base runs are recorded on different machines or thread counts (seed -> run
    per arm); a run whose records do not say is not counted as different."""
    out = set()
    for s in set(dopr_runs) & set(base_runs):
        a, b = hosts.get(dopr_runs[s]), hosts.get(base_runs[s])
        if a is not None and b is not None and a != b:
            out.add(s)
    return out


# ---------------------------------------------------------------- one pair: seed -> run curve per arm


def _median(values) -> float:
    x = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(x)) if x else math.nan


def _mean(values) -> float:
    x = [v for v in values if math.isfinite(v)]
    return float(np.mean(x)) if x else math.nan


def speed(dopr: dict, base: dict, other_host: set | frozenset = frozenset()) -> dict:
    """Part 1. ``dopr``/``base``: seed -> run curve. Per seed and summary (see the module docstring); the seeds
    in ``other_host`` (runs on different machines) get steps but no seconds."""
    seeds = sorted(set(dopr) & set(base))
    rows = []
    for s in seeds:
        d_best, b_best = np.nanmin(_positive(dopr[s][LOSS])), np.nanmin(_positive(base[s][LOSS]))
        d, b = first_reach(dopr[s], b_best), first_reach(base[s], d_best)
        b_own = first_reach(base[s], b_best)
        timed = s not in other_host
        rows.append({"seed": s, "dopr_to_base_best_step": d.step if d else None,
                     "dopr_to_base_best_s": d.seconds if d and timed else None,
                     "dopr_censored": bool(d and d.censored),
                     "base_to_dopr_best_step": b.step if b else None,
                     "base_to_dopr_best_s": b.seconds if b and timed else None, "base_censored": bool(b and b.censored),
                     "base_best_step": b_own.step if b_own else None})
    reached_d = [r for r in rows if r["dopr_to_base_best_step"] is not None]
    reached_b = [r for r in rows if r["base_to_dopr_best_step"] is not None]
    return {"seeds": rows, "n": len(rows),
            "dopr_reached": len(reached_d), "dopr_step_median": _median(r["dopr_to_base_best_step"] for r in reached_d),
            "dopr_s_median": _median(r["dopr_to_base_best_s"] for r in reached_d if r["dopr_to_base_best_s"] is not None),
            "dopr_censored": sum(r["dopr_censored"] for r in rows),
            "base_reached": len(reached_b), "base_step_median": _median(r["base_to_dopr_best_step"] for r in reached_b),
            "base_s_median": _median(r["base_to_dopr_best_s"] for r in reached_b if r["base_to_dopr_best_s"] is not None),
            "base_censored": sum(r["base_censored"] for r in rows),
            "base_best_step_median": _median(r["base_best_step"] for r in rows)}


@dataclass
class Matched:
    """Part 2 per seed and paired: the level each seed was compared at, both arms' metric there, why a seed
    has none, and DoPr − base with its interval (None when no seed had a matched value)."""

    loss: str
    seeds: list = field(default_factory=list)  # dicts: seed, level, dopr, base, why
    result: PairedResult | None = None

    @property
    def unmatched(self) -> list:
        return [r for r in self.seeds if r["why"]]


def matched_loss(dopr: dict, base: dict, metric: str, higher: bool, loss: str = LOSS) -> Matched:
    """Part 2, per seed: ``metric`` of both arms at the val/loss (or train-set ``loss``) both reach."""
    out = Matched(loss)
    for s in sorted(set(dopr) & set(base)):
        d, b = dopr[s][["step", loss, metric]].dropna(), base[s][["step", loss, metric]].dropna()
        level, why = matched_level(d, b, loss)
        dv = bv = math.nan
        if not why:
            dv, bv = value_at_level(d, level, metric, loss), value_at_level(b, level, metric, loss)
        out.seeds.append({"seed": s, "level": level, "dopr": dv, "base": bv, "why": why})
    paired = [r for r in out.seeds if not r["why"]]
    if paired:
        out.result = paired_difference({r["seed"]: r["dopr"] for r in paired}, {r["seed"]: r["base"] for r in paired},
                                       metric, higher)
    return out


@dataclass
class Pooled:
    """Part 2, pooled over the lr grid: DoPr − base of the mean metric within shared log-loss bins."""

    diff: float
    low: float
    high: float
    runs: tuple  # (DoPr runs, base runs)
    bins_shared: int
    shared_range: tuple  # (low, high) of the loss both arms cover; NaNs when they do not overlap
    outside: tuple  # checkpoints outside the shared range: (DoPr, base) of (DoPr total, base total)
    totals: tuple
    note: str = ""


def pooled_matched_loss(dopr_runs: dict, base_runs: dict, metric: str, loss: str = LOSS, bins: int = POOLED_BINS,
                        resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Pooled:
    """``dopr_runs``/``base_runs``: run id -> curve, every run of each optimizer (all lrs, both stages). A ratio
    metric (``stats.is_log_scale``) is compared as its log, as ``paired_difference`` does; checkpoints with an
    infinite or missing metric are left out of the pool."""
    log = is_log_scale(metric)

    def points(runs):
        ids, x, y = [], [], []
        for k, (_, c) in enumerate(sorted(runs.items(), key=lambda kv: str(kv[0]))):
            c = c[[loss, metric]].replace([np.inf, -np.inf], np.nan).dropna()
            c = c[(c[loss] > 0) & ((c[metric] > 0) if log else True)]
            ids += [k] * len(c)
            x += list(np.log(c[loss].to_numpy(dtype=float)))
            m = c[metric].to_numpy(dtype=float)
            y += list(np.log(m) if log else m)
        return np.array(ids, dtype=int), np.array(x), np.array(y), len(runs)

    (di, dx, dy, dn), (bi, bx, by, bn) = points(dopr_runs), points(base_runs)
    totals = (len(dx), len(bx))
    if not len(dx) or not len(bx):
        return Pooled(math.nan, math.nan, math.nan, (dn, bn), 0, (math.nan, math.nan), (0, 0), totals, "no checkpoints")
    low, high = max(dx.min(), bx.min()), min(dx.max(), bx.max())
    if low >= high:
        return Pooled(math.nan, math.nan, math.nan, (dn, bn), 0, (math.nan, math.nan), totals, totals,
                      f"{loss} ranges do not overlap")
    edges = np.linspace(low, high, bins + 1)

    def tally(ids, x, y, n):  # runs x bins: sums and counts of the metric
        inside = (x >= low) & (x <= high)
        b = np.clip(np.searchsorted(edges, x[inside], side="right") - 1, 0, bins - 1)
        sums, counts = np.zeros((n, bins)), np.zeros((n, bins))
        np.add.at(sums, (ids[inside], b), y[inside])
        np.add.at(counts, (ids[inside], b), 1)
        return sums, counts, int((~inside).sum())

    (ds, dc, d_out), (bs, bc, b_out) = tally(di, dx, dy, dn), tally(bi, bx, by, bn)

    def statistic(ds_, dc_, bs_, bc_):
        d_sum, d_cnt, b_sum, b_cnt = ds_.sum(-2), dc_.sum(-2), bs_.sum(-2), bc_.sum(-2)
        shared = (d_cnt > 0) & (b_cnt > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.where(shared, d_sum / np.where(d_cnt > 0, d_cnt, 1) - b_sum / np.where(b_cnt > 0, b_cnt, 1), 0.0)
            weight = np.where(shared, d_cnt + b_cnt, 0.0)
            return (gap * weight).sum(-1) / weight.sum(-1), shared.sum(-1)

    diff, shared = statistic(ds, dc, bs, bc)
    rng = np.random.default_rng(seed)
    pick_d, pick_b = rng.integers(0, dn, size=(resamples, dn)), rng.integers(0, bn, size=(resamples, bn))
    boot, _ = statistic(ds[pick_d], dc[pick_d], bs[pick_b], bc[pick_b])
    lo, hi = percentile_interval(boot[np.isfinite(boot)])
    return Pooled(float(diff), lo, hi, (dn, bn), int(shared), (float(np.exp(low)), float(np.exp(high))),
                  (d_out, b_out), totals)


def convergence(base: dict, fraction: float = PLATEAU_FRACTION) -> dict:
    """Part 3 over the base runs (seed -> curve): each run's change and the cell's label with its reason."""
    rows = []
    for s in sorted(base):
        change, late = relative_change(base[s])
        rows.append({"seed": s, "change": change, "late_evaluations": late,
                     "label": "too few evaluations" if late < 2 else
                     ("flat" if abs(change) < fraction else "still changing")})
    few = sum(r["label"] == "too few evaluations" for r in rows)
    moving = sum(r["label"] == "still changing" for r in rows)
    changes = [r["change"] for r in rows if math.isfinite(r["change"])]
    if rows and not few and not moving:
        label, why = "converged", f"every base run changed by less than {fraction:.0%} over its last quarter"
    else:
        reasons = []
        if moving:
            reasons.append(f"base val/loss changed by {fraction:.0%} or more over the last quarter on "
                           f"{moving}/{len(rows)} runs")
        if few:
            reasons.append(f"too few evaluations: {few}/{len(rows)} base runs have under 2 in their last quarter, "
                           f"so no plateau can be shown")
        label, why = "budget-limited", "; ".join(reasons) or "no base run"
    return {"seeds": rows, "label": label, "why": why, "median_change": _median(changes),
            "too_few": few, "still_changing": moving, "n": len(rows)}


def equal_compute(dopr: dict, base: dict, metric: str, higher: bool, flat: set | frozenset = frozenset(),
                  other_host: set | frozenset = frozenset(), longer: dict | None = None) -> dict:
    """Part 4 (see the module docstring): seconds per step of both arms, and DoPr's final metric against the
    base's at DoPr's total wall-clock when DoPr's step costs more. ``flat``: the seeds whose base run part 3
    found flat, whose last value stands for a longer budget. ``other_host``: the seeds whose two runs ran on
    different machines, left out (their wall-clocks do not compare). ``longer``: seed -> the base's re-run
    with more steps (dopr/study.py's equal_compute stage), whose last value stands where its steps reach the
    steps DoPr's wall-clock buys the base at the verdict run's seconds per step."""
    longer = longer or {}
    paired = sorted(set(dopr) & set(base))
    seeds = [s for s in paired if s not in other_host]
    d_sps = [seconds_per_step(dopr[s]) for s in seeds]
    b_sps = [seconds_per_step(base[s]) for s in seeds]
    out = {"dopr_s_per_step": _mean(d_sps), "base_s_per_step": _mean(b_sps), "seeds": [], "result": None,
           "other_host": len(paired) - len(seeds)}
    if paired and not seeds:
        out["status"] = (f"every seed's two runs ran on different machines ({len(paired)}/{len(paired)}): "
                         f"no wall-clock comparison; rerun one arm beside the other")
        return out
    if not seeds or not math.isfinite(out["dopr_s_per_step"]) or not math.isfinite(out["base_s_per_step"]):
        out["status"] = "no wall_time recorded"
        return out
    if out["dopr_s_per_step"] <= out["base_s_per_step"]:
        out["status"] = "DoPr's step is not costlier: the fixed-budget verdict is the equal-compute one"
        return out
    for s in seeds:
        d = dopr[s].dropna(subset=[metric, "wall_time"])
        b = base[s].dropna(subset=[metric, "wall_time"])
        budget = float(d["wall_time"].iloc[-1])
        value = value_at_time(b, budget, metric)
        needed = budget / seconds_per_step(b)
        long_run = longer[s].dropna(subset=[metric]) if s in longer else None
        # The re-run's own clock is not used (it may have run beside other work); its steps are what count, and
        # only a re-run made for this budget stands: at least the steps needed, less than one evaluation more.
        long_steps = None
        if long_run is not None and len(long_run) >= 2 and not math.isfinite(value):
            steps = long_run["step"].to_numpy(dtype=float)
            if needed <= steps[-1] < needed + float(np.median(np.diff(steps))):
                long_steps = float(steps[-1])
        if long_steps is not None:
            value = float(long_run[metric].iloc[-1])
        carried = not math.isfinite(value) and s in flat and len(b) > 0
        out["seeds"].append({"seed": s, "dopr_seconds": budget, "base_seconds": float(b["wall_time"].iloc[-1]),
                             "dopr": float(d[metric].iloc[-1]),
                             "base": float(b[metric].iloc[-1]) if carried else value, "carried": carried,
                             "base_steps_needed": needed, "longer_steps": long_steps})
    ok = [r for r in out["seeds"] if math.isfinite(r["base"])]
    short = len(out["seeds"]) - len(ok)
    carried = sum(r["carried"] for r in out["seeds"])
    if ok:
        out["result"] = paired_difference({r["seed"]: r["dopr"] for r in ok}, {r["seed"]: r["base"] for r in ok},
                                          metric, higher)
    needed = _median(r["base_steps_needed"] for r in out["seeds"] if not math.isfinite(r["base"]))
    status = []
    used = [r for r in out["seeds"] if r["longer_steps"] is not None]
    if used:
        plateau = convergence({r["seed"]: longer[r["seed"]] for r in used})
        flat_long = sum(row["label"] == "flat" for row in plateau["seeds"])
        extra = [r["longer_steps"] / r["base_steps_needed"] for r in used]
        status.append(f"base re-run for more steps (equal_compute stage) on {len(used)}/{len(out['seeds'])} seeds, "
                      f"its last evaluation taken: {min(extra):.2f}-{max(extra):.2f}x the steps DoPr's wall-clock "
                      f"buys it; its val/loss flat over its last quarter on {flat_long}/{len(used)}"
                      + (" (converged)" if plateau["label"] == "converged" else ""))
        out["longer"] = {"n": len(used), "flat": flat_long, "label": plateau["label"]}
    if carried:
        status.append(f"base's last value carried to DoPr's wall-clock on {carried}/{len(out['seeds'])} seeds "
                      f"(base run flat by part 3's plateau rule)")
    if short:
        status.append(f"base budget too short on {short}/{len(out['seeds'])} seeds; rerun the base with more steps "
                      f"(about {needed:.0f}: a plan's equal_compute key and scripts/run_study.py stage=equal_compute)")
    if out["other_host"]:
        status.append(f"{out['other_host']}/{len(paired)} seeds left out: their two runs ran on different machines")
    out["status"] = "; ".join(status)
    return out


# ---------------------------------------------------------------- a study's pairs


@dataclass
class Pair:
    """One DoPr/base pair of a verdict: the runs of each arm at its chosen setting, seed -> run id."""

    task: str
    gp: str
    base_name: str
    dopr_name: str
    base_setting: str
    dopr_setting: str
    base: dict
    dopr: dict


def verdict_pairs(runs: pd.DataFrame, choice: pd.DataFrame, setting_keys: list[str],
                  comparisons: list[tuple[str, str]] = ()) -> list[Pair]:
    """The verdict-stage pairs ``report.headline_comparison`` compares: per task and GP, the base and DoPr runs
    at their chosen settings; then each (peer, reference) of ``comparisons``, the peer in DoPr's place (its
    ``gp`` reads "peer vs reference"). Empty when the study has no verdict stage."""
    if not (runs["stage"] == "verdict").any():
        return []
    stage, pool, keys, chosen = comparison_pool(runs, choice, setting_keys)

    def pair(task: str, gp: str, group: pd.DataFrame, base_name: str, dopr_name: str) -> Pair:
        base, dopr = (at_choice(group, name, chosen.get((task, name)), keys, stage)
                      for name in (base_name, dopr_name))
        return Pair(task, gp, base_name, dopr_name, setting_label(base.iloc[0], keys),
                    setting_label(dopr.iloc[0], keys), dict(zip(base["seed"], base["run"])),
                    dict(zip(dopr["seed"], dopr["run"])))

    peers = {peer for peer, _ in comparisons}
    pairs = []
    for (task, gp), group in pool[~pool["opt.name"].isin(peers)].groupby(["task", "gp"], sort=True, dropna=False):
        names = {bool(a): n for a, n in group.groupby("ap")["opt.name"].first().items()}
        if set(names) == {False, True}:
            pairs.append(pair(task, gp, group, names[False], names[True]))
    for task, group in pool.groupby("task", sort=True):
        pairs += [pair(task, f"{peer} vs {reference}", group, reference, peer) for peer, reference in comparisons
                  if {peer, reference} <= set(group["opt.name"])]
    return pairs


def longer_base(longer_runs: pd.DataFrame, base_runs: pd.DataFrame, setting_keys: list[str]) -> dict:
    """seed -> run: the equal-compute stage's re-runs of the base (``base_runs``: its verdict runs) at the same
    task, optimizer and chosen setting, one per seed (the longest where a seed has several)."""
    if longer_runs.empty or base_runs.empty:
        return {}
    first = base_runs.iloc[0]
    same = (longer_runs["task"] == first["task"]) & (longer_runs["opt.name"] == first["opt.name"])
    for key in setting_keys:
        if key in longer_runs and key in base_runs:
            value = first[key]
            same &= longer_runs[key].isna() if pd.isna(value) else longer_runs[key] == value
    chosen = longer_runs[same & longer_runs["seed"].isin(base_runs["seed"])]
    if "last_step" in chosen:
        chosen = chosen.sort_values("last_step")
    return dict(zip(chosen["seed"], chosen["run"]))


def decompose(evals: pd.DataFrame, runs: pd.DataFrame, choice: pd.DataFrame, setting_keys: list[str], metric: str,
              higher: bool, comparisons: list[tuple[str, str]] = ()) -> list[dict]:
    """The four parts for every verdict pair (one dict per pair); ``runs`` is runs.csv's frame (stage, run);
    ``comparisons``: (peer, reference) pairs compared as DoPr and base are (``verdict_pairs``)."""
    train = next((c for c in TRAIN_SET_COLUMNS if c in evals and evals[c].notna().any()), None)
    columns = [LOSS, metric] + ([train] if train else [])
    by_run = {run: curve(points, columns) for run, points in evals.groupby("run", sort=False)}
    hosts = run_hosts(evals)
    kept = set(runs["run"])
    longer_runs = runs[runs["stage"] == EQUAL_COMPUTE_STAGE]
    out = []
    for pair in verdict_pairs(runs, choice, setting_keys, comparisons):
        dopr = {s: by_run[r] for s, r in pair.dopr.items()}
        base = {s: by_run[r] for s, r in pair.base.items()}
        longer = longer_base(longer_runs, runs[runs["run"].isin(pair.base.values())], setting_keys)
        grid = runs[(runs["task"] == pair.task) & runs["run"].isin(kept) & (runs["stage"] != EQUAL_COMPUTE_STAGE)]
        grid_d = {r: by_run[r] for r in grid.loc[grid["opt.name"] == pair.dopr_name, "run"]}
        grid_b = {r: by_run[r] for r in grid.loc[grid["opt.name"] == pair.base_name, "run"]}
        evaluations = [len(c) for c in [*dopr.values(), *base.values()]]
        plateau = convergence(base)
        flat = {row["seed"] for row in plateau["seeds"] if row["label"] == "flat"}
        apart = other_hosts(pair.dopr, pair.base, hosts)
        out.append({"pair": pair, "metric": metric, "train_column": train,
                    "evaluations": (min(evaluations), max(evaluations)) if evaluations else (0, 0),
                    "speed": speed(dopr, base, apart),
                    "matched": matched_loss(dopr, base, metric, higher),
                    "matched_train": matched_loss(dopr, base, metric, higher, train) if train else None,
                    "pooled": pooled_matched_loss(grid_d, grid_b, metric),
                    "convergence": plateau,
                    "equal_compute": equal_compute(dopr, base, metric, higher, flat, apart,
                                                   {seed: by_run[r] for seed, r in longer.items()}),
                    "final": final_difference(dopr, base, metric, higher),
                    # the base's equal-compute re-runs: seed -> (run, seconds per step of its verdict run)
                    "reruns": {seed: (r, seconds_per_step(base[seed])) for seed, r in longer.items() if seed in base}})
        out[-1]["claim"] = paper_claim(out[-1])
    return out


def final_difference(dopr: dict, base: dict, metric: str, higher: bool) -> PairedResult | None:
    """The fixed-budget comparison: DoPr − base of ``metric`` at each run's last evaluation, paired by seed."""
    last = {}
    for side, runs in (("dopr", dopr), ("base", base)):
        last[side] = {s: float(c[metric].dropna().iloc[-1]) for s, c in runs.items()
                      if metric in c and c[metric].notna().any()}
    seeds = sorted(set(last["dopr"]) & set(last["base"]))
    if not seeds:
        return None
    return paired_difference({s: last["dopr"][s] for s in seeds}, {s: last["base"][s] for s in seeds}, metric, higher)


def paper_claim(part: dict) -> tuple[str, str]:
    """The paper's claim for one pair in a verdict word, and why (the module docstring's rule)."""
    m, mt = part["matched"], part["matched_train"]
    if m.result is None:
        return "untestable", f"the arms' {LOSS} ranges do not overlap on any seed"
    found = {LOSS: m.result.verdict}
    if mt is not None and mt.result is not None:
        found[f"train-set loss ({part['train_column']})"] = mt.result.verdict
    reversed_at = [loss for loss, v in found.items() if v == "reversed"]
    held_at = [loss for loss, v in found.items() if v == "held"]
    why = "; ".join(f"at matched {loss}: {v}" for loss, v in found.items())
    if reversed_at:
        word = "reversed at matched " + " and ".join(reversed_at)
    elif len(held_at) == len(found):
        word = "holds"
    elif held_at:
        word = f"holds at matched {held_at[0]} only"
    else:
        word = "not shown"
    if part["convergence"]["label"] != "converged":
        word = f"budget-limited: {word}"
    return word, why


# ---------------------------------------------------------------- tables


def _n(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _paired_text(result: PairedResult | None) -> str:
    if result is None:
        return "no seed"
    d = result.diff
    bounds = f" {d.bounds()}" if d.n >= 2 else ""  # under two seeds format() already says there is no interval
    return (f"{'log ratio ' if result.scale == 'log' else ''}{Interval(d.mean, d.low, d.high, d.n).format()}"
            f"{bounds} (n={d.n}, {result.verdict})")


def _step_text(step, censored: bool) -> str:
    return "never" if step is None else ("≤" if censored else "") + _n(step)


def evaluations_note(lowest: int, highest: int) -> str:
    count = f"{lowest}" if lowest == highest else f"{lowest}-{highest}"
    if lowest >= MIN_EVALUATIONS:
        return f"{count} evaluations per run"
    return f"{count} evaluations per run: too few for §3b's curves (at least {MIN_EVALUATIONS})"


def _matched_text(m: Matched | None) -> str:
    if m is None:
        return "no train-set loss recorded"
    text = _paired_text(m.result)
    if m.unmatched:
        text += f"; ranges do not overlap on {len(m.unmatched)}/{len(m.seeds)} seeds"
    return text


def decomposition_rows(parts: list[dict]) -> pd.DataFrame:
    """One numeric row per pair (decomposition.csv)."""
    rows = []
    for p in parts:
        pair, sp, m, mt, po, cv, ec = (p["pair"], p["speed"], p["matched"], p["matched_train"], p["pooled"],
                                       p["convergence"], p["equal_compute"])

        def res(prefix, r):
            return {f"{prefix}_n": r.diff.n if r else 0, f"{prefix}_diff": r.diff.mean if r else math.nan,
                    f"{prefix}_low": r.diff.low if r else math.nan, f"{prefix}_high": r.diff.high if r else math.nan,
                    f"{prefix}_verdict": r.verdict if r else ""}

        rows.append({
            "task": pair.task, "gp": pair.gp, "base": pair.base_name, "dopr": pair.dopr_name,
            "base setting": pair.base_setting, "dopr setting": pair.dopr_setting, "metric": p["metric"],
            "seeds": sp["n"], "evaluations_min": p["evaluations"][0], "evaluations_max": p["evaluations"][1],
            "speed_dopr_reached": sp["dopr_reached"], "speed_dopr_step_median": sp["dopr_step_median"],
            "speed_dopr_s_median": sp["dopr_s_median"], "speed_dopr_censored": sp["dopr_censored"],
            "speed_base_reached": sp["base_reached"], "speed_base_step_median": sp["base_step_median"],
            "speed_base_s_median": sp["base_s_median"], "speed_base_censored": sp["base_censored"],
            "speed_base_best_step_median": sp["base_best_step_median"],
            **res("matched_val", m.result), "matched_val_unmatched": len(m.unmatched),
            "train_column": p["train_column"] or "",
            **res("matched_train", mt.result if mt else None),
            "matched_train_unmatched": len(mt.unmatched) if mt else math.nan,
            "pooled_diff": po.diff, "pooled_low": po.low, "pooled_high": po.high, "pooled_dopr_runs": po.runs[0],
            "pooled_base_runs": po.runs[1], "pooled_bins_shared": po.bins_shared,
            "pooled_range_low": po.shared_range[0], "pooled_range_high": po.shared_range[1],
            "pooled_dopr_outside": po.outside[0], "pooled_base_outside": po.outside[1],
            "pooled_dopr_points": po.totals[0], "pooled_base_points": po.totals[1],
            "convergence": cv["label"], "convergence_why": cv["why"],
            "base_last_quarter_change_median": cv["median_change"], "plateau_fraction": PLATEAU_FRACTION,
            "dopr_s_per_step": ec["dopr_s_per_step"], "base_s_per_step": ec["base_s_per_step"],
            **res("equal_compute", ec["result"]), "equal_compute_status": ec["status"],
            "equal_compute_reruns": ec.get("longer", {}).get("n", 0),
            "equal_compute_reruns_flat": ec.get("longer", {}).get("flat", 0),
            **res("final", p["final"]), "paper_claim": p["claim"][0], "paper_claim_why": p["claim"][1]})
    return pd.DataFrame(rows)


def decomposition_table(parts: list[dict]) -> str:
    """The four parts as markdown, one row per pair, then the per-seed values the rows summarize."""
    if not parts:
        return "no verdict-stage DoPr/base pair\n"
    rows, seeds = [], []
    for p in parts:
        pair, sp, m, mt, po, cv, ec = (p["pair"], p["speed"], p["matched"], p["matched_train"], p["pooled"],
                                       p["convergence"], p["equal_compute"])

        def reach(reached, step, secs, censored):
            if not reached:
                return f"never (0/{sp['n']})"
            at = f"median step {_n(step)}, {_n(secs, 3)} s ({reached}/{sp['n']} seeds)"
            return at + (f"; {censored} already there at the first evaluation" if censored else "")

        pooled = (po.note if po.note else
                  f"{'log ratio ' if is_log_scale(p['metric']) else ''}{po.diff:+.3g} [{po.low:+.3g}, {po.high:+.3g}] "
                  f"over {po.bins_shared}/{POOLED_BINS} bins of "
                  f"{LOSS} {po.shared_range[0]:.3g}-{po.shared_range[1]:.3g} "
                  f"({po.runs[0]} DoPr, {po.runs[1]} base runs); "
                  f"outside it: {po.outside[0]}/{po.totals[0]} DoPr, {po.outside[1]}/{po.totals[1]} base checkpoints")
        compute = f"DoPr {_n(ec['dopr_s_per_step'], 3)} s/step, base {_n(ec['base_s_per_step'], 3)} s/step"
        if ec["seeds"]:
            compute += f"; DoPr final − base at DoPr's wall-clock: {_paired_text(ec['result'])}"
        if ec["status"]:
            compute += f"; {ec['status']}"
        rows.append({
            "pair": f"{pair.task} {pair.dopr_name} ({pair.dopr_setting}) vs {pair.base_name} ({pair.base_setting})",
            "evaluations": evaluations_note(*p["evaluations"]),
            "speed: DoPr to base's best val/loss":
                reach(sp["dopr_reached"], sp["dopr_step_median"], sp["dopr_s_median"], sp["dopr_censored"])
                + f" (base's own best: step {_n(sp['base_best_step_median'])})",
            "speed: base to DoPr's best val/loss":
                reach(sp["base_reached"], sp["base_step_median"], sp["base_s_median"],
                                                          sp["base_censored"]),
            f"Δ {p['metric']} at matched val/loss": _matched_text(m),
            f"Δ at matched train-set loss ({p['train_column'] or 'none'})": _matched_text(mt),
            "Δ pooled over the lr grid at equal val/loss": pooled,
            f"converged? (plateau: < {PLATEAU_FRACTION:.0%} over the last quarter)":
                f"{cv['label']}: {cv['why']} (median change {_n(cv['median_change'], 2)})",
            "equal compute": compute,
            f"fixed budget: Δ {p['metric']} at the last evaluation": _paired_text(p["final"]),
            "the paper's claim (better at equal or worse loss)": f"**{p['claim'][0]}** ({p['claim'][1]})"})
        for r in sp["seeds"]:
            mv = next(x for x in m.seeds if x["seed"] == r["seed"])
            cr = next((x for x in cv["seeds"] if x["seed"] == r["seed"]), None)
            er = next((x for x in ec["seeds"] if x["seed"] == r["seed"]), None)
            seeds.append({"pair": f"{pair.task} {pair.gp}", "seed": r["seed"],
                          "DoPr step to base best": _step_text(r["dopr_to_base_best_step"], r["dopr_censored"]),
                          "base step to DoPr best": _step_text(r["base_to_dopr_best_step"], r["base_censored"]),
                          "matched val/loss": _n(mv["level"], 3), "DoPr there": _n(mv["dopr"], 3),
                          "base there": _n(mv["base"], 3), "not matched": mv["why"],
                          "base last-quarter change": (f"{cr['change']:+.1%} ({cr['label']})"
                                                       if cr and math.isfinite(cr["change"])
                                                       else (cr["label"] if cr else "")),
                          "base at DoPr's wall-clock": "" if er is None else
                          _n(er["base"], 3) + (" (carried: flat)" if er["carried"] else "")
                          + (f" (re-run, step {er['longer_steps']:.0f})" if er.get("longer_steps") else "")})
    header = (f"§3b decomposition (dopr.analysis.decomposition): verdict seeds, each arm at its chosen setting, "
              f"DoPr − base paired by seed; intervals 95%.\n")
    if any(" vs " in p["pair"].gp for p in parts):
        header += ("Rows 'peer vs reference' put the peer (an optimizer outside the GP pairs) in DoPr's place and the "
                   "reference in the base's: every column then asks the same of the peer.\n")
    return "\n".join([header, markdown_table(pd.DataFrame(rows)), "Per seed:\n",
                      markdown_table(pd.DataFrame(seeds))])


# ---------------------------------------------------------------- across studies

def _csv_interval(row: pd.Series, prefix: str) -> str:
    """"+d [low, high] (verdict)" from a decomposition.csv row's ``<prefix>_diff/_low/_high/_verdict/_n``."""
    n = row.get(f"{prefix}_n")
    if n is None or not (isinstance(n, (int, float, np.integer, np.floating)) and n > 0):
        return "no seed"
    diff, low, high = (row[f"{prefix}_{k}"] for k in ("diff", "low", "high"))
    scale = "log ratio " if is_log_scale(str(row["metric"])) else ""
    bounds = f" [{low:+.3g}, {high:+.3g}]" if n >= 2 and math.isfinite(low) and math.isfinite(high) else ""
    return f"{scale}{diff:+.3g}{bounds} ({row[f'{prefix}_verdict']}, n={int(n)})"


def effects_table(studies: list[tuple[str, str, pd.DataFrame]]) -> str:
    """One row per DoPr/base (or peer/reference) pair of every study: §3b's four effects side by side, from
    each study's decomposition.csv. ``studies``: (name, link to its directory, its decomposition.csv frame)."""
    rows = []
    for name, link, frame in studies:
        for _, r in frame.iterrows():
            seeds = int(r["seeds"])
            faster = (f"DoPr to base's best on {int(r['speed_dopr_reached'])}/{seeds}, "
                      f"base to DoPr's best on {int(r['speed_base_reached'])}/{seeds}")
            compute = _csv_interval(r, "equal_compute")
            status = r.get("equal_compute_status")
            if compute == "no seed" and isinstance(status, str) and "not costlier" in status:
                compute = f"{_csv_interval(r, 'final')}, as at the last evaluation (DoPr's step no costlier)"
            elif compute == "no seed" and isinstance(status, str):
                compute = status.split(";")[0]
            reruns = r.get("equal_compute_reruns", 0)
            if isinstance(reruns, (int, float, np.integer, np.floating)) and reruns > 0:
                compute += (f"; the base re-run to DoPr's wall-clock on {int(reruns)}/{seeds} seeds, its val/loss "
                            f"flat at the end on {int(r['equal_compute_reruns_flat'])}")
            rows.append({
                "study": f"[{name}]({link})",
                "pair": f"{r['dopr']} ({r['dopr setting']}) vs {r['base']} ({r['base setting']})",
                "metric": f"`{r['metric']}`",
                "converged?": r["convergence"],
                "faster: reached the other's best val/loss": faster,
                "better at matched val/loss": _csv_interval(r, "matched_val"),
                "better at equal compute": compute,
                "at the last evaluation": _csv_interval(r, "final"),
                "the paper's claim": f"**{r['paper_claim']}**"})
    return markdown_table(pd.DataFrame(rows)) if rows else "no study has a decomposition.csv\n"
