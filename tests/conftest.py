"""Suite-wide fixtures.

MLflow keeps the tracking and registry URIs as process globals, and
``compbias study``/``compbias audit`` set both (as a CLI process should). In a
test process that would leak one test's store into the next (a client built
with only a tracking URI takes the global registry URI), so every module and
every test ends with the globals it found.
"""

import os

import pytest
from mlflow.tracking._model_registry import utils as _registry_utils
from mlflow.tracking._tracking_service import utils as _tracking_utils


_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # set_*_uri also export these


def _saved_uris():
    return _tracking_utils._tracking_uri, _registry_utils._registry_uri, {k: os.environ.get(k) for k in _ENV}


def _restore_uris(saved):
    _tracking_utils._tracking_uri, _registry_utils._registry_uri, env = saved
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Autouse fixtures are set up before the other fixtures of their scope, so a
# module-scoped fixture that runs a study is undone after its module.
@pytest.fixture(scope="module", autouse=True)
def _mlflow_uris_per_module():
    saved = _saved_uris()
    yield
    _restore_uris(saved)


@pytest.fixture(autouse=True)
def _mlflow_uris_per_test():
    saved = _saved_uris()
    yield
    _restore_uris(saved)
