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

Written to be read by a reviewer: every level on an axis is labelled by its
name (sparsities at their values, named modes such as ``int8_static`` at
evenly spaced positions, in a row of their own), a quantity whose values span
orders of magnitude (CEV goes from 0 to about 1e5) is drawn on a log or
symmetric-log axis with a note saying where zero is, colour bars name the
populations, and no text overlaps another (``tests/platform/audit/
test_figures_readable.py`` checks the drawn text boxes).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from compbias.platform.audit.axes import (  # noqa: F401  (CHI2_2DOF_95, to_png: re-exported)
    CHI2_2DOF_95,
    adjust,
    apply_scale,
    confidence_ellipse,
    figure_legend,
    is_number,
    level_axis,
    method_colors,
    population_colors,
    scale_label,
    scale_note,
    to_png,
    value_scale,
)
from compbias.platform.audit.population import level_sort_key


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
        balanced change. One legend for the figure, above the panels, so
        that no legend hides a point.
    """
    levels = sorted({lv for _, lv in class_changes}, key=level_sort_key)
    colors = method_colors(m for m, _ in class_changes)
    n = max(1, len(levels))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    head = 0.95  # inches for the title and the legend
    height = 4.2 * rows + head
    fig = Figure(figsize=(5 * cols, height))
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
    fig.suptitle("Per-class change of FPR and FNR (ellipses hold 95% of classes; stars: method centroid; dotted: equal change)",
                 y=1 - 0.08 / height, fontsize=11)
    figure_legend(fig, 0.38)
    adjust(fig, top=1 - head / height, bottom=0.55 / height, hspace=0.35 * 4.2 / 3.6, wspace=0.28)
    return fig


def level_curves(bias: pd.DataFrame) -> Figure:
    """Accuracy, PIE count, CEV and SDE against compression level, one line per method.

    Parameters
    ----------
    bias : pandas.DataFrame
        The audit's ``bias`` table (``method``, ``level``, ``acc``, ``pie``,
        ``cev``, ``sde``; with ``acc_drop`` the baseline accuracy is drawn
        as a dashed line).

    Returns
    -------
    matplotlib.figure.Figure
        Four panels per row; each has one line per method with one point
        per level. Methods with numeric levels (sparsities) and methods with
        named levels (``int8_static``) get a row each, with the same y axes.
        CEV and SDE go to a log or symmetric-log axis when their values
        span an order of magnitude (the figure says how to read it).
    """
    panels = [("acc", "accuracy"), ("pie", "PIE count"), ("cev", "CEV"), ("sde", "SDE")]
    colors = method_colors(bias["method"]) if len(bias) else {}
    kinds: list[list[str]] = [[], []]  # methods with numeric levels, methods with named levels
    for method, part in bias.groupby("method", sort=True):
        kinds[0 if all(is_number(str(v)) for v in part["level"]) else 1].append(method)
    rows = [ms for ms in kinds if ms] or [[]]
    scales = {col: value_scale(bias[col]) if col in ("cev", "sde") and col in bias else ("linear", None) for col, _ in panels}
    notes = [n for n in (scale_note(t, scales[c]) for c, t in panels) if n]
    row_h = 3.5
    foot = 0.3 + 0.2 * len(notes)
    height = row_h * len(rows) + foot + 0.3
    fig = Figure(figsize=(14, height))
    base_acc = None
    if len(bias) and "acc_drop" in bias:
        b = (bias["acc"] + bias["acc_drop"] / 100.0).to_numpy(float)
        base_acc = float(np.nanmean(b)) if np.isfinite(b).any() else None
    first: dict[str, object] = {}
    for r, methods in enumerate(rows):
        part_r = bias[bias["method"].isin(methods)]
        for i, (col, title) in enumerate(panels):
            ax = fig.add_subplot(len(rows), 4, r * 4 + i + 1, sharey=first.get(col))
            first.setdefault(col, ax)
            where = level_axis(ax, [str(v) for v in part_r["level"]]) if len(part_r) else {}
            for method in methods:
                part = part_r[part_r["method"] == method]
                part = part.iloc[sorted(range(len(part)), key=lambda j: level_sort_key(str(part["level"].iloc[j])))]
                xs = [where[str(v)] for v in part["level"]]
                ax.plot(xs, part[col].to_numpy(float), marker="o", color=colors[method], label=method)
            if col == "acc" and base_acc is not None:
                ax.axhline(base_acc, color="grey", linestyle="--", linewidth=1, label="baseline")
            if r == 0:
                apply_scale(ax, scales[col], bias[col] if col in bias else None)
                ax.set_title(title)
            ax.set_ylabel(scale_label(title, scales[col]), fontsize=9)
            if i == 0 and methods:
                ax.legend(fontsize=7)
    for k, note in enumerate(notes):
        fig.text(0.01, (0.08 + 0.2 * (len(notes) - 1 - k)) / height, note, fontsize=8, color="#444")
    adjust(fig, wspace=0.4, top=1 - 0.3 / height, bottom=(foot + 0.35) / height, hspace=0.42)
    return fig


def cev_vs_svcca(similarity: pd.DataFrame) -> Figure:
    """CEV against SVCCA distance at each layer, with the least-squares line.

    Parameters
    ----------
    similarity : pandas.DataFrame
        Per compressed version and layer: ``layer``, ``svcca_distance``,
        ``cev``, ``level`` (and ``method``, when there).

    Returns
    -------
    matplotlib.figure.Figure
        One panel per layer: one point per version, coloured by its
        population (``method/level``; one colour bar names them) and, with
        at least two points, the regression line (label ``fit r=...``,
        Pearson's r of the values). CEV is on a log or symmetric-log axis
        when it spans an order of magnitude.
    """
    layers = list(dict.fromkeys(similarity["layer"])) if len(similarity) else []
    n = max(1, len(layers))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    ok_all = similarity[np.isfinite(similarity["svcca_distance"].to_numpy(float)) & np.isfinite(similarity["cev"].to_numpy(float))] \
        if len(similarity) else similarity
    scale = value_scale(ok_all["cev"]) if len(ok_all) else ("linear", None)
    note = scale_note("CEV", scale)
    foot = 0.35 if note else 0.0
    height = 3.4 * rows + 0.5 + foot
    fig = Figure(figsize=(4 * cols + 2.2, height))

    def pop_name(r) -> str:
        return f"{r['method']}/{r['level']}" if "method" in r else str(r["level"])

    pops = sorted({pop_name(r) for _, r in ok_all.iterrows()},
                  key=lambda s: (s.rsplit("/", 1)[0] if "/" in s else "", level_sort_key(s.rsplit("/", 1)[-1])))
    code = {p: k for k, p in enumerate(pops)}
    cmap, norm = population_colors(pops) if pops else (None, None)
    sc = None
    first = None
    for i, layer in enumerate(layers or ["(none)"]):
        ax = fig.add_subplot(rows, cols, i + 1, sharey=first)
        first = first or ax
        part = ok_all[ok_all["layer"] == layer] if layers else ok_all
        if len(part):
            sc = ax.scatter(part["svcca_distance"], part["cev"], c=[code[pop_name(r)] for _, r in part.iterrows()],
                            cmap=cmap, norm=norm, s=24, edgecolor="black", linewidth=0.3)
            x, y = part["svcca_distance"].to_numpy(float), part["cev"].to_numpy(float)
            if len(part) >= 2 and np.ptp(x) > 0:
                slope, icpt = np.polyfit(x, y, 1)
                r = np.corrcoef(x, y)[0, 1]
                xx = np.linspace(x.min(), x.max(), 50)
                ax.plot(xx, slope * xx + icpt, color="black", linewidth=1, label=f"fit r={r:.2f}")
                ax.legend(fontsize=7, loc="upper left")
        if i == 0:
            apply_scale(ax, scale, ok_all["cev"])
        ax.set_title(str(layer))
        ax.set_xlabel("SVCCA distance")
        ax.set_ylabel(scale_label("CEV", scale) if i % cols == 0 else "")
    if note:
        fig.text(0.01, 0.1 / height, note, fontsize=8, color="#444")
    right = 1 - 2.2 / fig.get_figwidth()
    adjust(fig, left=1.2 / fig.get_figwidth(), right=right, wspace=0.3,
            top=1 - 0.35 / height, bottom=(0.5 + foot) / height, hspace=0.5)
    if sc is not None:
        top, bottom = 1 - 0.35 / height, (0.5 + foot) / height
        cax = fig.add_axes((right + 0.15 / fig.get_figwidth(), bottom, 0.14 / fig.get_figwidth(), top - bottom))
        cbar = fig.colorbar(sc, cax=cax, ticks=range(len(pops)))
        cbar.ax.set_yticklabels(pops, fontsize=8)
        cbar.ax.tick_params(length=0)
        cbar.set_label("population (method/level)")
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
        Two panels (FPR, FNR); each has one bar container per population
        (label ``method/level``) with one bar per group, and the figure one
        legend to the right. The y axis is symmetric-log when the changes
        and their intervals span an order of magnitude.
    """
    keys = sorted(groups, key=lambda k: (k[0], level_sort_key(k[1])))
    names = list(groups[keys[0]]["names"]) if keys else []
    rotate = len(names) > 6 or max((len(str(s)) for s in names), default=0) > 14
    foot = 0.3
    height = 4.2 + (0.6 if rotate else 0) + foot
    fig = Figure(figsize=(14, height))
    vals_all = []
    for d in groups.values():
        for rate in ("fpr", "fnr"):
            vals_all.append(np.asarray(d[f"{rate}_change"], float).ravel())
            if d.get(f"{rate}_ci") is not None:
                vals_all += [np.asarray(c, float).ravel() for c in d[f"{rate}_ci"]]
    scale = value_scale(np.concatenate(vals_all)) if vals_all else ("linear", None)
    note = scale_note("normalised change", scale)
    first = None
    for p, rate in enumerate(("fpr", "fnr")):
        ax = fig.add_subplot(1, 2, p + 1, sharey=first)
        first = first or ax
        if not keys:
            ax.set_title(f"group {rate.upper()} change (no groups)")
            continue
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
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30 if rotate else 0,
                      ha="right" if rotate else "center", fontsize=8)
        ax.set_xlabel("group")
        ax.axhline(0, color="grey", linewidth=0.5)
        if p == 0:
            apply_scale(ax, scale, np.concatenate(vals_all))
            ax.set_ylabel(scale_label("normalised change (%)", scale))
        ax.set_title(f"group {rate.upper()} change vs baseline (95% CI)")
    if keys:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, title="population", title_fontsize=8, frameon=False)
    if note:
        fig.text(0.01, 0.1 / height, note, fontsize=8, color="#444")
    adjust(fig, left=0.06, right=1 - 1.9 / 14, wspace=0.18, top=1 - 0.4 / height,
            bottom=(foot + (1.0 if rotate else 0.5)) / height)
    return fig


