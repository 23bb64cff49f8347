"""Benchmark of the audit service (``make bench``-style; not a test).

Registers a synthetic study of paper scale in a fresh SQLite store -- by
default 10 seeds x (1 baseline + 3 methods x 3 levels) = 100 versions, each
with predictions on 10,000 test examples of 100 classes and two group
attributes -- then

1. audits all 100 versions (the first audit of a study) and prints the time
   spent fetching, computing and logging;
2. registers one new compressed version and audits again (the scheduled,
   incremental audit: only the new version is a target; its baseline
   population comes from the artifact cache) and prints its time relative to
   the full audit (target: under 10%).

Usage::

    python benchmarks/audit.py [--seeds 10] [--examples 10000] [--classes 100] [--bootstrap 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--examples", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per population")
    p.add_argument("--keep", type=Path, help="keep the store in this directory")
    args = p.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MPLBACKEND", "Agg")

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="compbias-bench-audit-"))
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow.tracking import MlflowClient

    from compbias.platform.audit import AuditOptions, run_audit
    from compbias.platform.audit.synthetic import SyntheticStudy, register_synthetic_study

    methods = {"magnitude": ["0.5", "0.9", "0.95"], "structured": ["0.3", "0.6", "0.75"], "structured+at_kd": ["0.3", "0.6", "0.75"]}
    spec = SyntheticStudy(name="bench", n_examples=args.examples, n_classes=args.classes, seeds=args.seeds,
                          methods=methods, victim_class=3, cannibal_class=5, bootstrap=args.bootstrap,
                          cie_fractions=[0.01, 0.05, 0.1])
    client = MlflowClient(uri)
    t = time.perf_counter()
    versions = register_synthetic_study(client, spec, artifact_location=str(root / "artifacts"))
    print(f"registered {len(versions)} versions ({args.examples} examples x {args.classes} classes) in {time.perf_counter() - t:.1f}s")
    opts = AuditOptions(cache_dir=root / "cache", similarity=False, gallery=False)

    # warm-up: compile the numba kernels and import everything on a tiny study (not timed)
    warm = SyntheticStudy(name="warmup", n_examples=200, seeds=2, bootstrap=5)
    register_synthetic_study(client, warm, artifact_location=str(root / "artifacts"))
    from compbias.platform.audit import Selection

    run_audit(client, Selection(study="warmup"), opts)

    t = time.perf_counter()
    (full,) = run_audit(client, Selection(study="bench"), opts)
    full_s = time.perf_counter() - t
    tm = full.timings
    print(f"full audit of {len(full.statuses)} versions: {full_s:.1f}s "
          f"(fetch {tm['fetch']:.1f}s, compute {tm['compute']:.1f}s, log {tm['log']:.1f}s, "
          f"other {full_s - sum(tm.values()):.1f}s: listing, claims)")

    baselines = {s: versions[(s, "baseline", "none")] for s in range(args.seeds)}
    register_synthetic_study(client, spec, seeds=[0], methods={"magnitude": ["0.8"]}, baseline_versions=baselines)
    t = time.perf_counter()
    (inc,) = run_audit(client, options=opts)
    inc_s = time.perf_counter() - t
    tm = inc.timings
    print(f"incremental audit of {len(inc.statuses)} new version among {len(versions)} audited: {inc_s:.1f}s "
          f"(fetch {tm['fetch']:.1f}s, compute {tm['compute']:.1f}s, log {tm['log']:.1f}s)")
    ratio = inc_s / full_s
    print(f"incremental / full = {ratio:.1%} (target < 10%): {'OK' if ratio < 0.10 else 'MISSED'}")
    t = time.perf_counter()
    nothing = run_audit(client, options=opts)
    print(f"audit with nothing new: {time.perf_counter() - t:.2f}s, {len(nothing)} runs logged")
    print(f"store: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
