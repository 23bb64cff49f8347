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
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import compbias.metrics as M
from compbias.platform.audit import tags as T
from compbias.platform.audit.population import Population, StudyData
from compbias.platform.audit.selection import VersionRecord
from compbias.platform.config import AuditSpec, GateSpec

THRESHOLD_KEYS = ("cev", "sde", "worst_group_fpr_change", "acc_drop")


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


def key_part(text: str) -> str:
    """Make a method or level usable inside a metric key.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
        Letters, digits, ``_ - .`` kept; anything else (``+``, spaces, ``/``)
        becomes ``-`` (``structured+at_kd`` -> ``structured-at_kd``).
    """
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", str(text)) or "-"


def pop_key(method: str, level: str) -> str:
    """``<method>/<level>`` as used in metric keys."""
    return f"{key_part(method)}/{key_part(level)}"


def pct_name(q: float) -> str:
    """``0.01 -> 'top1pct'``, ``0.005 -> 'top0.5pct'``."""
    return f"top{q * 100:g}pct"


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _group_frame(data: StudyData) -> pd.DataFrame | None:
    if not data.group_names:
        return None
    return pd.DataFrame({n: data.group_codes[:, j] for j, n in enumerate(data.group_names)})


def _group_labels(data: StudyData, table: pd.DataFrame) -> list[str]:
    """Readable group names: replace codes by the attribute values."""
    out = []
    for g in table["group"]:
        parts = []
        for part in str(g).split("&"):
            name, _, code = part.partition("=")
            j = data.group_names.index(name) if name in data.group_names else None
            try:
                val = data.group_levels[j][int(code)] if j is not None else code
            except (ValueError, IndexError):
                val = code
            parts.append(f"{name}={val}")
        out.append("&".join(parts))
    return out


class _Rates:
    """Per-model rates of one population: class and group level."""

    def __init__(self, data: StudyData, pop: Population, positive_class: int | None, smoothing: float = 0.0):
        y, C = data.labels, data.n_classes
        self.cls = M.population_rates(y, pop.preds, C, smoothing=smoothing)  # (M, C)
        self.acc = np.asarray(self.cls.accuracy, float)  # (M,)
        gf = _group_frame(data)
        self.group_names: list[str] = []
        self.group_rows: pd.DataFrame | None = None
        self.group_size = np.zeros(0)
        self.group_fpr = np.zeros((pop.size, 0))
        self.group_fnr = np.zeros((pop.size, 0))
        self.group_acc = np.zeros((pop.size, 0))
        if gf is not None:
            gr = M.group_rates(y, pop.preds, gf, C, positive_class=positive_class, smoothing=smoothing)
            self.group_names = _group_labels(data, gr.groups)
            self.group_rows = gr.groups
            self.group_size = gr.groups["size"].to_numpy()
            fpr, fnr = np.asarray(gr.rates.fpr, float), np.asarray(gr.rates.fnr, float)
            if positive_class is None:  # (M, G, C) -> macro mean over classes
                with np.errstate(invalid="ignore"), _quiet():
                    fpr, fnr = np.nanmean(fpr, axis=-1), np.nanmean(fnr, axis=-1)
            self.group_fpr, self.group_fnr = fpr, fnr
            self.group_acc = np.asarray(gr.accuracy, float)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a):
        self._w.__exit__(*a)


def _mean(x: np.ndarray, axis=0) -> np.ndarray:
    with _quiet():
        return np.nanmean(x, axis=axis)


def welch_per_class(base_recall: np.ndarray, comp_recall: np.ndarray) -> pd.DataFrame:
    """Welch's t-test per class between two populations' per-class recall.

    Parameters
    ----------
    base_recall, comp_recall : numpy.ndarray, shapes (M, C) and (M', C)

    Returns
    -------
    pandas.DataFrame
        ``class``, ``base_mean``, ``comp_mean``, ``t``, ``p`` (NaN when a
        population has fewer than two models or no variance).
    """
    res = M.welch_ttest(base_recall, comp_recall)
    t, p = np.asarray(res.statistic, float), np.asarray(res.pvalue, float)
    return pd.DataFrame(
        {
            "class": np.arange(base_recall.shape[1]),
            "base_mean": _mean(base_recall),
            "comp_mean": _mean(comp_recall),
            "t": t,
            "p": p,
        }
    )


