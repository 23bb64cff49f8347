"""The study file: schema, validation and defaults.

A study file is YAML (see ``configs/digits.yaml`` and ``docs/architecture.md``).
It is validated on load by :func:`load_study`; every default lives in the
pydantic models of this package and nowhere else (the CLI and the MLproject
only pass overrides through :meth:`StudySpec.with_overrides`). The names a
study file may use (dataset kinds, architectures, methods, schedules, levels,
mitigations, method options) and the training and fine-tuning defaults come
from :mod:`compbias.jobs.vocabulary`, the jobs layer's own, so the schema
cannot drift from what the jobs accept (and importing this package does not
import torch).

Errors are raised as :class:`StudyConfigError`, whose message has one line per
problem naming the offending key (``compression[1].levels[0]``) and what is
allowed there.

========================  ==========================================================
module                    holds
========================  ==========================================================
``_base``                 :class:`StudyConfigError`, the strict base model, :func:`format_level`
``sections``              dataset, model, given baselines, training, population
``compression``           :class:`CompressionSpec` (levels, schedule, fine-tuning)
``settings``              resources, MLflow names, audit settings
``study``                 :class:`StudySpec`: the whole study, fingerprints
``loading``               :func:`parse_study`, :func:`load_study`: one line per bad key
========================  ==========================================================
"""

from __future__ import annotations

from compbias.jobs.vocabulary import (
    ARCHS,
    BYO_METHODS,
    DATASET_KINDS,
    METHODS,
    MITIGATIONS,
    PRUNING_METHODS,
    QUANT_LEVELS,
    SCHEDULES,
    TORCHAO_LEVELS,
)

from ._base import StudyConfigError, format_level
from .compression import CompressionSpec
from .loading import load_study, parse_study
from .sections import BaselineSpec, DatasetSpec, ImbalanceSpec, ModelSpec, PopulationSpec, TrainSpec
from .settings import AuditSpec, GateSpec, MlflowSpec, ResourcesSpec, ThresholdsSpec
from .study import StudySpec

__all__ = [
    "StudyConfigError",
    "StudySpec",
    "DatasetSpec",
    "ImbalanceSpec",
    "ModelSpec",
    "BaselineSpec",
    "TrainSpec",
    "PopulationSpec",
    "CompressionSpec",
    "ResourcesSpec",
    "MlflowSpec",
    "AuditSpec",
    "ThresholdsSpec",
    "GateSpec",
    "load_study",
    "parse_study",
    "format_level",
    "ARCHS",
    "DATASET_KINDS",
    "METHODS",
    "SCHEDULES",
    "PRUNING_METHODS",
    "QUANT_LEVELS",
    "MITIGATIONS",
    "BYO_METHODS",
    "TORCHAO_LEVELS",
]
