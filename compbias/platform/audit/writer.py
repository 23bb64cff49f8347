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

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import figures as F
from compbias.platform.audit import tags as T
from compbias.platform.audit.compute import StudyAudit, key_part
from compbias.platform.audit.report import render_report, table_html

log = logging.getLogger("compbias.audit")

GALLERY_PER_POPULATION = 12
GALLERY_MAX_POPULATIONS = 4

#: ``compbias.run_kind`` of the child run an audit logs per compressed population
RUN_KIND_AUDIT_POPULATION = C.RUN_KIND_AUDIT_POPULATION
#: tag MLflow's UI nests a child run under its parent by
PARENT_RUN_TAG = "mlflow.parentRunId"
#: tag MLflow puts on a dataset input: what the run did with it
DATASET_CONTEXT_TAG = "mlflow.data.context"


def make_figures(outcome: StudyAudit, study_file: dict | None = None) -> tuple[dict, list[str]]:
    """Draw every figure of an audit.

    Parameters
    ----------
    outcome : StudyAudit
    study_file : dict, optional
        Needed for the CIE gallery (it names the dataset).

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
    if cie is not None and not cie.empty and study_file is not None and outcome.data is not None:
        from compbias.platform.audit.gallery import GalleryUnavailable, load_images

        pops = (bias.sort_values("cev", ascending=False)[["method", "level"]].head(GALLERY_MAX_POPULATIONS).itertuples(index=False)
                if bias is not None and not bias.empty else [])
        for method, level in pops:
            part = cie[(cie["method"] == method) & (cie["level"] == level)].head(GALLERY_PER_POPULATION)
            if part.empty:
                continue
            try:
                images = load_images(study_file, part["example_id"].astype(int).tolist(), outcome.data.test_frame)
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


@dataclass
class PopulationRun:
    """What the child run of one compressed population logs.

    Attributes
    ----------
    method, level : str
    name : str
        Run name, ``<method>@<level>``.
    params : dict of str to str
    metrics : dict of str to float
        The same keys in every child of an audit (a value undefined for one
        population, e.g. CEV when no class has a defined change, is left out
        and named in the tag ``compbias.audit.undefined``).
    tags : dict of str to str
    """

    method: str
    level: str
    name: str
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


#: metrics every child carries when the audit defines them (the rest, CIs, CIE fractions, SVCCA layers, follow the audit's settings)
CHILD_CORE_METRICS = ("acc", "acc_drop", "cev", "sde", "pie", "worst_group_fpr_change", "cie_acc_top1pct",
                      "gate_overall_change_pp", "gate_worst_excess_pp")


def sparsity_of(level) -> float | None:
    """The level as a sparsity (a number in [0, 1], e.g. ``0.9``), or None (``int8_static``, ``fp16``...)."""
    try:
        v = float(level)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0.0 <= v <= 1.0 else None


def _finite_or_none(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _unfold(metrics: dict[str, float], method: str, level: str) -> dict[str, float]:
    """The parent's folded keys of one population, without the population: ``cie/acc_top1pct/m/0.9`` -> ``cie_acc_top1pct``."""
    want = [key_part(method), key_part(level)]
    out = {}
    for key, value in metrics.items():
        parts = key.split("/")
        for i in range(1, len(parts) - 1):
            if parts[i:i + 2] == want:
                out["_".join(parts[:i] + parts[i + 2:])] = value
                break
    return out


def _rows_of(table: pd.DataFrame | None, method: str, level: str) -> pd.DataFrame:
    if table is None or table.empty or "method" not in table or "level" not in table:
        return pd.DataFrame()
    return table[(table["method"] == method) & (table["level"] == level)]


