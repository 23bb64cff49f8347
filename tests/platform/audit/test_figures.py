"""The figures hold what they claim: points per class, ellipses, centroids, lines per method."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.patches import Ellipse

from compbias.platform.audit import figures as F
from compbias.platform.audit.compute import AuditSettings, audit_study
from compbias.platform.audit.fetch import Fetched
from compbias.platform.audit.population import build_study_data
from compbias.platform.audit.selection import VersionRecord
from compbias.platform.audit.synthetic import SyntheticStudy, make_predictions
from compbias.platform.audit import tags as T


def synthetic_outcome(spec=None):
    spec = spec or SyntheticStudy(n_examples=400, seeds=3)
    fetched, targets, v = [], [], 0
    for seed in range(spec.seeds):
        v += 1
        base_v = str(v)
        rec = VersionRecord("m", base_v, f"r{v}", {T.STUDY: "s", T.ROLE: "baseline", T.SEED: str(seed)})
        fetched.append(Fetched(rec, make_predictions(spec, seed)))
        targets.append(rec)
        for method, levels in spec.methods.items():
            for level in levels:
                v += 1
                rec = VersionRecord("m", str(v), f"r{v}", {T.STUDY: "s", T.ROLE: "compressed", T.METHOD: method, T.LEVEL: level,
                                                           T.SEED: str(seed), T.BASELINE_VERSION: base_v})
                fetched.append(Fetched(rec, make_predictions(spec, seed, method, level)))
                targets.append(rec)
    data = build_study_data(fetched, declared_groups=["ink"])
    return audit_study(data, targets, AuditSettings(bootstrap=30))


def scatters(ax):
    return {c.get_label(): c for c in ax.collections if isinstance(c, PathCollection)}


def test_class_change_scatter_has_one_point_per_class_an_ellipse_and_a_centroid_per_method():
    out = synthetic_outcome()
    changes = out.plots["class_changes"]
    fig = F.class_change_scatter(changes)
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["level 0.5", "level 0.9"]
    ax09 = axes[1]
    sc = scatters(ax09)
    assert set(sc) == {"magnitude", "magnitude centroid", "magnitude+kd", "magnitude+kd centroid"}
    for method in ("magnitude", "magnitude+kd"):
        d = changes[(method, "0.9")]
        defined = np.isfinite(d["delta_fpr"]) & np.isfinite(d["delta_fnr"])
        offsets = sc[method].get_offsets()
        assert len(offsets) == defined.sum() == 10  # every class has a defined change here
        np.testing.assert_allclose(offsets[:, 0], d["delta_fpr"][defined])
        np.testing.assert_allclose(sc[f"{method} centroid"].get_offsets()[0], [d["delta_fpr"].mean(), d["delta_fnr"].mean()])
    ellipses = [p for p in ax09.patches if isinstance(p, Ellipse)]
    assert len(ellipses) == 2
    # the unmitigated method's ellipse is the larger one (the distilled models err more evenly)
    big = max(ellipses, key=lambda e: e.width * e.height)
    assert np.allclose(big.get_edgecolor()[:3], sc["magnitude"].get_facecolor()[0][:3])


def test_confidence_ellipse_holds_about_95_percent_of_gaussian_points():
    rng = np.random.default_rng(0)
    pts = rng.multivariate_normal([1, 2], [[4, 1.5], [1.5, 1]], size=4000)
    e = F.confidence_ellipse(pts[:, 0], pts[:, 1])
    c, a, b = np.array(e.center), e.width / 2, e.height / 2
    t = np.deg2rad(e.angle)
    d = pts - c
    u = d[:, 0] * np.cos(t) + d[:, 1] * np.sin(t)
    v = -d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)
    frac = np.mean((u / a) ** 2 + (v / b) ** 2 <= 1)
    assert 0.93 < frac < 0.97
    assert F.confidence_ellipse(np.array([1.0, 2.0]), np.array([1.0, 2.0])) is None


def test_level_curves_one_line_per_method_one_point_per_level():
    out = synthetic_outcome()
    fig = F.level_curves(out.tables["bias"])
    assert [a.get_title() for a in fig.axes] == ["accuracy", "PIE count", "CEV", "SDE"]
    cev_ax = fig.axes[2]
    lines = {l.get_label(): l for l in cev_ax.get_lines()}
    assert set(lines) == {"magnitude", "magnitude+kd"}
    assert list(lines["magnitude"].get_xdata()) == [0.5, 0.9]
    bias = out.tables["bias"].set_index(["method", "level"])
    np.testing.assert_allclose(lines["magnitude"].get_ydata(), [bias.loc[("magnitude", "0.5"), "cev"], bias.loc[("magnitude", "0.9"), "cev"]])
    # categorical levels (quantization) are placed by position with their names as ticks
    q = pd.DataFrame({"method": ["quantize", "quantize"], "level": ["fp16", "int8_static"], "acc": [0.9, 0.8],
                      "pie": [1, 2], "cev": [1.0, 2.0], "sde": [1.0, 2.0]})
    fig2 = F.level_curves(q)
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()] == ["fp16", "int8_static"]


def test_group_changes_bars_per_population_and_group_with_ci():
    out = synthetic_outcome()
    fig = F.group_changes(out.plots["groups"])
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3 and all(len(b.patches) == 2 for b in bars)  # 3 populations x groups ink=0, ink=1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ink=0", "ink=1"]
    # error bars are drawn (the bootstrap CI)
    assert any(c.has_yerr for c in ax.containers if hasattr(c, "has_yerr"))


def test_cev_vs_svcca_points_and_fit():
    sim = pd.DataFrame({
        "layer": ["block1"] * 4 + ["logits"] * 4,
        "svcca_distance": [0.1, 0.2, 0.3, 0.4, 0.05, 0.1, 0.2, 0.25],
        "cev": [1.0, 2.1, 2.9, 4.2, 1.0, 2.1, 2.9, 4.2],
        "level": ["0.5", "0.5", "0.9", "0.9"] * 2,
    })
    fig = F.cev_vs_svcca(sim)
    main_axes = [a for a in fig.axes if a.get_title() in ("block1", "logits")]
    assert len(main_axes) == 2
    for ax in main_axes:
        pts = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert len(pts[0].get_offsets()) == 4
        fit = [l for l in ax.get_lines() if l.get_label().startswith("fit r=")]
        assert len(fit) == 1 and float(fit[0].get_label().split("=")[1]) > 0.95


def test_gallery_one_axes_per_image():
    imgs = [np.random.default_rng(i).random((1, 8, 8)) for i in range(5)]
    fig = F.cie_gallery(imgs, [f"#{i}" for i in range(5)], columns=3)
    assert len(fig.axes) == 5 and fig.axes[4].get_title() == "#4"
    assert F.to_png(fig)[:4] == b"\x89PNG"
