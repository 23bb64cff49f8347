"""The Ray under ``compbias study``: never a stale one; when it dies mid-study, one message, exit 3, a clean resume.

Every ``compbias study`` here runs in its own session on a private SQLite
store, with ``RAY_TMPDIR`` pointing at a private directory so that the local
Ray it starts (and the ``ray_current_cluster`` file Ray looks at) are nobody
else's. Processes are killed only by pid (found among the study driver's own
descendants) or by the process group of a cluster this file started.

* a stale ``<RAY_TMPDIR>/ray/ray_current_cluster`` naming a dead loopback
  port: the study starts its own Ray and finishes (before: a hang of minutes
  on "Failed to connect to GCS");
* ``RAY_ADDRESS`` naming a dead port: exit 2 within seconds, nothing logged;
* the study's own raylet SIGKILLed, or the head of a 2-node loopback cluster
  (``RAY_ADDRESS``) SIGKILLed, while the compressed model trains (its
  baseline already logged): exit 3 (:data:`compbias.platform.orchestration.EXIT_RAY_LOST`),
  one message naming what died and saying that a re-run resumes, parent run
  FAILED with ``compbias.error``, nothing RUNNING; the re-run reuses the
  baseline (same run) and makes only the missing model, one run and one
  version per model;
* the worker running the compressed task SIGKILLed: Ray runs it again
  (``max_retries``) and the study exits 0 with one run and one version per model.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_STUDY, VENV_BIN, census, clean_env, compbias, expect_ok
from test_rel_faults_cluster import _descendants, _versions
from devtools.services import free_port, short_tempdir, start_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: The compressed model fine-tunes long enough (a few seconds) to be caught running.
SLOW_COMPRESS = ("max_train: 300", "max_train: 1200"), ("finetune_epochs: 0", "finetune_epochs: 30")

RE_RUN_HINT = "re-run the same command to resume"


def _study(directory: Path, name: str, *, slow_compress: bool = False) -> Path:
    text = TINY_STUDY.format(name=name, seeds=1, levels="[0.5]")
    if slow_compress:
        for old, new in SLOW_COMPRESS:
            text = text.replace(old, new)
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def ray_tmp():
    """A private Ray temporary directory (``RAY_TMPDIR``): short, as Ray's socket paths must be."""
    d = short_tempdir("cbrl-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(tmp_path: Path, ray_tmp: Path, **extra: str) -> tuple[dict[str, str], str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env(MLFLOW_TRACKING_URI=uri, COMPBIAS_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
                    COMPBIAS_CACHE_DIR=str(tmp_path / "cache"), RAY_TMPDIR=str(ray_tmp), **extra)
    return env, uri


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running_task(pids, label_prefix: str) -> list[int]:
    """The pids among ``pids`` of Ray workers running a task whose name starts with ``label_prefix``."""
    return [p for p in pids if _cmdline(p).startswith(f"ray::{label_prefix}")]


