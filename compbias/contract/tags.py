"""Every ``compbias.*`` tag name and tag value compbias writes in MLflow, and the metric-key rule.

Lineage tags make a run or version a member (:mod:`compbias.contract.members`);
bookkeeping tags are written on study and model runs; the ``compbias.audit.*``
tags are the audit's outcome on each version it audits.
"""

from __future__ import annotations

import re

#: Version of this contract.  Written on every member as :data:`SCHEMA`.
SCHEMA_VERSION = "1"

#: Prefix of every compbias tag.
PREFIX = "compbias."

# --- lineage: written on model runs and their registered versions -----------
SCHEMA = PREFIX + "schema"
RUN_KIND = PREFIX + "run_kind"
STUDY = PREFIX + "study"
ROLE = PREFIX + "role"
METHOD = PREFIX + "method"
LEVEL = PREFIX + "level"
SEED = PREFIX + "seed"
BASELINE_VERSION = PREFIX + "baseline_version"
BASELINE_RUN_ID = PREFIX + "baseline_run_id"
#: Who wrote the member: ``study`` (compbias trained it) or ``register``.
SOURCE = PREFIX + "source"

#: The tags every member carries; compressed members carry :data:`COMPRESSED_TAGS` too.
MEMBER_TAGS = (STUDY, ROLE, SEED)
COMPRESSED_TAGS = (METHOD, LEVEL)

# --- bookkeeping on study and model runs -------------------------------------
SPEC_HASH = PREFIX + "spec_hash"
RAY_NODE = PREFIX + "ray_node"
STEP = PREFIX + "step"
ERROR = PREFIX + "error"
INTERRUPTED = PREFIX + "interrupted"
INCOMPLETE = PREFIX + "incomplete"
PROJECT_RUN_ID = PREFIX + "project_run_id"
STUDY_RUN_ID = PREFIX + "study_run_id"
#: Written by ``compbias audit --evaluate`` on the run of a member it evaluated: the model format it loaded
#: (``pytorch-pt2``, ``pytorch-state-dict``, ``onnx``...) and a hash of the evaluation spec.
EVALUATION_MODEL_KIND = PREFIX + "evaluation.model_kind"
EVALUATION_SPEC_HASH = PREFIX + "evaluation.spec_hash"

ROLE_BASELINE = "baseline"
ROLE_COMPRESSED = "compressed"
ROLES = (ROLE_BASELINE, ROLE_COMPRESSED)

RUN_KIND_STUDY = "study"
RUN_KIND_MODEL = "model"
RUN_KIND_AUDIT = "audit"
RUN_KIND_AUDIT_POPULATION = "audit_population"

#: ``compbias.method`` / ``compbias.level`` of a baseline (what ``compbias register`` writes).
BASELINE_METHOD = "none"
BASELINE_LEVEL = "none"
#: Spellings a baseline's method and level may have: ``compbias study`` has
#: always written ``baseline``/``0``; the audit ignores both for baselines.
BASELINE_METHODS = (BASELINE_METHOD, "baseline")
BASELINE_LEVELS = (BASELINE_LEVEL, "0")
#: The ``(method, level)`` population key of the baselines.
BASELINE_POPULATION = ("baseline", "none")

# --- outcome: written by the audit on each version it audits ----------------
AUDIT_PREFIX = PREFIX + "audit."
AUDIT_STATUS = AUDIT_PREFIX + "status"
AUDIT_RUN_ID = AUDIT_PREFIX + "run_id"
AUDIT_METRICS_VERSION = AUDIT_PREFIX + "metrics_version"
AUDIT_REASON = AUDIT_PREFIX + "reason"
AUDIT_AUDITED_AT = AUDIT_PREFIX + "audited_at"
AUDIT_ALIAS = AUDIT_PREFIX + "alias"
AUDIT_POPULATION = AUDIT_PREFIX + "population"
AUDIT_VERSIONS = AUDIT_PREFIX + "versions"
AUDIT_TARGETS = AUDIT_PREFIX + "targets"
AUDIT_UNDEFINED = AUDIT_PREFIX + "undefined"
AUDIT_INCOMPLETE = AUDIT_PREFIX + "incomplete"
AUDIT_ABANDONED = AUDIT_PREFIX + "abandoned"
#: The registered model an audit run (and its per-population children) audited.
REGISTERED_MODEL = PREFIX + "registered_model"
#: Tags of the claim runs that keep two auditors from auditing one version at once.
CLAIM_OWNER = PREFIX + "claim.owner"
CLAIM_HEARTBEAT = PREFIX + "claim.heartbeat"
CLAIM_TARGET = PREFIX + "claim.target"


def metric_key(text: object) -> str:
    """Make an MLflow metric-key component out of a name (class, group, method, level).

    The one rule for every key compbias logs: letters, digits and ``_ - .`` are
    kept, every other run of characters becomes one ``_``, and leading or
    trailing ``_`` are dropped (``"Male=1&Young=0" -> "Male_1_Young_0"``,
    ``"structured+at_kd" -> "structured_at_kd"``).

    Parameters
    ----------
    text : object
        Converted with ``str``.

    Returns
    -------
    str
        Never empty (``"_"`` for a name with no usable character).
    """
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_")
    return s or "_"
