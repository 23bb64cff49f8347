"""The measures of one compressed population against the baselines: rows of the audit's tables.

Every number comes from :mod:`compbias.metrics`; :func:`population_measures`
assembles one compressed population's bias row (CEV, SDE, PIE, field
measures), its CIE rows and composition, its per-class Welch tests, group
changes and per-model rows. Conventions are those of ``docs/audit.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import compbias.metrics as M
from compbias.platform.audit.gate import baseline_pairs, finite
from compbias.platform.audit.population import Population, StudyData
from compbias.platform.audit.rates import PopulationRates, nanmean, quiet


def pct_name(q: float) -> str:
    """``0.01 -> 'top1pct'``, ``0.005 -> 'top0.5pct'``."""
    return f"top{q * 100:g}pct"


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
            "base_mean": nanmean(base_recall),
            "comp_mean": nanmean(comp_recall),
            "t": t,
            "p": p,
        }
    )


def paired_bias(crates, brates, i: int, b: int | None, base: Population) -> dict:
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
        out["cev_paired"] = finite(M.cev(dfpr, dfnr).value)
        out["sde_paired"] = finite(M.sde(dfpr, dfnr).value)
    except ValueError:  # no class with a defined change against this baseline
        pass
    return out


#: Seeded draws of the tied members of a CIE set (``cie_mask(tie_break="random")``) behind its accuracy range.
CIE_TIE_DRAWS = 50


def tie_draws(scores, q, cut, comp_correct, base_correct, seed) -> dict:
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


def field_measures(data: StudyData, base: Population, pop: Population, brates, crates, pairs) -> dict:
    """Recall intensification (Good et al.) and the worst-group accuracy change (pp) of one compressed population."""
    out: dict = {"recall_intensification": None, "worst_group_acc_change_pp": None}
    try:
        out["recall_intensification"] = finite(M.recall_intensification(
            nanmean(np.asarray(brates.cls.recall, float), axis=0),
            nanmean(np.asarray(crates.cls.recall, float), axis=0)).intensification)
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


def cie_list(data: StudyData, base: Population, pop: Population, scores: np.ndarray, mask: np.ndarray) -> pd.DataFrame:
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


@dataclass
class PopulationMeasures:
    """What one compressed population adds to the audit's tables, metrics and plots."""

    bias_row: dict
    model_rows: list[dict]
    ttest: pd.DataFrame
    cie_rows: list[dict] = field(default_factory=list)
    composition_rows: list[dict] = field(default_factory=list)
    cie_list: pd.DataFrame | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    class_changes: dict | None = None
    groups_plot: dict | None = None


