"""Ray task options and the local Ray's bind setting (no Ray started here; tests/reliability starts one)."""

from __future__ import annotations

import pytest

from compbias.platform.config import load_study
from compbias.platform.orchestration import task_options
from compbias.platform.ray_cluster import ray_bind_mode


@pytest.fixture
def spec():
    return load_study("configs/digits.yaml")


def _with_resources(spec, **resources):
    data = spec.resolved()
    data["resources"].update(resources)
    from compbias.platform.config import parse_study

    return parse_study(data, source="test")


def test_auto_gpus_follow_the_cluster_not_the_driver(spec):
    s = _with_resources(spec, gpus_per_task="auto", cpus_per_task=2, max_retries=4)
    cpu_only = task_options(s, 0.0)
    assert cpu_only == {"num_cpus": 2, "max_retries": 4, "retry_exceptions": False}
    gpu_cluster = task_options(s, 8.0)  # e.g. a CPU-only driver joining a GPU cluster
    assert gpu_cluster["num_gpus"] == 1 and gpu_cluster["num_cpus"] == 2


def test_fixed_gpus_are_asked_for_and_refused_when_the_cluster_cannot_give_them(spec):
    s = _with_resources(spec, gpus_per_task=0.5)
    assert task_options(s, 1.0)["num_gpus"] == 0.5
    with pytest.raises(ValueError, match=r"gpus_per_task=0.5 but the Ray cluster has 0 GPU"):
        task_options(s, 0.0)
    assert "num_gpus" not in task_options(_with_resources(spec, gpus_per_task=0), 4.0)


@pytest.mark.parametrize("value, expected", [(None, "loopback"), ("", "loopback"), ("loopback", "loopback"),
                                             ("ALL", "all"), (" all ", "all")])
def test_ray_bind_mode_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("COMPBIAS_RAY_BIND", raising=False)
    else:
        monkeypatch.setenv("COMPBIAS_RAY_BIND", value)
    assert ray_bind_mode() == expected


def test_ray_bind_mode_refuses_anything_else(monkeypatch):
    monkeypatch.setenv("COMPBIAS_RAY_BIND", "public")
    with pytest.raises(ValueError, match="COMPBIAS_RAY_BIND='public'.*'loopback'.*'all'"):
        ray_bind_mode()
