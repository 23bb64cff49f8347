"""Benchmark of the study pipeline: Ray vs one task after another, and the cost of tracking.

Runs the same study (default ``configs/digits.yaml``) twice, each time into a
fresh temporary SQLite store:

1. ``sequential``: every task runs to completion in this process, one after
   another (``LocalExecutor``), torch using its default threads;
2. ``ray``: one Ray task per model on a local Ray cluster started beforehand
   (``num_cpus`` = the machine's cores), the driver logging results as they
   complete.

Both modes log everything to MLflow exactly as ``compbias study`` does. A
third run executes the same Ray tasks with no MLflow at all. Printed: wall
times, the speed-up (sequential / Ray; target >= 1.6x on 2 cores), the share
of the Ray run's wall time the driver spent in MLflow calls (target < 10%)
and the wall-time overhead of tracking (tracked vs untracked Ray run; the
driver logs while workers compute, so this is smaller than the share).

    .venv/bin/python benchmarks/study.py [--config configs/digits.yaml] [--seeds 3] [--repeat 1]
        [--epochs N] [--finetune-epochs N] [--seq-threads 1]

The default digits study is small (tasks of 0.1-3 s), so per-task overheads
and background load weigh on it; ``--epochs``/``--finetune-epochs`` make the
same study's tasks bigger.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")  # see compbias.platform.orchestration.WORKER_ENV
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
sys.path.insert(0, str(REPO))

from compbias.platform.config import load_study, parse_study  # noqa: E402
from compbias.platform.orchestration import init_ray  # noqa: E402
from compbias.platform.study import run_study  # noqa: E402


def _quiet(msg: str) -> None:
    pass


def _one(spec, executor: str, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"compbias-bench-{name}-") as tmp:
        os.environ["COMPBIAS_ARTIFACT_ROOT"] = str(Path(tmp) / "artifacts")
        uri = f"sqlite:///{tmp}/mlflow.db"
        # create the store's tables outside the timed region (both modes alike)
        from compbias.platform import tracking

        tracking.configure_tracking(uri).search_experiments()
        t0 = time.perf_counter()
        out = run_study(spec, executor=executor, tracking_uri=uri, log=_quiet)
        wall = time.perf_counter() - t0
    if not out.ok:
        raise SystemExit(f"{name}: {len(out.failed)} task(s) failed: {out.failed}")
    return {
        "wall": wall,
        "tracking": out.tracking_seconds,
        "models": len(out.trained),
        "nodes": len(out.nodes),
    }


def _ray_without_tracking(spec) -> float:
    """Wall time of the same Ray tasks with no MLflow at all (results are discarded)."""
    from compbias.platform.orchestration import RayExecutor
    from compbias.platform.plan import plan_study

    t0 = time.perf_counter()
    ex = RayExecutor(spec)
    handles = {}
    for t in plan_study(spec):
        handles[t.key] = ex.submit(t, handles[t.baseline_key] if t.baseline_key else None)
    pending = list(handles.values())
    while pending:
        ready, pending = ex.wait(pending)
        for h in ready:
            ex.result(h)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    """Run the benchmark and print the ratios.

    Parameters
    ----------
    argv : list of str, optional

    Returns
    -------
    int
        0.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    ap.add_argument("--seeds", type=int, default=None, help="override the population size")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode (medians are reported)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (bigger tasks)")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="override finetune_epochs of every pruning entry")
    ap.add_argument("--seq-threads", type=int, default=0, help="torch threads of the sequential run (0: torch's default)")
    args = ap.parse_args(argv)

    spec = load_study(args.config)
    if args.seeds is not None:
        spec = spec.with_overrides(seeds=args.seeds)
    if args.epochs is not None or args.finetune_epochs is not None:
        data = spec.resolved()
        if args.epochs is not None:
            data["train"]["epochs"] = args.epochs
        if args.finetune_epochs is not None:
            for entry in data["compression"]:
                if entry["method"] != "quantize":
                    entry["finetune_epochs"] = args.finetune_epochs
        spec = parse_study(data, source="benchmark overrides")
    init_ray(num_cpus=args.num_cpus)
    import torch

    if args.seq_threads:
        torch.set_num_threads(args.seq_threads)

    print(
        f"study {spec.name}: {len(spec.seeds())} seeds, {spec.train.epochs} epochs, cores {os.cpu_count()}, torch threads (sequential) "
        f"{torch.get_num_threads()}, Ray CPUs {args.num_cpus}, load average {os.getloadavg()[0]:.1f}"
    )
    # warm-up (untimed): Ray worker processes import torch and compbias, load
    # the dataset and numba's cached kernels; this process does the same
    t0 = time.perf_counter()
    cold = _ray_without_tracking(spec)
    from compbias.platform.plan import plan_study
    from compbias.platform.tasks import execute_task

    execute_task(plan_study(spec.with_overrides(seeds=1), roles=["baseline"])[0], spec.with_overrides(seeds=1).resolved())
    print(f"  warm-up: first (cold) Ray run without tracking {cold:.1f}s; warm-up total {time.perf_counter() - t0:.1f}s")
    seq, ray_, bare = [], [], []
    for i in range(args.repeat):
        bare.append(_ray_without_tracking(spec))
        print(f"  ray without tracking {i + 1}: {bare[-1]:.1f}s")
        seq.append(_one(spec, "local", "seq"))
        print(f"  sequential run {i + 1}: {seq[-1]['wall']:.1f}s ({seq[-1]['models']} models, tracking {seq[-1]['tracking']:.1f}s)")
        ray_.append(_one(spec, "ray", "ray"))
        print(f"  ray run {i + 1}:        {ray_[-1]['wall']:.1f}s ({ray_[-1]['models']} models, tracking {ray_[-1]['tracking']:.1f}s)")
    ratios = [s_["wall"] / r["wall"] for s_, r in zip(seq, ray_)]
    w_seq = statistics.median(r["wall"] for r in seq)
    w_ray = statistics.median(r["wall"] for r in ray_)
    t_ray = statistics.median(r["tracking"] for r in ray_)
    w_bare = statistics.median(bare)
    n = ray_[0]["models"]
    print()
    print(f"load average now       {os.getloadavg()[0]:8.1f}")
    print(f"sequential wall        {w_seq:8.1f} s")
    print(f"ray wall               {w_ray:8.1f} s")
    print(f"speed-up (seq / ray)   {w_seq / w_ray:8.2f} x   (target >= 1.6x on 2 cores); per back-to-back pair: {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    print(f"tracking share (ray)   {t_ray / w_ray:8.1%}     (target < 10%): driver time in MLflow calls / wall; {t_ray / n:.2f} s per model over {n} models")
    print(f"ray wall, no tracking  {w_bare:8.1f} s   -> wall-time overhead of tracking {(w_ray - w_bare) / w_ray:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
