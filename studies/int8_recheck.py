"""Re-check a study's logged int8_static models against the current int8 path (torch.ao).

The int8 models of the studies in docs/results.md were built by compbias's
first int8 implementation (an exact integer simulation, now
``compbias.jobs.quantize.simulate_int8``). ``int8_static`` now runs on
``torch.ao.quantization`` (eager mode, real int8 kernels; every layer
requantizes its output except the classifier, whose int32 accumulator is
dequantized to float32 logits). This script, for every seed of a study:

1. downloads the registered baseline version and the logged int8 version of
   that seed from the MLflow store (read only: nothing is logged or changed),
2. checks that the logged int8 model, loaded with the current code, still
   gives the logged ``predictions.parquet`` on the rebuilt test split
   (so example ids and data line up),
3. rebuilds the int8 model from the baseline with the current code exactly
   as the study's compress task does (``compbias.platform.tasks.execute_task``
   with the study's own task, which calls ``compbias.jobs.compress_model``:
   same calibration sample, same seed), and evaluates it on the same test
   split,
4. checks that the new model's activation scales come from the same
   calibration ranges as the logged model's (their ratio must be the ratio of
   the two activation grids, e.g. 255/127 for the x86 engine's 7 bits).

With ``--engine-variant ENGINE`` it also rebuilds every seed's model on
another quantized engine (``qnnpack``: full 8-bit activations where x86
uses 7) from the same baseline and calibration sample, and reports that
population as a variant.

It then compares the populations (all seeds pooled, as the audit and
``results_tables.py`` do): accuracy of the logged (old) and rebuilt (new) int8
models, the share of predictions that agree, PIE counts, and the normalised
FPR/FNR change of every Male/Young group against the baselines, old and new
and new minus old. Intervals are 95% percentile-bootstrap intervals over test
examples with the populations held fixed (1,000 resamples of
``compbias.metrics.bootstrap_indices``, seed 0), as in ``results_tables.py``;
differences are paired (both on the same resample).

Usage::

    source $STUDIES/env.sh
    MLFLOW_TRACKING_URI=sqlite:///$STUDIES/mlflow-celeba.db \\
      python studies/int8_recheck.py --study celeba-blond \\
      --engine-variant qnnpack --json $STUDIES/int8-recheck-celeba-blond.json

Runs in well under a minute per seed on one core (ResNet-20 at 16x16, 2,500
test images); torch uses one thread by default, as the study's Ray workers did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_tables as rt  # noqa: E402  (ci, fmt, fmt_ci, B, SEED)

from compbias.contract import PREFIX as TAG  # noqa: E402  the contract owns tag names


# --------------------------------------------------------------------- store access (read only)


def find_versions(client, registered_model: str, study: str, method: str, level: str) -> dict[int, dict[str, Any]]:
    """The registered baseline and compressed versions of every seed of a study.

    Parameters
    ----------
    client : mlflow.tracking.MlflowClient
    registered_model : str
    study : str
        Value of the versions' ``compbias.study`` tag.
    method, level : str
        The compressed population to re-check (e.g. ``quantize``, ``int8_static``).

    Returns
    -------
    dict
        ``seed -> {"baseline": ModelVersion, "compressed": ModelVersion}``; seeds
        with both only.

    Raises
    ------
    SystemExit
        When the registered model has no such versions, naming what it has.
    """
    try:
        versions = list(client.search_model_versions(f"name = '{registered_model}'"))
    except Exception as exc:  # noqa: BLE001 - mlflow raises several kinds
        raise SystemExit(f"cannot read registered model {registered_model!r} from {client.tracking_uri}: {exc}") from None
    by_seed: dict[int, dict[str, Any]] = {}
    seen = set()
    for v in versions:
        t = v.tags or {}
        if t.get(f"{TAG}study") != study or f"{TAG}seed" not in t:
            continue
        seen.add((t.get(f"{TAG}method"), t.get(f"{TAG}level")))
        role = "baseline" if t.get(f"{TAG}role") == "baseline" else (
            "compressed" if (t.get(f"{TAG}method"), t.get(f"{TAG}level")) == (method, level) else None)
        if role is None:
            continue
        slot = by_seed.setdefault(int(t[f"{TAG}seed"]), {})
        if role in slot and int(slot[role].version) > int(v.version):
            continue
        slot[role] = v
    complete = {s: d for s, d in sorted(by_seed.items()) if "baseline" in d and "compressed" in d}
    if not complete:
        have = ", ".join(f"{m}@{lv}" for m, lv in sorted(seen, key=str)) or "none"
        raise SystemExit(f"no seed of study {study!r} in {registered_model!r} has both a baseline and a {method}@{level} "
                         f"version (populations there: {have}); check --study, --method and --level")
    for s, d in complete.items():
        bv = (d["compressed"].tags or {}).get(f"{TAG}baseline_version")
        if bv is not None and str(bv) != str(d["baseline"].version):
            raise SystemExit(f"seed {s}: the {method}@{level} version {d['compressed'].version} was made from baseline "
                             f"version {bv}, but the newest registered baseline is {d['baseline'].version}")
    return complete


def download_model_files(registered_model: str, version: str) -> dict[str, bytes]:
    """The saved-model files of one registered version (``compbias.platform.tracking.version_model_files``)."""
    from compbias.platform.tracking import version_model_files

    try:
        return version_model_files(registered_model, version)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from exc


def run_artifact(run_id: str, path: str, dst: Path) -> Path:
    """Download one artifact of a run into ``dst``."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst / run_id)))


