"""Figures a reviewer can read: every level named on its axis, log axes where values span
orders of magnitude (with a note on zeros), colour bars that name populations, and no text
drawn over other text or over another panel.

The overlap check measures the text boxes matplotlib actually draws (tick labels, titles,
axis labels, legends, colour bars, notes), so a layout change that makes a caption run into
a title fails here, as the CIE gallery's title did.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.text import Text

from compbias.platform.audit import figures as F
from tests.platform.audit.test_figures import synthetic_outcome
from compbias.platform.audit.synthetic import SyntheticStudy

MIXED = {"magnitude": ["0.5", "0.9", "0.95"], "magnitude+kd": ["0.9"], "quantize": ["int8_static"]}


@pytest.fixture(scope="module")
def mixed_outcome():
    """Sparsities and a named quantization mode in one study, as the digits demo has."""
    return synthetic_outcome(SyntheticStudy(n_examples=400, seeds=3, methods=MIXED))


def similarity_frame(outcome) -> pd.DataFrame:
    """A similarity table like the audit's: per-model CEV (0 for int8, up to ~1e5) per layer."""
    models = outcome.tables["models"]
    rows = []
    rng = np.random.default_rng(0)
    for _, m in models[models["role"] == "compressed"].iterrows():
        cev = 0.0 if m["method"] == "quantize" else float(m["cev"] or 0.0) + 10
        for layer in ("block1", "block2", "block3", "logits"):
            rows.append({"version": m["version"], "method": m["method"], "level": m["level"], "layer": layer,
                         "svcca_distance": rng.uniform(0, 0.4), "cev": cev})
    return pd.DataFrame(rows)


def gallery_figure():
    imgs = [np.random.default_rng(i).random((1, 8, 8)) for i in range(12)]
    caps = [f"#{100 + i}  label {i % 10}\nbaseline {i % 10}, compressed 5" for i in range(12)]
    return F.cie_gallery(imgs, caps, title="top CIE examples, magnitude at 0.95")


def all_figures(outcome) -> dict:
    return {
        "class_changes": F.class_change_scatter(outcome.plots["class_changes"]),
        "level_curves": F.level_curves(outcome.tables["bias"]),
        "group_changes": F.group_changes(outcome.plots["groups"]),
        "cev_vs_svcca": F.cev_vs_svcca(similarity_frame(outcome)),
        "gallery": gallery_figure(),
    }


def _in_view(axis, loc) -> bool:
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * max(1.0, abs(hi - lo))
    return lo - tol <= loc <= hi + tol


def drawn_texts(fig):
    """Every non-empty text the renderer draws, with the axes it belongs to (None: the figure)."""
    FigureCanvasAgg(fig).draw()
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.get_visible() or not ax.axison:
                continue
            for ticks in (axis.get_major_ticks(), axis.get_minor_ticks()):
                for t in ticks:
                    if _in_view(axis, t.get_loc()):
                        out += [(lab, ax) for lab in (t.label1, t.label2) if lab.get_visible()]
            out.append((axis.label, ax))
        out += [(ax.title, ax), (ax._left_title, ax), (ax._right_title, ax)]
        out += [(t, ax) for t in ax.texts]
        if ax.get_legend() is not None:
            out += [(t, ax) for t in ax.get_legend().get_texts()]
    out += [(t, None) for t in fig.texts]
    if fig._suptitle is not None:
        out.append((fig._suptitle, None))
    for leg in fig.legends:
        out += [(t, None) for t in leg.get_texts()] + [(leg.get_title(), None)]
    seen, unique = set(), []
    for t, owner in out:
        if isinstance(t, Text) and id(t) not in seen and t.get_visible() and t.get_text().strip():
            seen.add(id(t))
            unique.append((t, owner))
    return unique


def overlaps(a, b, pad: float = 1.0) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > pad) and (min(a.y1, b.y1) - max(a.y0, b.y0) > pad)


def layout_problems(fig) -> list[str]:
    texts = drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    boxes = [(t, owner, t.get_window_extent(renderer)) for t, owner in texts]
    problems = []
    for t, _, b in boxes:
        if b.x0 < -1 or b.y0 < -1 or b.x1 > W + 1 or b.y1 > H + 1:
            problems.append(f"{t.get_text()!r} is cut off by the figure's edge")
    for (t1, _, b1), (t2, _, b2) in itertools.combinations(boxes, 2):
        if overlaps(b1, b2):
            problems.append(f"{t1.get_text()!r} overlaps {t2.get_text()!r}")
    areas = [(ax, ax.get_window_extent(renderer)) for ax in fig.axes if ax.get_visible()]
    for t, owner, b in boxes:
        for ax, area in areas:
            if ax is not owner and overlaps(b, area):
                problems.append(f"{t.get_text()!r} is drawn over another panel ({ax.get_title() or ax.get_label()!r})")
    return problems


