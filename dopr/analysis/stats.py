"""The statistics every study uses: metric direction, the rule for infinite and missing values, 95%
t-intervals, paired DoPr-minus-base differences with a verdict word, and bootstrap Spearman.

Infinite and missing values, one rule for every table and figure:
- ``NaN`` (or a missing value) is a run left out: it is dropped before any statistic and counted.
- ``+inf`` / ``-inf`` is a result (a diverged rollout's cost is the worst value there is): it is kept,
  so a mean over it is infinite and a 95% interval over a set containing it is unbounded
  (``low = -inf, high = +inf``). A log ratio with an infinite side is infinite, likewise kept.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# Direction by the words of a metric's name (its last path part, split on "_" and "@"): the first
# matching rule wins, so "return_std" (a spread) has no direction rather than return's.
NO_DIRECTION_WORDS = {"std", "length", "lr", "time"}
LOWER_IS_BETTER_WORDS = {"loss", "cost", "error", "fid", "w2", "nll", "shift", "swd", "mse", "diverged"}
HIGHER_IS_BETTER_WORDS = {"return", "success", "accuracy", "acc", "exact", "match"}
# Metrics that are ratios (learner cost / expert cost) are compared as log ratios: a 1000x gap and a
# 1.1x gap do not belong on one linear scale.
LOG_SCALE_WORDS = {"ratio"}
CONFIDENCE = 0.95


def _words(metric: str) -> set[str]:
    return set(re.split(r"[_@]", metric.rsplit("/", 1)[-1]))


def higher_is_better(metric: str, headline: str | None = None, headline_higher: bool | None = None) -> bool | None:
    """True/False for a metric whose better direction is known, None for one without (a spread, a length).

    ``headline``/``headline_higher`` are a run's summary.json ``headline_metric`` and
    ``higher_is_better``: a task's own statement about its headline metric wins over the name rule.
    """
    if headline is not None and metric == headline and headline_higher is not None:
        return bool(headline_higher)
    words = _words(metric)
    if words & NO_DIRECTION_WORDS:
        return None
    if words & LOWER_IS_BETTER_WORDS:
        return False
    if words & HIGHER_IS_BETTER_WORDS:
        return True
    return None


def is_log_scale(metric: str) -> bool:
    """Whether paired differences of this metric are taken of its logarithm (ratios)."""
    return bool(_words(metric) & LOG_SCALE_WORDS)


def drop_missing(values) -> tuple[np.ndarray, int]:
    """(values without NaN, how many NaNs were dropped); infinite values stay (see the module docstring)."""
    x = np.asarray(values, dtype=float).ravel()
    missing = np.isnan(x)
    return x[~missing], int(missing.sum())


@dataclass
class Interval:
    """Mean and 95% t-interval of a sample; unbounded when the sample holds an infinite value."""

    mean: float
    low: float
    high: float
    n: int
    left_out: int = 0  # NaN values dropped

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 4) -> str:
        """``mean ± half``: the half-width to 2 significant digits and the mean to one place finer;
        ``mean (interval unbounded)`` over an infinite value; ``mean (one seed: no interval)`` for one value."""
        if self.n == 0:
            return "n/a"
        plain = f"{self.mean:+.{digits}g}" if math.isfinite(self.mean) else f"{self.mean}"
        if self.n == 1:
            return f"{plain} {self.bounds()}"
        if not math.isfinite(self.half_width):
            return f"{plain} (interval unbounded)"
        if self.half_width == 0:
            return f"{plain} ± 0"
        decimals = max(0, 2 - math.floor(math.log10(self.half_width)))
        return f"{self.mean:+.{decimals}f} ± {float(f'{self.half_width:.2g}'):g}"

    def bounds(self, digits: int = 3) -> str:
        """``[low, high]``; under two values there is no interval, and it says so instead of printing NaN
        (the values are seeds wherever this project takes an interval)."""
        if self.n < 2:
            return f"({'one seed' if self.n == 1 else 'no seed'}: no interval)"
        return f"[{self.low:+.{digits}g}, {self.high:+.{digits}g}]"


def mean_interval(values) -> Interval:
    """Mean and 95% t-interval (scipy.stats.t) of ``values`` under this module's rule for inf and NaN."""
    x, left_out = drop_missing(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, left_out)
    with np.errstate(invalid="ignore"):  # +inf and -inf together: the mean is undefined (NaN)
        mean = float(x.mean())
    if not np.isfinite(x).all():
        return Interval(mean, -math.inf, math.inf, n, left_out)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, left_out)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, left_out)


def verdict(interval: Interval, dopr_better_is_positive: bool) -> str:
    """docs/STUDIES.md §3: "held" when the interval excludes 0 on DoPr's better side, "reversed" when it
    excludes 0 on the other side, "inconclusive" otherwise (including an unbounded or one-seed interval)."""
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return "inconclusive"
    if interval.low > 0:
        return "held" if dopr_better_is_positive else "reversed"
    if interval.high < 0:
        return "reversed" if dopr_better_is_positive else "held"
    return "inconclusive"


