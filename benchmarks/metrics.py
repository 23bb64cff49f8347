"""Speed of compbias.metrics against named baselines, at the papers' scale.

Run with ``make bench`` (or ``python benchmarks/metrics.py [--quick]``).
Everything runs in one process: each kernel is warmed up (compiled or loaded
from the numba cache) on a small input first, then both sides are timed on
the same input and the outputs are checked to be the same (the script fails
if they are not). Timings are the best of several runs (one run for the
slow baselines), which is the least disturbed by other processes on a shared
machine. Speed targets are printed, not asserted: on a shared
machine a ratio is a measurement, while a wrong output is a bug.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numba
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix
from threadpoolctl import threadpool_limits

from compbias.metrics import (
    bootstrap_ci,
    bootstrap_indices,
    cca_correlations,
    cie_scores,
    confusion_counts,
    modal_labels,
)


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def timed_pair(baseline, ours, repeat_base, repeat_ours):
    """Best wall time of each side, the runs interleaved so that both see the
    same background load; also the CPU time (all threads) of the best runs."""
    best = {"base": (np.inf, 0.0, None), "ours": (np.inf, 0.0, None)}
    for r in range(max(repeat_base, repeat_ours)):
        for key, fn, reps in (("base", baseline, repeat_base), ("ours", ours, repeat_ours)):
            if r >= reps:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if wall < best[key][0]:
                best[key] = (wall, cpu, out)
    return best["base"], best["ours"]


def noisy_predictions(rng, y, n_models, n_classes, accuracy):
    """Predictions that are right with probability ``accuracy``, else uniform."""
    wrong = rng.integers(0, n_classes, (n_models, y.shape[0]))
    return np.where(rng.random((n_models, y.shape[0])) < accuracy, y, wrong)


# --------------------------------------------------------------------------
# 1. confusion counts vs sklearn.metrics.confusion_matrix per model and group
# --------------------------------------------------------------------------
def bench_confusion(quick):
    m, n, c, g = (5, 10_000, 100, 4) if quick else (20, 50_000, 100, 4)
    rng = np.random.default_rng(0)
    y = rng.integers(0, c, n)
    preds = noisy_predictions(rng, y, m, c, 0.7)
    groups = rng.integers(0, g, n)
    labels = np.arange(c)
    masks = [groups == k for k in range(g)]

    def baseline():
        return np.stack([np.stack([confusion_matrix(y[s], preds[i, s], labels=labels) for s in masks])
                         for i in range(m)])

    def ours():
        return confusion_counts(y, preds, c, groups=groups, n_groups=g)

    confusion_counts(y[:100], preds[:, :100], c, groups=groups[:100], n_groups=g)  # warm-up
    (t_base, _, ref), (t_ours, _, out) = timed_pair(baseline, ours, 3, 20)
    assert np.array_equal(out, ref), "confusion counts differ from sklearn"
    return dict(name=f"confusion counts {m} models x {n:,} ex x {c} classes x {g} groups",
                baseline="sklearn confusion_matrix per model and group", t_base=t_base, t_ours=t_ours,
                target=50, check="counts identical")


# --------------------------------------------------------------------------
# 2. modal labels + CIE scores vs pandas groupby(...).agg(mode().max())
# --------------------------------------------------------------------------
def pandas_modal_and_cie(base, comp):
    """Hooker et al.'s released-code style: long tables, groupby per example."""
    out = []
    for preds in (base, comp):
        m, n = preds.shape
        long = pd.DataFrame({"example": np.tile(np.arange(n), m), "pred": preds.ravel()})
        out.append((long, long.groupby("example")["pred"].agg(lambda s: s.mode().max()).to_numpy()))
    (lb, modal_b), (lc, modal_c) = out
    frac_b = lb.groupby(["example", "pred"]).size().unstack(fill_value=0) / base.shape[0]
    frac_c = lc.groupby(["example", "pred"]).size().unstack(fill_value=0) / comp.shape[0]
    frac_b, frac_c = frac_b.align(frac_c, fill_value=0)
    scores = (frac_b - frac_c).abs().sum(axis=1).to_numpy()
    return modal_b, modal_c, scores