def audit_study(
    data: StudyData | None,
    targets: list[VersionRecord],
    settings: AuditSettings,
    *,
    errors: dict[str, str] | None = None,
) -> StudyAudit:
    """Compute an audit of one study and the verdict on each target version.

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
    notes: list[str] = []
    versions: dict[str, VersionOutcome] = {}
    metrics: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    plots: dict = {"class_changes": {}, "groups": {}, "levels": []}
    summary: dict = {}
    if data is not None and data.n_classes == 2:
        notes.append("binary task: on a CIE example whose modal labels differ, one population's modal answer is right "
                     "exactly when the other's is wrong, so the compressed and baseline CIE accuracies are (nearly) "
                     "complements: one finding, not two")
    if data is None:
        for r in targets:
            versions[r.key] = VersionOutcome(T.STATUS_ERROR, errors.get(r.key, "no usable predictions"))
        out = StudyAudit(metrics, tables, versions, summary, plots, None, settings)
        out.tables["versions"] = _versions_table(targets, versions)
        return out

    y, C = data.labels, data.n_classes
    base = data.baseline
    brates = _Rates(data, base, settings.positive_class, settings.smoothing)
    base_acc = float(np.mean(brates.acc))
    b_fpr, b_fnr = _mean(brates.cls.fpr), _mean(brates.cls.fnr)
    b_gfpr, b_gfnr = _mean(brates.group_fpr), _mean(brates.group_fnr)
    metrics["acc/baseline"] = base_acc
    # the baseline population's own intervals change only when a baseline is audited; an incremental
    # audit of compressed versions leaves them to the audit run that audited the baselines
    ci = _bootstrap_population(data, base, None, settings) if any(r.is_baseline for r in targets) else {}
    if ci:
        metrics["acc/baseline/ci_low"], metrics["acc/baseline/ci_high"] = ci["acc"]
    fractions = settings.fractions()
    rate_rows: list[dict] = []
    bias_rows: list[dict] = []
    model_rows: list[dict] = []
    ttest_tables: list[pd.DataFrame] = []
    cie_rows: list[dict] = []
    comp_rows: list[dict] = []
    cie_lists: list[pd.DataFrame] = []
    gate_rows: list[dict] = []
    gate_status: dict[tuple[str, str], tuple[str, str | None]] = {}
    _rate_rows(rate_rows, "baseline", "none", data, brates, None, ci, settings)
    for i, r in enumerate(base.records):
        model_rows.append({"version": r.key, "role": "baseline", "method": "baseline", "level": "none", "seed": r.seed, "acc": float(brates.acc[i])})

    target_keys = {r.key for r in targets}
    # the worst group is chosen among groups whose FPR is estimable (audit.min_count negatives)
    n_of = rate_denominators(data, brates, settings.positive_class)
    group_estimable = np.array([n_of[("group", g, "fpr")] >= settings.min_count for g in brates.group_names], bool)
    for (method, level), pop in data.compressed.items():
        pk = pop_key(method, level)
        crates = _Rates(data, pop, settings.positive_class, settings.smoothing)
        try:
            pb = M.population_bias(y, base.preds, pop.preds, C, smoothing=settings.smoothing)
        except ValueError as exc:  # no class with a defined change (e.g. a perfect baseline)
            pb = None
            notes.append(f"{method} at {level}: {exc}")
        ci = _bootstrap_population(data, base, pop, settings)
        gate_status[(method, level)], rows = gate_population(data, base, pop, settings)
        gate_rows.extend(rows)
        acc = float(np.mean(crates.acc))
        row = {"method": method, "level": level, "n_models": pop.size, "acc": acc, "acc_drop": (base_acc - acc) * 100.0}
        metrics[f"acc/{pk}"] = acc
        metrics[f"acc_drop/{pk}"] = row["acc_drop"]
        for name in ("cev", "sde"):
            res = getattr(pb, name) if pb is not None else None
            row[name] = res.value if res is not None else float("nan")
            row[f"{name}_classes_dropped"] = len(res.dropped) if res is not None else data.n_classes
            row[f"{name}_dropped_classes"] = (",".join(str(int(c)) for c in res.dropped) if res is not None
                                              else "all (no class has a defined change)")
            if res is None:
                continue
            metrics[f"{name}/{pk}"] = res.value
            if ci and name in ci:
                lo, hi = ci[name]
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = lo, hi
                metrics[f"{name}/{pk}/ci_low"], metrics[f"{name}/{pk}/ci_high"] = lo, hi
        if ci and "acc" in ci:
            metrics[f"acc/{pk}/ci_low"], metrics[f"acc/{pk}/ci_high"] = ci["acc"]
        pie = M.pie_mask(base.preds, pop.preds, C)
        row["pie"] = int(pie.sum())
        row["pie_fraction"] = float(pie.mean())
        metrics[f"pie/{pk}"] = float(pie.sum())
        pairs = baseline_pairs(base, pop)
        pie_u = M.pie_mask(base.preds, pop.preds, C, definition="unanimous", pairs=pairs)
        row["pie_unanimous"] = int(pie_u.sum())
        metrics[f"pie_unanimous/{pk}"] = float(pie_u.sum())
        row.update(_field_measures(data, base, pop, brates, crates, pairs))
        for k in ("recall_intensification", "worst_group_acc_change_pp"):
            if row.get(k) is not None:
                metrics[f"{k}/{pk}"] = row[k]
        scores = M.cie_scores(base.preds, pop.preds, C)
        base_correct = base.preds == y  # (M, N)
        comp_correct = pop.preds == y
        margin = M.vote_margin(base.preds, C)
        for q in fractions:
            mask = M.cie_mask(scores, q)
            nm = pct_name(q)
            cut = M.cie_cut(scores, q)
            vals = {
                f"cie/acc_{nm}": float(comp_correct[:, mask].mean()),
                f"cie/base_acc_{nm}": float(base_correct[:, mask].mean()),
                f"cie/acc_off_{nm}": float(comp_correct[:, ~mask].mean()) if (~mask).any() else float("nan"),
                f"cie/base_acc_off_{nm}": float(base_correct[:, ~mask].mean()) if (~mask).any() else float("nan"),
            }
            for k, v in vals.items():
                metrics[f"{k}/{pk}"] = v
            cie_row = {"method": method, "level": level, "fraction": q, "n_examples": int(mask.sum()),
                       "comp_acc_on": vals[f"cie/acc_{nm}"], "base_acc_on": vals[f"cie/base_acc_{nm}"],
                       "comp_acc_off": vals[f"cie/acc_off_{nm}"], "base_acc_off": vals[f"cie/base_acc_off_{nm}"],
                       "score_at_cut": cut.score_at_cut, "tied_block": cut.tied_block,
                       "taken_from_block": cut.taken_from_block,
                       "margin_auroc": M.margin_auroc(margin, mask)}
            cie_row.update(_tie_draws(scores, q, cut, comp_correct, base_correct, settings.seed))
            cie_rows.append(cie_row)
            for j, gname in enumerate(data.group_names):
                codes = data.group_codes[:, j]
                for code, val in enumerate(data.group_levels[j]):
                    in_test = float((codes == code).mean())
                    in_cie = float((codes[mask] == code).mean())
                    comp_rows.append({"method": method, "level": level, "fraction": q, "attribute": gname, "value": val,
                                      "share_test": in_test, "share_cie": in_cie,
                                      "over_representation": in_cie / in_test if in_test > 0 else float("nan")})
        top = max(fractions)
        cie_lists.append(_cie_list(data, base, pop, scores, M.cie_mask(scores, top)))
        # per-class changes (scatter) and Welch's t-test
        if pb is not None:
            plots["class_changes"][(method, level)] = {
                "delta_fpr": np.asarray(pb.delta_fpr, float),
                "delta_fnr": np.asarray(pb.delta_fnr, float),
                "model_delta_fpr": np.asarray(pb.model_delta_fpr, float),
                "model_delta_fnr": np.asarray(pb.model_delta_fnr, float),
            }
        tt = welch_per_class(np.asarray(brates.cls.recall, float), np.asarray(crates.cls.recall, float))
        tt.insert(0, "level", level)
        tt.insert(0, "method", method)
        ttest_tables.append(tt)
        metrics[f"ttest/n_classes_p05/{pk}"] = float((tt["p"] < 0.05).sum())
        row["ttest_classes_p05"] = int((tt["p"] < 0.05).sum())
        # groups
        wg_name, wg_change = None, None
        if brates.group_names:
            g_change = M.normalized_change(_mean(crates.group_fpr), b_gfpr)
            g_change_fnr = M.normalized_change(_mean(crates.group_fnr), b_gfnr)
            valid = np.isfinite(g_change) & group_estimable
            if valid.any():
                j = int(np.nanargmax(np.where(valid, g_change, -np.inf)))
                wg_name, wg_change = brates.group_names[j], float(g_change[j])
                metrics[f"worst_group_fpr_change/{pk}"] = wg_change
            plots["groups"][(method, level)] = {
                "names": brates.group_names,
                "fpr_change": g_change,
                "fnr_change": g_change_fnr,
                "fpr_ci": ci.get("group_fpr_change") if ci else None,
                "fnr_ci": ci.get("group_fnr_change") if ci else None,
            }
        row["worst_group"], row["worst_group_fpr_change"] = wg_name, wg_change
        # beside CEV/SDE (which drop classes whose baseline rate is 0): the worst class's recall, never dropped
        with np.errstate(invalid="ignore"), _quiet():
            b_rec = np.nanmean(np.asarray(brates.cls.recall, float), axis=0)
            c_rec = np.nanmean(np.asarray(crates.cls.recall, float), axis=0)
        if np.isfinite(c_rec).any():
            k = int(np.nanargmin(c_rec))
            row["worst_class"], row["worst_class_recall"] = k, float(c_rec[k])
            row["worst_class_recall_change_pp"] = float((c_rec[k] - b_rec[k]) * 100.0)
        bias_rows.append(row)
        _rate_rows(rate_rows, method, level, data, crates, brates, ci, settings)
        # per model
        mask1 = M.cie_mask(scores, 0.01)
        for i, r in enumerate(pop.records):
            m_gchange = M.normalized_change(crates.group_fpr[i], b_gfpr) if brates.group_names else np.zeros(0)
            valid = np.isfinite(m_gchange) & group_estimable if m_gchange.size else np.zeros(0, bool)
            mwg = int(np.nanargmax(np.where(valid, m_gchange, -np.inf))) if valid.any() else None
            mrow = {
                "version": r.key, "role": "compressed", "method": method, "level": level, "seed": r.seed,
                "acc": float(crates.acc[i]), "acc_drop": (base_acc - float(crates.acc[i])) * 100.0,
                "cev": _finite(pb.model_cev[i]) if pb is not None else None,
                "sde": _finite(pb.model_sde[i]) if pb is not None else None,
                "worst_group": brates.group_names[mwg] if mwg is not None else None,
                "worst_group_fpr_change": float(m_gchange[mwg]) if mwg is not None else None,
                "cie_acc_top1pct": float(comp_correct[i, mask1].mean()),
            }
            for name in ("cev", "sde"):
                if ci and f"model_{name}" in ci:
                    lo, hi = ci[f"model_{name}"]
                    mrow[f"{name}_ci_low"], mrow[f"{name}_ci_high"] = _finite(lo[i]), _finite(hi[i])
            mrow.update(_paired_bias(crates, brates, i, pairs[i] if pairs is not None else None, base))
            model_rows.append(mrow)
        plots["levels"].append(row)

    models = pd.DataFrame(model_rows)
    for r in targets:
        if r.key in errors:
            versions[r.key] = VersionOutcome(T.STATUS_ERROR, errors[r.key])
            continue
        hit = models[models["version"] == r.key]
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
    for k in errors:
        if k not in versions and k in target_keys:
            versions[k] = VersionOutcome(T.STATUS_ERROR, errors[k])
    tables["bias"] = pd.DataFrame(bias_rows)
    tables["rates"] = pd.DataFrame(rate_rows)
    tables["models"] = models
    tables["ttest"] = pd.concat(ttest_tables, ignore_index=True) if ttest_tables else pd.DataFrame()
    tables["cie"] = pd.DataFrame(cie_rows)
    tables["cie_composition"] = pd.DataFrame(comp_rows)
    tables["cie_list"] = pd.concat(cie_lists, ignore_index=True) if cie_lists else pd.DataFrame()
    tables["versions"] = _versions_table(targets, versions)
    tables["gate"] = pd.DataFrame(gate_rows)
    counts = pd.Series([o.status for o in versions.values()]).value_counts()
    for s in T.STATUSES:
        metrics[f"audit/n_{s}"] = float(counts.get(s, 0))
    summary = _summary(tables["bias"], base_acc, tables["cie"])
    return StudyAudit(metrics, tables, versions, summary, plots, data, settings, notes)


def _keep(v) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return True


def verdict(values: dict, thresholds: dict) -> tuple[str, str | None]:
    """Decide pass or fail from a version's key figures.

    Parameters
    ----------
    values : dict
        ``cev``, ``sde``, ``worst_group_fpr_change``, ``acc_drop``...
    thresholds : dict
        Same keys; None disables a check.

    Returns
    -------
    (str, str or None)
        ``("pass", None)``, ``("fail", "<what exceeded what>")``, or
        ``("error", ...)`` when a checked value is undefined.
    """
    broken, undefined = [], []
    for key in THRESHOLD_KEYS:
        limit = thresholds.get(key)
        if limit is None:
            continue
        val = _finite(values.get(key))
        if val is None:
            undefined.append(key)
        elif val > float(limit):
            broken.append(f"{key} {val:.4g} > {float(limit):g}")
    if undefined:
        return T.STATUS_ERROR, f"cannot check the threshold(s) on {', '.join(undefined)}: the value is undefined for this version"
    if broken:
        return T.STATUS_FAIL, "; ".join(broken)
    return T.STATUS_PASS, None


def _paired_bias(crates, brates, i: int, b: int | None, base: Population) -> dict:
    """CEV and SDE of compressed model ``i`` against its own baseline ``b`` (lineage), as Simon Says compares them.

    The population view (``cev``/``sde`` of each model against the baseline
    population mean) is unchanged; these are ``cev_paired``/``sde_paired``.
    """
    if b is None:
        return {"baseline_version": None, "cev_paired": None, "sde_paired": None}
    dfpr = M.normalized_change(np.asarray(crates.cls.fpr, float)[i], np.asarray(brates.cls.fpr, float)[b])
    dfnr = M.normalized_change(np.asarray(crates.cls.fnr, float)[i], np.asarray(brates.cls.fnr, float)[b])
    out = {"baseline_version": base.records[b].key, "cev_paired": None, "sde_paired": None}
    try:
        out["cev_paired"] = _finite(M.cev(dfpr, dfnr).value)
        out["sde_paired"] = _finite(M.sde(dfpr, dfnr).value)
    except ValueError:  # no class with a defined change against this baseline
        pass
    return out


#: Seeded draws of the tied members of a CIE set (``cie_mask(tie_break="random")``) behind its accuracy range.
CIE_TIE_DRAWS = 50


def _tie_draws(scores, q, cut, comp_correct, base_correct, seed) -> dict:
    """Accuracy on the CIE set over seeded random draws of the tied block at the cut (2.5-97.5% range)."""
    if not cut.ambiguous:
        return {"comp_acc_on_draws_low": None, "comp_acc_on_draws_high": None,
                "base_acc_on_draws_low": None, "base_acc_on_draws_high": None}
    comp, base = [], []
    for d in range(CIE_TIE_DRAWS):
        m = M.cie_mask(scores, q, tie_break="random", seed=seed + d)
        comp.append(comp_correct[:, m].mean())
        base.append(base_correct[:, m].mean())
    cl, ch = np.quantile(comp, [0.025, 0.975])
    bl, bh = np.quantile(base, [0.025, 0.975])
    return {"comp_acc_on_draws_low": float(cl), "comp_acc_on_draws_high": float(ch),
            "base_acc_on_draws_low": float(bl), "base_acc_on_draws_high": float(bh)}


def _field_measures(data: StudyData, base: Population, pop: Population, brates, crates, pairs) -> dict:
    """Recall intensification (Good et al.) and the worst-group accuracy change (pp) of one compressed population."""
    out: dict = {"recall_intensification": None, "worst_group_acc_change_pp": None}
    try:
        out["recall_intensification"] = _finite(M.recall_intensification(
            np.nanmean(np.asarray(brates.cls.recall, float), axis=0),
            np.nanmean(np.asarray(crates.cls.recall, float), axis=0)).intensification)
    except ValueError:  # fewer than two classes with a defined baseline recall
        pass
    if data.group_names:
        cell = np.unique(data.group_codes, axis=0, return_inverse=True)[1].ravel()  # intersection of every attribute
        y = data.labels
        base_wga = [M.worst_group_accuracy_change(y, p, p, cell)[0] for p in base.preds]
        comp_wga = [M.worst_group_accuracy_change(y, p, p, cell)[0] for p in pop.preds]
        # each model against its own baseline; without lineage against the baseline population's mean
        ref = [base_wga[b] for b in pairs] if pairs is not None else [float(np.mean(base_wga))] * pop.size
        out["worst_group_acc_change_pp"] = float(np.mean(np.subtract(comp_wga, ref)) * 100.0)
    return out


def _gate_cells(data: StudyData) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The cells the default gate checks: every true class, then every value of every group attribute."""
    y = data.labels
    names = [("class", str(c)) for c in range(data.n_classes)]
    masks = [y == c for c in range(data.n_classes)]
    for k, attr in enumerate(data.group_names):
        for code, value in enumerate(data.group_levels[k]):
            names.append(("group", f"{attr}={value}"))
            masks.append(data.group_codes[:, k] == code)
    return names, np.asarray(masks, dtype=bool).reshape(len(masks), y.size)


