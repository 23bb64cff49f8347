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


def _with_ndim(x: object, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    """``x`` as an array with one of the dimensions ``ndims`` (ValueError otherwise)."""
    arr = as_array(x, name)
    if arr.ndim not in ndims:
        expected = " or ".join(f"{d} dimension{'s' if d != 1 else ''}" for d in ndims)
        raise ValueError(ERR_NDIM.format(name=name, expected=expected, shape=arr.shape))
    return arr


def check_int_ids(x: object, name: str, *, ndims: tuple[int, ...] = (1,)) -> np.ndarray:
    """Return ``x`` as a C-contiguous int64 array of ids, checking dtype and NaN.

    Integer arrays are used as they are (int64) or converted; float arrays are
    accepted when every value is a whole number (NaN raises); booleans count
    as 0/1.
    """
    arr = _with_ndim(x, name, ndims)
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


# --------------------------------------------------------------------------
# validation shared by the functions taking labels
# --------------------------------------------------------------------------
_range_check = check_range  # validate_groups's keyword ``check_range`` hides the function


def validate_labels(y_true, y_pred, n_classes, *, pred_name="y_pred"):
    """Validate labels and (M, N) predictions as class ids below ``n_classes``: ``(y_true, preds, n_classes)``.

    Shared by the metrics modules; raises ValueError naming ``pred_name`` on bad input.
    """
    n_classes = check_positive_int(n_classes, "n_classes")
    y_true = check_int_ids(y_true, "y_true", ndims=(1,))
    y_pred = check_int_ids(y_pred, pred_name, ndims=(1, 2))
    check_same_length(y_pred, y_true.shape[0], pred_name)
    check_range(y_true, n_classes, "y_true", "n_classes")
    check_range(y_pred, n_classes, pred_name, "n_classes")
    return y_true, y_pred, n_classes


def validate_groups(groups, n_groups, n, *, check_range=True):
    """Validate group codes of ``n`` examples against ``n_groups``: ``(groups, has_groups, n_groups)``.

    Shared by the metrics modules; raises ValueError naming the problem.
    With ``check_range=False`` codes below ``n_groups`` (when it is given)
    are left to the counting kernel, which checks them in its own pass.
    """
    if groups is None:
        if n_groups is not None:
            raise ValueError(ERR_GROUPS_NEED_N)
        return np.empty(0, np.int64), False, 1
    groups = check_int_ids(groups, "groups", ndims=(1,))
    check_same_length(groups, n, "groups")
    if n_groups is None:
        n_groups = int(groups.max()) + 1 if groups.size else 1
        if groups.size and groups.min() < 0:
            _range_check(groups, n_groups, "groups", "n_groups")
        return groups, True, check_positive_int(n_groups, "n_groups")
    n_groups = check_positive_int(n_groups, "n_groups")
    if check_range:
        _range_check(groups, n_groups, "groups", "n_groups")
    return groups, True, n_groups


def as_label_ids(x, name, *, ndims=(1,)):
    """Predictions (or any labels) as a C-contiguous array of ids in their own integer dtype.

    Like :func:`check_int_ids` (same checks, same messages) but integer
    arrays keep their dtype (int8 predictions are read as 1 byte each, not
    copied to int64) and booleans are read as uint8; floats are checked to
    be whole numbers and become int64. Values are not range checked here:
    the counting kernels check every value in the pass that counts it, and
    :func:`raise_first_out_of_range` reports the first bad one.
    """
    arr = _with_ndim(x, name, ndims)
    kind = arr.dtype.kind
    if kind in "iub":
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = np.ascontiguousarray(arr)
        return arr.view(np.uint8) if kind == "b" else arr
    return check_int_ids(arr, name, ndims=ndims)


def raise_first_out_of_range(checks) -> None:
    """Raise the range error of the first ``(array, n, name, n_name)`` holding an id outside ``[0, n)``.

    Called only after a counting kernel flagged a bad value, with the
    checks in the order the validators always made them, so that the
    message (first bad value and its index) is the one :func:`check_range`
    gives.
    """
    for arr, n, name, n_name in checks:
        check_range(arr, n, name, n_name)
    raise AssertionError("a counting kernel flagged an id out of range that the range checks did not find")



def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, NaN where ``den`` is 0: the convention of every rate here.

    A rate with no denominator (a class absent from a group, a class never
    predicted) is undefined, not 0; callers skip NaN (docs/metrics.md).
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out