def load_files(files: dict[str, bytes]):
    """A model from its files, through ``compbias.jobs.load_model``."""
    from compbias import jobs
    from compbias.platform.tasks import write_model_files

    with tempfile.TemporaryDirectory(prefix="int8-recheck-") as tmp:
        write_model_files(files, tmp)
        return jobs.load_model(tmp)


# --------------------------------------------------------------------- checks on the models


def activation_scales(model) -> dict[str, float]:
    """Input scale of every int8_static layer, by layer name (old simulated or torch.ao modules)."""
    from compbias.jobs.quantize import Int8LinearFloatOut, Int8StaticLayer, QuantizedConv2d, QuantizedLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8StaticLayer):
            out[name] = float(m.quant.scale)
        elif isinstance(m, Int8LinearFloatOut):
            out[name] = float(m.input_scale)
        elif isinstance(m, (QuantizedConv2d, QuantizedLinear)) and getattr(m, "mode", None) == "int8_static":
            out[name] = float(m.input_scale)
    return out


def logit_output(model) -> str:
    """What the classifier outputs: ``float32`` (float-output int8 classifier), else the output quantum of the
    last requantizing torch.ao layer (the logits' grid step when it is the classifier), else ``-``."""
    from compbias.jobs.quantize import Int8LinearFloatOut, Int8StaticLayer

    mods = [m for m in model.modules() if isinstance(m, (Int8StaticLayer, Int8LinearFloatOut))]
    if not mods:
        return "-"
    last = mods[-1]
    return "float32 (not requantized)" if isinstance(last, Int8LinearFloatOut) else f"uint8, quantum {float(last.layer.scale):.4f}"


def grid_steps(record: dict[str, Any]) -> int:
    """Number of activation quantisation steps of a quantization record (255 for full uint8)."""
    act = record.get("activation") or {}
    lo, hi = act.get("range", [0, 255])
    return int(hi) - int(lo)


# --------------------------------------------------------------------- pooled rates with bootstrap


class Pooled:
    """Pooled rates of populations on one test set, with bootstrap resamples as count weights.

    Parameters
    ----------
    y : ndarray of int, shape (n,)
    n_resamples : int
    seed : int
    """

    def __init__(self, y: np.ndarray, n_resamples: int, seed: int):
        import compbias.metrics as M

        self.y = np.asarray(y)
        n = len(self.y)
        idx = M.bootstrap_indices(n, n_resamples, seed=seed)
        self.W = np.stack([np.bincount(r, minlength=n) for r in idx]).astype(np.float64)

    def rate(self, hits: np.ndarray, n_models: int, mask: np.ndarray) -> tuple[float, np.ndarray]:
        """Share of (model, example) pairs that are hits among the examples in ``mask``.

        Parameters
        ----------
        hits : ndarray, shape (n,)
            Number of models with a hit on each example.
        n_models : int
        mask : ndarray of bool, shape (n,)

        Returns
        -------
        point : float
        boot : ndarray, shape (B,)
            NaN where a resample has no example in ``mask``.
        """
        h = np.where(mask, hits, 0).astype(np.float64)
        den = self.W @ mask.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (self.W @ h) / (n_models * den)
        point = float(h.sum() / (n_models * mask.sum())) if mask.any() else float("nan")
        return point, boot


def change(comp, base):
    """Normalised change in percent of the baseline rate (NaN where the baseline rate is 0)."""
    comp, base = np.asarray(comp, float), np.asarray(base, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base > 0, (comp - base) / base * 100.0, np.nan)


def group_masks(frame: pd.DataFrame, attrs: list[str]) -> dict[str, np.ndarray]:
    """Masks of the audit's groups: each attribute's values, then every pair's intersections.

    Parameters
    ----------
    frame : pandas.DataFrame
        Test predictions with the group columns.
    attrs : list of str

    Returns
    -------
    dict
        ``"Male=0" -> mask``, ..., ``"Male=0&Young=1" -> mask``.
    """
    out: dict[str, np.ndarray] = {}
    for a in attrs:
        for v in sorted(frame[a].unique()):
            out[f"{a}={v}"] = frame[a].to_numpy() == v
    for i, a in enumerate(attrs):
        for b in attrs[i + 1:]:
            for va in sorted(frame[a].unique()):
                for vb in sorted(frame[b].unique()):
                    out[f"{a}={va}&{b}={vb}"] = (frame[a].to_numpy() == va) & (frame[b].to_numpy() == vb)
    return out