@dataclass
class PairedResult:
    """DoPr minus base, paired by seed: the interval, both means, how often DoPr was better, the verdict."""

    metric: str
    scale: str  # "linear" or "log" (differences of natural logs, i.e. log ratios)
    seeds: list
    base_mean: float
    dopr_mean: float
    diff: Interval
    dopr_better_fraction: float
    verdict: str

    @property
    def resolution(self) -> float:
        """The smallest effect the study could have seen: the half-width of the 95% interval."""
        return self.diff.half_width

    def as_row(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k != "diff"}
        row["seeds"] = ",".join(str(s) for s in self.seeds)
        row.update(n=self.diff.n, diff=self.diff.mean, low=self.diff.low, high=self.diff.high,
                   half_width=self.resolution, left_out=self.diff.left_out)
        return row


def paired_difference(dopr: dict, base: dict, metric: str, higher: bool) -> PairedResult:
    """``dopr`` and ``base`` map seed -> value; seeds present on both sides are paired.

    A seed whose value is NaN on either side is left out (counted in ``diff.left_out``). Ratio metrics
    (``is_log_scale``) are differenced as natural logs. ``higher`` is the metric's better direction.
    Under two paired seeds there is no interval: ``diff.low``/``diff.high`` are NaN, the verdict is
    inconclusive and ``diff.format()``/``diff.bounds()`` say "one seed: no interval" (or "no seed").
    """
    if higher is None:
        raise ValueError(f"metric {metric!r} has no known better direction; pick one whose name says it "
                         f"(see dopr.analysis.stats.higher_is_better)")
    seeds = sorted(set(dopr) & set(base))
    a = np.array([dopr[s] for s in seeds], dtype=float)
    b = np.array([base[s] for s in seeds], dtype=float)
    log = is_log_scale(metric)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.log(a) - np.log(b) if log else a - b
    # inf - inf (both sides diverged) is a tie, not a missing run
    d = np.where(np.isnan(d) & ~np.isnan(a) & ~np.isnan(b) & (a == b), 0.0, d)
    diff = mean_interval(d)
    kept = ~np.isnan(d)
    signed = d[kept] if higher else -d[kept]
    better = float((signed > 0).mean()) if kept.any() else math.nan
    return PairedResult(metric, "log" if log else "linear", [s for s, k in zip(seeds, kept) if k],
                        mean_interval(b[kept]).mean, mean_interval(a[kept]).mean, diff, better,
                        verdict(diff, dopr_better_is_positive=higher))


@dataclass
class SpearmanResult:
    rho: float
    low: float
    high: float
    n: int
    p_value: float  # scipy's two-sided test of rho = 0
    resamples_used: int  # resamples with a defined rho (one that repeats a single point has none)


def percentile_interval(boot: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap values (NaN, NaN when there are none)."""
    if not len(boot):
        return math.nan, math.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_spearman(x, y, resamples: int = 2000, seed: int = 0) -> SpearmanResult:
    """Spearman rho of (x, y) (scipy.stats.spearmanr) with a 95% percentile interval from a bootstrap
    over the points (runs), seeded so the same data give the same interval.

    Pairs with a NaN on either side are left out; infinite values keep their rank (the worst)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    kept = ~(np.isnan(x) | np.isnan(y))
    x, y = x[kept], y[kept]
    n = len(x)
    if n < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return SpearmanResult(math.nan, math.nan, math.nan, n, math.nan, 0)
    full = stats.spearmanr(x, y)
    rho = float(full.statistic)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        boot = np.array([stats.spearmanr(x[i], y[i]).statistic for i in picks], dtype=float)
    boot = boot[~np.isnan(boot)]
    low, high = percentile_interval(boot)
    return SpearmanResult(rho, float(low), float(high), n, float(full.pvalue), len(boot))


def spearman_of_arm_means(x, y, resamples: int = 2000, seed: int = 0) -> SpearmanResult:
    """Spearman rho across arms of their seed means: ``x`` and ``y`` are arms x seeds, the same seed in
    each column (runs paired by seed). The 95% percentile interval comes from a bootstrap over the seeds,
    the columns resampled together, seeded; ``n`` counts arms. NaNs are left out of each mean; an arm
    with no value on one side is left out."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    kept = ~(np.isnan(x).all(axis=1) | np.isnan(y).all(axis=1))
    x, y = x[kept], y[kept]
    n = len(x)
    with warnings.catch_warnings():  # a resample can leave an arm without values: its mean is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_x, mean_y = np.nanmean(x, axis=1), np.nanmean(y, axis=1)
        if n < 3 or np.unique(mean_x).size < 2 or np.unique(mean_y).size < 2:
            return SpearmanResult(math.nan, math.nan, math.nan, n, math.nan, 0)
        full = stats.spearmanr(mean_x, mean_y)
        columns = x.shape[1]
        picks = np.random.default_rng(seed).integers(0, columns, size=(resamples, columns))
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        boot = np.array([stats.spearmanr(np.nanmean(x[:, i], axis=1), np.nanmean(y[:, i], axis=1),
                                         nan_policy="omit").statistic for i in picks], dtype=float)
    boot = boot[~np.isnan(boot)]
    low, high = percentile_interval(boot)
    return SpearmanResult(float(full.statistic), float(low), float(high), n, float(full.pvalue), len(boot))
