"""Tags are written status-last; a killed auditor leaves nothing that reads as audited."""

from __future__ import annotations

import pytest

from compbias.platform.audit import current_metrics_version, run_audit
from compbias.platform.audit import tags as T
from compbias.platform.audit.claims import ClaimManager, backend_for
from compbias.platform.audit.registry import alias_holder, reconcile_alias, write_version_tags
from compbias.platform.audit.selection import list_versions


class Killed(Exception):
    pass


def test_status_is_written_last_and_a_partial_write_is_not_audited(client, registered, spec, monkeypatch):
    mv = current_metrics_version()
    rec = next(r for r in list_versions(client) if r.version == registered[(0, "magnitude", "0.5")])
    reg = client._get_registry_client()
    calls = []
    original = type(reg).set_model_version_tag

    def recording(self, name, version, key, value):
        calls.append(key)
        if len(calls) == 3:
            raise Killed()
        return original(self, name, version, key, value)

    monkeypatch.setattr(type(reg), "set_model_version_tag", recording)
    with pytest.raises(Killed):
        write_version_tags(client, rec, "pass", {"cev": 1.0, "sde": 2.0, "acc": 0.9}, run_id="r1", metrics_version=mv)
    tags = dict(client.get_model_version(rec.name, rec.version).tags)
    assert not T.is_audited(tags, mv) and T.is_partial(tags)
    monkeypatch.setattr(type(reg), "set_model_version_tag", original)
    calls.clear()
    monkeypatch.setattr(type(reg), "set_model_version_tag", lambda self, *a: (calls.append(a[2]), original(self, *a))[1])
    write_version_tags(client, rec, "fail", {"cev": 3.0, "acc": 0.8}, run_id="r2", metrics_version=mv)
    assert calls[-1] == T.STATUS and calls[-2] == T.METRICS_VERSION
    tags = dict(client.get_model_version(rec.name, rec.version).tags)
    assert T.is_audited(tags, mv) and tags[T.STATUS] == "fail" and tags[T.RUN_ID] == "r2"
    assert "compbias.audit.sde" not in tags  # left over from the killed audit, removed


def test_killed_auditor_is_completed_by_the_next(client, registered, spec, options):
    """An auditor died after claiming and half-tagging a version: the next one audits it fully."""
    mv = current_metrics_version()
    victim = next(r for r in list_versions(client) if r.version == registered[(1, "magnitude", "0.9")])
    client.set_model_version_tag(victim.name, victim.version, "compbias.audit.cev", "123")
    client.set_model_version_tag(victim.name, victim.version, T.METRICS_VERSION, mv)
    clock = [0.0]
    dead = ClaimManager(backend_for(client), mv, owner="dead", ttl=options.claim_ttl, clock=lambda: clock[0])
    assert dead.acquire([victim.key]) == [victim.key]  # heartbeat at t=0: long expired
    res = run_audit(client, options=options)[0]
    assert victim.key in res.statuses
    tags = dict(client.get_model_version(victim.name, victim.version).tags)
    assert T.is_audited(tags, mv) and tags["compbias.audit.cev"] != "123"
    assert dead.still_held() == []


def test_audit_run_abandoned_by_a_killed_auditor_is_closed(client, registered, spec, options):
    from compbias.platform.audit.service import close_abandoned_runs

    exp = client.get_experiment_by_name(f"compbias/{spec.name}").experiment_id
    stale = client.create_run(exp, tags={T.RUN_KIND: "audit"}, start_time=1000)
    fresh = client.create_run(exp, tags={T.RUN_KIND: "audit"})
    assert close_abandoned_runs(client, exp, options.claim_ttl) == [stale.info.run_id]
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(fresh.info.run_id).info.status == "RUNNING"


def test_a_live_claim_makes_the_auditor_skip_that_version(client, registered, spec, options):
    mv = current_metrics_version()
    held = next(r for r in list_versions(client) if r.version == registered[(2, "magnitude", "0.9")])
    other = ClaimManager(backend_for(client), mv, owner="other", ttl=3600)
    assert other.acquire([held.key]) == [held.key]
    res = run_audit(client, options=options)[0]
    assert held.key not in res.statuses and len(res.statuses) == len(registered) - 1
    assert T.STATUS not in dict(client.get_model_version(held.name, held.version).tags)
    other.release()
    res2 = run_audit(client, options=options)[0]
    assert list(res2.statuses) == [held.key]


def test_alias_goes_to_newest_passing_compressed_version(client, registered, spec):
    mv = current_metrics_version()
    recs = list_versions(client)
    name = spec.registered_model
    order = {r.version: i for i, r in enumerate(recs)}
    comp = [r for r in recs if not r.is_baseline]
    for r in comp:
        status = "pass" if int(r.version) % 2 == 0 else "fail"
        write_version_tags(client, r, status, {}, run_id=None, metrics_version=mv)
    base = next(r for r in recs if r.is_baseline)
    write_version_tags(client, base, "pass", {}, run_id=None, metrics_version=mv)
    recs = list_versions(client)
    holder = alias_holder(recs, mv)
    assert holder is not None and not holder.is_baseline and int(holder.version) % 2 == 0
    assert holder.version == max((r.version for r in comp if int(r.version) % 2 == 0), key=int)
    assert reconcile_alias(client, name, "audited", mv) == holder.version
    # the holder fails a later audit: the alias moves to the next passing one
    write_version_tags(client, holder, "fail", {}, run_id=None, metrics_version=mv)
    new = reconcile_alias(client, name, "audited", mv)
    assert new != holder.version and int(new) % 2 == 0
    assert str(client.get_model_version_by_alias(name, "audited").version) == new
    del order
