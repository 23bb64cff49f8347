"""Scale-out, end to end: a real tracking server, PostgreSQL, basic auth, a two-node Ray cluster.

Every service here is started by the tests on 127.0.0.1 (see ``devtools/services.py``)
and stopped by them, by its own process group. When the tests may (root, as in CI)
they run inside a fresh network namespace that holds only the loopback interface,
so Ray keeps to 127.0.0.1 and nothing can leave the machine.

What a user of a shared deployment cares about, checked on the digits study:

* ``compbias study`` and ``compbias audit`` run unchanged against ``mlflow server``
  through ``MLFLOW_TRACKING_URI``: runs, registered versions with lineage tags, and
  artifacts proxied into the server's ``--artifacts-destination`` (no local
  ``mlruns`` anywhere);
* the same with a PostgreSQL backend behind MLflow's basic-auth app, credentials
  from the environment or from the credentials file and never logged; a wrong
  password is a one-line error, not a stack trace;
* ``RAY_ADDRESS`` joins a token-authenticated two-node cluster and the tasks run
  on both nodes (``compbias.ray_node``); a driver without the token is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.services import (  # noqa: E402
    VENV_BIN,
    BasicAuth,
    iter_files,
    loopback_only_network,
    start_deployment_mlflow_server,
    start_mlflow_server,
    start_postgres,
    start_ray_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STUDY = "scaleout"
REGISTERED_MODEL = f"compbias-{STUDY}"
EXPERIMENT = f"compbias/{STUDY}"
# 2 seeds x (baseline, magnitude 0.5): 4 models; two baselines at once need both nodes
STUDY_YAML = textwrap.dedent(
    f"""\
    name: {STUDY}
    dataset:
      kind: digits
      groups: [ink]
    model:
      arch: smallcnn
    train:
      epochs: 1
    population:
      seeds: 2
    compression:
      - method: magnitude
        schedule: oneshot
        levels: [0.5]
        finetune_epochs: 0
    resources:
      cpus_per_task: 1
      gpus_per_task: 0
      max_retries: 1
    audit:
      bootstrap: 50
      probe_size: 32
      cie_fractions: [0.05]
    """
)
N_MODELS = 4
MODEL_ARTIFACTS = ("predictions.parquet", "rates/per_class.parquet", "rates/per_group.parquet")
USERNAME = "scientist"
PASSWORD = "correct-horse-battery-staple"
LOCAL_STORE_NAMES = ("mlruns", "mlartifacts", "mlflow.db")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loopback():
    """The module's network: a namespace with only 127.0.0.1 when we may make one."""
    with loopback_only_network() as isolated:
        yield isolated


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A working directory holding the tiny digits study file."""
    d = tmp_path_factory.mktemp("scaleout-study")
    (d / "study.yaml").write_text(STUDY_YAML)
    return d


@pytest.fixture(scope="module")
def ray_cluster(loopback):
    """A head and one worker node, one CPU each, token auth on."""
    cluster = start_ray_cluster(workers=1, cpus_per_node=1)
    yield cluster
    cluster.stop()
    left = {n.name: n.group_members() for n in cluster.nodes if n.group_members()}
    assert not left, f"processes of the Ray cluster survived its stop: {left}"
    assert not cluster.leftover_pids(), "processes holding the cluster's token survived its stop"


@pytest.fixture(scope="module")
def sqlite_server(loopback, tmp_path_factory):
    """``mlflow server`` with a SQLite backend and a proxied artifacts destination."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-sqlite"))
    yield server
    server.stop()
    assert not server.service.group_members(), "mlflow server processes survived its stop"


@pytest.fixture(scope="module")
def postgres(loopback):
    """A PostgreSQL cluster on a free loopback port."""
    pg = start_postgres()
    yield pg
    pg.stop()
    assert not pg.service.group_members(), "PostgreSQL processes survived their stop"


