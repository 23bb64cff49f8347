"""A member of an auditable population: its lineage tags (:class:`Member`) and its ``member.json`` (:class:`MemberInfo`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .artifacts import MEMBER_FILE
from .errors import ContractError
from .tags import (
    BASELINE_LEVEL,
    BASELINE_LEVELS,
    BASELINE_METHOD,
    BASELINE_METHODS,
    BASELINE_POPULATION,
    BASELINE_RUN_ID,
    BASELINE_VERSION,
    COMPRESSED_TAGS,
    LEVEL,
    MEMBER_TAGS,
    METHOD,
    ROLE,
    ROLE_BASELINE,
    ROLE_COMPRESSED,
    ROLES,
    RUN_KIND,
    RUN_KIND_MODEL,
    SCHEMA,
    SCHEMA_VERSION,
    SEED,
    SOURCE,
    STUDY,
)

__all__ = ["Member", "MemberInfo", "lineage_tags", "resolve_class"]


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
