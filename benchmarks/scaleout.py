"""Benchmark of scale-out: a two-node Ray cluster and a tracking server, on loopback.

Runs ``compbias study`` (the command a user runs) on a reduced digits study
four ways, each into its own experiment of an ``mlflow server`` (SQLite
backend, artifacts proxied into a directory):

1. ``local Ray``: no ``RAY_ADDRESS``; the driver starts a local Ray instance
   in its own process tree (what ``compbias study`` does on one machine);
2. ``2-node cluster``: ``RAY_ADDRESS`` names a cluster of a head and a worker
   node (``ray start``, 1 CPU each, token authentication), started beforehand
   and joined by the driver, so the comparison is of running the same tasks,
   not of starting Ray;
3. ``1-node cluster``: as 2, with a single ``ray start --head`` node of 2 CPUs,
   so that 2 against 3 compares one node with two nodes of the same total
   CPUs, both already started;
4. ``local Ray, PostgreSQL + basic auth``: as 1, against a second server run by
   ``docker/mlflow-server.sh`` (the compose deployment's tracking server).

For each it prints the wall time of the command, the time the driver spent in
MLflow calls (the study's own stopwatch, printed by ``compbias study``), and
that time per model run: the tracking overhead of logging one model (params,
metrics, three parquet tables, the pyfunc model, the registered version)
through the server. A micro-benchmark then logs the same kind of run directly
with MLflow's client, N times, to a local SQLite store and to both servers.

Everything runs in a network namespace holding only the loopback interface
when the process may create one (root), as the tests do.

    .venv/bin/python benchmarks/scaleout.py [--seeds 2] [--epochs 2] [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devtools.services import (  # noqa: E402
    VENV_BIN,
    BasicAuth,
    loopback_only_network,
    start_deployment_mlflow_server,
    start_mlflow_server,
    start_postgres,
    start_ray_cluster,
)

USER, PASSWORD = "bench", "bench-password-0123456789"


def study_yaml(name: str, seeds: int, epochs: int) -> str:
    """A reduced digits study: ``seeds`` x (baseline, magnitude 0.5 and 0.9)."""
    return textwrap.dedent(
        f"""\
        name: {name}
        dataset: {{kind: digits, groups: [ink]}}
        model: {{arch: smallcnn}}
        train: {{epochs: {epochs}}}
        population: {{seeds: {seeds}}}
        compression:
          - {{method: magnitude, schedule: oneshot, levels: [0.5, 0.9], finetune_epochs: 1}}
        resources: {{cpus_per_task: 1, gpus_per_task: 0}}
        """
    )


def run_study(workdir: Path, name: str, seeds: int, epochs: int, env: dict) -> dict:
    """Run ``compbias study`` once; return wall time, tracking time and model count."""
    path = workdir / f"{name}.yaml"
    path.write_text(study_yaml(name, seeds, epochs))
    t0 = time.perf_counter()
    proc = subprocess.run([str(VENV_BIN / "compbias"), "study", str(path)], env=env,
                          cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"study {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    m = re.search(r"(\d+) trained, \d+ resumed, \d+ failed in ([\d.]+)s \(tracking ([\d.]+)%\)", proc.stdout)
    if not m:
        raise SystemExit(f"cannot find the study's summary line in:\n{proc.stdout[-2000:]}")
    models, inner, share = int(m[1]), float(m[2]), float(m[3]) / 100
    return {"wall": wall, "inner": inner, "tracking": inner * share, "models": models}


LOG_ONE_RUN = textwrap.dedent(
    """\
    import os, sys, tempfile, time, json
    import numpy as np, pandas as pd, mlflow
    from mlflow import MlflowClient
    from compbias import contract as C
    uri, n = sys.argv[1], int(sys.argv[2])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment(f"bench-{time.time_ns()}")
    client.create_registered_model(f"bench-{exp}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        pd.DataFrame({"example_id": np.arange(450), "label": rng.integers(0, 10, 450),
                      "pred": rng.integers(0, 10, 450), "prob": rng.random(450),
                      "ink": rng.integers(0, 2, 450)}).to_parquet(f"{d}/predictions.parquet")
        os.makedirs(f"{d}/rates"); os.makedirs(f"{d}/model")
        pd.DataFrame({"class": range(10), "fpr": rng.random(10), "fnr": rng.random(10)}).to_parquet(f"{d}/rates/per_class.parquet")
        pd.DataFrame({"group": ["0", "1"], "fpr": rng.random(2)}).to_parquet(f"{d}/rates/per_group.parquet")
        with open(f"{d}/model/weights.safetensors", "wb") as f:
            f.write(rng.bytes(97_152))
        with open(f"{d}/model/MLmodel", "w") as f:
            f.write("flavors: {}\\n")
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            run = client.create_run(exp, tags={C.RUN_KIND: C.RUN_KIND_MODEL, C.SEED: str(i)})
            rid = run.info.run_id
            client.log_batch(rid, params=[mlflow.entities.Param(f"p{k}", str(k)) for k in range(20)],
                             metrics=[mlflow.entities.Metric(f"fpr/class/{k}", 0.1, 0, 0) for k in range(60)])
            client.log_artifacts(rid, d)
            client.set_terminated(rid)
            client.create_model_version(f"bench-{exp}", f"{run.info.artifact_uri}/model", rid,
                                        tags={C.SEED: str(i)})
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))
    """
)


def log_runs(uri: str, n: int, env: dict, cwd: Path) -> list[float]:
    """Seconds to log each of ``n`` representative model runs to ``uri`` (fresh process).

    A local SQLite store keeps its artifacts in ``cwd/mlruns``.
    """
    proc = subprocess.run([sys.executable, "-c", LOG_ONE_RUN, uri, str(n)], env=env,
                          capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"logging to {uri} failed:\n{proc.stderr[-3000:]}")
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    """Run the benchmark and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="population size of the reduced study")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of each baseline")
    ap.add_argument("--runs", type=int, default=10, help="runs logged per store in the micro-benchmark")
    args = ap.parse_args(argv)

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    base_env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    base_env["MPLBACKEND"] = "Agg"
    stopped = []
    with tempfile.TemporaryDirectory(prefix="compbias-bench-scaleout-") as tmp, \
            loopback_only_network() as isolated:
        tmp = Path(tmp)
        print(f"network: {'namespace with loopback only' if isolated else 'host network (not root)'}")
        try:
            t0 = time.perf_counter()
            cluster = start_ray_cluster(workers=1, cpus_per_node=1)
            stopped.append(cluster)
            t_cluster = time.perf_counter() - t0
            single = start_ray_cluster(workers=0, cpus_per_node=2)
            stopped.append(single)
            t0 = time.perf_counter()
            server = start_mlflow_server(tmp / "server-sqlite")
            stopped.append(server)
            t_server = time.perf_counter() - t0
            pg = start_postgres()
            stopped.append(pg)
            auth_server = start_deployment_mlflow_server(tmp / "server-pg", pg, BasicAuth())
            stopped.append(auth_server)
            auth_server.create_user(USER, PASSWORD)
            print(f"started: 2-node Ray cluster {t_cluster:.1f}s, mlflow server {t_server:.1f}s")

            env_local = dict(base_env, MLFLOW_TRACKING_URI=server.url)
            env_cluster = cluster.driver_env(env_local)
            env_auth = dict(base_env, MLFLOW_TRACKING_URI=auth_server.url,
                            MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
            results = {
                "local Ray (1 process tree), SQLite server": run_study(tmp, "bench_local", args.seeds, args.epochs, env_local),
                "2-node cluster (ray start, token auth), SQLite server": run_study(tmp, "bench_cluster", args.seeds, args.epochs, env_cluster),
                "1-node cluster (ray start, 2 CPUs), SQLite server": run_study(tmp, "bench_single", args.seeds, args.epochs, single.driver_env(env_local)),
                "local Ray, PostgreSQL + basic-auth server": run_study(tmp, "bench_pg_auth", args.seeds, args.epochs, env_auth),
            }
            print()
            print(f"study: digits, {args.seeds} seeds x (baseline, magnitude 0.5, 0.9), {args.epochs} epochs")
            print(f"{'mode':<56}{'wall s':>8}{'models':>8}{'tracking s':>12}{'per run s':>11}")
            for name, r in results.items():
                print(f"{name:<56}{r['wall']:>8.1f}{r['models']:>8}{r['tracking']:>12.1f}"
                      f"{r['tracking'] / r['models']:>11.2f}")
            local = results["local Ray (1 process tree), SQLite server"]["wall"]
            remote = results["2-node cluster (ray start, token auth), SQLite server"]["wall"]
            one_node = results["1-node cluster (ray start, 2 CPUs), SQLite server"]["wall"]
            print(f"2-node cluster / local Ray wall time: {remote / local:.2f} (below 1: the cluster is faster)")
            print(f"2-node cluster / 1-node cluster wall time: {remote / one_node:.2f}")

            print()
            print(f"logging one model run ({args.runs} runs each, fresh client process):")
            stores = {
                "local SQLite file (sqlite:///)": f"sqlite:///{tmp / 'local.db'}",
                "mlflow server, SQLite backend": server.url,
                "mlflow server, PostgreSQL + basic auth": auth_server.url,
            }
            for name, uri in stores.items():
                env = env_auth if uri == auth_server.url else base_env
                times = log_runs(uri, args.runs, env, tmp)
                print(f"  {name:<44} median {statistics.median(times):.3f} s, "
                      f"first {times[0]:.3f} s, max {max(times):.3f} s")
        finally:
            for service in reversed(stopped):
                service.stop()


if __name__ == "__main__":
    main()
