"""Numba kernels behind :mod:`compbias.metrics.confusion` and :mod:`compbias.metrics.rates`.

The confusion-count kernel (one pass over every label, range checks folded
into the counting, private per-thread tables) and the one-vs-rest kernel
(true positives and predictions per class). Their formulas are those of
:func:`compbias.metrics.confusion_counts` and
:func:`compbias.metrics.population_rates`.
"""

from __future__ import annotations

import numba
import numpy as np

from compbias.metrics._numba import PARALLEL_MIN_LABELS, kernel

# examples per block below which splitting one model's examples over threads
# costs more than it gains
_MIN_CHUNK = 32_768
# upper bound on the private count buffers of a chunked run
_MAX_BUFFER_BYTES = 256 * 2**20
# examples counted into a thread's private uint16 table between two flushes
# to the int64 result: no count can overflow
_SUB_BLOCK = 65_535


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
@kernel()
def _count_block(row, key, flat, n_classes):  # pragma: no cover - numba
    """``flat[key[i] + min(row[i], C)] += 1`` for every ``i``, ``row[i]`` read as unsigned.

    A separate function over views of the block's examples, with unsigned
    indices: LLVM then compiles a plain loop without numba's negative-index
    wraparound on each access (as part of the parallel loop's body, with
    signed offsets, the same loop ran 1.5x slower on one thread).
    """
    cu = np.uint64(n_classes)
    for i in range(row.shape[0]):
        flat[np.uint64(key[i]) + min(np.uint64(row[i]), cu)] += 1


@kernel()
def _flush_block(table, block, n_classes, first):  # pragma: no cover - numba
    """Copy (``first``) or add the ``G * C`` by ``C`` counts of ``table`` to ``block``, and zero ``table``.

    Returns the number of predictions out of range (the last column) of
    examples whose true label and group are valid (the other rows).
    """
    rows = block.shape[0]
    bad = 0
    for r in range(rows):
        bad += table[r, n_classes]
    if first:
        for r in range(rows):
            for p in range(n_classes):
                block[r, p] = table[r, p]
    else:
        for r in range(rows):
            for p in range(n_classes):
                block[r, p] += table[r, p]
    table[:] = 0
    return bad


@kernel()
def _confusion_keys(y_true, groups, has_groups, n_groups, n_classes, key, bad):  # pragma: no cover - numba
    """Fill ``key`` with each example's row offset in the count table; flag bad true labels and groups in ``bad``.

    Branch-free: labels and groups are read as unsigned (negative ones wrap
    to huge values), an example with either out of range gets the offset of
    the table's last row, and the flags are or-ed over the pass (3.4x
    faster than the branching loop: 20 us for 50,000 examples here).
    """
    c1 = np.uint64(n_classes + 1)
    cu = np.uint64(n_classes)
    gu = np.uint64(n_groups)
    dead = gu * cu * c1  # the row of examples with a bad label or group
    bad_t = False
    bad_g = False
    for i in range(y_true.shape[0]):
        t = np.uint64(y_true[i])
        g = np.uint64(groups[i]) if has_groups else np.uint64(0)
        out_t = t >= cu
        out_g = g >= gu
        bad_t |= out_t
        bad_g |= out_g
        key[i] = dead if (out_t or out_g) else (g * cu + t) * c1
    if bad_t:
        bad[0] = 1
    if bad_g:
        bad[2] = 1


def key_dtype(n_groups: int, n_classes: int):
    """The narrowest dtype of :func:`_confusion_keys`'s offsets: uint16 up to 65,535 (8% faster counting), else int32, int64.

    The largest offset is the last row's, ``G * C * (C + 1)``.
    """
    top = n_groups * n_classes * (n_classes + 1)
    return np.uint16 if top <= 65_535 else np.int32 if top < 2**31 else np.int64


