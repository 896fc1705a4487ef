"""APConfig: the settings of activation preconditioning, each validated where it is given.

One name per setting (``opt.ap.<field>`` on the command line is the field's own name), checked
by :func:`check_ap_setting` both at construction and by ``check_optimizer_args`` before any model
exists, so a bad value is refused with the field's name and the expected form.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

BIAS_MODES = ("augment", "gp")
SOLVERS = ("auto", "primal")


def is_number(value) -> bool:
    """A finite real number (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    """A finite real number with an integral value (2 or 2.0)."""
    return is_number(value) and float(value).is_integer()


def _exclude_patterns(value) -> tuple[str, ...] | None:
    """A single string is one pattern (``opt.ap.exclude=net.*`` on the command line); else a list of them."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        patterns = tuple(value)
        return patterns if all(isinstance(p, str) for p in patterns) else None
    return None


def _same(value):
    return value


# field -> (is the value valid, its normalized form, the expected form for the error message)
_AP_SETTINGS = {
    "damping": (lambda v: is_number(v) and v >= 0, float, "a finite number >= 0, e.g. 1e-3"),
    "stat_decay": (lambda v: is_number(v) and 0 <= v < 1, float, "a number in [0, 1), e.g. 0.0 or 0.95"),
    "stat_interval": (lambda v: is_integer(v) and v >= 1, int, "an integer >= 1, e.g. 1"),
    "inverse_interval": (lambda v: is_integer(v) and v >= 1, int, "an integer >= 1, e.g. 1"),
    "max_rows": (lambda v: v is None or (is_integer(v) and v >= 1), lambda v: v if v is None else int(v),
                 "null (every row) or an integer >= 1, e.g. 4096"),
    "bias": (lambda v: isinstance(v, str) and v in BIAS_MODES, _same, f"one of {', '.join(BIAS_MODES)}"),
    "start_step": (lambda v: is_integer(v) and v >= 0, int, "an integer >= 0, e.g. 0"),
    "exclude": (lambda v: _exclude_patterns(v) is not None, _exclude_patterns,
                "a module-name pattern (fnmatch) or a list of them, e.g. head or [head, 'encoder.*']"),
    "solver": (lambda v: isinstance(v, str) and v in SOLVERS, _same, f"one of {', '.join(SOLVERS)}"),
}


def check_ap_setting(key: str, value):
    """``value`` of APConfig field ``key``, validated and normalized (ints for counts, a tuple of
    patterns for ``exclude``). Raises ValueError naming the field and the expected form."""
    valid, normalize, form = _AP_SETTINGS[key]
    if not valid(value):
        raise ValueError(f"{key} must be {form}; got {value!r}")
    return normalize(value)


# Named AP settings: dopr_<gp>_<preset> is dopr_<gp> with these settings under any ap= given. "cheap":
# statistics and P every 10 steps (refreshes staggered across layers), rows sub-sampled to about 1024, so
# that per step AP costs about G·P alone (docs/cost.md).
AP_PRESETS = {"cheap": {"stat_interval": 10, "inverse_interval": 10, "max_rows": 1024}}


@dataclass
class APConfig:
    """Hyperparameters of activation preconditioning. Paper defaults: per-batch S, every step."""

    damping: float = 1e-3  # relative to the mean eigenvalue tr(S)/d
    stat_decay: float = 0.0  # 0: S of the current batch; b in (0,1): S <- b*S + (1-b)*S_batch
    stat_interval: int = 1  # record statistics every k steps
    inverse_interval: int = 1  # recompute P every k steps (staggered across layers when > 1)
    max_rows: int | None = None  # sub-sample z to about this many rows (strided, no RNG)
    bias: str = "augment"  # "augment": precondition [W b] with z augmented by 1; "gp": biases untouched
    start_step: int = 0  # AP from this step on; plain gradients before it
    exclude: tuple[str, ...] = field(default_factory=tuple)  # fnmatch patterns of module names to skip (a str is one)
    solver: str = "auto"  # "auto": batch-space (Woodbury) G P when it is cheaper; "primal": always d x d

    def batch_space_allowed(self) -> bool:
        """Woodbury needs S to be exactly this step's batch and a nonzero damping."""
        return (self.solver == "auto" and self.stat_decay == 0 and self.stat_interval == 1
                and self.inverse_interval == 1 and self.damping > 0)

    def __post_init__(self):
        for f in fields(self):
            try:
                setattr(self, f.name, check_ap_setting(f.name, getattr(self, f.name)))
            except ValueError as error:
                raise ValueError(f"APConfig: {error}") from None
