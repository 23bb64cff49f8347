"""MLflow side of a study: experiment, runs, artifacts, registry, resume state.

Only the driver calls these functions (never a Ray worker), so a local SQLite
store has a single writer. Conventions (``docs/architecture.md``; tag and
artifact names, the member tags and ``member.json`` come from
:mod:`compbias.contract`, docs/contract.md):

- experiment per study, a parent run per execution (``compbias.run_kind=study``),
  a nested child run per model (``compbias.run_kind=model``);
- child runs carry params, metrics (``acc``, ``fpr/class/<c>``,
  ``fnr/class/<c>``, ``fpr/group/<g>``, ``fnr/group/<g>``, ``sparsity``,
  ``size_bytes``), artifacts (``predictions.parquet``, ``rates/*.parquet``,
  their CSV twins, ``member.json``, ``study.yaml``), the train and test splits as dataset
  inputs (contexts ``training`` / ``evaluation``) and one MLflow LoggedModel
  (a models-from-code pyfunc) as output; the metrics are linked to that model
  and the evaluation metrics to the test split;
- every model is registered as a version of the study's registered model
  (source ``models:/<model_id>``), with the run's ``compbias.*`` tags, only
  after all its artifacts are logged.

The package is split by responsibility; every public name is importable from
here:

- :mod:`.store`: the client (:func:`configure_tracking`), reachability,
  SQLite WAL, error messages, the experiment and registered model;
- :mod:`.packaging`: the models-from-code pyfunc and its LoggedModel;
- :mod:`.records`: what a model run records (tags, metrics, params,
  datasets, contract tables);
- :mod:`.runs`: writing the parent run, model runs and failed runs;
- :mod:`.resume`: :func:`scan_study` and downloads of model files.

Library functions take an explicit :class:`~mlflow.MlflowClient`; none sets
MLflow's process-wide URIs (:func:`scoped_tracking_uri` swaps the tracking URI
for the one MLflow call that reads it, and restores it).
"""

from __future__ import annotations

from compbias import contract as C
from compbias.contract import metric_key
from compbias.platform.tasks import write_model_files
from compbias.platform.tracking.packaging import (
    PACKAGE_DIR,
    PYFUNC_CODE,
    log_pyfunc_model,
    logged_model_name,
    save_pyfunc,
    scratch_dir,
)
from compbias.platform.tracking.records import member_info, model_metrics, model_tags
from compbias.platform.tracking.resume import ResumeState, download_model_files, download_version, scan_study, version_model_files
from compbias.platform.tracking.runs import FinishedModel, Stopwatch, finish_run, log_failed_run, log_model_run, start_parent_run
from compbias.platform.tracking.store import (
    ARTIFACT_ROOT_ENV,
    TrackingUnavailableError,
    check_tracking_reachable,
    configure_tracking,
    ensure_experiment,
    ensure_registered_model,
    scoped_tracking_uri,
    sqlite_store_path,
    tracking_error_message,
    use_sqlite_wal,
)

__all__ = [
    "TAG",
    "ARTIFACT_ROOT_ENV",
    "PACKAGE_DIR",
    "PYFUNC_CODE",
    "configure_tracking",
    "scoped_tracking_uri",
    "use_sqlite_wal",
    "sqlite_store_path",
    "ensure_experiment",
    "ensure_registered_model",
    "start_parent_run",
    "finish_run",
    "model_tags",
    "member_info",
    "model_metrics",
    "log_model_run",
    "logged_model_name",
    "log_pyfunc_model",
    "save_pyfunc",
    "scratch_dir",
    "write_model_files",
    "log_failed_run",
    "ResumeState",
    "FinishedModel",
    "scan_study",
    "download_model_files",
    "download_version",
    "version_model_files",
    "metric_key",
    "Stopwatch",
    "TrackingUnavailableError",
    "check_tracking_reachable",
    "tracking_error_message",
]

#: Prefix of every compbias tag (:data:`compbias.contract.PREFIX`).
TAG = C.PREFIX
