"""The audit's outcome tags written in one transaction (SQL registries) equal the per-tag writes, all or nothing."""

from __future__ import annotations

import pytest
import sqlalchemy.event
import sqlalchemy.orm
from mlflow.store.model_registry.dbmodels.models import SqlModelVersionTag

from compbias.platform.audit import Selection, current_metrics_version, run_audit
from compbias.platform.audit import registry as R
from compbias.platform.audit import tags as T
from compbias.platform.audit.selection import list_versions


class Killed(Exception):
    pass


OUTCOMES = [  # (status, values): the same shapes the service writes
    ("pass", {"acc": 0.91234567, "acc_drop": 0.4, "cev": 1.5, "sde": 0.02, "reason": "", "alias": "audited"}),
    ("fail", {"acc": 0.8, "cev": 3.1e5, "worst_group": "ink=1", "reason": "cev 3.1e+05 > 200000", "alias": "audited"}),
    ("error", {"reason": "x" * 6000, "alias": "audited", "cev": None}),  # long value cut, None left out
]


def _tags(client, rec) -> dict[str, str]:
    return dict(client.get_model_version(rec.name, rec.version).tags)


def _reset(client, rec, tags: dict[str, str]) -> None:
    for key in _tags(client, rec):
        client.delete_model_version_tag(rec.name, rec.version, key)
    for key, value in tags.items():
        client.set_model_version_tag(rec.name, rec.version, key, value)


def _stale(mv: str) -> dict[str, str]:
    """An earlier complete audit with a key figure the new outcomes do not set."""
    return {T.STATUS: "pass", T.RUN_ID: "old", T.METRICS_VERSION: "old-mv", "compbias.audit.sde": "9",
            "compbias.audit.svcca_distance_logits": "0.3", "compbias.audit.alias": "audited"}


def test_batch_writes_exactly_the_per_tag_tags(client, registered, monkeypatch):
    mv = current_metrics_version()
    monkeypatch.setattr(R.time, "strftime", lambda fmt, t=None: "2026-01-02T03:04:05Z")
    recs = list_versions(client)[: len(OUTCOMES)]
    assert R.sql_registry_store(client) is not None
    for stale in (False, True):  # never audited, then audited before (stale tags to remove)
        per_tag, batched = {}, {}
        for rec, (status, values) in zip(recs, OUTCOMES):
            before = {k: v for k, v in rec.tags.items() if not k.startswith(T.AUDIT_PREFIX)}  # lineage
            if stale:
                before.update(_stale(mv))
            _reset(client, rec, before)
            returned = R.write_version_tags(client, rec, status, values, run_id="r1", metrics_version=mv)
            per_tag[rec.key] = _tags(client, rec)
            assert {k: v for k, v in per_tag[rec.key].items() if k.startswith(T.AUDIT_PREFIX)} == returned
            _reset(client, rec, before)
        written = R.write_tags_batch(client, [(r, s, v) for r, (s, v) in zip(recs, OUTCOMES)], run_id="r1",
                                     metrics_version=mv)
        for rec in recs:
            batched[rec.key] = _tags(client, rec)
            assert {k: v for k, v in batched[rec.key].items() if k.startswith(T.AUDIT_PREFIX)} == \
                written[(rec.name, rec.version)]
        assert batched == per_tag
        assert all(T.is_audited(t, mv) for t in batched.values())
        assert "compbias.audit.sde" not in batched[recs[1].key]  # stale figure removed / never set
        assert len(batched[recs[2].key]["compbias.audit.reason"]) == R.MAX_TAG_VALUE
        assert any(not k.startswith(T.AUDIT_PREFIX) for k in batched[recs[0].key])  # lineage tags untouched


