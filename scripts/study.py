#!/usr/bin/env python
"""One command per study: its runs.csv, provenance.json, tables, figure and top-README row.

    python scripts/study.py study=lm_arith_len45           # a committed study: configs/study/lm_arith_len45.yaml
    python scripts/study.py study=lm_arith_len45 sweep=multirun/lm_tune,multirun/lm_verdict \\
        out=results/lm_rerun tune_seeds=0,1,2 verdict_seeds=10-17
    python scripts/study.py study=my_study sweep=multirun/x out=results/my_study metric=test/return \\
        claim="DoPr raises return" readme=experiments/my/README.md
    python scripts/study.py help

Keys (a committed study's plan supplies them all, one study per verdict cell of the plan, named
<plan>_<cell> (dopr/analysis/studies.py); any given here wins):
  study=NAME            the study's name (the study column of runs.csv)
  task=NAME             the task config's name, for records that lack it (CSVs)
  sweep=A,B             sweep dirs (run.py -m) and/or evals.csv files (scripts/aggregate.py), tuning and verdict
  out=DIR               where the files go
  metric=test/...       the headline test metric (its direction: the runs' summary.json, else its name)
  tune_seeds=0-4        seeds used to choose settings; verdict_seeds=10-17: fresh seeds for the verdict
                        (lists "0,1,2", ranges "10-17"; a seed in the data that is in neither is an error)
  cell_keys=opt.lr      settings both sides of a pair share ("none" for no key)
  ap_keys=opt.ap.damping  DoPr-only settings: each value is its own row against the same base runs
  claim="..."  readme=PATH  commands="cmd one;cmd two"  (for provenance and the README row)
  secondary=test/a,test/b  further test metrics paired in every cell (at the last evaluation)
  predictors=val/loss   one-step metrics whose Spearman rho with the test metric is reported
  resamples=2000        bootstrap resamples for the Spearman interval
  similar_margin=0.1    observation 1's band: base GPs are "similar" when every pairwise interval is within
                        this fraction of the best base GP's mean
  peers=soap,kron references=adamw,dopr_adamw
                        arms outside the GP pairs, left out of the GP-pair tables and compared with each
                        reference in decomposition.md (a plan's peers: and references:)
  verdict_where="task.noise_cond=1e2"  keep only the verdict runs at these settings (";" between several):
                        one cell of a plan's verdict_axes, tuning runs untouched

Writes to out/ (dopr/analysis/results.py): evals.csv (every evaluation point, with each run's git SHA,
versions and threads; only when every source is a sweep dir, so that the study can be re-made from committed
files), runs.csv (data contract, docs/STUDIES.md §5: one row per run, final/, best/ and valpick/ of every
metric), provenance.json, cells.{csv,md} (DoPr − base paired by seed in every cell),
choice.{csv,md} (each optimizer's setting chosen on the tuning seeds by the test metric and by val loss),
headline.{csv,md} (each GP vs DoPr at their chosen settings, with the verdict), observations.{csv,md} (the paper's
three Fig. 7 observations with verdict words), decoupling.{csv,md} (Spearman over each optimizer's runs),
arms.{csv,md} (Spearman across optimizers of their seed means: does the arm that fits better deploy better),
val_vs_test.png, lr_curves.png (when lr varies), study.md (all tables) and readme_row.{json,md} (for scripts/results_table.py).
"""

import shlex
import sys
from dataclasses import dataclass

from dopr.analysis.results import write_study
from dopr.analysis.studies import StudySpec, studies
from dopr.cli import parse_script_args


@dataclass
class StudyArgs:
    """The keys of the module docstring; None: not given, the registered study's value stands."""
    study: str
    task: str | None = None
    sweep: str | None = None
    out: str | None = None
    metric: str | None = None
    tune_seeds: str | None = None
    verdict_seeds: str | None = None
    cell_keys: str | None = None
    ap_keys: str | None = None
    claim: str | None = None
    readme: str | None = None
    commands: str | None = None
    resamples: int = 2000
    predictors: str | None = None
    secondary: str | None = None
    verdict_where: str | None = None
    similar_margin: float | None = None
    peers: str | None = None
    references: str | None = None


def parse_seeds(text: str, key: str) -> list[int]:
    """ "0,1,2" or "10-17" or a mix ("0-2,5") -> sorted ints; empty -> []."""
    seeds = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                seeds.update(range(low, high + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise SystemExit(f"{key}={text!r}: not seeds; write e.g. {key}=0,1,2 or {key}=10-17") from None
    return sorted(seeds)


def parse_where(text: str) -> dict:
    """ "task.noise_cond=1e2;task.dataset=x" -> {"task.noise_cond": 100.0, "task.dataset": "x"}."""
    where = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise SystemExit(f"verdict_where={text!r}: write key=value pairs separated by ';'")
        key, value = (x.strip() for x in part.split("=", 1))
        try:
            where[key] = float(value)
        except ValueError:
            where[key] = value
    return where


def parse_keys(text: str) -> list[str]:
    return [] if text.strip() in ("", "none") else [k.strip() for k in text.split(",") if k.strip()]


def spec_from(args: StudyArgs) -> StudySpec:
    """The registered study (dopr/analysis/studies.py, from its plan) with every key given here in its place."""
    given = {key: value for key, value in vars(args).items() if value is not None}
    spec = studies().get(args.study)
    if spec is None:
        missing = [k for k in ("sweep", "out", "metric") if k not in given]
        if missing:
            raise SystemExit(f"study={args.study} is not registered ({', '.join(studies())}); "
                             f"a new study needs {', '.join(k + '=' for k in missing)}")
        spec = StudySpec(name=args.study, task=given.get("task", ""), claim=given.get("claim", ""),
                         metric=args.metric, sweep=[], out="", readme=given.get("readme", ""), commands=[])
    overrides = {}
    for key in ("task", "claim", "metric", "out", "readme", "similar_margin"):
        if key in given:
            overrides[key] = given[key]
    for key in ("tune_seeds", "verdict_seeds"):
        if key in given:
            overrides[key] = parse_seeds(given[key], key)
    if "sweep" in given:
        overrides["sweep"] = parse_keys(args.sweep)
        overrides["fixed"] = {}  # pinned values belong to the registered sources
    if "commands" in given:
        overrides["commands"] = [c.strip() for c in args.commands.split(";") if c.strip()]
    for key in ("cell_keys", "ap_keys", "predictors", "secondary", "peers", "references"):
        if key in given:
            overrides[key] = parse_keys(given[key])
    if "verdict_where" in given:
        overrides["verdict_where"] = parse_where(args.verdict_where)
    return StudySpec(**{**spec.__dict__, **overrides})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_script_args(argv, StudyArgs, __doc__)
    spec = spec_from(args)
    if not spec.out or not spec.sweep:
        raise SystemExit("sweep= and out= are needed (a registered study has them)")
    command = "python scripts/study.py " + " ".join(shlex.quote(a) for a in argv)
    write_study(spec, command, args.resamples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
