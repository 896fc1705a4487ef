"""A study plan, ``configs/study/<plan>.yaml``: the one definition of a study (docs/STUDIES.md).

The plan states what the study claims (``claim``, with the metric and its direction, and ``metric``),
where it is reported (``readme``), what the tuning and the verdict run (``dopr/study.py`` stages them),
and its verdict cells: the product of ``verdict_axes`` ({key: [values]}, the first axis varying
slowest), each cell a study of its own in ``results/<plan>/<cell>``. ``cell`` and ``claim`` name a
cell by its settings: ``{task.noise_cond}`` in them is the cell's value of that key, written as the
plan's ``value_labels`` says for that template (``{key: {value: {cell: ..., claim: ...}}}``), else as
the value itself. ``dopr/analysis/studies.py`` derives each cell's study from here.

The keys, their types and defaults are StudyPlan's: an unknown key (a typo such as verdict_axis) or a
value of the wrong type is refused before any run, naming the key and the plan file.
"""

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf

from dopr.paths import REPO_ROOT

PLANS = REPO_ROOT / "configs" / "study"
Setting = int | float | str | bool  # a config value a plan sets (task.noise_cond: 1e6, task.dataset: <id>)
TEMPLATES = ("cell", "claim")  # the plan's strings that name a verdict cell by its settings
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass
class StudyPlan:
    """A configs/study/<plan>.yaml: its keys, their types, and the optional keys' defaults."""
    task: str  # the task config's name
    claim: str  # one sentence: the metric, its direction, the setting (docs/STUDIES.md §1)
    metric: str  # the headline test metric, the one tuning chooses by
    readme: str  # the experiment README that reports the study
    optimizers: list[str]
    lrs: list[float]
    dampings: list[float]
    tune_seeds: list[int]
    verdict_seeds: list[int]
    overrides: list[str] = field(default_factory=list)  # every run
    tune_overrides: list[str] = field(default_factory=list)
    verdict_overrides: list[str] = field(default_factory=list)
    default_damping: float = 1e-3  # what the lr stage runs DoPr at
    extend: int = 2  # how many times a grid whose best value is at an edge is extended past it
    tune_at: dict[str, Setting] = field(default_factory=dict)  # the settings tuning runs at
    verdict_axes: dict[str, list[Setting]] = field(default_factory=dict)
    verdict_cut: list[dict] = field(default_factory=list)  # [{where: {key: value}, optimizers: [...]}]
    cell: str = ""  # a verdict cell's dir under results/<plan>/ (and its study's name suffix); needs every axis
    value_labels: dict[str, dict[Setting, dict[str, str]]] = field(default_factory=dict)
    predictors: list[str] = field(default_factory=lambda: ["val/loss"])  # one-step metrics correlated with the test one
    secondary: list[str] = field(default_factory=list)  # further test metrics paired in every cell (last evaluation)
    notes: list[str] = field(default_factory=list)  # said next to the verdict (provenance.json)
    # Arms that are no GP of a DoPr/base pair (peer optimizers such as soap and kron, AP presets such as
    # dopr_adamw_cheap): tuned and run like the others, left out of the GP-pair tables and observations, and
    # each compared with every one of ``references`` (decomposition.md: paired by seed, with §3b's parts)
    peers: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    # §3b's equal compute: each listed base GP is re-run on the verdict seeds at its chosen setting for the steps
    # its DoPr partner's wall-clock buys it (dopr/study.py's equal_compute stage), where its verdict runs end sooner
    equal_compute: list[str] = field(default_factory=list)
    # true while its sweeps run (across sessions): no results are committed yet, so it is not a registered
    # study (dopr/analysis/studies.py) and the README lists nothing of it
    in_progress: bool = False

    def __post_init__(self):
        for cut in self.verdict_cut:
            unknown = sorted(set(cut.get("optimizers", [])) - set(self.optimizers))
            if set(cut) != {"where", "optimizers"} or not isinstance(cut["where"], dict) or unknown:
                raise ValueError(f"verdict_cut entry {cut} needs exactly the keys where and optimizers, the latter "
                                 f"from the plan's optimizers {self.optimizers}")
        strangers = sorted(set(self.peers + self.references) - set(self.optimizers))
        if strangers:
            raise ValueError(f"peers and references must be among the plan's optimizers; {strangers} are not")
        if bool(self.peers) != bool(self.references) or set(self.peers) & set(self.references):
            raise ValueError(f"peers {self.peers} need references {self.references} to be compared with (both or "
                             f"neither), and no optimizer can be both")
        bad = [b for b in self.equal_compute if b.startswith("dopr_") or b not in self.optimizers
               or f"dopr_{b}" not in self.optimizers]
        if bad:
            raise ValueError(f"equal_compute: {bad} must be base GPs among the plan's optimizers, each with its "
                             f"DoPr partner (dopr_<gp>) there too")
        overlap = set(self.tune_seeds) & set(self.verdict_seeds)
        if overlap:
            raise ValueError(f"seeds {sorted(overlap)} are both tuning and verdict seeds")
        for template in TEMPLATES:
            unknown = sorted(set(PLACEHOLDER.findall(getattr(self, template))) - set(self.verdict_axes))
            if unknown:
                raise ValueError(f"{template}: {{{unknown[0]}}} is not one of the verdict_axes "
                                 f"{list(self.verdict_axes)}")
        if self.verdict_axes and not all(f"{{{key}}}" in self.cell for key in self.verdict_axes):
            raise ValueError(f"cell: {self.cell!r} must name every verdict axis ({', '.join(self.verdict_axes)}) "
                             f"in braces, so that each verdict cell has a results dir of its own")
        for key, labels in self.value_labels.items():
            values = self.verdict_axes.get(key)
            if values is None:
                raise ValueError(f"value_labels: {key} is not one of the verdict_axes {list(self.verdict_axes)}")
            for value, label in labels.items():
                if value not in values or not set(label) <= set(TEMPLATES):
                    raise ValueError(f"value_labels: {key}: {value!r}: {label} must label one of {values} for "
                                     f"{' and/or '.join(TEMPLATES)}")


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


