"""Write the audit's outcome onto registered model versions, and the alias.

Tags are written in one fixed order so that a killed auditor leaves no version
that looks audited but is not:

1. delete ``compbias.audit.status`` (from this moment the version reads as
   "not audited" by everyone);
2. delete the ``compbias.audit.*`` tags the new outcome does not set (left by
   an older audit);
3. set every new tag except the status (key figures, run id, reason, metrics
   version);
4. set ``compbias.audit.status`` last.

Readers (:func:`compbias.platform.audit.tags.is_audited`) require the status
and the current metrics version, so a version stopped anywhere before step 4
is audited again, from scratch, by the next auditor.

That order is what the per-tag path (:func:`write_version_tags`, one MLflow
call and one transaction per tag) relies on; a tracking server gets it.  On a
SQL registry store the audit uses :func:`write_tags_batch` instead: the same
tags for every version of a study, in one transaction of the store's session,
so a version has either its old complete set or its new one.

The alias (``audited`` by default) is a pointer to *one* version of a
registered model (MLflow aliases are unique per model).  It is kept on the
newest compressed version whose status is ``pass`` under the current metrics
version, and removed when there is none, so it never points at a version that
failed or errored.  :func:`reconcile_alias` recomputes it from the tags, so an
auditor stopped between the tags and the alias is corrected by the next one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from compbias.platform.audit import tags as T
from compbias.platform.audit.selection import VersionRecord, list_versions

MAX_TAG_VALUE = 5000


def _registry(client: MlflowClient):
    """The client's registry client: its tag calls skip ``MlflowClient``'s extra
    per-call lookup of the registered model (a prompt check that costs one
    query per tag); compbias versions are never prompts."""
    get = getattr(client, "_get_registry_client", None)
    try:
        return get() if get is not None else client
    except Exception:  # pragma: no cover - private API changed
        return client


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def _new_tags(status: str, values: Mapping[str, object], run_id: str | None, metrics_version: str) -> dict[str, str]:
    """The ``compbias.audit.*`` tags of one outcome, without the status."""
    if status not in T.STATUSES:
        raise ValueError(f"audit status must be one of {T.STATUSES}, got {status!r}")
    new = {f"{T.AUDIT_PREFIX}{k}": _text(v) for k, v in values.items() if v is not None}
    if run_id:
        new[T.RUN_ID] = run_id
    new[T.AUDITED_AT] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new[T.METRICS_VERSION] = metrics_version
    new.pop(T.STATUS, None)
    return new


def write_version_tags(
    client: MlflowClient,
    record: VersionRecord,
    status: str,
    values: Mapping[str, object],
    *,
    run_id: str | None,
    metrics_version: str,
) -> dict[str, str]:
    """Record one version's audit outcome, status last.

    Parameters
    ----------
    client : MlflowClient
    record : VersionRecord
    status : {'pass', 'fail', 'error'}
    values : mapping
        Short names (``cev``, ``reason``...) to values; each becomes the tag
        ``compbias.audit.<name>``.  None values are left out.
    run_id : str or None
        The audit run.
    metrics_version : str

    Returns
    -------
    dict of str to str
        The tags written.
    """
    new = _new_tags(status, values, run_id, metrics_version)
    reg = _registry(client)
    current = dict(reg.get_model_version(record.name, record.version).tags or {})
    if T.STATUS in current:
        reg.delete_model_version_tag(record.name, record.version, T.STATUS)
    for key in current:
        if key.startswith(T.AUDIT_PREFIX) and key != T.STATUS and key not in new:
            reg.delete_model_version_tag(record.name, record.version, key)
    # everything else first (unchanged values are not rewritten), then always
    # metrics_version and the status, in that order
    for key in sorted(new, key=lambda k: k == T.METRICS_VERSION):
        if key == T.METRICS_VERSION or current.get(key) != new[key]:
            reg.set_model_version_tag(record.name, record.version, key, new[key])
    reg.set_model_version_tag(record.name, record.version, T.STATUS, status)
    new[T.STATUS] = status
    return new


BATCH_ENV = "COMPBIAS_AUDIT_TAG_BATCH"


def sql_registry_store(client: MlflowClient):
    """The client's registry store when it is MLflow's SQL store (SQLite,
    PostgreSQL, MySQL...), else None (a tracking server, a file store, a
    changed private API, or ``COMPBIAS_AUDIT_TAG_BATCH=0``)."""
    if os.environ.get(BATCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

        store = _registry(client).store
    except Exception:  # pragma: no cover - private API changed
        return None
    if not isinstance(store, SqlAlchemyStore):
        return None
    if not all(hasattr(store, a) for a in ("ManagedSessionMaker", "_get_query", "_get_eager_model_version_query_options")):
        return None  # pragma: no cover - private API changed
    return store


def write_tags_batch(
    client: MlflowClient,
    items: Sequence[tuple[VersionRecord, str, Mapping[str, object]]],
    *,
    run_id: str | None,
    metrics_version: str,
) -> dict[tuple[str, str], dict[str, str]] | None:
    """Record the outcomes of many versions in one database transaction.

    The same tags as :func:`write_version_tags` (same values, same removal of
    ``compbias.audit.*`` tags the new outcome does not set), written through
    the registry store's own session: the SQL store's
    ``set_model_version_tag`` opens a session, looks the version up and merges
    one ``model_version_tags`` row, and commits -- one transaction per tag.
    Here the versions and their tags are loaded in a few queries, and every
    new, changed or stale row is inserted, updated or deleted in *one*
    session, committed once: all versions get their complete new set, or (on any error, or a
    killed process) none changes.  So no version ever carries a partial set,
    without relying on the status-last order.

    Parameters
    ----------
    client : MlflowClient
    items : sequence of (VersionRecord, status, values)
        As the arguments of :func:`write_version_tags`.
    run_id : str or None
    metrics_version : str

    Returns
    -------
    dict or None
        ``(name, version)`` to the tags written, or None when the registry is
        not a SQL store (nothing written: use :func:`write_version_tags`).
    """
    store = sql_registry_store(client)
    if store is None:
        return None
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersionTag
    from mlflow.utils.validation import _validate_model_version_tag

    plans = []
    for record, status, values in items:
        new = _new_tags(status, values, run_id, metrics_version)
        new[T.STATUS] = status
        for key, value in new.items():
            _validate_model_version_tag(key, value)
        plans.append((record, new))
    written: dict[tuple[str, str], dict[str, str]] = {}
    with store.ManagedSessionMaker(read_only=False) as session:
        rows = _load_versions(store, session, [record for record, _ in plans])
        for record, new in plans:
            row = rows[(record.name, int(record.version))]
            current = {t.key: t for t in row.model_version_tags}
            for key, tag in current.items():
                if key.startswith(T.AUDIT_PREFIX) and key not in new:
                    session.delete(tag)
            for key, value in new.items():
                old = current.get(key)
                if old is None:  # a new row: a plain INSERT (``merge`` would SELECT it first)
                    session.add(SqlModelVersionTag(workspace=row.workspace, name=row.name, version=row.version,
                                                   key=key, value=value))
                elif old.value != value:  # the loaded row: an UPDATE
                    old.value = value
            written[(record.name, str(record.version))] = new
    return written


def _load_versions(store, session, records: Sequence[VersionRecord], chunk: int = 500) -> dict:
    """The live ``SqlModelVersion`` rows of ``records``, their tags loaded, in a
    few queries (one per registered model and ``chunk`` versions) instead of
    one per version; a missing one raises as ``set_model_version_tag`` would."""
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersion
    from mlflow.store.model_registry.sqlalchemy_store import STAGE_DELETED_INTERNAL

    wanted: dict[str, list[int]] = {}
    for r in records:
        wanted.setdefault(r.name, []).append(int(r.version))
    rows = {}
    for name, numbers in wanted.items():
        for i in range(0, len(numbers), chunk):
            part = numbers[i : i + chunk]
            query = (store._get_query(session, SqlModelVersion)
                     .options(*store._get_eager_model_version_query_options())
                     .filter(SqlModelVersion.name == name, SqlModelVersion.version.in_(part),
                             SqlModelVersion.current_stage != STAGE_DELETED_INTERNAL))
            rows.update({(row.name, int(row.version)): row for row in query.all()})
    for r in records:
        if (r.name, int(r.version)) not in rows:
            raise MlflowException(f"Model Version (name={r.name}, version={r.version}) not found",
                                  RESOURCE_DOES_NOT_EXIST)
    return rows


def clear_partial(client: MlflowClient, record: VersionRecord) -> None:
    """Remove the ``compbias.audit.*`` tags of a version whose audit never completed.

    Parameters
    ----------
    client : MlflowClient
    record : VersionRecord
    """
    reg = _registry(client)
    current = dict(reg.get_model_version(record.name, record.version).tags or {})
    if T.STATUS in current:
        return
    for key in current:
        if key.startswith(T.AUDIT_PREFIX):
            reg.delete_model_version_tag(record.name, record.version, key)


def alias_holder(records: list[VersionRecord], metrics_version: str) -> VersionRecord | None:
    """Pick the version that should carry the alias.

    Parameters
    ----------
    records : list of VersionRecord
        Versions of one registered model.
    metrics_version : str

    Returns
    -------
    VersionRecord or None
        The newest compressed version whose audit by ``metrics_version``
        passed; None when no version passed.
    """
    passing = [
        r
        for r in records
        if not r.is_baseline and r.audited(metrics_version) and r.tags.get(T.STATUS) == T.STATUS_PASS
    ]
    return max(passing, key=lambda r: int(r.version)) if passing else None


def reconcile_alias(client: MlflowClient, name: str, alias: str, metrics_version: str, records: list[VersionRecord] | None = None) -> str | None:
    """Point ``alias`` at the registered model's newest passing compressed version.

    Parameters
    ----------
    client : MlflowClient
    name : str
        Registered model.
    alias : str
    metrics_version : str
    records : list of VersionRecord, optional
        Its versions with current tags (listed again when not given).

    Returns
    -------
    str or None
        The version now holding the alias, or None when it was removed.
    """
    if records is None:
        records = list_versions(client, registered_model=name)
    holder = alias_holder([r for r in records if r.name == name], metrics_version)
    try:
        current = client.get_model_version_by_alias(name, alias).version
    except MlflowException as exc:
        if exc.error_code not in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "INVALID_PARAMETER_VALUE"):
            raise
        current = None
    if holder is None:
        if current is not None:
            client.delete_registered_model_alias(name, alias)
        return None
    if str(current) != holder.version:
        client.set_registered_model_alias(name, alias, holder.version)
    return holder.version
