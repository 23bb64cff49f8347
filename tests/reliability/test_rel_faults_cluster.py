"""Fault tests that need a live Ray cluster: a Ray worker SIGKILLed while it trains a model.

``compbias study`` runs with the Ray executor (a local Ray started by the
driver) in its own session on a private SQLite store. The test polls
``/proc`` until a worker process of that driver runs a model task
(``ray::baseline-s*``), SIGKILLs exactly that pid, and checks what a user
relies on: exit 0, the killed task retried, exactly one FINISHED run and one
registered version per (seed, method, level), no RUNNING run. Only processes
of the study's own session are touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_STUDY, VENV_BIN, census, clean_env

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

    c = census(uri)
    keys = c.finished_keys()
    assert len(keys) == 2 and len(set(keys)) == 2, f"finished model runs {keys}"
    assert "RUNNING" not in c.statuses(), c.statuses()
    assert sorted(v.run_id for v in c.versions) == sorted(r.info.run_id for r in c.model_runs("FINISHED")), \
        "registered versions do not match the finished runs one to one"
