"""Benchmark of the audit on a big registry: the cost of writing the outcome tags (not a test).

Registers a synthetic study of ``--seeds`` x (1 baseline + 9 compressed)
versions (default 100 x 10 = 1,000) in a fresh SQLite store, small
predictions tables so that the audit's compute stays small beside its
registry writes, then, in one process:

1. a first full audit (not timed: it fills the artifact cache and tags every
   version);
2. the full audit again (``force``) with the per-tag writes
   (``COMPBIAS_AUDIT_TAG_BATCH=0``: one ``set/delete_model_version_tag``
   call, i.e. one transaction, per tag -- the path a tracking server takes);
3. the same full audit with the batched writes (every version's tags in one
   transaction of the registry store's session);
4. the incremental audit after registering ``--new`` versions, both ways;

and prints each audit's wall time and the time spent writing tags (the
``write_version_tags`` / ``write_tags_batch`` calls, timed around them).

Usage::

    python benchmarks/audit_registry.py [--seeds 100] [--examples 300] [--new 3] [--bootstrap 20]
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
    p.add_argument("--seeds", type=int, default=100, help="seeds; 10 versions each")
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--new", type=int, default=3, help="versions added before the incremental audits")
    p.add_argument("--keep", type=Path, help="keep the store in this directory")
    args = p.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MPLBACKEND", "Agg")

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="compbias-bench-registry-"))
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow.tracking import MlflowClient

    from compbias.platform.audit import AuditOptions, Selection, run_audit, service
    from compbias.platform.audit import registry as R
    from compbias.platform.audit.synthetic import SyntheticStudy, register_synthetic_study

    spent = {"tags": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["tags"] += time.perf_counter() - t
        return wrapper

    service.write_version_tags = timed(service.write_version_tags)
    service.write_tags_batch = timed(service.write_tags_batch)

    methods = {"magnitude": ["0.5", "0.9", "0.95"], "structured": ["0.3", "0.6", "0.75"], "structured+at_kd": ["0.3", "0.6", "0.75"]}
    spec = SyntheticStudy(name="big", n_examples=args.examples, n_classes=args.classes, seeds=args.seeds,
                          methods=methods, victim_class=3, cannibal_class=5, bootstrap=args.bootstrap,
                          cie_fractions=[0.01, 0.05, 0.1])
    client = MlflowClient(uri)
    t = time.perf_counter()
    versions = register_synthetic_study(client, spec, artifact_location=str(root / "artifacts"))
    print(f"registered {len(versions)} versions ({args.examples} examples x {args.classes} classes) "
          f"in {time.perf_counter() - t:.1f}s")
    opts = AuditOptions(cache_dir=root / "cache", similarity=False, gallery=False, figures=False)
    assert R.sql_registry_store(client) is not None, "the benchmark needs a SQL registry store"

    # warm-up: numba kernels, imports (not timed)
    warm = SyntheticStudy(name="warmup", n_examples=200, seeds=2, bootstrap=5)
    register_synthetic_study(client, warm, artifact_location=str(root / "artifacts"))
    run_audit(client, Selection(study="warmup"), opts)

    def audit(selection, batched: bool):
        os.environ[R.BATCH_ENV] = "1" if batched else "0"
        spent["tags"] = 0.0
        t0 = time.perf_counter()
        results = run_audit(client, selection, opts)
        wall = time.perf_counter() - t0
        n = sum(len(r.statuses) for r in results)
        return wall, spent["tags"], n

    rows = []
    # a first full audit, not timed, fills the artifact cache and tags every version; the two timed full
    # audits that follow (force) then do the same work: same cached fetches, same compute, and each rewrites
    # the same tags (run id, audited_at, status; the figures are unchanged)
    audit(Selection(study="big", force=True), True)
    for batched in (False, True):
        wall, tags, n = audit(Selection(study="big", force=True), batched)
        rows.append(("full", batched, n, wall, tags))
    baselines = {s: versions[(s, "baseline", "none")] for s in range(args.seeds)}
    for batched in (False, True):
        for i in range(args.new):
            register_synthetic_study(client, spec, seeds=[i % args.seeds], methods={"magnitude": [f"0.{81 + i}{int(batched)}"]},
                                     baseline_versions=baselines)
        wall, tags, n = audit(Selection(study="big"), batched)
        rows.append(("incremental", batched, n, wall, tags))
    os.environ.pop(R.BATCH_ENV, None)

    print(f"{'audit':<12} {'tag writes':<11} {'versions':>8} {'wall s':>8} {'tags s':>8} {'ms/version':>11}")
    for kind, batched, n, wall, tags in rows:
        print(f"{kind:<12} {'batched' if batched else 'per-tag':<11} {n:>8} {wall:>8.2f} {tags:>8.2f} "
              f"{1000 * tags / max(n, 1):>11.2f}")
    for kind in ("full", "incremental"):
        (old,) = [r for r in rows if r[0] == kind and not r[1]]
        (new,) = [r for r in rows if r[0] == kind and r[1]]
        print(f"{kind}: tag writes {old[4] / max(new[4], 1e-9):.0f}x faster "
              f"({old[4]:.2f}s -> {new[4]:.2f}s), audit {old[3]:.1f}s -> {new[3]:.1f}s")
    print(f"store: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
