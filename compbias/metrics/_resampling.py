"""Numba kernels behind :func:`compbias.metrics.bootstrap_ci`: counter-based resamples and their recounts.

Resample ``b`` of seed ``s`` is drawn from a splitmix64 stream keyed by
``(s, b)``, so it is the same on every machine and for any thread count
(:func:`compbias.metrics.bootstrap_indices` documents the draw); each
resample is compacted to (distinct example, multiplicity) pairs and only
what CEV/SDE or the one-vs-rest rates need is recounted per model.
"""

from __future__ import annotations

import numba
import numpy as np

from compbias.metrics._numba import kernel
from compbias.metrics.bias import cev_sde_rows

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------
# counter-based random numbers: resample b of seed s is the same on every
# machine and thread count
# --------------------------------------------------------------------------
@kernel()
def _mix64(z):  # pragma: no cover - numba
    """splitmix64 finaliser (Steele, Lea, Flood 2014)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@kernel()
def _draw_indices(seed, b, n, out):  # pragma: no cover - numba
    """Fill ``out`` with uniform indices in [0, n) for resample ``b``.

    splitmix64 stream, unbiased bounded integers by Lemire's
    multiply-and-reject method on the top 32 bits (n < 2**32).
    """
    state = _mix64(_mix64(np.uint64(seed) + _GOLDEN) + np.uint64(b) * _GOLDEN)
    nn = np.uint64(n)
    mask32 = np.uint64(0xFFFFFFFF)
    threshold = (np.uint64(1 << 32) - nn) % nn
    for j in range(out.shape[0]):
        while True:
            state += _GOLDEN
            x = _mix64(state) >> np.uint64(32)
            m = x * nn
            if (m & mask32) >= threshold:
                out[j] = np.int64(m >> np.uint64(32))
                break


@kernel()
def _resample_weights(seed, b, n):  # pragma: no cover - numba
    idx = np.empty(n, np.int64)
    _draw_indices(seed, b, n, idx)
    w = np.zeros(n, np.int64)
    for j in range(n):
        w[idx[j]] += 1
    return w


@kernel(parallel=True)
def indices_kernel(seed, n_resamples, n):  # pragma: no cover - numba
    out = np.empty((n_resamples, n), np.int64)
    for b in numba.prange(n_resamples):
        _draw_indices(seed, b, n, out[b])
    return out


@kernel()
def _resample_compact(seed, b, y_true):  # pragma: no cover - numba
    """Resample ``b`` as (distinct example, multiplicity, true label) triples."""
    n = y_true.shape[0]
    w = _resample_weights(seed, b, n)
    k = 0
    for i in range(n):
        if w[i] > 0:
            k += 1
    idx = np.empty(k, np.int64)
    wts = np.empty(k, np.int64)
    ys = np.empty(k, np.int64)
    k = 0
    for i in range(n):
        if w[i] > 0:
            idx[k] = i
            wts[k] = w[i]
            ys[k] = y_true[i]
            k += 1
    return idx, wts, ys


@kernel()
def _recount(row, idx, wts, off, ys, n_cells, table):  # pragma: no cover - numba
    """One model's weighted counts on a resample, one increment per resampled example.

    ``table`` (2 * n_cells, zeroed) gets, for every distinct resampled
    example ``k`` with prediction ``p = row[idx[k]]``, ``wts[k]`` added at
    ``off[k] + p`` when ``p`` is wrong and at ``n_cells + off[k] + p`` when
    it is right (``p == ys[k]``): predictions per cell are the sum of the
    two halves, true positives the second half. ``off[k]``: the example's
    group offset ``g * C`` (or 0). One read-modify-write per example where
    separate predicted and true-positive arrays took two (1.3x faster here;
    unsigned indices, which speed up the confusion kernel, made this
    gather 2x slower).
    """
    for k in range(idx.shape[0]):
        p = np.int64(row[idx[k]])
        table[(p == ys[k]) * n_cells + off[k] + p] += wts[k]


@kernel()
def _mean_rates(preds, idx, wts, ys, n_classes, tc, n_total, smoothing):  # pragma: no cover - numba
    """Mean over models of per-class FPR and FNR (NaN where undefined).

    ``idx``/``wts``/``ys``: the distinct resampled examples, how often each
    was drawn, and their true labels; ``tc``: weighted true-class counts.
    Each model's counts come from :func:`_recount` (one increment per
    resampled example).
    """
    n_models = preds.shape[0]
    table = np.zeros(2 * n_classes, np.int64)
    off = np.zeros(idx.shape[0], np.int64)
    sum_fpr = np.zeros(n_classes)
    sum_fnr = np.zeros(n_classes)
    for m in range(n_models):
        table[:] = 0
        _recount(preds[m], idx, wts, off, ys, n_classes, table)
        for c in range(n_classes):
            tp = table[n_classes + c]
            fp = table[c]
            fn = tc[c] - tp
            tn = n_total - tp - fp - fn
            d1 = fp + tn + 2.0 * smoothing
            d2 = fn + tp + 2.0 * smoothing
            sum_fpr[c] += (fp + smoothing) / d1 if d1 > 0 else np.nan
            sum_fnr[c] += (fn + smoothing) / d2 if d2 > 0 else np.nan
    return sum_fpr / n_models, sum_fnr / n_models


@kernel()
def bias_stat(base, comp, idx, wts, ys, n_classes, smoothing, which):  # pragma: no cover - numba
    tc = np.zeros(n_classes, np.int64)
    n_total = 0
    for k in range(idx.shape[0]):
        tc[ys[k]] += wts[k]
        n_total += wts[k]
    bf, bn = _mean_rates(base, idx, wts, ys, n_classes, tc, n_total, smoothing)
    cf, cn = _mean_rates(comp, idx, wts, ys, n_classes, tc, n_total, smoothing)
    dfpr = np.empty((1, n_classes))
    dfnr = np.empty((1, n_classes))
    for c in range(n_classes):
        dfpr[0, c] = (cf[c] - bf[c]) * 100.0 / bf[c] if bf[c] != 0 else np.nan
        dfnr[0, c] = (cn[c] - bn[c]) * 100.0 / bn[c] if bn[c] != 0 else np.nan
    cev, sde, _ = cev_sde_rows(dfpr, dfnr)
    return cev[0] if which == 0 else sde[0]


@kernel(parallel=True)
def bootstrap_bias_kernel(y_true, base, comp, n_classes, n_resamples, seed, smoothing, which):  # pragma: no cover - numba
    out = np.empty(n_resamples)
    for b in numba.prange(n_resamples):
        idx, wts, ys = _resample_compact(seed, b, y_true)
        out[b] = bias_stat(base, comp, idx, wts, ys, n_classes, smoothing, which)
    return out


@kernel(parallel=True)
def ovr_resampled_kernel(y_true, preds, groups, has_groups, n_groups, n_classes, seed, first, count):  # pragma: no cover - numba
    """One-vs-rest counts of every model on resamples ``first .. first+count-1``.

    Returns true positives and predicted counts (count, M, G, C) and the
    true-class counts (count, G, C); resamples run in parallel.
    """
    n_models = preds.shape[0]
    tp = np.zeros((count, n_models, n_groups, n_classes), np.int64)
    pc = np.zeros((count, n_models, n_groups, n_classes), np.int64)
    tc = np.zeros((count, n_groups, n_classes), np.int64)
    for j in numba.prange(count):
        idx, wts, ys = _resample_compact(seed, first + j, y_true)
        # offset of each resampled example's group in a (G * C) block
        off = np.zeros(idx.shape[0], np.int64)
        if has_groups:
            for k in range(idx.shape[0]):
                off[k] = groups[idx[k]] * n_classes
        tcj = tc[j].reshape(-1)
        for k in range(idx.shape[0]):
            tcj[off[k] + ys[k]] += wts[k]
        cells = n_groups * n_classes
        table = np.zeros(2 * cells, np.int64)
        for m in range(n_models):
            table[:] = 0
            _recount(preds[m], idx, wts, off, ys, cells, table)
            pcm = pc[j, m].reshape(-1)
            tpm = tp[j, m].reshape(-1)
            for q in range(cells):
                tpm[q] = table[cells + q]
                pcm[q] = table[q] + table[cells + q]
    return tp, pc, tc
