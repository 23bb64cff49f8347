"""Faults injected into real runs: killed drivers and auditors, concurrent writers, unwritable artifacts, a dead tracking URI.

Every process a test starts runs in its own session and is killed through its
own process group only. Stores are private SQLite files in ``tmp_path``.
Faults that need a live Ray cluster or ``mlflow server`` (a Ray worker
SIGKILLed, the tracking server restarted mid-study, concurrent writers against
a server) are in ``test_rel_faults_cluster.py``; see ``docs/reliability.md``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from compbias.platform import cli
from compbias.platform.audit import tags as T
from conftest import VENV_BIN, census, clean_env, compbias, expect_ok, write_study

pytestmark = pytest.mark.timeout(400)


def _count(db: Path, sql: str) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute(sql).fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def _spawn(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "compbias"), *args], env=env, cwd=cwd, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    """SIGKILL ``proc``'s process group as soon as ``ready()`` is true; fail if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            break
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before the fault could be injected:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the fault point was never reached")
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert alive, "the process had already finished when it was killed"


@pytest.mark.parametrize("kill_at", ["run-finished", "version-registered"])
def test_driver_killed_mid_study_then_rerun_completes_without_retraining(finished_store, kill_at):
    """Two new levels; the driver is SIGKILLed mid-study, then run again.

    ``run-finished``: right after the first new model run is FINISHED.
    ``version-registered``: right after the first new version exists, which
    is usually before its run is ended (registration comes last but one).
    """
    db = finished_store["store"] / "mlflow.db"
    study = finished_store["study"]
    study.write_text(study.read_text().replace("levels: [0.5]", "levels: [0.5, 0.7, 0.8]"))
    before = census(finished_store["uri"])
    kept = {(r.data.tags["compbias.method"], r.data.tags["compbias.level"]): r.info.run_id for r in before.model_runs("FINISHED")}
    env = clean_env(MLFLOW_TRACKING_URI=finished_store["uri"], COMPBIAS_ARTIFACT_ROOT=str(finished_store["store"] / "artifacts"),
                    COMPBIAS_CACHE_DIR=str(finished_store["tmp"] / "cache"))
    log = finished_store["tmp"] / "driver.log"
    proc = _spawn(["study", study.name, "--executor", "local"], env, study.parent, log)
    finished_models = ("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.status = 'FINISHED' "
                       "AND t.key = 'compbias.run_kind' AND t.value = 'model'")
    if kill_at == "run-finished":
        _kill_when(proc, lambda: _count(db, finished_models) >= len(kept) + 1, log)
    else:
        _kill_when(proc, lambda: _count(db, "SELECT count(*) FROM model_versions") >= len(before.versions) + 1, log)

    killed = census(finished_store["uri"])
    assert "RUNNING" in killed.statuses()  # the parent run of the killed execution, at least

    code = cli.main(["study", str(study), "--executor", "local"])
    assert code == 0
    after = census(finished_store["uri"])
    assert "RUNNING" not in after.statuses(), after.statuses()
    keys = after.finished_keys()
    assert keys == sorted(set(keys)) and set(keys) == {("0", "baseline", "0"), ("0", "magnitude", "0.5"),
                                                       ("0", "magnitude", "0.7"), ("0", "magnitude", "0.8")}
    # nothing finished before was made again
    now = {(r.data.tags["compbias.method"], r.data.tags["compbias.level"]): r.info.run_id for r in after.model_runs("FINISHED")}
    assert all(now[k] == rid for k, rid in kept.items())
    first_new = [r for r in killed.model_runs("FINISHED") if r.info.run_id not in kept.values()]
    if kill_at == "run-finished":
        # models ~50 ms apart: the kill lands after the first new one, sometimes the second, never all three
        assert 1 <= len(first_new) < 3, [r.info.run_name for r in first_new]
        assert all(r.info.run_id in now.values() for r in first_new)  # kept, not made again
    # a version whose run the kill left RUNNING was deleted, and its model made again
    for v in killed.versions:
        run = next(r for r in killed.runs if r.info.run_id == v.run_id)
        if run.info.status == "RUNNING":
            assert v.run_id not in {w.run_id for w in after.versions}
    # one version per model, each of a finished run: no orphans
    finished_ids = {r.info.run_id for r in after.model_runs("FINISHED")}
    assert len(after.versions) == 4 and {v.run_id for v in after.versions} == finished_ids
    interrupted = [r for r in after.runs if r.data.tags.get("compbias.interrupted") == "true"]
    assert interrupted and all(r.info.status == "FAILED" for r in interrupted)


