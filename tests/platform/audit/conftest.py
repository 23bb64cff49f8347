"""Fixtures: a temporary SQLite MLflow store with synthetic registered studies (no training).

Creating an MLflow SQLite store and registering a study takes seconds, so each
is done once per session into a template directory; every test gets its own
copy (database and artifacts), with the absolute artifact paths rewritten.
"""

from __future__ import annotations

import logging

import pytest
from mlflow.tracking import MlflowClient

from compbias.platform.audit import AuditOptions
from compbias.platform.audit.synthetic import SyntheticStudy, register_synthetic_study
from tests.stores import copy_store



@pytest.fixture(autouse=True)
def _quiet_mlflow():
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def make_spec() -> SyntheticStudy:
    """A small synthetic study: 3 seeds x (baseline, magnitude 0.5/0.9, magnitude+kd 0.9).

    Compressed models lose class 3 (and odd classes drawn with ink) to class 5,
    more at 0.9 than at 0.5; the distilled variant loses a quarter as much.
    """
    return SyntheticStudy(name="synth", n_examples=500, seeds=3, bootstrap=40)


@pytest.fixture(scope="session")
def _templates(tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty-store")
    MlflowClient(f"sqlite:///{empty / 'mlflow.db'}").search_experiments()  # creates the schema
    full = tmp_path_factory.mktemp("registered-store")
    client = MlflowClient(f"sqlite:///{full / 'mlflow.db'}")
    versions = register_synthetic_study(client, make_spec(), artifact_location=str(full / "artifacts"))
    return {"empty": (empty, {}), "registered": (full, versions)}


@pytest.fixture
def store(tmp_path, monkeypatch, request, _templates):
    """A private SQLite tracking/registry store named by MLFLOW_TRACKING_URI.

    Holds the synthetic study when the test also asks for ``registered``.
    """
    kind = "registered" if "registered" in request.fixturenames else "empty"
    src, versions = _templates[kind]
    root = tmp_path / "store"
    copy_store(src, root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    yield {"uri": uri, "artifacts": str(root / "artifacts"), "root": tmp_path, "versions": versions}


@pytest.fixture
def client(store):
    """An MlflowClient on the temporary store."""
    return MlflowClient(store["uri"], store["uri"])


@pytest.fixture
def spec():
    """The synthetic study's description (see :func:`make_spec`)."""
    return make_spec()


@pytest.fixture
def registered(store):
    """The synthetic study, registered in the store: ``(seed, method, level) -> version``."""
    return dict(store["versions"])


@pytest.fixture
def options(store):
    """Audit options for tests: cache in tmp, no SVCCA and no gallery (synthetic versions have no weights or images)."""
    return AuditOptions(cache_dir=store["root"] / "cache", similarity=False, gallery=False, workers=2)
