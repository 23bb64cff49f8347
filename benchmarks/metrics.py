"""Speed of compbias.metrics against named baselines, at the papers' scale.

Run with ``make bench`` (or ``python benchmarks/metrics.py [--quick]``).
Everything runs in one process: each kernel is warmed up (compiled or loaded
from the numba cache) on a small input first, then both sides are timed on
the same input and the outputs are checked to be the same (the script fails
if they are not). Timings are the best of several runs (one run for the
slow baselines), which is the least disturbed by other processes on a shared
machine. Speed targets are printed, not asserted: on a shared
machine a ratio is a measurement, while a wrong output is a bug.

The counting kernels (issue 16, item 4) are also timed against two floors
of their own, on 1 and on 2 numba threads: the numpy ``bincount`` over the
combined index (per model ``np.bincount((g*C + y)*C + p, minlength=G*C*C)``;
per example ``np.bincount(i*C + p)`` for votes), and the bytes floor, the
time to read the prediction arrays once (the faster of ``preds.sum()`` and a
numba pass that only reads them), measured with the arrays in cache (hot,
as every repeated run sees them) and after evicting the caches (cold: the
bytes come from memory). CCA is timed against its BLAS floor, the
covariance products alone.
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


def blas_floor(x, y):
    """The covariance products CCA cannot avoid: X X^T, Y Y^T and X Y^T (k x n activations)."""
    return x @ x.T, y @ y.T, x @ y.T


def bench_cca(quick):
    k, n = (64, 5_000) if quick else (256, 20_000)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(k, n)) * rng.uniform(0.5, 2.0, size=(k, 1))
    y = rng.normal(size=(k, k)) @ x / np.sqrt(k) + rng.normal(size=(k, n))
    cca_correlations(x[:8, :100], y[:8, :100])  # warm-up
    ref = numpy_reference_cca(x, y)  # correctness only (not timed)
    # BLAS on one thread for both sides: on a small shared machine the wall
    # time of threaded BLAS measures thread scheduling (numpy and scipy each
    # bring an OpenBLAS pool) more than the algorithm
    with threadpool_limits(limits=1, user_api="blas"):
        (t_base, c_base, _), (t_ours, c_ours, out) = timed_pair(
            lambda: blas_floor(x, y), lambda: cca_correlations(x, y), 7, 7)
    diff = float(np.max(np.abs(out - ref)))
    assert diff <= 1e-6, f"canonical correlations differ by {diff}"
    return dict(name=f"CCA {k} x {n:,} activations (2 layers), BLAS on 1 thread",
                baseline="BLAS floor: the covariance products X X^T, Y Y^T, X Y^T alone (ratio < 1: "
                         f"ours is slower than the floor by 1/ratio); CPU time {c_base:.3f} s vs {c_ours:.3f} s",
                t_base=t_base, t_ours=t_ours, target=0.5, check=f"correlations to {diff:.1e} of the numpy reference")


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


# --------------------------------------------------------------------------
# 5. counting kernels against the numpy bincount baseline and the bytes floor
# --------------------------------------------------------------------------
_EVICT = np.zeros(96 * 2**20 // 8)  # more than the last-level cache of the machines we run on


def evict_caches():
    """Write 96 MiB so that the next kernel reads its inputs from memory, not from cache."""
    np.add(_EVICT, 1.0, out=_EVICT)


@numba.njit(nogil=True, parallel=True, cache=True)
def _read_pass(flat, n_threads):  # pragma: no cover - numba
    """Read every element once (a max per thread's share, which compiles to vector loads)."""
    share = (flat.size + n_threads - 1) // n_threads
    out = np.zeros(n_threads, np.int64)
    for t in numba.prange(n_threads):
        best = np.int64(0)
        for i in range(t * share, min(flat.size, (t + 1) * share)):
            best = max(best, np.int64(flat[i]))
        out[t] = best
    return out.max()


def read_floor(arrays, n_threads):
    """The two ways of reading the prediction arrays once that the floor is the faster of."""
    flats = [a.reshape(-1) for a in arrays]
    return {"sum": lambda: [a.sum() for a in flats],
            "read pass": lambda: [_read_pass(a, n_threads) for a in flats]}


def best_times(fns, rounds, cold):
    """Best wall time of each function over interleaved rounds, so that all see the same background load.

    Hot: each round runs each function three times in a row and keeps the
    last two (its inputs are then in cache, whatever the function before it
    evicted). Cold: the caches are evicted before every run.
    """
    best = {k: np.inf for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for rep in range(1 if cold else 3):
                if cold:
                    evict_caches()
                t0 = time.perf_counter()
                fn()
                if cold or rep:
                    best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bincount_votes(preds, c):
    n = preds.shape[1]
    return np.bincount((preds + c * np.arange(n)).ravel(), minlength=n * c).reshape(n, c)


def counting_cases(quick):
    """(name, ours, numpy bincount baseline, baseline scale, prediction arrays, reads) per kernel and shape."""
    shapes = [("small", (5, 2_000, 10, 2))]
    if not quick:
        shapes.insert(0, ("issue 16", (20, 50_000, 100, 4)))
    for label, (m, n, c, g) in shapes:
        rng = np.random.default_rng(4)
        y = rng.integers(0, c, n)
        groups = rng.integers(0, g, n)
        preds = noisy_predictions(rng, y, m, c, 0.7)
        comp = noisy_predictions(rng, y, m, c, 0.6)
        shape = f"{m} x {n:,} x {c} cl"

        def conf_base(y=y, groups=groups, preds=preds, m=m, c=c, g=g):
            key = (groups * c + y) * c
            return np.stack([np.bincount(key + p, minlength=g * c * c) for p in preds]).reshape(m, g, c, c)

        def conf_ours(y=y, groups=groups, preds=preds, c=c, g=g):
            return confusion_counts(y, preds, c, groups=groups, n_groups=g)

        assert np.array_equal(conf_ours(), conf_base()), "confusion counts differ from bincount"
        yield f"confusion counts, {shape} x {g} groups ({label})", conf_ours, conf_base, 1.0, (preds,), 1

        def modal_base(preds=preds, c=c):
            return c - 1 - np.argmax(bincount_votes(preds, c)[:, ::-1], axis=1)

        def modal_ours(preds=preds, c=c):
            return modal_labels(preds, c)

        assert np.array_equal(modal_ours(), modal_base()), "modal labels differ from bincount"
        yield f"modal labels, {shape} ({label})", modal_ours, modal_base, 1.0, (preds,), 1

        def cie_base(preds=preds, comp=comp, c=c, m=m):
            return np.abs(bincount_votes(preds, c) * m - bincount_votes(comp, c) * m).sum(axis=1) / (m * m)

        def cie_ours(preds=preds, comp=comp, c=c):
            return cie_scores(preds, comp, c)

        assert np.array_equal(cie_ours(), cie_base()), "CIE scores differ from bincount"
        yield f"CIE scores, 2 x {shape} ({label})", cie_ours, cie_base, 1.0, (preds, comp), 1

        n_res, n_res_base = (20, 2) if label == "issue 16" else (200, 20)
        indices = bootstrap_indices(n, n_res_base, seed=0)

        def boot_base(y=y, preds=preds, comp=comp, c=c, indices=indices):
            return numpy_bootstrap_cev(y, preds, comp, c, indices)

        def boot_ours(y=y, preds=preds, comp=comp, c=c, n_res=n_res):
            return bootstrap_ci(y, preds, comp, c, statistic="cev", n_resamples=n_res, seed=0)

        rel = np.nanmax(np.abs(boot_ours().samples[:n_res_base] - boot_base()) / np.abs(boot_base()))
        assert rel <= 1e-9, f"bootstrap CEV differs from the numpy recount ({rel})"
        yield (f"bootstrap CEV recounts, {n_res} resamples, 2 x {shape} ({label})", boot_ours, boot_base,
               n_res / n_res_base, (preds, comp), n_res)


def bench_counting(quick):
    """Print the counting kernels' times against the bincount baseline and the bytes floor, on 1 and 2 threads."""
    cases = list(counting_cases(quick))  # also warms every kernel up and checks every output
    for name, ours, base, *_ in cases:
        ours(), base()
    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    previous = numba.get_num_threads()
    print("\ncounting kernels (issue 16, item 4): targets >= 2x faster than numpy bincount, <= 3x the bytes "
          "floor (reading the prediction arrays once; hot = in cache, cold = from memory)")
    print(f"{'kernel':<66} {'thr':>3} {'ours ms':>8} {'bincount':>9} {'floor hot':>9} {'floor cold':>10}"
          f" {'vs bincount':>11} {'/ floor hot':>11} {'/ floor cold':>12}")
    for n_threads in threads:
        numba.set_num_threads(n_threads)
        _read_pass(np.zeros(8, np.int64), n_threads)
        for name, ours, base, scale, arrays, reads in cases:
            rounds = 2 if "bootstrap" in name else 7
            floor = read_floor(arrays, n_threads)
            hot = best_times({"ours": ours, "base": base, **floor}, rounds, cold=False)
            cold = best_times({"ours": ours, **floor}, 2 * rounds, cold=True)
            t_ours = hot["ours"]
            t_base = hot["base"] * scale
            f_hot = min(hot["sum"], hot["read pass"]) * reads
            # cold: the first read comes from memory; a bootstrap's later resamples read cached arrays
            f_cold = min(cold["sum"], cold["read pass"]) + f_hot * (reads - 1) / reads
            print(f"{name:<66} {n_threads:>3} {t_ours * 1e3:>8.3f} {t_base * 1e3:>9.3f} {f_hot * 1e3:>9.3f}"
                  f" {f_cold * 1e3:>10.3f} {t_base / t_ours:>10.1f}x {t_ours / f_hot:>10.1f}x"
                  f" {cold['ours'] / f_cold:>11.1f}x", flush=True)
    numba.set_num_threads(previous)
    print("    ours: the public function, validation included; bootstrap: bootstrap_ci (estimate included), "
          "the numpy recount timed on fewer resamples and scaled, the floor = one read per resample "
          "(cold: the first from memory)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, about a minute)")
    parser.add_argument("--counting", action="store_true",
                        help="only the counting kernels against the bincount baseline and the bytes floor")
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
    if args.counting:
        bench_counting(args.quick)
        return
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
    bench_counting(args.quick)


if __name__ == "__main__":
    main()
