"""The audit reads the population contract: member.json first, then the study file, then defaults."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from compbias import contract as C
from compbias.platform.audit import Selection, run_audit
from compbias.platform.audit.studyfile import StudyFacts, StudyFile, resolve_facts


def test_member_json_wins_over_the_study_file():
    info = C.MemberInfo(num_classes=2, class_names=["cat", "dog"], positive_class="dog", groups=["site"])
    facts = resolve_facts(StudyFile.parse({"dataset": {"positive_class": 0, "groups": ["other"]}}), info)
    assert facts == StudyFacts(num_classes=2, positive_class=1, groups=["site"], source=C.MEMBER_FILE)


def test_a_class_name_in_the_study_file_is_resolved_with_the_logged_class_names():
    asked = []

    def names():
        asked.append(1)
        return ["cat", "dog"]

    facts = resolve_facts(StudyFile.parse({"dataset": {"positive_class": "dog", "groups": ["site"]}}), class_names=names)
    assert (facts.positive_class, facts.num_classes, facts.groups, facts.problem) == (1, 2, ["site"], None)
    assert facts.source == "study file" and asked == [1]
    assert resolve_facts(StudyFile.parse({"dataset": {"positive_class": 1}}), class_names=lambda: None).positive_class == 1
    assert resolve_facts(StudyFile.parse({"dataset": {"positive_class": "1"}}), class_names=None).positive_class == 1
    assert resolve_facts(StudyFile.parse({"dataset": {}}), class_names=lambda: 1 / 0).positive_class is None  # names not needed: not asked


def test_a_positive_class_that_names_no_class_is_a_problem_not_a_guess():
    facts = resolve_facts(StudyFile.parse({"dataset": {"positive_class": "dog"}}), class_names=lambda: None)
    assert "dataset.positive_class cannot be used" in facts.problem and "logged no class names" in facts.problem
    facts = resolve_facts(StudyFile.parse({"dataset": {"positive_class": "bird"}}), class_names=["cat", "dog"])
    assert "nor a class name ['cat', 'dog']" in facts.problem and "give a class id" in facts.problem
    assert resolve_facts(StudyFile(), info_problem="member.json of run r is unusable: x").problem.startswith("member.json of run r")
    assert resolve_facts(StudyFile()) == StudyFacts(source="defaults")


def _art(client, run_id) -> Path:
    return Path(client.get_run(run_id).info.artifact_uri.replace("file://", ""))


def test_the_audit_takes_num_classes_from_member_json(client, registered, options):
    """The synthetic study (10 classes) declared as a 5-class population: versions reaching class 5 are errors."""
    for key, version in registered.items():
        run_id = client.get_model_version("compbias-synth", version).run_id
        (_art(client, run_id) / C.MEMBER_FILE).write_text(C.MemberInfo(num_classes=5, groups=["ink"]).to_json())
    (res,) = run_audit(client, Selection(registered_model="compbias-synth"), options)
    assert set(res.statuses.values()) == {"error"}
    # the baselines too (labels 0..9): no baseline is left, and the message says why
    assert all("reach class" in r and "has 5 classes" in r for r in res.reasons.values()), res.reasons


def test_an_unusable_member_json_makes_every_version_an_error_naming_it(client, registered, options):
    base = client.get_model_version("compbias-synth", registered[(0, "baseline", "none")]).run_id
    (_art(client, base) / C.MEMBER_FILE).write_text('{"num_classes": 10, "positive_class": 12}')
    (res,) = run_audit(client, Selection(registered_model="compbias-synth"), options)
    assert set(res.statuses.values()) == {"error"}
    assert all(C.MEMBER_FILE in r and "not a class id in [0, 10)" in r for r in res.reasons.values())


def test_a_member_whose_groups_disagree_is_an_error_of_that_version_only(client, registered, options):
    version = registered[(1, "magnitude", "0.9")]
    art = _art(client, client.get_model_version("compbias-synth", version).run_id)
    frame = pd.read_parquet(art / C.PREDICTIONS)
    frame["ink"] = 1 - frame["ink"]
    frame.to_parquet(art / C.PREDICTIONS, index=False)
    (res,) = run_audit(client, Selection(registered_model="compbias-synth"), options)
    bad = f"compbias-synth/{version}"
    assert res.statuses[bad] == "error" and "group column 'ink' disagrees" in res.reasons[bad]
    assert {s for k, s in res.statuses.items() if k != bad} <= {"pass", "fail"}


def test_a_version_written_under_another_schema_or_without_lineage_is_an_error(client, registered, options):
    newer = registered[(0, "magnitude", "0.9")]
    client.set_model_version_tag("compbias-synth", newer, C.SCHEMA, "2")
    orphan = registered[(1, "magnitude", "0.9")]
    client.delete_model_version_tag("compbias-synth", orphan, C.BASELINE_VERSION)
    (res,) = run_audit(client, Selection(registered_model="compbias-synth"), options)
    assert res.statuses[f"compbias-synth/{newer}"] == "error"
    assert "schema '2'" in res.reasons[f"compbias-synth/{newer}"] and "upgrade compbias" in res.reasons[f"compbias-synth/{newer}"]
    assert res.statuses[f"compbias-synth/{orphan}"] == "error"
    assert "needs the baseline it came from" in res.reasons[f"compbias-synth/{orphan}"]
    assert {s for k, s in res.statuses.items() if k not in (f"compbias-synth/{newer}", f"compbias-synth/{orphan}")} <= {"pass", "fail"}


def test_an_invalid_study_file_makes_every_version_an_error_naming_the_key(client, registered, options):
    """The audit section used to fall back to the defaults with a warning; now the audit says what to fix."""
    for version in registered.values():
        run_id = client.get_model_version("compbias-synth", version).run_id
        path = _art(client, run_id) / C.STUDY_FILE
        path.write_text(path.read_text().replace("bootstrap: 40", "bootstrap: -3"))
    (res,) = run_audit(client, Selection(registered_model="compbias-synth"), options)
    assert set(res.statuses.values()) == {"error"}
    assert all("audit.bootstrap" in r and C.STUDY_FILE in r for r in res.reasons.values()), res.reasons
