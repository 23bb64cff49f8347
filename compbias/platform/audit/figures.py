"""Figures of an audit (matplotlib, Agg backend); each function returns the Figure.

* :func:`class_change_scatter` -- per-class normalised FPR/FNR change of each
  compressed population, one panel per level, one colour per method, 95%
  ellipses and the method centroid ("Simon Says" Fig. 3).
* :func:`level_curves` -- accuracy, PIE, CEV and SDE against level per method
  (Fig. 2).
* :func:`cev_vs_svcca` -- CEV against SVCCA distance per layer with a least
  squares line (Fig. 5).
* :func:`group_changes` -- normalised change of each group's FPR and FNR with
  confidence bars (Hooker et al. 2020).
* :func:`cie_gallery` -- the top CIE images with the label and both
  populations' modal predictions.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

from compbias.platform.audit.population import level_sort_key  # noqa: E402

CHI2_2DOF_95 = 5.991464547107979  # 95% quantile of chi-square with 2 degrees of freedom


def _method_colors(methods) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(sorted(set(methods)))}


def confidence_ellipse(x: np.ndarray, y: np.ndarray, *, coverage_chi2: float = CHI2_2DOF_95, **kwargs) -> Ellipse | None:
    """The ellipse holding 95% of a bivariate normal fitted to the points.

    Parameters
    ----------
    x, y : numpy.ndarray
        Point coordinates (NaN pairs are left out).
    coverage_chi2 : float
        Chi-square quantile for the coverage (default: 95%, 2 dof).
    **kwargs
        Passed to :class:`matplotlib.patches.Ellipse`.

    Returns
    -------
    matplotlib.patches.Ellipse or None
        None with fewer than 3 points or a degenerate covariance.
    """
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    cov = np.cov(x[ok], y[ok])
    vals, vecs = np.linalg.eigh(cov)
    if not np.all(np.isfinite(vals)) or vals.max() <= 0:
        return None
    vals = np.clip(vals, 0, None)
    angle = math.degrees(math.atan2(vecs[1, 1], vecs[0, 1]))
    width, height = 2 * np.sqrt(coverage_chi2 * vals[1]), 2 * np.sqrt(coverage_chi2 * vals[0])
    return Ellipse((x[ok].mean(), y[ok].mean()), width, height, angle=angle, **kwargs)


def class_change_scatter(class_changes: dict) -> Figure:
    """Per-class normalised change of FPR and FNR, one panel per level.

    Parameters
    ----------
    class_changes : dict
        ``(method, level) -> {"delta_fpr": (C,), "delta_fnr": (C,)}``
        (population-mean changes in percent).

    Returns
    -------
    matplotlib.figure.Figure
        Each panel has one scatter per method with one point per class whose
        change is defined (label ``<method>``), its 95% ellipse and its
        centroid (a star, label ``<method> centroid``), and the diagonal of
        balanced change.
    """
    levels = sorted({lv for _, lv in class_changes}, key=level_sort_key)
    colors = _method_colors(m for m, _ in class_changes)
    n = max(1, len(levels))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5 * cols, 4.5 * rows))
    for i, level in enumerate(levels or ["none"]):
        ax = fig.add_subplot(rows, cols, i + 1)
        lim = [np.inf, -np.inf]
        for (method, lv), d in sorted(class_changes.items()):
            if lv != level:
                continue
            x, y = np.asarray(d["delta_fpr"], float), np.asarray(d["delta_fnr"], float)
            ok = np.isfinite(x) & np.isfinite(y)
            c = colors[method]
            ax.scatter(x[ok], y[ok], s=14, alpha=0.7, color=c, label=method)
            if ok.any():
                ax.scatter([x[ok].mean()], [y[ok].mean()], marker="*", s=220, color=c, edgecolor="black", label=f"{method} centroid", zorder=5)
                lim = [min(lim[0], x[ok].min(), y[ok].min()), max(lim[1], x[ok].max(), y[ok].max())]
            e = confidence_ellipse(x, y, facecolor="none", edgecolor=c, linewidth=1.5)
            if e is not None:
                ax.add_patch(e)
        if np.isfinite(lim[0]):
            ax.plot(lim, lim, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.axvline(0, color="grey", linewidth=0.5)
        ax.set_title(f"level {level}")
        ax.set_xlabel("normalised FPR change (%)")
        ax.set_ylabel("normalised FNR change (%)")
        ax.legend(fontsize=7)
    fig.suptitle("Per-class change of FPR and FNR (ellipses hold 95% of classes; stars: method centroid)")
    _adjust(fig)
    return fig


def _level_positions(levels: list[str]) -> tuple[list[float], bool]:
    try:
        return [float(v) for v in levels], True
    except ValueError:
        return list(range(len(levels))), False


def level_curves(bias: pd.DataFrame) -> Figure:
    """Accuracy, PIE count, CEV and SDE against compression level, one line per method.

    Parameters
    ----------
    bias : pandas.DataFrame
        The audit's ``bias`` table (``method``, ``level``, ``acc``, ``pie``,
        ``cev``, ``sde``).

    Returns
    -------
    matplotlib.figure.Figure
        Four panels; each has one line per method with one point per level.
    """
    fig = Figure(figsize=(14, 3.8))
    panels = [("acc", "accuracy"), ("pie", "PIE count"), ("cev", "CEV"), ("sde", "SDE")]
    colors = _method_colors(bias["method"]) if len(bias) else {}
    for i, (col, title) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        for method, part in bias.groupby("method", sort=True):
            part = part.iloc[sorted(range(len(part)), key=lambda j: level_sort_key(str(part["level"].iloc[j])))]
            levels = [str(v) for v in part["level"]]
            xs, numeric = _level_positions(levels)
            ax.plot(xs, part[col].to_numpy(float), marker="o", color=colors[method], label=method)
            if not numeric:
                ax.set_xticks(xs, levels)
        ax.set_title(title)
        ax.set_xlabel("level")
        if i == 0:
            ax.legend(fontsize=7)
    _adjust(fig, wspace=0.35)
    return fig


def cev_vs_svcca(similarity: pd.DataFrame) -> Figure:
    """CEV against SVCCA distance at each layer, with the least-squares line.

    Parameters
    ----------
    similarity : pandas.DataFrame
        Per compressed version and layer: ``layer``, ``svcca_distance``,
        ``cev``, ``level``.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per layer: one point per version (coloured by level) and,
        with at least two points, the regression line (label ``fit r=...``).
    """
    layers = list(dict.fromkeys(similarity["layer"])) if len(similarity) else []
    n = max(1, len(layers))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 3.6 * rows))
    for i, layer in enumerate(layers or ["(none)"]):
        ax = fig.add_subplot(rows, cols, i + 1)
        part = similarity[similarity["layer"] == layer] if layers else similarity
        part = part[np.isfinite(part["svcca_distance"].to_numpy(float)) & np.isfinite(part["cev"].to_numpy(float))] if len(part) else part
        if len(part):
            lv = [str(v) for v in part["level"]]
            pos, _ = _level_positions(sorted(set(lv), key=level_sort_key))
            order = {v: p for v, p in zip(sorted(set(lv), key=level_sort_key), pos)}
            sc = ax.scatter(part["svcca_distance"], part["cev"], c=[order[v] for v in lv], cmap="viridis", s=22)
            fig.colorbar(sc, ax=ax, label="level")
            x, y = part["svcca_distance"].to_numpy(float), part["cev"].to_numpy(float)
            if len(part) >= 2 and np.ptp(x) > 0:
                slope, icpt = np.polyfit(x, y, 1)
                r = np.corrcoef(x, y)[0, 1]
                xx = np.linspace(x.min(), x.max(), 50)
                ax.plot(xx, slope * xx + icpt, color="black", label=f"fit r={r:.2f}")
                ax.legend(fontsize=7)
        ax.set_title(str(layer))
        ax.set_xlabel("SVCCA distance")
        ax.set_ylabel("CEV")
    _adjust(fig, wspace=0.5)
    return fig


def group_changes(groups: dict) -> Figure:
    """Normalised change of each group's FPR and FNR with confidence bars.

    Parameters
    ----------
    groups : dict
        ``(method, level) -> {"names": [...], "fpr_change": (G,),
        "fnr_change": (G,), "fpr_ci": (low, high) or None, "fnr_ci": ...}``.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels (FPR, FNR); each has one bar container per population with
        one bar per group.
    """
    fig = Figure(figsize=(13, 4.2))
    keys = sorted(groups, key=lambda k: (k[0], level_sort_key(k[1])))
    for p, rate in enumerate(("fpr", "fnr")):
        ax = fig.add_subplot(1, 2, p + 1)
        if not keys:
            ax.set_title(f"group {rate.upper()} change (no groups)")
            continue
        names = groups[keys[0]]["names"]
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            d = groups[key]
            vals = np.asarray(d[f"{rate}_change"], float)
            xs = np.arange(len(names)) + k * width
            err = None
            ci = d.get(f"{rate}_ci")
            if ci is not None:
                lo, hi = np.asarray(ci[0], float), np.asarray(ci[1], float)
                err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
                err = np.where(np.isfinite(err), err, 0)
            ax.bar(xs, np.nan_to_num(vals), width=width, yerr=err, capsize=2, label=f"{key[0]}/{key[1]}")
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_ylabel("normalised change (%)")
        ax.set_title(f"group {rate.upper()} change vs baseline (95% CI)")
        ax.legend(fontsize=7)
    _adjust(fig, bottom=0.22)
    return fig


def cie_gallery(images: list[np.ndarray], captions: list[str], *, columns: int = 8, title: str = "") -> Figure:
    """A grid of CIE images with captions.

    Parameters
    ----------
    images : list of numpy.ndarray
        ``(C, H, W)`` or ``(H, W)`` arrays in [0, 1].
    captions : list of str
        One per image (label and both populations' predictions).
    columns : int
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        One image axes per example.
    """
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.8 * cols, 2.1 * rows))
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, cols, i + 1)
        arr = np.asarray(img, float)
        if arr.ndim == 3:
            arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
        ax.imshow(np.clip(arr, 0, 1), cmap="gray" if arr.ndim == 2 else None)
        ax.set_title(cap, fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, y=1 - 0.05 / fig.get_figheight())
    _adjust(fig, left=0.02, right=0.98, bottom=0.02, top=1 - 0.45 / fig.get_figheight(), wspace=0.1, hspace=0.5)
    return fig


def _adjust(fig: Figure, **kw) -> None:
    """Fixed margins: much cheaper to render than a layout engine."""
    n_rows = max(1, len({round(ax.get_position().y0, 3) for ax in fig.axes}))
    opts = dict(left=0.08, right=0.97, bottom=0.12 if n_rows == 1 else 0.07, top=0.86 if n_rows == 1 else 0.92, wspace=0.3, hspace=0.45)
    opts.update(kw)
    fig.subplots_adjust(**opts)


def to_png(fig: Figure, *, dpi: int = 90) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
