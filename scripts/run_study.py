#!/usr/bin/env python
"""Run a study's sweeps in the order docs/STUDIES.md asks for, resumably, two runs at a time.

    python scripts/run_study.py plan=lds_anisotropy            # configs/study/lds_anisotropy.yaml
    python scripts/run_study.py plan=lds_anisotropy jobs=2 stage=tune

Stage tune chooses each optimizer's learning rate (then each DoPr optimizer's damping) on the tuning
seeds, extending a grid whose best value is at an edge; stage verdict runs the choices on the fresh
verdict seeds in every cell of the plan's verdict_axes; stage equal_compute re-runs the plan's
equal_compute bases for the steps their DoPr partner's wall-clock buys them (dopr/study.py says how; the
plan's keys are dopr/analysis/plan.py's StudyPlan, checked before any run).
Keys: plan (a configs/study name), jobs (runs at once, one thread each; default 2), stage (tune,
verdict, equal_compute or all; default all), sweep_root (default multirun/<plan>), optimizers (default all of the
plan's: run only these, e.g. ``optimizers=[muon,dopr_muon]`` to finish one GP pair's tuning and
verdict before the next starts, so a session that ends early leaves whole pairs).
The choice of each stage is written to <sweep_root>/choice.json (merged: a run for some optimizers
keeps the others' choices); scripts/study.py then makes the study's tables from the sweep directories.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopr.analysis.plan import load_plan  # noqa: E402
from dopr.cli import parse_script_args  # noqa: E402
from dopr.study import STAGES, default_root, only_optimizers, run_stages  # noqa: E402


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


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, RunStudyArgs, __doc__)
    plan = only_optimizers(load_plan(args.plan), args.optimizers)
    run_stages(plan, Path(args.sweep_root or default_root(args.plan)), args.stage, args.jobs)


if __name__ == "__main__":
    main(sys.argv[1:])
