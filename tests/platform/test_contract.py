"""The population contract (compbias.contract): members, tags, member.json, class ids, predictions tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from compbias import contract as C
from compbias.contract import ContractError, Member, MemberInfo


def table(n=6, *, labels=None, preds=None, **cols) -> pd.DataFrame:
    y = np.asarray(labels if labels is not None else np.arange(n) % 2, dtype=np.int64)
    p = np.asarray(preds if preds is not None else y, dtype=np.int64)
    return pd.DataFrame({"example_id": np.arange(len(y), dtype=np.int64), "label": y, "pred": p, **cols})


# --------------------------------------------------------------------------- Member


def test_baseline_and_compressed_members_round_trip_through_their_tags():
    base = Member(study="s", role="baseline", seed="3")
    assert base.seed == 3 and base.population == C.BASELINE_POPULATION
    tags = base.tags()
    assert tags[C.SCHEMA] == C.SCHEMA_VERSION and tags[C.RUN_KIND] == C.RUN_KIND_MODEL and tags[C.SOURCE] == "register"
    assert C.BASELINE_VERSION not in tags and Member.from_tags(tags) == base
    comp = Member(study="s", role="compressed", seed=3, method="magnitude", level=0.9, baseline_version=7,
                  extra={C.SPEC_HASH: "abc"})
    tags = comp.tags()
    assert tags[C.LEVEL] == "0.9" and tags[C.BASELINE_VERSION] == "7" and tags[C.SPEC_HASH] == "abc"
    back = Member.from_tags(tags)
    assert back == comp and back.population == ("magnitude", "0.9")
    assert set(tags) >= {C.STUDY, C.ROLE, C.SEED, C.METHOD, C.LEVEL} and all(k.startswith(C.PREFIX) for k in tags)


def test_the_study_spelling_of_a_baseline_is_a_member_too():
    m = Member(study="s", role="baseline", seed=0, method="baseline", level="0", source="study")
    assert Member.from_tags(m.tags()) == m and m.population == C.BASELINE_POPULATION


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(study=" ", role="baseline", seed=0), "non-empty study"),
        (dict(study="s", role="teacher", seed=0), "role must be one of"),
        (dict(study="s", role="baseline", seed="zero"), "seed must be an integer"),
        (dict(study="s", role="baseline", seed=0, method="magnitude", level="0.9"), "register it with role 'compressed'"),
        (dict(study="s", role="baseline", seed=0, baseline_version="1"), "no baseline of its own"),
        (dict(study="s", role="compressed", seed=0, baseline_version="1"), "needs its method and level"),
        (dict(study="s", role="compressed", seed=0, method="magnitude", level="none", baseline_version="1"),
         "needs its method and level"),
        (dict(study="s", role="compressed", seed=0, method="magnitude", level="0.9"), "needs the baseline it came from"),
    ],
)
def test_invalid_members_are_refused_by_name(kwargs, fragment):
    with pytest.raises(ContractError, match=fragment):
        Member(**kwargs)


def test_tags_missing_or_of_another_schema_are_refused():
    tags = Member(study="s", role="compressed", seed=1, method="m", level="1", baseline_run_id="r").tags()
    for key in (C.STUDY, C.ROLE, C.SEED, C.METHOD, C.LEVEL):
        broken = {k: v for k, v in tags.items() if k != key}
        with pytest.raises(ContractError, match=rf"missing tag\(s\) \[.*{key}"):
            Member.from_tags(broken)
    with pytest.raises(ContractError, match="schema '9'.*upgrade compbias"):
        Member.from_tags({**tags, C.SCHEMA: "9"})


def test_lineage_tags_are_the_members_tags_without_checks():
    unchecked = C.lineage_tags(study="s", role="compressed", seed=2, method="m", level="1")
    assert unchecked[C.ROLE] == "compressed" and C.BASELINE_VERSION not in unchecked


def test_metric_key_rule():
    assert C.metric_key("Male=1&Young=0") == "Male_1_Young_0"
    assert C.metric_key("structured+at_kd") == "structured_at_kd"
    assert C.metric_key("!!") == "_" and C.metric_key(0.5) == "0.5"


# --------------------------------------------------------------------------- MemberInfo and classes


def test_member_info_json_round_trip_resolves_a_class_name():
    info = MemberInfo(num_classes=2, class_names=["benign", "malignant"], positive_class="malignant", groups=["large"])
    assert info.positive_class == 1 and info.class_names == ("benign", "malignant")
    data = json.loads(info.to_json())
    assert data == {"schema": C.SCHEMA_VERSION, "num_classes": 2, "class_names": ["benign", "malignant"],
                    "positive_class": 1, "groups": ["large"]}
    assert MemberInfo.from_json(info.to_json()) == info
    assert MemberInfo.from_json('{"num_classes": 3}') == MemberInfo(3)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_classes=1), "at least 2"),
        (dict(num_classes="two"), "integer of at least 2"),
        (dict(num_classes=2.5), "integer of at least 2"),
        (dict(num_classes=3, class_names=["a", "b"]), "2 class names .* for 3 classes"),
        (dict(num_classes=2, class_names=["a", "a"]), "distinct"),
        (dict(num_classes=2, positive_class=2), r"not a class id in \[0, 2\)"),
        (dict(num_classes=2, class_names=["a", "b"], positive_class="c"), r"nor a class name \['a', 'b'\]"),
    ],
)
def test_invalid_member_info_is_refused(kwargs, fragment):
    with pytest.raises(ContractError, match=fragment):
        MemberInfo(**kwargs)


@pytest.mark.parametrize(
    "text, fragment",
    [("{not json", "not JSON"), ('{"groups": []}', "needs at least num_classes"), ('[1]', "needs at least num_classes"),
     ('{"num_classes": 2, "schema": "2"}', "schema '2'")],
)
def test_unusable_member_json_is_refused(text, fragment):
    with pytest.raises(ContractError, match=fragment):
        MemberInfo.from_json(text)


def test_resolve_class_takes_ids_their_strings_and_names():
    names = ["cat", "dog"]
    assert C.resolve_class(1, 2) == 1 and C.resolve_class("0", 2) == 0 and C.resolve_class(np.int64(1), 2) == 1
    assert C.resolve_class("dog", 2, names) == 1
    for bad in (2, -1, "2", "dog", True, 1.5, " 1x"):
        with pytest.raises(ContractError, match="is not a class id in"):
            C.resolve_class(bad, 2)
    with pytest.raises(ContractError, match=r"no class names are known"):
        C.resolve_class("dog", 2)


# --------------------------------------------------------------------------- predictions tables


def test_a_valid_table_is_sorted_by_example():
    t = table(4, prob=[0.9, 0.6, 0.7, 1.0], ink=[0, 1, 1, 0]).iloc[::-1]
    out = C.validate_predictions(t, num_classes=2, groups=["ink"])
    assert out["example_id"].tolist() == [0, 1, 2, 3] and list(out.index) == [0, 1, 2, 3]
    assert C.group_columns(out) == ["ink"] and C.group_columns(out, ["ink", "absent"]) == ["ink"]
    assert C.group_columns(out, []) == [] and C.group_columns(out, ["absent"]) == ["ink"]


@pytest.mark.parametrize(
    "make, kwargs, fragment",
    [
        (lambda: [1, 2], {}, "must be a pandas DataFrame"),
        (lambda: table().drop(columns=["pred"]), {}, r"lacks the column\(s\) \['pred'\]"),
        (lambda: table().iloc[:0], {}, "has no rows"),
        (lambda: table().assign(label=[0, 1, None, 1, 0, 1]), {}, "'label' has missing values"),
        (lambda: table().assign(pred=[0.0, 1.5, 0, 1, 0, 1]), {}, "'pred' must hold integers"),
        (lambda: table().assign(example_id=[-1, 1, 2, 3, 4, 5]), {}, "'example_id' has negative values"),
        (lambda: table(preds=[0, 1, 0, 1, 0, 2]), {"num_classes": 2}, r"1 pred value\(s\) out of range \(max 2\) for 2 classes"),
        (lambda: table(labels=[0, 1, 0, 1, 0, 5]), {"num_classes": 2}, r"label value\(s\) out of range"),
        (lambda: table().assign(example_id=[0, 1, 2, 3, 4, 4]), {}, r"1 duplicated example_id row\(s\) \(e.g. 4\)"),
        (lambda: table().assign(prob=[0.5, 1.2, 0.5, 0.5, 0.5, 0.5]), {}, r"'prob' must hold probabilities in \[0, 1\]"),
        (lambda: table(), {"groups": ["sex"]}, "lacks the group column 'sex'"),
        (lambda: table().assign(sex=[0, 1, None, 1, 0, 1]), {"groups": ["sex"]}, "group column 'sex' has missing values"),
    ],
)
def test_every_broken_table_is_refused_by_name(make, kwargs, fragment):
    with pytest.raises(ContractError, match=fragment):
        C.validate_predictions(make(), where="t.parquet", **kwargs)


def test_population_members_must_share_examples_labels_and_groups():
    ref = table(6, ink=[0, 1, 0, 1, 0, 1])
    C.validate_population({"a": ref, "b": table(6, preds=[1] * 6, ink=[0, 1, 0, 1, 0, 1])}, groups=["ink"])
    C.validate_population({"only": ref})
    other_ids = table(6).assign(example_id=np.arange(6) + 3)
    with pytest.raises(ContractError, match=r"b predicts other examples than a \(6 vs 6 rows: 3 example_id value\(s\) only in b, 3 only in a\).*same test examples"):
        C.validate_population({"a": ref, "b": other_ids})
    with pytest.raises(ContractError, match="predicts other examples"):
        C.validate_population({"a": ref, "b": table(5)})
    relabelled = table(6, labels=[1, 1, 0, 1, 0, 1])
    with pytest.raises(ContractError, match=r"b: labels disagree with a on 1 example\(s\) \(e.g. example_id 0\)"):
        C.validate_population({"a": ref, "b": relabelled})
    with pytest.raises(ContractError, match=r"b: group column 'ink' disagrees with a on 2 example\(s\)"):
        C.validate_population({"a": ref, "b": table(6, ink=[1, 0, 0, 1, 0, 1])}, groups=["ink"])