def _gate_values(gate: pd.DataFrame) -> tuple[dict, dict]:
    """Metrics and params of the default gate's rows of one population."""
    metrics: dict = {}
    params: dict = {}
    if gate.empty:
        return metrics, params
    overall = gate[gate["cell"] == "overall"]
    if len(overall):
        o = overall.iloc[0]
        metrics["gate_overall_change_pp"] = o.get("overall_change_pp")
        metrics["gate_overall_ci_low"] = o.get("overall_ci_low")
        metrics["gate_overall_ci_high"] = o.get("overall_ci_high")
    cells = gate[(gate["cell"] != "overall") & gate["excess_ci_low"].map(lambda v: _finite_or_none(v) is not None)]
    cells = cells[cells["estimable"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v))]
    if len(cells):
        # the cell the gate would name: the largest lower bound of the excess harm
        w = cells.loc[cells["excess_ci_low"].astype(float).idxmax()]
        metrics["gate_worst_excess_pp"] = w.get("excess_pp")
        metrics["gate_worst_excess_ci_low"] = w.get("excess_ci_low")
        metrics["gate_worst_excess_ci_high"] = w.get("excess_ci_high")
        params["gate_worst_cell"] = f"{w['cell']} {w['name']} (n={int(w['n'])})"
    fails = gate["fails"].astype(bool)
    metrics["gate_fail"] = float(fails.any())
    metrics["gate_n_failing_cells"] = float(fails[gate["cell"] != "overall"].sum())
    return metrics, params


def population_runs(outcome: StudyAudit, *, study: str, registered_model: str, metrics_version: str) -> list[PopulationRun]:
    """One child run's content per compressed population the audit computed.

    Metric keys are the parent's folded keys without ``/<method>/<level>``
    (``cev/magnitude/0.9`` -> ``cev``, ``cev/.../ci_low`` -> ``cev_ci_low``,
    ``cie/acc_top1pct/...`` -> ``cie_acc_top1pct``, ``svcca/.../<layer>`` ->
    ``svcca_<layer>``), plus ``n_models``, ``pie_fraction``, ``sparsity``
    (pruning levels), ``acc_baseline``, the default gate's numbers
    (``gate_worst_excess_pp`` and its interval: the cell with the largest
    lower bound; ``gate_overall_change_pp`` and its interval; ``gate_fail``)
    and the verdicts on the audited versions of the population
    (``n_pass``, ``n_fail``, ``n_error``).

    Parameters
    ----------
    outcome : StudyAudit
    study, registered_model, metrics_version : str

    Returns
    -------
    list of PopulationRun
        In the order of the ``bias`` table (method, then level).
    """
    bias = outcome.tables.get("bias")
    if bias is None or bias.empty:
        return []
    base_acc = outcome.metrics.get("acc/baseline")
    out = []
    for row in bias.to_dict("records"):
        method, level = str(row["method"]), str(row["level"])
        metrics = _unfold(outcome.metrics, method, level)
        metrics["n_models"] = row.get("n_models")
        metrics["pie_fraction"] = row.get("pie_fraction")
        metrics["acc_baseline"] = base_acc
        sparsity = sparsity_of(level)
        if sparsity is not None:
            metrics["sparsity"] = sparsity
        gate_metrics, gate_params = _gate_values(_rows_of(outcome.tables.get("gate"), method, level))
        metrics.update(gate_metrics)
        verdicts = _rows_of(outcome.tables.get("versions"), method, level)
        statuses = verdicts["status"].value_counts() if len(verdicts) else pd.Series(dtype=int)
        for s in T.STATUSES:
            metrics[f"n_{s}"] = float(statuses.get(s, 0))
        clean = {k: f for k, v in metrics.items() if (f := _finite_or_none(v)) is not None}
        undefined = sorted(k for k in CHILD_CORE_METRICS if k not in clean)
        params = {"method": method, "level": level, "n_models": int(row.get("n_models") or 0)}
        if sparsity is not None:
            params["sparsity"] = f"{sparsity:g}"
        params["worst_group"] = str(row.get("worst_group")) if row.get("worst_group") is not None else "none"
        params.update(gate_params)
        members = _rows_of(outcome.tables.get("models"), method, level)
        name = f"{method}@{level}"
        tags = {
            T.RUN_KIND: RUN_KIND_AUDIT_POPULATION,
            T.STUDY: study,
            C.REGISTERED_MODEL: registered_model,
            T.METRICS_VERSION: metrics_version,
            C.AUDIT_POPULATION: name,
            C.AUDIT_VERSIONS: ",".join(members["version"].astype(str))[:5000] if len(members) else "",
            "mlflow.runName": name,
        }
        if undefined:
            tags[C.AUDIT_UNDEFINED] = ",".join(undefined)
        out.append(PopulationRun(method, level, name, params, clean, tags))
    return out


