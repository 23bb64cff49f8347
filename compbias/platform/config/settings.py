"""The sections that say how a study runs, where it is recorded and how it is audited."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from ._base import Strict

__all__ = ["AuditSpec", "GateSpec", "MlflowSpec", "ResourcesSpec", "ThresholdsSpec"]


class ResourcesSpec(Strict):
    """What each Ray task asks for."""

    cpus_per_task: float = Field(default=1, gt=0)
    gpus_per_task: Union[Literal["auto"], Annotated[float, Field(ge=0)]] = "auto"
    max_retries: int = Field(default=3, ge=0)


class MlflowSpec(Strict):
    """Where the study is recorded; ``None`` means the defaults derived from the study name."""

    experiment: str | None = None
    registered_model: str | None = None


class ThresholdsSpec(Strict):
    """Audit pass/fail thresholds; ``None`` disables a check."""

    cev: float | None = Field(default=None, ge=0)
    sde: float | None = Field(default=None, ge=0)
    worst_group_fpr_change: float | None = None
    acc_drop: float | None = None


class GateSpec(Strict):
    """The default gate, used when no threshold is set (docs/audit.md, "The default gate").

    A compressed population fails when, for some class or group value with
    at least ``audit.min_count`` test examples, the lower end of the two-level
    bootstrap interval of its *excess harm* (the cell's error-rate increase
    minus the overall one, in percentage points, each model against its own
    baseline: ``compbias.metrics.excess_harm``) lies above ``tolerance_pp``,
    or when the lower end of the interval of the overall error-rate increase
    lies above ``overall_tolerance_pp`` (compression costs everyone).
    """

    tolerance_pp: float = Field(default=2.0, ge=0)
    overall_tolerance_pp: float = Field(default=2.0, ge=0)


class AuditSpec(Strict):
    """Settings read by the audit service (``compbias.platform.audit``)."""

    cie_fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=lambda: [0.01, 0.05, 0.1], min_length=1)
    bootstrap: int = Field(default=1000, ge=0)
    probe_size: int = Field(default=256, ge=1)
    thresholds: ThresholdsSpec = Field(default_factory=ThresholdsSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    #: The estimability rule: a rate (or gate cell) whose denominator has fewer examples is reported as
    #: "not estimable (n=7)", never as a number with a degenerate interval.
    min_count: int = Field(default=10, ge=1)
    #: Confidence intervals: ``two_level`` resamples models (seeds; each compressed model with its own
    #: baseline) and test examples; ``examples`` resamples test examples only, the models fixed.
    intervals: Literal["two_level", "examples"] = "two_level"
    alias: str = Field(default="audited", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
