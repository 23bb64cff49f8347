"""Security: nothing unpickles data, services bind to loopback, credentials never logged, data paths confined.

The unpickling check is a static scan of the package's syntax tree (so it
also covers code paths no test runs); the credentials check runs a real tiny
study and its audit through the CLI with secrets in the environment and
looks for them everywhere the runs left something.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SECRET_PASSWORD, SECRET_TOKEN, census

SCANNED = [REPO / "compbias", REPO / "benchmarks", REPO / "mlproject"]
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
PICKLING_FLAVOURS = {"pytorch", "sklearn", "keras", "tensorflow", "xgboost", "lightgbm", "catboost"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def unpickling_problems(source: str, filename: str) -> list[str]:
    """Every construct in ``source`` that can unpickle data or write a pickled model."""
    tree = ast.parse(source, filename)
    out = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLING_MODULES:
                    out.append(f"{where}: imports {a.name}")
                if a.name.startswith("mlflow.") and a.name.split(".")[1] in PICKLING_FLAVOURS:
                    out.append(f"{where}: imports the pickling MLflow flavour {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLING_MODULES:
                out.append(f"{where}: imports from {node.module}")
            if node.module == "mlflow" and any(a.name in PICKLING_FLAVOURS for a in node.names):
                out.append(f"{where}: imports a pickling MLflow flavour from mlflow")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load",) or (last == "load" and name.endswith("torch.load")):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where}: torch.load without weights_only=True")
            if name == "torch.save":
                out.append(f"{where}: torch.save writes a pickle; save weights with safetensors")
            if name in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    out.append(f"{where}: np.load with allow_pickle not False")
            if name in ("pd.read_pickle", "pandas.read_pickle") or last == "read_pickle":
                out.append(f"{where}: read_pickle")
            if name.startswith("mlflow.") and name.split(".")[1] in PICKLING_FLAVOURS:
                out.append(f"{where}: {name} (pickling MLflow flavour)")
            if last in ("save_model", "log_model") and name.startswith("mlflow.pyfunc"):
                pm = _kw(node, "python_model")
                ok = (isinstance(pm, ast.Constant) and isinstance(pm.value, str)) or (
                    isinstance(pm, ast.Call) and _dotted(pm.func) == "str")
                if pm is None or not ok:
                    out.append(f"{where}: {name} with a python_model object (cloudpickled); pass the path of a code file")
    return out


def test_the_scanner_catches_each_unpickling_construct():
    bad = (
        "import pickle\nfrom joblib import load\nimport cloudpickle as cp\nimport torch, numpy as np, mlflow\n"
        "torch.load('w.pt')\ntorch.load('w.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "import pandas as pd\npd.read_pickle('x')\nmlflow.pytorch.log_model(m, 'model')\n"
        "mlflow.pyfunc.save_model('d', python_model=Wrapper())\ntorch.save(m.state_dict(), 'x.pt')\n"
    )
    found = unpickling_problems(bad, "bad.py")
    for what in ("imports pickle", "imports from joblib", "imports cloudpickle", "torch.load without", "allow_pickle",
                 "read_pickle", "mlflow.pytorch.log_model", "python_model object", "torch.save"):
        assert any(what in f for f in found), (what, found)
    assert len([f for f in found if "torch.load without" in f]) == 2
    good = "import torch, numpy as np\ntorch.load('w', weights_only=True)\nnp.load('a', allow_pickle=False)\n" \
           "mlflow.pyfunc.save_model('d', python_model=str(CODE))\n"
    assert unpickling_problems(good, "good.py") == []


def test_no_source_file_unpickles_data():
    files = [p for d in SCANNED if d.exists() for p in d.rglob("*.py")]
    assert len(files) > 30, "the package was not found"
    problems = [p for f in files for p in unpickling_problems(f.read_text(), str(f.relative_to(REPO)))]
    assert not problems, "code that unpickles or pickles models:\n" + "\n".join(problems)


def test_logged_models_are_safetensors_and_code_only(finished_template):
    store = finished_template["store"]
    model_dirs = [p.parent for p in store.rglob("MLmodel")]
    assert len(model_dirs) == 2, model_dirs
    for d in model_dirs:
        files = [p for p in d.rglob("*") if p.is_file()]
        assert any(p.name.endswith(".safetensors") for p in files), f"no safetensors weights in {d}"
        pickled = [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".bin", ".ckpt")]
        assert not pickled, f"pickled files in the logged model: {pickled}"
        import yaml

        pyfunc = yaml.safe_load((d / "MLmodel").read_text())["flavors"]["python_function"]
        # a model from code: MLflow imports the code file, nothing is cloudpickled (it only records its version)
        assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model", pyfunc
        assert "python_model" not in pyfunc and not list(d.rglob("python_model.pkl")), pyfunc


# ---------------------------------------------------------------- loopback

_SERVER_CALL = re.compile(r"\b(mlflow\s+(?:server|ui)|ray\s+start|uvicorn|gunicorn)\b")
_ANY_HOST = re.compile(r"0\.0\.0\.0|::(?![\w:])|\[::\]")


def _launch_texts():
    for pattern in ("Makefile", "README.md", "docs/*.md", "docker/*.sh", "docker/*.yaml", "mlproject/**/*",
                    "benchmarks/**/*.py", "compbias/**/*.py", ".ci/*"):
        for p in REPO.glob(pattern):
            if p.is_file() and p.suffix not in (".png", ".parquet"):
                yield p, p.read_text(errors="replace")


def test_services_the_project_starts_listen_on_loopback_by_default():
    """Every listening service started by the project's code, scripts or docs binds loopback unless told otherwise.

    The one exception is the tracking server's container command
    (``docker/mlflow-server.sh`` listens on 0.0.0.0 inside its container,
    which is the only way to reach it from other containers); the compose
    file must then publish it on the host's loopback only.
    """
    problems = []
    for path, text in _launch_texts():
        rel = path.relative_to(REPO).as_posix()
        if rel == "docs/reliability.md":  # describes this very rule
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if _ANY_HOST.search(line) and rel != "docker/mlflow-server.sh" and "--host" in line:
                problems.append(f"{rel}:{i}: binds all interfaces: {line.strip()}")
            m = _SERVER_CALL.search(line)
            if m and ("--host" in line and "127.0.0.1" not in line and "$MLFLOW_HOST" not in line and "LOOPBACK" not in line):
                problems.append(f"{rel}:{i}: {m.group(1)} with a non-loopback host: {line.strip()}")
    # the container's 0.0.0.0 is only reachable through the compose port mapping, which must be loopback
    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    for name, svc in compose.get("services", {}).items():
        for port in svc.get("ports", []) or []:
            text = port if isinstance(port, str) else str(port.get("host_ip", "")) + ":" + str(port.get("published", ""))
            if not str(text).startswith("127.0.0.1:"):
                problems.append(f"docker/compose.yaml: service {name} publishes {port!r} beyond loopback")
    server_sh = (REPO / "docker" / "mlflow-server.sh").read_text()
    assert "MLFLOW_HOST" in server_sh  # 0.0.0.0 there is overridable ("told otherwise")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- credentials


def test_credentials_never_reach_params_tags_logs_or_reports(finished_template):
    """Study and audit ran with a password and tokens in the environment: none of them was recorded."""
    secrets = (SECRET_PASSWORD, SECRET_TOKEN)
    for proc in finished_template["outputs"]:
        for s in secrets:
            assert s not in proc.stdout and s not in proc.stderr, f"{proc.args[1]} printed a secret"
    store = finished_template["store"]
    c = census(f"sqlite:///{store / 'mlflow.db'}")
    assert len(c.runs) >= 4  # parent, 2 models, audit
    for run in c.runs:
        values = [*run.data.params.items(), *run.data.tags.items(), *((k, "") for k in run.data.metrics)]
        leaked = [kv for kv in values if any(s in kv[0] or s in str(kv[1]) for s in secrets)]
        assert not leaked, f"run {run.info.run_name} recorded a secret: {leaked}"
        keys = [k for k, _ in values if re.search(r"password|token|secret|credential", k, re.I)]
        assert not keys, f"run {run.info.run_name} recorded credential-like keys {keys}"
    for v in c.versions:
        assert not [kv for kv in v.tags.items() if any(s in kv[1] for s in secrets)]
    scanned = 0
    for base in (store, finished_template["root"] / "report"):
        for path in base.rglob("*"):
            if path.is_file() and path.stat().st_size < 20_000_000:
                data = path.read_bytes()
                scanned += 1
                for s in secrets:
                    assert s.encode() not in data, f"secret written into {path}"
    assert scanned > 20
    assert (finished_template["root"] / "report" / "report.html").is_file() or list(
        (finished_template["root"] / "report").rglob("report.html"))


# ---------------------------------------------------------------- dataset confinement


def _image_tree(root: Path, classes=("a", "b"), per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def _load(root: Path, **kw):
    from compbias import jobs

    return jobs.load_dataset("imagefolder", root=str(root), **kw)


@pytest.mark.parametrize(
    "csv_name, row_path",
    [
        ("../outside.csv", None),            # the CSV itself outside the root (relative)
        ("ABSOLUTE", None),                  # ... (absolute path)
        ("attrs.csv", "../outside/x.png"),   # a row escaping with ..
        ("attrs.csv", "/etc/hostname"),      # a row with an absolute path
    ],
    ids=["csv-relative-escape", "csv-absolute-escape", "row-dotdot", "row-absolute"],
)
def test_attribute_paths_are_confined_to_the_dataset_root(tmp_path, csv_name, row_path):
    root = tmp_path / "data"
    _image_tree(root)
    outside = tmp_path / "outside"
    _image_tree(outside, classes=("a",), per_class=1)
    rows = ["path,grp"] + [f"{c}/{i}.png,{i % 2}" for c in ("a", "b") for i in range(4)]
    if row_path:
        rows.append(f"{row_path},1")
    text = "\n".join(rows) + "\n"
    if csv_name == "ABSOLUTE":
        (tmp_path / "abs.csv").write_text(text)
        csv = str(tmp_path / "abs.csv")
    else:
        (root / csv_name).parent.mkdir(parents=True, exist_ok=True)
        (root / csv_name).write_text(text)
        csv = csv_name
    with pytest.raises(ValueError, match="escapes the dataset root"):
        _load(root, attributes_csv=csv, groups=["grp"])


def test_symlinked_images_leaving_the_root_are_refused(tmp_path):
    root = tmp_path / "data"
    _image_tree(root)
    secret = tmp_path / "private"
    _image_tree(secret, classes=("x",), per_class=1)
    (root / "a" / "leak.png").symlink_to(secret / "x" / "0.png")
    with pytest.raises(ValueError, match="outside the dataset root"):
        _load(root)
    (root / "a" / "leak.png").unlink()
    (root / "c").symlink_to(secret / "x", target_is_directory=True)  # a whole class folder elsewhere
    with pytest.raises(ValueError, match="outside the dataset root"):
        _load(root)
    (root / "c").unlink()
    (root / "b" / "sub").symlink_to(secret / "x", target_is_directory=True)  # not followed inside a class
    bundle = _load(root)
    assert bundle.n_classes == 2 and len(bundle.train) + len(bundle.test) == 8