@pytest.fixture(scope="module")
def auth_server(postgres, tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on PostgreSQL, with one non-admin user.

    Started by the deployment's own scripts (``docker/entrypoint.sh`` running
    ``docker/mlflow-server.sh`` with ``docker/config/basic_auth.ini``), so the
    compose file's tracking server is what these tests exercise.
    """
    server = start_deployment_mlflow_server(
        tmp_path_factory.mktemp("mlflow-pg-auth"), postgres, BasicAuth()
    )
    server.create_user(USERNAME, PASSWORD)
    yield server
    server.stop()
    assert not server.service.group_members(), "mlflow server processes survived its stop"


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any tracking, Ray or credential settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "RAY_")) and k != "PYTEST_CURRENT_TEST"
    }
    env.setdefault("NUMBA_CACHE_DIR", str(REPO_ROOT / ".cache" / "numba"))
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


def compbias(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 400):
    """Run the ``compbias`` command as a user would; return the completed process."""
    return subprocess.run(
        [str(VENV_BIN / "compbias"), *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    """Assert a command succeeded; return its stdout."""
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n--- stdout:\n{proc.stdout[-3000:]}\n"
        f"--- stderr:\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def client_for(url: str):
    """An MlflowClient of the server (credentials, if any, from our environment)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def model_runs(client):
    """The finished model runs of the study, by run name."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"experiment {EXPERIMENT!r} was not created on the server"
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.`compbias.run_kind` = 'model'", max_results=100
    )
    return exp, runs


def in_destination(server, artifact_uri: str) -> Path:
    """The directory of the server's artifacts destination that ``artifact_uri`` names.

    Only ``mlflow-artifacts:`` URIs (uploads proxied by the server) are accepted:
    anything else would mean the client wrote the files itself.
    """
    from urllib.parse import urlparse

    parsed = urlparse(artifact_uri)
    assert parsed.scheme == "mlflow-artifacts", (
        f"{artifact_uri} is not proxied by the tracking server (the client would write it itself)"
    )
    return server.artifacts_destination / parsed.path.lstrip("/")


def check_study_landed(server, client, study_dir: Path) -> tuple:
    """Check runs, versions, tags and proxied artifacts of the study on ``server``."""
    exp, runs = model_runs(client)
    assert len(runs) == N_MODELS, [r.info.run_name for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.tags["compbias.role"], r.data.tags["compbias.seed"]) for r in runs} == {
        ("baseline", "0"), ("baseline", "1"), ("compressed", "0"), ("compressed", "1")
    }
    # the experiment's artifacts go through the server's proxy, not to a path
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    for run in runs:
        landed = in_destination(server, run.info.artifact_uri)
        for name in MODEL_ARTIFACTS:
            assert (landed / name).is_file(), (
                f"{name} of run {run.info.run_name} is not in the artifacts destination; "
                f"found {[str(p.relative_to(server.artifacts_destination)) for p in iter_files(server.artifacts_destination)][:20]}"
            )
        assert "acc" in run.data.metrics

    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert len(versions) == N_MODELS
    by_run = {v.run_id: v for v in versions}
    assert set(by_run) == {r.info.run_id for r in runs}
    for run in runs:
        version = by_run[run.info.run_id]
        # the registered model's files went through the proxy too (a logged model of
        # MLflow 3 when the version has a model id, else a directory of the run)
        model_id = client.get_model_version(REGISTERED_MODEL, version.version).model_id
        if not model_id and version.source.startswith("models:/m-"):  # registered from the LoggedModel's URI
            model_id = version.source.removeprefix("models:/")
        model_dir = in_destination(
            server,
            client.get_logged_model(model_id).artifact_location if model_id else version.source,
        )
        assert (model_dir / "MLmodel").is_file(), f"no MLmodel in {model_dir}"
        assert list(model_dir.rglob("*.safetensors")), f"no safetensors weights in {model_dir}"
        for key in ("compbias.study", "compbias.role", "compbias.method", "compbias.level",
                    "compbias.seed", "compbias.ray_node"):
            assert version.tags.get(key) == run.data.tags[key], (key, version.tags)
        if run.data.tags["compbias.role"] == "compressed":
            assert version.tags["compbias.baseline_version"] in {v.version for v in versions}
    # nobody wrote a local file store: not the study's directory, not the server's
    for where in (study_dir, server.service.log_path.parent):
        for name in LOCAL_STORE_NAMES:
            if where == server.service.log_path.parent and name == "mlflow.db":
                continue  # the SQLite backend of the server itself
            assert not (where / name).exists(), f"a local store {name} appeared in {where}"
    return runs, versions


def check_audit_landed(client, versions_before) -> None:
    """The audit run exists and every version carries an audit status."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    audit_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`compbias.run_kind` = 'audit'", max_results=10,
    )
    assert audit_runs, "no audit run was logged"
    assert exp is not None
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    statuses = {v.version: v.tags.get("compbias.audit.status") for v in versions}
    assert set(statuses.values()) <= {"pass", "fail"} and None not in statuses.values(), statuses
    assert {v.tags.get("compbias.audit.run_id") for v in versions} <= {
        r.info.run_id for r in audit_runs
    }
    assert len(versions) == len(versions_before)


# --------------------------------------------------------------------------- tests


