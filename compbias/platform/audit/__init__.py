"""The audit service: bias metrics across registered model versions.

Reads the versions a study registered, aggregates their predictions into
population matrices, computes rates and their changes, CEV, SDE, PIE, CIE,
Welch's t-tests and SVCCA/CKA with :mod:`compbias.metrics`, logs one MLflow
run per audit (metrics, tables, figures, an HTML report) and tags every
audited version with its verdict.  See ``docs/audit.md``.

Public API: :func:`run_audit`, :func:`watch`, :class:`AuditOptions`,
:class:`AuditResult`, :class:`Selection`.
"""

from compbias.platform.audit.selection import Selection, VersionRecord
from compbias.platform.audit.service import AuditOptions, AuditResult, parse_interval, run_audit, watch
from compbias.platform.audit.tags import current_metrics_version, is_audited

__all__ = [
    "AuditOptions",
    "AuditResult",
    "Selection",
    "VersionRecord",
    "current_metrics_version",
    "is_audited",
    "parse_interval",
    "run_audit",
    "watch",
]
