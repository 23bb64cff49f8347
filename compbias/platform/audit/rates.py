"""Per-model class and group rates of one population, their denominators, and the long rates table.

Conventions (``docs/audit.md``): a group's FPR/FNR is, for a binary task
with a positive class, that class's one-vs-rest rate inside the group;
otherwise the mean over classes of the one-vs-rest rates inside the group
(classes with undefined rates skipped). A rate whose denominator has fewer
than ``audit.min_count`` examples is "not estimable": no number, no interval.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import compbias.metrics as M
from compbias.platform.audit.population import Population, StudyData

if TYPE_CHECKING:  # pragma: no cover
    from compbias.platform.audit.settings import AuditSettings


def group_frame(data: StudyData) -> pd.DataFrame | None:
    """The group codes of the test examples as a frame (one column per attribute), or None without groups."""
    if not data.group_names:
        return None
    return pd.DataFrame({n: data.group_codes[:, j] for j, n in enumerate(data.group_names)})


def group_labels(data: StudyData, table: pd.DataFrame) -> list[str]:
    """Readable group names: replace codes by the attribute values."""
    out = []
    for g in table["group"]:
        parts = []
        for part in str(g).split("&"):
            name, _, code = part.partition("=")
            j = data.group_names.index(name) if name in data.group_names else None
            try:
                val = data.group_levels[j][int(code)] if j is not None else code
            except (ValueError, IndexError):
                val = code
            parts.append(f"{name}={val}")
        out.append("&".join(parts))
    return out


class PopulationRates:
    """Per-model rates of one population: class and group level."""

    def __init__(self, data: StudyData, pop: Population, positive_class: int | None, smoothing: float = 0.0):
        y, C = data.labels, data.n_classes
        self.cls = M.population_rates(y, pop.preds, C, smoothing=smoothing)  # (M, C)
        self.acc = np.asarray(self.cls.accuracy, float)  # (M,)
        gf = group_frame(data)
        self.group_names: list[str] = []
        self.group_rows: pd.DataFrame | None = None
        self.group_size = np.zeros(0)
        self.group_fpr = np.zeros((pop.size, 0))
        self.group_fnr = np.zeros((pop.size, 0))
        self.group_acc = np.zeros((pop.size, 0))
        if gf is not None:
            gr = M.group_rates(y, pop.preds, gf, C, positive_class=positive_class, smoothing=smoothing)
            self.group_names = group_labels(data, gr.groups)
            self.group_rows = gr.groups
            self.group_size = gr.groups["size"].to_numpy()
            fpr, fnr = np.asarray(gr.rates.fpr, float), np.asarray(gr.rates.fnr, float)
            if positive_class is None:  # (M, G, C) -> macro mean over classes
                with np.errstate(invalid="ignore"), quiet():
                    fpr, fnr = np.nanmean(fpr, axis=-1), np.nanmean(fnr, axis=-1)
            self.group_fpr, self.group_fnr = fpr, fnr
            self.group_acc = np.asarray(gr.accuracy, float)


class quiet:
    """Silence numpy's RuntimeWarnings (empty slices, 0/0) inside the block."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a):
        self._w.__exit__(*a)


def nanmean(x: np.ndarray, axis=0) -> np.ndarray:
    """``np.nanmean`` without the warning for all-NaN slices."""
    with quiet():
        return np.nanmean(x, axis=axis)


def rate_denominators(data: StudyData, rates: PopulationRates, positive_class: int | None) -> dict[tuple[str, str, str], int]:
    """The number of test examples behind each rate of :func:`rate_rows`: ``(scope, name, metric) -> n``.

    FPR is a share of the negatives and FNR of the positives: of class ``c``
    (one-vs-rest) for class rates; of the positive class inside the group for
    group rates of a binary task. A multi-class group rate is a mean over
    classes, and accuracy a share of all members: their ``n`` is the
    group's size. Denominators depend on the labels only, so they are the
    same for every model.
    """
    y = data.labels
    out: dict[tuple[str, str, str], int] = {("overall", "all", "acc"): int(y.size)}
    for c in range(data.n_classes):
        out[("class", str(c), "fnr")] = int((y == c).sum())
        out[("class", str(c), "fpr")] = int((y != c).sum())
    if rates.group_rows is not None:
        gf = group_frame(data)
        for name, (_, grow) in zip(rates.group_names, rates.group_rows.iterrows()):
            member = np.ones(y.size, bool)
            for attr in data.group_names:
                if grow.get(attr) is not None and not (isinstance(grow.get(attr), float) and np.isnan(grow.get(attr))):
                    member &= gf[attr].to_numpy() == grow[attr]
            size = int(member.sum())
            out[("group", name, "acc")] = size
            if positive_class is not None:
                out[("group", name, "fnr")] = int((member & (y == positive_class)).sum())
                out[("group", name, "fpr")] = int((member & (y != positive_class)).sum())
            else:
                out[("group", name, "fnr")] = out[("group", name, "fpr")] = size
    return out


def rate_rows(  # noqa: PLR0913 - one row builder for every scope
rows, method, level, data, rates: PopulationRates, base: PopulationRates | None, ci: dict | None,
               settings: "AuditSettings") -> None:
    """Long table: population x scope x metric -> mean, CI, change vs baseline (% and pp), CI; n and estimability."""
    n_of = rate_denominators(data, rates, settings.positive_class)

    def add(scope, name, metric, values, base_values, ci_key, index):
        n = n_of.get((scope, name, metric))
        row = {"method": method, "level": level, "scope": scope, "name": name, "metric": metric, "n": n}
        if n is not None and n < settings.min_count:  # the estimability rule: no number, no degenerate interval
            row["estimable"] = f"not estimable (n={n})"
            rows.append(row)
            return
        row["estimable"] = True
        mean = float(nanmean(values)) if values.size else float("nan")
        row["mean"] = mean
        if ci and ci_key in ci and ci[ci_key] is not None:
            lo, hi = ci[ci_key]
            row["ci_low"], row["ci_high"] = _idx(lo, index), _idx(hi, index)
        if base_values is not None:
            b = float(nanmean(base_values)) if base_values.size else float("nan")
            row["baseline_mean"] = b
            row["change_pp"] = (mean - b) * 100.0
            row["change_pct"] = float(M.normalized_change(np.array([mean]), np.array([b]))[0])
            for suffix, col in (("_change_pp", "change_pp"), ("_change", "change")):
                dk = f"{ci_key}{suffix}"
                if ci and dk in ci and ci[dk] is not None:
                    lo, hi = ci[dk]
                    row[f"{col}_ci_low"], row[f"{col}_ci_high"] = _idx(lo, index), _idx(hi, index)
        rows.append(row)

    add("overall", "all", "acc", rates.acc, base.acc if base else None, "acc", None)
    for c in range(data.n_classes):
        for metric in ("fpr", "fnr"):
            add("class", str(c), metric, getattr(rates.cls, metric)[:, c], getattr(base.cls, metric)[:, c] if base else None, f"class_{metric}", c)
    for g, gname in enumerate(rates.group_names):
        for metric, arr, barr in (("fpr", rates.group_fpr, base.group_fpr if base else None),
                                  ("fnr", rates.group_fnr, base.group_fnr if base else None),
                                  ("acc", rates.group_acc, base.group_acc if base else None)):
            add("group", gname, metric, arr[:, g], barr[:, g] if barr is not None else None, f"group_{metric}", g)


def _idx(x, i):
    if i is None:
        return float(np.asarray(x).reshape(-1)[0])
    return float(np.asarray(x)[i])
