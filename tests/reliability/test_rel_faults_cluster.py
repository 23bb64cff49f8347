"""Fault tests that need a live cluster or server: a Ray worker SIGKILLed, a tracking server restarted.

``compbias study`` runs with the Ray executor (a local Ray started by the
driver) in its own session on a private SQLite store. The test polls
``/proc`` until a worker process of that driver runs a model task
(``ray::baseline-s*``), SIGKILLs exactly that pid, and checks what a user
relies on: exit 0, the killed task retried, exactly one FINISHED run and one
registered version per (seed, method, level), no RUNNING run. Only processes
of the study's own session are touched.

The tracking-server test runs ``compbias study`` (local executor) against an
``mlflow server`` (SQLite backend) it starts on a free loopback port, stops
the server as soon as the first model version is registered (the study still
running), keeps it down for ``OUTAGE_SECONDS``, starts it again on the same
port and store, and checks: exit 0, one FINISHED run and one version per
(seed, method, level), no RUNNING run, every model run has its metrics and no
metric was logged twice at a step.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_STUDY, VENV_BIN, census, clean_env
from devtools.services import LOOPBACK, MLFLOW_SERVER_ENV, free_port, http_status, spawn, wait_for

pytestmark = pytest.mark.timeout(240)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (Ray's local cluster is started by the driver)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                parents[int(entry.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree and pid not in tree}
        tree |= new
        grew = bool(new)
    return tree


def _task_workers(driver: int) -> list[int]:
    """Pids of the driver's Ray workers that run a baseline training task (named ``ray::baseline-s*``)."""
    out = []
    mine = _descendants(driver)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields is None or (int(fields[3]) != driver and pid not in mine):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::baseline-s"):
            out.append(pid)
    return out


