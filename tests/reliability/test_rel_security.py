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
            if name in ("mlflow.pyfunc.load_model", "pyfunc.load_model"):
                out.append(f"{where}: {name} unpickles a cloudpickled python_model or runs its code file")
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
        "mlflow.pyfunc.load_model('models:/m/1')\n"
    )
    found = unpickling_problems(bad, "bad.py")
    for what in ("imports pickle", "imports from joblib", "imports cloudpickle", "torch.load without", "allow_pickle",
                 "read_pickle", "mlflow.pytorch.log_model", "python_model object", "torch.save", "pyfunc.load_model"):
        assert any(what in f for f in found), (what, found)
    assert len([f for f in found if "torch.load without" in f]) == 2
    good = "import torch, numpy as np\ntorch.load('w', weights_only=True)\nnp.load('a', allow_pickle=False)\n" \
           "mlflow.pyfunc.save_model('d', python_model=str(CODE))\n"
    assert unpickling_problems(good, "good.py") == []


#: The explicit opt-in (``compbias audit --evaluate --allow-pickle``, docs/bring-your-own.md): the one
#: function allowed to unpickle a user's model; its default refusal is tested in tests/platform/test_evaluate.py.
OPT_IN = {"compbias/platform/evaluate/loaders.py": "_load_executing_code"}


def _opt_in_lines(source: str, filename: str) -> set[int]:
    name = OPT_IN.get(filename)
    if name is None:
        return set()
    fns = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name]
    assert len(fns) == 1, f"{filename} must define {name} once"
    return set(range(fns[0].lineno, fns[0].end_lineno + 1))


def test_no_source_file_unpickles_data():
    files = [p for d in SCANNED if d.exists() for p in d.rglob("*.py")]
    assert len(files) > 30, "the package was not found"
    problems = []
    for f in files:
        rel, text = str(f.relative_to(REPO)), f.read_text()
        allowed = _opt_in_lines(text, rel)
        problems += [p for p in unpickling_problems(text, rel) if int(p.split(":")[1]) not in allowed]
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


_RAY_SOCKETS_SCRIPT = r"""
import json, os, socket, struct
from compbias.platform.orchestration import init_ray, local_ray_is_loopback
import ray

init_ray(num_cpus=1)


@ray.remote
def work(x):
    return x + 1


assert ray.get([work.remote(i) for i in range(3)]) == [1, 2, 3]  # workers up and answering


def descendants(root):
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out | {root}


def listening():  # inode -> "address:port" of every listening TCP socket (IPv4 and IPv6)
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] != "0A":  # LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                raw = bytes.fromhex(hexaddr)
                raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
                found[cols[9]] = f"{socket.inet_ntop(family, raw)}:{int(hexport, 16)}"
    return found


socks, names = listening(), {}
rows = []
for pid in sorted(descendants(os.getpid())):
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = target[8:-1]
            if inode in socks:
                rows.append([comm, socks[inode]])
print("RESULT " + json.dumps({"gcs": ray.get_runtime_context().gcs_address, "loopback": local_ray_is_loopback(), "listening": rows}))
ray.shutdown()
"""


def _local_ray_listeners(bind: str | None) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COMPBIAS_RAY_BIND", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if bind is not None:
        env["COMPBIAS_RAY_BIND"] = bind
    proc = subprocess.run([sys.executable, "-c", _RAY_SOCKETS_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


@pytest.mark.timeout(400)
def test_the_local_ray_compbias_starts_listens_on_loopback_only():
    """The Ray cluster ``compbias study`` starts on one machine (no RAY_ADDRESS) is not reachable from other machines.

    Every listening TCP socket of the driver and of every process it started
    (GCS, raylet, agents, workers) is read from /proc after tasks ran. The
    same check with ``COMPBIAS_RAY_BIND=all`` (Ray's own default, "told
    otherwise") must see sockets on other interfaces, which shows the check
    can fail.
    """
    default = _local_ray_listeners(None)
    procs = {comm for comm, _ in default["listening"]}
    assert {"gcs_server", "raylet"} <= procs, default  # the check really saw Ray's servers
    assert default["loopback"] and default["gcs"].startswith("127.0.0.1:"), default
    exposed = [row for row in default["listening"] if not _is_loopback(row[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"

    told = _local_ray_listeners("all")
    assert not told["loopback"], told
    assert [row for row in told["listening"] if not _is_loopback(row[1])], told


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
