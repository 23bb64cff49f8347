"""Numba compilation helpers shared by the metrics kernels.

Every kernel is compiled with ``cache=True`` so that the second process to use
it loads machine code from disk instead of compiling again. Numba looks for a
writable cache location in this order: ``NUMBA_CACHE_DIR`` (when set), the
package's own ``__pycache__`` directory, the user-wide cache directory. In a
read-only install with no writable location at all, ``numba.njit(cache=True)``
raises ``RuntimeError`` when the function is decorated; :func:`kernel` then
falls back to an uncached kernel, so the metrics still run (they only compile
again in every process).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numba

__all__ = ["PARALLEL_MIN_LABELS", "PARALLEL_MIN_WORK", "kernel", "threads_for", "threads_for_labels"]


def kernel(*, parallel: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """Return a decorator compiling a function with numba in nopython mode.

    Parameters
    ----------
    parallel : bool, default=False
        Compile with ``parallel=True`` so that ``numba.prange`` loops run on
        numba's thread pool.

    Returns
    -------
    decorator : callable
        Applies ``numba.njit(cache=True, nogil=True, parallel=parallel)``, or
        the same without ``cache`` when no writable cache location exists.
    """

    def decorate(func: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, parallel=parallel)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, nogil=True, parallel=parallel)(func)

    return decorate


# Below this many element updates a kernel runs on one thread: starting and
# joining a parallel region costs more than it saves, and on a loaded machine
# a parallel region waits for its slowest (descheduled) thread.
PARALLEL_MIN_WORK = 4_000_000


@contextmanager
def threads_for(work: int) -> Iterator[None]:
    """Run the enclosed numba kernels on one thread when ``work`` is small.

    Parameters
    ----------
    work : int
        Number of element updates the kernel will do (e.g. models x examples).
    """
    if work >= PARALLEL_MIN_WORK:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


# Below this many label reads the single-pass counting kernels (confusion
# counts, modal labels, CIE scores) run on one thread. They read every label
# once at about 1 ns per label on one core, so 250,000 labels are about
# 0.25 ms of work per thread on two threads: more than a parallel region
# costs to start on a quiet machine.
PARALLEL_MIN_LABELS = 250_000


def threads_for_labels(n_labels: int) -> int:
    """Threads for a counting kernel reading ``n_labels`` labels: numba's setting, or 1 below :data:`PARALLEL_MIN_LABELS`.

    The counting kernels split their work statically over the number of
    threads they are given; with one thread the caller runs the kernel's
    serial twin (no parallel region, and numba's thread count is not
    changed, which costs about 20 us per change).
    """
    return numba.get_num_threads() if n_labels >= PARALLEL_MIN_LABELS else 1