def test_ray_worker_sigkill_is_retried(tmp_path):
    study = tmp_path / "raykill.yaml"
    # enough training that the task is still running when the poll finds it
    study.write_text(TINY_STUDY.format(name="raykill", seeds=1, levels="[0.5]")
                     .replace("max_train: 300", "max_train: 1200").replace("epochs: 1", "epochs: 4"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env(MLFLOW_TRACKING_URI=uri, COMPBIAS_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
                    COMPBIAS_CACHE_DIR=str(tmp_path / "cache"))
    log = tmp_path / "study.log"
    proc = subprocess.Popen([str(VENV_BIN / "compbias"), "study", study.name, "--executor", "ray"], cwd=tmp_path,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 150
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            workers = _task_workers(proc.pid)
            if workers:
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
            else:
                time.sleep(0.1)
        assert victim is not None, f"no Ray worker ran a baseline task; log:\n{log.read_text()[-3000:]}"
        code = proc.wait(timeout=180)
        text = log.read_text()
        assert code == 0, f"study exited {code} after its worker was killed; log:\n{text[-5000:]}"
    finally:
        try:  # anything of the study's session that outlived it (Ray's local cluster belongs to the driver)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    census(uri).assert_each_model_once(2)


def _server(work: Path, port: int, backend: str | None = None):
    """Start ``mlflow server`` (SQLite store unless ``backend``, artifacts in ``work``) on ``port``; wait for /health."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_SERVER_ENV)
    argv = [str(VENV_BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend or f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts")]
    svc = spawn("mlflow server", argv, work / "server.log", env=env, cwd=work)
    url = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: http_status(f"{url}/health") == 200, svc, "/health", 120)
    return svc, url


def _versions_on_server(url: str) -> int:
    """Registered versions the server at ``url`` reports (-1 while it does not answer)."""
    from mlflow import MlflowClient

    try:
        return len(MlflowClient(tracking_uri=url, registry_uri=url).search_model_versions(max_results=100))
    except Exception:
        return -1


def _versions(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM model_versions").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


#: How long the tracking server stays down: the length of the injected outage, not a wait for a condition.
OUTAGE_SECONDS = 5.0


@pytest.fixture(params=["sqlite", "postgresql"])
def restart_backend(request):
    """The tracking server's backend store for the restart test: a SQLite file, or a PostgreSQL server that stays up."""
    if request.param == "sqlite":
        yield None
        return
    from devtools.services import start_postgres

    pg = start_postgres()
    try:
        yield pg
    finally:
        pg.stop()


def test_tracking_server_restart_mid_study(tmp_path, restart_backend):
    work = tmp_path
    (work / "artifacts").mkdir()
    study = work / "restart.yaml"
    study.write_text(TINY_STUDY.format(name="restart", seeds=1, levels="[0.5]"))
    port = free_port()
    backend = restart_backend.uri if restart_backend is not None else None
    svc, url = _server(work, port, backend)

    def versions() -> int:
        return _versions(work / "mlflow.db") if backend is None else _versions_on_server(url)

    env = clean_env(MLFLOW_TRACKING_URI=url, COMPBIAS_CACHE_DIR=str(work / "cache"))
    log = work / "study.log"
    proc = subprocess.Popen([str(VENV_BIN / "compbias"), "study", study.name, "--executor", "local"], cwd=work,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while versions() < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the study ended before the server could be stopped; log:\n{log.read_text()[-3000:]}"
        assert versions() >= 1, "no version was registered in time"
        svc.stop()
        time.sleep(OUTAGE_SECONDS)
        svc, _ = _server(work, port, backend)
        code = proc.wait(timeout=180)
        assert code == 0, f"study exited {code} across a tracking outage; log:\n{log.read_text()[-5000:]}"

        c = census(url)
        c.assert_each_model_once(2)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url)
        for r in c.model_runs("FINISHED"):
            assert "acc" in r.data.metrics, f"{r.info.run_name} lost its metrics"
            for key in r.data.metrics:
                steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                assert len(steps) == len(set(steps)), f"{r.info.run_name}: metric {key} logged twice at a step: {steps}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        svc.stop()


def test_two_studies_then_two_auditors_at_once_against_one_server(tmp_path):
    """Two ``compbias study`` processes, then two ``compbias audit`` processes, at once against one ``mlflow server``."""
    from compbias.platform.audit import tags as T

    (tmp_path / "artifacts").mkdir()
    svc, url = _server(tmp_path, free_port())
    env = clean_env(MLFLOW_TRACKING_URI=url, COMPBIAS_CACHE_DIR=str(tmp_path / "cache"))
    procs: list[subprocess.Popen] = []
    try:
        studies = []
        for name in ("alpha", "beta"):
            path = tmp_path / f"{name}.yaml"
            path.write_text(TINY_STUDY.format(name=name, seeds=1, levels="[0.5]"))
            studies.append(path)

        def run_two(argvs: list[list[str]], stem: str) -> list[str]:
            logs = [tmp_path / f"{stem}{i}.log" for i in range(len(argvs))]
            started = [subprocess.Popen([str(VENV_BIN / "compbias"), *argv], cwd=tmp_path, env=env,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
                       for argv, log in zip(argvs, logs)]
            procs.extend(started)
            for p in started:
                p.wait(timeout=300)
            outs = [log.read_text() for log in logs]
            for p, out in zip(started, outs):
                assert p.returncode == 0, out[-3000:]
                assert "database is locked" not in out and "Traceback" not in out, out[-3000:]
            return outs

        run_two([["study", s.name, "--executor", "local"] for s in studies], "study")
        c = census(url)
        assert "RUNNING" not in c.statuses() and "FAILED" not in c.statuses(), c.statuses()
        for name in ("alpha", "beta"):
            runs = [r for r in c.model_runs("FINISHED") if r.data.tags["compbias.study"] == name]
            assert len(runs) == 2, f"{name}: {len(runs)} finished model runs"
            versions = [v for v in c.versions if v.name == f"compbias-{name}"]
            assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
            for r in runs:
                assert "acc" in r.data.metrics and len(r.data.params) >= 5

        earlier = {r.info.run_id for r in c.runs}
        audit = ["audit", "--no-gallery", "--no-similarity", "--no-figures", "--bootstrap", "0"]
        run_two([audit + ["--output-dir", str(tmp_path / f"report{i}")] for i in range(2)], "audit")
        after = census(url)
        fresh = [r for r in after.runs if r.data.tags.get(T.RUN_KIND) == T.RUN_KIND_AUDIT
                 and r.info.status == "FINISHED" and r.info.run_id not in earlier]
        targets = [t for r in fresh for t in r.data.tags.get("compbias.audit.targets", "").split(",") if t]
        assert len(targets) == len(set(targets)), f"a version was audited twice: {targets}"
        assert len(after.versions) == 4
        for v in after.versions:
            assert v.tags.get(T.STATUS) in T.STATUSES and v.tags[T.RUN_ID] in {r.info.run_id for r in fresh}
        assert "RUNNING" not in after.statuses()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        svc.stop()