def baseline_pairs(base: Population, pop: Population) -> list[int] | None:
    """Row of each compressed model's own baseline (``compbias.baseline_version``, else the same seed), or None."""
    by_version = {r.version: i for i, r in enumerate(base.records)}
    by_seed = {r.seed: i for i, r in enumerate(base.records) if r.seed is not None}
    pairs = []
    for r in pop.records:
        j = by_version.get(r.baseline_version) if r.baseline_version is not None else None
        if j is None:
            j = by_seed.get(r.seed)
        if j is None:
            return None
        pairs.append(j)
    return pairs


def gate_population(data: StudyData, base: Population, pop: Population,
                    settings: AuditSettings) -> tuple[tuple[str, str | None], list[dict]]:
    """The default gate's verdict on one compressed population, and its table rows.

    Each compressed model is compared with its own baseline
    (:func:`baseline_pairs`; without lineage, with the baseline
    population's mean error per example). For every class (true label) and
    group value with at least ``settings.min_count`` test examples,
    :func:`compbias.metrics.excess_harm` gives the excess harm (the cell's
    error-rate increase minus the overall one, in percentage points) with a
    two-level bootstrap interval (pairs and examples). The population fails
    when some cell's interval lies wholly above ``settings.gate.tolerance_pp``
    (the reason names the cell with the largest lower bound and its
    numbers), or when the interval of the overall error-rate increase lies
    wholly above ``settings.gate.overall_tolerance_pp``.

    Returns
    -------
    ((status, reason), rows)
        ``status`` is ``pass`` or ``fail``; ``rows`` one dict per cell.
    """
    g = settings.gate
    names, cells = _gate_cells(data)
    pairs = baseline_pairs(base, pop)
    changes = M.paired_error_changes(data.labels, base.preds, pop.preds, pairs)
    harm = M.excess_harm(changes, cells, min_count=settings.min_count, n_resamples=max(settings.bootstrap, 200),
                         confidence=settings.confidence, seed=settings.seed)
    rows = []
    for k, (kind, name) in enumerate(names):
        est = bool(harm.estimable[k])
        rows.append({
            "method": pop.method, "level": pop.level, "cell": kind, "name": name, "n": int(harm.n[k]),
            "error_change_pp": _finite(harm.cell_change[k]), "overall_change_pp": harm.overall_change,
            "excess_pp": _finite(harm.excess[k]) if est else None,
            "excess_ci_low": _finite(harm.ci_low[k]), "excess_ci_high": _finite(harm.ci_high[k]),
            "estimable": est if est else f"not estimable (n={int(harm.n[k])})",
            "fails": bool(est and harm.ci_low[k] > g.tolerance_pp),
        })
    lo, hi = harm.overall_ci
    rows.append({
        "method": pop.method, "level": pop.level, "cell": "overall", "name": "all test examples", "n": int(data.n_examples),
        "error_change_pp": harm.overall_change, "overall_change_pp": harm.overall_change, "excess_pp": None,
        "excess_ci_low": None, "excess_ci_high": None, "overall_ci_low": _finite(lo), "overall_ci_high": _finite(hi),
        "estimable": True, "fails": bool(lo > g.overall_tolerance_pp),
    })
    levels = (f"{settings.confidence:.0%} over pairs of models ("
              + ("each with its own baseline" if pairs is not None else "no lineage: against the baseline mean")
              + f", {harm.n_pairs}) and test examples")
    failing = [k for k, r in enumerate(rows[:-1]) if r["fails"]]
    found = []
    if failing:
        k = max(failing, key=lambda j: harm.ci_low[j])
        r = rows[k]
        what = f"class {r['name']}" if r["cell"] == "class" else f"group {r['name']}"
        found.append(f"{what} (n={r['n']}) error {r['error_change_pp']:+.1f} pp vs {harm.overall_change:+.1f} pp overall, "
                     f"excess {r['excess_pp']:+.1f} pp [{r['excess_ci_low']:+.1f}, {r['excess_ci_high']:+.1f}] "
                     f"> tolerance {g.tolerance_pp:g} pp" + (f"; {len(failing) - 1} more cell(s) fail" if len(failing) > 1 else ""))
    if rows[-1]["fails"]:
        found.append(f"overall error {harm.overall_change:+.1f} pp [{lo:+.1f}, {hi:+.1f}] > tolerance {g.overall_tolerance_pp:g} pp")
    if not found:
        return (T.STATUS_PASS, None), rows
    return (T.STATUS_FAIL, "default gate: " + "; ".join(found) + f" ({levels})"), rows


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


