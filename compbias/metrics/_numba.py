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

from typing import Any, Callable

import numba

__all__ = ["kernel"]


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
