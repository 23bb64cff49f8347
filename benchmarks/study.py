"""Benchmark of the study pipeline: Ray vs one task after another, and the cost of tracking.

Runs the same study (default ``configs/digits.yaml``) in one process, each
tracked run into a fresh temporary SQLite store:

1. ``sequential``: every task runs to completion in this process, one after
   another (``LocalExecutor``);
2. ``ray``: one Ray task per model on a local Ray cluster started beforehand
   (``num_cpus`` = the machine's cores), the driver logging results as they
   complete, exactly as ``compbias study`` does;
3. ``ray, no tracking`` (the named baseline of the tracking cost): the same
   Ray tasks, results fetched and discarded, no MLflow at all.

Each repetition runs 3, 1, 2 back to back. Printed:

- the speed-up, sequential / Ray (target >= 1.6x on 2 cores);
- (a) the **tracking share**: time the driver spent in MLflow calls (the
  study's own stopwatch: setup, resume scan, parent run, every model run) /
  the Ray run's wall time (target < 10%), split into the per-model logging
  (``log_model_run``) and the rest;
- (b) the **wall-time overhead of tracking**, what a user waits for:
  (tracked Ray wall - untracked Ray wall) / tracked Ray wall, per pair run
  back to back and the median. The driver logs while workers compute, so this
  is smaller than (a) when the machine has a core to spare;
- the per-model logging cost in isolation: the untracked run's results
  logged into a fresh store one after another with nothing else running in
  this process. This is the most stable number on a shared machine;
- what the first model of a fresh ``compbias study`` process pays once for
  its pyfunc model (``mlflow.pyfunc.save_model``: MLflow maps the installed
  packages to their modules once per process; measured in a child process).

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

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")  # see compbias.platform.ray_cluster.WORKER_ENV
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
sys.path.insert(0, str(REPO))

from compbias.platform.config import load_study, parse_study  # noqa: E402
from compbias.platform.ray_cluster import init_ray  # noqa: E402
from compbias.platform import tracking  # noqa: E402
from compbias.platform.study import run_study  # noqa: E402


def _quiet(msg: str) -> None:
    pass


class _LogTimer:
    """Times every ``tracking.log_model_run`` call the study driver makes (installed around one run)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._real = None

    def __enter__(self) -> "_LogTimer":
        self._real = real = tracking.log_model_run

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - t0)

        tracking.log_model_run = timed  # the driver calls it through the module
        return self

    def __exit__(self, *exc) -> None:
        tracking.log_model_run = self._real


def _fresh_store(tmp: str) -> str:
    os.environ["COMPBIAS_ARTIFACT_ROOT"] = str(Path(tmp) / "artifacts")
    uri = f"sqlite:///{tmp}/mlflow.db"
    # create the store's tables outside the timed region (all modes alike)
    tracking.configure_tracking(uri).search_experiments()
    return uri


def _one(spec, executor: str, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"compbias-bench-{name}-") as tmp:
        uri = _fresh_store(tmp)
        with _LogTimer() as logs:
            t0 = time.perf_counter()
            out = run_study(spec, executor=executor, tracking_uri=uri, log=_quiet)
            wall = time.perf_counter() - t0
    if not out.ok:
        raise SystemExit(f"{name}: {len(out.failed)} task(s) failed: {out.failed}")
    return {
        "wall": wall,
        "tracking": out.tracking_seconds,
        "model_logging": sum(logs.seconds),
        "models": len(out.trained),
        "nodes": len(out.nodes),
    }


def _ray_without_tracking(spec) -> tuple[float, list]:
    """Wall time of the same Ray tasks with no MLflow at all, and their results (in plan order)."""
    from compbias.platform.orchestration import RayExecutor
    from compbias.platform.plan import plan_study

    t0 = time.perf_counter()
    ex = RayExecutor(spec)
    handles = {}
    for t in plan_study(spec):
        handles[t.key] = ex.submit(t, handles[t.baseline_key] if t.baseline_key else None)
    results = {}
    pending = list(handles.values())
    while pending:
        ready, pending = ex.wait(pending)
        for h in ready:
            results[h] = ex.result(h)
    wall = time.perf_counter() - t0
    return wall, [results[h] for h in handles.values()]


def _logging_alone(spec, results: list) -> dict:
    """Log finished results into a fresh store one after another, as the driver does, timing each model.

    This process saved pyfunc models before (the warm-up), so the first
    model here does not pay what the first model of a fresh process pays
    (:func:`_first_pyfunc_in_fresh_process` measures that).
    """
    with tempfile.TemporaryDirectory(prefix="compbias-bench-log-") as tmp:
        uri = _fresh_store(tmp)
        t0 = time.perf_counter()
        client = tracking.configure_tracking(uri)
        exp = tracking.ensure_experiment(client, spec.experiment_name)
        tracking.ensure_registered_model(client, spec)
        parent = tracking.start_parent_run(client, exp, spec, spec.to_yaml())
        setup = time.perf_counter() - t0
        done, per_model = {}, []
        text = spec.to_yaml()
        for r in results:  # plan order: baselines first
            t0 = time.perf_counter()
            done[r.task.key] = tracking.log_model_run(client, exp, parent, spec, text, r, baseline=done.get(r.task.baseline_key))
            per_model.append(time.perf_counter() - t0)
        tracking.finish_run(client, parent, True)
    return {"setup": setup, "first": per_model[0], "rest": per_model[1:]}