def test_no_text_overlaps_other_text_or_another_panel_in_any_figure(mixed_outcome):
    for name, fig in all_figures(mixed_outcome).items():
        assert layout_problems(fig) == [], name


def test_the_overlap_check_sees_a_title_over_captions():
    """The check itself: the old gallery layout (title in the captions' band) is caught."""
    fig = gallery_figure()
    fig.suptitle(fig._suptitle.get_text(), y=1 - 0.5 / fig.get_figheight())  # lowered into the first row's captions
    assert any("top CIE examples" in p for p in layout_problems(fig))


def test_every_level_is_named_on_its_axis_sparsities_numeric_modes_by_name(mixed_outcome):
    fig = F.level_curves(mixed_outcome.tables["bias"])
    assert len(fig.axes) == 8  # one row for sparsities, one for named modes
    top, bottom = fig.axes[0], fig.axes[4]
    assert [t.get_text() for t in top.get_xticklabels()] == ["0.5", "0.9", "0.95"]
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["int8_static"]
    lines = {ln.get_label(): ln for ax in (top, bottom) for ln in ax.get_lines()}
    assert list(lines["magnitude"].get_xdata()) == [0.5, 0.9, 0.95]  # sparsities at their values
    assert list(lines["quantize"].get_xdata()) == [0]
    # 0.9 and 0.95 stay apart: a logit axis for sparsities up to 0.95
    assert top.get_xscale() == "logit"
    x = top.transData.transform([(0.9, 0.95), (0.95, 0.95)])[:, 0]
    assert x[1] - x[0] > 20  # pixels
    # one y axis per quantity across both rows, so int8 is read against the sparsities
    assert bottom.get_ylim() == top.get_ylim()
    # the baseline accuracy is drawn to compare with
    base = [ln for ln in top.get_lines() if ln.get_label() == "baseline"]
    bias = mixed_outcome.tables["bias"]
    assert len(base) == 1 and base[0].get_ydata()[0] == pytest.approx((bias["acc"] + bias["acc_drop"] / 100).mean())


def test_cev_spanning_orders_of_magnitude_is_on_a_symlog_axis_that_shows_zero():
    bias = pd.DataFrame({"method": ["magnitude"] * 3 + ["quantize"], "level": ["0.5", "0.9", "0.95", "int8_static"],
                         "acc": [0.98, 0.96, 0.93, 0.977], "acc_drop": [0.0, 1.3, 5.0, 0.0], "pie": [1, 6, 21, 0],
                         "cev": [3.1e3, 1.5e4, 1.24e5, 0.0], "sde": [52.0, 72.0, 272.0, 0.0]})
    fig = F.level_curves(bias)
    cev_ax = next(a for a in fig.axes if a.get_title() == "CEV")
    acc_ax = next(a for a in fig.axes if a.get_title() == "accuracy")
    assert cev_ax.get_yscale() == "symlog" and acc_ax.get_yscale() == "linear"
    FigureCanvasAgg(fig).draw()
    ticks = [t.get_text() for t in cev_ax.get_yticklabels()]
    assert ticks[0] == "0" and "100k" in ticks
    # the smallest non-zero CEV is not squashed onto zero: at least a tenth of the axis above it
    y0, y1, y3k = cev_ax.transData.transform([(0.5, 0.0), (0.5, 1.24e5), (0.5, 3.1e3)])[:, 1]
    assert (y3k - y0) > 0.1 * (y1 - y0)
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "CEV" in notes and "0 (no change)" in notes
    # a linear-range quantity stays linear
    assert next(a for a in fig.axes if a.get_title() == "PIE count").get_yscale() == "linear"


@pytest.mark.parametrize("values,kind", [
    ([0.0, 3e3, 1.2e5], "symlog"),
    ([1.8e3, 2.6e5], "log"),
    ([50.0, 72.0, 270.0], "linear"),
    ([-20.0, 0.0, 1350.0], "symlog"),
    ([0.0, 0.0], "linear"),
])
def test_value_scale(values, kind):
    assert F.value_scale(values)[0] == kind


def test_cev_vs_svcca_colour_bar_names_each_population(mixed_outcome):
    sim = similarity_frame(mixed_outcome)
    fig = F.cev_vs_svcca(sim)
    cbar_ax = fig.axes[-1]
    FigureCanvasAgg(fig).draw()
    names = [t.get_text() for t in cbar_ax.get_yticklabels()]
    assert names == ["magnitude/0.5", "magnitude/0.9", "magnitude/0.95", "magnitude+kd/0.9", "quantize/int8_static"]
    ax = fig.axes[0]
    pts = next(c for c in ax.collections if isinstance(c, PathCollection))
    part = sim[sim["layer"] == "block1"]
    # each point's colour code is its population's position on the colour bar
    assert [names[int(c)] for c in pts.get_array()] == [f"{m}/{lv}" for m, lv in zip(part["method"], part["level"])]
    assert ax.get_yscale() == "symlog"  # CEV 0 (int8) to ~1e4
