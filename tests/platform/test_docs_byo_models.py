"""Every snippet of docs/bring-your-own.md's "Bring your own models" section runs, in order, as written.

A snippet whose first line is ``# <file>.py`` or ``# <file>.yaml`` is written
to that file; other Python snippets run in one namespace, bash snippets in a
shell, all in one empty directory with ``MLFLOW_TRACKING_URI`` set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform import evaluate as E
from tests.doc_snippets import section_snippets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Bring your own models"


def snippets() -> list[tuple[str, str]]:
    return section_snippets("bring-your-own.md", HEADING, ("python", "bash", "yaml"))


def test_the_section_shows_the_formats_the_spec_and_the_opt_in():
    found = snippets()
    files = [re.match(r"# (\S+)\n", body).group(1) for _, body in found if re.match(r"# \S+\.(py|yaml)\n", body)]
    assert files == ["credit_net.py", "spec.yaml"]
    text = "".join(body for _, body in found)
    for words in ('serialization_format="pt2"', "log_state_dict", "mlflow.onnx.log_model", "--evaluate spec.yaml",
                  "--allow-pickle", 'serialization_format="pickle"'):
        assert words in text


def test_the_bring_your_own_models_snippets_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'byo.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", MPLBACKEND="Agg",
               NUMBA_CACHE_DIR=str(REPO / ".cache" / "numba"), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    namespace: dict = {"__name__": "__byo_model_snippets__"}
    outputs = []
    for kind, body in snippets():
        named = re.match(r"# (\S+\.(?:py|yaml))\n", body)
        if named:
            (tmp_path / named.group(1)).write_text(body)
        elif kind == "python":
            exec(compile(body, "docs/bring-your-own.md", "exec"), namespace)
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            outputs.append(proc.stderr)
    evaluated, refused_then_allowed = outputs
    assert evaluated.count("evaluated credit/") == 9
    for kind in ("pytorch-pt2", "pytorch-state-dict", "onnx"):
        assert f"({kind})" in evaluated
    assert "--allow-pickle" in refused_then_allowed and "evaluated credit-pickled/1 (pytorch-pickle)" in refused_then_allowed
    client = MlflowClient(uri, uri)
    for name, n in (("credit", 9), ("credit-pickled", 1)):
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == n
        for v in versions:
            assert v.tags.get(C.AUDIT_STATUS) in ("pass", "fail"), v.tags.get(C.AUDIT_REASON)
            assert C.PREDICTIONS in {f.path for f in client.list_artifacts(v.run_id)}
            assert E.EVALUATED_KIND in client.get_run(v.run_id).data.tags
