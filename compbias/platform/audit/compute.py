"""What an audit computes, from population matrices to tables and verdicts.

Every number comes from :mod:`compbias.metrics`; this module only decides
which populations are compared, names the results (metric keys that line up
across audits), and turns thresholds into pass/fail verdicts.

Conventions (also in ``docs/audit.md``):

* Populations: the baseline population (every baseline version of the study)
  and one compressed population per ``(method, level)``.
* Normalised change: ``(X_comp - X_base) / X_base * 100`` of population-mean
  rates; per model, the model's rate against the baseline population mean.
* Group FPR/FNR: for a binary task with a positive class, that class's
  one-vs-rest rate inside the group; otherwise the mean over classes of the
  one-vs-rest rates inside the group (classes with undefined rates skipped).
* ``acc_drop``: baseline population mean accuracy minus the model's (or
  population's) accuracy, in percentage points.
* ``worst_group_fpr_change``: the largest normalised change of a group's FPR
  over every group and intersection of groups, in percent.
* Thresholds compare point estimates: a version fails when a value exceeds
  its threshold; confidence intervals are reported beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from compbias.contract import metric_key as key_part
from compbias.platform.audit import tags as T
from compbias.platform.audit.gate import THRESHOLD_KEYS, baseline_pairs, finite, gate_population, verdict
from compbias.platform.audit.measures import pct_name, population_measures, welch_per_class
from compbias.platform.audit.population import Population, StudyData
from compbias.platform.audit.rates import PopulationRates, rate_denominators, rate_rows
from compbias.platform.audit.selection import VersionRecord
from compbias.platform.config import AuditSpec, GateSpec

__all__ = [
    "THRESHOLD_KEYS", "AuditSettings", "StudyAudit", "VersionOutcome", "audit_study", "baseline_pairs",
    "gate_population", "key_part", "pct_name", "pop_key", "rate_denominators", "verdict", "welch_per_class",
]


@dataclass
class AuditSettings:
    """Resolved audit settings (study file plus command-line overrides).

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
    confidence : float
    seed : int
    positive_class : int or None
    alias : str
    smoothing : float
        Additive smoothing of every rate (``compbias.metrics.class_rates``);
        0 drops classes whose baseline rate is 0 from CEV/SDE instead.
    gate : GateSpec
        The default gate, used when no threshold is set (:func:`gate_population`).
    min_count : int
        The estimability rule (``audit.min_count``): rates and gate cells
        whose denominator has fewer examples are "not estimable".
    intervals : {"two_level", "examples"}
        What the bootstrap resamples (``audit.intervals``): models and test
        examples (default), or test examples only.
    """

    thresholds: dict = field(default_factory=dict)
    cie_fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    bootstrap: int = 1000
    probe_size: int = 256
    confidence: float = 0.95
    seed: int = 0
    positive_class: int | None = None
    alias: str = "audited"
    smoothing: float = 0.0
    gate: GateSpec = field(default_factory=GateSpec)
    min_count: int = AuditSpec.model_fields["min_count"].default
    intervals: str = AuditSpec.model_fields["intervals"].default

    def thresholds_set(self) -> bool:
        """Whether any threshold is configured (they then decide instead of the default gate)."""
        return any(v is not None for v in self.thresholds.values())

    def fractions(self) -> list[float]:
        """CIE fractions, sorted, always including 1%."""
        return sorted({round(float(q), 6) for q in (*self.cie_fractions, 0.01)})


@dataclass
class VersionOutcome:
    """The verdict on one version: status, why, and its key figures."""

    status: str
    reason: str | None = None
    values: dict = field(default_factory=dict)


@dataclass
class StudyAudit:
    """Everything one audit of one study produced.

    Attributes
    ----------
    metrics : dict of str to float
        MLflow metrics of the audit run.
    tables : dict of str to pandas.DataFrame
        Logged as parquet and HTML under ``tables/``.
    versions : dict of str to VersionOutcome
        Per target version.
    summary : dict
        Headline numbers for the console and the report.
    plots : dict
        Arrays the figures are drawn from.
    data : StudyData or None
    settings : AuditSettings
    """

    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame]
    versions: dict[str, VersionOutcome]
    summary: dict
    plots: dict
    data: StudyData | None
    settings: AuditSettings
    notes: list[str] = field(default_factory=list)

    def add_similarity(self, sim) -> None:
        """Merge SVCCA/CKA results (see :mod:`compbias.platform.audit.similarity`)."""
        if sim is None:
            return
        self.metrics.update(sim.metrics)
        self.tables.update(sim.tables)
        self.plots.update(sim.plots)
        self.notes.extend(sim.notes)
        for key, vals in sim.per_version.items():
            if key in self.versions:
                self.versions[key].values.update(vals)


def pop_key(method: str, level: str) -> str:
    """``<method>/<level>`` as used in metric keys."""
    return f"{key_part(method)}/{key_part(level)}"


def _keep(v) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return True


def _versions_table(targets, versions) -> pd.DataFrame:
    rows = []
    for r in targets:
        o = versions.get(r.key)
        if o is None:
            continue
        rows.append({"version": r.key, "role": r.role, "method": r.method, "level": r.level, "seed": r.seed,
                     "status": o.status, "reason": o.reason, **o.values})
    return pd.DataFrame(rows)


def _summary(bias: pd.DataFrame, base_acc: float, cie: pd.DataFrame) -> dict:
    out = {"baseline_acc": base_acc}
    if bias.empty:
        return out
    worst = bias.sort_values("cev", ascending=False, na_position="last").iloc[0]
    out.update({
        "worst_cev": {"population": f"{worst['method']}/{worst['level']}", "cev": float(worst["cev"]), "sde": float(worst["sde"]),
                      "acc": float(worst["acc"])},
    })
    out["populations"] = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in bias[[c for c in ("method", "level", "n_models", "acc", "cev", "sde", "pie", "worst_group", "worst_group_fpr_change") if c in bias]].to_dict("records")
    ]
    wg = bias.dropna(subset=["worst_group_fpr_change"]) if "worst_group_fpr_change" in bias else bias.iloc[0:0]
    if not wg.empty:
        w = wg.sort_values("worst_group_fpr_change", ascending=False).iloc[0]
        out["worst_group"] = {"population": f"{w['method']}/{w['level']}", "group": w["worst_group"], "fpr_change": float(w["worst_group_fpr_change"])}
    top = cie[(cie["method"] == worst["method"]) & (cie["level"] == worst["level"]) & np.isclose(cie["fraction"], 0.01)]
    if len(top):
        out["cie"] = {"population": f"{worst['method']}/{worst['level']}", "comp_acc": float(top["comp_acc_on"].iloc[0]),
                      "base_acc": float(top["base_acc_on"].iloc[0])}
    return out


# ---------------------------------------------------------------- bootstrap
def _bootstrap_population(data: StudyData, base: Population, pop: Population | None, settings: AuditSettings) -> dict:
    """Bootstrap CIs (resampling test examples) of population-level numbers."""
    if settings.bootstrap <= 0:
        return {}
    from compbias.platform.audit.intervals import population_intervals

    return population_intervals(data, base, pop, settings)


def audit_study(
    data: StudyData | None,
    targets: list[VersionRecord],
    settings: AuditSettings,
    *,
    errors: dict[str, str] | None = None,
) -> StudyAudit:
    """Compute an audit of one study and the verdict on each target version.

    The stages: the baseline population's rates and intervals; for each
    compressed population its measures (:func:`~compbias.platform.audit.measures.population_measures`),
    intervals and default-gate verdict (:func:`~compbias.platform.audit.gate.gate_population`);
    then each target's verdict and the tables.

    Parameters
    ----------
    data : StudyData or None
        None when no baseline population could be formed (every target is
        then an error).
    targets : list of VersionRecord
        Versions being audited (the others only serve as populations).
    settings : AuditSettings
    errors : dict of str to str, optional
        Versions whose artifacts are missing or corrupt, with the reason.

    Returns
    -------
    StudyAudit
    """
    errors = dict(errors or {})
    if data is None:
        versions = {r.key: VersionOutcome(T.STATUS_ERROR, errors.get(r.key, "no usable predictions")) for r in targets}
        out = StudyAudit({}, {}, versions, {}, {"class_changes": {}, "groups": {}, "levels": []}, None, settings)
        out.tables["versions"] = _versions_table(targets, versions)
        return out
    out = StudyAudit({}, {}, {}, {}, {"class_changes": {}, "groups": {}, "levels": []}, data, settings)
    if data.n_classes == 2:
        out.notes.append("binary task: on a CIE example whose modal labels differ, one population's modal answer is right "
                         "exactly when the other's is wrong, so the compressed and baseline CIE accuracies are (nearly) "
                         "complements: one finding, not two")
    base = data.baseline
    brates = PopulationRates(data, base, settings.positive_class, settings.smoothing)
    base_acc = float(np.mean(brates.acc))
    out.metrics["acc/baseline"] = base_acc
    # the baseline population's own intervals change only when a baseline is audited; an incremental
    # audit of compressed versions leaves them to the audit run that audited the baselines
    ci = _bootstrap_population(data, base, None, settings) if any(r.is_baseline for r in targets) else {}
    if ci:
        out.metrics["acc/baseline/ci_low"], out.metrics["acc/baseline/ci_high"] = ci["acc"]
    rows: dict[str, list] = {k: [] for k in ("rates", "bias", "models", "ttest", "cie", "cie_composition", "cie_list", "gate")}
    rate_rows(rows["rates"], "baseline", "none", data, brates, None, ci, settings)
    for i, r in enumerate(base.records):
        rows["models"].append({"version": r.key, "role": "baseline", "method": "baseline", "level": "none", "seed": r.seed,
                               "acc": float(brates.acc[i])})
    # the worst group is chosen among groups whose FPR is estimable (audit.min_count negatives)
    n_of = rate_denominators(data, brates, settings.positive_class)
    group_estimable = np.array([n_of[("group", g, "fpr")] >= settings.min_count for g in brates.group_names], bool)
    gate_status: dict[tuple[str, str], tuple[str, str | None]] = {}
    for (method, level), pop in data.compressed.items():
        crates = PopulationRates(data, pop, settings.positive_class, settings.smoothing)
        pci = _bootstrap_population(data, base, pop, settings)
        gate_status[(method, level)], gate_rows = gate_population(data, base, pop, settings)
        rows["gate"].extend(gate_rows)
        m = population_measures(data, base, brates, pop, crates, settings, pci, group_estimable, pop_key(method, level))
        out.metrics.update(m.metrics)
        out.notes.extend(m.notes)
        if m.class_changes is not None:
            out.plots["class_changes"][(method, level)] = m.class_changes
        if m.groups_plot is not None:
            out.plots["groups"][(method, level)] = m.groups_plot
        rows["bias"].append(m.bias_row)
        rows["ttest"].append(m.ttest)
        rows["cie"].extend(m.cie_rows)
        rows["cie_composition"].extend(m.composition_rows)
        rows["cie_list"].append(m.cie_list)
        rate_rows(rows["rates"], method, level, data, crates, brates, pci, settings)
        rows["models"].extend(m.model_rows)
        out.plots["levels"].append(m.bias_row)
    models = pd.DataFrame(rows["models"])
    out.versions = _verdicts(targets, models, errors, gate_status, settings)
    for name in ("bias", "rates", "cie", "cie_composition", "gate"):
        out.tables[name] = pd.DataFrame(rows[name])
    out.tables["models"] = models
    for name in ("ttest", "cie_list"):
        out.tables[name] = pd.concat(rows[name], ignore_index=True) if rows[name] else pd.DataFrame()
    out.tables["versions"] = _versions_table(targets, out.versions)
    # the tables in the order the audit logs them
    order = ("bias", "rates", "models", "ttest", "cie", "cie_composition", "cie_list", "versions", "gate")
    out.tables = {k: out.tables[k] for k in order}
    counts = pd.Series([o.status for o in out.versions.values()]).value_counts()
    for s in T.STATUSES:
        out.metrics[f"audit/n_{s}"] = float(counts.get(s, 0))
    out.summary = _summary(out.tables["bias"], base_acc, out.tables["cie"])
    return out


def _verdicts(targets: list[VersionRecord], models: pd.DataFrame, errors: dict[str, str],
              gate_status: dict, settings: AuditSettings) -> dict[str, VersionOutcome]:
    """Each target's status: error (unreadable or unplaced), pass (baselines), else thresholds or the default gate."""
    versions: dict[str, VersionOutcome] = {}
    for r in targets:
        if r.key in errors:
            versions[r.key] = VersionOutcome(T.STATUS_ERROR, errors[r.key])
            continue
        hit = models[models["version"] == r.key] if len(models) else models
        if hit.empty:
            versions[r.key] = VersionOutcome(T.STATUS_ERROR, "its predictions could not be placed in any population")
            continue
        mrow = {k: v for k, v in hit.iloc[0].to_dict().items() if _keep(v)}
        values = {k: mrow[k] for k in T.FIGURE_TAGS if k in mrow}
        if r.is_baseline:
            versions[r.key] = VersionOutcome(T.STATUS_PASS, "baseline: the reference the compressed versions are compared with", values)
            continue
        if settings.thresholds_set():
            status, reason = verdict(mrow, settings.thresholds)
        else:
            status, reason = gate_status[r.population]
        versions[r.key] = VersionOutcome(status, reason, values)
    return versions