def test_auditor_killed_mid_audit_leaves_no_partial_tags_and_the_next_audit_finishes(finished_store):
    db = finished_store["store"] / "mlflow.db"
    env = clean_env(MLFLOW_TRACKING_URI=finished_store["uri"], COMPBIAS_CACHE_DIR=str(finished_store["tmp"] / "cache"))
    before = {v.version: dict(v.tags) for v in census(finished_store["uri"]).versions}
    log = finished_store["tmp"] / "auditor.log"
    proc = _spawn(["audit", "--study", "relstudy", "--force", "--no-gallery", "--bootstrap", "300"], env,
                  finished_store["work"], log)
    # the auditor claims its versions before it computes anything: kill it then
    _kill_when(proc, lambda: _count(db, "SELECT count(*) FROM registered_models WHERE name LIKE 'compbias-claim-%'") > 0, log)

    mid = census(finished_store["uri"])
    for v in mid.versions:
        assert not T.is_partial(v.tags), f"version {v.version} carries a partial set of audit tags: {v.tags}"
    # a version still reads as audited only by the complete audit that ran before the kill
    for v in mid.versions:
        if T.STATUS in v.tags:
            assert v.tags[T.RUN_ID] == before[v.version][T.RUN_ID]

    time.sleep(2)  # the killed auditor's claims stop beating; after the ttl they are taken over
    code = cli.main(["audit", "--study", "relstudy", "--force", "--no-gallery", "--no-similarity", "--claim-ttl", "1s"])
    assert code == 0
    after = census(finished_store["uri"])
    audit_runs = {r.info.run_id: r for r in after.runs if r.data.tags.get(T.RUN_KIND) == T.RUN_KIND_AUDIT}
    for v in after.versions:
        assert v.tags.get(T.STATUS) in T.STATUSES and not T.is_partial(v.tags)
        assert v.tags[T.RUN_ID] != before[v.version][T.RUN_ID]
        assert audit_runs[v.tags[T.RUN_ID]].info.status == "FINISHED"
    assert _count(db, "SELECT count(*) FROM registered_models WHERE name LIKE 'compbias-claim-%'") == 0