def summary_stats(lo_hi: tuple[float, float], point: float) -> dict[str, float]:
    """``{"value": point, "ci_low": lo, "ci_high": hi}``."""
    return {"value": point, "ci_low": lo_hi[0], "ci_high": lo_hi[1]}


def compare(y: np.ndarray, frame: pd.DataFrame, attrs: list[str], positive: int, n_classes: int,
            base: np.ndarray, old: np.ndarray, new: np.ndarray, n_resamples: int, seed: int,
            old_prob: np.ndarray | None = None, new_prob: np.ndarray | None = None) -> dict[str, Any]:
    """Pooled comparison of the old and new compressed populations against the baselines.

    Parameters
    ----------
    y : ndarray, shape (n,)
        Labels.
    frame : pandas.DataFrame
        The test predictions' frame (group columns).
    attrs : list of str
        Group attributes.
    positive : int
        The positive class of the group FPR/FNR.
    n_classes : int
    base, old, new : ndarray of int, shape (n_models, n)
        Predictions, seeds in the same order.
    n_resamples, seed : int
        Bootstrap settings.
    old_prob, new_prob : ndarray of float, shape (n_models, n), optional
        The logged ``prob`` (softmax probability of the prediction); in a
        binary task exactly 0.5 means the two logits were equal, a tie that
        ``argmax`` resolves to class 0.

    Returns
    -------
    dict
        ``accuracy``, ``agreement``, ``flips``, ``changes_vs_baseline``,
        ``pie``, ``groups`` and ``men_minus_women`` entries, each with points
        and 95% intervals where they apply.
    """
    import compbias.metrics as M

    P = Pooled(y, n_resamples, seed)
    k = base.shape[0]
    everything = np.ones(len(y), bool)
    out: dict[str, Any] = {"n_models": int(k), "n_examples": int(len(y)), "bootstrap": n_resamples, "bootstrap_seed": seed}

    acc = {}
    for name, preds in (("baseline", base), ("old", old), ("new", new)):
        acc[name] = P.rate((preds == y).sum(0), k, everything)
    out["accuracy"] = {name: summary_stats(rt.ci(b), p) for name, (p, b) in acc.items()}
    out["accuracy"]["new_minus_old"] = summary_stats(rt.ci(acc["new"][1] - acc["old"][1]), acc["new"][0] - acc["old"][0])
    out["accuracy"]["old_minus_baseline"] = summary_stats(rt.ci(acc["old"][1] - acc["baseline"][1]), acc["old"][0] - acc["baseline"][0])
    out["accuracy"]["new_minus_baseline"] = summary_stats(rt.ci(acc["new"][1] - acc["baseline"][1]), acc["new"][0] - acc["baseline"][0])

    agree = {
        "old_vs_new": P.rate((old == new).sum(0), k, everything),
        "old_vs_baseline": P.rate((old == base).sum(0), k, everything),
        "new_vs_baseline": P.rate((new == base).sum(0), k, everything),
    }
    out["agreement"] = {name: summary_stats(rt.ci(b), p) for name, (p, b) in agree.items()}
    out["agreement"]["old_vs_new_pairs_differing"] = int((old != new).sum())
    out["agreement"]["old_vs_new_examples_differing"] = int((old != new).any(0).sum())
    out["flips"] = {
        "old_right_new_wrong": int(((old == y) & (new != y)).sum()),
        "old_wrong_new_right": int(((old != y) & (new == y)).sum()),
        "both_wrong_differently": int(((old != y) & (new != y) & (old != new)).sum()),
    }
    changes = {}
    for name, preds, prob in (("old", old, old_prob), ("new", new, new_prob)):
        to_neg = (base == positive) & (preds != positive)
        to_pos = (base != positive) & (preds == positive)
        entry = {"to_positive": int(to_pos.sum()), "to_negative": int(to_neg.sum())}
        if prob is not None and n_classes == 2:
            ties = prob == 0.5
            entry.update(ties=int(ties.sum()), to_negative_ties=int((to_neg & ties).sum()), to_positive_ties=int((to_pos & ties).sum()))
        changes[name] = entry
    out["changes_vs_baseline"] = changes
    out["pie"] = {"old": int(M.pie_mask(base, old, n_classes).sum()), "new": int(M.pie_mask(base, new, n_classes).sum()),
                  "old_vs_new": int(M.pie_mask(old, new, n_classes).sum())}

    neg, pos = y != positive, y == positive
    groups = {}
    boot_changes: dict[tuple[str, str, str], np.ndarray] = {}
    for gname, gm in group_masks(frame, attrs).items():
        row: dict[str, Any] = {"size": int(gm.sum()), "negatives": int((gm & neg).sum()), "positives": int((gm & pos).sum())}
        for metric, sel, hit in (("fpr", gm & neg, lambda p: (p == positive).sum(0)),
                                 ("fnr", gm & pos, lambda p: (p != positive).sum(0))):
            rb = P.rate(hit(base), k, sel)
            ro = P.rate(hit(old), k, sel)
            rn = P.rate(hit(new), k, sel)
            co, cn = change(ro[0], rb[0]), change(rn[0], rb[0])
            bo, bn = change(ro[1], rb[1]), change(rn[1], rb[1])
            boot_changes[(gname, metric, "old")], boot_changes[(gname, metric, "new")] = bo, bn
            row[metric] = {
                "baseline": summary_stats(rt.ci(rb[1]), rb[0]),
                "old": summary_stats(rt.ci(ro[1]), ro[0]),
                "new": summary_stats(rt.ci(rn[1]), rn[0]),
                "old_change_pct": summary_stats(rt.ci(bo), float(co)),
                "new_change_pct": summary_stats(rt.ci(bn), float(cn)),
                "new_minus_old_pp": summary_stats(rt.ci(bn - bo), float(cn - co)),
            }
        groups[gname] = row
    out["groups"] = groups

    if "Male=0" in groups and "Male=1" in groups:
        mm = {}
        for which in ("old", "new"):
            d = boot_changes[("Male=1", "fpr", which)] - boot_changes[("Male=0", "fpr", which)]
            p = groups["Male=1"]["fpr"][f"{which}_change_pct"]["value"] - groups["Male=0"]["fpr"][f"{which}_change_pct"]["value"]
            mm[which] = summary_stats(rt.ci(d), p)
        out["men_minus_women_fpr_change_pp"] = mm
    return out