_FIRST_PYFUNC_PROBE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from mlflow.models import Model
from compbias.platform import tracking
t0 = time.perf_counter()
tracking.save_pyfunc(Path(sys.argv[3]), Path(sys.argv[2]), tuple(int(x) for x in sys.argv[4:]), Model())
print(time.perf_counter() - t0)
"""


def _first_pyfunc_in_fresh_process(result) -> float:
    """Seconds the first model of a new process spends saving its pyfunc model (MLflow's ``save_model``).

    Measured in a child process: MLflow caches what it reads about installed
    packages per process, so this process (which logged models already)
    cannot show it.
    """
    import subprocess

    from compbias.platform.tasks import write_model_files

    with tempfile.TemporaryDirectory(prefix="compbias-bench-tpl-") as tmp:
        weights = write_model_files(result.model_files, Path(tmp) / "weights")
        out = subprocess.run(
            [sys.executable, "-c", _FIRST_PYFUNC_PROBE, str(REPO), str(weights), str(Path(tmp) / "model"), *map(str, result.input_shape)],
            capture_output=True, text=True, check=True,
        )
    return float(out.stdout.strip().splitlines()[-1])


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
    cold, results = _ray_without_tracking(spec)
    from compbias.platform.plan import plan_study
    from compbias.platform.tasks import execute_task

    execute_task(plan_study(spec.with_overrides(seeds=1), roles=["baseline"])[0], spec.with_overrides(seeds=1).resolved())
    print(f"  warm-up: first (cold) Ray run without tracking {cold:.1f}s; warm-up total {time.perf_counter() - t0:.1f}s")
    seq, ray_, bare = [], [], []
    for i in range(args.repeat):
        bare.append(_ray_without_tracking(spec)[0])
        print(f"  ray without tracking {i + 1}: {bare[-1]:.1f}s")
        seq.append(_one(spec, "local", "seq"))
        print(f"  sequential run {i + 1}: {seq[-1]['wall']:.1f}s ({seq[-1]['models']} models, tracking {seq[-1]['tracking']:.1f}s)")
        ray_.append(_one(spec, "ray", "ray"))
        print(f"  ray run {i + 1}:        {ray_[-1]['wall']:.1f}s ({ray_[-1]['models']} models, tracking {ray_[-1]['tracking']:.1f}s)")
    alone = [_logging_alone(spec, results) for _ in range(args.repeat)]
    fresh = statistics.median(_first_pyfunc_in_fresh_process(results[0]) for _ in range(args.repeat))

    ratios = [s_["wall"] / r["wall"] for s_, r in zip(seq, ray_)]
    overheads = [(r["wall"] - b) / r["wall"] for r, b in zip(ray_, bare)]
    shares = [r["tracking"] / r["wall"] for r in ray_]
    w_seq = statistics.median(r["wall"] for r in seq)
    w_ray = statistics.median(r["wall"] for r in ray_)
    t_ray = statistics.median(r["tracking"] for r in ray_)
    t_models = statistics.median(r["model_logging"] for r in ray_)
    n = ray_[0]["models"]
    per_model_alone = statistics.median(x for a in alone for x in a["rest"])
    first_alone = statistics.median(a["first"] for a in alone)
    setup_alone = statistics.median(a["setup"] for a in alone)

    def listed(values, fmt):
        return ", ".join(fmt.format(v) for v in values)

    print()
    print(f"load average now       {os.getloadavg()[0]:8.1f}")
    print(f"sequential wall        {w_seq:8.1f} s")
    print(f"ray wall               {w_ray:8.1f} s")
    print(f"speed-up (seq / ray)   {w_seq / w_ray:8.2f} x   (target >= 1.6x on 2 cores); per back-to-back pair: {listed(ratios, '{:.2f}')} (median {statistics.median(ratios):.2f})")
    print(f"(a) tracking share     {statistics.median(shares):8.1%}     (target < 10%): driver time in MLflow calls / Ray wall, per run: {listed(shares, '{:.1%}')}")
    print(f"    driver in MLflow   {t_ray:8.2f} s   = {t_models:.2f} s logging {n} models ({t_models / n:.3f} s per model) "
          f"+ {t_ray - t_models:.2f} s setup, resume scan, parent run")
    pairs = ", ".join(f"{r['wall']:.1f} s vs {b:.1f} s ({o:.1%})" for r, b, o in zip(ray_, bare, overheads))
    print(f"(b) wall overhead      {statistics.median(overheads):8.1%}     (tracked Ray wall - untracked Ray wall) / tracked Ray wall, "
          f"median over the back-to-back pairs: {pairs}")
    print(f"per-model logging, alone in this process (fresh SQLite store, {n} models x {args.repeat}): "
          f"{per_model_alone:.3f} s per model (median); the first model {first_alone:.2f} s; "
          f"experiment, registered model and parent run {setup_alone:.2f} s")
    print(f"pyfunc model of the first model in a fresh process (once per `compbias study`): {fresh:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
