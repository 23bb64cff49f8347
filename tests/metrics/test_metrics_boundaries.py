"""Layer boundary (no torch/mlflow/ray), METRICS_VERSION, numba caching."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

import compbias.metrics as metrics

PACKAGE = pathlib.Path(metrics.__file__).parent
FORBIDDEN = {"torch", "torchvision", "mlflow", "ray"}


def test_no_torch_mlflow_or_ray_import_in_the_source():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert len(list(PACKAGE.rglob("*.py"))) >= 7
    assert offenders == []


def test_importing_metrics_loads_no_heavy_framework():
    code = "import sys, compbias.metrics; print(sorted(m for m in %r if m in sys.modules))" % sorted(FORBIDDEN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_metrics_version_is_a_string_integer():
    assert metrics.METRICS_VERSION == "2"
    assert set(metrics.__all__) >= {
        "confusion_counts", "class_rates", "group_rates", "normalized_change", "cev", "sde",
        "modal_labels", "pie_mask", "cie_scores", "cie_mask", "cca_correlations", "svcca",
        "linear_cka", "bootstrap_ci", "welch_ttest", "METRICS_VERSION"}


_RUN = textwrap.dedent("""
    import numpy as np
    from compbias.metrics import confusion_counts
    from compbias.metrics import confusion as c
    out = confusion_counts(np.array([0, 1, 1]), np.array([[0, 1, 0]]), 2)
    assert out.tolist() == [[[1, 0], [1, 1]]], out
    print(c.confusion_kernel._cache.__class__.__name__, len(c.confusion_kernel.stats.cache_hits))
""")


def _run(env_updates):
    env = {**os.environ, **env_updates}
    return subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, env=env, timeout=300)


def test_numba_cache_honours_numba_cache_dir(tmp_path):
    cache = tmp_path / "numba-cache"
    first = _run({"NUMBA_CACHE_DIR": str(cache)})
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["FunctionCache", "0"]
    assert list(cache.rglob("*confusion_kernel*.nbi")), "no cache index written to NUMBA_CACHE_DIR"
    second = _run({"NUMBA_CACHE_DIR": str(cache)})
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["FunctionCache", "1"]  # loaded from disk, not compiled


def test_runs_when_no_cache_location_is_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # the only locator allowed is NUMBA_CACHE_DIR, and it cannot be created:
    # numba.njit(cache=True) raises, the kernels fall back to no caching
    res = _run({"NUMBA_CACHE_DIR": str(blocker / "cache"),
                "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["NullCache", "0"]
    assert blocker.read_text() == "not a directory"


def test_kernels_receive_validated_contiguous_int64():
    from compbias.metrics import _validation as v

    arr = v.check_int_ids(np.arange(10, dtype=np.int16)[::2], "x")
    assert arr.dtype == np.int64 and arr.flags.c_contiguous
