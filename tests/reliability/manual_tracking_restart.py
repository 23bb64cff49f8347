"""Manual fault test (too slow for CI): stop the tracking server mid-study and start it again.

Run by hand from the repository root::

    .venv/bin/python tests/reliability/manual_tracking_restart.py [OUTAGE_SECONDS]

Starts ``mlflow server`` (SQLite backend, proxied artifacts) on a free
loopback port with ``tests/services.py``, runs ``compbias study`` against it
(local executor), stops the server (its own process group) as soon as the
first model version is registered, keeps it down for ``OUTAGE_SECONDS``
(default 15), starts it again on the same port and store, and checks: the
study exits 0, one FINISHED run and one version per (seed, method, level),
no RUNNING run, every finished model run has its metrics and artifacts
(nothing lost) and no model was logged twice.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from conftest import TINY_STUDY, VENV_BIN, census, clean_env  # noqa: E402
from tests.services import MLFLOW_SERVER_ENV, LOOPBACK, free_port, http_status, spawn, wait_for  # noqa: E402


def _server(work: Path, port: int):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_SERVER_ENV)
    argv = [str(VENV_BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts")]
    svc = spawn("mlflow server", argv, work / "server.log", env=env, cwd=work)
    url = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: http_status(f"{url}/health") == 200, svc, "/health", 180)
    return svc, url


def _versions(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM model_versions").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def main() -> int:
    outage = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    work = Path(tempfile.mkdtemp(prefix="compbias-restart-"))
    (work / "artifacts").mkdir()
    study = work / "restart.yaml"
    study.write_text(TINY_STUDY.format(name="restart", seeds=2, levels="[0.5]"))
    port = free_port()
    svc, url = _server(work, port)
    env = clean_env(MLFLOW_TRACKING_URI=url, COMPBIAS_CACHE_DIR=str(work / "cache"))
    log = work / "study.log"
    t0 = time.monotonic()
    proc = subprocess.Popen([str(VENV_BIN / "compbias"), "study", study.name, "--executor", "local"], cwd=work,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    restarted = False
    try:
        while proc.poll() is None and time.monotonic() - t0 < 600:
            if _versions(work / "mlflow.db") >= 1:
                svc.stop()
                print(f"stopped the tracking server at {time.monotonic() - t0:.1f}s (1 version registered)")
                time.sleep(outage)
                svc, _ = _server(work, port)
                restarted = True
                print(f"tracking server back at {time.monotonic() - t0:.1f}s")
                break
            time.sleep(0.1)
        code = proc.wait(timeout=900)
        print(f"study exited {code} after {time.monotonic() - t0:.1f}s; log {log}")
        c = census(url)
        keys = c.finished_keys()
        problems = []
        if not restarted:
            problems.append("the study ended before the server could be stopped")
        if code != 0:
            problems.append(f"exit code {code}: {log.read_text()[-1500:]}")
        if len(keys) != 4 or len(set(keys)) != 4:
            problems.append(f"finished model runs {keys}")
        if "RUNNING" in c.statuses():
            problems.append(f"runs left RUNNING {c.statuses()}")
        if sorted(v.run_id for v in c.versions) != sorted(r.info.run_id for r in c.model_runs("FINISHED")):
            problems.append("versions do not match finished runs one to one")
        for r in c.model_runs("FINISHED"):
            if "acc" not in r.data.metrics:
                problems.append(f"{r.info.run_name} lost its metrics")
        print("run statuses:", c.statuses(), "versions:", len(c.versions))
        if problems:
            print("FAILED:", "; ".join(problems))
            return 1
        print(f"OK: the study rode out a {outage:.0f}s tracking outage")
        return 0
    finally:
        if proc.poll() is None:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
        svc.stop()


if __name__ == "__main__":
    sys.exit(main())