def cie_gallery(images: list[np.ndarray], captions: list[str], *, columns: int = 8, title: str = "") -> Figure:
    """A grid of CIE images with captions.

    Parameters
    ----------
    images : list of numpy.ndarray
        ``(C, H, W)`` or ``(H, W)`` arrays in [0, 1].
    captions : list of str
        One per image (label and both populations' predictions); a caption
        may have several lines.
    columns : int
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        One image axes per example; the title sits in a band of its own
        above the first row's captions.
    """
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    cap_lines = max((str(c).count("\n") + 1 for c in captions), default=1)
    cap_in = cap_lines * 7 * 1.3 / 72 + 0.15  # caption height in inches (7 pt)
    title_in = 0.4 if title else 0.05
    cell_w, img_in = 1.8, 1.45
    height = title_in + rows * (img_in + cap_in) + 0.1
    fig = Figure(figsize=(cell_w * cols, height))
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, cols, i + 1)
        arr = np.asarray(img, float)
        if arr.ndim == 3:
            arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
        ax.imshow(np.clip(arr, 0, 1), cmap="gray" if arr.ndim == 2 else None)
        ax.set_title(cap, fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, y=1 - 0.06 / height, fontsize=11)
    top = 1 - (title_in + cap_in) / height
    adjust(fig, left=0.02, right=0.98, bottom=0.1 / height, top=top, wspace=0.1, hspace=cap_in / img_in)
    return fig
