"""compbias as a library: built into a wheel, installed in a fresh venv, used outside the checkout.

The wheel is built from the repository's files (tracked and untracked, not
ignored) copied to a temporary directory, and installed with ``pip install
--no-deps`` into a new venv in another temporary directory. Its dependencies
(torch, Ray, MLflow, ...) are not installed again: a ``.pth`` file in the new
venv appends the project venv's ``site-packages`` to ``sys.path`` (a line of
a ``.pth`` file adds a path; the ``.pth`` files of that path, among them the
editable install of this checkout, are not run), and ``pip check`` confirms
that they satisfy the wheel's requirements. Every command then runs from a
temporary working directory with the new venv first on ``PATH``, no
``PYTHONPATH``, and ``HOME``/``XDG_CACHE_HOME`` in the temporary directory, and
the tests check that ``compbias`` is imported from the new venv, never from
the checkout.

What a user of the installed package relies on:

* ``compbias --version``; ``compbias study digits`` runs the study file that
  ships in the wheel, on a local Ray whose workers import the installed
  package, and registers its versions; ``compbias audit`` audits them;
* the numba cache goes to the user's cache directory, not into ``site-packages``;
* the MLflow project that ships in the wheel runs its ``study`` entry point;
* ``ray job submit --working-dir`` runs ``compbias study`` on a two-node
  loopback cluster started from the installed package. Ray's job server is
  part of its dashboard, which needs ``ray[default]``: the test installs
  that extra into the new venv (from the package index: this one test needs
  it), not into the project's venv.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.services import (  # noqa: E402
    VENV_BIN,
    free_port,
    loopback_only_network,
    start_ray_cluster,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TINY_STUDY = {
    "name": "wheel-tiny",
    "dataset": {"kind": "digits", "groups": ["ink"], "max_train": 600},
    "train": {"epochs": 1},
    "population": {"seeds": 1},
    "compression": [{"method": "magnitude", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 0}],
    "resources": {"cpus_per_task": 1, "gpus_per_task": 0},
    "audit": {"bootstrap": 20, "probe_size": 32, "cie_fractions": [0.05]},
}


def _run(argv, env, cwd, timeout=600, check=True):
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\n--- stdout:\n{proc.stdout[-4000:]}\n--- stderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def test_every_package_of_the_source_tree_goes_into_the_wheel():
    """pyproject.toml lists the packages (configs/ and mlproject/ are mapped in): a new one must be listed."""
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO_ROOT).parts)
        for p in (REPO_ROOT / "compbias").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk <= listed, f"packages missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"
    mapped = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert (REPO_ROOT / mapped["compbias.configs"] / "digits.yaml").is_file()
    assert (REPO_ROOT / mapped["compbias.share.mlproject"] / "MLproject").is_file()


# --------------------------------------------------------------------------- the installed package


def _source_copy(dest: Path) -> Path:
    """The files of the checkout that a build sees: tracked and untracked, minus the ignored ones."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _console_script(bin_dir: Path, python: Path, dist: str, name: str) -> None:
    """The console script ``name`` of an installed distribution, as pip would write it into ``bin_dir``."""
    (ep,) = [e for e in importlib.metadata.distribution(dist).entry_points if e.group == "console_scripts" and e.name == name]
    module, _, attr = ep.value.partition(":")
    script = bin_dir / name
    script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
    script.chmod(0o755)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = _source_copy(root / "src")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(src)],
         dict(os.environ), root)
    (wheel,) = dist.glob("compbias-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], dict(os.environ), root)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        dict(os.environ), root).stdout.strip())
    (purelib / "_compbias_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run([*pip, "install", "--no-deps", "--no-index", str(wheel)], dict(os.environ), root)
    for dist_name, script in (("mlflow", "mlflow"), ("ray", "ray")):
        _console_script(venv / "bin", python, dist_name, script)

    home, work = root / "home", root / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPBIAS_", "MLFLOW_", "RAY_"))}
    for key in ("PYTHONPATH", "NUMBA_CACHE_DIR", "VIRTUAL_ENV"):
        env.pop(key, None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()]
    env.update(
        PATH=os.pathsep.join([str(venv / "bin"), *path]),
        HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
        MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", COMPBIAS_ARTIFACT_ROOT=str(work / "mlartifacts"),
        RAY_USAGE_STATS_ENABLED="0", MPLBACKEND="Agg",
    )
    return {"root": root, "venv": venv, "python": python, "purelib": purelib, "work": work, "env": env, "wheel": wheel}


# The job runs in the unpacked --working-dir. Both nodes of this one-machine cluster share Ray's
# session directory, so when the worker node sets up the same working_dir for its tasks it unpacks
# it again over the directory the job's driver runs in, and the driver's os.getcwd() (which MLflow's
# save_model calls) fails with FileNotFoundError. On separate machines each node has its own
# session directory; here the driver works from a copy of the working_dir.
ENTRYPOINT = 'd=$(mktemp -d) && cp -R . "$d" && cd "$d" && exec compbias study wheel-job.yaml'


def _versions(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client, client.search_model_versions(f"name = '{name}'")




@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_wheel_ships_the_study_files_and_the_mlproject(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {"compbias/configs/digits.yaml", "compbias/share/mlproject/MLproject", "compbias/share/mlproject/python_env.yaml"} <= names
    meta = zipfile.ZipFile(installed["wheel"]).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    from email.parser import Parser

    from packaging.specifiers import SpecifierSet

    fields = Parser().parsestr(meta)
    supported = SpecifierSet(fields["Requires-Python"])
    assert all(v in supported for v in ("3.10", "3.11", "3.12", "3.13")) and "3.9" not in supported
    torch = next(r for r in fields.get_all("Requires-Dist") if r.startswith("torch") and not r.startswith("torchvision"))
    assert "==" not in torch, torch  # a range; the tested pair is in constraints.txt
    # the project venv's packages satisfy every requirement of the wheel
    _run([sys.executable, "-m", "pip", "--python", str(installed["python"]), "check"], installed["env"], installed["work"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_installed_compbias_runs_the_shipped_digits_study_and_its_audit(installed):
    env, work, venv = installed["env"], installed["work"], installed["venv"]
    where = _run([str(installed["python"]), "-c", "import compbias; print(compbias.__file__)"], env, work).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(REPO_ROOT), where

    version = _run(["compbias", "--version"], env, work).stdout.strip()
    assert version == f"compbias {importlib.metadata.version('compbias')}"

    assert not (work / "configs").exists() and not (work / "digits.yaml").exists()
    study = _run(["compbias", "study", "digits", "--seeds", "1"], env, work)
    assert "0 failed" in study.stdout, study.stdout[-3000:]
    uri = env["MLFLOW_TRACKING_URI"]
    client, versions = _versions(uri, "compbias-digits")
    # the shipped digits.yaml: a baseline, magnitude 0.5/0.9/0.95, int8_static, magnitude+kd 0.9
    assert len(versions) == 6, [(v.version, v.tags) for v in versions]

    audit = _run(["compbias", "audit", "--study", "digits", "--bootstrap", "20", "--probe-size", "32", "--no-gallery"], env, work)
    _, versions = _versions(uri, "compbias-digits")
    audit_runs = {v.tags.get("compbias.audit.run_id") for v in versions}
    assert None not in audit_runs and len(audit_runs) == 1, (audit_runs, audit.stdout[-2000:])
    assert client.get_run(audit_runs.pop()).info.status == "FINISHED"

    # the numba cache is the user's (XDG_CACHE_HOME), nothing is cached into site-packages
    numba_cache = Path(env["XDG_CACHE_HOME"]) / "compbias" / "numba"
    assert any(numba_cache.rglob("*.nbi")), f"no numba cache in {numba_cache}"
    assert not any((installed["purelib"] / "compbias").rglob("*.nbi"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_installed_mlproject_runs_the_study_entry_point(installed):
    env, work = installed["env"], installed["work"]
    project = Path(_run([str(installed["python"]), "-c", "import compbias; print(compbias.mlproject_dir())"], env, work).stdout.strip())
    assert project.resolve().is_relative_to(installed["purelib"].resolve()), project
    study = work / "wheel-tiny.yaml"
    study.write_text(yaml.safe_dump(TINY_STUDY, sort_keys=False))
    _run(["mlflow", "run", str(project), "-e", "study", "--env-manager", "local",
          "-P", f"config={study.name}", "-P", "executor=local"], env, work)
    _, versions = _versions(env["MLFLOW_TRACKING_URI"], "compbias-wheel-tiny")
    assert len(versions) == 2  # baseline and magnitude 0.5 of one seed
    _run(["mlflow", "run", str(project), "-e", "audit", "--env-manager", "local",
          "-P", "study=wheel-tiny", "-P", "bootstrap=20"], env, work)
    _, versions = _versions(env["MLFLOW_TRACKING_URI"], "compbias-wheel-tiny")
    assert all(v.tags.get("compbias.audit.run_id") for v in versions)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_job_submit_runs_the_installed_compbias_on_a_two_node_cluster(installed, tmp_path):
    env, venv = installed["env"], installed["venv"]
    # Ray's job server is part of the dashboard, which needs ray[default] (aiohttp-cors, grpcio,
    # opencensus, prometheus_client, ...): installed into the new venv only, from the package index
    _run([sys.executable, "-m", "pip", "--python", str(installed["python"]), "install", "--quiet",
          f"ray[default]=={importlib.metadata.version('ray')}"], dict(os.environ), tmp_path)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    study = {**TINY_STUDY, "name": "wheel-job", "population": {"seeds": 2}}
    (job_dir / "wheel-job.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    uri = f"sqlite:///{tmp_path}/jobs.db"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "COMPBIAS_ARTIFACT_ROOT": str(tmp_path / "job-artifacts")}}
    node_env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "COMPBIAS_"))}
    dashboard = free_port()
    with loopback_only_network():
        cluster = start_ray_cluster(workers=1, cpus_per_node=1, ray_bin=venv / "bin" / "ray",
                                    dashboard_port=dashboard, env=node_env)
        try:
            submit_env = cluster.driver_env(node_env)
            submit_env.pop("RAY_ADDRESS")
            submitted = _run(
                ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(job_dir),
                 "--runtime-env-json", json.dumps(runtime_env), "--", "sh", "-c", ENTRYPOINT],
                submit_env, tmp_path, check=False,
            )
        finally:
            cluster.stop()
    assert submitted.returncode == 0 and "succeeded" in submitted.stdout, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    client, versions = _versions(uri, "compbias-wheel-job")
    assert len(versions) == 4  # 2 seeds x (baseline, magnitude 0.5)
    runs = [client.get_run(v.run_id) for v in versions]
    assert {r.data.tags["compbias.ray_node"] for r in runs} == set(cluster.node_ids)  # both nodes worked