def groups_excluding_zero(result: dict[str, Any], which: str) -> list[str]:
    """Group rate changes (``which``: old or new) whose 95% interval excludes zero."""
    hits = []
    for g, row in result["groups"].items():
        for metric in ("fpr", "fnr"):
            c = row[metric][f"{which}_change_pct"]
            if np.isfinite(c["ci_low"]) and (c["ci_low"] > 0 or c["ci_high"] < 0):
                hits.append(f"{metric.upper()} {g} {c['value']:+.1f}% [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]")
    return hits


# --------------------------------------------------------------------- report


def _ci(d: dict[str, float], digits=2, pct=False, sign=False) -> str:
    return rt.fmt_ci(d["value"], d["ci_low"], d["ci_high"], digits, pct=pct, sign=sign)


def _variant_markdown(report: dict[str, Any]) -> list[str]:
    """The section on the int8 models rebuilt on another engine (``--engine-variant``)."""
    v = report["variant"]
    r, lines = v["comparison"], []
    lines.append(f"\n#### Variant: the same int8 models on the {v['engine']} engine\n")
    lines.append(f"Rebuilt from the same baselines and calibration samples with `quantize_model(..., engine={v['engine']!r})`: "
                 f"{v['description']}. The default-engine rebuild made the same way gave the study task's predictions "
                 f"on every seed: {v['default_engine_matches_task']}. \"variant\" below replaces \"new\"; \"old\" is the logged model.\n")
    a, c = r["accuracy"], r["changes_vs_baseline"]
    lines.append("| quantity | value |")
    lines.append("|---|---:|")
    lines.append(f"| accuracy, variant % (per seed: {', '.join(rt.fmt(x, pct=True) for x in v['acc_per_seed'])}) | {_ci(a['new'], pct=True)} |")
    lines.append(f"| accuracy, variant minus baselines (pp) | {_ci(a['new_minus_baseline'], pct=True, sign=True)} |")
    lines.append(f"| same prediction as the baseline, variant % | {_ci(r['agreement']['new_vs_baseline'], pct=True)} |")
    lines.append(f"| predictions changed from the baseline's, to positive / to negative class, variant | {c['new']['to_positive']} / {c['new']['to_negative']} |")
    if "ties" in c["new"]:
        lines.append(f"| exact ties of the two logits, variant | {c['new']['ties']} |")
    lines.append(f"| PIE against the baselines, variant | {r['pie']['new']} |")
    if "men_minus_women_fpr_change_pp" in r:
        lines.append(f"| FPR change, men minus women (pp), variant | {_ci(r['men_minus_women_fpr_change_pp']['new'], 1, sign=True)} |")
    lines.append("\n| group | FPR change variant | FNR change variant |")
    lines.append("|---|---:|---:|")
    for name, row in r["groups"].items():
        lines.append(f"| {name} | {_ci(row['fpr']['new_change_pct'], 1, sign=True)} | {_ci(row['fnr']['new_change_pct'], 1, sign=True)} |")
    hits = groups_excluding_zero(r, "new")
    lines.append("\nGroup changes whose interval excludes zero, variant: " + ("; ".join(hits) if hits else "none") + ".")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    r, lines = report["comparison"], []
    lines.append(f"<!-- generated by studies/int8_recheck.py -->\n")
    lines.append(f"Study `{report['study']}` (registered model `{report['registered_model']}`, store "
                 f"`{report['tracking_uri']}`), population `{report['method']}@{report['level']}`, "
                 f"{r['n_models']} seeds, test set {r['n_examples']} images.\n")
    lines.append(f"- old (logged): {report['old_backend']}")
    lines.append(f"- new (rebuilt now): {report['new_backend']}\n")
    lines.append("#### Per seed\n")
    lines.append("| seed | baseline version | int8 version | baseline acc % | old acc % | new acc % | old = new % | "
                 "old = baseline % | new = baseline % | logged model reproduces its predictions | activation scale ratio new/old (expected) "
                 "| new: logits | new: changed from the baseline to positive / negative |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for s in report["seeds"]:
        lines.append(f"| {s['seed']} | {s['baseline_version']} | {s['compressed_version']} | {rt.fmt(s['acc_baseline'], pct=True)} "
                     f"| {rt.fmt(s['acc_old'], pct=True)} | {rt.fmt(s['acc_new'], pct=True)} | {rt.fmt(s['agree_old_new'], pct=True)} "
                     f"| {rt.fmt(s['agree_old_baseline'], pct=True)} | {rt.fmt(s['agree_new_baseline'], pct=True)} "
                     f"| {s['logged_reproduced']} | {s['scale_ratio_range']} ({s['scale_ratio_expected']:.4f}) "
                     f"| {s['new_logits']} | {s['new_to_positive']} / {s['new_to_negative']} |")
    a, g = r["accuracy"], r["agreement"]
    lines.append("\n#### Pooled over seeds (95% bootstrap CI over test examples)\n")
    lines.append("| quantity | value |")
    lines.append("|---|---:|")
    lines.append(f"| accuracy, baselines % | {_ci(a['baseline'], pct=True)} |")
    lines.append(f"| accuracy, old int8 % | {_ci(a['old'], pct=True)} |")
    lines.append(f"| accuracy, new int8 % | {_ci(a['new'], pct=True)} |")
    lines.append(f"| accuracy, new minus old (pp) | {_ci(a['new_minus_old'], pct=True, sign=True)} |")
    lines.append(f"| accuracy, old minus baselines (pp) | {_ci(a['old_minus_baseline'], pct=True, sign=True)} |")
    lines.append(f"| accuracy, new minus baselines (pp) | {_ci(a['new_minus_baseline'], pct=True, sign=True)} |")
    lines.append(f"| same prediction, old and new % | {_ci(g['old_vs_new'], pct=True)} |")
    lines.append(f"| same prediction as the baseline, old % | {_ci(g['old_vs_baseline'], pct=True)} |")
    lines.append(f"| same prediction as the baseline, new % | {_ci(g['new_vs_baseline'], pct=True)} |")
    lines.append(f"| (model, example) pairs where old and new differ | {g['old_vs_new_pairs_differing']} of {r['n_models'] * r['n_examples']} |")
    lines.append(f"| examples where some seed's old and new differ | {g['old_vs_new_examples_differing']} |")
    f = r["flips"]
    lines.append(f"| of those pairs: old right, new wrong / old wrong, new right | {f['old_right_new_wrong']} / {f['old_wrong_new_right']} |")
    c = r["changes_vs_baseline"]
    lines.append(f"| predictions changed from the baseline's, to positive / to negative class, old | {c['old']['to_positive']} / {c['old']['to_negative']} |")
    lines.append(f"| predictions changed from the baseline's, to positive / to negative class, new | {c['new']['to_positive']} / {c['new']['to_negative']} |")
    if "ties" in c["new"]:
        for which in ("old", "new"):
            lines.append(f"| exact ties of the two logits (argmax gives class 0), {which}; of them among the changes to negative / positive "
                         f"| {c[which]['ties']}; {c[which]['to_negative_ties']} / {c[which]['to_positive_ties']} |")
    lines.append(f"| PIE against the baselines, old / new | {r['pie']['old']} / {r['pie']['new']} |")
    if "men_minus_women_fpr_change_pp" in r:
        mm = r["men_minus_women_fpr_change_pp"]
        lines.append(f"| FPR change, men minus women (pp), old | {_ci(mm['old'], 1, sign=True)} |")
        lines.append(f"| FPR change, men minus women (pp), new | {_ci(mm['new'], 1, sign=True)} |")
    lines.append("\n#### Group FPR/FNR change against the baselines (% of the baseline rate), old and new int8\n")
    lines.append("| group | negatives / positives | baseline FPR % | FPR change old | FPR change new | new minus old (pp) "
                 "| baseline FNR % | FNR change old | FNR change new | new minus old (pp) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in r["groups"].items():
        cells = [name, f"{row['negatives']} / {row['positives']}"]
        for metric in ("fpr", "fnr"):
            m = row[metric]
            cells += [_ci(m["baseline"], 1, pct=True), _ci(m["old_change_pct"], 1, sign=True),
                      _ci(m["new_change_pct"], 1, sign=True), _ci(m["new_minus_old_pp"], 1, sign=True)]
        lines.append("| " + " | ".join(cells) + " |")
    for which in ("old", "new"):
        hits = groups_excluding_zero(r, which)
        lines.append(f"\nGroup changes whose interval excludes zero, {which}: " + ("; ".join(hits) if hits else "none") + ".")
    if report.get("variant"):
        lines += _variant_markdown(report)
    lines.append(f"\nWall time {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- main


def recheck(args) -> dict[str, Any]:
    """Rebuild every seed's int8 model with the current code and compare it with the logged one.

    Parameters
    ----------
    args : argparse.Namespace
        The command line (see :func:`main`).

    Returns
    -------
    dict
        ``study``, ``registered_model``, ``tracking_uri``, ``old_backend``,
        ``new_backend``, ``seeds`` (per-seed checks and accuracies),
        ``comparison`` (:func:`compare`) and ``seconds``.
    """
    import torch
    from mlflow.tracking import MlflowClient

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    client = MlflowClient()
    registered = args.registered_model or f"compbias-{args.study}"
    pairs = find_versions(client, registered, args.study, args.method, args.level)
    with tempfile.TemporaryDirectory(prefix="int8-recheck-") as tmp:
        report = _recheck(args, client, registered, pairs, Path(tmp))
    report["seconds"] = time.perf_counter() - started
    return report


def _recheck(args, client, registered: str, pairs: dict[int, dict[str, Any]], scratch: Path) -> dict[str, Any]:
    import yaml

    from compbias import jobs
    from compbias.platform.config import parse_study
    from compbias.platform.plan import plan_study
    from compbias.platform.tasks import execute_task

    # the study as it ran: the study.yaml logged with the first compressed run
    first = next(iter(pairs.values()))["compressed"]
    study_file = run_artifact(first.run_id, "study.yaml", scratch)
    spec_data = yaml.safe_load(study_file.read_text())
    if args.data_root:
        spec_data.setdefault("dataset", {})["root"] = args.data_root
    spec = parse_study(spec_data, source=f"study.yaml of run {first.run_id}")
    if spec.name != args.study:
        raise SystemExit(f"run {first.run_id} logged study {spec.name!r}, not {args.study!r}")
    if args.cache_dir:
        os.environ["COMPBIAS_CACHE_DIR"] = args.cache_dir
    tasks = {t.seed: t for t in plan_study(spec, roles=["compressed"], methods=[args.method], levels=[args.level])}

    opts = spec.dataset.loader_options()
    if spec.dataset.kind != "digits":
        from compbias._locations import cache_dir

        opts["cache_dir"] = str(cache_dir("datasets"))  # as the study's tasks do
    try:
        bundle = jobs.load_dataset(spec.dataset.kind, **opts)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"cannot load the study's dataset ({exc}); give --data-root with the extracted data") from None
    test_ids = bundle.test_frame["example_id"].to_numpy()

    positive = int(bundle.positive_class if bundle.positive_class is not None else 1)
    seeds, base_p, old_p, new_p, old_q, new_q = [], [], [], [], [], []
    var_p, var_q, var_acc, var_match, var_record = [], [], [], [], None
    frame0 = None
    old_backend = new_backend = None
    for seed, pair in pairs.items():
        if seed not in tasks:
            raise SystemExit(f"seed {seed} has a logged {args.method}@{args.level} version but the study file has no such task")
        task = tasks[seed]
        cv, bv = pair["compressed"], pair["baseline"]
        fingerprint = (cv.tags or {}).get(f"{TAG}spec_hash")
        if fingerprint and fingerprint != spec.model_fingerprint(task.compression_index):
            raise SystemExit(f"seed {seed}: version {cv.version} was made from a different study file "
                             f"(fingerprint {fingerprint}, this study.yaml gives {spec.model_fingerprint(task.compression_index)})")
        logged = pd.read_parquet(run_artifact(cv.run_id, "predictions.parquet", scratch)).sort_values("example_id").reset_index(drop=True)
        logged_base = pd.read_parquet(run_artifact(bv.run_id, "predictions.parquet", scratch)).sort_values("example_id").reset_index(drop=True)
        for name, df in (("int8", logged), ("baseline", logged_base)):
            if not np.array_equal(df["example_id"].to_numpy(), np.sort(test_ids)):
                raise SystemExit(f"seed {seed}: the logged {name} predictions cover other example ids than the rebuilt test split")

        # the logged old model, loaded with today's code, on today's test split
        old_files = download_model_files(registered, cv.version)
        old_model = load_files(old_files)
        old_record = json.loads(old_files["model_spec.json"])["quantization"]
        old_eval = jobs.evaluate(old_model, bundle).predictions.sort_values("example_id").reset_index(drop=True)
        reproduced = bool((old_eval["pred"].to_numpy() == logged["pred"].to_numpy()).all())
        max_prob = float(np.abs(old_eval["prob"].to_numpy() - logged["prob"].to_numpy()).max())

        # the new model, built as the study's compress task builds it
        base_files = download_model_files(registered, bv.version)
        with contextlib.redirect_stdout(sys.stderr):  # the task's progress lines, not the report
            result = execute_task(task, spec.resolved(), base_files)
        new_record = json.loads(result.model_files["model_spec.json"])["quantization"]
        new_model = load_files(result.model_files)
        new = result.predictions.sort_values("example_id").reset_index(drop=True)
        if not np.array_equal(new["example_id"].to_numpy(), logged["example_id"].to_numpy()):
            raise SystemExit(f"seed {seed}: the rebuilt predictions cover other example ids than the logged ones")
        if not np.array_equal(new["label"].to_numpy(), logged["label"].to_numpy()):
            raise SystemExit(f"seed {seed}: labels of the rebuilt test split differ from the logged ones")

        so, sn = activation_scales(old_model), activation_scales(new_model)
        if set(so) != set(sn):
            raise SystemExit(f"seed {seed}: old and new int8 models quantize different layers ({sorted(set(so) ^ set(sn))})")
        expected = grid_steps(old_record) / grid_steps(new_record)
        ratios = np.array([sn[n] / so[n] for n in so])
        old_backend = old_backend or f"{old_record.get('backend', 'compbias first version (exact integer simulation)')}; accumulation: {old_record.get('accumulation')}"
        out_layer = new_record.get("output_layer") or {}
        new_backend = new_backend or (
            f"{new_record.get('backend')}; activations {new_record['activation']['range']} (reduce_range "
            f"{new_record['activation'].get('reduce_range')}); accumulation: {new_record.get('accumulation')}; "
            f"output layer: {out_layer.get('name', 'none recorded')} -> {out_layer.get('output', 'uint8 requantized')}"
            + (f" ({out_layer['kernel']})" if out_layer.get("kernel") else "")
            + f"; fused ReLUs: {len(new_record.get('fused_relu') or [])}")

        y = logged["label"].to_numpy()
        seeds.append({
            "seed": seed, "baseline_version": str(bv.version), "compressed_version": str(cv.version),
            "compressed_run_id": cv.run_id,
            "acc_baseline": float((logged_base["pred"].to_numpy() == y).mean()),
            "acc_old": float((logged["pred"].to_numpy() == y).mean()),
            "acc_new": float((new["pred"].to_numpy() == y).mean()),
            "agree_old_new": float((logged["pred"].to_numpy() == new["pred"].to_numpy()).mean()),
            "agree_old_baseline": float((logged["pred"].to_numpy() == logged_base["pred"].to_numpy()).mean()),
            "agree_new_baseline": float((new["pred"].to_numpy() == logged_base["pred"].to_numpy()).mean()),
            "logged_reproduced": "yes" if reproduced else f"NO ({int((old_eval['pred'] != logged['pred']).sum())} differ)",
            "logged_max_prob_diff": max_prob,
            "scale_ratio_range": f"{ratios.min():.4f}-{ratios.max():.4f}",
            "scale_ratio_expected": expected,
            "scale_ratio_max_rel_dev": float(np.abs(ratios / expected - 1).max()),
            "new_logits": logit_output(new_model),
            "new_to_positive": int(((logged_base["pred"].to_numpy() != positive) & (new["pred"].to_numpy() == positive)).sum()),
            "new_to_negative": int(((logged_base["pred"].to_numpy() == positive) & (new["pred"].to_numpy() != positive)).sum()),
            "new_quantization": new_record,
            "seconds_rebuild": result.seconds,
        })
        if args.engine_variant:
            base_model = load_files(base_files)
            default = _rebuild_on_engine(jobs, base_model, bundle, task, None)[0]
            default_pred = jobs.evaluate(default, bundle).predictions.sort_values("example_id")["pred"].to_numpy()
            var_match.append(bool(np.array_equal(default_pred, new["pred"].to_numpy())))
            variant, var_record = _rebuild_on_engine(jobs, base_model, bundle, task, args.engine_variant)
            vp = jobs.evaluate(variant, bundle).predictions.sort_values("example_id").reset_index(drop=True)
            var_p.append(vp["pred"].to_numpy())
            var_q.append(vp["prob"].to_numpy())
            var_acc.append(float((vp["pred"].to_numpy() == y).mean()))
        base_p.append(logged_base["pred"].to_numpy())
        old_p.append(logged["pred"].to_numpy())
        new_p.append(new["pred"].to_numpy())
        old_q.append(logged["prob"].to_numpy())
        new_q.append(new["prob"].to_numpy())
        frame0 = logged if frame0 is None else frame0
        print(f"seed {seed}: old {seeds[-1]['acc_old']:.4f} new {seeds[-1]['acc_new']:.4f} agree {seeds[-1]['agree_old_new']:.4f} "
              f"(logged model reproduced: {seeds[-1]['logged_reproduced']}; rebuild {result.seconds:.1f}s)", file=sys.stderr, flush=True)

    attrs = [g for g in (spec.dataset.groups or []) if g in frame0.columns]
    comparison = compare(frame0["label"].to_numpy(), frame0, attrs, positive, bundle.n_classes,
                         np.stack(base_p), np.stack(old_p), np.stack(new_p), args.bootstrap, args.bootstrap_seed,
                         old_prob=np.stack(old_q), new_prob=np.stack(new_q))
    report = {
        "study": args.study, "registered_model": registered, "tracking_uri": client.tracking_uri,
        "method": args.method, "level": args.level, "old_backend": old_backend, "new_backend": new_backend,
        "torch_threads": args.threads, "seeds": seeds, "comparison": comparison,
    }
    if args.engine_variant:
        out_layer = var_record.get("output_layer") or {}
        report["variant"] = {
            "engine": args.engine_variant,
            "description": (f"activations {var_record['activation']['range']}, every hidden layer's output requantized, "
                            f"output layer {out_layer.get('name')} -> {out_layer.get('output')} ({out_layer.get('kernel')})"),
            "default_engine_matches_task": "yes" if all(var_match) else f"NO (seeds {[s['seed'] for s, ok in zip(seeds, var_match) if not ok]})",
            "acc_per_seed": var_acc,
            "quantization": var_record,
            "comparison": compare(frame0["label"].to_numpy(), frame0, attrs, positive, bundle.n_classes,
                                  np.stack(base_p), np.stack(old_p), np.stack(var_p), args.bootstrap, args.bootstrap_seed,
                                  old_prob=np.stack(old_q), new_prob=np.stack(var_q)),
        }
    return report


def _rebuild_on_engine(jobs, base_model, bundle, task, engine: str | None):
    """``quantize_model`` on ``engine`` with the calibration sample ``compress_model`` draws for ``task``.

    The sample is ``compress_model``'s: 512 training images chosen by
    ``numpy.random.default_rng(task.seed)``, sorted, in batches of 128 (the
    default-engine rebuild is checked against the task's predictions).
    """
    import torch

    from compbias.jobs.quantize import quantize_model

    n = min(512, len(bundle.train))
    idx = torch.from_numpy(np.sort(np.random.default_rng(task.seed).choice(len(bundle.train), n, replace=False)))
    calibration = [bundle.train.batch(idx[i : i + 128])[0] for i in range(0, n, 128)]
    model, info = quantize_model(base_model, task.level_value, calibration=calibration, engine=engine)
    return model, info["quantization"]


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="study name (the versions' compbias.study tag), e.g. celeba-blond")
    p.add_argument("--registered-model", default=None, help="default compbias-<study>")
    p.add_argument("--method", default="quantize")
    p.add_argument("--level", default="int8_static")
    p.add_argument("--data-root", default=None, help="dataset root, when the logged study.yaml's root is not where the data is")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default $COMPBIAS_CACHE_DIR)")
    p.add_argument("--bootstrap", type=int, default=rt.B, help="bootstrap resamples (default %(default)s)")
    p.add_argument("--bootstrap-seed", type=int, default=rt.SEED)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the study's Ray workers)")
    p.add_argument("--engine-variant", default=None, metavar="ENGINE",
                   help="also rebuild every seed's int8 model on this quantized engine (e.g. qnnpack: 8-bit activations) "
                        "and report it as a variant")
    p.add_argument("--json", default=None, help="also write the full report as JSON here")
    args = p.parse_args(argv)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SystemExit("set MLFLOW_TRACKING_URI to the study's store, e.g. sqlite:///$STUDIES/mlflow-celeba.db")
    report = recheck(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
