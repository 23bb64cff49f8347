"""The MLproject: its entry points render commands the compbias CLI accepts."""

import argparse
import shlex
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from mlflow.projects import _project_spec

from compbias.platform import cli

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
