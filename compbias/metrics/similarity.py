"""Representation similarity: CCA, SVCCA (Raghu et al.) and linear CKA (Kornblith et al.)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compbias.metrics import _validation as v
from compbias.metrics.cca import (  # noqa: F401  (re-exported: compbias.metrics.similarity keeps its names)
    ERR_ACTS_NDIM,
    ERR_ALL_CONSTANT,
    ERR_DATAPOINTS,
    ERR_TOO_FEW_DATAPOINTS,
    cca_correlations,
)

__all__ = ["SVCCAResult", "cca_correlations", "linear_cka", "svcca"]

ERR_POOL = "pool must be a positive integer or None, got {value!r}."
ERR_KEEP = "give keep_variance or keep_dims, not both (keep_dims={keep_dims!r})."
ERR_KEEP_DIMS = "keep_dims must be a positive integer, got {value!r}."
ERR_CKA_SAMPLES = "x has {n1} datapoints (rows) but y has {n2}; rows must be the same inputs."
ERR_CKA_CONSTANT = "{name} is constant over the datapoints (zero after centring); CKA is undefined."


def _check_acts(x, name: str, ndims=(2,)) -> np.ndarray:
    arr = v.check_float(x, name, allow_nan=False)
    if arr.ndim not in ndims:
        raise ValueError(ERR_ACTS_NDIM.format(name=name, shape=arr.shape))
    return arr


@dataclass(frozen=True)
class SVCCAResult:
    """SVCCA similarity of two layers.

    Attributes
    ----------
    similarity : float
        Mean canonical correlation of the SVD-reduced activations.
    distance : float
        ``1 - similarity``.
    correlations : ndarray
        The canonical correlations, decreasing.
    dims : tuple of int
        Singular directions kept for each layer.
    """

    similarity: float
    distance: float
    correlations: np.ndarray
    dims: tuple[int, int]


def _as_neurons_by_points(a: np.ndarray, pool: int | None) -> np.ndarray:
    if a.ndim == 2:
        return a
    n, c, h, w = a.shape
    if pool is not None and pool > 1:
        h2, w2 = h // pool, w // pool
        a = a[:, :, : h2 * pool, : w2 * pool].reshape(n, c, h2, pool, w2, pool).mean(axis=(3, 5))
    return np.ascontiguousarray(np.moveaxis(a, 1, 0).reshape(c, -1))


def _svd_reduce(a: np.ndarray, keep_variance: float | None, keep_dims: int | None) -> np.ndarray:
    ac = a - a.mean(axis=1, keepdims=True)
    lam, u = np.linalg.eigh(ac @ ac.T)  # squared singular values, ascending
    lam, u = np.clip(lam[::-1], 0.0, None), u[:, ::-1]
    if keep_dims is not None:
        k = min(keep_dims, a.shape[0])
    else:
        total = lam.sum()
        ratio = np.cumsum(lam) / total if total > 0 else np.ones_like(lam)
        k = min(int(np.searchsorted(ratio, keep_variance, side="left")) + 1, a.shape[0])
    return u[:, :k].T @ ac


def svcca(acts1, acts2, *, keep_variance=0.99, keep_dims=None, pool=None, epsilon=0.0):
    r"""SVCCA similarity of two layers' activations.

    Parameters
    ----------
    acts1, acts2 : array-like
        Activations as (neurons, datapoints), or convolutional maps
        (N, C, H, W), which become (C, N*H*W) - each channel a neuron, each
        position of each input a datapoint. Both must end up with the same
        number of datapoints.
    keep_variance : float, default=0.99
        Keep the fewest top singular directions of each centred activation
        matrix whose squared singular values reach this fraction of the
        total. Ignored when ``keep_dims`` is given.
    keep_dims : int, default=None
        Keep exactly this many top singular directions instead.
    pool : int, default=None
        For conv maps: average-pool H and W over non-overlapping
        ``pool x pool`` windows first (trailing rows/columns that do not fill
        a window are dropped), e.g. to compare layers of different
        resolution or to save memory.
    epsilon : float, default=0.0
        Passed to :func:`cca_correlations`.

    Returns
    -------
    result : SVCCAResult
        ``.similarity`` (mean canonical correlation), ``.distance``,
        ``.correlations``, ``.dims``.

    Notes
    -----
    With :math:`X = U S V^T` the SVD of the centred activations, SVCCA keeps
    :math:`X' = U_k^T X = S_k V_k^T` for the smallest :math:`k` with
    :math:`\sum_{i\le k} s_i^2 \ge \tau \sum_i s_i^2`, does the same for
    :math:`Y`, and returns

    .. math::

        \bar\rho = \frac{1}{\min(k_X, k_Y)} \sum_i \rho_i(X', Y'),
        \qquad d = 1 - \bar\rho

    The top directions are taken from the eigen-decomposition of the
    (neurons x neurons) Gram matrix :math:`X X^T = U S^2 U^T`, which gives
    the same subspace as the SVD at a fraction of the cost for many
    datapoints. The CCA step is invariant to invertible linear maps of the
    kept directions; the SVD step is only invariant to orthogonal maps and
    scaling, so SVCCA as a whole is invariant to invertible maps only when
    every direction is kept (``keep_variance=1.0``).

    References
    ----------
    Raghu et al. (2017), "SVCCA"; Blakeney et al., "Simon Says", section 4
    (SVCCA distance between pruned and original layers).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(8, 500))
    >>> round(svcca(a, a).similarity, 6)
    1.0
    """
    x = _check_acts(acts1, "acts1", ndims=(2, 4))
    y = _check_acts(acts2, "acts2", ndims=(2, 4))
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1):
        raise ValueError(ERR_POOL.format(value=pool))
    if keep_dims is not None:
        if isinstance(keep_dims, bool) or not isinstance(keep_dims, (int, np.integer)) or keep_dims < 1:
            raise ValueError(ERR_KEEP_DIMS.format(value=keep_dims))
        keep_variance = None
    else:
        keep_variance = v.check_fraction(keep_variance, "keep_variance")
    x = _as_neurons_by_points(x, pool)
    y = _as_neurons_by_points(y, pool)
    if x.shape[1] != y.shape[1]:
        raise ValueError(ERR_DATAPOINTS.format(n1=x.shape[1], n2=y.shape[1]))
    rx = _svd_reduce(x, keep_variance, keep_dims)
    ry = _svd_reduce(y, keep_variance, keep_dims)
    rho = cca_correlations(rx, ry, epsilon=epsilon)
    sim = float(np.mean(rho))
    return SVCCAResult(similarity=sim, distance=1.0 - sim, correlations=rho,
                       dims=(int(rx.shape[0]), int(ry.shape[0])))


def linear_cka(x, y):
    r"""Linear centred kernel alignment of two representations.

    Parameters
    ----------
    x : array-like of shape (datapoints, features1)
    y : array-like of shape (datapoints, features2)

    Returns
    -------
    cka : float
        In ``[0, 1]``; 1 for representations equal up to an orthogonal map
        and isotropic scaling.

    Notes
    -----
    With :math:`X, Y` centred over the datapoints (columns have zero mean),

    .. math::

        \mathrm{CKA}(X, Y) = \frac{\lVert Y^T X \rVert_F^2}
            {\lVert X^T X \rVert_F \, \lVert Y^T Y \rVert_F}

    computed in feature space, or through the equal Gram-matrix form
    :math:`\langle XX^T, YY^T\rangle_F / (\lVert XX^T\rVert_F
    \lVert YY^T\rVert_F)` when there are more features than datapoints.

    Raises
    ------
    ValueError
        If either representation is constant over the datapoints.

    References
    ----------
    Kornblith, Norouzi, Lee, Hinton (2019), "Similarity of Neural Network
    Representations Revisited", eq. (5).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(100, 5))
    >>> round(linear_cka(a, 3 * a), 6)
    1.0
    """
    a = _check_acts(x, "x")
    b = _check_acts(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(ERR_CKA_SAMPLES.format(n1=a.shape[0], n2=b.shape[0]))
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    if a.shape[1] + b.shape[1] <= 2 * a.shape[0]:
        num = np.sum((b.T @ a) ** 2)
        nx = np.linalg.norm(a.T @ a)
        ny = np.linalg.norm(b.T @ b)
    else:
        ka, kb = a @ a.T, b @ b.T
        num = np.sum(ka * kb)
        nx, ny = np.linalg.norm(ka), np.linalg.norm(kb)
    for name, nrm in (("x", nx), ("y", ny)):
        if not nrm > 0:
            raise ValueError(ERR_CKA_CONSTANT.format(name=name))
    return float(num / (nx * ny))
