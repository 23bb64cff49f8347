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
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

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

# --- artifacts ----------------------------------------------------------------
PREDICTIONS = "predictions.parquet"
MEMBER_FILE = "member.json"
STUDY_FILE = "study.yaml"

# --- the predictions table ----------------------------------------------------
EXAMPLE_ID = "example_id"
LABEL = "label"
PRED = "pred"
PROB = "prob"
REQUIRED_COLUMNS = (EXAMPLE_ID, LABEL, PRED)
#: Columns that are never group attributes.
NON_GROUP_COLUMNS = frozenset({EXAMPLE_ID, LABEL, PRED, PROB, "path"})


class ContractError(ValueError):
    """A member or predictions table breaks the contract; the message says how to fix it."""


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


@dataclass(frozen=True)
class Member:
    """One member of an auditable population: the lineage a version carries.

    Attributes
    ----------
    study : str
        Population name; the audit groups versions of one registered model by it.
    role : str
        ``baseline`` or ``compressed``.
    seed : int
        Training seed of the model (of its baseline, for a compressed member).
    method, level : str
        Compression method and level as the user names them; ``none`` for baselines.
    baseline_version : str, optional
        Version number (same registered model) of the baseline a compressed
        member was made from.
    baseline_run_id : str, optional
        Run id of that baseline; one of the two is required for compressed members.
    """

    study: str
    role: str
    seed: int
    method: str = BASELINE_METHOD
    level: str = BASELINE_LEVEL
    baseline_version: str | None = None
    baseline_run_id: str | None = None
    source: str = "register"
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.study, str) or not self.study.strip():
            raise ContractError("the member needs a non-empty study name (compbias.study)")
        if self.role not in ROLES:
            raise ContractError(f"role must be one of {list(ROLES)}, got {self.role!r}")
        try:
            seed = int(self.seed)
        except (TypeError, ValueError):
            raise ContractError(f"seed must be an integer, got {self.seed!r}") from None
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "method", str(self.method))
        object.__setattr__(self, "level", str(self.level))
        for name in ("baseline_version", "baseline_run_id"):  # tags are text: 7 and "7" are one member
            value = getattr(self, name)
            object.__setattr__(self, name, str(value).strip() or None if value not in (None, "") else None)
        if self.role == ROLE_BASELINE:
            if self.method not in BASELINE_METHODS or self.level not in BASELINE_LEVELS:
                raise ContractError(
                    f"a baseline has method and level {BASELINE_METHOD!r}; got {self.method!r}/{self.level!r} "
                    "(register it with role 'compressed' if it is compressed)"
                )
            if self.baseline_version or self.baseline_run_id:
                raise ContractError("a baseline has no baseline of its own; drop baseline_version/baseline_run_id")
        else:
            if self.method in ("", *BASELINE_METHODS) or self.level in ("", BASELINE_LEVEL):
                raise ContractError(
                    f"a compressed member needs its method and level (got {self.method!r}/{self.level!r}), "
                    "e.g. method='magnitude', level='0.9'"
                )
            if not (self.baseline_version or self.baseline_run_id):
                raise ContractError(
                    "a compressed member needs the baseline it came from: give baseline_version "
                    "(its version number in the same registered model) or baseline_run_id"
                )

    @property
    def population(self) -> tuple[str, str]:
        """``(method, level)``, :data:`BASELINE_POPULATION` for baselines."""
        return BASELINE_POPULATION if self.role == ROLE_BASELINE else (self.method, self.level)

    def tags(self) -> dict[str, str]:
        """The ``compbias.*`` tags that make a run or version this member (``extra`` included)."""
        return lineage_tags(
            study=self.study, role=self.role, seed=self.seed, method=self.method, level=self.level,
            baseline_version=self.baseline_version, baseline_run_id=self.baseline_run_id, source=self.source,
            extra=self.extra,
        )

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "Member":
        """Read a member back from a version's (or run's) tags.

        Raises
        ------
        ContractError
            A required tag is missing or invalid; the message names it.
        """
        missing = [t for t in MEMBER_TAGS if not tags.get(t)]
        if tags.get(ROLE) == ROLE_COMPRESSED:
            missing += [t for t in COMPRESSED_TAGS if not tags.get(t)]
        if missing:
            raise ContractError(f"missing tag(s) {missing}; see docs/contract.md for the tags a member needs")
        schema = tags.get(SCHEMA, SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise ContractError(
                f"written under contract schema {schema!r}; this compbias reads schema {SCHEMA_VERSION!r} (upgrade compbias)"
            )
        return cls(
            study=tags[STUDY], role=tags[ROLE], seed=tags[SEED],
            method=tags.get(METHOD) or BASELINE_METHOD, level=tags.get(LEVEL) or BASELINE_LEVEL,
            baseline_version=tags.get(BASELINE_VERSION) or None, baseline_run_id=tags.get(BASELINE_RUN_ID) or None,
            source=tags.get(SOURCE, "study"),
        )


def lineage_tags(
    *,
    study: str,
    role: str,
    seed: int | str,
    method: str,
    level: str,
    baseline_version: str | None = None,
    baseline_run_id: str | None = None,
    source: str = "register",
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """The ``compbias.*`` tags of a model run, without checking them.

    :meth:`Member.tags` calls it after validation; ``compbias study`` calls it
    directly only for a run that never became a member (a task that failed
    before its baseline was known).

    Returns
    -------
    dict of str to str
    """
    out = {
        SCHEMA: SCHEMA_VERSION,
        RUN_KIND: RUN_KIND_MODEL,
        SOURCE: str(source),
        STUDY: str(study),
        ROLE: str(role),
        METHOD: str(method),
        LEVEL: str(level),
        SEED: str(seed),
    }
    if baseline_version:
        out[BASELINE_VERSION] = str(baseline_version)
    if baseline_run_id:
        out[BASELINE_RUN_ID] = str(baseline_run_id)
    out.update({k: str(v) for k, v in (extra or {}).items()})
    return out


@dataclass(frozen=True)
class MemberInfo:
    """The optional ``member.json``: what the audit would otherwise read from a study file.

    Attributes
    ----------
    num_classes : int
    class_names : list of str, optional
    positive_class : int, optional
        Class id whose FPR/FNR the group rates report (binary tasks).
    groups : list of str, optional
        The group columns of the predictions table.
    """

    num_classes: int
    class_names: tuple[str, ...] | None = None
    positive_class: int | None = None
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        try:
            k = int(self.num_classes)
        except (TypeError, ValueError):
            k = None
        if k is None or isinstance(self.num_classes, bool) or str(self.num_classes).strip() != str(k) or k < 2:
            raise ContractError(f"num_classes must be an integer of at least 2, got {self.num_classes!r}")
        object.__setattr__(self, "num_classes", k)
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes:
                raise ContractError(
                    f"{len(names)} class names {list(names)} for {self.num_classes} classes; give one name per class id"
                )
            if len(set(names)) != len(names):
                raise ContractError(f"class names must be distinct, got {list(names)}")
            object.__setattr__(self, "class_names", names)
        if self.positive_class is not None:
            object.__setattr__(self, "positive_class", resolve_class(self.positive_class, self.num_classes, self.class_names))
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))

    def to_json(self) -> str:
        """Serialise with the schema version."""
        body = {"schema": SCHEMA_VERSION, "num_classes": self.num_classes, "class_names": self.class_names,
                "positive_class": self.positive_class, "groups": self.groups}
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in body.items()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "MemberInfo":
        """Parse ``member.json``; :class:`ContractError` when it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"{MEMBER_FILE} is not JSON: {exc}") from None
        if not isinstance(data, dict) or "num_classes" not in data:
            raise ContractError(f"{MEMBER_FILE} needs at least num_classes")
        if str(data.get("schema", SCHEMA_VERSION)) != SCHEMA_VERSION:
            raise ContractError(f"{MEMBER_FILE} has schema {data.get('schema')!r}; this compbias reads {SCHEMA_VERSION!r}")
        return cls(num_classes=data["num_classes"], class_names=data.get("class_names"),
                   positive_class=data.get("positive_class"), groups=data.get("groups"))


def resolve_class(value: int | str, num_classes: int, class_names: Sequence[str] | None = None) -> int:
    """Turn a class id or class name into a class id.

    Parameters
    ----------
    value : int or str
        An id in ``[0, num_classes)``, its decimal string, or one of ``class_names``.
    num_classes : int
    class_names : sequence of str, optional

    Returns
    -------
    int

    Raises
    ------
    ContractError
        Neither a valid id nor a known name; the message lists both.
    """
    names = list(class_names or [])
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        idx = int(value)
    except (TypeError, ValueError):
        idx = None
    if idx is not None and not isinstance(value, bool) and 0 <= idx < num_classes and str(value).strip() == str(idx):
        return idx
    where = f" nor a class name {names}" if names else " (no class names are known)"
    raise ContractError(f"class {value!r} is not a class id in [0, {num_classes}){where}")


def group_columns(frame: pd.DataFrame, declared: Sequence[str] | None = None) -> list[str]:
    """Name the group columns of a predictions table.

    Parameters
    ----------
    frame : pandas.DataFrame
    declared : sequence of str, optional
        Declared group columns (``member.json`` or the study's ``dataset.groups``).

    Returns
    -------
    list of str
        The ``declared`` columns found in the table (none when ``declared``
        is an empty list: "no groups"), else every integer or boolean column
        outside :data:`NON_GROUP_COLUMNS`.
    """
    if declared is not None and len(declared) == 0:
        return []
    if declared:
        found = [c for c in declared if c in frame.columns]
        if found:
            return found
    return [
        c
        for c in frame.columns
        if c not in NON_GROUP_COLUMNS
        and (pd.api.types.is_integer_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
    ]


def validate_predictions(
    frame: pd.DataFrame,
    *,
    num_classes: int | None = None,
    groups: Sequence[str] | None = None,
    where: str = "predictions",
) -> pd.DataFrame:
    """Check a predictions table against the contract and sort it by example.

    Parameters
    ----------
    frame : pandas.DataFrame
        ``example_id``, ``label``, ``pred`` (integers), optionally ``prob``
        and group columns.
    num_classes : int, optional
        When given, ``label`` and ``pred`` must lie in ``[0, num_classes)``.
    groups : sequence of str, optional
        Group columns that must be present, without missing values.
    where : str
        Named in error messages.

    Returns
    -------
    pandas.DataFrame
        Sorted by ``example_id`` with a fresh index.

    Raises
    ------
    ContractError
        Missing columns, an empty table, missing values, non-integer or
        negative ids, labels or predictions, a class out of range, duplicated
        example ids, or a ``prob`` outside ``[0, 1]``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise ContractError(f"{where} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ContractError(f"{where} lacks the column(s) {missing}; the contract requires {list(REQUIRED_COLUMNS)}")
    if len(frame) == 0:
        raise ContractError(f"{where} has no rows")
    for col in REQUIRED_COLUMNS:
        s = frame[col]
        if s.isna().any():
            raise ContractError(f"{where}: column {col!r} has missing values")
        if not pd.api.types.is_integer_dtype(s):
            raise ContractError(f"{where}: column {col!r} must hold integers, found dtype {s.dtype}")
        if (s.to_numpy() < 0).any():
            raise ContractError(f"{where}: column {col!r} has negative values")
    if num_classes is not None:
        for col in (LABEL, PRED):
            top = int(frame[col].max())
            if top >= num_classes:
                n = int((frame[col] >= num_classes).sum())
                raise ContractError(
                    f"{where}: {n} {col} value(s) out of range (max {top}) for {num_classes} classes; "
                    "classes are ids 0..num_classes-1"
                )
    dup = frame[EXAMPLE_ID].duplicated()
    if dup.any():
        first = frame.loc[dup, EXAMPLE_ID].iloc[0]
        raise ContractError(f"{where}: {int(dup.sum())} duplicated example_id row(s) (e.g. {first}); one row per example")
    if PROB in frame.columns:
        p = pd.to_numeric(frame[PROB], errors="coerce").to_numpy(dtype=float)
        if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
            raise ContractError(f"{where}: column 'prob' must hold probabilities in [0, 1]")
    for g in groups or ():
        if g not in frame.columns:
            raise ContractError(f"{where} lacks the group column {g!r}")
        if frame[g].isna().any():
            raise ContractError(f"{where}: group column {g!r} has missing values")
    return frame.sort_values(EXAMPLE_ID, kind="stable").reset_index(drop=True)


def validate_population(frames: Mapping[str, pd.DataFrame], *, groups: Sequence[str] | None = None) -> None:
    """Check that members of one population predict the same examples with the same labels.

    Parameters
    ----------
    frames : mapping of str to pandas.DataFrame
        Member name -> predictions, each already passed through
        :func:`validate_predictions` (sorted by ``example_id``).
    groups : sequence of str, optional
        Group columns whose values must also agree between members.

    Raises
    ------
    ContractError
        Naming the first member that differs from the first one, and how.
    """
    items = list(frames.items())
    if len(items) < 2:
        return
    ref_name, ref = items[0]
    ids = ref[EXAMPLE_ID].to_numpy()
    labels = ref[LABEL].to_numpy()
    for name, frame in items[1:]:
        other = frame[EXAMPLE_ID].to_numpy()
        if len(other) != len(ids) or not np.array_equal(other, ids):
            extra = len(np.setdiff1d(other, ids))
            lacking = len(np.setdiff1d(ids, other))
            raise ContractError(
                f"{name} predicts other examples than {ref_name} ({len(other)} vs {len(ids)} rows: {extra} example_id "
                f"value(s) only in {name}, {lacking} only in {ref_name}); every member of a population must be "
                "evaluated on the same test examples"
            )
        diff = frame[LABEL].to_numpy() != labels
        if diff.any():
            raise ContractError(
                f"{name}: labels disagree with {ref_name} on {int(diff.sum())} example(s) (e.g. example_id "
                f"{int(ids[np.argmax(diff)])}); members of a population must share the ground truth"
            )
        for g in groups or ():
            if g in ref.columns and g in frame.columns and not np.array_equal(frame[g].to_numpy(), ref[g].to_numpy()):
                n = int((frame[g].to_numpy() != ref[g].to_numpy()).sum())
                raise ContractError(
                    f"{name}: group column {g!r} disagrees with {ref_name} on {n} example(s); "
                    "members of a population must share the group attributes of each example"
                )
