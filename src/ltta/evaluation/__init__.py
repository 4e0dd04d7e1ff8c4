"""Evaluation: metrics (error, NLL, ECE, corruption means), the method x set runner, tables (report) and figures."""

from ltta.evaluation.metrics import (
    accuracy_at_severity, ece, error_rate, mean_corruption_error, nll, relative_mce, relative_mce_where_defined,
)
from ltta.evaluation.figures import figures_markdown, write_plots
from ltta.evaluation.report import results_markdown, severity_plot_rows
from ltta.evaluation.runner import (
    CLEAN, DVC_METRIC_KEYS, EvalRecord, EvalResults, EvalSet, evaluate_methods, method_metrics,
)

__all__ = [
    "CLEAN",
    "DVC_METRIC_KEYS",
    "EvalRecord",
    "EvalResults",
    "EvalSet",
    "accuracy_at_severity",
    "ece",
    "error_rate",
    "evaluate_methods",
    "figures_markdown",
    "mean_corruption_error",
    "method_metrics",
    "nll",
    "relative_mce",
    "relative_mce_where_defined",
    "results_markdown",
    "severity_plot_rows",
    "write_plots",
]
