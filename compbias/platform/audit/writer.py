"""Log one audit as an MLflow run: metrics, tables, figures, CIE list, report.

Layout of the run's artifacts::

    report.html               self-contained report (figures embedded)
    summary.json              headline numbers and every version's verdict
    cie.csv                   the CIE examples, with an empty annotation column
    tables/<name>.parquet     every table (for machines), with two twins beside it:
    tables/<name>.csv         what MLflow's artifact viewer shows as a table
    tables/<name>.html        the same table as the report renders it
    figures/<name>.png        every figure

Besides its artifacts, the audit run gets one child run per audited
compressed population (:func:`population_runs`: the same metric keys in
every child, so the MLflow UI's compare view can chart them against the
level) and the evaluation set it audited as a dataset input
(:func:`evaluation_dataset`, context ``evaluation``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import figures as F
from compbias.platform.audit import tags as T
from compbias.platform.audit.children import (  # noqa: F401  (re-exported: the audit run's layout)
    PARENT_RUN_TAG,
    RUN_KIND_AUDIT_POPULATION,
    PopulationRun,
    fail_children,
    log_population_runs,
    population_runs,
)
from compbias.platform.audit.compute import StudyAudit
from compbias.platform.audit.report import render_report, table_html
from compbias.platform.audit.studyfile import TestSplit

log = logging.getLogger("compbias.audit")

GALLERY_PER_POPULATION = 12
GALLERY_MAX_POPULATIONS = 4
#: tag MLflow puts on a dataset input: what the run did with it
DATASET_CONTEXT_TAG = "mlflow.data.context"


def make_figures(outcome: StudyAudit, split: TestSplit | None = None) -> tuple[dict, list[str]]:
    """Draw every figure of an audit.

    Parameters
    ----------
    outcome : StudyAudit
    split : TestSplit, optional
        The study's test split, for the CIE gallery (None: no gallery).

    Returns
    -------
    figures : dict of str to matplotlib.figure.Figure
    notes : list of str
        Why a figure was left out.
    """
    figs, notes = {}, []
    if outcome.plots.get("class_changes"):
        figs["class_changes"] = F.class_change_scatter(outcome.plots["class_changes"])
    bias = outcome.tables.get("bias")
    if bias is not None and not bias.empty:
        figs["level_curves"] = F.level_curves(bias)
    if outcome.plots.get("groups"):
        figs["group_changes"] = F.group_changes(outcome.plots["groups"])
    sim = outcome.tables.get("similarity")
    if sim is not None and not sim.empty:
        figs["cev_vs_svcca"] = F.cev_vs_svcca(sim)
    cie = outcome.tables.get("cie_list")
    if cie is not None and not cie.empty and split is not None and outcome.data is not None:
        from compbias.platform.audit.gallery import GalleryUnavailable, load_images

        pops = (bias.sort_values("cev", ascending=False)[["method", "level"]].head(GALLERY_MAX_POPULATIONS).itertuples(index=False)
                if bias is not None and not bias.empty else [])
        for method, level in pops:
            part = cie[(cie["method"] == method) & (cie["level"] == level)].head(GALLERY_PER_POPULATION)
            if part.empty:
                continue
            try:
                images = load_images(split, part["example_id"].astype(int).tolist(), outcome.data.test_frame)
            except GalleryUnavailable as exc:
                notes.append(f"CIE gallery left out: {exc}")
                break
            caps = [f"#{r.example_id}  label {r.label}\nbaseline {r.baseline_modal_pred}, compressed {r.compressed_modal_pred}" for r in part.itertuples()]
            figs[f"gallery_{method}__{level}"] = F.cie_gallery(images, caps, title=f"top CIE examples, {method} at {level}")
    return figs, notes


def _metric_list(metrics: dict[str, float]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if v is not None and math.isfinite(float(v))]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def evaluation_dataset(outcome: StudyAudit, study: str, dataset_kind: str | None = None):
    """The test set the audit audited, as an MLflow dataset (``example_id``, ``label``, the group columns).

    Named ``<dataset kind>-test`` like the model runs' evaluation input; the
    digest hashes the frame, so it equals theirs when the audit saw the same
    test examples in the same order.

    Parameters
    ----------
    outcome : StudyAudit
    study : str
    dataset_kind : str, optional
        The dataset kind the study file names (default: the study's name).

    Returns
    -------
    mlflow.entities.Dataset or None
        None when the audit had no test set (no usable baseline).
    """
    import warnings

    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource

    data = outcome.data
    if data is None:
        return None
    cols = ["example_id", "label", *[g for g in data.group_names if g in data.test_frame.columns]]
    frame = data.test_frame[cols].reset_index(drop=True)
    kind = str(dataset_kind or study)
    source = CodeDatasetSource({"dataset": kind, "audited_by": "compbias audit", "study": study})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # schema hints about integer columns
        ds = mlflow.data.from_pandas(frame, source=source, name=f"{kind}-test", targets="label")
        return ds._to_mlflow_entity()


def write_audit_run(
    client: MlflowClient,
    experiment_id: str,
    registered_model: str,
    study: str,
    outcome: StudyAudit,
    settings,
    metrics_version: str,
    *,
    figures: bool = True,
    output_dir: Path | None = None,
    timings: dict | None = None,
    split: TestSplit | None = None,
    dataset_kind: str | None = None,
) -> tuple[str, str | None]:
    """Log the audit run and return its id and the local path of its report.

    The run gets its metrics and params (one ``log_batch`` per 1000
    metrics), the audited test set as a dataset input (context
    ``evaluation``), one finished child run per compressed population
    (:func:`population_runs`), then every artifact in one upload. When
    anything fails, the run and every child created so far end ``FAILED``
    (an auditor killed outright leaves them ``RUNNING``; the next audit's
    :func:`compbias.platform.audit.abandoned.close_abandoned_runs` closes them).

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    registered_model, study : str
    outcome : StudyAudit
    settings : AuditSettings
    metrics_version : str
    figures : bool
        Draw figures (and the gallery) into the report.
    output_dir : path, optional
        Also copy the artifacts there.
    timings : dict, optional
        Logged as metrics ``audit/seconds_<step>``.
    split : TestSplit, optional
        Passed to :func:`make_figures` (the CIE gallery; None: no gallery).
    dataset_kind : str, optional
        The dataset kind the study file names: names the evaluation dataset input.

    Returns
    -------
    run_id : str
    report_path : str or None
        A local path to ``report.html`` (in the artifact store when it is
        local, else in ``output_dir``); None when neither is local.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_tags = {
        T.RUN_KIND: T.RUN_KIND_AUDIT,
        T.STUDY: study,
        C.REGISTERED_MODEL: registered_model,
        T.METRICS_VERSION: metrics_version,
        C.AUDIT_TARGETS: ",".join(sorted(outcome.versions))[:5000],
        "mlflow.runName": f"audit-{study}-{stamp}",
    }
    run = client.create_run(experiment_id, tags=run_tags)
    run_id = run.info.run_id
    ok = False
    children: list[str] = []
    try:
        params = {
            "thresholds": json.dumps({k: v for k, v in settings.thresholds.items()}),
            "cie_fractions": ",".join(f"{q:g}" for q in settings.fractions()),
            "bootstrap": settings.bootstrap,
            "confidence": settings.confidence,
            "seed": settings.seed,
            "alias": settings.alias,
            "probe_size": settings.probe_size,
            "smoothing": settings.smoothing,
            "gate": json.dumps(settings.gate.model_dump()),
            "n_targets": len(outcome.versions),
        }
        mlist = _metric_list({**outcome.metrics, **{f"audit/seconds_{k}": v for k, v in (timings or {}).items() if k != "log"}})
        plist = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, max(len(mlist), 1), 1000):
            client.log_batch(run_id, metrics=mlist[i:i + 1000], params=plist if i == 0 else [])
        evaluation = evaluation_dataset(outcome, study, dataset_kind)
        if evaluation is not None:
            from mlflow.entities import DatasetInput, InputTag

            client.log_inputs(run_id, datasets=[DatasetInput(evaluation, tags=[InputTag(DATASET_CONTEXT_TAG, "evaluation")])])
        pops = population_runs(outcome, study=study, registered_model=registered_model, metrics_version=metrics_version)
        log_population_runs(client, experiment_id, run_id, pops, children)
        with tempfile.TemporaryDirectory(prefix="compbias-audit-") as tmp:
            out = Path(tmp)
            (out / "tables").mkdir()
            for name, frame in outcome.tables.items():
                if frame is None:
                    continue
                clean = frame.copy()
                for col in clean.columns:
                    if clean[col].dtype == object:
                        clean[col] = clean[col].map(lambda v: v if v is None or isinstance(v, (str, bytes)) else str(v))
                clean.to_parquet(out / "tables" / f"{name}.parquet", index=False)
                clean.to_csv(out / "tables" / f"{name}.csv", index=False)  # MLflow's artifact viewer shows CSV, not parquet
                (out / "tables" / f"{name}.html").write_text(table_html(frame, max_rows=100000))
            cie = outcome.tables.get("cie_list")
            (cie if cie is not None else pd.DataFrame()).to_csv(out / "cie.csv", index=False)
            pngs: dict[str, bytes] = {}
            notes = list(outcome.notes)
            if figures:
                (out / "figures").mkdir()
                figs, fig_notes = make_figures(outcome, split)
                notes += fig_notes
                for name, fig in figs.items():
                    pngs[name] = F.to_png(fig)
                    (out / "figures" / f"{name}.png").write_bytes(pngs[name])
            verdicts = {k: {"status": o.status, "reason": o.reason, **o.values} for k, o in outcome.versions.items()}
            summary = {"run_id": run_id, "study": study, "registered_model": registered_model,
                       "metrics_version": metrics_version, "summary": outcome.summary, "versions": verdicts}
            (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1, default=str))
            report = render_report(
                title=f"compbias audit of {study} ({registered_model})",
                summary=outcome.summary,
                settings=_jsonable({**params, "thresholds": settings.thresholds}),
                tables=outcome.tables,
                figures=pngs,
                notes=notes,
                run_info={"audit run": run_id, "study": study, "registered model": registered_model,
                          "metrics version": metrics_version, "audited at (UTC)": stamp},
            )
            (out / "report.html").write_text(report)
            client.log_artifacts(run_id, str(out))
            report_path = None
            if output_dir is not None:
                dest = Path(output_dir) / f"audit-{study}-{run_id}"
                shutil.copytree(out, dest, dirs_exist_ok=True)
                report_path = str(dest / "report.html")
        local = local_dir(client.get_run(run_id).info.artifact_uri)
        if report_path is None and local is not None and (local / "report.html").is_file():
            report_path = str(local / "report.html")
        ok = True
        return run_id, report_path
    finally:
        if not ok:
            fail_children(client, children, f"the audit run {run_id} failed before it finished")
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def local_dir(uri: str) -> Path | None:
    """The local directory of a ``file:`` (or plain path) artifact URI; None for a remote store."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(url2pathname(parsed.path) if parsed.scheme else uri)
    return None
