"""Manual fault test (too slow for CI): SIGKILL the Ray worker that trains a model, mid-training.

Run by hand from the repository root::

    .venv/bin/python tests/reliability/manual_ray_worker_kill.py

It starts ``compbias study`` (Ray executor, a local Ray started by the
driver) in its own session on a private SQLite store, waits until a worker
process of that session runs a model task (``ray::_remote_body``), SIGKILLs
that worker by its pid, lets the study finish and checks what a user relies
on: exit 0, exactly one FINISHED run and one registered version per
(seed, method, level), no RUNNING run. Only processes of the study's own
session are touched. Prints what it saw; exits non-zero on a failed check.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from conftest import TINY_STUDY, VENV_BIN, census, clean_env  # noqa: E402


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _descendants(root: int) -> set[int]:
    """The driver's process tree: Ray's local cluster (GCS, raylet, workers) is started by the driver."""
    parents = _parents()
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree and pid not in tree}
        tree |= new
        grew = bool(new)
    return tree


def _task_workers(driver: int) -> list[int]:
    out = []
    mine = _descendants(driver)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (int(entry.name) in mine or _session_of(int(entry.name)) == driver):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::baseline-s"):  # a worker running a baseline task (named after it)
                out.append(int(entry.name))
    return out


def main() -> int:
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="compbias-raykill-"))
    study = work / "raykill.yaml"
    # more training than the CI tests so the kill lands mid-task
    study.write_text(TINY_STUDY.format(name="raykill", seeds=2, levels="[0.5]")
                     .replace("max_train: 300", "max_train: 1200").replace("epochs: 1", "epochs: 4"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = clean_env(MLFLOW_TRACKING_URI=uri, COMPBIAS_ARTIFACT_ROOT=str(work / "artifacts"),
                    COMPBIAS_CACHE_DIR=str(work / "cache"))
    log = work / "study.log"
    t0 = time.monotonic()
    proc = subprocess.Popen([str(VENV_BIN / "compbias"), "study", study.name], cwd=work, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    victim = None
    while proc.poll() is None and time.monotonic() - t0 < 600:
        workers = _task_workers(proc.pid)
        if workers:
            time.sleep(2.0)  # let it get into training
            workers = _task_workers(proc.pid)
            if workers:
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
                print(f"SIGKILLed Ray worker {victim} at {time.monotonic() - t0:.1f}s")
                break
        time.sleep(0.2)
    code = proc.wait(timeout=900)
    text = log.read_text()
    print(f"study exited {code} after {time.monotonic() - t0:.1f}s; log: {log}")
    c = census(uri)
    keys = c.finished_keys()
    problems = []
    if victim is None:
        problems.append("no task worker was seen; nothing was killed")
    if code != 0:
        problems.append(f"exit code {code}")
    if len(keys) != 4 or len(set(keys)) != len(keys):
        problems.append(f"finished model runs {keys}")
    if "RUNNING" in c.statuses():
        problems.append(f"runs left RUNNING: {c.statuses()}")
    if sorted(v.run_id for v in c.versions) != sorted(r.info.run_id for r in c.model_runs("FINISHED")):
        problems.append("registered versions do not match the finished runs one to one")
    print("run statuses:", c.statuses(), "versions:", len(c.versions))
    print("worker-death lines in the log:", [ln for ln in text.splitlines() if "died" in ln.lower() or "retry" in ln.lower()][:5])
    if problems:
        print("FAILED:", "; ".join(problems))
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        return 1
    print("OK: the killed task was retried, one finished run and one version per model")
    # stop anything of the study's session that outlived it (Ray's local cluster belongs to the driver)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
