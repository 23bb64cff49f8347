"""Close the audit runs of auditors that died before finishing them."""

from __future__ import annotations

import logging
import time

from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import tags as T
from compbias.platform.audit.children import PARENT_RUN_TAG, RUN_KIND_AUDIT_POPULATION

log = logging.getLogger("compbias.audit")


def close_abandoned_runs(client: MlflowClient, experiment_id: str, ttl: float) -> list[str]:
    """Mark audit runs (and their per-population children) left RUNNING by killed auditors as KILLED.

    An audit run is created only after the computation, and its logging takes
    seconds; one still RUNNING after ``ttl`` seconds belongs to an auditor
    that died.  No version's status tag points at it (the status is written
    after the run is finished), so closing it loses nothing.  Its child runs
    (``compbias.run_kind=audit_population``) are closed with it, also those
    that finished: they belong to an audit that did not.  A child still
    RUNNING after ``ttl`` is closed too, whatever its parent's state.

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    ttl : float
        Seconds.

    Returns
    -------
    list of str
        The run ids closed (audit runs, then children).
    """
    now_ms = time.time() * 1000
    closed: list[str] = []
    why = "its auditor stopped before finishing; a later audit redid the work"

    def search(flt: str) -> list:
        try:
            return client.search_runs([experiment_id], filter_string=flt, max_results=1000)
        except Exception:  # pragma: no cover - a search failure must not stop the audit
            log.warning("could not search for abandoned audit runs (%s)", flt, exc_info=True)
            return []

    def close(run) -> None:
        client.set_tag(run.info.run_id, C.AUDIT_ABANDONED, why)
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)

    running = "attributes.status = 'RUNNING'"
    for run in search(f"tags.`{T.RUN_KIND}` = '{T.RUN_KIND_AUDIT}' and {running}"):
        if now_ms - run.info.start_time > ttl * 1000:
            close(run)
            for child in search(f"tags.`{PARENT_RUN_TAG}` = '{run.info.run_id}'"):
                if child.info.status in ("RUNNING", "FINISHED", "SCHEDULED"):
                    close(child)
    for child in search(f"tags.`{T.RUN_KIND}` = '{RUN_KIND_AUDIT_POPULATION}' and {running}"):
        if child.info.run_id not in closed and now_ms - child.info.start_time > ttl * 1000:
            close(child)
    return closed
