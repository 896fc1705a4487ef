"""The studies whose data are committed under results/: where their records are, what they claim, the
sweep commands that made them, and how their cells are keyed. ``scripts/study.py study=<name>`` reads
an entry; every key can be overridden on its command line (``sweep=``, ``out=``, ``tune_seeds=``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
    tune_seeds: str = "0-4"
    verdict_seeds: str = ""
    cell_keys: list[str] = field(default_factory=lambda: ["opt.lr"])  # settings both sides of a pair share
    ap_keys: list[str] = field(default_factory=lambda: ["opt.ap.damping"])  # DoPr-only settings, one row each
    fixed: dict = field(default_factory=dict)  # columns the CSV lacks but the sweep command pinned
    predictors: list[str] = field(default_factory=lambda: ["val/loss"])  # one-step metrics correlated with the test one
    secondary: list[str] = field(default_factory=list)  # further test metrics paired in every cell (last evaluation)
    notes: list[str] = field(default_factory=list)
    verdict_where: dict = field(default_factory=dict)  # one cell of a verdict axis: the verdict runs kept
    similar_margin: float = 0.1  # observation 1's band: base GPs "similar" within this fraction of the best's mean


GYM_PREDICTORS = ["val/loss", "val/train_set_loss", "test/state_shift"]

# Every study is run by scripts/run_study.py to docs/STUDIES.md: one entry per cell of the plan's verdict
# axes, each a verdict of its own, all read from the one evals.csv that scripts/aggregate.py wrote from
# the sweep (the run dirs themselves are not committed; evals.csv keeps each run's SHA and versions).
STUDIES: dict[str, StudySpec] = {}


def _cells(name: str, plan: str, task: str, claim: str, metric: str, cells: list[dict], label, group: str,
           **extra) -> list[StudySpec]:
    """One StudySpec per verdict cell of a run_study plan (``cells``: the settings of each cell)."""
    evals = f"results/{name}/evals.csv"
    commands = [f"python scripts/run_study.py plan={plan}",
                f"python scripts/aggregate.py sweep=multirun/{plan} out=results/{name} "
                f"group=opt.name,opt.lr,opt.ap.damping{',' + group if group else ''}"]
    return [StudySpec(name=f"{name}_{label(c)}" if label(c) else name, task=task, claim=claim(c) if callable(claim) else claim.format(**{k.rsplit('.', 1)[-1]: v for k, v in c.items()}),
                      metric=metric,
                      sweep=[evals], out=f"results/{name}/{label(c)}".rstrip("/"),
                      readme=f"experiments/{task.split('_')[0]}/README.md", commands=commands, verdict_where=c, **extra)
            for c in cells]


def _one_cell(name: str, task: str, claim: str, metric: str, **extra) -> dict[str, StudySpec]:
    """A run_study plan without verdict axes, registered under the plan's own name."""
    return {s.name: s for s in _cells(name, name, task, claim, metric, [{}], lambda c: "", "", **extra)}


STUDIES.update({s.name: s for s in _cells(
    "lds_anisotropy", "lds_anisotropy", "lds",
    "DoPr lowers the LDS closed-loop cost ratio against its GP (2 demonstrations, process-noise condition number {noise_cond:g})",
    "test/cost_ratio", [{"task.noise_cond": v} for v in (1.0, 1e2, 1e4, 1e6)],
    lambda c: f"cond1e{round(math.log10(c['task.noise_cond']))}", "task.noise_cond",
    tune_seeds="0-2", verdict_seeds="10-19", secondary=["test/ttf_shift", "test/final_state_error"],
    notes=["tuned at noise_cond 1e6; the other conditions reuse those settings"])})

STUDIES.update(_one_cell(
    "flow_2d_checkerboard", "flow_2d_checkerboard",
    "DoPr's samples are closer to the checkerboard density (sliced W2 at 8 Euler steps) than its GP's",
    "test/swd", tune_seeds="0-1", verdict_seeds="10-17",
    secondary=["test/swd@1", "test/swd@2", "test/swd@64", "test/nll"],
    notes=["the AdamW and Muon pairs (the Muon pair ran later, into the same sweep root)"]))
