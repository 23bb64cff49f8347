"""Population matrices: one row per model version, one column per test example.

The study evaluates every model on the same test examples with stable
``example_id`` values; this module lines the predictions tables up on those
ids, checks that they agree on the examples, labels and group attributes
(:func:`compbias.contract.validate_population`; a member that does not is
left out and reported as that version's error), and stacks them into integer
matrices per population (the baseline population and one compressed
population per ``(method, level)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from compbias import contract as C
from compbias.platform.audit.fetch import Fetched, as_codes, group_columns
from compbias.platform.audit.selection import VersionRecord

BASELINE = ("baseline", "none")


class PopulationError(Exception):
    """The study's predictions cannot form a baseline population."""


@dataclass
class Population:
    """The predictions of one population of models.

    Attributes
    ----------
    method, level : str
    records : list of VersionRecord
        One per row of ``preds``.
    preds : numpy.ndarray of int64, shape (M, N)
    """

    method: str
    level: str
    records: list[VersionRecord]
    preds: np.ndarray

    @property
    def key(self) -> tuple[str, str]:
        """``(method, level)``."""
        return (self.method, self.level)

    @property
    def size(self) -> int:
        """Number of models M."""
        return int(self.preds.shape[0])

    def row(self, version_key: str) -> int:
        """Row of the version ``NAME/VERSION`` in ``preds``."""
        for i, r in enumerate(self.records):
            if r.key == version_key:
                return i
        raise KeyError(version_key)


@dataclass
class StudyData:
    """Everything the computations need about one study's test set and models.

    Attributes
    ----------
    example_ids, labels : numpy.ndarray, shape (N,)
    n_classes : int
    group_names : list of str
        Group attribute columns.
    group_codes : numpy.ndarray of int64, shape (N, K)
        Integer code of each example's value per attribute.
    group_levels : list of list
        The attribute value behind each code.
    test_frame : pandas.DataFrame
        ``example_id``, ``label``, the group columns and ``path`` when present.
    baseline : Population
    compressed : dict of (str, str) to Population
        In a stable order: method, then numeric level where possible.
    errors : dict of str to str
        Versions left out because their predictions do not line up, with why.
    """

    example_ids: np.ndarray
    labels: np.ndarray
    n_classes: int
    group_names: list[str]
    group_codes: np.ndarray
    group_levels: list[list]
    test_frame: pd.DataFrame
    baseline: Population
    compressed: dict[tuple[str, str], Population]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        """Number of test examples N."""
        return int(self.labels.shape[0])

    def populations(self) -> Iterable[Population]:
        """The baseline population, then the compressed ones."""
        yield self.baseline
        yield from self.compressed.values()

    def population_of(self, record: VersionRecord) -> Population | None:
        """The population that holds ``record``, or None."""
        pop = self.baseline if record.is_baseline else self.compressed.get(record.population)
        if pop is not None and any(r.key == record.key for r in pop.records):
            return pop
        return None


def level_sort_key(level: str) -> tuple[int, float, str]:
    """Sort levels numerically when they are numbers, else by name."""
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def build_study_data(
    fetched: Sequence[Fetched],
    *,
    declared_groups: Sequence[str] | None = None,
    n_classes: int | None = None,
) -> StudyData:
    """Line up the predictions of one study's versions into population matrices.

    Parameters
    ----------
    fetched : sequence of Fetched
        Successfully fetched versions of one study (others are ignored).
    declared_groups : sequence of str, optional
        Group attributes named by the study file.
    n_classes : int, optional
        Number of classes (``member.json``); a version whose labels or
        predictions reach it is left out with an error.  Defaults to one more
        than the largest label or prediction seen.

    Returns
    -------
    StudyData
        Versions whose example ids, labels or group attributes disagree with
        the reference (the first baseline by version number), or whose
        classes are out of range, are left out and listed in ``errors``.

    Raises
    ------
    PopulationError
        When no baseline version has usable predictions.
    """
    ok = sorted((f for f in fetched if f.ok), key=lambda f: f.record.sort_key())
    errors: dict[str, str] = {}
    if n_classes is not None:  # a member predicting a class the population does not have is that member's error
        kept = []
        for f in ok:
            p = f.predictions
            top = max(int(p["label"].max()), int(p["pred"].max()))
            if top >= n_classes:
                errors[f.record.key] = (
                    f"its labels or predictions reach class {top} but the population has {n_classes} classes "
                    f"(class ids 0..{n_classes - 1}, from {C.MEMBER_FILE} or the study); fix the member's predictions"
                )
            else:
                kept.append(f)
        ok = kept
    baselines = [f for f in ok if f.record.is_baseline]
    if not baselines:
        raise PopulationError(
            "no baseline version of this study has usable predictions, so no change can be measured; "
            "register (or repair) at least one baseline version"
            + (f" ({'; '.join(f'{k}: {v}' for k, v in list(errors.items())[:3])})" if errors else "")
        )
    ref = baselines[0].predictions
    ref_name = f"baseline {baselines[0].record.key}"
    ids = ref["example_id"].to_numpy(np.int64)
    labels = ref["label"].to_numpy(np.int64)
    gcols = group_columns(ref, declared_groups)
    rows: dict[tuple[str, str], list[tuple[VersionRecord, np.ndarray]]] = {}
    for f in ok:
        p = f.predictions
        if f is not baselines[0]:
            try:
                C.validate_population({ref_name: ref, "this version": p}, groups=gcols)
            except C.ContractError as exc:
                errors[f.record.key] = str(exc)
                continue
        rows.setdefault(f.record.population, []).append((f.record, p["pred"].to_numpy(np.int64)))
    seen = int(labels.max())
    for members in rows.values():
        for _, pr in members:
            seen = max(seen, int(pr.max()))
    if n_classes is None:
        n_classes = seen + 1

    def make(key, members):
        return Population(key[0], key[1], [r for r, _ in members], np.ascontiguousarray(np.stack([p for _, p in members])))

    baseline = make(BASELINE, rows.pop(BASELINE))
    order = sorted(rows, key=lambda k: (k[0], level_sort_key(k[1])))
    compressed = {k: make(k, rows[k]) for k in order}
    codes, levels = [], []
    for c in gcols:
        cc, lv = as_codes(ref[c].to_numpy())
        codes.append(cc)
        levels.append(lv)
    group_codes = np.stack(codes, axis=1) if codes else np.zeros((len(ids), 0), np.int64)
    keep = ["example_id", "label", *gcols] + (["path"] if "path" in ref.columns else [])
    return StudyData(
        example_ids=ids,
        labels=labels,
        n_classes=int(n_classes),
        group_names=gcols,
        group_codes=group_codes,
        group_levels=levels,
        test_frame=ref[keep].copy(),
        baseline=baseline,
        compressed=compressed,
        errors=errors,
    )