def test_audit_uses_the_batch_and_tags_as_the_per_tag_path(client, registered, spec, options, monkeypatch):
    """A whole audit on SQLite writes through the batch, with the same tags as the per-tag (REST) path."""
    mv = current_metrics_version()
    monkeypatch.setenv(R.BATCH_ENV, "0")
    (old,) = run_audit(client, options=options)
    per_tag = {r.key: r.tags for r in list_versions(client)}
    monkeypatch.delenv(R.BATCH_ENV)

    def no_per_tag(*a, **k):
        raise AssertionError("the SQL store must be written in one batch, not tag by tag")

    monkeypatch.setattr("compbias.platform.audit.service.write_version_tags", no_per_tag)
    (new,) = run_audit(client, Selection(registered_model=spec.registered_model, force=True), options)
    assert new.run_id != old.run_id and new.statuses == old.statuses
    batched = {r.key: r.tags for r in list_versions(client)}
    assert batched.keys() == per_tag.keys() and len(batched) == len(old.statuses)
    for key, tags in batched.items():
        assert tags[T.RUN_ID] == new.run_id and per_tag[key][T.RUN_ID] == old.run_id
        assert T.is_audited(tags, mv)
        drop = {T.RUN_ID, T.AUDITED_AT}
        assert {k: v for k, v in tags.items() if k not in drop} == {k: v for k, v in per_tag[key].items() if k not in drop}


@pytest.mark.parametrize("where", ["third version", "commit"])
@pytest.mark.parametrize("audited_before", [False, True])
def test_failure_inside_the_batch_changes_no_version(client, registered, monkeypatch, audited_before, where):
    mv = current_metrics_version()
    recs = list_versions(client)
    assert len(recs) >= 4
    if audited_before:
        R.write_tags_batch(client, [(r, "pass", {"cev": 1.0, "sde": 2.0}) for r in recs], run_id="r1", metrics_version=mv)
    before = {r.key: _tags(client, r) for r in recs}
    seen = []

    def failing_add(self, instance, *a, **k):  # the batch's new rows go through Session.add
        original_add(self, instance, *a, **k)
        if isinstance(instance, SqlModelVersionTag):
            seen.append((instance.name, instance.version))
            if len(set(seen)) == 3:  # two versions done, the third begun: send the rows, then fail
                self.flush()
                raise Killed()

    def failing_flush(session, context):  # every row sent to the database, the commit not yet made
        seen.append("flushed")
        raise Killed()

    original_add = sqlalchemy.orm.Session.add
    items = [(r, "fail", {"cev": 5.0, "acc": 0.5, "reason": "cev 5 > 1"}) for r in recs]
    if where == "commit":
        sqlalchemy.event.listen(sqlalchemy.orm.Session, "after_flush", failing_flush)
    else:
        monkeypatch.setattr(sqlalchemy.orm.Session, "add", failing_add)
    try:
        with pytest.raises(Exception) as err:  # the store's session wraps it in an MlflowException
            R.write_tags_batch(client, items, run_id="r2", metrics_version=mv)
    finally:
        if where == "commit":
            sqlalchemy.event.remove(sqlalchemy.orm.Session, "after_flush", failing_flush)
        monkeypatch.setattr(sqlalchemy.orm.Session, "add", original_add)
    assert isinstance(err.value, Killed) or isinstance(err.value.__cause__, Killed)
    assert len(set(seen)) == (1 if where == "commit" else 3)
    for r in recs:
        tags = _tags(client, r)
        assert not T.is_partial(tags), f"{r.key} carries a partial set of audit tags: {tags}"
        assert tags == before[r.key]
    R.write_tags_batch(client, items, run_id="r2", metrics_version=mv)  # the next auditor completes it
    assert all(_tags(client, r)[T.RUN_ID] == "r2" and T.is_audited(_tags(client, r), mv) for r in recs)


def test_not_a_sql_registry_writes_nothing_and_the_caller_falls_back(client, registered, monkeypatch):
    rec = list_versions(client)[0]
    before = _tags(client, rec)
    monkeypatch.setenv(R.BATCH_ENV, "0")
    assert R.sql_registry_store(client) is None
    assert R.write_tags_batch(client, [(rec, "pass", {"cev": 1.0})], run_id="r", metrics_version="m") is None
    assert _tags(client, rec) == before
    monkeypatch.delenv(R.BATCH_ENV)
    with pytest.raises(ValueError):  # a bad status is refused before anything is written
        R.write_tags_batch(client, [(rec, "ok", {"cev": 1.0})], run_id="r", metrics_version="m")
    assert _tags(client, rec) == before
