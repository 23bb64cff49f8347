"""The plan: one task per (seed, method, level), compressed tasks hang off their baseline."""

import pytest

from compbias.platform.config import parse_study
from compbias.platform.plan import plan_study

STUDY = {
    "name": "p",
    "population": {"seeds": [3, 5]},
    "compression": [
        {"method": "magnitude", "levels": [0.5, 0.9, 0.95]},
        {"method": "quantize", "levels": ["int8_weight", "fp16"]},
        {"method": "magnitude", "levels": [0.9], "mitigation": "kd"},
    ],
}


def test_one_task_per_seed_method_level():
    tasks = plan_study(parse_study(STUDY))
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys)) == 2 * (1 + 3 + 2 + 1)
    assert (3, "magnitude+kd", "0.9") in keys
    assert (5, "quantize", "int8_weight") in keys
    assert (5, "baseline", "0") in keys


def test_baselines_come_first_and_every_compressed_task_names_its_own_baseline():
    tasks = plan_study(parse_study(STUDY))
    roles = [t.role for t in tasks]
    assert roles[:2] == ["baseline", "baseline"] and set(roles[2:]) == {"compressed"}
    baselines = {t.key for t in tasks if t.role == "baseline"}
    for t in tasks:
        if t.role == "compressed":
            assert t.baseline_key in baselines
            assert t.baseline_key[0] == t.seed
        else:
            assert t.baseline_key is None


def test_levels_keep_their_values():
    tasks = plan_study(parse_study(STUDY))
    t = next(t for t in tasks if t.key == (3, "magnitude", "0.95"))
    assert t.level_value == pytest.approx(0.95) and t.compression_index == 0
    q = next(t for t in tasks if t.key == (3, "quantize", "fp16"))
    assert q.level_value == "fp16" and q.compression_index == 1


def test_filters_for_the_single_steps():
    spec = parse_study(STUDY)
    assert {t.role for t in plan_study(spec, roles=["baseline"])} == {"baseline"}
    only = plan_study(spec, roles=["compressed"], methods=["magnitude"], levels=["0.9"])
    assert [t.key for t in only] == [(3, "magnitude", "0.9"), (5, "magnitude", "0.9")]
    with pytest.raises(ValueError, match="no method"):
        plan_study(spec, methods=["structured"])
    with pytest.raises(ValueError, match="no level"):
        plan_study(spec, levels=["0.99"])
