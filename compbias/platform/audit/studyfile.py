"""The study file a population was logged with, parsed once, and what the audit takes from it.

A study's runs carry the ``study.yaml`` they were made with; members logged by
``compbias audit --evaluate`` carry one with only ``dataset:`` (and
``audit:``); members logged by ``compbias register`` carry none.  The audit
reads two sections, ``dataset`` and ``audit``, and validates them with the
study model's own section types (:class:`~compbias.platform.config.DatasetSpec`,
:class:`~compbias.platform.config.AuditSpec`) when the file is fetched
(:meth:`StudyFile.parse`): every later stage reads typed values.  A file whose
sections do not validate makes every version of the study an error naming the
key (the audit does not guess with defaults).

:class:`TestSplit` loads the test split the ``dataset`` section describes at
most once per audit, for the SVCCA probe and the CIE gallery alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compbias import contract as C
from compbias.platform.config import AuditSpec, DatasetSpec, StudyConfigError
from compbias.platform.config.loading import validation_problems

__all__ = ["StudyFacts", "StudyFile", "TestSplit", "resolve_facts"]


class _AuditedSections(BaseModel):
    """The sections of a study file the audit reads; the others are the study's business."""

    model_config = ConfigDict(extra="ignore")

    dataset: DatasetSpec | None = None
    audit: AuditSpec = Field(default_factory=AuditSpec)


@dataclass(frozen=True)
class StudyFile:
    """The ``dataset`` and ``audit`` sections of a population's study file, validated.

    Attributes
    ----------
    dataset : DatasetSpec or None
        None when the file has no ``dataset:`` section (or there is no file).
    audit : AuditSpec
        The ``audit:`` section, its schema's defaults filling what it omits.
    source : str or None
        Where it came from (``study.yaml of run <id>``); None: no study file.
    """

    dataset: DatasetSpec | None = None
    audit: AuditSpec = field(default_factory=AuditSpec)
    source: str | None = None

    @classmethod
    def parse(cls, data: Any, *, source: str | None = None) -> "StudyFile":
        """Validate a parsed ``study.yaml``.

        Parameters
        ----------
        data : dict
        source : str, optional
            Named in the error message.

        Returns
        -------
        StudyFile

        Raises
        ------
        StudyConfigError
            One line per bad key.
        """
        if not isinstance(data, dict):
            raise StudyConfigError([f"<top level>: a study file is a YAML mapping, got {type(data).__name__}"], source)
        try:
            sections = _AuditedSections.model_validate(data)
        except ValidationError as err:
            raise StudyConfigError(validation_problems(err), source) from None
        return cls(dataset=sections.dataset, audit=sections.audit, source=source or "study file")

    @property
    def present(self) -> bool:
        """Whether the population has a study file."""
        return self.source is not None

    @property
    def dataset_kind(self) -> str | None:
        """The dataset kind the file names (None when it names none: the schema's default is not a fact)."""
        if self.dataset is None or "kind" not in self.dataset.model_fields_set:
            return None
        return self.dataset.kind


@dataclass
class StudyFacts:
    """What the audit knows about a population's task, and where it came from.

    Attributes
    ----------
    num_classes : int or None
    positive_class : int or None
        A class id (a name in an old study file is resolved to one).
    groups : list of str or None
        Declared group columns.
    source : str
        ``member.json``, ``study file`` or ``defaults``.
    problem : str or None
        Why the population cannot be audited as declared (an unusable
        ``member.json`` or study file, a positive class that names no class);
        every version audited is then an error with this reason.
    """

    num_classes: int | None = None
    positive_class: int | None = None
    groups: list[str] | None = None
    source: str = "defaults"
    problem: str | None = None


def resolve_facts(study: StudyFile, info=None, *, class_names=None, info_problem: str | None = None) -> StudyFacts:
    """Decide the number of classes, positive class id and group columns of a population.

    In order: the members' ``member.json`` (:class:`compbias.contract.MemberInfo`),
    else the study file's ``dataset`` section (a ``positive_class`` given
    as a class *name* is resolved with :func:`compbias.contract.resolve_class`
    against the class names the study logged), else the defaults (classes
    counted from the predictions, no positive class, integer columns as groups).

    Parameters
    ----------
    study : StudyFile
        The population's study file (``StudyFile()`` when there is none).
    info : compbias.contract.MemberInfo, optional
    class_names : callable or sequence of str, optional
        The class names, or a function returning them (called only when a
        name has to be resolved).
    info_problem : str, optional
        Why a ``member.json`` that exists was unusable.

    Returns
    -------
    StudyFacts
    """
    if info_problem:
        return StudyFacts(source=C.MEMBER_FILE, problem=info_problem)
    if info is not None:
        return StudyFacts(info.num_classes, info.positive_class, list(info.groups) if info.groups is not None else None,
                          source=C.MEMBER_FILE)
    dataset = study.dataset
    groups = list(dataset.groups) if dataset is not None and dataset.groups is not None else None
    value = dataset.positive_class if dataset is not None else None
    facts = StudyFacts(groups=groups, source="study file" if study.present else "defaults")
    if value is None:
        return facts
    names = class_names() if callable(class_names) else class_names
    names = list(names or [])
    try:
        if names:
            facts.num_classes = len(names)
            facts.positive_class = C.resolve_class(value, len(names), names)
        elif isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip().isdigit():
            facts.positive_class = int(value)  # an id; checked against the classes seen once the predictions are lined up
        else:
            raise C.ContractError(f"class {value!r} is a class name, and the runs logged no class names to resolve it")
    except C.ContractError as exc:
        facts.problem = (
            f"the study file's dataset.positive_class cannot be used: {exc}; give a class id, or log the members "
            f"with a {C.MEMBER_FILE} (compbias register --positive-class, or re-run the study with this compbias)"
        )
    return facts


class TestSplit:
    """The test split a study file's ``dataset`` section describes, loaded at most once.

    Parameters
    ----------
    dataset : DatasetSpec or None
        None: the study names no dataset, and :meth:`bundle` raises.
    """

    __test__ = False  # not a pytest class

    def __init__(self, dataset: DatasetSpec | None):
        self.dataset = dataset
        self._bundle = None
        self._error: Exception | None = None

    def bundle(self):
        """The dataset bundle (:func:`compbias.jobs.load_dataset`); a failure is remembered and raised again.

        Raises
        ------
        LookupError
            When the study file names no dataset.
        Exception
            Whatever loading the dataset raised.
        """
        if self._bundle is None and self._error is None:
            try:
                if self.dataset is None:
                    raise LookupError("the study file names no dataset")
                from compbias.jobs import load_dataset

                self._bundle = load_dataset(self.dataset.kind, **self.dataset.loader_options())
            except Exception as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._bundle
