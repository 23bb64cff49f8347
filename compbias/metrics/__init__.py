"""compbias.metrics: the numerical core of the bias audit.

Pure functions, numpy arrays in and out (pandas only for tables); numba
kernels for the counting. Imports no torch, mlflow or ray.

Definitions follow ``DESIGN.md`` ("Metric definitions"); each function's
docstring gives the formula, the convention chosen where the papers are
ambiguous, and the reference.
"""

# METRICS_VERSION tags every audited model version (compbias.audit.metrics_version).
# Bump it (as an integer string, "1" -> "2") whenever any function here can
# return a different number for the same input: a changed definition,
# convention (ties, dropped classes, smoothing, ddof), default, or a numerical
# change beyond 1e-9 relative. Pure speed-ups, new functions and new options
# whose defaults keep old results do not bump it.
METRICS_VERSION = "2"  # 2: the default gate (excess_harm) decides verdicts when no threshold is set

from compbias.metrics.bias import (  # noqa: E402
    BiasResult,
    PopulationBias,
    cev,
    normalized_change,
    population_bias,
    sde,
)
from compbias.metrics.confusion import confusion_counts  # noqa: E402
from compbias.metrics.grouped import GroupRates, group_rates  # noqa: E402
from compbias.metrics.rates import ClassRates, class_rates, population_rates  # noqa: E402
from compbias.metrics.harm import ChangeDifference, ExcessHarm, change_difference, excess_harm, paired_error_changes  # noqa: E402
from compbias.metrics.correlation import ClusterCorrelation, pearson_cluster_ci  # noqa: E402
from compbias.metrics.exemplars import CIECut, cie_cut, cie_mask, cie_scores, modal_labels, pie_mask  # noqa: E402
from compbias.metrics.measures import (  # noqa: E402
    Intensification,
    margin_auroc,
    recall_intensification,
    vote_margin,
    worst_group_accuracy_change,
)
from compbias.metrics.cca import cca_correlations  # noqa: E402
from compbias.metrics.similarity import SVCCAResult, linear_cka, svcca  # noqa: E402
from compbias.metrics.stats import BootstrapResult, bootstrap_ci, bootstrap_indices, mean_rate_change  # noqa: E402
from compbias.metrics.welch import WelchResult, welch_ttest  # noqa: E402

__all__ = [
    "METRICS_VERSION",
    "BiasResult",
    "BootstrapResult",
    "CIECut",
    "ClassRates",
    "ClusterCorrelation",
    "ChangeDifference",
    "ExcessHarm",
    "GroupRates",
    "Intensification",
    "PopulationBias",
    "SVCCAResult",
    "WelchResult",
    "bootstrap_ci",
    "bootstrap_indices",
    "cca_correlations",
    "cev",
    "cie_cut",
    "cie_mask",
    "cie_scores",
    "class_rates",
    "confusion_counts",
    "change_difference",
    "excess_harm",
    "group_rates",
    "linear_cka",
    "margin_auroc",
    "mean_rate_change",
    "modal_labels",
    "normalized_change",
    "paired_error_changes",
    "pearson_cluster_ci",
    "pie_mask",
    "population_bias",
    "population_rates",
    "recall_intensification",
    "sde",
    "svcca",
    "vote_margin",
    "welch_ttest",
    "worst_group_accuracy_change",
]
