"""The audit service: bias metrics across registered model versions.

Reads the versions a study registered, aggregates their predictions into
population matrices, computes rates and their changes, CEV, SDE, PIE, CIE,
Welch's t-tests and SVCCA/CKA with :mod:`compbias.metrics`, logs one MLflow
run per audit (metrics, tables, figures, an HTML report) and tags every
audited version with its verdict.  See ``docs/audit.md``.

Public API: :func:`run_audit`, :func:`watch`, :class:`AuditOptions`,
:class:`AuditResult`, :class:`Selection`.  They are imported on first use, so
that ``compbias``'s command line can build its parser from
:mod:`compbias.platform.audit.cli` without loading MLflow.
"""

from importlib import import_module

#: public name -> the module that owns it
_OWNERS = {
    "AuditOptions": "settings",
    "AuditSettings": "settings",
    "AuditResult": "service",
    "run_audit": "service",
    "Selection": "selection",
    "VersionRecord": "selection",
    "current_metrics_version": "tags",
    "is_audited": "tags",
    "parse_interval": "settings",
    "watch": "watch",
}

__all__ = sorted(_OWNERS)


def __getattr__(name: str):
    if name in _OWNERS:
        value = getattr(import_module(f"{__name__}.{_OWNERS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OWNERS})
