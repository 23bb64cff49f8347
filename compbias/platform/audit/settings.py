"""The audit's settings: one type, resolved once per study.

:class:`AuditSettings` is what the computation reads.  Its values come, in
order, from a caller's overrides (:attr:`AuditOptions.settings`, the
command-line options), the study file's ``audit:`` section, and the defaults
of that section's schema (:class:`compbias.platform.config.AuditSpec`, which
owns them); :meth:`AuditSettings.resolve` is the only place the three meet.
``confidence``, ``seed`` and ``smoothing`` are not study-file keys; their
defaults are this module's.

:class:`AuditOptions` says how to run an audit (caches, workers, figures ...)
and carries the overrides.  This module imports neither MLflow nor pandas, so
the command line can build its parser from it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from compbias.platform.config import AuditSpec, GateSpec, ThresholdsSpec

__all__ = ["AuditOptions", "AuditSettings", "DEFAULT_TTL_SECONDS", "DEFAULT_WORKERS", "default_cache_dir", "parse_interval"]

#: Seconds after which a silent auditor's claims expire (``compbias.platform.audit.claims``).
DEFAULT_TTL_SECONDS = 900.0
#: Parallel artifact downloads (and tag writes to a tracking server).
DEFAULT_WORKERS = 4


def _spec_default(name: str) -> Any:
    """The default of an ``audit:`` key, as the study file's schema defines it."""
    return AuditSpec.model_fields[name].get_default(call_default_factory=True)


def default_cache_dir() -> Path:
    """Return the artifact cache directory: ``audit`` under compbias's cache root.

    Returns
    -------
    pathlib.Path
        :func:`compbias._locations.cache_dir` ``("audit")``
        (``$COMPBIAS_CACHE_DIR/audit`` when that is set).
    """
    from compbias._locations import cache_dir

    return cache_dir("audit")


@dataclass
class AuditSettings:
    """Resolved audit settings (study file plus overrides).

    Attributes
    ----------
    thresholds : dict
        ``cev``, ``sde``, ``worst_group_fpr_change``, ``acc_drop``; None
        disables a check.
    cie_fractions : tuple of float
        CIE set sizes q; 0.01 is always added (its accuracy is a key figure).
    bootstrap : int
        Resamples for confidence intervals (0: no intervals).
    probe_size : int
        Probe examples for SVCCA/CKA.
    confidence : float
        Level of the confidence intervals.
    seed : int
        Seed of the bootstrap and of the probe choice.
    positive_class : int or None
    alias : str
        Alias given to the newest passing version.
    smoothing : float
        Additive smoothing of every rate (``compbias.metrics.class_rates``);
        0 drops classes whose baseline rate is 0 from CEV/SDE instead.
    gate : GateSpec
        The default gate, used when no threshold is set
        (:func:`~compbias.platform.audit.gate.gate_population`).
    min_count : int
        The estimability rule (``audit.min_count``): rates and gate cells
        whose denominator has fewer examples are "not estimable".
    intervals : {"two_level", "examples"}
        What the bootstrap resamples (``audit.intervals``): models and test
        examples, or test examples only.
    """

    thresholds: dict = field(default_factory=lambda: ThresholdsSpec().model_dump())
    cie_fractions: tuple[float, ...] = tuple(_spec_default("cie_fractions"))
    bootstrap: int = _spec_default("bootstrap")
    probe_size: int = _spec_default("probe_size")
    confidence: float = 0.95
    seed: int = 0
    positive_class: int | None = None
    alias: str = _spec_default("alias")
    smoothing: float = 0.0
    gate: GateSpec = field(default_factory=GateSpec)
    min_count: int = _spec_default("min_count")
    intervals: str = _spec_default("intervals")

    def thresholds_set(self) -> bool:
        """Whether any threshold is configured (they then decide instead of the default gate)."""
        return any(v is not None for v in self.thresholds.values())

    def fractions(self) -> list[float]:
        """CIE fractions, sorted, always including 1%."""
        return sorted({round(float(q), 6) for q in (*self.cie_fractions, 0.01)})

    @classmethod
    def names(cls) -> frozenset[str]:
        """The settings a caller may override (every field but ``positive_class``, a fact of the population)."""
        return frozenset(f.name for f in fields(cls)) - {"positive_class"}

    @classmethod
    def resolve(cls, spec: AuditSpec | None = None, overrides: Mapping[str, Any] | None = None,
                *, positive_class: int | None = None) -> "AuditSettings":
        """Combine the study file's ``audit:`` section with a caller's overrides.

        Parameters
        ----------
        spec : AuditSpec, optional
            The study file's section (default: its schema's defaults).
        overrides : mapping, optional
            Setting name to value; None (or absent) means "as in the study
            file".  ``thresholds`` overrides the study file's thresholds one
            key at a time.
        positive_class : int, optional

        Returns
        -------
        AuditSettings

        Raises
        ------
        TypeError
            When an override names no setting.
        """
        spec = spec if spec is not None else AuditSpec()
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(given) - cls.names()
        if unknown:
            raise TypeError(f"unknown audit setting(s) {sorted(unknown)}; known: {sorted(cls.names())}")
        thresholds = spec.thresholds.model_dump()
        thresholds.update({k: v for k, v in (given.pop("thresholds", None) or {}).items() if v is not None})
        out = cls(
            thresholds=thresholds, cie_fractions=tuple(spec.cie_fractions), bootstrap=spec.bootstrap,
            probe_size=spec.probe_size, alias=spec.alias, gate=spec.gate, min_count=spec.min_count,
            intervals=spec.intervals, positive_class=positive_class,
        )
        if "cie_fractions" in given:
            given["cie_fractions"] = tuple(given["cie_fractions"])
        for key in ("bootstrap", "probe_size", "seed", "min_count"):
            if key in given:
                given[key] = int(given[key])
        return replace(out, **given)


