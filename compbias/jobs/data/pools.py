"""What a layout provides before splitting and decoding (a :class:`Pool`), and the seeded selections on it.

Stratified splits and subsamples, induced imbalance, integer codes of group
attributes and the example frames of a :class:`~compbias.jobs.data.DatasetBundle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "Pool", "apply_imbalance", "check_disjoint_classes", "encode_levels", "frame", "imbalance_entries",
    "resolve_positive_class", "stratified_choice", "take",
]


@dataclass
class Pool:
    """Candidate examples of one split, in stable order."""

    keys: list[str]  # stable sort key: relative path, or zero-padded index
    labels: np.ndarray  # int64
    attrs: dict[str, np.ndarray]  # raw attribute values, one array per name
    paths: list[str] | None = None  # relative paths when images are files
    images: np.ndarray | None = None  # already-decoded uint8 (N, C, H, W) or float



def take(pool: Pool, idx: np.ndarray) -> Pool:
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    return Pool(
        keys=[pool.keys[i] for i in idx],
        labels=pool.labels[idx],
        attrs={k: v[idx] for k, v in pool.attrs.items()},
        paths=[pool.paths[i] for i in idx] if pool.paths is not None else None,
        images=pool.images[idx] if pool.images is not None else None,
    )


def stratified_choice(strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Choose exactly ``n`` indices, proportionally per stratum (largest remainder), seeded."""
    strata = np.asarray(strata)
    total = len(strata)
    if not 0 < n < total:
        raise ValueError(f"cannot choose {n} of {total} examples")
    rng = np.random.default_rng(seed)
    values, inverse = np.unique(strata, return_inverse=True)
    counts = np.bincount(inverse)
    exact = counts * (n / total)
    quota = np.floor(exact).astype(np.int64)
    remainder = n - quota.sum()
    order = np.lexsort((np.arange(len(values)), -(exact - quota)))
    quota[order[:remainder]] += 1
    chosen = []
    for s in range(len(values)):
        members = np.flatnonzero(inverse == s)
        chosen.append(rng.permutation(members)[: quota[s]])
    return np.sort(np.concatenate(chosen))


def imbalance_entries(imbalance: Any) -> list[dict[str, Any]] | None:
    """``imbalance`` as a list of plain dicts (one mapping or a sequence of them)."""
    if imbalance is None:
        return None
    entries = [imbalance] if isinstance(imbalance, Mapping) else list(imbalance)
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"imbalance[{i}] must be a mapping like {{classes: [3], keep: 0.1}}, got {entry!r}")
    return [dict(entry) for entry in entries]


def check_disjoint_classes(entries: Sequence[Any], class_names: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for c in entry.get("classes") or []:
            key = class_names[c] if isinstance(c, (int, np.integer)) and 0 <= c < len(class_names) else str(c)
            if key in seen:
                raise ValueError(
                    f"imbalance: class {c!r} is named by entries {seen[key]} and {i}; give each class one keep fraction"
                )
            seen[key] = i


def apply_imbalance(pool: Pool, spec: Mapping[str, Any], class_names: Sequence[str], seed: int) -> Pool:
    spec = {k: v for k, v in dict(spec).items() if v is not None}  # unused keys may be given as null
    keep = spec.pop("keep", None)
    if keep is None or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"imbalance.keep must be in (0, 1], got {keep!r}")
    if set(spec) == {"classes"}:
        classes = []
        for c in spec["classes"]:
            if isinstance(c, str) and c in class_names:
                classes.append(list(class_names).index(c))
            elif isinstance(c, (int, np.integer)) and 0 <= c < len(class_names):
                classes.append(int(c))
            else:
                raise ValueError(f"imbalance.classes: unknown class {c!r}; classes are 0..{len(class_names) - 1} or {list(class_names)}")
        affected = np.isin(pool.labels, classes)
    elif set(spec) == {"group"}:
        if not isinstance(spec["group"], Mapping) or not spec["group"]:
            raise ValueError("imbalance.group must map attribute names to values, e.g. {Male: 1}")
        affected = np.ones(len(pool.keys), dtype=bool)
        for attr, value in spec["group"].items():
            if attr not in pool.attrs:
                raise ValueError(f"imbalance.group: unknown attribute {attr!r}; available: {sorted(pool.attrs)}")
            col = pool.attrs[attr]
            affected &= np.asarray([v == value or str(v) == str(value) for v in col])
    else:
        raise ValueError(f"imbalance needs exactly one of 'classes' or 'group' besides 'keep', got keys {sorted(spec)}")
    rng = np.random.default_rng(seed + 3)
    keep_mask = np.ones(len(pool.keys), dtype=bool)
    # Keep a `keep` fraction of each affected class separately (seeded).
    for c in np.unique(pool.labels[affected]):
        members = np.flatnonzero(affected & (pool.labels == c))
        n_keep = max(1, int(round(len(members) * float(keep))))
        dropped = rng.permutation(members)[n_keep:]
        keep_mask[dropped] = False
    return take(pool, np.flatnonzero(keep_mask))


def encode_levels(train_values: np.ndarray, test_values: np.ndarray):
    """Integer codes for a group attribute; integers keep their value."""
    both = np.concatenate([np.asarray(train_values, dtype=object), np.asarray(test_values, dtype=object)])
    if all(isinstance(v, (int, np.integer)) for v in both):
        lo = min(int(v) for v in both) if len(both) else 0
        if lo >= 0:
            levels = list(range(int(max(int(v) for v in both)) + 1))
            return levels, (np.asarray(train_values, dtype=np.int64), np.asarray(test_values, dtype=np.int64))
    levels = sorted({v for v in both}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(levels)}
    return levels, tuple(np.asarray([index[v] for v in vals], dtype=np.int64) for vals in (train_values, test_values))


def resolve_positive_class(value, class_names: Sequence[str], default: int | None) -> int | None:
    if value is None:
        return default if default is not None and len(class_names) == 2 else None
    if isinstance(value, str) and value in class_names:
        return list(class_names).index(value)
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(class_names):
        return int(value)
    raise ValueError(f"positive_class {value!r} is not a class id 0..{len(class_names) - 1} nor a class name {list(class_names)}")


def frame(pool: Pool, groups: Sequence[str], codes: Mapping[str, np.ndarray]) -> pd.DataFrame:
    data: dict[str, Any] = {
        "example_id": np.arange(len(pool.keys), dtype=np.int64),
        "label": pool.labels.astype(np.int64),
    }
    for g in groups:
        data[g] = codes[g]
    if pool.paths is not None:
        data["path"] = pool.paths
    return pd.DataFrame(data)
