"""`compbias audit` from the command line, the watch loop, and two auditors at once."""

from __future__ import annotations

import argparse
import json
import threading

import pytest
from mlflow.tracking import MlflowClient

from compbias.platform.audit import AuditOptions, parse_interval, run_audit, watch
from compbias.platform.audit import cli
from compbias.platform.audit import tags as T
from compbias.platform.audit.synthetic import register_synthetic_study


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def base_args(store):
    return ["--no-similarity", "--no-gallery", "--cache-dir", str(store["root"] / "cache")]


def test_cli_audits_prints_summary_then_nothing_new(registered, store, spec, capsys):
    rc = cli.run(parse(base_args(store) + ["--max-cev", "2e5", "--alias", "ok"]))
    assert rc == 0
    out = capsys.readouterr().out
    assert "audit of study synth" in out and "CEV" in out and "worst group: ink=1" in out
    assert "CIE top-1% accuracy" in out and "report: " in out and "fail  compbias-synth/" in out
    client = MlflowClient()
    assert client.get_model_version_by_alias(spec.registered_model, "ok") is not None
    rc = cli.run(parse(base_args(store) + ["--json"]))
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == "" and "nothing to audit" in captured.err
    # without --json, a pass with nothing new shows the latest audit's summary and report again
    rc = cli.run(parse(base_args(store) + ["--study", "synth"]))
    again = capsys.readouterr().out
    assert rc == 0 and "the latest audit" in again and "worst group: ink=1" in again and "report: " in again


def test_cli_json_and_explicit_version(registered, store, spec, capsys):
    v = registered[(0, "magnitude", "0.9")]
    rc = cli.run(parse(base_args(store) + ["--json", "--version", f"{spec.registered_model}/{v}", "--no-figures"]))
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip())
    assert doc["statuses"] == {f"{spec.registered_model}/{v}": "fail"}  # the default gate: magnitude 0.9 hurts class 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--version", "no-slash"], "NAME/VERSION"),
        (["--cie-fraction", "2"], "--cie-fraction"),
        (["--interval", "soon"], "interval"),
        (["--study", "unknown"], "known studies"),
        (["--watch", "--study", "x"], "--watch"),
    ],
)
def test_cli_bad_input_exit_2_with_a_clear_message(registered, store, argv, message, capsys):
    assert cli.run(parse(base_args(store) + argv)) == 2
    assert message in capsys.readouterr().err


def test_parse_interval():
    assert parse_interval("10m") == 600 and parse_interval("90") == 90 and parse_interval("2h") == 7200
    with pytest.raises(ValueError):
        parse_interval("-1m")


def test_watch_audits_new_versions_on_each_pass(client, registered, spec, options):
    baselines = {s: registered[(s, "baseline", "none")] for s in range(spec.seeds)}
    passes, sleeps = [], []

    def on_pass(results):
        passes.append(results)
        if len(passes) == 1:  # a study registers one more version between passes
            register_synthetic_study(client, spec, seeds=[0], methods={"magnitude": ["0.5"]}, baseline_versions=baselines)

    n = watch(client, options, interval=600, max_passes=3, on_pass=on_pass, sleep=sleeps.append)
    assert n == 2
    assert [len(p) for p in passes] == [1, 1, 0]
    assert len(passes[0][0].statuses) == 12 and len(passes[1][0].statuses) == 1
    assert len(sleeps) == 2 and all(0 < s <= 600 for s in sleeps)


def test_two_auditors_at_once_audit_each_version_exactly_once(client, registered, spec, store, options):
    barrier = threading.Barrier(2)
    results = {}

    def auditor(name):
        c = MlflowClient(store["uri"])
        barrier.wait()
        results[name] = run_audit(c, options=AuditOptions(**{**options.__dict__}))

    threads = [threading.Thread(target=auditor, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audited = [k for res in results.values() for r in res for k in r.statuses]
    assert sorted(audited) == sorted(f"{spec.registered_model}/{v}" for v in registered.values())  # no version twice
    run_ids = {r.run_id for res in results.values() for r in res}
    for v in registered.values():
        t = dict(client.get_model_version(spec.registered_model, v).tags)
        assert T.is_audited(t) and t[T.RUN_ID] in run_ids
    assert client.search_registered_models("name LIKE 'compbias-claim-%'") == []  # claims released