def test_study_and_audit_on_two_node_cluster_with_sqlite_server(
    ray_cluster, sqlite_server, study_dir
):
    env = clean_env(
        MLFLOW_TRACKING_URI=sqlite_server.url,
        COMPBIAS_CACHE_DIR=str(study_dir / "cache-cluster"),
        **ray_cluster.driver_env({}),
    )
    ok(compbias(["study", "study.yaml"], env, study_dir))

    client = client_for(sqlite_server.url)
    runs, versions = check_study_landed(sqlite_server, client, study_dir)
    nodes = {r.data.tags["compbias.ray_node"] for r in runs}
    assert nodes == set(ray_cluster.node_ids), (
        f"tasks ran on {nodes}, the cluster's nodes are {ray_cluster.node_ids}"
    )
    for node_dir in ray_cluster.node_dirs():
        leaked = [p for p in node_dir.rglob("*") if p.name in LOCAL_STORE_NAMES]
        assert not leaked, f"a Ray node wrote a local MLflow store: {leaked}"

    ok(compbias(["audit"], env, study_dir))
    check_audit_landed(client, versions)


def test_ray_cluster_refuses_a_driver_without_its_token(ray_cluster):
    probe = "import ray; ray.init(); print('connected')"
    env = ray_cluster.driver_env(clean_env())
    env["RAY_AUTH_TOKEN"] = "0" * 64
    env["RAY_NUM_REDIS_GET_RETRIES"] = "2"  # fail after ~2 s instead of ~20 s
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "connected" not in proc.stdout
    assert "Authentication token is missing or incorrect" in proc.stderr


def test_study_and_audit_on_postgres_behind_basic_auth(
    auth_server, postgres, study_dir, tmp_path, monkeypatch
):
    # the study takes its credentials from the environment ...
    env = clean_env(
        MLFLOW_TRACKING_URI=auth_server.url,
        MLFLOW_TRACKING_USERNAME=USERNAME,
        MLFLOW_TRACKING_PASSWORD=PASSWORD,
    )
    ok(compbias(["study", "study.yaml"], env, study_dir))

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERNAME)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = client_for(auth_server.url)
    runs, versions = check_study_landed(auth_server, client, study_dir)

    # ... and the audit from the credentials file (~/.mlflow/credentials)
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {USERNAME}\nmlflow_tracking_password = {PASSWORD}\n"
    )
    # (a lighter audit here: the full one, SVCCA and gallery included, runs on the cluster)
    audit_env = clean_env(MLFLOW_TRACKING_URI=auth_server.url, HOME=str(home))
    ok(compbias(["audit", "--no-gallery", "--no-similarity"], audit_env, study_dir))
    check_audit_landed(client, versions)

    # everything is in PostgreSQL, not in some SQLite file next to the server
    import psycopg2

    dsn = postgres.uri.replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
        assert cur.fetchone()[0] >= N_MODELS + 1  # the models, the study's parent, the audit
        cur.execute("SELECT count(*) FROM model_versions WHERE name = %s", (REGISTERED_MODEL,))
        assert cur.fetchone()[0] == N_MODELS

    # the credentials were never logged: not as params, tags, version tags or artifacts
    exp = client.get_experiment_by_name(EXPERIMENT)
    every_run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=200
    )
    assert every_run and exp is not None
    for run in every_run:
        values = [*run.data.params.items(), *run.data.tags.items()]
        leaked = [kv for kv in values if PASSWORD in kv[0] or PASSWORD in kv[1]]
        assert not leaked, f"run {run.info.run_name} logged the password: {leaked}"
        names = [k for k, _ in values if "password" in k.lower() or "tracking_username" in k.lower()]
        assert not names, f"run {run.info.run_name} logged credential keys {names}"
    for version in client.search_model_versions(f"name = '{REGISTERED_MODEL}'"):
        assert not [kv for kv in version.tags.items() if PASSWORD in kv[1]]
    for path in iter_files(auth_server.artifacts_destination):
        if path.stat().st_size < 5_000_000:
            assert PASSWORD.encode() not in path.read_bytes(), f"password in artifact {path}"


def test_wrong_password_is_a_clear_error(auth_server, study_dir):
    env = clean_env(
        MLFLOW_TRACKING_URI=auth_server.url,
        MLFLOW_TRACKING_USERNAME=USERNAME,
        MLFLOW_TRACKING_PASSWORD="not-the-password",
    )
    problems = []
    for args in (["study", "study.yaml"], ["audit"]):
        proc = compbias(args, env, study_dir, timeout=120)
        said = proc.stderr + proc.stdout
        if proc.returncode == 0:
            problems.append(f"`compbias {args[0]}` succeeded with a wrong password")
        elif "Traceback" in proc.stderr:
            problems.append(f"`compbias {args[0]}` printed a stack trace:\n{proc.stderr[-1500:]}")
        elif "401" not in said and "authenticat" not in said.lower():
            problems.append(f"`compbias {args[0]}` did not say the credentials were refused:\n{said[-1500:]}")
        if "not-the-password" in said:
            problems.append(f"`compbias {args[0]}` printed the password")
    assert not problems, "\n\n".join(problems)
