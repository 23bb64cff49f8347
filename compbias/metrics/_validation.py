"""Input validation shared by the public functions of :mod:`compbias.metrics`.

Inputs are checked once, at the public boundary; the numba kernels behind the
public functions then receive typed, C-contiguous arrays and check nothing.
The error messages are module constants (``str.format`` templates) so that
callers and tests can match on them.
"""

from __future__ import annotations

import numbers

import numpy as np

# --- error messages (str.format templates) ---------------------------------
ERR_NOT_ARRAY = "{name} must be array-like, got {kind}."
ERR_NDIM = "{name} must have {expected}, got shape {shape}."
ERR_LENGTH = (
    "{name} has {got} examples but y_true has {expected}; every array must "
    "describe the same test examples in the same order."
)
ERR_LABEL_DTYPE = (
    "{name} must hold integer ids, got dtype {dtype}. Encode labels as "
    "integers 0..n-1 first (e.g. pandas.factorize)."
)
ERR_NAN = "{name} contains NaN at index {index}; drop or impute missing values first."
ERR_NOT_INTEGRAL = (
    "{name} holds the non-integer value {value} at index {index}; ids must be "
    "whole numbers."
)
ERR_LABEL_RANGE = (
    "{name} holds {value} at index {index}, outside [0, {n}); {n_name} is {n}. "
    "Pass the total number of classes (groups) including ones absent here."
)
ERR_N_CLASSES = "{name} must be a positive integer, got {value!r}."
ERR_GROUPS_NEED_N = (
    "n_groups was given but groups is None; pass integer group codes of "
    "shape (n_examples,) as groups."
)
ERR_FLOAT_DTYPE = "{name} must hold real numbers, got dtype {dtype}."
ERR_NONFINITE = "{name} contains {what} at index {index}; {advice}"
ERR_SHAPE_MISMATCH = "{name1} has shape {shape1} but {name2} has shape {shape2}; they must match."
ERR_FRACTION = "{name} must be in {interval}, got {value!r}."
ERR_NEGATIVE = "{name} must be >= 0, got {value!r}."


def _first_index(mask: np.ndarray) -> tuple[int, ...] | int:
    idx = np.argwhere(mask)[0]
    return int(idx[0]) if idx.size == 1 else tuple(int(i) for i in idx)


def as_array(x: object, name: str) -> np.ndarray:
    """Convert array-likes (lists, pandas objects) to a numpy array."""
    if isinstance(x, (str, bytes, dict)) or x is None:
        raise TypeError(ERR_NOT_ARRAY.format(name=name, kind=type(x).__name__))
    return np.asarray(x)


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as int if it is a positive integer, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(ERR_N_CLASSES.format(name=name, value=value))
    return int(value)


def check_int_ids(x: object, name: str, *, ndims: tuple[int, ...] = (1,)) -> np.ndarray:
    """Return ``x`` as a C-contiguous int64 array of ids, checking dtype and NaN.

    Integer arrays are used as they are (int64) or converted; float arrays are
    accepted when every value is a whole number (NaN raises); booleans count
    as 0/1.
    """
    arr = as_array(x, name)
    if arr.ndim not in ndims:
        expected = " or ".join(f"{d} dimension{'s' if d != 1 else ''}" for d in ndims)
        raise ValueError(ERR_NDIM.format(name=name, expected=expected, shape=arr.shape))
    kind = arr.dtype.kind
    if kind in "iu":
        return np.ascontiguousarray(arr, dtype=np.int64)
    if kind == "b":
        return np.ascontiguousarray(arr, dtype=np.int64)
    if kind == "f":
        nan = np.isnan(arr)
        if nan.any():
            raise ValueError(ERR_NAN.format(name=name, index=_first_index(nan)))
        frac = arr != np.floor(arr)
        if frac.any():
            i = _first_index(frac)
            raise ValueError(ERR_NOT_INTEGRAL.format(name=name, value=arr[i], index=i))
        return np.ascontiguousarray(arr, dtype=np.int64)
    raise ValueError(ERR_LABEL_DTYPE.format(name=name, dtype=arr.dtype))


def check_range(arr: np.ndarray, n: int, name: str, n_name: str) -> None:
    """Raise if any id in ``arr`` lies outside ``[0, n)``."""
    if arr.size == 0:
        return
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= n:
        bad = (arr < 0) | (arr >= n)
        i = _first_index(bad)
        raise ValueError(
            ERR_LABEL_RANGE.format(name=name, value=int(arr[i]), index=i, n=n, n_name=n_name)
        )


def check_same_length(arr: np.ndarray, n: int, name: str) -> None:
    """Raise if the last axis of ``arr`` does not have ``n`` examples."""
    if arr.shape[-1] != n:
        raise ValueError(ERR_LENGTH.format(name=name, got=arr.shape[-1], expected=n))


def check_float(x: object, name: str, *, allow_nan: bool, ndims: tuple[int, ...] | None = None,
                advice: str = "remove or impute these values first.") -> np.ndarray:
    """Return ``x`` as a C-contiguous float64 array; reject inf (and NaN unless allowed)."""
    arr = as_array(x, name)
    if arr.dtype.kind not in "biuf":
        raise ValueError(ERR_FLOAT_DTYPE.format(name=name, dtype=arr.dtype))
    if ndims is not None and arr.ndim not in ndims:
        expected = " or ".join(f"{d} dimension{'s' if d != 1 else ''}" for d in ndims)
        raise ValueError(ERR_NDIM.format(name=name, expected=expected, shape=arr.shape))
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if np.isfinite(np.add.reduce(arr, axis=None)):  # one pass, no temporary: no NaN, no inf
        return arr
    inf = np.isinf(arr)
    if inf.any():
        raise ValueError(ERR_NONFINITE.format(name=name, what="inf", index=_first_index(inf), advice=advice))
    if not allow_nan:
        nan = np.isnan(arr)
        if nan.any():
            raise ValueError(ERR_NAN.format(name=name, index=_first_index(nan)))
    return arr


def check_fraction(value: object, name: str, *, low_open: bool = True, high_open: bool = False) -> float:
    """Return ``value`` as float if it lies in the given interval of [0, 1]."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(ERR_FRACTION.format(name=name, interval=interval, value=value)) from None
    ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not ok or np.isnan(v):
        raise ValueError(ERR_FRACTION.format(name=name, interval=interval, value=value))
    return v


def check_nonnegative(value: object, name: str) -> float:
    """Return ``value`` as float if it is a finite number >= 0."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(ERR_NEGATIVE.format(name=name, value=value)) from None
    if not np.isfinite(v) or v < 0:
        raise ValueError(ERR_NEGATIVE.format(name=name, value=value))
    return v
