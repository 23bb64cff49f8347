"""Bootstrap confidence intervals of the audit's numbers.

By default (``audit.intervals: two_level``) every resample draws the test
examples with replacement (:func:`compbias.metrics.bootstrap_ci` recounts all
models on them) **and** the models: the compressed models with replacement,
each bringing its own baseline (lineage, :func:`baseline_pairs`) when every
baseline has exactly one compressed model in the population, else both
populations independently. Population numbers (mean rates and their changes
per class and per group, in % and pp, CEV and SDE of the means) are computed
on the drawn models, so their intervals describe the training procedure, not
these particular seeds. Each compressed model's own CEV/SDE keeps its model
(only the examples and the baseline reference are resampled).
``intervals: examples`` resamples the test examples only (the populations
held fixed; CEV/SDE of the means through the numba kernel). Everything is
evaluated in one pass per population with a callable statistic, so the
examples are recounted once per resample for all of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

import compbias.metrics as M
from compbias.metrics.bias import cev_sde_rows
from compbias.platform.audit.population import Population, StudyData


def _nanmean(x, axis):
    """Mean over ``axis`` ignoring NaN (NaN where all are NaN), without numpy's warning machinery.

    Called several times per bootstrap resample, where ``numpy.nanmean``'s
    warning filters cost more than the arithmetic.
    """
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis=axis) / ok.sum(axis=axis)


def _cells(data: StudyData) -> tuple[np.ndarray, np.ndarray, int]:
    """Finest group cell of each example and the map from cells to reported groups."""
    sizes = [len(lv) for lv in data.group_levels]
    n_cells = int(np.prod(sizes))
    code = np.zeros(data.n_examples, np.int64)
    for j, s in enumerate(sizes):
        code = code * s + data.group_codes[:, j]
    frame = pd.DataFrame({n: data.group_codes[:, j] for j, n in enumerate(data.group_names)})
    table = M.group_rates(data.labels, data.labels, frame, data.n_classes).groups
    cell_codes = np.array(np.unravel_index(np.arange(n_cells), sizes)).T  # (cells, K)
    agg = np.ones((len(table), n_cells))
    for g, row in enumerate(table.itertuples(index=False)):
        for j, name in enumerate(data.group_names):
            val = getattr(row, name) if name.isidentifier() else table.iloc[g][name]
            if val is not None and not (isinstance(val, float) and np.isnan(val)):
                agg[g] *= cell_codes[:, j] == int(val)
    return code, agg, n_cells


def _group_view(rates, agg: np.ndarray, positive_class, smoothing: float = 0.0):
    """Aggregate per-cell counts (M, cells, C) into reported groups: fpr, fnr, acc of shape (M, G)."""
    counts = {f: np.einsum("gk,mkc->mgc", agg, getattr(rates, f).astype(np.float64)) for f in ("tp", "fp", "fn", "tn")}
    r = M.ClassRates.from_counts(**counts, smoothing=smoothing)
    acc = np.asarray(r.accuracy, float)
    fpr, fnr = np.asarray(r.fpr, float), np.asarray(r.fnr, float)
    if positive_class is None:
        fpr, fnr = _nanmean(fpr, -1), _nanmean(fnr, -1)
    else:
        fpr, fnr = fpr[..., positive_class], fnr[..., positive_class]
    return fpr, fnr, acc


def _model_bias(dfpr: np.ndarray, dfnr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CEV and SDE of every row (model) at once, NaN where :func:`compbias.metrics.cev` would refuse.

    The rows go through the kernel that :func:`~compbias.metrics.cev` and
    :func:`~compbias.metrics.sde` run on one row (same arithmetic, same
    values); a row without a class whose two changes are defined, or holding
    an inf, is NaN.
    """
    x = np.ascontiguousarray(dfpr, np.float64)
    y = np.ascontiguousarray(dfnr, np.float64)
    out_c, out_s, _ = cev_sde_rows(x, y)  # NaN where no class is used
    refused = np.isinf(x).any(axis=1) | np.isinf(y).any(axis=1)
    out_c[refused] = np.nan
    out_s[refused] = np.nan
    return out_c, out_s


def _take(r, idx):
    """The rates of the models ``idx`` (rows of the model axis), as a new ClassRates."""
    return M.ClassRates.from_counts(tp=r.tp[idx], fp=r.fp[idx], fn=r.fn[idx], tn=r.tn[idx], smoothing=r.smoothing)


def _model_resampler(base: Population, pop: Population | None, seed: int):
    """A function ``(b, c) -> (b', c')`` drawing models with replacement, seeded; one call per resample, in order."""
    from compbias.platform.audit.gate import baseline_pairs

    rng = np.random.default_rng([seed, 7919])
    n_base = base.size
    pairs = baseline_pairs(base, pop) if pop is not None else None
    one_to_one = pairs is not None and sorted(pairs) == list(range(n_base))

    def draw(b, c):
        if pop is None:  # the baseline population alone
            return _take(b, rng.integers(0, n_base, n_base)), c
        m = pop.size
        idx_c = rng.integers(0, m, m)
        idx_b = np.asarray(pairs)[idx_c] if one_to_one else rng.integers(0, n_base, n_base)
        return _take(b, idx_b), _take(c, idx_c)

    return draw


