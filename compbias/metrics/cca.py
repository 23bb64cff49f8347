"""Canonical correlations of two layers' activations (Hotelling; google/svcca's algorithm): :func:`cca_correlations`."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from compbias.metrics import _validation as v

__all__ = ["cca_correlations"]

ERR_DATAPOINTS = (
    "acts1 has {n1} datapoints but acts2 has {n2}; both must be activations "
    "on the same inputs (shape (neurons, datapoints))."
)
ERR_TOO_FEW_DATAPOINTS = (
    "{name} has {neurons} neurons but only {points} datapoints; CCA needs "
    "more datapoints than neurons. Pass activations as (neurons, datapoints) "
    "(transpose if needed) or use more inputs."
)
ERR_ALL_CONSTANT = (
    "every neuron of {name} has variance below epsilon={epsilon} (relative "
    "to the largest); no canonical correlation exists."
)
ERR_ACTS_NDIM = (
    "{name} must be (neurons, datapoints) or a conv map (N, C, H, W); got "
    "shape {shape}."
)

# numpy.linalg.pinv's default relative cutoff, which the reference relies on
_PINV_RCOND = 1e-15
# Whiten with a Cholesky factor when the covariance's reciprocal condition
# number is above this: no eigenvalue is then anywhere near the pseudo-inverse
# cutoff, so the result equals the eigen-decomposition path to rounding.
_CHOLESKY_MIN_RCOND = 1e-8
# Covariances come from the uncentred Gram matrix minus N * mean * mean^T
# unless some neuron's squared mean exceeds its variance by this factor (the
# subtraction would then cancel more than 6 of 16 digits); explicit centring
# is used in that case.
_MAX_MEAN_TO_VAR = 1e6


def _as_float_2d(x, name: str) -> np.ndarray:
    """float64 C-contiguous (neurons, datapoints) array; NaN/inf checked by the caller."""
    arr = v.as_array(x, name)
    if arr.dtype.kind not in "biuf":
        raise ValueError(v.ERR_FLOAT_DTYPE.format(name=name, dtype=arr.dtype))
    if arr.ndim != 2:
        raise ValueError(ERR_ACTS_NDIM.format(name=name, shape=arr.shape))
    return np.ascontiguousarray(arr, dtype=np.float64)


def _inv_sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Inverse square root of a symmetric PSD matrix, pseudo-inverse style.

    Eigenvalues at most ``1e-15`` times the largest (in magnitude) are
    treated as 0 - the cutoff ``numpy.linalg.pinv`` applies to the singular
    values, so this equals ``sqrtm(pinv(sigma))``.
    """
    w, vecs = np.linalg.eigh(sigma)
    cutoff = _PINV_RCOND * np.max(np.abs(w)) if w.size else 0.0
    inv = np.zeros_like(w)
    keep = w > cutoff
    inv[keep] = 1.0 / np.sqrt(w[keep])
    return (vecs * inv) @ vecs.T


