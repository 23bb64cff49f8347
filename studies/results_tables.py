"""Tables of docs/results.md from the audit runs of the real-data studies.

Reads what ``compbias audit --output-dir`` copied (the audit run's tables and
summary) and prints Markdown. Every number comes from an audit run's tables,
except the intervals the audit does not compute, which are bootstrapped here
from the registered versions' ``predictions.parquet`` (test examples
resampled with replacement, populations held fixed, 1,000 resamples, the
resample stream of ``compbias.metrics.bootstrap_indices``):

* accuracy on and off the CIE sets (the audit gives point values; the CIE set
  is recomputed here with ``compbias.metrics.cie_scores``/``cie_mask`` and
  its size checked against the audit's),
* the share of each Male x Young cell in the CIE set,
* the best-worst group accuracy gap (Meyer 2023) and its difference between
  two populations (paired: both on the same resample),
* Pearson r of CEV against SVCCA distance (Fisher z interval).

Usage::

    MLFLOW_TRACKING_URI=sqlite:///$STUDIES/mlflow-celeba.db \\
      python studies/results_tables.py celeba --audit-dir $STUDIES/audit/celeba-blond
    MLFLOW_TRACKING_URI=sqlite:///$STUDIES/mlflow-cifar.db \\
      python studies/results_tables.py cifar --audit-dir $STUDIES/audit/cifar10-simonsays-biased \\
      --org-audit-dir $STUDIES/audit/cifar10-simonsays
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import compbias.metrics as M
from compbias import contract as C

B = 1000
SEED = 0


def audit_run_dir(path: str | Path) -> Path:
    """The newest ``audit-<study>-<run id>`` directory under an ``--output-dir``.

    Parameters
    ----------
    path : str or Path
        The directory given to ``compbias audit --output-dir``, or an audit run directory.

    Returns
    -------
    Path
    """
    p = Path(path)
    if (p / "summary.json").is_file():
        return p
    runs = sorted((d for d in p.glob("audit-*") if (d / "summary.json").is_file()), key=lambda d: d.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no audit run directory (with summary.json) under {p}; run `compbias audit --output-dir {p}` first")
    return runs[-1]


class Audit:
    """The tables and summary of one audit run copied by ``--output-dir``.

    Parameters
    ----------
    path : str or Path
    """

    def __init__(self, path):
        self.dir = audit_run_dir(path)
        self.summary = json.loads((self.dir / "summary.json").read_text())
        self.run_id = self.summary["run_id"]
        self.study = self.summary["study"]
        self.registered_model = self.summary["registered_model"]

    def table(self, name: str) -> pd.DataFrame:
        """One table of the audit (empty when the audit did not write it)."""
        f = self.dir / "tables" / f"{name}.parquet"
        return pd.read_parquet(f) if f.is_file() else pd.DataFrame()


def load_predictions(registered_model: str) -> dict:
    """Predictions of every registered version, grouped into populations.

    Parameters
    ----------
    registered_model : str

    Returns
    -------
    dict
        ``(method, level) -> {"seeds": [...], "frames": [...]}``; baselines under ``("baseline", "0")``
        (the key every study wrote before the population contract) whatever their method tag.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    pops: dict = {}
    for v in client.search_model_versions(f"name='{registered_model}'"):
        tags = v.tags or {}
        if C.METHOD not in tags:
            continue
        key = ("baseline", "0") if tags.get(C.ROLE) == C.ROLE_BASELINE else (tags[C.METHOD], tags[C.LEVEL])
        local = client.download_artifacts(v.run_id, C.PREDICTIONS)
        df = pd.read_parquet(local).sort_values("example_id").reset_index(drop=True)
        entry = pops.setdefault(key, {"seeds": [], "frames": []})
        entry["seeds"].append(int(tags[C.SEED]))
        entry["frames"].append(df)
    for entry in pops.values():
        order = np.argsort(entry["seeds"])
        entry["seeds"] = [entry["seeds"][i] for i in order]
        entry["frames"] = [entry["frames"][i] for i in order]
        entry["preds"] = np.stack([f["pred"].to_numpy() for f in entry["frames"]])
    return pops