def population_intervals(data: StudyData, base: Population, pop: Population | None, settings) -> dict:
    """Confidence intervals of one population's numbers.

    Parameters
    ----------
    data : StudyData
    base : Population
        The baseline population.
    pop : Population or None
        A compressed population; None for the baseline's own numbers.
    settings : AuditSettings
        ``bootstrap`` resamples, ``confidence``, ``seed``, ``positive_class``.

    Returns
    -------
    dict
        ``name -> (low, high)`` with scalar or per-class / per-group arrays:
        ``acc``, ``class_fpr``, ``class_fnr``, ``group_fpr``, ``group_fnr``,
        ``group_acc`` and, for compressed populations, ``cev``, ``sde``,
        ``class_fpr_change``, ``class_fnr_change``, ``group_fpr_change``,
        ``group_fnr_change`` and each model's ``model_cev``, ``model_sde``
        (arrays of shape (M',)).
    """
    y, C = data.labels, data.n_classes
    opts = dict(n_resamples=settings.bootstrap, confidence=settings.confidence, seed=settings.seed,
                smoothing=settings.smoothing)
    comp = pop.preds if pop is not None else base.preds[:1]
    own = pop is None
    m = comp.shape[0]
    two_level = getattr(settings, "intervals", "two_level") == "two_level"
    resample = _model_resampler(base, pop, settings.seed) if two_level else None
    out: dict = {}
    if not own and not two_level:
        for name in ("cev", "sde"):
            try:
                r = M.bootstrap_ci(y, base.preds, comp, C, statistic=name, **opts)
                out[name] = (float(r.low), float(r.high))
            except ValueError:
                pass
    grouped = bool(data.group_names)
    if grouped:
        code, agg, n_cells = _cells(data)
        G = agg.shape[0]
        extra = dict(groups=code, n_groups=n_cells)
    else:
        G, extra = 0, {}

    def class_view(r):
        if not grouped:
            return r
        return M.ClassRates.from_counts(*(getattr(r, f).sum(axis=1) for f in ("tp", "fp", "fn", "tn")),
                                        smoothing=settings.smoothing)

    def stat(b, c):
        # one recount per resample serves the class-level and the group-level numbers;
        # each mean is taken once and reused (the same arithmetic as writing it out each time)
        cc_models = class_view(c)  # each compressed model as it is (its own CEV/SDE)
        if resample is not None:
            b, c = resample(b, c)  # the drawn models: population numbers
        bc, cc = class_view(b), class_view(c)
        r = bc if own else cc
        r_acc = _nanmean(np.asarray(r.accuracy, float), 0)
        r_fpr, r_fnr = _nanmean(r.fpr, 0), _nanmean(r.fnr, 0)
        parts = [np.atleast_1d(r_acc), r_fpr, r_fnr]
        if not own:
            bf, bn = _nanmean(bc.fpr, 0), _nanmean(bc.fnr, 0)
            cf, cn = r_fpr, r_fnr  # r is cc
            dfpr, dfnr = M.normalized_change(cf, bf), M.normalized_change(cn, bn)
            parts += [dfpr, dfnr]
            parts += list(_model_bias(M.normalized_change(cc_models.fpr, bf), M.normalized_change(cc_models.fnr, bn)))
            # absolute changes in percentage points, beside the relative ones
            acc_pp = (r_acc - _nanmean(np.asarray(bc.accuracy, float), 0)) * 100.0
            parts += [np.atleast_1d(acc_pp), (cf - bf) * 100.0, (cn - bn) * 100.0]
            if two_level:  # CEV and SDE of the drawn populations' means
                pop_bias = _model_bias(dfpr[None], dfnr[None])
                parts += [pop_bias[0], pop_bias[1]]
        if grouped:
            gbf, gbn, gba = (_nanmean(x, 0) for x in _group_view(b, agg, settings.positive_class, settings.smoothing))
            if own:
                parts += [gbf, gbn, gba]
            else:
                gcf, gcn, gca = (_nanmean(x, 0) for x in _group_view(c, agg, settings.positive_class, settings.smoothing))
                parts += [gcf, gcn, gca,
                          M.normalized_change(gcf, gbf),
                          M.normalized_change(gcn, gbn),
                          (gcf - gbf) * 100.0,
                          (gcn - gbn) * 100.0,
                          (gca - gba) * 100.0]
        return np.concatenate(parts)

    try:
        res = M.bootstrap_ci(y, base.preds, comp, C, statistic=stat, **opts, **extra)
    except ValueError:
        return out
    lo, hi = np.asarray(res.low), np.asarray(res.high)
    names = [("acc", 1), ("class_fpr", C), ("class_fnr", C)]
    if not own:
        names += [("class_fpr_change", C), ("class_fnr_change", C), ("model_cev", m), ("model_sde", m),
                  ("acc_change_pp", 1), ("class_fpr_change_pp", C), ("class_fnr_change_pp", C)]
        if two_level:
            names += [("cev", 1), ("sde", 1)]
    if grouped:
        names += [("group_fpr", G), ("group_fnr", G), ("group_acc", G)]
        if not own:
            names += [("group_fpr_change", G), ("group_fnr_change", G),
                      ("group_fpr_change_pp", G), ("group_fnr_change_pp", G), ("group_acc_change_pp", G)]
    at = 0
    for name, width in names:
        out[name] = (lo[at:at + width], hi[at:at + width])
        at += width
    out["acc"] = (float(out["acc"][0][0]), float(out["acc"][1][0]))
    for name in ("cev", "sde"):
        if two_level and name in out:
            lo_, hi_ = out[name]
            if np.isfinite(lo_[0]) and np.isfinite(hi_[0]):
                out[name] = (float(lo_[0]), float(hi_[0]))
            else:
                del out[name]
    return out