def _cholesky_or_none(sigma: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of a well-conditioned SPD matrix, else None."""
    factor, info = scipy.linalg.lapack.dpotrf(sigma, lower=1, clean=1)
    if info != 0:
        return None
    rcond, info = scipy.linalg.lapack.dpocon(factor, np.abs(sigma).sum(axis=0).max(), uplo="L")
    if info != 0 or not rcond > _CHOLESKY_MIN_RCOND:
        return None
    return factor


def _covariances(x: np.ndarray, y: np.ndarray, mx: np.ndarray, my: np.ndarray):
    """Sample covariances (ddof=1) Sxx, Syy, Sxy of two (neurons, points) arrays with row means mx, my."""
    n = x.shape[1]
    # X @ X.T runs as a symmetric rank-k update (syrk): half the work of a product
    gxx = x @ x.T
    gyy = y @ y.T
    vx = np.diagonal(gxx) - n * mx * mx
    vy = np.diagonal(gyy) - n * my * my
    if (np.all(mx * mx <= _MAX_MEAN_TO_VAR * np.maximum(vx / n, 0.0))
            and np.all(my * my <= _MAX_MEAN_TO_VAR * np.maximum(vy / n, 0.0))):
        sxx = (gxx - n * np.outer(mx, mx)) / (n - 1)
        syy = (gyy - n * np.outer(my, my)) / (n - 1)
        sxy = (x @ y.T - n * np.outer(mx, my)) / (n - 1)
        return sxx, syy, sxy
    del gxx, gyy
    xc = x - mx[:, None]
    yc = y - my[:, None]
    return (xc @ xc.T) / (n - 1), (yc @ yc.T) / (n - 1), (xc @ yc.T) / (n - 1)


def cca_correlations(acts1, acts2, epsilon=0.0):
    r"""Canonical correlations of two sets of neuron activations.

    Parameters
    ----------
    acts1 : array-like of shape (neurons1, datapoints)
        Activations of the first layer, one row per neuron.
    acts2 : array-like of shape (neurons2, datapoints)
        Activations of the second layer on the same datapoints.
    epsilon : float, default=0.0
        Neurons whose variance, relative to the largest covariance entry
        of their layer, is below ``epsilon`` are removed, and ``epsilon``
        is added to the diagonal of the remaining covariances.

    Returns
    -------
    rho : ndarray of shape (min(kept1, kept2),)
        Canonical correlations in decreasing order.

    Raises
    ------
    ValueError
        On NaN/inf, mismatched datapoints, fewer datapoints than neurons, or
        when every neuron of a layer is removed.

    Notes
    -----
    The steps of google/svcca's ``cca_core.get_cca_similarity``, whose
    ``cca_coef1`` this equals to 1e-6:

    1. Sample covariances (``ddof=1``) :math:`\Sigma_{XX}, \Sigma_{XY},
       \Sigma_{YY}` of the centred activations.
    2. Rescale: :math:`\Sigma_{XX} / x_{max}`, :math:`\Sigma_{YY} / y_{max}`,
       :math:`\Sigma_{XY} / \sqrt{x_{max} y_{max}}` with :math:`x_{max} =
       \max\lvert\Sigma_{XX}\rvert`.
    3. Remove neuron :math:`i` of a layer when :math:`\lvert\Sigma_{ii}
       \rvert < \epsilon` (near-constant neurons), then add
       :math:`\epsilon I` to :math:`\Sigma_{XX}` and :math:`\Sigma_{YY}`.
    4. :math:`\rho = \mathrm{svd}\big(\Sigma_{XX}^{-1/2}\, \Sigma_{XY}\,
       \Sigma_{YY}^{-1/2}\big)`, the inverse square roots taken as
       pseudo-inverses (eigenvalues below ``1e-15`` times the largest count
       as 0).

    .. math::

        \rho_1 \ge \rho_2 \ge \dots = \text{singular values of }
        \Sigma_{XX}^{-1/2}\, \Sigma_{XY}\, \Sigma_{YY}^{-1/2}

    Differences from the reference: it returns a scalar 0 when every neuron
    is removed, here a ``ValueError`` says so; where rounding makes the
    reference's pseudo-inverse slightly indefinite it returns NaN, here the
    negative eigenvalue is treated as 0. Faster, same numbers: the
    covariances come from uncentred products minus :math:`N\mu\mu^T`
    (explicit centring when a neuron's squared mean exceeds its variance
    by more than :math:`10^6`, where that subtraction would lose digits),
    and a well-conditioned covariance (reciprocal condition number above
    :math:`10^{-8}`, so no eigenvalue is near the pseudo-inverse cutoff) is
    whitened with its Cholesky factor instead of an eigen-decomposition.

    References
    ----------
    Raghu, Gilmer, Yosinski, Sohl-Dickstein (2017), "SVCCA: Singular Vector
    Canonical Correlation Analysis for Deep Learning Dynamics and
    Interpretability"; google/svcca ``cca_core.py``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(3, 100))
    >>> np.allclose(cca_correlations(a, 2 * a[::-1] + 1), 1.0)
    True
    """
    x = _as_float_2d(acts1, "acts1")
    y = _as_float_2d(acts2, "acts2")
    epsilon = v.check_nonnegative(epsilon, "epsilon")
    if x.shape[1] != y.shape[1]:
        raise ValueError(ERR_DATAPOINTS.format(n1=x.shape[1], n2=y.shape[1]))
    for name, a in (("acts1", x), ("acts2", y)):
        if a.shape[0] >= a.shape[1]:
            raise ValueError(ERR_TOO_FEW_DATAPOINTS.format(name=name, neurons=a.shape[0], points=a.shape[1]))
    # row sums: the means, and (in the same pass) the NaN/inf check
    sums = []
    for name, a in (("acts1", x), ("acts2", y)):
        row_sums = np.add.reduce(a, axis=1)
        if not np.all(np.isfinite(row_sums)):
            v.check_float(a, name, allow_nan=False)  # raises, naming the first bad entry
        sums.append(row_sums / a.shape[1])
    # step 1: covariances
    sxx, syy, sxy = _covariances(x, y, *sums)
    # step 2: rescale for stability
    xmax = np.max(np.abs(sxx))
    ymax = np.max(np.abs(syy))
    for name, m in (("acts1", xmax), ("acts2", ymax)):
        if not m > 0:
            raise ValueError(ERR_ALL_CONSTANT.format(name=name, epsilon=epsilon))
    sxx /= xmax
    syy /= ymax
    sxy /= np.sqrt(xmax * ymax)
    # step 3: drop near-constant neurons, regularise
    kx = np.abs(np.diagonal(sxx)) >= epsilon
    ky = np.abs(np.diagonal(syy)) >= epsilon
    for name, k in (("acts1", kx), ("acts2", ky)):
        if not k.any():
            raise ValueError(ERR_ALL_CONSTANT.format(name=name, epsilon=epsilon))
    sxx = sxx[np.ix_(kx, kx)] + epsilon * np.eye(int(kx.sum()))
    syy = syy[np.ix_(ky, ky)] + epsilon * np.eye(int(ky.sum()))
    sxy = sxy[np.ix_(kx, ky)]
    # step 4: whiten and take singular values; any whitening W with
    # W S W^T = I gives the same singular values, so a Cholesky factor does
    # when the covariance is well conditioned
    lx, ly = _cholesky_or_none(sxx), _cholesky_or_none(syy)
    if lx is not None and ly is not None:
        arr = scipy.linalg.solve_triangular(lx, sxy, lower=True)
        arr = scipy.linalg.solve_triangular(ly, arr.T, lower=True)
    else:
        arr = _inv_sqrt_psd(sxx) @ sxy @ _inv_sqrt_psd(syy)
    return np.abs(np.linalg.svd(arr, compute_uv=False))