def plan_names(plans: Path | None = None) -> list[str]:
    """The committed plans, by name (configs/study/<name>.yaml)."""
    return sorted(p.stem for p in (plans or PLANS).glob("*.yaml"))


def load_plan(name: str, plans: Path | None = None) -> dict:
    """configs/study/<name>.yaml checked against StudyPlan, as a dict with every key (defaults filled in)."""
    plans = plans or PLANS
    path = plans / f"{name}.yaml"
    where = path.relative_to(REPO_ROOT) if REPO_ROOT in path.parents else path
    if not path.exists():
        raise SystemExit(f"plan={name!r}: no {where}; plans: {', '.join(plan_names(plans))}")
    plan = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    fields = {f.name: f for f in dataclasses.fields(StudyPlan)}
    types_ = get_type_hints(StudyPlan)
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
        if not _is(value, types_[key]):
            raise SystemExit(f"{where}: {key}: {value!r} is not of type {_type_name(types_[key])}; "
                             f"write it as the committed plans do (e.g. configs/study/gym_hopper_noise.yaml)")
    try:
        return dataclasses.asdict(StudyPlan(**plan))
    except ValueError as error:
        raise SystemExit(f"{where}: {error}") from None


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


def name_cell(plan: dict, cell: dict, template: str) -> str:
    """The plan's ``cell`` or ``claim`` template with each {key} replaced by the cell's value of key, as
    ``value_labels`` writes it for that template (else as written: str(value))."""
    def label(match: re.Match) -> str:
        key = match[1]
        return plan["value_labels"].get(key, {}).get(cell[key], {}).get(template, str(cell[key]))

    return PLACEHOLDER.sub(label, plan[template])