def evaluation_dataset(outcome: StudyAudit, study: str, dataset: dict | None = None):
    """The test set the audit audited, as an MLflow dataset (``example_id``, ``label``, the group columns).

    Named ``<dataset kind>-test`` like the model runs' evaluation input; the
    digest hashes the frame, so it equals theirs when the audit saw the same
    test examples in the same order.

    Parameters
    ----------
    outcome : StudyAudit
    study : str
    dataset : dict, optional
        The study file's ``dataset`` section (its ``kind`` names the dataset).

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
    kind = str((dataset or {}).get("kind") or study)
    source = CodeDatasetSource({"dataset": kind, "audited_by": "compbias audit", "study": study})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # schema hints about integer columns
        ds = mlflow.data.from_pandas(frame, source=source, name=f"{kind}-test", targets="label")
        return ds._to_mlflow_entity()


def _end_run_quietly(client: MlflowClient, run_id: str, status: str) -> None:
    """Set a child run's status and end time without MLflow's two "View run ... at" console lines per run.

    ``MlflowClient.set_terminated`` prints them (and reads the run again) on
    tracking servers; an audit with many populations would print a screenful.
    """
    from mlflow.entities import RunStatus

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if store is None or not hasattr(store, "update_run_info"):  # pragma: no cover - another MLflow layout
        client.set_terminated(run_id, status)
        return
    store.update_run_info(run_id, RunStatus.from_string(status), int(time.time() * 1000), None)


def _log_population_runs(client: MlflowClient, experiment_id: str, parent_id: str, pops: list[PopulationRun],
                         created: list[str]) -> None:
    """Create, fill (one ``log_batch``) and finish each child run; ``created`` collects their ids as they appear."""
    now = int(time.time() * 1000)
    for pop in pops:
        child = client.create_run(experiment_id, start_time=now, tags={**pop.tags, PARENT_RUN_TAG: parent_id})
        cid = child.info.run_id
        created.append(cid)
        client.log_batch(cid, metrics=[Metric(k, v, now, 0) for k, v in sorted(pop.metrics.items())],
                         params=[Param(k, str(v)) for k, v in pop.params.items()])
        _end_run_quietly(client, cid, "FINISHED")


def _fail_children(client: MlflowClient, run_ids: list[str], why: str) -> None:
    """Mark the children of an audit run that did not finish as FAILED (each on its own: one failing call stops none)."""
    for cid in run_ids:
        try:
            client.set_tag(cid, C.AUDIT_INCOMPLETE, why)
            _end_run_quietly(client, cid, "FAILED")
        except Exception:  # the store may be what failed; the next audit closes what is left RUNNING
            log.warning("could not mark audit child run %s as failed", cid, exc_info=True)


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
    study_file: dict | None = None,
    dataset: dict | None = None,
) -> tuple[str, str | None]:
    """Log the audit run and return its id and the local path of its report.

    The run gets its metrics and params (one ``log_batch`` per 1000
    metrics), the audited test set as a dataset input (context
    ``evaluation``), one finished child run per compressed population
    (:func:`population_runs`), then every artifact in one upload. When
    anything fails, the run and every child created so far end ``FAILED``
    (an auditor killed outright leaves them ``RUNNING``; the next audit's
    :func:`compbias.platform.audit.service.close_abandoned_runs` closes them).

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
    study_file : dict, optional
        Passed to :func:`make_figures` (the CIE gallery).
    dataset : dict, optional
        The study file's ``dataset`` section: names the evaluation dataset input.

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
        evaluation = evaluation_dataset(outcome, study, dataset if dataset is not None else (study_file or {}).get("dataset"))
        if evaluation is not None:
            from mlflow.entities import DatasetInput, InputTag

            client.log_inputs(run_id, datasets=[DatasetInput(evaluation, tags=[InputTag(DATASET_CONTEXT_TAG, "evaluation")])])
        pops = population_runs(outcome, study=study, registered_model=registered_model, metrics_version=metrics_version)
        _log_population_runs(client, experiment_id, run_id, pops, children)
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
                figs, fig_notes = make_figures(outcome, study_file)
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
        local = _local_dir(client.get_run(run_id).info.artifact_uri)
        if report_path is None and local is not None and (local / "report.html").is_file():
            report_path = str(local / "report.html")
        ok = True
        return run_id, report_path
    finally:
        if not ok:
            _fail_children(client, children, f"the audit run {run_id} failed before it finished")
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def _local_dir(uri: str) -> Path | None:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(url2pathname(parsed.path) if parsed.scheme else uri)
    return None