@dataclass(init=False)
class AuditOptions:
    """How to run an audit, and which settings override the study file's.

    Parameters
    ----------
    settings : dict, optional
        Overrides of :class:`AuditSettings` fields; a setting may also be
        given as a keyword (``AuditOptions(bootstrap=200, alias="ok")``).
        None or absent: the study file's value, else the schema's default.
    similarity : bool
        Compute SVCCA/CKA (needs the models' weights and ``compbias.jobs``).
    experiment : str, optional
        Experiment of the audit run; default: the study's own experiment.
    cache_dir : path, optional
        Artifact cache (None disables it); default :func:`default_cache_dir`.
    output_dir : path, optional
        Also copy the report, tables and figures there.
    claim_ttl : float
        Seconds after which a silent auditor's claims expire.
    workers : int
        Parallel artifact downloads.
    figures : bool
        Draw figures into the HTML report.
    gallery : bool
        Draw the CIE image gallery (loads the study's dataset).
    """

    settings: dict
    similarity: bool
    experiment: str | None
    cache_dir: Path | None
    output_dir: Path | None
    claim_ttl: float
    workers: int
    figures: bool
    gallery: bool

    def __init__(self, settings: Mapping[str, Any] | None = None, *, similarity: bool = True,
                 experiment: str | None = None, cache_dir: Any = ...,
                 output_dir: Path | None = None, claim_ttl: float = DEFAULT_TTL_SECONDS,
                 workers: int = DEFAULT_WORKERS, figures: bool = True, gallery: bool = True, **overrides: Any):
        unknown = set(overrides) - AuditSettings.names()
        if unknown:
            raise TypeError(f"AuditOptions got unexpected keyword(s) {sorted(unknown)}")
        merged = {**(settings or {}), **overrides}
        self.settings = {k: v for k, v in merged.items() if v is not None and not (k == "thresholds" and not v)}
        self.similarity = similarity
        self.experiment = experiment
        self.cache_dir = default_cache_dir() if cache_dir is ... else cache_dir
        self.output_dir = output_dir
        self.claim_ttl = claim_ttl
        self.workers = workers
        self.figures = figures
        self.gallery = gallery

    def resolve(self, spec: AuditSpec | None = None, *, positive_class: int | None = None) -> AuditSettings:
        """The settings of one study: :meth:`AuditSettings.resolve` with these overrides."""
        return AuditSettings.resolve(spec, self.settings, positive_class=positive_class)


def parse_interval(text: str) -> float:
    """Parse an interval such as ``90``, ``90s``, ``10m``, ``2h`` or ``1d`` into seconds.

    Parameters
    ----------
    text : str

    Returns
    -------
    float

    Raises
    ------
    ValueError
        When the text is not a positive number with an optional s/m/h/d unit.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = str(text).strip().lower()
    scale = units.get(t[-1:], None)
    num = t[:-1] if scale else t
    try:
        value = float(num) * (scale or 1)
    except ValueError:
        raise ValueError(f"cannot read interval {text!r}: write a number with an optional unit s, m, h or d (e.g. 10m)") from None
    if value <= 0:
        raise ValueError(f"interval must be positive, got {text!r}")
    return value
