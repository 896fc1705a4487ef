"""Study analysis in one place: load a sweep (``sweep``), the statistics and the rule for infinite and
missing values (``stats``), a study's tables, provenance and figures (``report``), and the committed
studies (``studies``). Every script under scripts/ that reads results uses these."""

from dopr.analysis.stats import (Interval, PairedResult, bootstrap_spearman, higher_is_better, is_log_scale,
                                 mean_interval, paired_difference, verdict)
from dopr.analysis.sweep import Sweep, read_runs_csv, read_sweep, runs_table

__all__ = ["Interval", "PairedResult", "Sweep", "bootstrap_spearman", "higher_is_better", "is_log_scale",
           "mean_interval", "paired_difference", "read_runs_csv", "read_sweep", "runs_table", "verdict"]
