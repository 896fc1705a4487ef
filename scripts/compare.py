#!/usr/bin/env python
"""The main job: a gradient preconditioner against its DoPr version on one task, same seeds.

    python scripts/compare.py                                  # lds, adamw vs dopr_adamw, seeds 0-4
    python scripts/compare.py task=robomimic_lift seeds=0 jobs=2
    python scripts/compare.py task=lds base=muon seeds=0,1,2,3,4 trainer.steps=3000 opt.lr=3e-3

Keys: task (a configs/task name), base (adamw | muon | signum | adamuon; DoPr is dopr_<base>), seeds
(comma list), jobs (runs at once, each with one torch thread), out (the comparison's directory,
default runs/compare/<task>_<base>). Any key with a dot (trainer.steps=..., opt.lr=...,
opt.ap.damping=..., task.batch_size=...) goes to every run as a Hydra override.

Each run is `python run.py ...` (dopr/runner.py) with its records in <out>/<opt>/seed<seed>/ and its
full output in that directory's stdout.log; a finished run is not repeated, so re-running resumes.
It prints one line per finished run, then the final val/loss and test metrics of both optimizers
(mean and standard deviation over the seeds), the paired DoPr-minus-base difference with its 95%
interval, and writes <out>/val_vs_test.png (one point per run).
"""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dopr.analysis.stats import drop_missing, higher_is_better, paired_difference  # noqa: E402
from dopr.cli import parse_script_args_and_overrides  # noqa: E402
from dopr.runner import Job, run_jobs  # noqa: E402

GPS = ("adamw", "muon", "signum", "adamuon")


@dataclass
class CompareArgs:
    """The module docstring's keys; any dotted key is a Hydra override for every run."""
    task: str = "lds"
    base: str = "adamw"
    seeds: str = "0,1,2,3,4"
    jobs: int = 2
    out: str = ""  # default: runs/compare/<task>_<base>

    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]

    def __post_init__(self):
        if self.base not in GPS:
            raise ValueError(f"base={self.base!r}: pick one of {', '.join(GPS)} (DoPr runs dopr_<base>)")
        if not (ROOT / "configs" / "task" / f"{self.task}.yaml").exists():
            tasks = sorted(p.stem for p in (ROOT / "configs" / "task").glob("*.yaml"))
            raise ValueError(f"task={self.task!r} has no configs/task/{self.task}.yaml; tasks: {', '.join(tasks)}")
        try:
            seeds = self.seed_list()
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r}: write a comma list of integers, e.g. seeds=0,1,2") from None
        if not seeds or min(seeds) < 0 or self.jobs < 1:
            raise ValueError("seeds must list at least one integer >= 0 and jobs must be >= 1")
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:  # one seed is one pair of runs: listed twice it would pass for two seeds' agreement
            raise ValueError(f"seeds={self.seeds!r} lists seed {', '.join(map(str, twice))} twice; list each seed "
                             f"once, e.g. seeds={','.join(map(str, sorted(set(seeds))))}")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    args, overrides = parse_script_args_and_overrides(argv, CompareArgs, __doc__)
    cfg = asdict(args)
    cfg["seeds"] = args.seed_list()
    cfg["out"] = Path(args.out or ROOT / "runs" / "compare" / f"{args.task}_{args.base}")
    return cfg, overrides


def jobs(cfg: dict, overrides: list[str]) -> list[Job]:
    return [Job(cfg["out"] / opt / f"seed{seed}", (f"task={cfg['task']}", f"opt={opt}", f"seed={seed}", *overrides))
            for seed in cfg["seeds"] for opt in (cfg["base"], f"dopr_{cfg['base']}")]


def show(job: Job, summary: dict, seconds: float) -> None:
    opt, seed = job.run_dir.parent.name, job.run_dir.name.removeprefix("seed")
    headline = summary["headline_metric"]
    took = f"{seconds:5.0f} s" if seconds else "  (done)"
    print(f"[compare] {opt:<12} seed {seed}: {took}  val/loss={summary['last']['val/loss']:.4g}  "
          f"{headline}={summary['last'][headline]:.4g}", flush=True)