STUDIES.update({s.name: s for s in _cells(
    "gym_hopper_noise", "gym_hopper_noise", "gym_hopper",
    lambda c: (f"DoPr raises Hopper-v5 behavior-cloning return against its GP ({c['task.train_episodes']} demos, "
               f"action-noise std {int(c['task.dataset'].split('noise')[1][:2]) / 10:g} in the labels)"),
    "test/return", [{"task.dataset": f"dopr/hopper/ars-noise{n}-v0", "task.train_episodes": e}
                    for e in (10, 2) for n in ("00", "01", "03")],
    lambda c: f"noise{c['task.dataset'].split('noise')[1][:2]}_demos{c['task.train_episodes']}",
    "task.dataset,task.train_episodes", tune_seeds="0-1", verdict_seeds="10-17",
    predictors=GYM_PREDICTORS, secondary=["test/state_shift", "val/train_set_loss"],
    notes=["all four GPs with and without AP with 10 demos at action noise 0 and 0.3; the AdamW and Signum pairs "
           "in the 2-demo cells and at noise 0.1 (the other pairs cut there for this box's budget: verdict_cut in the plan)",
           "tuned at action noise 0.3 with 10 demos; the other cells reuse those settings"])})
STUDIES.update({s.name: s for s in _cells(
    "gym_walker2d_budget", "gym_walker2d_budget", "gym_walker2d",
    "DoPr raises Walker2d-v5 behavior-cloning return against its GP after 300 steps ({train_episodes} clean demos)",
    "test/return", [{"task.train_episodes": e} for e in (2, 10)], lambda c: f"demos{c['task.train_episodes']}",
    "task.train_episodes", tune_seeds="0-1", verdict_seeds="10-17",
    predictors=GYM_PREDICTORS, secondary=["test/state_shift", "val/train_set_loss"],
    notes=["all four GPs with and without AP; Muon, Signum and AdaMuon share the AdamW pair's lr grid (AdamW-scaled lrs)",
           "budget-limited by design: 300 steps (at 2000, AdamW reaches the expert from 2 demos)",
           "tuned with 2 demos; the 10-demo cell reuses those settings"])})
STUDIES.update(_one_cell(
    "flow_digits_unet", "flow_digits_unet",
    "DoPr-AdamW's digit samples are closer to the data (Frechet distance at 16 Euler steps) than AdamW's",
    "test/fid", tune_seeds="0-1", verdict_seeds="10-17",
    secondary=["test/fid@1", "test/fid@2", "test/fid@64", "test/acc"],
    notes=["AdamW pair only (the Muon pair was cut for this box's budget)"]))
STUDIES.update(_one_cell(
    "robomimic_lift_3demos", "robomimic_lift",
    "DoPr-AdamW reaches a higher best-checkpoint Lift success rate (low-dim, 3 demos, 9 Euler steps) than AdamW",
    "test/success_rate", tune_seeds="0-1", verdict_seeds="10-17",
    predictors=["val/loss", "val/action_mse"], secondary=["val/action_mse"],
    notes=["AdamW pair only (the Muon pair was cut for this box's budget)",
           "20 rollouts per evaluation on the tuning seeds, 50 on the verdict seeds (verdict_overrides)"]))
STUDIES.update(_one_cell(
    "lm_arith_len45", "lm_arith",
    "DoPr generates more exactly right answers to held-out 4- and 5-digit additions than its GP",
    "test/exact_match", tune_seeds="0-2", verdict_seeds="10-17",
    predictors=["val/loss", "val/sequence_nll"],
    secondary=["test/exact_match_len4", "test/exact_match_len5", "test/exact_match_whole_sequence"],
    notes=["the AdamW and Muon pairs (the Muon pair ran later, into the same sweep root)",
           "budget-limited: AdamW's val/loss is still falling at 1200 steps"]))
