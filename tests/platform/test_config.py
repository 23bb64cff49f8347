"""Study-file validation: what a user who mistypes a study file sees."""

import copy
from pathlib import Path

import pytest
import yaml

from compbias.platform.config import StudyConfigError, StudySpec, load_study, parse_study

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "name": "t",
    "compression": [
        {"method": "magnitude", "levels": [0.5, 0.9]},
        {"method": "quantize", "levels": ["int8_static"]},
    ],
}


def _with(**changes):
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = d
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        last = parts[-1]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return d


def _error(data) -> str:
    with pytest.raises(StudyConfigError) as info:
        parse_study(data)
    return str(info.value)


def test_minimal_study_gets_documented_defaults():
    spec = parse_study(BASE)
    assert spec.dataset.kind == "digits"
    assert spec.model.arch == "smallcnn"
    assert spec.train.epochs == 10 and spec.train.lr == 0.05
    assert spec.seeds() == [0, 1, 2]
    assert spec.compression[0].schedule == "gradual"
    assert spec.compression[0].finetune_epochs == 3
    assert spec.compression[1].finetune_epochs == 0
    assert spec.resources.gpus_per_task == "auto"
    assert spec.experiment_name == "compbias/t"
    assert spec.registered_model_name == "compbias-t"
    assert spec.audit.alias == "audited"


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({**BASE, "epochs": 3}, "epochs", "allowed here: name, dataset"),
        (_with(dataset__kindd="digits"), "dataset.kindd", "allowed here: kind, root"),
        (_with(compression__0__level=[0.5]), "compression[0].level", "allowed here: method, schedule, levels"),
        (_with(audit__thresholds__cevv=1.0), "audit.thresholds.cevv", "allowed here: cev, sde"),
    ],
)
def test_unknown_keys_are_refused_by_name(data, key, hint):
    msg = _error(data)
    assert f"{key}: unknown key" in msg
    assert hint in msg


def test_sparsity_of_one_or_more_is_refused():
    msg = _error(_with(compression__0__levels=[0.5, 1.0]))
    assert "compression[0].levels[1]" in msg
    assert "> 0 and < 1" in msg


def test_zero_sparsity_and_wrong_level_names_are_refused():
    assert "compression[0].levels[0]" in _error(_with(compression__0__levels=[0.0]))
    msg = _error(_with(compression__1__levels=["int4"]))
    assert "compression[1].levels[0]" in msg and "int8_weight" in msg
    msg = _error(_with(compression__0__levels=["int8_static"]))
    assert "not a sparsity" in msg


def test_negative_seeds_and_empty_populations_are_refused():
    msg = _error(_with(population={"seeds": [0, -1]}))
    assert "population.seeds" in msg and ">= 0" in msg
    assert "population.seeds" in _error(_with(population={"seeds": 0}))
    assert "population.seeds" in _error(_with(population={"seeds": []}))
    assert "duplicates" in _error(_with(population={"seeds": [1, 1]}))


def test_empty_method_list_is_refused_with_an_example():
    msg = _error({**BASE, "compression": []})
    assert "compression:" in msg and "at least one entry" in msg


def test_wrong_types_name_the_key():
    msg = _error(_with(train__epochs="ten"))
    assert "train.epochs" in msg and "integer" in msg
    msg = _error(_with(dataset__kind="mnist"))
    assert "dataset.kind" in msg and "'digits'" in msg and "'celeba'" in msg
    assert "population.seeds" in _error(_with(population={"seeds": "three"}))
    assert "train.lr" in _error(_with(train__lr=-0.1))


def test_quantize_refuses_pruning_only_options():
    msg = _error(_with(compression__1__mitigation="kd"))
    assert "compression[1].mitigation" in msg
    msg = _error(_with(compression__1__schedule="gradual"))
    assert "compression[1].schedule" in msg


def test_repeated_method_level_is_refused():
    data = copy.deepcopy(BASE)
    data["compression"].append({"method": "magnitude", "levels": [0.9]})
    msg = _error(data)
    assert "compression[2]" in msg and "'magnitude' at level 0.9" in msg


