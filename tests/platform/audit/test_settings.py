"""One settings type: study file, overrides and defaults meet in AuditSettings.resolve; the study file is parsed once."""

from __future__ import annotations

import argparse

import pytest

from compbias.platform.audit import cli as audit_cli
from compbias.platform.audit.settings import AuditOptions, AuditSettings
from compbias.platform.audit.studyfile import StudyFile, TestSplit
from compbias.platform.config import AuditSpec, GateSpec, StudyConfigError


def test_the_defaults_are_the_study_files_schemas():
    spec = AuditSpec()
    s = AuditSettings()
    assert (s.bootstrap, s.probe_size, s.alias, s.min_count, s.intervals) == (
        spec.bootstrap, spec.probe_size, spec.alias, spec.min_count, spec.intervals)
    assert s.cie_fractions == tuple(spec.cie_fractions) and s.gate == GateSpec()
    assert AuditSettings.resolve() == s


def test_overrides_win_over_the_study_file_and_thresholds_merge_key_by_key():
    spec = AuditSpec.model_validate({"bootstrap": 50, "alias": "ok", "thresholds": {"cev": 3.0, "sde": 1.0}})
    s = AuditSettings.resolve(spec, {"bootstrap": 7, "seed": None, "thresholds": {"sde": 9.0}}, positive_class=1)
    assert (s.bootstrap, s.alias, s.seed, s.positive_class) == (7, "ok", 0, 1)
    assert s.thresholds == {"cev": 3.0, "sde": 9.0, "worst_group_fpr_change": None, "acc_drop": None}
    with pytest.raises(TypeError, match="unknown audit setting"):
        AuditSettings.resolve(spec, {"bootstrapp": 3})


def test_options_take_settings_as_keywords_and_copy_through_their_dict():
    o = AuditOptions(bootstrap=200, alias=None, similarity=False, cache_dir=None)
    assert o.settings == {"bootstrap": 200} and o.cache_dir is None and not o.similarity
    again = AuditOptions(**{**o.__dict__, "thresholds": {"cev": 1.0}})
    assert again.settings == {"bootstrap": 200, "thresholds": {"cev": 1.0}} and again.similarity is False
    assert again.resolve(AuditSpec(bootstrap=5)).bootstrap == 200
    with pytest.raises(TypeError, match="unexpected"):
        AuditOptions(bootstrapp=1)


def _args(*argv):
    parser = argparse.ArgumentParser()
    audit_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_audit_options_left_out_are_the_study_files_and_the_help_names_the_defaults():
    opts = audit_cli.options_from_args(_args())
    assert opts.settings == {}  # nothing given: the study file (else its schema) decides
    assert opts.workers == AuditOptions().workers and opts.claim_ttl == AuditOptions().claim_ttl
    opts = audit_cli.options_from_args(_args("--confidence", "0.9", "--seed", "3", "--smoothing", "0.5", "--workers", "1"))
    assert opts.settings == {"confidence": 0.9, "seed": 3, "smoothing": 0.5} and opts.workers == 1
    parser = argparse.ArgumentParser()
    audit_cli.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    d = AuditSettings()
    assert f"(default {d.confidence:g})" in text and f"the study file's, {d.bootstrap}" in text
    assert f"(default {d.seed})" in text
    with pytest.raises(ValueError, match="--confidence"):
        audit_cli.options_from_args(_args("--confidence", "1.5"))


def test_a_study_file_is_parsed_once_into_the_sections_the_audit_reads():
    study = StudyFile.parse({"name": "x", "train": {"anything": 1}, "dataset": {"kind": "digits", "groups": ["ink"]},
                             "audit": {"bootstrap": 10}}, source="study.yaml of run r")
    assert study.dataset.groups == ["ink"] and study.audit.bootstrap == 10 and study.dataset_kind == "digits"
    partial = StudyFile.parse({"dataset": {"positive_class": 1}})  # as `compbias audit --evaluate` may log one
    assert partial.present and partial.dataset_kind is None and partial.audit == AuditSpec()
    assert not StudyFile().present
    with pytest.raises(StudyConfigError, match=r"study.yaml of run r(.|\n)*audit.bootstrap"):
        StudyFile.parse({"audit": {"bootstrap": -1}}, source="study.yaml of run r")


def test_the_test_split_is_loaded_once(monkeypatch):
    import compbias.jobs

    calls = []

    def load_dataset(kind, **options):
        calls.append(kind)
        return object()

    monkeypatch.setattr(compbias.jobs, "load_dataset", load_dataset)
    split = TestSplit(StudyFile.parse({"dataset": {"kind": "digits"}}).dataset)
    assert split.bundle() is split.bundle() and calls == ["digits"]

    def broken(kind, **options):
        calls.append(kind)
        raise OSError("no such directory")

    monkeypatch.setattr(compbias.jobs, "load_dataset", broken)
    split = TestSplit(StudyFile.parse({"dataset": {"kind": "cifar10"}}).dataset)
    for _ in range(2):
        with pytest.raises(OSError, match="no such directory"):
            split.bundle()
    assert calls == ["digits", "cifar10"]  # a failure is remembered, not retried
    with pytest.raises(LookupError, match="names no dataset"):
        TestSplit(None).bundle()
