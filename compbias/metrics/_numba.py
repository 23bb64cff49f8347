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

__all__ = ["PARALLEL_MIN_WORK", "kernel", "threads_for"]


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
