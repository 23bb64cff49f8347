"""Axes and scales shared by the audit's figures (:mod:`compbias.platform.audit.figures`).

How a level is placed on an axis, when a value axis goes log or symlog (and
the note that says so), colours per method and per population, the ellipse of
a point cloud, fixed margins and PNG rendering.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator  # noqa: E402

from compbias.platform.audit.population import level_sort_key  # noqa: E402

CHI2_2DOF_95 = 5.991464547107979  # 95% quantile of chi-square with 2 degrees of freedom
SPAN_FOR_LOG = 10.0  # largest/smallest non-zero magnitude from which an axis goes logarithmic
MAX_DECADES = 3  # a symlog axis shows at most this many decades above its linear part


def method_colors(methods) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(sorted(set(methods)))}


def is_number(level: str) -> bool:
    try:
        float(level)
    except ValueError:
        return False
    return True


def value_scale(values) -> tuple[str, float | None]:
    """The y scale for values that may span orders of magnitude.

    Parameters
    ----------
    values : array-like
        Every value the axis shows (NaN and inf are ignored).

    Returns
    -------
    (scale, linthresh)
        ``("linear", None)`` when the non-zero magnitudes span less than
        :data:`SPAN_FOR_LOG`; ``("log", None)`` when they do and every value
        is positive; else ``("symlog", t)`` with ``t`` a power of ten at or
        below the smallest non-zero magnitude (at most :data:`MAX_DECADES`
        below the largest), so zero and negative values stay on the axis.
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    a = np.abs(v[v != 0])
    if a.size == 0 or a.max() / a.min() < SPAN_FOR_LOG:
        return "linear", None
    if (v > 0).all():
        return "log", None
    floor = max(a.min(), a.max() / 10 ** MAX_DECADES)
    return "symlog", float(10 ** math.floor(math.log10(floor)))


def plain_number(v: float, _pos=None) -> str:
    """Short tick text a reader need not decode: 0, 10, 1k, 100k, 1M, -100, 0.1."""
    a = abs(v)
    text = f"{a / 1e6:g}M" if a >= 1e6 else f"{a / 1e3:g}k" if a >= 1e3 else f"{a:g}"
    return ("\u2212" if v < 0 else "") + text


def apply_scale(ax, scale: tuple[str, float | None], values=None) -> None:
    """Set the y scale; a symlog axis gets ticks at 0 and at whole decades only, so none collide."""
    kind, thresh = scale
    if kind == "log":
        ax.set_yscale("log")
        v = np.asarray(values if values is not None else [], float).ravel()
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
            ax.yaxis.set_major_locator(FixedLocator([10.0 ** k for k in range(lo, hi + 1)]))
            ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(10.0 ** lo / 1.3, 10.0 ** hi * 1.3)  # whole decades: at least two labelled ticks
    elif kind == "symlog":
        ax.set_yscale("symlog", linthresh=thresh, linscale=1.0)
        v = np.asarray(values if values is not None else [], float).ravel()
        v = v[np.isfinite(v)]
        lo = int(round(math.log10(thresh)))
        ticks = [0.0]
        for sign in (1, -1):
            side = v[v * sign > 0] * sign
            if side.size:
                top = max(lo, math.ceil(math.log10(side.max())))
                ticks += [sign * 10.0 ** k for k in range(lo, top + 1)]
        ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
        ax.yaxis.set_major_formatter(FuncFormatter(plain_number))


def scale_note(name: str, scale: tuple[str, float | None]) -> str | None:
    """One line saying how to read a log or symlog axis (None for linear)."""
    kind, thresh = scale
    if kind == "log":
        return f"{name}: log axis."
    if kind == "symlog":
        return f"{name}: symmetric log axis, linear within ±{thresh:g}; a value of 0 (no change) is drawn at 0."
    return None


def scale_label(label: str, scale: tuple[str, float | None]) -> str:
    return label if scale[0] == "linear" else f"{label} ({scale[0]})"


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


def figure_legend(fig: Figure, top_in: float) -> None:
    """One legend for the whole figure, in a band under the title (labels deduplicated, in order)."""
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 1 - top_in / fig.get_figheight()))


def level_positions(levels: list[str]) -> tuple[list[float], bool]:
    try:
        return [float(v) for v in levels], True
    except ValueError:
        return list(range(len(levels))), False


def use_logit(values: list[float]) -> bool:
    """Sparsity-like levels in (0, 1) reaching 0.9 or more: a logit axis keeps 0.9, 0.95, 0.99 apart."""
    return bool(values) and all(0 < v < 1 for v in values) and max(values) >= 0.9 and len(set(values)) > 1


def level_axis(ax, levels: list[str]) -> dict[str, float]:
    """Place and label every level on the x axis; return each level's position.

    Numeric levels sit at their values (on a logit axis when they are
    sparsities up to 0.9 or more), named levels at 0, 1, 2...; every level
    gets a tick with its name.
    """
    levels = sorted(set(levels), key=level_sort_key)
    pos, numeric = level_positions(levels)
    where = dict(zip(levels, pos))
    if numeric and use_logit(pos):
        ax.set_xscale("logit")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        lg = [math.log(p / (1 - p)) for p in pos]
        pad = 0.25 * max(max(lg) - min(lg), 1.0)
        lo, hi = min(lg) - pad, max(lg) + pad
        ax.set_xlim(1 / (1 + math.exp(-lo)), 1 / (1 + math.exp(-hi)))
        ax.set_xlabel("level (logit axis)")
    elif numeric:
        span = (max(pos) - min(pos)) or 1.0
        ax.set_xlim(min(pos) - 0.12 * span, max(pos) + 0.12 * span)
        ax.set_xlabel("level")
    else:
        ax.set_xlim(-0.5, len(pos) - 0.5)
        ax.set_xlabel("level")
    ax.set_xticks(pos, levels)
    return where


def population_colors(names: list[str]) -> tuple[ListedColormap, BoundaryNorm]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = [cmap(i % cmap.N) for i in range(len(names))]
    return ListedColormap(colors), BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))


def adjust(fig: Figure, **kw) -> None:
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