def population_measures(data: StudyData, base: Population, brates: PopulationRates, pop: Population,
                        crates: PopulationRates, settings, ci: dict, group_estimable: np.ndarray,
                        pk: str) -> PopulationMeasures:
    """Every measure of one compressed population against the baseline population.

    Parameters
    ----------
    data : StudyData
    base, pop : Population
        The baselines and the compressed population.
    brates, crates : PopulationRates
        Their per-model rates.
    settings : AuditSettings
    ci : dict
        The population's bootstrap intervals (empty without bootstrap).
    group_estimable : numpy.ndarray of bool
        Groups whose FPR is estimable (the worst group is chosen among them).
    pk : str
        ``<method>/<level>`` of the metric keys.

    Returns
    -------
    PopulationMeasures
    """
    y, C = data.labels, data.n_classes
    method, level = pop.method, pop.level
    base_acc = float(np.mean(brates.acc))
    out = PopulationMeasures(bias_row={}, model_rows=[], ttest=pd.DataFrame())
    metrics = out.metrics
    try:
        pb = M.population_bias(y, base.preds, pop.preds, C, smoothing=settings.smoothing)
    except ValueError as exc:  # no class with a defined change (e.g. a perfect baseline)
        pb = None
        out.notes.append(f"{method} at {level}: {exc}")
    acc = float(np.mean(crates.acc))
    row = {"method": method, "level": level, "n_models": pop.size, "acc": acc, "acc_drop": (base_acc - acc) * 100.0}
    metrics[f"acc/{pk}"] = acc
    metrics[f"acc_drop/{pk}"] = row["acc_drop"]
    _bias_values(row, metrics, pb, ci, pk, data.n_classes)
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
    row.update(field_measures(data, base, pop, brates, crates, pairs))
    for k in ("recall_intensification", "worst_group_acc_change_pp"):
        if row.get(k) is not None:
            metrics[f"{k}/{pk}"] = row[k]
    scores = M.cie_scores(base.preds, pop.preds, C)
    _cie_measures(out, data, base, pop, scores, settings, pk)
    if pb is not None:  # per-class changes (scatter)
        out.class_changes = {
            "delta_fpr": np.asarray(pb.delta_fpr, float),
            "delta_fnr": np.asarray(pb.delta_fnr, float),
            "model_delta_fpr": np.asarray(pb.model_delta_fpr, float),
            "model_delta_fnr": np.asarray(pb.model_delta_fnr, float),
        }
    tt = welch_per_class(np.asarray(brates.cls.recall, float), np.asarray(crates.cls.recall, float))
    tt.insert(0, "level", level)
    tt.insert(0, "method", method)
    out.ttest = tt
    metrics[f"ttest/n_classes_p05/{pk}"] = float((tt["p"] < 0.05).sum())
    row["ttest_classes_p05"] = int((tt["p"] < 0.05).sum())
    row["worst_group"], row["worst_group_fpr_change"] = _group_changes(out, brates, crates, ci, group_estimable, pk)
    _worst_class(row, brates, crates)
    out.bias_row = row
    mask1 = M.cie_mask(scores, 0.01)
    out.model_rows = _model_rows(data, base, pop, brates, crates, pb, ci, pairs, group_estimable, mask1)
    return out


def _bias_values(row: dict, metrics: dict, pb, ci: dict, pk: str, n_classes: int) -> None:
    """CEV and SDE of the population, the classes they leave out, and their intervals."""
    for name in ("cev", "sde"):
        res = getattr(pb, name) if pb is not None else None
        row[name] = res.value if res is not None else float("nan")
        row[f"{name}_classes_dropped"] = len(res.dropped) if res is not None else n_classes
        row[f"{name}_dropped_classes"] = (",".join(str(int(c)) for c in res.dropped) if res is not None
                                          else "all (no class has a defined change)")
        if res is None:
            continue
        metrics[f"{name}/{pk}"] = res.value
        if ci and name in ci:
            lo, hi = ci[name]
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = lo, hi
            metrics[f"{name}/{pk}/ci_low"], metrics[f"{name}/{pk}/ci_high"] = lo, hi


def _cie_measures(out: PopulationMeasures, data: StudyData, base: Population, pop: Population, scores: np.ndarray,
                  settings, pk: str) -> None:
    """Accuracy on and off each CIE set, its tie block, and the groups' shares in it."""
    y = data.labels
    base_correct = base.preds == y  # (M, N)
    comp_correct = pop.preds == y
    margin = M.vote_margin(base.preds, data.n_classes)
    fractions = settings.fractions()
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
            out.metrics[f"{k}/{pk}"] = v
        cie_row = {"method": pop.method, "level": pop.level, "fraction": q, "n_examples": int(mask.sum()),
                   "comp_acc_on": vals[f"cie/acc_{nm}"], "base_acc_on": vals[f"cie/base_acc_{nm}"],
                   "comp_acc_off": vals[f"cie/acc_off_{nm}"], "base_acc_off": vals[f"cie/base_acc_off_{nm}"],
                   "score_at_cut": cut.score_at_cut, "tied_block": cut.tied_block,
                   "taken_from_block": cut.taken_from_block,
                   "margin_auroc": M.margin_auroc(margin, mask)}
        cie_row.update(tie_draws(scores, q, cut, comp_correct, base_correct, settings.seed))
        out.cie_rows.append(cie_row)
        for j, gname in enumerate(data.group_names):
            codes = data.group_codes[:, j]
            for code, val in enumerate(data.group_levels[j]):
                in_test = float((codes == code).mean())
                in_cie = float((codes[mask] == code).mean())
                out.composition_rows.append({
                    "method": pop.method, "level": pop.level, "fraction": q, "attribute": gname, "value": val,
                    "share_test": in_test, "share_cie": in_cie,
                    "over_representation": in_cie / in_test if in_test > 0 else float("nan")})
    out.cie_list = cie_list(data, base, pop, scores, M.cie_mask(scores, max(fractions)))


