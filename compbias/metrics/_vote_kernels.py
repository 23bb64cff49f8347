"""Numba kernels behind :mod:`compbias.metrics.exemplars`: the votes of a population, per example.

Modal labels (:func:`compbias.metrics.modal_labels`) and the integer
numerators of the CIE scores (:func:`compbias.metrics.cie_scores`) both
count, block by block of examples, how many models of a population voted
for each class; the formulas and references are in those functions'
docstrings.
"""

from __future__ import annotations

import numba
import numpy as np

from compbias.metrics._numba import kernel

# Examples per block of the vote-counting kernels: the block's vote table
# (block x (C + 1) int32 counts) stays within about 32 KiB, an L1 data cache.
_TABLE_BYTES = 32 * 1024


@kernel()
def _block_size(n_classes):  # pragma: no cover - numba
    return max(8, min(256, _TABLE_BYTES // (4 * (n_classes + 1))))


@kernel()
def _count_votes(preds, start, stop, n_classes, counts):  # pragma: no cover - numba
    """Add the votes of examples ``start .. stop - 1`` to ``counts``; True if a label was out of range.

    ``counts`` is a (block, C + 1) table, row by example of the block. Each
    model's labels of the block are read as one contiguous run; a label is
    read as unsigned and clamped to ``C``, so the last column catches every
    id outside ``[0, C)`` (negative ones included): the range check costs no
    branch and nothing is written outside the table.
    """
    c1 = np.uint64(n_classes + 1)
    cu = np.uint64(n_classes)
    bad = False
    for m in range(preds.shape[0]):
        row = preds[m, start:stop]
        for j in range(stop - start):
            p = min(np.uint64(row[j]), cu)
            bad |= p == cu
            counts[np.uint64(j) * c1 + p] += 1
    return bad


@kernel()
def _zero_votes(preds, start, stop, n_classes, counts):  # pragma: no cover - numba
    """Zero the cells of ``counts`` that :func:`_count_votes` incremented for these labels (replayed from cache)."""
    c1 = np.uint64(n_classes + 1)
    cu = np.uint64(n_classes)
    for m in range(preds.shape[0]):
        row = preds[m, start:stop]
        for j in range(stop - start):
            counts[np.uint64(j) * c1 + min(np.uint64(row[j]), cu)] = 0


@kernel()
def _modal_block(preds, start, stop, n_classes, counts, best, out):  # pragma: no cover - numba
    """Modal labels of examples ``start .. stop - 1`` into ``out``; True if a label was out of range.

    Counts the block's votes in ``counts`` (:func:`_count_votes`, a zeroed
    (block, C + 1) table). The mode of an example is the maximum of ``count
    * (C + 1) + class``: the largest count wins, ties go to the largest
    class id. It is found either

    - by scanning the example's row of the table (a loop the compiler
      vectorises), then zeroing the rows used, when ``C + 1 <= 8 M``; or
    - by replaying the same (cached) labels, taking the maximum and zeroing
      the count each one reads (a class seen again after its count was
      zeroed scores below every counted class), for many classes.

    ``best``: int64 scratch of the block's length. At 20 models and 100
    classes the scan took 1.55 ms where the replay took 1.9 ms (50,000
    examples, one thread).
    """
    n_models = preds.shape[0]
    nb = stop - start
    bad = _count_votes(preds, start, stop, n_classes, counts)
    w = n_classes + 1
    if w <= 8 * n_models:
        for j in range(nb):
            counts_j = counts[j * w:(j + 1) * w]
            top = np.int64(0)
            for q in range(w):
                top = max(top, np.int64(counts_j[q]) * w + q)
            out[start + j] = top % w
        counts[:nb * w] = 0
        return bad
    c1 = np.uint64(w)
    cu = np.uint64(n_classes)
    for j in range(nb):
        best[j] = 0
    for m in range(n_models):
        row = preds[m, start:stop]
        for j in range(nb):
            p = min(np.uint64(row[j]), cu)
            idx = np.uint64(j) * c1 + p
            best[j] = max(best[j], np.int64(np.uint64(counts[idx]) * c1 + p))
            counts[idx] = 0
    for j in range(nb):
        out[start + j] = best[j] % w
    return bad


@kernel()
def _cie_block(base, comp, start, stop, n_classes, cb, cc, acc, num):  # pragma: no cover - numba
    """Integer CIE numerators of examples ``start .. stop - 1`` into ``num``; True if a label was out of range.

    ``cb``/``cc``: zeroed (block, C + 1) vote tables of the two populations
    (:func:`_count_votes`); ``acc``: int64 scratch of the block's length.
    Two ways to the numerator ``sum_c |n_c M' - n'_c M|``, chosen by which
    reads fewer entries:

    - few classes (``C + 1 <= 4 (M + M')``): count both populations' votes,
      then sum over each example's row of the two tables (a loop the
      compiler vectorises), then zero the rows used;
    - many classes: after the ``M`` baseline votes, with no compressed vote
      yet, the numerator is ``M M'``; each compressed vote for class ``c``
      then changes it by ``|n_c M' - (n'_c + 1) M| - |n_c M' - n'_c M|``,
      so no class is ever scanned, and the tables are zeroed by replaying
      the labels (in cache).

    At 2 x 20 models and 100 classes the first way took 2.7 ms where the
    second took 4.5 ms (50,000 examples, one thread).
    """
    m1 = base.shape[0]
    m2 = comp.shape[0]
    nb = stop - start
    bad = _count_votes(base, start, stop, n_classes, cb)
    w = n_classes + 1
    if w <= 4 * (m1 + m2):
        bad |= _count_votes(comp, start, stop, n_classes, cc)
        for j in range(nb):
            rb = cb[j * w:(j + 1) * w]
            rc = cc[j * w:(j + 1) * w]
            total = 0
            for q in range(w):
                total += abs(np.int64(rb[q]) * m2 - np.int64(rc[q]) * m1)
            num[start + j] = total
        cb[:nb * w] = 0
        cc[:nb * w] = 0
        return bad
    c1 = np.uint64(w)
    cu = np.uint64(n_classes)
    for j in range(nb):
        acc[j] = m1 * m2
    for m in range(m2):
        row = comp[m, start:stop]
        for j in range(nb):
            p = min(np.uint64(row[j]), cu)
            bad |= p == cu
            idx = np.uint64(j) * c1 + p
            bv = np.int64(cb[idx]) * m2
            cv = np.int64(cc[idx]) * m1
            cc[idx] += 1
            acc[j] += abs(bv - cv - m1) - abs(bv - cv)
    _zero_votes(base, start, stop, n_classes, cb)
    _zero_votes(comp, start, stop, n_classes, cc)
    for j in range(nb):
        num[start + j] = acc[j]
    return bad


@kernel()
def _votes_thread(base, comp, n_classes, cie, th, n_threads, out):  # pragma: no cover - numba
    """Thread ``th``'s contiguous share of the examples, block by block; True if a label was out of range.

    ``cie``: CIE numerators of ``base`` against ``comp``
    (:func:`_cie_block`), else the modal labels of ``base``
    (:func:`_modal_block`; ``comp`` is not read).
    """
    n = base.shape[1]
    block = _block_size(n_classes)
    share = (n + n_threads - 1) // n_threads
    cb = np.zeros(block * (n_classes + 1), np.int32)
    cc = np.zeros(block * (n_classes + 1) if cie else 0, np.int32)
    scratch = np.zeros(block, np.int64)
    bad = False
    for start in range(th * share, min(n, (th + 1) * share), block):
        stop = min(n, start + block, (th + 1) * share)
        if cie:
            bad |= _cie_block(base, comp, start, stop, n_classes, cb, cc, scratch, out)
        else:
            bad |= _modal_block(base, start, stop, n_classes, cb, scratch, out)
    return bad


@kernel()
def votes_kernel(base, comp, n_classes, cie, n_threads):  # pragma: no cover - numba
    """Modal labels of ``base`` (``cie`` False) or integer CIE numerators ``sum_c |n_c M' - n'_c M|`` (``cie`` True).

    Returns ``(out, bad)``: int64 per example, and True if a label was out
    of range. Thread ``t`` of ``n_threads`` takes the ``t``-th contiguous
    share of the examples, in blocks of :func:`_block_size` examples, with
    its own tables; here the shares run one after the other (the serial
    twin, for small inputs, which must not wait for a parallel region),
    in :func:`votes_kernel_parallel` on numba's threads.
    """
    out = np.empty(base.shape[1], np.int64)
    bad = False
    for th in range(n_threads):
        bad |= _votes_thread(base, comp, n_classes, cie, th, n_threads, out)
    return out, bad


@kernel(parallel=True)
def votes_kernel_parallel(base, comp, n_classes, cie, n_threads):  # pragma: no cover - numba
    """:func:`votes_kernel` with the shares on numba's threads (``prange``)."""
    out = np.empty(base.shape[1], np.int64)
    bad = np.zeros(n_threads, np.bool_)
    for th in numba.prange(n_threads):
        bad[th] = _votes_thread(base, comp, n_classes, cie, th, n_threads, out)
    return out, bad.any()
