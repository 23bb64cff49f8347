"""The audit's view of the tags :mod:`compbias.contract` names, and when a version counts as audited.

The lineage tags are written by the study (``docs/architecture.md``); the
``compbias.audit.*`` tags are written by the audit on each registered model
version it audits.  A version counts as audited by the running code only when
both :data:`STATUS` and :data:`METRICS_VERSION` are present and the latter
equals :func:`current_metrics_version`; :data:`STATUS` is always written last,
so a version whose auditor was killed half-way is never mistaken for an
audited one.
"""

from __future__ import annotations

import compbias

from compbias import contract as C

# --- lineage, written by the study or by ``compbias register`` (compbias.contract) ---
RUN_KIND = C.RUN_KIND
STUDY = C.STUDY
ROLE = C.ROLE
METHOD = C.METHOD
LEVEL = C.LEVEL
SEED = C.SEED
BASELINE_VERSION = C.BASELINE_VERSION
BASELINE_RUN_ID = C.BASELINE_RUN_ID

ROLE_BASELINE = C.ROLE_BASELINE
ROLE_COMPRESSED = C.ROLE_COMPRESSED
RUN_KIND_AUDIT = C.RUN_KIND_AUDIT

# --- outcome, written by the audit ------------------------------------------
AUDIT_PREFIX = C.AUDIT_PREFIX
STATUS = C.AUDIT_STATUS
RUN_ID = C.AUDIT_RUN_ID
METRICS_VERSION = C.AUDIT_METRICS_VERSION
REASON = C.AUDIT_REASON
AUDITED_AT = C.AUDIT_AUDITED_AT

STATUS_PASS = "pass"
STATUS_FAIL = "fail"
STATUS_ERROR = "error"
STATUSES = (STATUS_PASS, STATUS_FAIL, STATUS_ERROR)

# Key figures copied onto each version (besides status, run id and version).
FIGURE_TAGS = (
    "acc",
    "acc_drop",
    "cev",
    "sde",
    "worst_group",
    "worst_group_fpr_change",
    "cie_acc_top1pct",
)

# Version of the audit's own outputs (metric keys, tags); bumping it makes
# every version eligible for a new audit, like a new metrics version does.
AUDIT_SCHEMA = "2"  # 2: one metric-key rule (compbias.contract.metric_key): "structured+at_kd" -> "structured_at_kd"


def current_metrics_version() -> str:
    """Return the identifier of the metrics code that audits run with.

    Returns
    -------
    str
        ``<compbias.metrics.METRICS_VERSION>+audit<schema>``.
        Stored on every audited version as ``compbias.audit.metrics_version``;
        versions audited by another identifier are audited again.
    """
    try:
        from compbias import metrics as _metrics

        base = getattr(_metrics, "METRICS_VERSION", None) or compbias.__version__
    except ImportError:  # pragma: no cover - metrics is part of the package
        base = compbias.__version__
    return f"{base}+audit{AUDIT_SCHEMA}"


def is_audited(tags: dict[str, str], metrics_version: str | None = None) -> bool:
    """Tell whether a version's tags record a complete audit.

    Parameters
    ----------
    tags : dict of str to str
        The registered model version's tags.
    metrics_version : str, optional
        The metrics version that must have audited it; defaults to
        :func:`current_metrics_version`.

    Returns
    -------
    bool
        True only when the status tag is one of ``pass``/``fail``/``error``
        and the metrics-version tag equals ``metrics_version``.
    """
    mv = metrics_version or current_metrics_version()
    return tags.get(STATUS) in STATUSES and tags.get(METRICS_VERSION) == mv


def is_partial(tags: dict[str, str]) -> bool:
    """Tell whether an audit of this version was started but never completed.

    Parameters
    ----------
    tags : dict of str to str
        The registered model version's tags.

    Returns
    -------
    bool
        True when some ``compbias.audit.*`` tag is present but the status tag
        is not (the auditor was stopped before it wrote the status, which it
        writes last).
    """
    return STATUS not in tags and any(k.startswith(AUDIT_PREFIX) for k in tags)