def _group_changes(out: PopulationMeasures, brates: PopulationRates, crates: PopulationRates, ci: dict,
                   group_estimable: np.ndarray, pk: str) -> tuple[str | None, float | None]:
    """Normalised group FPR/FNR changes (plotted); returns the worst estimable group and its FPR change."""
    if not brates.group_names:
        return None, None
    g_change = M.normalized_change(nanmean(crates.group_fpr), nanmean(brates.group_fpr))
    g_change_fnr = M.normalized_change(nanmean(crates.group_fnr), nanmean(brates.group_fnr))
    out.groups_plot = {
        "names": brates.group_names,
        "fpr_change": g_change,
        "fnr_change": g_change_fnr,
        "fpr_ci": ci.get("group_fpr_change") if ci else None,
        "fnr_ci": ci.get("group_fnr_change") if ci else None,
    }
    valid = np.isfinite(g_change) & group_estimable
    if not valid.any():
        return None, None
    j = int(np.nanargmax(np.where(valid, g_change, -np.inf)))
    out.metrics[f"worst_group_fpr_change/{pk}"] = float(g_change[j])
    return brates.group_names[j], float(g_change[j])


def _worst_class(row: dict, brates: PopulationRates, crates: PopulationRates) -> None:
    """Beside CEV/SDE (which drop classes whose baseline rate is 0): the worst class's recall, never dropped."""
    with np.errstate(invalid="ignore"), quiet():
        b_rec = np.nanmean(np.asarray(brates.cls.recall, float), axis=0)
        c_rec = np.nanmean(np.asarray(crates.cls.recall, float), axis=0)
    if np.isfinite(c_rec).any():
        k = int(np.nanargmin(c_rec))
        row["worst_class"], row["worst_class_recall"] = k, float(c_rec[k])
        row["worst_class_recall_change_pp"] = float((c_rec[k] - b_rec[k]) * 100.0)


def _model_rows(data: StudyData, base: Population, pop: Population, brates: PopulationRates,
                crates: PopulationRates, pb, ci: dict, pairs, group_estimable: np.ndarray,
                mask1: np.ndarray) -> list[dict]:
    """One row per compressed model: accuracy, CEV/SDE (population and paired), worst group, top-1% CIE accuracy."""
    base_acc = float(np.mean(brates.acc))
    b_gfpr = nanmean(brates.group_fpr)
    comp_correct = pop.preds == data.labels
    rows = []
    for i, r in enumerate(pop.records):
        m_gchange = M.normalized_change(crates.group_fpr[i], b_gfpr) if brates.group_names else np.zeros(0)
        valid = np.isfinite(m_gchange) & group_estimable if m_gchange.size else np.zeros(0, bool)
        mwg = int(np.nanargmax(np.where(valid, m_gchange, -np.inf))) if valid.any() else None
        mrow = {
            "version": r.key, "role": "compressed", "method": pop.method, "level": pop.level, "seed": r.seed,
            "acc": float(crates.acc[i]), "acc_drop": (base_acc - float(crates.acc[i])) * 100.0,
            "cev": finite(pb.model_cev[i]) if pb is not None else None,
            "sde": finite(pb.model_sde[i]) if pb is not None else None,
            "worst_group": brates.group_names[mwg] if mwg is not None else None,
            "worst_group_fpr_change": float(m_gchange[mwg]) if mwg is not None else None,
            "cie_acc_top1pct": float(comp_correct[i, mask1].mean()),
        }
        for name in ("cev", "sde"):
            if ci and f"model_{name}" in ci:
                lo, hi = ci[f"model_{name}"]
                mrow[f"{name}_ci_low"], mrow[f"{name}_ci_high"] = finite(lo[i]), finite(hi[i])
        mrow.update(paired_bias(crates, brates, i, pairs[i] if pairs is not None else None, base))
        rows.append(mrow)
    return rows
