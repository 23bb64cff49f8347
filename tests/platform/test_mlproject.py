"""The MLproject: its entry points render commands the compbias CLI accepts."""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.projects import _project_spec

from compbias.platform import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PREFIX = ["PYTHONPATH=$(pwd)/..:$PYTHONPATH", "python", "-m", "compbias.platform.cli"]


@pytest.fixture(scope="module")
def project():
    return _project_spec.load_project(str(REPO / "mlproject"))


def _render(project, entry, params):
    argv = shlex.split(project.get_entry_point(entry).compute_command(params, tempfile.mkdtemp()))
    assert argv[:4] == PREFIX
    return argv[4:]


def test_entry_points_and_environment(project):
    assert set(project._entry_points) == {"study", "train_population", "compress", "audit"}
    assert project.get_entry_point("study").parameters["config"].type == "path"
    env = yaml.safe_load((REPO / "mlproject" / "python_env.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert env["python"] == "3.11"
    assert env["dependencies"] == pyproject["project"]["dependencies"]


@pytest.mark.parametrize("entry, command", [("study", "study"), ("train_population", "train"), ("compress", "compress")])
def test_defaults_mean_as_in_the_study_file(project, entry, command):
    argv = _render(project, entry, {"config": str(REPO / "configs" / "digits.yaml")})
    args = cli.build_parser().parse_args(argv)
    assert args.command == command and args.seeds is None and not args.data_root and args.executor == "ray"


def test_compress_parameters_reach_the_cli(project):
    argv = _render(project, "compress", {"config": str(REPO / "configs" / "digits.yaml"), "method": "magnitude+kd", "level": "0.9", "seeds": "0,2"})
    args = cli.build_parser().parse_args(argv)
    assert args.method == ["magnitude+kd"] and args.level == ["0.9"] and args.seeds == [0, 2]


def test_audit_parameters_reach_the_audit_cli(project):
    argv = _render(project, "audit", {"study": "digits", "max_cev": "50"})
    assert argv[0] == "audit"
    from compbias.platform.audit import cli as audit_cli

    parser = argparse.ArgumentParser()
    audit_cli.add_arguments(parser)
    args = parser.parse_args(cli.drop_empty_options(argv[1:]))
    assert args.study == "digits" and args.max_cev == 50.0 and args.max_sde is None


def test_pythonpath_prefix_finds_the_checkout_and_shadows_nothing_when_installed(tmp_path):
    """`..` on PYTHONPATH: the repository in a checkout; in a wheel (compbias/share/mlproject) no module."""
    prefix = PREFIX[0]
    probe = "import compbias, platform; print(compbias.__file__); print(platform.system())"

    def run_in(project_dir: Path) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run(["bash", "-c", f"{prefix} {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"],
                             cwd=project_dir, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    compbias_file, system = run_in(REPO / "mlproject")
    assert Path(compbias_file).resolve() == REPO / "compbias" / "__init__.py" and system == "Linux"

    # the installed layout: site-packages/compbias/{platform,...,share/mlproject}
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "compbias", site / "compbias", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "mlproject", site / "compbias" / "share" / "mlproject")
    _, system = run_in(site / "compbias" / "share" / "mlproject")
    assert system == "Linux"  # the standard library's platform, not compbias/platform
