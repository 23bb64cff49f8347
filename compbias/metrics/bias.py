"""Normalised rate changes and the CEV / SDE bias metrics (Blakeney et al.)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics._numba import kernel
from compbias.metrics._validation import validate_labels
from compbias.metrics.rates import ClassRates, ovr_rates

__all__ = [
    "BiasResult",
    "PopulationBias",
    "cev",
    "normalized_change",
    "population_bias",
    "sde",
]

ERR_NO_DEFINED_CLASS = (
    "{metric} is undefined: none of the {n} classes has a defined change in "
    "both FPR and FNR (each one's baseline rate is 0 or NaN). Use rates with "
    "additive smoothing (class_rates(..., smoothing=a), population_bias(..., "
    "smoothing=a)) or check that the baseline saw these classes."
)
ERR_POPULATION_CLASSES = "base_preds and comp_preds must have 2 dimensions (n_models, n_examples); got {shape} for {name}."

_SQRT2 = math.sqrt(2.0)


@kernel()
def cev_sde_rows(dfpr, dfnr):  # pragma: no cover - numba
    """CEV, SDE and the number of used classes of every row.

    A class is used when both its deltas are not NaN. Rows without a used
    class get NaN values and ``n_used = 0``. Two-pass variance (mean first),
    ddof = 0.
    """
    rows, c = dfpr.shape
    cev = np.empty(rows)
    sde = np.empty(rows)
    n_used = np.zeros(rows, np.int64)
    for r in range(rows):
        k = 0
        sx = 0.0
        sy = 0.0
        sd = 0.0
        for j in range(c):
            x = dfpr[r, j]
            y = dfnr[r, j]
            if x == x and y == y:
                k += 1
                sx += x
                sy += y
                sd += abs(x - y)
        n_used[r] = k
        if k == 0:
            cev[r] = np.nan
            sde[r] = np.nan
            continue
        mx = sx / k
        my = sy / k
        vx = 0.0
        vy = 0.0
        for j in range(c):
            x = dfpr[r, j]
            y = dfnr[r, j]
            if x == x and y == y:
                vx += (x - mx) * (x - mx)
                vy += (y - my) * (y - my)
        cev[r] = (vx / k + vy / k) / 2.0
        sde[r] = sd / k / _SQRT2
    return cev, sde, n_used


def normalized_change(compressed, baseline):
    r"""Normalised change of a rate, in percent of the baseline rate.

    Parameters
    ----------
    compressed : array-like of float
        Rates of the compressed model (or the population mean).
    baseline : array-like of float
        Baseline rates, broadcastable against ``compressed``.

    Returns
    -------
    delta : ndarray of float64
        The broadcast shape of the inputs.

    Notes
    -----
    .. math::

        \delta X = \frac{X_{\mathrm{compressed}} - X_{\mathrm{base}}}
                        {X_{\mathrm{base}}} \times 100

    The change is NaN where the baseline rate is 0 (a perfect baseline:
    no relative change exists) and where either rate is NaN (a class absent
    from the test set). It is never inf. :func:`cev` and :func:`sde` drop
    such classes and say which; to keep them, compute the rates with
    additive smoothing (``class_rates(counts, smoothing=a)``), which makes
    every rate positive.

    References
    ----------
    Blakeney et al., "Simon Says: Evaluating and Mitigating Bias in Pruned
    Neural Networks with Knowledge Distillation", eq. (1).

    Examples
    --------
    >>> normalized_change([0.2, 0.1, 0.3], [0.1, 0.1, 0.0])
    array([100.,   0.,  nan])
    """
    x = v.check_float(compressed, "compressed", allow_nan=True)
    b = v.check_float(baseline, "baseline", allow_nan=True)
    try:
        shape = np.broadcast_shapes(x.shape, b.shape)
    except ValueError:
        raise ValueError(v.ERR_SHAPE_MISMATCH.format(name1="compressed", shape1=x.shape,
                                                     name2="baseline", shape2=b.shape)) from None
    out = np.full(shape, np.nan)
    ok = np.broadcast_to(b != 0, shape) & ~np.isnan(np.broadcast_to(b, shape))
    np.divide(np.subtract(x, b) * 100.0, np.broadcast_to(b, shape), out=out, where=ok)
    return out


@dataclass(frozen=True)
class BiasResult:
    """A CEV or SDE value and the classes it was computed over.

    Attributes
    ----------
    value : float
        The metric.
    n_used : int
        Number of classes with a defined change in both FPR and FNR.
    dropped : ndarray of int64
        Class ids left out because a change was undefined (NaN).
    n_classes : int
        Number of classes given.
    """

    value: float
    n_used: int
    dropped: np.ndarray
    n_classes: int

    def __float__(self) -> float:
        return self.value


def _check_deltas(delta_fpr, delta_fnr):
    advice = "a normalised change is never inf; check how it was computed."
    x = v.check_float(delta_fpr, "delta_fpr", allow_nan=True, ndims=(1,), advice=advice)
    y = v.check_float(delta_fnr, "delta_fnr", allow_nan=True, ndims=(1,), advice=advice)
    if x.shape != y.shape:
        raise ValueError(v.ERR_SHAPE_MISMATCH.format(name1="delta_fpr", shape1=x.shape,
                                                     name2="delta_fnr", shape2=y.shape))
    return x, y


def _result(metric: str, x, y, values, n_used) -> BiasResult:
    if n_used[0] == 0:
        raise ValueError(ERR_NO_DEFINED_CLASS.format(metric=metric, n=x.shape[0]))
    dropped = np.flatnonzero(np.isnan(x) | np.isnan(y)).astype(np.int64)
    return BiasResult(value=float(values[0]), n_used=int(n_used[0]), dropped=dropped,
                      n_classes=int(x.shape[0]))


def cev(delta_fpr, delta_fnr):
    r"""Combined Error Variance of the per-class normalised rate changes.

    Parameters
    ----------
    delta_fpr : array-like of shape (n_classes,)
        Normalised change of each class's false positive rate, in percent
        (see :func:`normalized_change`); NaN where undefined.
    delta_fnr : array-like of shape (n_classes,)
        The same for the false negative rate.

    Returns
    -------
    result : BiasResult
        ``.value`` (float), ``.n_used``, ``.dropped`` (class ids).

    Raises
    ------
    ValueError
        If no class has both changes defined, or a change is inf.

    Notes
    -----
    Over the :math:`n` classes whose two changes are both defined, with
    :math:`\bar\delta` the mean over those classes,

    .. math::

        \mathrm{CEV} = \frac{1}{2}\left(
            \frac{1}{n}\sum_i (\delta FPR_i - \overline{\delta FPR})^2 +
            \frac{1}{n}\sum_i (\delta FNR_i - \overline{\delta FNR})^2
        \right)

    i.e. the population variances (``ddof=0``) of the two coordinates,
    averaged: the mean squared distance of the points
    :math:`(\delta FPR_i, \delta FNR_i)` to their centroid, halved. This is
    what the authors' released code computes; reading the paper's eq. (3)
    as a squared Euclidean norm gives twice this value.

    A class is dropped when either change is NaN (baseline rate 0, or the
    class absent from the test set). To keep every class, compute rates
    with additive smoothing instead.

    References
    ----------
    Blakeney et al., "Simon Says: Evaluating and Mitigating Bias in Pruned
    Neural Networks with Knowledge Distillation", eq. (2)-(3).

    Examples
    --------
    >>> r = cev([10.0, -10.0, float("nan")], [0.0, 20.0, 5.0])
    >>> r.value, r.n_used, r.dropped
    (100.0, 2, array([2]))
    """
    x, y = _check_deltas(delta_fpr, delta_fnr)
    values, _, n_used = cev_sde_rows(x.reshape(1, -1), y.reshape(1, -1))
    return _result("CEV", x, y, values, n_used)


def sde(delta_fpr, delta_fnr):
    r"""Symmetric Distance Error of the per-class normalised rate changes.

    Parameters
    ----------
    delta_fpr : array-like of shape (n_classes,)
        Normalised change of each class's false positive rate, in percent.
    delta_fnr : array-like of shape (n_classes,)
        The same for the false negative rate.

    Returns
    -------
    result : BiasResult
        ``.value`` (float), ``.n_used``, ``.dropped`` (class ids).

    Raises
    ------
    ValueError
        If no class has both changes defined, or a change is inf.

    Notes
    -----
    Over the :math:`n` classes whose two changes are both defined,

    .. math::

        \mathrm{SDE} = \frac{1}{n}\sum_i
            \frac{\lvert \delta FPR_i - \delta FNR_i \rvert}{\sqrt 2}

    the mean distance of the points :math:`(\delta FPR_i, \delta FNR_i)` to
    the balance line :math:`x = y`. Classes with an undefined (NaN) change
    are dropped, as in :func:`cev`.

    References
    ----------
    Blakeney et al., "Simon Says", eq. (4)-(6).

    Examples
    --------
    >>> r = sde([10.0, 0.0], [0.0, 0.0])
    >>> round(r.value, 6), r.n_used
    (3.535534, 2)
    """
    x, y = _check_deltas(delta_fpr, delta_fnr)
    _, values, n_used = cev_sde_rows(x.reshape(1, -1), y.reshape(1, -1))
    return _result("SDE", x, y, values, n_used)


@dataclass(frozen=True)
class PopulationBias:
    """Rate changes, CEV and SDE of a compressed population against a baseline one.

    Attributes
    ----------
    base_rates, comp_rates : ClassRates
        Per-model, per-class rates, shapes ``(M, C)`` and ``(M', C)``.
    delta_fpr, delta_fnr : ndarray of shape (C,)
        Normalised change of the compressed population's mean rate against
        the baseline population's mean rate.
    cev, sde : BiasResult
        CEV and SDE of those population-mean changes.
    model_delta_fpr, model_delta_fnr : ndarray of shape (M', C)
        Each compressed model's rates against the baseline population mean.
    model_cev, model_sde : ndarray of shape (M',)
        CEV and SDE of each compressed model (NaN where ``model_n_used`` is 0).
    model_n_used : ndarray of int64, shape (M',)
        Classes used for each compressed model.
    """

    base_rates: ClassRates
    comp_rates: ClassRates
    delta_fpr: np.ndarray
    delta_fnr: np.ndarray
    cev: BiasResult
    sde: BiasResult
    model_delta_fpr: np.ndarray
    model_delta_fnr: np.ndarray
    model_cev: np.ndarray
    model_sde: np.ndarray
    model_n_used: np.ndarray


def validate_populations(y_true, base_preds, comp_preds, n_classes):
    """Validate a baseline and a compressed population of one test set: ``(y_true, base, comp, n_classes)``.

    Shared by :mod:`compbias.metrics.bias` and :mod:`compbias.metrics.stats`; raises ValueError naming the input.
    """
    y_true, base, n_classes = validate_labels(y_true, base_preds, n_classes, pred_name="base_preds")
    _, comp, _ = validate_labels(y_true, comp_preds, n_classes, pred_name="comp_preds")
    for name, arr in (("base_preds", base), ("comp_preds", comp)):
        if arr.ndim != 2:
            raise ValueError(ERR_POPULATION_CLASSES.format(shape=arr.shape, name=name))
    return y_true, base, comp, n_classes


def _squeeze_group(r: ClassRates) -> ClassRates:
    return ClassRates(tp=r.tp[:, 0], fp=r.fp[:, 0], fn=r.fn[:, 0], tn=r.tn[:, 0],
                      fpr=r.fpr[:, 0], fnr=r.fnr[:, 0], smoothing=r.smoothing)


def population_bias(y_true, base_preds, comp_preds, n_classes, *, smoothing=0.0):
    r"""CEV and SDE of a compressed population against a baseline population.

    Parameters
    ----------
    y_true : array-like of shape (n_examples,)
        True class ids.
    base_preds : array-like of shape (M, n_examples)
        Predictions of the baseline (uncompressed) models.
    comp_preds : array-like of shape (M', n_examples)
        Predictions of the compressed models, on the same examples.
    n_classes : int
        Number of classes.
    smoothing : float, default=0.0
        Additive smoothing of every rate (see :func:`class_rates`). With 0,
        classes whose baseline mean rate is 0 are dropped from CEV/SDE;
        with ``a > 0`` every class is kept.

    Returns
    -------
    result : PopulationBias

    Raises
    ------
    ValueError
        If no class has a defined change for the population means.

    Notes
    -----
    With :math:`\bar X^{base}_c` and :math:`\bar X^{comp}_c` the mean of the
    per-model rates over each population,

    .. math::

        \delta X_c = \frac{\bar X^{comp}_c - \bar X^{base}_c}{\bar X^{base}_c}
                     \times 100, \qquad X \in \{FPR, FNR\}

    and ``cev``/``sde`` are :func:`cev`/:func:`sde` of these changes. The
    per-model variants replace :math:`\bar X^{comp}_c` with one compressed
    model's rate. A class absent from the test set has NaN FNR in every
    model, so it is dropped.

    Examples
    --------
    >>> y = [0, 0, 1, 1, 2, 2]
    >>> base = [[0, 1, 1, 1, 2, 0], [0, 0, 1, 2, 2, 2]]
    >>> comp = [[0, 1, 1, 1, 1, 0], [1, 0, 1, 2, 2, 1]]
    >>> r = population_bias(y, base, comp, 3)
    >>> r.cev.n_used, r.model_cev.shape
    (3, (2,))
    """
    y_true, base, comp, n_classes = validate_populations(y_true, base_preds, comp_preds, n_classes)
    smoothing = v.check_nonnegative(smoothing, "smoothing")
    empty = np.empty(0, np.int64)
    base_rates = _squeeze_group(ovr_rates(y_true, base, empty, False, 1, n_classes, smoothing=smoothing))
    comp_rates = _squeeze_group(ovr_rates(y_true, comp, empty, False, 1, n_classes, smoothing=smoothing))
    with np.errstate(invalid="ignore"):
        bf, bn = base_rates.fpr.mean(axis=0), base_rates.fnr.mean(axis=0)
        cf, cn = comp_rates.fpr.mean(axis=0), comp_rates.fnr.mean(axis=0)
    dfpr, dfnr = normalized_change(cf, bf), normalized_change(cn, bn)
    mdfpr = normalized_change(comp_rates.fpr, bf)
    mdfnr = normalized_change(comp_rates.fnr, bn)
    m_cev, m_sde, m_used = cev_sde_rows(mdfpr, mdfnr)
    return PopulationBias(base_rates=base_rates, comp_rates=comp_rates,
                          delta_fpr=dfpr, delta_fnr=dfnr,
                          cev=cev(dfpr, dfnr), sde=sde(dfpr, dfnr),
                          model_delta_fpr=mdfpr, model_delta_fnr=mdfnr,
                          model_cev=m_cev, model_sde=m_sde, model_n_used=m_used)
