"""The population contract: what makes an MLflow run or model version auditable.

This module is the one owner of compbias's conventions in MLflow: tag names,
run kinds, artifact names, the metric-key rule, the baseline's identity and
the predictions table.  ``compbias study`` writes through it,
``compbias register`` and :func:`compbias.log_member` write through it, and
``compbias audit`` reads only what it defines.  docs/contract.md explains it
with an example; :data:`SCHEMA_VERSION` is bumped when a reader of an older
member could misread a newer one.

A **member** of an auditable population is a registered model version whose
run has

* the lineage tags :data:`STUDY`, :data:`ROLE` (``baseline`` or
  ``compressed``), :data:`SEED`, and for a compressed member :data:`METHOD`,
  :data:`LEVEL` and the baseline it came from (:data:`BASELINE_VERSION`, the
  version number in the same registered model, and/or
  :data:`BASELINE_RUN_ID`);
* the artifact :data:`PREDICTIONS`: one row per test example with the
  integer columns ``example_id``, ``label``, ``pred``, optionally ``prob``
  (the probability of ``pred``) and any number of group columns (integer or
  boolean, one per attribute);
* optionally :data:`MEMBER_FILE` (``member.json``): class names, the positive
  class id and the group columns, so that the audit needs no study file.

Members of one population (the same study and registered model) must
predict the same examples with the same labels; :func:`validate_population`
checks that.

Where each part lives (every name is importable from ``compbias.contract``):

=====================  ==========================================================
:mod:`.tags`           tag names and values (roles, run kinds, the baseline's
                       identity), :func:`metric_key`
:mod:`.artifacts`      artifact names, the predictions table's columns
:mod:`.members`        :class:`Member`, :func:`lineage_tags`, :class:`MemberInfo`,
                       :func:`resolve_class`
:mod:`.validation`     :func:`group_columns`, :func:`validate_predictions`,
                       :func:`validate_population`
:mod:`.errors`         :class:`ContractError`
=====================  ==========================================================
"""

from __future__ import annotations

from .errors import (  # noqa: F401  re-exported: compbias.contract is the one name to import
    ContractError,
)
from .tags import (  # noqa: F401  re-exported: compbias.contract is the one name to import
    AUDIT_ABANDONED, AUDIT_ALIAS, AUDIT_AUDITED_AT, AUDIT_INCOMPLETE, AUDIT_METRICS_VERSION, AUDIT_POPULATION,
    AUDIT_PREFIX, AUDIT_REASON, AUDIT_RUN_ID, AUDIT_STATUS, AUDIT_TARGETS, AUDIT_UNDEFINED, AUDIT_VERSIONS,
    BASELINE_LEVEL, BASELINE_LEVELS, BASELINE_METHOD, BASELINE_METHODS, BASELINE_POPULATION, BASELINE_RUN_ID,
    BASELINE_VERSION, CLAIM_HEARTBEAT, CLAIM_OWNER, CLAIM_TARGET, COMPRESSED_TAGS, ERROR, EVALUATION_MODEL_KIND,
    EVALUATION_SPEC_HASH, INCOMPLETE, INTERRUPTED, LEVEL, MEMBER_TAGS, METHOD, metric_key, PREFIX,
    PROJECT_RUN_ID, RAY_NODE, REGISTERED_MODEL, ROLE, ROLE_BASELINE, ROLE_COMPRESSED, ROLES, RUN_KIND,
    RUN_KIND_AUDIT, RUN_KIND_AUDIT_POPULATION, RUN_KIND_MODEL, RUN_KIND_STUDY, SCHEMA, SCHEMA_VERSION, SEED,
    SOURCE, SPEC_HASH, STEP, STUDY, STUDY_RUN_ID,
)
from .artifacts import (  # noqa: F401  re-exported: compbias.contract is the one name to import
    EXAMPLE_ID, LABEL, MEMBER_FILE, NON_GROUP_COLUMNS, PRED, PREDICTIONS, PROB, REQUIRED_COLUMNS, STUDY_FILE,
)
from .members import (  # noqa: F401  re-exported: compbias.contract is the one name to import
    lineage_tags, Member, MemberInfo, resolve_class,
)
from .validation import (  # noqa: F401  re-exported: compbias.contract is the one name to import
    group_columns, validate_population, validate_predictions,
)
