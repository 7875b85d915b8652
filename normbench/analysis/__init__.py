"""From run folders to tables and a verdict: pure pandas, no I/O.

* `stats`: means, differences and ratios over seeds with 95% intervals (scipy.stats).
* `tables`: runs table, summary with seed counts and intervals, pivots, deltas vs BN.
* `effects`: the effect of any swept setting on any metric, per condition, Holm-corrected (`sweep_effects`);
  the batch-size degradation is one instance.
* `verdict`: sentences computed from those tables; nothing is decided in advance.

Accuracies are in percent; differences are in percentage points.
"""

from normbench.analysis.stats import diff_ci, mean_ci, no_interval, paired_ci, recovered_share, t95
from normbench.analysis.tables import (
    LABELLED, METRICS, NOT_CONDITIONS, as_written, bn_label, cell_text, condition_columns, delta_vs_bn, fmt_ci,
    lost_seeds, panel_columns, pivot, runs_of, runs_table, summary_table,
)
from normbench.analysis.effects import degradation, factor_effects, metric_effects, sweep_effects
from normbench.analysis.verdict import factor_verdict, verdict

__all__ = [
    "LABELLED", "METRICS", "NOT_CONDITIONS", "as_written", "bn_label", "cell_text", "condition_columns", "degradation",
    "delta_vs_bn", "diff_ci", "fmt_ci", "lost_seeds", "mean_ci", "no_interval", "paired_ci", "panel_columns",
    "pivot", "recovered_share", "runs_of", "runs_table", "summary_table", "t95", "verdict", "factor_effects",
    "metric_effects", "sweep_effects", "factor_verdict",
]