def test_mitigation_makes_a_distinct_method_name():
    data = copy.deepcopy(BASE)
    data["compression"].append({"method": "magnitude", "levels": [0.9], "mitigation": "at_kd"})
    spec = parse_study(data)
    assert [c.name for c in spec.compression] == ["magnitude", "quantize", "magnitude+at_kd"]


def test_celeba_needs_a_target():
    msg = _error(_with(dataset={"kind": "celeba", "root": "/x"}))
    assert "dataset" in msg and "target" in msg


def test_imbalance_takes_one_entry_or_a_list_of_them():
    entries = [{"classes": [1], "keep": 0.1}, {"classes": [3], "keep": 0.2}, {"classes": [5], "keep": 0.5}]
    spec = parse_study(_with(dataset={"kind": "digits", "imbalance": entries}))
    assert [e["keep"] for e in spec.dataset.loader_options()["imbalance"]] == [0.1, 0.2, 0.5]
    assert parse_study(_with(dataset={"kind": "digits", "imbalance": entries[0]})).dataset.imbalance.keep == 0.1
    assert "empty list" in _error(_with(dataset={"kind": "digits", "imbalance": []}))
    twice = [{"classes": [3], "keep": 0.1}, {"classes": [3], "keep": 0.5}]
    assert "two entries" in _error(_with(dataset={"kind": "digits", "imbalance": twice}))


def test_several_problems_are_reported_together():
    data = _with(train__epochs=0, model__arch="vgg")
    msg = _error(data)
    assert "train.epochs" in msg and "model.arch" in msg