def _mean_sd(values: list[float]) -> str:
    """Mean ± sd over seeds; a missing value (NaN, null in summary.json) is left out and counted."""
    x, missing = drop_missing(values)
    note = f" ({missing} missing)" if missing else ""
    if len(x) == 0:
        return f"n/a{note}"
    if len(x) == 1:
        return f"{x[0]:.4g}{note}"
    return f"{x.mean():.4g} ± {x.std(ddof=1):.2g}{note}"


def report(cfg: dict, summaries: dict[tuple[str, int], dict]) -> None:
    base, dopr = cfg["base"], f"dopr_{cfg['base']}"
    first = next(iter(summaries.values()))
    headline, headline_higher = first["headline_metric"], first["higher_is_better"]
    metrics = ["val/loss", headline]
    value = {(opt, s): summaries[(opt, s)]["last"] for opt in (base, dopr) for s in cfg["seeds"]}
    n = len(cfg["seeds"])
    print(f"\nfinal evaluation, {cfg['task']}, seeds {','.join(map(str, cfg['seeds']))} "
          f"({'mean ± sd over seeds' if n > 1 else 'one seed'}):")
    print("| optimizer | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for opt in (base, dopr):
        print(f"| {opt} | " + " | ".join(_mean_sd([value[(opt, s)][m] for s in cfg["seeds"]]) for m in metrics) + " |")
    if n > 1:
        print(f"\n{dopr} minus {base}, paired by seed (95% t-interval; ratios as log ratios):")
    else:
        print(f"\n{dopr} minus {base}, seed {cfg['seeds'][0]} (one seed: no interval):")
    for m in metrics:
        higher = higher_is_better(m, headline, headline_higher)
        r = paired_difference({s: value[(dopr, s)][m] for s in cfg["seeds"]},
                              {s: value[(base, s)][m] for s in cfg["seeds"]}, m, higher)
        scale = "log ratio " if r.scale == "log" else ""
        if n > 1:
            print(f"  {m}: {scale}{r.diff.mean:+.3g} {r.diff.bounds()}, DoPr better on "
                  f"{round(r.dopr_better_fraction * r.diff.n)}/{r.diff.n} seeds: {r.verdict}")
        elif r.diff.n:
            side = "same" if r.diff.mean == 0 else "better" if (r.diff.mean > 0) == higher else "worse"
            print(f"  {m}: {scale}{r.diff.mean:+.3g} (DoPr {side})")
        else:
            print(f"  {m}: n/a (a side has no value)")
    figure = cfg["out"] / "val_vs_test.png"
    _figure(cfg, value, headline, figure)
    print(f"\nfigure: {figure}\nrecords: {cfg['out']}/<opt>/seed<seed>/metrics.jsonl, summary.json")


def _figure(cfg: dict, value: dict, headline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for opt, color in ((cfg["base"], "tab:blue"), (f"dopr_{cfg['base']}", "tab:red")):
        xs = [value[(opt, s)]["val/loss"] for s in cfg["seeds"]]
        ys = [value[(opt, s)][headline] for s in cfg["seeds"]]
        ax.scatter(xs, ys, color=color, label=opt)
    if "ratio" in headline:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))
    ax.set_xlabel("val/loss (one-step)")
    ax.set_ylabel(f"{headline} (test time)")
    ax.set_title(f"{cfg['task']}: one point per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    cfg, overrides = parse(argv)
    cfg["out"].mkdir(parents=True, exist_ok=True)
    todo = jobs(cfg, overrides)
    extra = f" with {' '.join(overrides)}" if overrides else ""
    print(f"[compare] {cfg['task']}: {cfg['base']} vs dopr_{cfg['base']}, seeds {cfg['seeds']}{extra}; "
          f"{cfg['jobs']} at a time, 1 thread each; records under {cfg['out']}", flush=True)
    summaries = run_jobs(todo, cfg["jobs"], on_done=show)
    keys = [(job.run_dir.parent.name, int(job.run_dir.name.removeprefix("seed"))) for job in todo]
    report(cfg, dict(zip(keys, summaries)))


if __name__ == "__main__":
    main(sys.argv[1:])