def test_two_auditors_at_once_audit_each_version_once(finished_store):
    """Two incremental auditors (as two cron jobs or two hosts would run them) on versions not yet audited."""
    from mlflow import MlflowClient

    client = MlflowClient(finished_store["uri"], finished_store["uri"])
    earlier = {r.info.run_id for r in census(finished_store["uri"]).runs}
    for v in census(finished_store["uri"]).versions:  # make them new: no audit tags
        for key in [k for k in v.tags if k.startswith(T.AUDIT_PREFIX)]:
            client.delete_model_version_tag(v.name, v.version, key)
    env = clean_env(MLFLOW_TRACKING_URI=finished_store["uri"], COMPBIAS_CACHE_DIR=str(finished_store["tmp"] / "cache"))
    logs = [finished_store["tmp"] / f"auditor{i}.log" for i in range(2)]
    args = ["audit", "--no-gallery", "--no-similarity", "--no-figures", "--bootstrap", "0"]
    procs = [_spawn(args, env, finished_store["work"], log) for log in logs]
    for p in procs:
        p.wait(timeout=300)
    outputs = [log.read_text() for log in logs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "database is locked" not in out and "Traceback" not in out, out[-3000:]
    after = census(finished_store["uri"])
    fresh = [r for r in after.runs if r.data.tags.get(T.RUN_KIND) == T.RUN_KIND_AUDIT and r.info.status == "FINISHED"
             and r.info.run_id not in earlier]
    targets = [t for r in fresh for t in r.data.tags.get("compbias.audit.targets", "").split(",") if t]
    assert len(targets) == len(set(targets)), f"a version was audited twice: {targets}"
    for v in after.versions:
        assert v.tags.get(T.STATUS) in T.STATUSES and v.tags[T.RUN_ID] in {r.info.run_id for r in fresh}
    assert "RUNNING" not in after.statuses()


def test_two_studies_at_once_on_one_sqlite_store_lose_nothing(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    MlflowClient = __import__("mlflow").MlflowClient
    MlflowClient(uri).search_experiments()  # the schema exists before the two writers race to create it
    env = clean_env(MLFLOW_TRACKING_URI=uri, COMPBIAS_ARTIFACT_ROOT=str(store / "artifacts"),
                    COMPBIAS_CACHE_DIR=str(tmp_path / "cache"))
    studies = [write_study(tmp_path / "work", name) for name in ("alpha", "beta")]
    logs = [tmp_path / f"{s.stem}.log" for s in studies]
    procs = [_spawn(["study", s.name, "--executor", "local"], env, s.parent, log) for s, log in zip(studies, logs)]
    for p in procs:
        p.wait(timeout=300)
    for p, log in zip(procs, logs):
        out = log.read_text()
        assert p.returncode == 0 and "database is locked" not in out, out[-3000:]
    c = census(uri)
    assert "RUNNING" not in c.statuses() and "FAILED" not in c.statuses(), c.statuses()
    for name in ("alpha", "beta"):
        runs = [r for r in c.model_runs("FINISHED") if r.data.tags["compbias.study"] == name]
        assert len(runs) == 2
        versions = [v for v in c.versions if v.name == f"compbias-{name}"]
        assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
        for r in runs:
            assert "acc" in r.data.metrics and len(r.data.params) >= 5


def test_unwritable_artifact_location_is_a_clear_error_and_nothing_stays_running(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the artifact root should be")
    study = write_study(tmp_path / "work", "unwritable")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env_root = os.environ.get("COMPBIAS_ARTIFACT_ROOT")
    os.environ["COMPBIAS_ARTIFACT_ROOT"] = str(blocker / "artifacts")
    try:
        code = cli.main(["study", str(study), "--tracking-uri", uri, "--executor", "local"])
    finally:
        if env_root is None:
            os.environ.pop("COMPBIAS_ARTIFACT_ROOT", None)
        else:
            os.environ["COMPBIAS_ARTIFACT_ROOT"] = env_root
    said = capsys.readouterr()
    said = said.err + said.out
    assert code != 0 and "Traceback" not in said
    assert str(blocker) in said and "artifact" in said.lower()
    c = census(uri)
    assert c.runs and "RUNNING" not in c.statuses() and "FINISHED" not in c.statuses(), c.statuses()
    assert not c.versions


def _in_private_mount_namespace(script: str) -> list[str]:
    """A command running ``script`` (sh) in its own mount namespace (root, or an unprivileged user namespace)."""
    import shutil

    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed for the disk-full test (Debian package util-linux)"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [unshare, *user, "--mount", "--propagation", "private", "sh", "-c", script]


@pytest.mark.parametrize("size_kib", [64, 1024])
def test_a_full_disk_under_the_artifacts_stops_the_study_cleanly_and_a_rerun_completes(tmp_path, size_kib):
    """A real ENOSPC: the artifact root is a size-limited tmpfs that fills up mid-study.

    64 KiB fills while the first model's artifacts are written, 1 MiB part-way
    through the study (after some models were logged). Either way: exit 2 with
    a message naming the full disk and what to do, no traceback, the study
    stops (no model logged after the disk filled), no RUNNING run, every
    FINISHED model run has its registered version and every version a
    FINISHED run. Then the tmpfs is given room (remounted bigger) and the same
    command completes the study without making again what finished.
    """
    study = write_study(tmp_path / "work", "nospace", seeds=2, levels="[0.5, 0.9]")
    full = tmp_path / "full"
    full.mkdir()
    db, mid = tmp_path / "mlflow.db", tmp_path / "after-first.db"
    uri = f"sqlite:///{db}"
    env = clean_env(COMPBIAS_ARTIFACT_ROOT=str(full / "artifacts"))
    run = f"{VENV_BIN / 'compbias'} study {study} --tracking-uri {uri} --executor local"
    script = (f"mount -t tmpfs -o size={size_kib}k compbias-full {full} || exit 97; "
              f"{run}; echo FIRST_EXIT=$?; cp {db} {mid}; echo ===SECOND===; "
              f"mount -o remount,size=64m {full} || exit 98; {run}; echo SECOND_EXIT=$?")
    proc = subprocess.run(_in_private_mount_namespace(script), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0 and "FIRST_EXIT=2" in out and "SECOND_EXIT=0" in out, out[-5000:]
    first = out.split("===SECOND===")[0]
    assert "No space left on device" in first and "free space" in first and "run the same command again" in first, first[-3000:]
    assert "Traceback" not in out, out[-5000:]
    c = census(f"sqlite:///{mid}")
    assert "RUNNING" not in c.statuses(), c.statuses()
    parents = [r for r in c.runs if r.data.tags.get("compbias.run_kind") == "study"]
    assert [r.info.status for r in parents] == ["FAILED"], c.statuses()
    assert len(c.model_runs("FAILED")) == 1, c.statuses()  # the study stopped at the first model that did not fit
    finished = {r.info.run_id for r in c.model_runs("FINISHED")}
    assert {v.run_id for v in c.versions} == finished, (c.statuses(), [(v.version, v.run_id) for v in c.versions])
    if size_kib >= 1024:
        assert finished, "with 1 MiB some models fit before the disk filled"
    else:
        assert not finished
    c2 = census(uri)
    assert len(c2.model_runs("FINISHED")) == 6 and len(c2.versions) == 6, c2.statuses()
    assert finished <= {r.info.run_id for r in c2.model_runs("FINISHED")}  # nothing that finished was made again
    assert "RUNNING" not in c2.statuses()


@pytest.mark.parametrize("command", ["study", "audit"])
def test_a_tracking_uri_that_does_not_answer_fails_fast_and_clearly(tmp_path, command):
    """Nothing listens on the port: the command gives up within a minute, names the URI, prints no traceback."""
    import socket

    with socket.socket() as s:  # a loopback port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    study = write_study(tmp_path, "unreachable")
    args = ["study", study.name, "--executor", "local"] if command == "study" else ["audit", "--no-gallery"]
    t0 = time.monotonic()
    proc = compbias(args, clean_env(MLFLOW_TRACKING_URI=uri), tmp_path, timeout=180)
    took = time.monotonic() - t0
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2, said[-3000:]
    assert "Traceback" not in said and uri in said and "MLFLOW_TRACKING_URI" in said, said[-3000:]
    assert took < 90, f"`compbias {command}` took {took:.0f}s to give up on a dead tracking URI"


def test_the_tracking_probe_accepts_any_http_answer_and_refuses_silence():
    """``check_tracking_reachable``: a server answering 404 is up; a port nobody listens on fails in seconds."""
    import http.server
    import socket
    import threading

    from compbias.platform.tracking import TrackingUnavailableError, check_tracking_reachable

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingUnavailableError, match=rf"127\.0\.0\.1:{port}.*does not answer.*MLFLOW_TRACKING_URI"):
        check_tracking_reachable(f"http://127.0.0.1:{port}", attempts=2, pause=0.1)
    check_tracking_reachable("sqlite:///nowhere/mlflow.db")  # local stores are not probed