def _cie_list(data: StudyData, base: Population, pop: Population, scores: np.ndarray, mask: np.ndarray) -> pd.DataFrame:
    idx = np.flatnonzero(mask)
    order = idx[np.lexsort((idx, -scores[idx]))]
    C = data.n_classes
    bmodal = M.modal_labels(base.preds[:, order], C)
    cmodal = M.modal_labels(pop.preds[:, order], C)
    frame = data.test_frame.iloc[order].reset_index(drop=True).copy()
    frame.insert(0, "rank", np.arange(1, len(order) + 1))
    frame.insert(0, "level", pop.level)
    frame.insert(0, "method", pop.method)
    frame["cie_score"] = scores[order]
    frame["baseline_modal_pred"] = bmodal
    frame["compressed_modal_pred"] = cmodal
    frame["baseline_frac_correct"] = (base.preds[:, order] == data.labels[order]).mean(axis=0)
    frame["compressed_frac_correct"] = (pop.preds[:, order] == data.labels[order]).mean(axis=0)
    frame["annotation"] = ""
    return frame


def rate_denominators(data: StudyData, rates: _Rates, positive_class: int | None) -> dict[tuple[str, str, str], int]:
    """The number of test examples behind each rate of :func:`_rate_rows`: ``(scope, name, metric) -> n``.

    FPR is a share of the negatives and FNR of the positives: of class ``c``
    (one-vs-rest) for class rates; of the positive class inside the group for
    group rates of a binary task. A multi-class group rate is a mean over
    classes, and accuracy a share of all members: their ``n`` is the
    group's size. Denominators depend on the labels only, so they are the
    same for every model.
    """
    y = data.labels
    out: dict[tuple[str, str, str], int] = {("overall", "all", "acc"): int(y.size)}
    for c in range(data.n_classes):
        out[("class", str(c), "fnr")] = int((y == c).sum())
        out[("class", str(c), "fpr")] = int((y != c).sum())
    if rates.group_rows is not None:
        gf = _group_frame(data)
        for name, (_, grow) in zip(rates.group_names, rates.group_rows.iterrows()):
            member = np.ones(y.size, bool)
            for attr in data.group_names:
                if grow.get(attr) is not None and not (isinstance(grow.get(attr), float) and np.isnan(grow.get(attr))):
                    member &= gf[attr].to_numpy() == grow[attr]
            size = int(member.sum())
            out[("group", name, "acc")] = size
            if positive_class is not None:
                out[("group", name, "fnr")] = int((member & (y == positive_class)).sum())
                out[("group", name, "fpr")] = int((member & (y != positive_class)).sum())
            else:
                out[("group", name, "fnr")] = out[("group", name, "fpr")] = size
    return out


