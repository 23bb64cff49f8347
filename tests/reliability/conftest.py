"""Shared pieces of the reliability tests: tiny studies, private SQLite stores, MLflow census.

Every test works in its own temporary directory with its own SQLite store and
artifact root (``COMPBIAS_ARTIFACT_ROOT``), so nothing here touches a store or
a process that something else on the machine uses. The one real study these
tests need (``finished_store``) is made once per session and copied per test
with its absolute artifact paths rewritten.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.stores import copy_store  # noqa: E402  (after the path above)

#: A study small enough for fault tests: 1 seed, 1 epoch on 300 digits, one pruning level.
TINY_STUDY = textwrap.dedent(
    """\
    name: {name}
    dataset:
      kind: digits
      groups: [ink]
      max_train: 300
      max_test: 200
    train:
      epochs: 1
    population:
      seeds: {seeds}
    compression:
      - method: magnitude
        schedule: oneshot
        levels: {levels}
        finetune_epochs: 0
    resources:
      cpus_per_task: 1
      gpus_per_task: 0
      max_retries: 1
    audit:
      bootstrap: 20
      probe_size: 16
      cie_fractions: [0.05]
    """
)

SECRET_PASSWORD = "s3cret-Pa55word-do-not-log-7f3a"
SECRET_TOKEN = "tok-9c1e0b7d4a2f-do-not-log"


def write_study(directory: Path, name: str = "rel", *, seeds: int = 1, levels: str = "[0.5]") -> Path:
    """Write the tiny study file into ``directory`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(TINY_STUDY.format(name=name, seeds=seeds, levels=levels))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without tracking, Ray or credential settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_", "COMPBIAS_")) and k != "PYTEST_CURRENT_TEST"}
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def compbias(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``compbias`` command as a user would and return the finished process."""
    return subprocess.run([str(VENV_BIN / "compbias"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def expect_ok(proc: subprocess.CompletedProcess) -> str:
    """Assert a command exited 0; return its stdout."""
    assert proc.returncode == 0, (f"{proc.args} exited {proc.returncode}\n--- stdout:\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr:\n{proc.stderr[-5000:]}")
    return proc.stdout


@dataclass
class Census:
    """What a store holds: runs by status and kind, registered versions, audit tags."""

    runs: list
    versions: list

    def model_runs(self, status: str | None = None) -> list:
        return [r for r in self.runs if r.data.tags.get("compbias.run_kind") == "model"
                and (status is None or r.info.status == status)]

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            out[r.info.status] = out.get(r.info.status, 0) + 1
        return out

    def finished_keys(self) -> list[tuple[str, str, str]]:
        return sorted((r.data.tags["compbias.seed"], r.data.tags["compbias.method"], r.data.tags["compbias.level"])
                      for r in self.model_runs("FINISHED"))

    def assert_each_model_once(self, n_models: int) -> None:
        """Exactly one FINISHED run per (seed, method, level), ``n_models`` of them, nothing RUNNING, and the
        registered versions matching the finished runs one to one."""
        keys = self.finished_keys()
        assert len(keys) == n_models and len(set(keys)) == n_models, f"finished model runs {keys}"
        assert "RUNNING" not in self.statuses(), self.statuses()
        assert sorted(v.run_id for v in self.versions) == sorted(r.info.run_id for r in self.model_runs("FINISHED")), \
            "registered versions do not match the finished runs one to one"


def census(uri: str) -> Census:
    """Every run (all experiments) and every registered version of the store at ``uri``."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000) if exps else []
    versions = list(client.search_model_versions(max_results=1000))
    versions = [v for v in versions if not v.name.startswith("compbias-claim-")]
    return Census(list(runs), versions)


@pytest.fixture(autouse=True)
def _quiet_mlflow():
    """Quiet MLflow's loggers (nothing in compbias sets MLflow's process-wide URIs)."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def finished_template(tmp_path_factory):
    """One real tiny study and its audit, run by the CLI with credentials in the environment.

    Returns the store directory (``mlflow.db``, ``artifacts/``), the study file,
    and the commands' output; tests copy it with :func:`copy_store`.
    """
    root = tmp_path_factory.mktemp("finished")
    store = root / "store"
    store.mkdir()
    study = write_study(root / "work", "relstudy")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = clean_env(MLFLOW_TRACKING_URI=uri, COMPBIAS_ARTIFACT_ROOT=str(store / "artifacts"),
                    COMPBIAS_CACHE_DIR=str(root / "cache"),
                    MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=SECRET_PASSWORD,
                    MLFLOW_TRACKING_TOKEN=SECRET_TOKEN, RAY_AUTH_TOKEN=SECRET_TOKEN)
    study_proc = compbias(["study", study.name, "--executor", "local"], env, study.parent)
    expect_ok(study_proc)
    audit_proc = compbias(["audit", "--no-gallery", "--bootstrap", "20", "--cache-dir", str(root / "audit-cache"),
                           "--output-dir", str(root / "report")], env, study.parent)
    expect_ok(audit_proc)
    return {"store": store, "study": study, "outputs": [study_proc, audit_proc], "root": root}


@pytest.fixture
def finished_store(tmp_path, finished_template, monkeypatch):
    """A private copy of the finished tiny study's store: ``uri``, ``store``, ``study`` (a copy of the file)."""
    store = tmp_path / "store"
    copy_store(finished_template["store"], store)
    work = tmp_path / "work"
    work.mkdir()
    study = work / finished_template["study"].name
    study.write_text(finished_template["study"].read_text())
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COMPBIAS_ARTIFACT_ROOT", str(store / "artifacts"))
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    yield {"uri": uri, "store": store, "study": study, "work": work, "tmp": tmp_path}