def ci(samples: np.ndarray, point: float | None = None) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of bootstrap samples."""
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (float("nan"), float("nan"))
    return float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))


def fmt(x, digits=2, pct=False) -> str:
    """A number for a table (``n/a`` for missing)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def fmt_ci(x, lo, hi, digits=2, pct=False, sign=False) -> str:
    """``x [lo, hi]``."""
    if x is None or not np.isfinite(x):
        return "n/a"
    f = (lambda v: ("+" if sign and v >= 0 else "") + fmt(v, digits, pct))
    return f"{f(x)} [{f(lo)}, {f(hi)}]"


def level_order(level: str) -> tuple:
    try:
        return (0, float(level))
    except ValueError:
        return (1, level)


# --------------------------------------------------------------------- CelebA


def celeba(args) -> None:
    a = Audit(args.audit_dir)
    print(f"<!-- generated by studies/results_tables.py from audit run {a.run_id} -->")
    rates, bias, cie, comp = a.table("rates"), a.table("bias"), a.table("cie"), a.table("cie_composition")
    pops = load_predictions(a.registered_model)
    base = pops[("baseline", "0")]
    frame = base["frames"][0]
    y = frame["label"].to_numpy()
    n = len(y)
    idx = M.bootstrap_indices(n, B, seed=SEED)
    print(f"\nAudit run `{a.run_id}` (study `{a.study}`, registered model `{a.registered_model}`); "
          f"{len(base['seeds'])} baseline models; test set {n} images.\n")

    # overall accuracy
    print("#### Overall accuracy (population mean, 95% bootstrap CI) and drop against the baselines\n")
    print("| method | level | models | accuracy % | drop (pp) | worst group (FPR change %) |")
    print("|---|---|---:|---:|---:|---|")
    r0 = rates[(rates.scope == "overall") & (rates.metric == "acc")]
    for _, r in r0.sort_values(["method", "level"], key=lambda s: s.map(str)).iterrows():
        b = bias[(bias.method == r.method) & (bias.level == r.level)]
        nm = len(base["seeds"]) if r.method == "baseline" else int(b.n_models.iloc[0])
        drop = "" if b.empty else fmt(b.acc_drop.iloc[0])
        wg = "" if b.empty or b.worst_group.iloc[0] is None else f"{b.worst_group.iloc[0]} ({fmt(b.worst_group_fpr_change.iloc[0], 1)})"
        print(f"| {r.method} | {r.level} | {nm} | {fmt_ci(r['mean'], r.ci_low, r.ci_high, pct=True)} | {drop} | {wg} |")

    # groups
    print("\n#### Per-group rates of the positive class (blond) and their normalised change against the baselines\n")
    print("Rates in %, change in % of the baseline rate, 95% bootstrap CIs (the audit's; the error change is bootstrapped "
          "by this script from the same predictions). Error = 1 - accuracy of the group.\n")
    g = rates[rates.scope == "group"].copy()
    names = list(dict.fromkeys(g.name))
    levels_wanted = [lv for lv in args.levels.split(",")]
    gcols = frame[["Male", "Young"]].to_numpy()

    def group_mask(name: str) -> np.ndarray:
        m = np.ones(n, bool)
        for part in name.split("&"):
            attr, val = part.split("=")
            m &= gcols[:, ["Male", "Young"].index(attr)] == int(val)
        return m

    def error_change(method: str, level: str, name: str) -> str:
        pop = pops.get((method, level))
        if pop is None:
            return "n/a"
        gm = group_mask(name)
        be = (base["preds"] != y).astype(float)
        ce = (pop["preds"] != y).astype(float)

        def change(sel):
            sel = sel[gm[sel]]
            if sel.size == 0:
                return np.nan
            eb, ec = be[:, sel].mean(), ce[:, sel].mean()
            return (ec - eb) / eb * 100 if eb > 0 else np.nan

        point = change(np.arange(n))
        return fmt_ci(point, *ci([change(i) for i in idx]), 1, sign=True)
    for (method, level) in [("baseline", "none")] + [(m, lv) for m, lv in sorted({(m, l) for m, l in zip(bias.method, bias.level)}, key=lambda t: (t[0], level_order(t[1]))) if lv in levels_wanted]:
        sub = g[(g.method == method) & (g.level == level)]
        if sub.empty:
            continue
        print(f"\n{method} @ {level}:\n")
        if method == "baseline":
            print("| group | FPR % | FNR % | error % |")
            print("|---|---:|---:|---:|")
        else:
            print("| group | FPR % | FPR change % | FNR % | FNR change % | error % | error change % |")
            print("|---|---:|---:|---:|---:|---:|---:|")
        for name in names:
            row = {}
            for metric in ("fpr", "fnr", "acc"):
                hit = sub[(sub.name == name) & (sub.metric == metric)]
                row[metric] = hit.iloc[0] if not hit.empty else None
            def cell(metric, change=False):
                r = row[metric]
                if r is None:
                    return "n/a"
                if metric == "acc":
                    if change:
                        # the audit gives the change of accuracy; the change of error is bootstrapped here
                        return error_change(method, level, name)
                    return fmt_ci(1 - r["mean"], 1 - r.ci_high, 1 - r.ci_low, 1, pct=True)
                if change:
                    return fmt_ci(r.change_pct, r.change_ci_low, r.change_ci_high, 1, sign=True)
                return fmt_ci(r["mean"], r.ci_low, r.ci_high, 1, pct=True)
            if method == "baseline":
                print(f"| {name} | {cell('fpr')} | {cell('fnr')} | {cell('acc')} |")
            else:
                print(f"| {name} | {cell('fpr')} | {cell('fpr', True)} | {cell('fnr')} | {cell('fnr', True)} | {cell('acc')} | {cell('acc', True)} |")

    # FPR change men vs women across levels
    print("\n#### FPR change of men and women (normalised, %, 95% CI) at every level\n")
    print("The difference (men minus women, percentage points of normalised change) is bootstrapped by this script "
          "(paired: both changes on the same resample).\n")
    print("| method | level | women (Male=0) | men (Male=1) | men minus women |")
    print("|---|---|---:|---:|---:|")
    neg = y == 0
    male = gcols[:, 0] == 1

    def fpr_change_diff(pop_preds, sel):
        out = []
        for gm in (~male, male):
            s2 = sel[neg[sel] & gm[sel]]
            fb = (base["preds"][:, s2] == 1).mean()
            fc = (pop_preds[:, s2] == 1).mean()
            out.append((fc - fb) / fb * 100 if fb > 0 else np.nan)
        return out[1] - out[0]

    for (method, level) in sorted({(m, l) for m, l in zip(bias.method, bias.level)}, key=lambda t: (t[0], level_order(t[1]))):
        cells = []
        for name in ("Male=0", "Male=1"):
            hit = g[(g.method == method) & (g.level == level) & (g.name == name) & (g.metric == "fpr")]
            cells.append("n/a" if hit.empty else fmt_ci(hit.change_pct.iloc[0], hit.change_ci_low.iloc[0], hit.change_ci_high.iloc[0], 1, sign=True))
        pp = pops[(method, level)]["preds"]
        d = fpr_change_diff(pp, np.arange(n))
        cells.append(fmt_ci(d, *ci([fpr_change_diff(pp, i) for i in idx]), 1, sign=True))
        print(f"| {method} | {level} | {cells[0]} | {cells[1]} | {cells[2]} |")

    # CIE
    print("\n#### Accuracy on the CIE sets against overall (%, 95% bootstrap CI over test examples)\n")
    print("| method | level | CIE set | examples | baseline on CIE | baseline overall | compressed on CIE | compressed overall |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    bcorrect = (base["preds"] == y).astype(float)
    groups = frame[["Male", "Young"]].to_numpy()
    cell_code = groups[:, 0] * 2 + groups[:, 1]
    comp_rows = []
    for _, r in cie.sort_values(["method", "level", "fraction"], key=lambda s: s.map(lambda v: level_order(str(v)) if s.name == "level" else v)).iterrows():
        pop = pops.get((r.method, str(r.level)))
        if pop is None:
            continue
        scores = M.cie_scores(base["preds"], pop["preds"], 2)
        mask = M.cie_mask(scores, float(r.fraction))
        if int(mask.sum()) != int(r.n_examples):
            print(f"<!-- warning: CIE set size {mask.sum()} here, {r.n_examples} in the audit -->")
        ccorrect = (pop["preds"] == y).astype(float)
        def on_off(correct):
            on = np.array([correct[:, i][:, mask[i]].mean() if mask[i].any() else np.nan for i in idx])
            allv = np.array([correct[:, i].mean() for i in idx])
            return on, allv
        b_on, b_all = on_off(bcorrect)
        c_on, c_all = on_off(ccorrect)
        print(f"| {r.method} | {r.level} | top {100 * r.fraction:g}% | {int(r.n_examples)} "
              f"| {fmt_ci(r.base_acc_on, *ci(b_on), pct=True)} | {fmt_ci(bcorrect.mean(), *ci(b_all), pct=True)} "
              f"| {fmt_ci(r.comp_acc_on, *ci(c_on), pct=True)} | {fmt_ci(ccorrect.mean(), *ci(c_all), pct=True)} |")
        shares = {}
        for code, label in enumerate(["woman, old", "woman, young", "man, old", "man, young"]):
            shares[label] = (float((cell_code[mask] == code).mean()), float((cell_code == code).mean()))
        comp_rows.append((r.method, r.level, r.fraction, int(mask.sum()), shares, mask))

    print("\n#### Share of each group in the CIE set against its share of the test set (%)\n")
    print("From the audit's `cie_composition` table (attributes) and, for the Male x Young cells, recomputed here "
          "on the same CIE set; last column: share of blond images.\n")
    print("| method | level | CIE set | n | women | men | young | old | woman, old | woman, young | man, old | man, young | blond |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    test_row = None
    for method, level, q, k, shares, mask in comp_rows:
        sub = comp[(comp.method == method) & (comp.level == level) & (comp.fraction == q)]
        def share(attr, val, which="share_cie"):
            hit = sub[(sub.attribute == attr) & (sub.value.astype(str) == str(val))]
            return fmt(hit[which].iloc[0], 1, pct=True) if not hit.empty else "n/a"
        cells = [share("Male", 0), share("Male", 1), share("Young", 1), share("Young", 0)]
        cells += [fmt(shares[c][0], 1, pct=True) for c in ["woman, old", "woman, young", "man, old", "man, young"]]
        cells += [fmt(float(y[mask].mean()), 1, pct=True)]
        print(f"| {method} | {level} | top {100 * q:g}% | {k} | " + " | ".join(cells) + " |")
        if test_row is None:
            test_row = [share("Male", 0, "share_test"), share("Male", 1, "share_test"), share("Young", 1, "share_test"), share("Young", 0, "share_test")]
            test_row += [fmt(shares[c][1], 1, pct=True) for c in ["woman, old", "woman, young", "man, old", "man, young"]]
            test_row += [fmt(float(y.mean()), 1, pct=True)]
    if test_row:
        print(f"| test set | | | {n} | " + " | ".join(test_row) + " |")

    # pw: best-worst group gap
    if args.pw:
        plain, mitigated = args.pw.split(",")
        print(f"\n#### Best-worst group accuracy gap over Male x Young (pp, 95% bootstrap CI): {plain} vs {mitigated}\n")
        keys = {"baseline": ("baseline", "0")}
        for spec in (plain, mitigated):
            m, lv = spec.split("@")
            keys[spec] = (m, lv)
        def gap_stats(preds, sel):
            corr = (preds[:, sel] == y[sel]).astype(float)
            cc = cell_code[sel]
            accs = np.array([corr[:, cc == c].mean() if (cc == c).any() else np.nan for c in range(4)])
            return accs
        point, boot = {}, {}
        for name, key in keys.items():
            preds = pops[key]["preds"]
            point[name] = gap_stats(preds, np.arange(n))
            boot[name] = np.array([gap_stats(preds, i) for i in idx])
        labels = ["woman, old", "woman, young", "man, old", "man, young"]
        print("| population | models | " + " | ".join(f"acc {l} %" for l in labels) + " | best-worst gap (pp) |")
        print("|---|---:|" + "---:|" * 5)
        gaps = {}
        for name in keys:
            acc_b = boot[name]
            gap_b = np.nanmax(acc_b, 1) - np.nanmin(acc_b, 1)
            gap = float(np.nanmax(point[name]) - np.nanmin(point[name]))
            gaps[name] = gap_b
            cells = [fmt_ci(point[name][c], *ci(acc_b[:, c]), 1, pct=True) for c in range(4)]
            print(f"| {name} | {pops[keys[name]]['preds'].shape[0]} | " + " | ".join(cells) + f" | {fmt_ci(gap, *ci(gap_b), 1, pct=True)} |")
        d_point = (np.nanmax(point[mitigated]) - np.nanmin(point[mitigated])) - (np.nanmax(point[plain]) - np.nanmin(point[plain]))
        d_boot = gaps[mitigated] - gaps[plain]
        print(f"\nGap difference {mitigated} minus {plain}: {fmt_ci(d_point, *ci(d_boot), 1, pct=True, sign=True)} pp "
              f"(paired bootstrap; negative = pw narrows the gap).")
        worst = {}
        for name in (plain, mitigated):
            m, lv = keys[name]
            b = bias[(bias.method == m) & (bias.level == lv)]
            if not b.empty:
                worst[name] = (b.worst_group.iloc[0], b.worst_group_fpr_change.iloc[0], b.acc.iloc[0])
        for name, (wg, ch, acc) in worst.items():
            print(f"\n- audit: {name}: accuracy {fmt(acc, 2, pct=True)}%, worst group FPR change {wg} {fmt(ch, 1)}%")


# --------------------------------------------------------------------- CIFAR


def cifar(args) -> None:
    a = Audit(args.audit_dir)
    print(f"<!-- generated by studies/results_tables.py from audit run {a.run_id} -->")
    bias, rates = a.table("bias"), a.table("rates")
    overall = rates[(rates.scope == "overall") & (rates.metric == "acc")]
    print(f"\nAudit run `{a.run_id}` (study `{a.study}`).\n")
    print("| method | level | models | accuracy % | drop (pp) | PIE | CEV | SDE | classes left out of CEV/SDE |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ob = overall[overall.method == "baseline"].iloc[0]
    print(f"| baseline | 0 | | {fmt_ci(ob['mean'], ob.ci_low, ob.ci_high, pct=True)} | | | | | |")
    for _, r in bias.sort_values(["level", "method"]).iterrows():
        o = overall[(overall.method == r.method) & (overall.level == r.level)]
        acc = fmt_ci(o["mean"].iloc[0], o.ci_low.iloc[0], o.ci_high.iloc[0], pct=True) if not o.empty else fmt(r.acc, pct=True)
        print(f"| {r.method} | {r.level} | {r.n_models} | {acc} | {fmt(r.acc_drop)} | {r.pie} "
              f"| {fmt_ci(r.cev, r.get('cev_ci_low', np.nan), r.get('cev_ci_high', np.nan), 1)} "
              f"| {fmt_ci(r.sde, r.get('sde_ci_low', np.nan), r.get('sde_ci_high', np.nan), 2)} | {r.cev_classes_dropped} |")

    # paired differences of CEV and SDE: each distillation method minus plain pruning at the same level
    if args.paired:
        pops = load_predictions(a.registered_model)
        base = pops[("baseline", "0")]
        y = base["frames"][0]["label"].to_numpy()
        C = int(max(y.max(), base["preds"].max())) + 1
        idx = M.bootstrap_indices(len(y), B, seed=SEED)
        two_level = args.intervals == "two_level"
        S = base["preds"].shape[0]
        # level 1 (two-level only): seeds with replacement, the same seeds for the baselines and both
        # populations (seed s's compressed models come from baseline s); level 2: test examples
        seed_draws = (np.random.default_rng(SEED + 1).integers(0, S, size=(B, S)) if two_level
                      else np.broadcast_to(np.arange(S), (B, S)))

        def check_seeds(pop):
            if pop["seeds"] != base["seeds"]:
                raise SystemExit(f"two-level intervals need the same seeds in every population: {pop['seeds']} vs {base['seeds']}")

        def cev_sde(comp, sel, seeds=None):
            seeds = np.arange(S) if seeds is None else seeds
            try:
                pb = M.population_bias(y[sel], base["preds"][seeds][:, sel], comp[seeds][:, sel], C)
                return pb.cev.value, pb.sde.value
            except ValueError:
                return np.nan, np.nan

        what = ("two-level bootstrap over seeds and test examples" if two_level
                else "paired bootstrap over test examples")
        print("\n#### Distillation minus plain pruning at the same level: CEV and SDE differences "
              f"({what} by this script, 95% CI; negative = less bias than plain pruning)\n")
        print("| level | method | CEV difference | SDE difference | accuracy difference (pp) |")
        print("|---|---|---:|---:|---:|")
        for lv in sorted(set(bias.level), key=level_order):
            plain = pops.get(("structured", lv))
            if plain is None:
                continue
            if two_level:
                check_seeds(plain)
            pl = [cev_sde(plain["preds"], i, sd) for i, sd in zip(idx, seed_draws)]
            pl0 = cev_sde(plain["preds"], np.arange(len(y)))
            for m in sorted(set(bias.method) - {"structured"}):
                mit = pops.get((m, lv))
                if mit is None:
                    continue
                if two_level:
                    check_seeds(mit)
                mt = [cev_sde(mit["preds"], i, sd) for i, sd in zip(idx, seed_draws)]
                mt0 = cev_sde(mit["preds"], np.arange(len(y)))
                dc = np.array([a_[0] - b_[0] for a_, b_ in zip(mt, pl)])
                ds = np.array([a_[1] - b_[1] for a_, b_ in zip(mt, pl)])
                acc_m = (mit["preds"] == y).astype(float)
                acc_p = (plain["preds"] == y).astype(float)
                da = np.array([acc_m[sd][:, i].mean() - acc_p[sd][:, i].mean() for i, sd in zip(idx, seed_draws)])
                print(f"| {lv} | {m} | {fmt_ci(mt0[0] - pl0[0], *ci(dc), 1, sign=True)} | {fmt_ci(mt0[1] - pl0[1], *ci(ds), 2, sign=True)} "
                      f"| {fmt_ci(acc_m.mean() - acc_p.mean(), *ci(da), 2, pct=True, sign=True)} |")

    # per-class accuracy of the down-sampled classes (Table 2's analogue)
    if args.classes:
        classes = [c for c in args.classes.split(",")]
        org = Audit(args.org_audit_dir) if args.org_audit_dir else None
        orates = org.table("rates") if org else pd.DataFrame()
        print(f"\n#### Per-class accuracy (recall, %, 95% CI) of the down-sampled classes at {args.level}: original (Org, audit `{org.run_id if org else 'n/a'}`) vs biased (Bias, audit `{a.run_id}`) training set\n")
        methods = ["baseline"] + sorted(set(bias.method))
        print("| class | " + " | ".join(f"{m} Org | {m} Bias" for m in methods) + " |")
        print("|---|" + "---:|---:|" * len(methods))
        for c in classes:
            cells = []
            for m in methods:
                for tab in (orates, rates):
                    lv = "none" if m == "baseline" else args.level
                    hit = tab[(tab.scope == "class") & (tab.name.astype(str) == c) & (tab.metric == "fnr") & (tab.method == m) & (tab.level == lv)] if not tab.empty else tab
                    cells.append("n/a" if hit.empty else fmt_ci(1 - hit["mean"].iloc[0], 1 - hit.ci_high.iloc[0], 1 - hit.ci_low.iloc[0], 1, pct=True))
            print(f"| {args.class_names.split(',')[classes.index(c)] if args.class_names else c} | " + " | ".join(cells) + " |")

    # SVCCA per block (Table 3 analogue) and correlation with CEV (Fig. 5 analogue)
    sim, corr = a.table("similarity"), a.table("similarity_cev_correlation")
    if not sim.empty:
        print("\n#### Mean SVCCA distance per block against each model's own baseline, with CEV and SDE (Table 3's analogue)\n")
        dist_col = "svcca_distance" if "svcca_distance" in sim.columns else None
        if dist_col:
            t = sim.pivot_table(index=["method", "level"], columns="layer", values=dist_col, aggfunc="mean")
            layers = list(t.columns)
            print("| method | level | " + " | ".join(layers) + " | CEV | SDE | accuracy % | PIE |")
            print("|---|---|" + "---:|" * (len(layers) + 4))
            for (m, lv), row in t.sort_index(level=1).iterrows():
                b = bias[(bias.method == m) & (bias.level == lv)]
                extra = [fmt(b.cev.iloc[0], 1), fmt(b.sde.iloc[0], 2), fmt(b.acc.iloc[0], 2, pct=True), str(b.pie.iloc[0])] if not b.empty else ["n/a"] * 4
                print(f"| {m} | {lv} | " + " | ".join(fmt(row[l], 3) for l in layers) + " | " + " | ".join(extra) + " |")
    if not corr.empty:
        print("\n#### Pearson correlation of CEV with SVCCA distance across compressed versions, per layer\n")
        rcol = "pearson_r" if "pearson_r" in corr.columns else ("r" if "r" in corr.columns else None)
        ncol = "n" if "n" in corr.columns else ("n_versions" if "n_versions" in corr.columns else None)
        pcol = next((c for c in ("p", "p_value", "p_value_versions_independent") if c in corr.columns), None)
        seed_level = "ci_low" in corr.columns  # the audit's interval resampling the baselines (pearson_cluster_ci)
        what = "seed level: the baselines and their compressed models resampled" if seed_level else "Fisher z"
        print(f"| layer | versions | Pearson r [95% CI, {what}] | p (versions taken as independent) |")
        print("|---|---:|---:|---:|")
        for _, r in corr.iterrows():
            rv = float(r[rcol]) if rcol else float("nan")
            nv = int(r[ncol]) if ncol else 0
            if seed_level:
                lo, hi = float(r["ci_low"]), float(r["ci_high"])
            elif nv > 3 and abs(rv) < 1:
                z, se = math.atanh(rv), 1 / math.sqrt(nv - 3)
                lo, hi = math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)
            else:
                lo = hi = float("nan")
            print(f"| {r['layer']} | {nv} | {fmt_ci(rv, lo, hi, 2)} | {float(r[pcol]):.1e} |" if pcol else f"| {r['layer']} | {nv} | {fmt_ci(rv, lo, hi, 2)} | n/a |")
        within_level_correlation(sim)


def within_level_correlation(sim: pd.DataFrame) -> None:
    """Pearson r of per-model CEV against SVCCA distance inside each level (sparsity held fixed)."""
    from scipy import stats

    if sim.empty or "cev" not in sim.columns:
        return
    print("\nThe same correlation inside each level (so that sparsity, which drives both, is held fixed); "
          "computed here from the audit's `similarity` table (per-model CEV and SVCCA distance):\n")
    layers = list(dict.fromkeys(sim["layer"]))
    print("| level | versions | " + " | ".join(f"r {l} [95% CI]" for l in layers) + " |")
    print("|---|---:|" + "---:|" * len(layers))
    for lv, sub in sorted(sim.groupby("level"), key=lambda t: level_order(t[0])):
        cells, nv = [], 0
        for l in layers:
            d = sub[(sub.layer == l) & np.isfinite(sub.cev) & np.isfinite(sub.svcca_distance)]
            nv = len(d)
            if nv < 4:
                cells.append("n/a")
                continue
            r = float(stats.pearsonr(d.svcca_distance, d.cev)[0])
            z, se = math.atanh(max(min(r, 0.999999), -0.999999)), 1 / math.sqrt(nv - 3)
            cells.append(fmt_ci(r, math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se), 2))
        print(f"| {lv} | {nv} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", choices=["celeba", "cifar"])
    p.add_argument("--audit-dir", required=True)
    p.add_argument("--org-audit-dir", default=None, help="cifar: audit of the original-training-set study")
    p.add_argument("--levels", default="0.95,int8_static", help="celeba: levels with a full group table")
    p.add_argument("--pw", default="magnitude@0.9,magnitude+pw@0.9", help="celeba: plain,mitigated populations")
    p.add_argument("--classes", default="1,3,5", help="cifar: the down-sampled class ids")
    p.add_argument("--class-names", default="automobile,cat,dog")
    p.add_argument("--level", default="0.45", help="cifar: level of the per-class table")
    p.add_argument("--no-paired", dest="paired", action="store_false", help="cifar: skip the paired CEV/SDE differences")
    p.add_argument("--intervals", choices=["two_level", "examples"], default="two_level",
                   help="cifar differences: resample seeds and test examples (default) or test examples only")
    args = p.parse_args(argv)
    (celeba if args.study == "celeba" else cifar)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