def _rate_rows(rows, method, level, data, rates: _Rates, base: _Rates | None, ci: dict | None,
               settings: "AuditSettings") -> None:
    """Long table: population x scope x metric -> mean, CI, change vs baseline (% and pp), CI; n and estimability."""
    n_of = rate_denominators(data, rates, settings.positive_class)

    def add(scope, name, metric, values, base_values, ci_key, index):
        n = n_of.get((scope, name, metric))
        row = {"method": method, "level": level, "scope": scope, "name": name, "metric": metric, "n": n}
        if n is not None and n < settings.min_count:  # the estimability rule: no number, no degenerate interval
            row["estimable"] = f"not estimable (n={n})"
            rows.append(row)
            return
        row["estimable"] = True
        mean = float(_mean(values)) if values.size else float("nan")
        row["mean"] = mean
        if ci and ci_key in ci and ci[ci_key] is not None:
            lo, hi = ci[ci_key]
            row["ci_low"], row["ci_high"] = _idx(lo, index), _idx(hi, index)
        if base_values is not None:
            b = float(_mean(base_values)) if base_values.size else float("nan")
            row["baseline_mean"] = b
            row["change_pp"] = (mean - b) * 100.0
            row["change_pct"] = float(M.normalized_change(np.array([mean]), np.array([b]))[0])
            for suffix, col in (("_change_pp", "change_pp"), ("_change", "change")):
                dk = f"{ci_key}{suffix}"
                if ci and dk in ci and ci[dk] is not None:
                    lo, hi = ci[dk]
                    row[f"{col}_ci_low"], row[f"{col}_ci_high"] = _idx(lo, index), _idx(hi, index)
        rows.append(row)

    add("overall", "all", "acc", rates.acc, base.acc if base else None, "acc", None)
    for c in range(data.n_classes):
        for metric in ("fpr", "fnr"):
            add("class", str(c), metric, getattr(rates.cls, metric)[:, c], getattr(base.cls, metric)[:, c] if base else None, f"class_{metric}", c)
    for g, gname in enumerate(rates.group_names):
        for metric, arr, barr in (("fpr", rates.group_fpr, base.group_fpr if base else None),
                                  ("fnr", rates.group_fnr, base.group_fnr if base else None),
                                  ("acc", rates.group_acc, base.group_acc if base else None)):
            add("group", gname, metric, arr[:, g], barr[:, g] if barr is not None else None, f"group_{metric}", g)


def _idx(x, i):
    if i is None:
        return float(np.asarray(x).reshape(-1)[0])
    return float(np.asarray(x)[i])


# ---------------------------------------------------------------- bootstrap
def _bootstrap_population(data: StudyData, base: Population, pop: Population | None, settings: AuditSettings) -> dict:
    """Bootstrap CIs (resampling test examples) of population-level numbers."""
    if settings.bootstrap <= 0:
        return {}
    from compbias.platform.audit.intervals import population_intervals

    return population_intervals(data, base, pop, settings)
