"""The child runs of an audit: one per compressed population, the same metric keys in each.

MLflow's compare view charts children against the level when every child
carries the same keys; :func:`population_runs` builds their content from an
audit's tables and metrics, :func:`log_population_runs` logs them under the
audit run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import tags as T
from compbias.platform.audit.compute import StudyAudit, key_part

__all__ = ["CHILD_CORE_METRICS", "PARENT_RUN_TAG", "PopulationRun", "RUN_KIND_AUDIT_POPULATION", "fail_children",
           "log_population_runs", "population_runs", "sparsity_of"]

log = logging.getLogger("compbias.audit")

#: ``compbias.run_kind`` of the child run an audit logs per compressed population
RUN_KIND_AUDIT_POPULATION = C.RUN_KIND_AUDIT_POPULATION
#: tag MLflow's UI nests a child run under its parent by
PARENT_RUN_TAG = "mlflow.parentRunId"


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


def log_population_runs(client: MlflowClient, experiment_id: str, parent_id: str, pops: list[PopulationRun],
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


def fail_children(client: MlflowClient, run_ids: list[str], why: str) -> None:
    """Mark the children of an audit run that did not finish as FAILED (each on its own: one failing call stops none)."""
    for cid in run_ids:
        try:
            client.set_tag(cid, C.AUDIT_INCOMPLETE, why)
            _end_run_quietly(client, cid, "FAILED")
        except Exception:  # the store may be what failed; the next audit closes what is left RUNNING
            log.warning("could not mark audit child run %s as failed", cid, exc_info=True)
