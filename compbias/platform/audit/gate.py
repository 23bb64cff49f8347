"""Verdicts: the default gate (excess harm per class and group) and explicit thresholds.

With no threshold set, a compressed population fails when some class's or
group's error rate rose significantly more than the model's overall one
(:func:`gate_population`, ``docs/audit.md``, "The default gate"); with
thresholds set, a version fails when one of its point estimates exceeds its
threshold (:func:`verdict`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

import compbias.metrics as M
from compbias.platform.audit import tags as T
from compbias.platform.audit.population import Population, StudyData

if TYPE_CHECKING:  # pragma: no cover
    from compbias.platform.audit.settings import AuditSettings

THRESHOLD_KEYS = ("cev", "sde", "worst_group_fpr_change", "acc_drop")


def finite(x) -> float | None:
    """``float(x)`` when it is a finite number, else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


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
        val = finite(values.get(key))
        if val is None:
            undefined.append(key)
        elif val > float(limit):
            broken.append(f"{key} {val:.4g} > {float(limit):g}")
    if undefined:
        return T.STATUS_ERROR, f"cannot check the threshold(s) on {', '.join(undefined)}: the value is undefined for this version"
    if broken:
        return T.STATUS_FAIL, "; ".join(broken)
    return T.STATUS_PASS, None


def gate_cells(data: StudyData) -> tuple[list[tuple[str, str]], np.ndarray]:
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
    names, cells = gate_cells(data)
    pairs = baseline_pairs(base, pop)
    changes = M.paired_error_changes(data.labels, base.preds, pop.preds, pairs)
    harm = M.excess_harm(changes, cells, min_count=settings.min_count, n_resamples=max(settings.bootstrap, 200),
                         confidence=settings.confidence, seed=settings.seed)
    rows = []
    for k, (kind, name) in enumerate(names):
        est = bool(harm.estimable[k])
        rows.append({
            "method": pop.method, "level": pop.level, "cell": kind, "name": name, "n": int(harm.n[k]),
            "error_change_pp": finite(harm.cell_change[k]), "overall_change_pp": harm.overall_change,
            "excess_pp": finite(harm.excess[k]) if est else None,
            "excess_ci_low": finite(harm.ci_low[k]), "excess_ci_high": finite(harm.ci_high[k]),
            "estimable": est if est else f"not estimable (n={int(harm.n[k])})",
            "fails": bool(est and harm.ci_low[k] > g.tolerance_pp),
        })
    lo, hi = harm.overall_ci
    rows.append({
        "method": pop.method, "level": pop.level, "cell": "overall", "name": "all test examples", "n": int(data.n_examples),
        "error_change_pp": harm.overall_change, "overall_change_pp": harm.overall_change, "excess_pp": None,
        "excess_ci_low": None, "excess_ci_high": None, "overall_ci_low": finite(lo), "overall_ci_high": finite(hi),
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
