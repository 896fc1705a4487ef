"""Study analysis in one place: a study's plan, configs/study/<plan>.yaml (``plan``), the committed studies
derived from the plans (``studies``), load a sweep (``sweep``), the statistics and the rule for infinite and
missing values (``stats``), a study's comparisons and verdicts (``report``), its markdown tables
(``markdown``), provenance (``provenance``), figures (``figures``) and §3b decomposition (``decomposition``),
and the files of its results dir (``results``). Every script under scripts/ that reads results uses these;
running a plan's sweeps is dopr/study.py's."""

from dopr.analysis.stats import (Interval, PairedResult, bootstrap_spearman, higher_is_better, is_log_scale,
                                 mean_interval, paired_difference, verdict)
from dopr.analysis.sweep import Sweep, read_runs_csv, read_sweep, runs_table

__all__ = ["Interval", "PairedResult", "Sweep", "bootstrap_spearman", "higher_is_better", "is_log_scale",
           "mean_interval", "paired_difference", "read_runs_csv", "read_sweep", "runs_table", "verdict"]