def test_load_study_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(StudyConfigError, match="no such study file"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(StudyConfigError, match="not valid YAML"):
        load_study(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(StudyConfigError, match="YAML mapping"):
        load_study(lst)


def test_overrides_are_validated():
    spec = parse_study(BASE)
    assert spec.with_overrides(seeds=[4, 7]).seeds() == [4, 7]
    assert spec.with_overrides(seeds=2).seeds() == [0, 1]
    assert spec.with_overrides(data_root="/data").dataset.root == "/data"
    with pytest.raises(StudyConfigError, match="population.seeds"):
        spec.with_overrides(seeds=[-3])


def test_resolved_config_round_trips():
    spec = parse_study(BASE)
    again = parse_study(yaml.safe_load(spec.to_yaml()))
    assert again == spec


def test_fingerprint_changes_with_training_but_not_with_seeds_or_root():
    spec = parse_study(BASE)
    fp = spec.model_fingerprint(None)
    assert spec.with_overrides(seeds=5).model_fingerprint(None) == fp
    assert spec.with_overrides(data_root="/elsewhere").model_fingerprint(None) == fp
    changed = parse_study(_with(train__epochs=2))
    assert changed.model_fingerprint(None) != fp
    assert spec.model_fingerprint(0) != spec.model_fingerprint(1)


def test_dataset_in_memory_is_passed_to_the_loader_and_never_changes_a_fingerprint():
    plain = parse_study(BASE)
    assert "in_memory" not in plain.resolved()["dataset"] and "in_memory" not in plain.dataset.loader_options()
    for value in (False, True):
        spec = parse_study(_with(dataset={"kind": "imagefolder", "root": "/data", "in_memory": value}))
        assert spec.dataset.loader_options()["in_memory"] is value
        assert parse_study(yaml.safe_load(spec.to_yaml())).dataset.in_memory is value  # survives study.yaml
        same_data = parse_study(_with(dataset={"kind": "imagefolder", "root": "/data"}))
        assert spec.model_fingerprint(None) == same_data.model_fingerprint(None)
    with pytest.raises(StudyConfigError, match="in_memory"):
        parse_study(_with(dataset={"kind": "imagefolder", "root": "/data", "in_memory": "sometimes"}))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_study(path), StudySpec)


def test_default_digits_study_meets_the_brief():
    spec = load_study(REPO / "configs" / "digits.yaml")
    assert len(spec.seeds()) >= 3
    mag = [c for c in spec.compression if c.method == "magnitude" and c.mitigation is None]
    assert mag and len(mag[0].levels) >= 3 and max(mag[0].levels) >= 0.95
    assert any(c.method == "quantize" and any(str(lv).startswith("int8") for lv in c.levels) for c in spec.compression)
    assert any(c.mitigation in ("kd", "at", "pkt", "at_kd", "pkt_kd") for c in spec.compression)


def _with_compression(entries):
    return parse_study({"name": "lr", "compression": entries})


def test_finetune_lr_is_set_from_the_study_file_and_leaves_unset_fingerprints_alone():
    plain = _with_compression([{"method": "magnitude", "levels": [0.5], "finetune_epochs": 2}])
    same = _with_compression([{"method": "magnitude", "levels": [0.5], "finetune_epochs": 2, "finetune_lr": None}])
    tuned = _with_compression([{"method": "magnitude", "levels": [0.5], "finetune_epochs": 2, "finetune_lr": 0.003}])
    assert tuned.compression[0].finetune_lr == 0.003 and plain.compression[0].finetune_lr is None
    assert "finetune_lr" not in plain.resolved()["compression"][0]  # older studies resolve (and resume) as before
    assert tuned.resolved()["compression"][0]["finetune_lr"] == 0.003
    assert same.model_fingerprint(0) == plain.model_fingerprint(0) != tuned.model_fingerprint(0)


@pytest.mark.parametrize("entry", [
    {"method": "quantize", "levels": ["int8_weight"], "finetune_lr": 0.01},
    {"method": "magnitude", "levels": [0.5], "finetune_epochs": 0, "finetune_lr": 0.01},
])
def test_finetune_lr_without_fine_tuning_is_refused_naming_the_key(entry):
    with pytest.raises(StudyConfigError, match="finetune_lr"):
        _with_compression([entry])


def test_unset_or_null_pruning_defaults_resolve_from_the_jobs_defaults_and_reach_the_job():
    from compbias.jobs.vocabulary import FINETUNE_DEFAULTS, TRAIN_DEFAULTS

    spec = _with_compression([
        {"method": "magnitude", "levels": [0.5], "schedule": None, "finetune_epochs": None},
        {"method": "structured", "levels": [0.5], "schedule": "scratch", "finetune_epochs": 0, "finetune_lr": 0.2},
        {"method": "quantize", "levels": ["fp16"], "finetune_epochs": None},
        {"method": "torch_prune", "levels": [0.5]},
    ])
    assert spec.train.model_dump() == TRAIN_DEFAULTS
    pruned, scratch, quantized, byo = (c.job_options(spec.train) for c in spec.compression)
    assert (pruned["schedule"], pruned["finetune_epochs"]) == (FINETUNE_DEFAULTS["schedule"], FINETUNE_DEFAULTS["epochs"])
    assert pruned["epochs"] is None and "lr" not in pruned  # unset: compress_model's lr, FINETUNE_DEFAULTS["lr"]
    assert scratch["epochs"] == spec.train.epochs and scratch["lr"] == 0.2 and scratch["finetune_epochs"] == 0
    assert (quantized["schedule"], quantized["finetune_epochs"]) == (None, 0)
    assert (byo["schedule"], byo["finetune_epochs"], byo["options"]) == (None, 0, None)
    assert {k: pruned[k] for k in ("batch_size", "momentum", "weight_decay")} == {
        k: TRAIN_DEFAULTS[k] for k in ("batch_size", "momentum", "weight_decay")}
    again = parse_study(yaml.safe_load(spec.to_yaml()))
    assert again == spec and again.model_fingerprint(0) == spec.model_fingerprint(0)


def test_fingerprints_of_every_method_family_are_pinned():
    """Resuming depends on these: the values the study file gave before its schema moved to jobs/vocabulary."""
    spec = _with_compression([
        {"method": "magnitude", "levels": [0.5, 0.9]},
        {"method": "structured", "schedule": "oneshot", "levels": [0.5], "finetune_epochs": 2, "mitigation": "kd"},
        {"method": "quantize", "levels": ["int8_static", "fp16"]},
        {"method": "torch_pruning", "levels": [0.3], "options": {"importance": "l2"}},
        {"method": "custom", "function": "mypkg.compress:shrink", "levels": [0.5, "aggressive"]},
        {"method": "torchao", "levels": ["int8_dynamic"]},
    ])
    assert [spec.model_fingerprint(i) for i in (None, 0, 1, 2, 3, 4, 5)] == [
        "965d825cbce6", "fd5958f94e29", "484ddab9d05f", "463bad6280da", "cd5b86433bab", "58589d82f340", "d0327775e3b5"]