def bench_modal_cie(quick):
    m, n, c = (30, 2_000, 1_000) if quick else (30, 10_000, 1_000)
    subset = min(n, 1_000)
    rng = np.random.default_rng(1)
    y = rng.integers(0, c, n)
    hard = rng.random(n) < 0.2  # examples the models disagree on
    base = noisy_predictions(rng, y, m, c, 0.75)
    comp = noisy_predictions(rng, y, m, c, 0.65)
    base[:, hard] = rng.integers(0, 4, (m, hard.sum()))  # few candidate classes: many tied votes
    comp[:, hard] = rng.integers(0, 4, (m, hard.sum()))

    def ours():
        return modal_labels(base, c), modal_labels(comp, c), cie_scores(base, comp, c)

    ours_small = (modal_labels(base[:, :50], c), cie_scores(base[:, :50], comp[:, :50], c))  # warm-up
    del ours_small
    t0 = time.perf_counter()
    ref_b, ref_c, ref_s = pandas_modal_and_cie(base[:, :subset], comp[:, :subset])
    t_sub = time.perf_counter() - t0
    t_base = t_sub * n / subset
    t_ours, (mb, mc, s) = timed(ours, 20)
    assert np.array_equal(mb[:subset], ref_b) and np.array_equal(mc[:subset], ref_c), "modal labels differ"
    assert np.array_equal(mb[:subset] != mc[:subset], ref_b != ref_c), "PIE masks differ"
    assert np.max(np.abs(s[:subset] - ref_s)) <= 1e-12, "CIE scores differ"
    return dict(name=f"modal labels + CIE scores, 2 x {m} models x {n:,} ex x {c:,} classes",
                baseline=f"pandas groupby agg(mode().max()), timed on {subset:,} examples x {n // subset}",
                t_base=t_base, t_ours=t_ours, target=200,
                check="modal labels and PIE mask identical, scores to 1e-12")


# --------------------------------------------------------------------------
# 3. CCA vs a plain numpy implementation of google/svcca's algorithm
# --------------------------------------------------------------------------
def numpy_reference_cca(x, y, epsilon=0.0):
    """The reference algorithm written plainly: np.cov of the stacked
    activations, rescaling, removal of small-variance neurons, pinv, matrix
    square roots by eigh, SVD."""
    nx = x.shape[0]
    cov = np.cov(x, y)
    sxx, sxy, syy = cov[:nx, :nx], cov[:nx, nx:], cov[nx:, nx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    kx, ky = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
    sxx = sxx[kx][:, kx] + epsilon * np.eye(kx.sum())
    syy = syy[ky][:, ky] + epsilon * np.eye(ky.sum())
    sxy = sxy[kx][:, ky]

    def sqrtm(a):
        w, v = np.linalg.eigh(a)
        return v @ np.diag(np.sqrt(w)) @ v.T

    arr = sqrtm(np.linalg.pinv(sxx)) @ sxy @ sqrtm(np.linalg.pinv(syy))
    return np.abs(np.linalg.svd(arr)[1])


def bench_cca(quick):
    k, n = (64, 5_000) if quick else (256, 20_000)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(k, n)) * rng.uniform(0.5, 2.0, size=(k, 1))
    y = rng.normal(size=(k, k)) @ x / np.sqrt(k) + rng.normal(size=(k, n))
    cca_correlations(x[:8, :100], y[:8, :100])  # warm-up
    # BLAS on one thread for both sides: on a small shared machine the wall
    # time of threaded BLAS measures thread scheduling (numpy and scipy each
    # bring an OpenBLAS pool) more than the algorithms being compared
    with threadpool_limits(limits=1, user_api="blas"):
        (t_base, c_base, ref), (t_ours, c_ours, out) = timed_pair(
            lambda: numpy_reference_cca(x, y), lambda: cca_correlations(x, y), 7, 7)
    diff = float(np.max(np.abs(out - ref)))
    assert diff <= 1e-6, f"canonical correlations differ by {diff}"
    return dict(name=f"CCA {k} x {n:,} activations (2 layers), BLAS on 1 thread",
                baseline="plain numpy reference algorithm (np.cov, pinv, sqrtm, svd); "
                         f"CPU time of the best runs {c_base:.3f} s vs {c_ours:.3f} s = {c_base / c_ours:.1f}x",
                t_base=t_base, t_ours=t_ours, target=1.5, check=f"correlations to {diff:.1e}")


