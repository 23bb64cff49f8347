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
from compbias.platform.audit.settings import AuditSettings

__all__ = [
    "THRESHOLD_KEYS", "AuditSettings", "BaselineAudit", "StudyAudit", "VersionOutcome", "audit_baseline",
    "audit_population", "audit_study", "baseline_pairs", "build_tables",
    "gate_population", "key_part", "pct_name", "pop_key", "rate_denominators", "verdict", "welch_per_class",
]


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

    The stages: the baseline population (:func:`audit_baseline`); each
    compressed population (:func:`audit_population`: its measures, intervals
    and default-gate verdict); then each target's verdict and the tables
    (:func:`build_tables`).

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
    rows: dict[str, list] = {k: [] for k in TABLE_ROWS}
    baseline = audit_baseline(data, targets, settings, out, rows)
    gate_status: dict[tuple[str, str], tuple[str, str | None]] = {}
    for (method, level), pop in data.compressed.items():
        gate_status[(method, level)] = audit_population(data, baseline, method, level, pop, settings, out, rows)
    build_tables(out, rows, targets, errors, gate_status)
    return out


#: The tables an audit builds from rows, in the order it logs them (``versions`` is built from the verdicts).
TABLE_ORDER = ("bias", "rates", "models", "ttest", "cie", "cie_composition", "cie_list", "versions", "gate")
#: Tables made of row dicts; ``ttest`` and ``cie_list`` are made of per-population frames.
TABLE_ROWS = ("rates", "bias", "models", "ttest", "cie", "cie_composition", "cie_list", "gate")


@dataclass
class BaselineAudit:
    """The baseline population's rates, as every compressed population is compared with them.

    Attributes
    ----------
    population : Population
    rates : PopulationRates
    acc : float
        Mean accuracy of the baseline models.
    group_estimable : numpy.ndarray of bool
        Per group, whether its FPR is estimable (``audit.min_count`` negatives);
        the worst group is chosen among these.
    """

    population: Population
    rates: PopulationRates
    acc: float
    group_estimable: np.ndarray


def audit_baseline(data: StudyData, targets: list[VersionRecord], settings: AuditSettings, out: StudyAudit,
                   rows: dict[str, list]) -> BaselineAudit:
    """The baseline population's rates, accuracy and intervals; adds its metrics to ``out`` and its rows to ``rows``."""
    base = data.baseline
    brates = PopulationRates(data, base, settings.positive_class, settings.smoothing)
    base_acc = float(np.mean(brates.acc))
    out.metrics["acc/baseline"] = base_acc
    # the baseline population's own intervals change only when a baseline is audited; an incremental
    # audit of compressed versions leaves them to the audit run that audited the baselines
    ci = _bootstrap_population(data, base, None, settings) if any(r.is_baseline for r in targets) else {}
    if ci:
        out.metrics["acc/baseline/ci_low"], out.metrics["acc/baseline/ci_high"] = ci["acc"]
    rate_rows(rows["rates"], "baseline", "none", data, brates, None, ci, settings)
    for i, r in enumerate(base.records):
        rows["models"].append({"version": r.key, "role": "baseline", "method": "baseline", "level": "none", "seed": r.seed,
                               "acc": float(brates.acc[i])})
    n_of = rate_denominators(data, brates, settings.positive_class)
    group_estimable = np.array([n_of[("group", g, "fpr")] >= settings.min_count for g in brates.group_names], bool)
    return BaselineAudit(base, brates, base_acc, group_estimable)


def audit_population(data: StudyData, baseline: BaselineAudit, method: str, level: str, pop: Population,
                     settings: AuditSettings, out: StudyAudit, rows: dict[str, list]) -> tuple[str, str | None]:
    """One compressed population: its measures, intervals and rows; returns its default-gate verdict.

    Adds the population's metrics, notes and plot data to ``out`` and its
    table rows to ``rows``.

    Returns
    -------
    status : str
    reason : str or None
        The default gate's verdict on the population
        (:func:`~compbias.platform.audit.gate.gate_population`).
    """
    base, brates = baseline.population, baseline.rates
    crates = PopulationRates(data, pop, settings.positive_class, settings.smoothing)
    pci = _bootstrap_population(data, base, pop, settings)
    status, gate_rows = gate_population(data, base, pop, settings)
    rows["gate"].extend(gate_rows)
    m = population_measures(data, base, brates, pop, crates, settings, pci, baseline.group_estimable, pop_key(method, level))
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
    return status


def build_tables(out: StudyAudit, rows: dict[str, list], targets: list[VersionRecord], errors: dict[str, str],
                 gate_status: dict[tuple[str, str], tuple[str, str | None]]) -> None:
    """Turn the rows into tables, decide each target's verdict, count the verdicts and summarise (into ``out``)."""
    models = pd.DataFrame(rows["models"])
    out.versions = _verdicts(targets, models, errors, gate_status, out.settings)
    tables = {name: pd.DataFrame(rows[name]) for name in ("bias", "rates", "cie", "cie_composition", "gate")}
    tables["models"] = models
    for name in ("ttest", "cie_list"):
        tables[name] = pd.concat(rows[name], ignore_index=True) if rows[name] else pd.DataFrame()
    tables["versions"] = _versions_table(targets, out.versions)
    out.tables = {k: tables[k] for k in TABLE_ORDER}
    counts = pd.Series([o.status for o in out.versions.values()]).value_counts()
    for s in T.STATUSES:
        out.metrics[f"audit/n_{s}"] = float(counts.get(s, 0))
    out.summary = _summary(out.tables["bias"], out.metrics["acc/baseline"], out.tables["cie"])


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
