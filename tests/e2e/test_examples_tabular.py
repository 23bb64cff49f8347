"""examples/tabular_breast_cancer.py runs as the README says and its audit judges every compressed version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from compbias import contract as C

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "tabular_breast_cancer.py"


def test_the_tabular_example_registers_and_audits_its_population(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COMPBIAS_"))}
    uri = f"sqlite:///{tmp_path / 'example.db'}"
    env.update(MLFLOW_TRACKING_URI=uri, COMPBIAS_CACHE_DIR=str(tmp_path / "cache"), MPLBACKEND="Agg",
               NUMBA_CACHE_DIR=str(REPO / ".cache" / "numba"), PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"example wall time {wall:.1f}s")

    client = MlflowClient(uri, uri)
    versions = client.search_model_versions("name = 'breast-cancer-mlp'")
    members = {v.version: C.Member.from_tags(v.tags) for v in versions}
    compressed = [v for v in versions if members[v.version].role == "compressed"]
    assert len(versions) == 9 and len(compressed) == 6
    assert {members[v.version].population for v in compressed} == {("int8", "weights"), ("magnitude", "0.8")}
    for v in versions:  # every version: its run holds the predictions and member.json, and an audit status
        info = C.MemberInfo.from_json(Path(client.download_artifacts(v.run_id, C.MEMBER_FILE, str(tmp_path))).read_text())
        assert info.class_names == ("malignant", "benign") and info.positive_class == 0 and info.groups == ("large",)
        assert v.tags.get(C.AUDIT_STATUS) in ("pass", "fail"), (v.version, v.tags.get(C.AUDIT_REASON))
    for v in compressed:
        assert f"version {int(v.version):>2}" in proc.stdout and v.tags[C.AUDIT_STATUS] in proc.stdout
    assert "audit run" in proc.stdout and "done in" in proc.stdout

    # run again: the population is found, not logged twice, and audited again
    again = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already holds 9 members" in again.stdout
    assert len(client.search_model_versions("name = 'breast-cancer-mlp'")) == 9
