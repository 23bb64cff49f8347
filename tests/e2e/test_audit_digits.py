"""The audit on a real (reduced) digits study: trained models, real weights, SVCCA, gallery.

The study (``compbias.platform.study.run_study``, in-process executor) trains
2 seeds of the small CNN for one epoch and prunes them one-shot to 50% and
95%; the audit then runs against the temporary SQLite store it wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from compbias.platform.audit import AuditOptions, Selection, run_audit
from compbias.platform.audit import tags as T
from compbias.platform.config import parse_study
from compbias.platform.study import run_study

pytestmark = pytest.mark.slow

STUDY = {
    "name": "audit-digits",
    "dataset": {"kind": "digits", "groups": ["ink"], "max_train": 600},
    "train": {"epochs": 1},
    "population": {"seeds": 2},
    "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.5, 0.95], "finetune_epochs": 1}],
    "audit": {"bootstrap": 50, "probe_size": 128, "cie_fractions": [0.01, 0.05]},
}


def _art(client, run_id) -> Path:
    return Path(client.get_run(run_id).info.artifact_uri.replace("file://", ""))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit-digits")
    uri = f"sqlite:///{d}/mlflow.db"
    cwd = os.getcwd()
    os.chdir(d)  # MLflow's default artifact root (./mlruns) must land in the temporary directory
    try:
        outcome = run_study(parse_study(STUDY), executor="local", tracking_uri=uri, log=lambda m: None)
        assert outcome.ok, outcome.failed
        yield {"uri": uri, "dir": d, "client": MlflowClient(uri), "outcome": outcome}
    finally:
        os.chdir(cwd)


def test_digits_audit_end_to_end(study, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study["uri"])
    client = study["client"]
    opts = AuditOptions(cache_dir=study["dir"] / "cache", thresholds={"acc_drop": 20.0}, alias="audited")
    (res,) = run_audit(client, options=opts)
    name = "compbias-audit-digits"
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert len(res.statuses) == len(versions) == 6
    run = client.get_run(res.run_id)
    m = run.data.metrics
    for key in ("cev/magnitude/0.95", "sde/magnitude/0.95", "pie/magnitude/0.95", "cie/acc_top1pct/magnitude/0.95",
                "svcca/magnitude/0.95/logits", "cka/magnitude/0.95/logits"):
        assert key in m, key
    # pruning 95% of a one-epoch CNN without fine-tuning hurts more than 50%
    assert m["acc/magnitude/0.95"] < m["acc/magnitude/0.5"]
    assert m["svcca/magnitude/0.95/logits"] > m["svcca/magnitude/0.5/logits"]
    art = _art(client, res.run_id)
    sim = pd.read_parquet(art / "tables" / "similarity.parquet")
    blocks = set(sim["layer"])
    assert "logits" in blocks and len(blocks) >= 2  # each block's output and the logits
    assert ((sim["cka"] > 0) & (sim["cka"] <= 1 + 1e-9)).all()
    assert -1 <= m["svcca/cev_corr/logits"] <= 1  # CEV against SVCCA distance over the 4 compressed versions
    figures = {p.stem for p in (art / "figures").glob("*.png")}
    assert {"class_changes", "level_curves", "group_changes", "cev_vs_svcca"} <= figures
    assert any(f.startswith("gallery_magnitude") for f in figures)
    report = (art / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 5
    # verdicts: acc_drop threshold; alias on the newest passing compressed version only
    statuses = {k.split("/")[1]: s for k, s in res.statuses.items()}
    for v, mv in versions.items():
        tags = dict(mv.tags)
        assert tags[T.STATUS] == statuses[v] and tags[T.RUN_ID] == res.run_id
        drop = float(tags.get("compbias.audit.acc_drop", "0"))
        assert (tags[T.STATUS] == "fail") == (drop > 20.0)
    passing = [v for v, mv in versions.items() if statuses[v] == "pass" and mv.tags[T.ROLE] == "compressed"]
    if passing:
        assert str(client.get_model_version_by_alias(name, "audited").version) == max(passing, key=int)

    # nothing new: no run
    assert run_audit(client, options=opts) == []

    # the study grows by one level: only its new versions are audited, the rest keep their tags
    grown = {**STUDY, "compression": STUDY["compression"] + [{"method": "magnitude", "schedule": "oneshot", "levels": [0.8], "finetune_epochs": 1}]}
    out2 = run_study(parse_study(grown), executor="local", tracking_uri=study["uri"], log=lambda m: None)
    assert out2.ok and len(out2.trained) == 2
    (res_new,) = run_audit(client, options=opts)
    new_versions = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")} - set(versions)
    assert {k.split("/")[1] for k in res_new.statuses} == new_versions
    for v in versions:
        assert client.get_model_version(name, v).tags[T.RUN_ID] == res.run_id

    # a corrupt artifact, re-audited explicitly: error for it, the others still pass or fail
    bad = next(v for v, mv in versions.items() if mv.tags[T.ROLE] == "compressed")
    (_art(client, versions[bad].run_id) / "predictions.parquet").write_bytes(b"\x00corrupt")
    opts2 = AuditOptions(**{**opts.__dict__, "cache_dir": study["dir"] / "cache2", "similarity": False, "gallery": False})
    (res2,) = run_audit(client, Selection(registered_model=name, force=True), opts2)
    assert res2.statuses[f"{name}/{bad}"] == "error"
    assert {s for k, s in res2.statuses.items() if k != f"{name}/{bad}"} <= {"pass", "fail"}
    assert "parquet" in client.get_model_version(name, bad).tags[T.REASON]