# --------------------------------------------------------------------------
# 4. bootstrap CI of CEV vs a vectorised numpy bootstrap
# --------------------------------------------------------------------------
def numpy_bootstrap_cev(y, base, comp, c, indices):
    n = y.shape[0]

    def mean_rates(preds, yb, tc):
        m = preds.shape[0]
        off = (np.arange(m) * c)[:, None]
        pb = preds + off
        pc = np.bincount(pb.ravel(), minlength=m * c).reshape(m, c)
        tp = np.bincount(pb[preds == yb], minlength=m * c).reshape(m, c)
        fp, fn = pc - tp, tc - tp
        tn = n - tp - fp - fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return (fp / (fp + tn)).mean(0), (fn / (fn + tp)).mean(0)

    out = np.empty(indices.shape[0])
    for b, idx in enumerate(indices):
        yb = y[idx]
        tc = np.bincount(yb, minlength=c)
        bf, bn = mean_rates(base[:, idx], yb, tc)
        cf, cn = mean_rates(comp[:, idx], yb, tc)
        with np.errstate(invalid="ignore", divide="ignore"):
            d1 = np.where(bf != 0, (cf - bf) * 100 / bf, np.nan)
            d2 = np.where(bn != 0, (cn - bn) * 100 / bn, np.nan)
        ok = ~np.isnan(d1) & ~np.isnan(d2)
        out[b] = (np.var(d1[ok]) + np.var(d2[ok])) / 2 if ok.any() else np.nan
    return out


def bench_bootstrap(quick):
    b, m, n, c = (200, 30, 2_000, 100) if quick else (1_000, 30, 10_000, 100)
    rng = np.random.default_rng(3)
    y = rng.integers(0, c, n)
    base = noisy_predictions(rng, y, m, c, 0.75)
    comp = noisy_predictions(rng, y, m, c, 0.65)
    bootstrap_ci(y[:200], base[:, :200], comp[:, :200], c, n_resamples=4)  # warm-up
    indices = bootstrap_indices(n, b, seed=0)  # the same resamples for the baseline (not timed)
    t_base, ref = timed(lambda: numpy_bootstrap_cev(y, base, comp, c, indices), 1)
    t_ours, res = timed(lambda: bootstrap_ci(y, base, comp, c, statistic="cev", n_resamples=b, seed=0), 3)
    rel = float(np.nanmax(np.abs(res.samples - ref) / np.abs(ref)))
    assert rel <= 1e-9 and np.array_equal(np.isnan(res.samples), np.isnan(ref)), f"bootstrap CEV differs ({rel})"
    return dict(name=f"bootstrap CI of CEV, {b:,} resamples, 2 x {m} models x {n:,} ex x {c} classes",
                baseline="vectorised numpy bootstrap (same resample indices)",
                t_base=t_base, t_ours=t_ours, target=5, check=f"all {b} CEV samples to {rel:.0e} rel.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, about a minute)")
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"compbias.metrics benchmark{' (--quick)' if args.quick else ''}: {cpu}, "
          f"{os.cpu_count()} CPUs, numba {numba.__version__} with {numba.get_num_threads()} threads, "
          f"numpy {np.__version__}, pandas {pd.__version__}")
    print(f"{'benchmark':<70} {'baseline s':>10} {'ours s':>8} {'ratio':>8} {'target':>7}  outputs")
    # CCA first: it is all BLAS, which would compete with numba's worker
    # threads while they spin-wait after the other benchmarks' parallel kernels
    for bench in (bench_cca, bench_confusion, bench_modal_cie, bench_bootstrap):
        r = bench(args.quick)
        ratio = r["t_base"] / r["t_ours"]
        status = "ok" if ratio >= r["target"] else "BELOW TARGET"
        print(f"{r['name']:<70} {r['t_base']:>10.3f} {r['t_ours']:>8.4f} {ratio:>7.1f}x {r['target']:>6g}x"
              f"  {r['check']}; {status}")
        print(f"{'':<4}baseline: {r['baseline']}", flush=True)


if __name__ == "__main__":
    main()
