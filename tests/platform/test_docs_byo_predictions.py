"""Every snippet of docs/bring-your-own.md's "Bring your own predictions" section runs, in order, as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from compbias import contract as C
from tests.doc_snippets import section_snippets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Bring your own predictions"


def snippets() -> list[tuple[str, str]]:
    return section_snippets("bring-your-own.md", HEADING, ("python", "bash"))


def test_the_section_has_the_python_and_command_line_paths():
    kinds = [k for k, _ in snippets()]
    assert kinds.count("python") == 3 and kinds.count("bash") == 1


def test_the_bring_your_own_predictions_snippets_run(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'byo.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", MPLBACKEND="Agg",
               NUMBA_CACHE_DIR=str(REPO / ".cache" / "numba"), PYTHONPATH=str(REPO))
    namespace: dict = {"__name__": "__byo_snippets__"}
    for kind, body in snippets():
        if kind == "python":
            exec(compile(body, "docs/bring-your-own.md", "exec"), namespace)
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
    printed = capsys.readouterr().out
    client = MlflowClient(uri, uri)
    for name, n in (("churn-model", 6), ("churn-cli", 2)):
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == n
        for v in versions:
            assert C.Member.from_tags(v.tags).study in ("churn", "churn-cli")
            assert v.tags.get(C.AUDIT_STATUS) in ("pass", "fail"), v.tags.get(C.AUDIT_REASON)
    assert printed.count("churn-model/") == 6  # the Python audit printed one verdict per version