class _Study:
    """``compbias study`` started in its own session, its output in a file; always killed by its group at the end."""

    def __init__(self, study: Path, env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([str(VENV_BIN / "compbias"), "study", study.name], cwd=study.parent, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition, what: str, timeout: float = 200):
        """Poll ``condition()`` (0.1 s apart) until it returns something truthy; fail if the study ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            assert self.proc.poll() is None, f"the study ended (exit {self.proc.returncode}) before {what}; log:\n{self.text()[-4000:]}"
            time.sleep(0.1)
        pytest.fail(f"no {what} within {timeout} s; log:\n{self.text()[-4000:]}")

    def finish(self, timeout: float = 200) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the study did not end within {timeout} s; log:\n{self.text()[-4000:]}")

    def kill(self) -> None:
        try:  # the driver's session: the driver and the local Ray it started
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _assert_lost_cleanly(code: int, out: str, uri: str, what: list[str]) -> str:
    """Exit 3 with one message naming ``what`` (each of them); parent FAILED with compbias.error; only the baseline finished."""
    assert code == 3, f"study exited {code} after its Ray died, expected 3; log:\n{out[-5000:]}"
    messages = [line for line in out.splitlines() if line.startswith("compbias study:")]
    assert len(messages) == 1, f"expected one compbias message, got {messages}; log:\n{out[-3000:]}"
    message = messages[0]
    assert "Ray cluster went away" in message and all(w in message for w in what), (what, message)
    assert "safe in MLflow" in message and RE_RUN_HINT in message, message
    assert "Traceback" not in out, out[-5000:]
    c = census(uri)
    assert "RUNNING" not in c.statuses(), c.statuses()
    parents = [r for r in c.runs if r.data.tags.get("compbias.run_kind") == "study"]
    assert [r.info.status for r in parents] == ["FAILED"], [(r.info.run_name, r.info.status) for r in parents]
    assert "RayClusterLostError" in parents[0].data.tags.get("compbias.error", ""), parents[0].data.tags
    # the baseline was logged before the kill: it is complete, with its version; nothing else finished
    assert c.finished_keys() == [("0", "baseline", "0")], c.finished_keys()
    assert [v.run_id for v in c.versions] == [r.info.run_id for r in c.model_runs("FINISHED")]
    return c.model_runs("FINISHED")[0].info.run_id


def _assert_rerun_resumes(study: Path, env: dict[str, str], uri: str, baseline_run: str) -> None:
    """The same command again: the baseline is reused (same run), only the compressed model is made."""
    out = expect_ok(compbias(["study", study.name], env, study.parent, timeout=240))
    assert "1 already finished, 1 to run" in out or "1 trained, 1 resumed" in out, out[-3000:]
    c = census(uri)
    c.assert_each_model_once(2)
    baseline = [r for r in c.model_runs("FINISHED") if r.data.tags["compbias.method"] == "baseline"]
    assert [r.info.run_id for r in baseline] == [baseline_run], "the re-run made the finished baseline again"


def test_a_stale_ray_current_cluster_file_is_ignored_and_the_study_starts_its_own_ray(tmp_path, ray_tmp):
    study = _study(tmp_path, "stale")
    stale = ray_tmp / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text(f"127.0.0.1:{free_port()}\n")  # what a crashed `ray start` leaves: a port nobody listens on
    env, uri = _env(tmp_path, ray_tmp)
    try:
        proc = compbias(["study", study.name], env, tmp_path, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the study hung on the stale Ray address; output:\n{(exc.stderr or b'')[-3000:]!r}")
    expect_ok(proc)
    assert "Failed to connect" not in proc.stderr, proc.stderr[-3000:]
    census(uri).assert_each_model_once(2)


def test_a_dead_ray_address_fails_fast_with_one_message_and_logs_nothing(tmp_path, ray_tmp):
    study = _study(tmp_path, "deadaddr")
    address = f"127.0.0.1:{free_port()}"
    env, uri = _env(tmp_path, ray_tmp, RAY_ADDRESS=address)
    proc = compbias(["study", study.name], env, tmp_path, timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("compbias study: no Ray cluster answers"), proc.stderr[-3000:]
    assert f"RAY_ADDRESS={address}" in lines[0], lines[0]
    c = census(uri)
    assert not c.runs and not c.versions, (c.statuses(), c.versions)


def test_the_study_own_raylet_killed_mid_study_exits_3_and_a_rerun_resumes(tmp_path, ray_tmp):
    study = _study(tmp_path, "nodekill", slow_compress=True)
    env, uri = _env(tmp_path, ray_tmp)
    run = _Study(study, env, tmp_path / "study.log")
    try:
        # the baseline is logged (its version exists) and the compressed model is training
        run.wait_until(lambda: _versions(tmp_path / "mlflow.db") >= 1
                       and _running_task(_descendants(run.proc.pid), "magnitude@"), "compressed task running")
        raylets = [p for p in _descendants(run.proc.pid) if _cmdline(p).split(" ")[0].endswith("/raylet")]
        assert len(raylets) == 1, [(p, _cmdline(p)[:80]) for p in _descendants(run.proc.pid)]
        os.kill(raylets[0], signal.SIGKILL)
        code = run.finish()
    finally:
        run.kill()
    baseline_run = _assert_lost_cleanly(code, run.text(), uri, ["Ray node (raylet at", "of the local Ray this study started"])
    _assert_rerun_resumes(study, env, uri, baseline_run)


def test_the_cluster_head_killed_mid_study_exits_3_and_a_rerun_resumes(tmp_path, ray_tmp):
    study = _study(tmp_path, "headkill", slow_compress=True)
    cluster = start_ray_cluster(workers=1, cpus_per_node=1)
    try:
        env, uri = _env(tmp_path, ray_tmp)
        run = _Study(study, cluster.driver_env(env), tmp_path / "study.log")
        try:
            run.wait_until(lambda: _versions(tmp_path / "mlflow.db") >= 1
                           and _running_task(cluster.leftover_pids(), "magnitude@"), "compressed task running")
            os.killpg(cluster.nodes[0].pgid, signal.SIGKILL)  # the head: its GCS, raylet and workers
            code = run.finish()
        finally:
            run.kill()
    finally:
        cluster.stop()
    baseline_run = _assert_lost_cleanly(code, run.text(), uri, ["GCS at", "(the head node)", f"RAY_ADDRESS={cluster.address}"])
    # the head is gone for good: the same command on a local Ray (RAY_ADDRESS unset) picks up where it stopped
    _assert_rerun_resumes(study, env, uri, baseline_run)


def test_a_worker_killed_during_a_compressed_task_is_retried_and_the_study_succeeds(tmp_path, ray_tmp):
    study = _study(tmp_path, "compkill", slow_compress=True)
    env, uri = _env(tmp_path, ray_tmp)
    run = _Study(study, env, tmp_path / "study.log")
    try:
        # a worker that runs the compressed task and has already printed from it (so it is killed mid-task)
        victims = run.wait_until(lambda: [p for p in _running_task(_descendants(run.proc.pid), "magnitude@")
                                          if f"(magnitude@0.5-s0 pid={p})" in run.text()], "compressed task running")
        os.kill(victims[0], signal.SIGKILL)
        code = run.finish()
    finally:
        run.kill()
    out = run.text()
    assert code == 0, f"study exited {code} after a compressed task's worker was killed; log:\n{out[-5000:]}"
    # the task ran twice: its output comes from the killed worker and from the one Ray retried it on
    pids = set(re.findall(r"\(magnitude@0\.5-s0 pid=(\d+)\)", out))
    assert str(victims[0]) in pids and len(pids) >= 2, f"no retry seen (task output from pids {pids}); log:\n{out[-4000:]}"
    census(uri).assert_each_model_once(2)