@kernel()
def _confusion_thread(y_pred, key, n_groups, n_classes, n_chunks, th, n_threads, out):  # pragma: no cover - numba
    """Count blocks ``th, th + n_threads, ...`` into ``out`` with one private table; the number of bad predictions.

    The table holds uint16 counts (81 KiB at G=4, C=100, half of int32's,
    so more of the core's L2 is left to the offsets and the result's
    writes: 7-8% less CPU time per call here) and is flushed to the int64
    block every :data:`_SUB_BLOCK` examples, so no count overflows.
    """
    n = y_pred.shape[1]
    rows = n_groups * n_classes
    table = np.zeros((rows + 1, n_classes + 1), np.uint16)
    flat = table.reshape(-1)
    chunk = (n + n_chunks - 1) // n_chunks
    bad = 0
    for b in range(th, out.shape[0], n_threads):
        start = (b % n_chunks) * chunk
        stop = min(n, start + chunk)
        for sub in range(start, max(stop, start + 1), _SUB_BLOCK):
            end = min(stop, sub + _SUB_BLOCK)
            _count_block(y_pred[b // n_chunks, sub:end], key[sub:end], flat, n_classes)
            bad += _flush_block(table, out[b], n_classes, sub == start)
    return bad


@kernel()
def confusion_kernel(y_true, y_pred, groups, has_groups, n_groups, n_classes, n_chunks, n_threads, key):  # pragma: no cover - numba
    """Confusion counts per (model, chunk) block, validating every label in the same pass.

    Returns ``(counts, bad)``: ``counts`` of shape ``(n_models * n_chunks,
    G, C, C)``, block ``b`` counting model ``b // n_chunks`` on its
    ``b % n_chunks``-th slice of examples, and ``bad`` (int64, 3) flags of
    a ``y_true``, ``y_pred`` or ``groups`` value outside its range (the
    caller then finds the first one and raises).

    One pass reads each label once. ``key`` (shape (N,), dtype
    :func:`key_dtype`) is filled with each example's row offset
    ``(g * C + t) * (C + 1)`` in a private uint16 table of ``G * C + 1``
    rows of ``C + 1`` columns, shared by all models. A prediction ``p`` is
    counted at ``key + min(p, C)`` with ``p`` read as unsigned, so every id
    outside ``[0, C)`` (negative ids wrap to huge unsigned values) lands in
    the last column, and an example with a bad true label or group in the
    last row: range checks without a branch in the counting loop and no
    write outside the table. Only the ``G * C`` by ``C`` part of the table
    is added to the int64 output, every :data:`_SUB_BLOCK` examples.
    The work of ``n_threads`` threads (blocks ``t, t + n_threads, ...``,
    each with its own table) runs here one after the other:
    :func:`confusion_kernel_parallel` runs it on numba's threads. This
    serial twin serves small inputs, which must not wait for a parallel
    region (on a loaded machine its second thread may not be scheduled for
    milliseconds).
    """
    n_models, n = y_pred.shape
    bad = np.zeros(3, np.int64)
    _confusion_keys(y_true, groups, has_groups, n_groups, n_classes, key, bad)
    out = np.empty((n_models * n_chunks, n_groups * n_classes, n_classes), np.int64)
    for th in range(n_threads):
        if _confusion_thread(y_pred, key, n_groups, n_classes, n_chunks, th, n_threads, out) > 0:
            bad[1] = 1
    return out.reshape(n_models * n_chunks, n_groups, n_classes, n_classes), bad


@kernel(parallel=True)
def confusion_kernel_parallel(y_true, y_pred, groups, has_groups, n_groups, n_classes, n_chunks, n_threads, key):  # pragma: no cover - numba
    """:func:`confusion_kernel` with the threads' work on numba's threads (``prange``)."""
    n_models, n = y_pred.shape
    bad = np.zeros(3, np.int64)
    _confusion_keys(y_true, groups, has_groups, n_groups, n_classes, key, bad)
    out = np.empty((n_models * n_chunks, n_groups * n_classes, n_classes), np.int64)
    bad_pred = np.zeros(n_threads, np.int64)
    for th in numba.prange(n_threads):
        bad_pred[th] = _confusion_thread(y_pred, key, n_groups, n_classes, n_chunks, th, n_threads, out)
    if bad_pred.sum() > 0:
        bad[1] = 1
    return out.reshape(n_models * n_chunks, n_groups, n_classes, n_classes), bad


@kernel(parallel=True)
def ovr_kernel(y_true, y_pred, groups, has_groups, n_groups, n_classes, weights, has_weights):  # pragma: no cover - numba
    """Per (model, group, class): true positives and predicted counts.

    ``weights[i]`` is how often example ``i`` counts (a bootstrap resample);
    models are processed in parallel, each writing its own rows.
    """
    n_models, n = y_pred.shape
    tp = np.zeros((n_models, n_groups, n_classes), np.int64)
    pc = np.zeros((n_models, n_groups, n_classes), np.int64)
    for m in numba.prange(n_models):
        for i in range(n):
            w = weights[i] if has_weights else 1
            if w == 0:
                continue
            g = groups[i] if has_groups else 0
            p = y_pred[m, i]
            pc[m, g, p] += w
            if p == y_true[i]:
                tp[m, g, p] += w
    return tp, pc


def chunk_count(n_models: int, n: int, block_bytes: int, threads: int | None = None) -> int:
    """Slices of examples per model: enough blocks for every thread when models are few."""
    threads = numba.get_num_threads() if threads is None else threads
    if n_models >= threads or n < 2 * _MIN_CHUNK or n_models * n < PARALLEL_MIN_LABELS:
        return 1
    want = -(-threads // n_models)
    by_size = n // _MIN_CHUNK
    by_memory = max(1, _MAX_BUFFER_BYTES // max(1, block_bytes * n_models))
    return int(max(1, min(want, by_size, by_memory)))
