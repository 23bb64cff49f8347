"""The `compbias` command line: config lookup, bad input, step preconditions, audit delegation."""

import os
import sys
import types
from pathlib import Path

import pytest
import yaml

from compbias.platform import cli

REPO = Path(__file__).resolve().parents[2]


def test_config_names_resolve_to_the_shipped_files():
    assert cli.resolve_config_path("digits") == REPO / "configs" / "digits.yaml"
    assert cli.resolve_config_path(str(REPO / "configs" / "celeba.yaml")).name == "celeba.yaml"
    with pytest.raises(FileNotFoundError, match="digits"):
        cli.resolve_config_path("no-such-study")


def test_study_names_look_in_the_cwd_first_then_at_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert cli.resolve_config_path("configs/digits.yaml") == REPO / "configs" / "digits.yaml"
    (tmp_path / "digits.yaml").write_text("name: mine\n")
    (tmp_path / "other.yaml").write_text("name: other\n")
    assert cli.resolve_config_path("digits").resolve() == tmp_path / "digits.yaml"
    assert cli.resolve_config_path("other").resolve() == tmp_path / "other.yaml"
    with pytest.raises(FileNotFoundError, match="celeba"):  # the message lists the shipped names
        cli.resolve_config_path(str(tmp_path / "missing.yaml"))


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"compbias {version('compbias')}"


def test_caches_of_an_installed_package_go_to_the_user_cache(tmp_path, monkeypatch):
    from compbias import _locations

    monkeypatch.delenv("COMPBIAS_CACHE_DIR", raising=False)
    assert _locations.source_checkout() == REPO and _locations.cache_dir("numba") == REPO / ".cache" / "numba"
    monkeypatch.setattr(_locations, "PACKAGE_DIR", tmp_path / "lib" / "python3.11" / "site-packages" / "compbias")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _locations.source_checkout() is None
    assert _locations.cache_dir("numba") == tmp_path / "xdg" / "compbias" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _locations.cache_dir("datasets") == tmp_path / "home" / ".cache" / "compbias" / "datasets"


def test_one_cache_root_for_datasets_audit_artifacts_and_numba(tmp_path, monkeypatch):
    """COMPBIAS_CACHE_DIR is the root of every cache: the dataset cache and the audit's artifacts sit under it."""
    from compbias import _locations
    from compbias.platform.audit.fetch import default_cache_dir

    monkeypatch.setenv("COMPBIAS_CACHE_DIR", str(tmp_path / "c"))
    assert _locations.cache_dir("datasets") == tmp_path / "c" / "datasets"
    assert default_cache_dir() == tmp_path / "c" / "audit"
    assert _locations.cache_dir("numba") == tmp_path / "c" / "numba"


def test_bad_study_file_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "compression": [{"method": "magnitude", "levels": [1.5]}]}))
    assert cli.main(["study", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "compression[0].levels[0]" in err


def test_bad_seeds_option_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["study", "digits", "--seeds", "a,b"])
    assert info.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_dataset_root_is_required_for_real_datasets(capsys):
    assert cli.main(["study", "celeba"]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert cli.main(["study", "celeba", "--data-root", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compress_without_trained_baselines_says_to_train_first(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "nobase", "population": {"seeds": 1}, "compression": [{"method": "quantize", "levels": ["fp16"]}]}))
    assert cli.main(["compress", str(study), "--tracking-uri", uri, "--executor", "local"]) == 2
    assert "compbias train" in capsys.readouterr().err


def test_compress_refuses_methods_the_study_lacks(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "m", "compression": [{"method": "quantize", "levels": ["fp16"]}]}))
    assert cli.main(["compress", str(study), "--method", "structured", "--tracking-uri", f"sqlite:///{tmp_path}/db"]) == 2
    assert "no method" in capsys.readouterr().err


def test_empty_mlproject_values_mean_not_given():
    assert cli.drop_empty_options(["--study", "digits", "--max-cev", "", "--alias=", "--force"]) == ["--study", "digits", "--force"]


def test_audit_is_delegated_to_the_audit_cli(monkeypatch):
    seen = {}
    fake = types.ModuleType("compbias.platform.audit.cli")

    def add_arguments(parser):
        parser.add_argument("--study")
        parser.add_argument("--max-cev", type=float)

    def run(args):
        seen["args"] = args
        return 3

    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "compbias.platform.audit.cli", fake)
    assert cli.main(["audit", "--study", "digits", "--max-cev", ""]) == 3
    assert seen["args"].study == "digits" and seen["args"].max_cev is None


def test_audit_without_the_audit_service_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "compbias.platform.audit.cli", None)  # import raises ModuleNotFoundError
    assert cli.main(["audit", "--study", "x"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_the_cli_called_in_process_leaves_the_callers_environment_as_it_was(tmp_path, monkeypatch, capsys):
    """main([...]) sets numba's and MLflow's switches for its own run only (a leaked
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT silenced a later caller's MLflow run links)."""
    for key in cli.CLI_ENV:
        monkeypatch.delenv(key, raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncompression: 3\n")
    assert cli.main(["study", str(bad)]) == 2
    assert {k: os.environ.get(k) for k in cli.CLI_ENV} == {k: None for k in cli.CLI_ENV}
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # the user's own choice is kept
    assert cli.main(["study", str(bad)]) == 2
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "false"


def test_audit_is_a_sub_command_of_the_one_parser(capsys):
    args = cli.build_parser().parse_args(["audit", "--study", "digits", "--max-cev", "5", "--no-gallery"])
    assert (args.command, args.study, args.max_cev, args.no_gallery, args.confidence) == ("audit", "digits", 5.0, True, None)
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: compbias audit") and "thresholds (override the study file's audit.thresholds)" in out
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "--confidence", "high"])
    assert info.value.code == 2 and "--confidence" in capsys.readouterr().err
