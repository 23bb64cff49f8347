"""Checking predictions tables: one member's (:func:`validate_predictions`) and a population's (:func:`validate_population`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .artifacts import EXAMPLE_ID, LABEL, NON_GROUP_COLUMNS, PRED, PROB, REQUIRED_COLUMNS
from .errors import ContractError

__all__ = ["group_columns", "validate_predictions", "validate_population"]


def group_columns(frame: pd.DataFrame, declared: Sequence[str] | None = None) -> list[str]:
    """Name the group columns of a predictions table.

    Parameters
    ----------
    frame : pandas.DataFrame
    declared : sequence of str, optional
        Declared group columns (``member.json`` or the study's ``dataset.groups``).

    Returns
    -------
    list of str
        The ``declared`` columns found in the table (none when ``declared``
        is an empty list: "no groups"), else every integer or boolean column
        outside :data:`NON_GROUP_COLUMNS`.
    """
    if declared is not None and len(declared) == 0:
        return []
    if declared:
        found = [c for c in declared if c in frame.columns]
        if found:
            return found
    return [
        c
        for c in frame.columns
        if c not in NON_GROUP_COLUMNS
        and (pd.api.types.is_integer_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
    ]


def validate_predictions(
    frame: pd.DataFrame,
    *,
    num_classes: int | None = None,
    groups: Sequence[str] | None = None,
    where: str = "predictions",
) -> pd.DataFrame:
    """Check a predictions table against the contract and sort it by example.

    Parameters
    ----------
    frame : pandas.DataFrame
        ``example_id``, ``label``, ``pred`` (integers), optionally ``prob``
        and group columns.
    num_classes : int, optional
        When given, ``label`` and ``pred`` must lie in ``[0, num_classes)``.
    groups : sequence of str, optional
        Group columns that must be present, without missing values.
    where : str
        Named in error messages.

    Returns
    -------
    pandas.DataFrame
        Sorted by ``example_id`` with a fresh index.

    Raises
    ------
    ContractError
        Missing columns, an empty table, missing values, non-integer or
        negative ids, labels or predictions, a class out of range, duplicated
        example ids, or a ``prob`` outside ``[0, 1]``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise ContractError(f"{where} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ContractError(f"{where} lacks the column(s) {missing}; the contract requires {list(REQUIRED_COLUMNS)}")
    if len(frame) == 0:
        raise ContractError(f"{where} has no rows")
    for col in REQUIRED_COLUMNS:
        s = frame[col]
        if s.isna().any():
            raise ContractError(f"{where}: column {col!r} has missing values")
        if not pd.api.types.is_integer_dtype(s):
            raise ContractError(f"{where}: column {col!r} must hold integers, found dtype {s.dtype}")
        if (s.to_numpy() < 0).any():
            raise ContractError(f"{where}: column {col!r} has negative values")
    if num_classes is not None:
        for col in (LABEL, PRED):
            top = int(frame[col].max())
            if top >= num_classes:
                n = int((frame[col] >= num_classes).sum())
                raise ContractError(
                    f"{where}: {n} {col} value(s) out of range (max {top}) for {num_classes} classes; "
                    "classes are ids 0..num_classes-1"
                )
    dup = frame[EXAMPLE_ID].duplicated()
    if dup.any():
        first = frame.loc[dup, EXAMPLE_ID].iloc[0]
        raise ContractError(f"{where}: {int(dup.sum())} duplicated example_id row(s) (e.g. {first}); one row per example")
    if PROB in frame.columns:
        p = pd.to_numeric(frame[PROB], errors="coerce").to_numpy(dtype=float)
        if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
            raise ContractError(f"{where}: column 'prob' must hold probabilities in [0, 1]")
    for g in groups or ():
        if g not in frame.columns:
            raise ContractError(f"{where} lacks the group column {g!r}")
        if frame[g].isna().any():
            raise ContractError(f"{where}: group column {g!r} has missing values")
    return frame.sort_values(EXAMPLE_ID, kind="stable").reset_index(drop=True)


def validate_population(frames: Mapping[str, pd.DataFrame], *, groups: Sequence[str] | None = None) -> None:
    """Check that members of one population predict the same examples with the same labels.

    Parameters
    ----------
    frames : mapping of str to pandas.DataFrame
        Member name -> predictions, each already passed through
        :func:`validate_predictions` (sorted by ``example_id``).
    groups : sequence of str, optional
        Group columns whose values must also agree between members.

    Raises
    ------
    ContractError
        Naming the first member that differs from the first one, and how.
    """
    items = list(frames.items())
    if len(items) < 2:
        return
    ref_name, ref = items[0]
    ids = ref[EXAMPLE_ID].to_numpy()
    labels = ref[LABEL].to_numpy()
    for name, frame in items[1:]:
        other = frame[EXAMPLE_ID].to_numpy()
        if len(other) != len(ids) or not np.array_equal(other, ids):
            extra = len(np.setdiff1d(other, ids))
            lacking = len(np.setdiff1d(ids, other))
            raise ContractError(
                f"{name} predicts other examples than {ref_name} ({len(other)} vs {len(ids)} rows: {extra} example_id "
                f"value(s) only in {name}, {lacking} only in {ref_name}); every member of a population must be "
                "evaluated on the same test examples"
            )
        diff = frame[LABEL].to_numpy() != labels
        if diff.any():
            raise ContractError(
                f"{name}: labels disagree with {ref_name} on {int(diff.sum())} example(s) (e.g. example_id "
                f"{int(ids[np.argmax(diff)])}); members of a population must share the ground truth"
            )
        for g in groups or ():
            if g in ref.columns and g in frame.columns and not np.array_equal(frame[g].to_numpy(), ref[g].to_numpy()):
                n = int((frame[g].to_numpy() != ref[g].to_numpy()).sum())
                raise ContractError(
                    f"{name}: group column {g!r} disagrees with {ref_name} on {n} example(s); "
                    "members of a population must share the group attributes of each example"
                )
