"""``gpus_per_task: auto`` on a GPU cluster: the share rule, the decision, its fallback, and the probe on the CPU.

No GPU is needed: the probe's CUDA numbers are faked where a decision needs
them; the probe itself runs on the CPU (what it can measure there); one test
runs the whole executor path on a local Ray that declares a GPU it does not
have, so the probe's worker sees no CUDA and the study falls back to 1 GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from compbias.platform.config import parse_study
from compbias.platform.gpu_share import GpuShareDecision, MemoryProbe, gpu_share, probe_training_memory, resolve_gpu_share
from compbias.platform.orchestration import task_options
from tests.platform.test_orchestration import _with_resources, spec  # noqa: F401  (spec: the digits study fixture)

GIB, MIB = 2**30, 2**20
REPO = Path(__file__).resolve().parents[2]


def _cuda_probe(peak, split=0, total=80 * GIB, resident=True):
    return MemoryProbe(device="cuda:0 (fake)", batch_size=128, param_grad_bytes=1, split_bytes=split, resident=resident,
                       peak_bytes=peak, total_bytes=total)


@pytest.mark.parametrize("peak, split, total, context, expected", [
    # need = (peak + split + context) * 1.5; k = floor(total / need) capped at 16; share = 1/k (4 decimals, rounded down)
    (4 * GIB, 0, 12 * GIB, 0, 0.5),                    # need 6 GiB: exactly 2 fit
    (4 * GIB, 0, 12 * GIB - 1, 0, 1.0),                # one byte short of 2
    (6 * GIB, 2 * GIB, 40 * GIB, 512 * MIB, 0.3333),  # need 12.75 GiB: 3.14 fit
    (2 * GIB, 0, 40 * GIB, 0, 0.0769),                 # need 3 GiB: 13.3 fit -> 1/13 = 0.07692...
    (1 * GIB, 0, 80 * GIB, 500 * MIB, 0.0625),         # need 2286 MiB: 35.8 fit, capped at 16
    (60 * GIB, 0, 80 * GIB, 0, 1.0),                   # need 90 GiB > the card: at most 1
    (0, 0, 80 * GIB, 0, 0.0625),                       # nothing measured at all: the floor
])
def test_gpu_share_follows_the_rule(peak, split, total, context, expected):
    assert gpu_share(peak, split, total, context_bytes=context) == expected


def test_gpu_share_defaults_count_a_cuda_context_and_shares_always_fit_on_one_gpu():
    # 300 MiB peak + 500 MiB context = 800 MiB * 1.5 = 1200 MiB; 4000 MiB / 1200 MiB = 3.33 -> 3
    assert gpu_share(300 * MIB, 0, 4000 * MIB) == 0.3333
    for k in range(1, 17):
        s = gpu_share(0, 0, k * 3 * GIB, context_bytes=2 * GIB)  # need 3 GiB, k of them fit
        assert s == (1.0 if k == 1 else pytest.approx(1 / k, abs=1e-4)) and s * k <= 1.0
    assert gpu_share(0, 0, 100 * GIB, context_bytes=GIB, max_tasks=4) == 0.25


@pytest.mark.parametrize("kwargs", [dict(peak_bytes=-1), dict(total_bytes=0), dict(headroom=0), dict(max_tasks=0)])
def test_gpu_share_refuses_impossible_inputs(kwargs):
    args = dict(peak_bytes=GIB, split_bytes=0, total_bytes=80 * GIB) | kwargs
    with pytest.raises(ValueError, match="gpu_share needs"):
        gpu_share(**args)


def test_auto_asks_for_the_probed_share_on_a_gpu_cluster(spec):
    s = _with_resources(spec, gpus_per_task="auto", cpus_per_task=2)
    lines = []
    decision = resolve_gpu_share(s, 8.0, lambda: _cuda_probe(2 * GIB, split=GIB, total=80 * GIB), lines.append)
    # (2 + 1 + 0.49 GiB) * 1.5 = 5.23 GiB; 80 / 5.23 = 15.3 -> 15 per GPU
    assert decision.share == 0.0666 and decision.error is None
    assert task_options(s, 8.0, decision.share) == {"num_cpus": 2, "num_gpus": 0.0666, "max_retries": 3,
                                                    "retry_exceptions": False}
    assert len(lines) == 1 and "0.0666 GPU per task (15 per GPU)" in lines[0] and "1.00 GiB resident" in lines[0]
    params = decision.params()
    assert params["resources.gpu_share"] == "0.0666"
    assert params["resources.gpu_probe.peak_bytes"] == str(2 * GIB)
    assert params["resources.gpu_probe.split_bytes"] == str(GIB)
    assert params["resources.gpu_probe.total_bytes"] == str(80 * GIB)
    assert "resources.gpu_probe.error" not in params


def test_a_streamed_split_does_not_count(spec):
    decision = resolve_gpu_share(spec, 1.0, lambda: _cuda_probe(4 * GIB - 500 * MIB, split=30 * GIB, total=24 * GIB,
                                                                resident=False))
    assert decision.share == 0.25  # (4 GiB) * 1.5 = 6 GiB of 24, the 30 GiB split streams
    assert decision.params()["resources.gpu_probe.split_bytes"] == "0"


def test_the_share_is_ignored_without_gpus_or_with_a_fixed_request(spec):
    auto = _with_resources(spec, gpus_per_task="auto")
    assert "num_gpus" not in task_options(auto, 0.0, 0.25)
    assert task_options(auto, 2.0)["num_gpus"] == 1  # no probe result: a whole GPU
    assert task_options(_with_resources(spec, gpus_per_task=0.5), 2.0, 0.25)["num_gpus"] == 0.5


@pytest.mark.parametrize("gpus_per_task, cluster_gpus", [("auto", 0.0), ("auto", 0.5), (0, 4.0), (0.5, 4.0), (1, 4.0)])
def test_no_probe_runs_unless_auto_on_a_cluster_with_gpus(spec, gpus_per_task, cluster_gpus):
    calls = []
    s = _with_resources(spec, gpus_per_task=gpus_per_task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_gpu_share(s, cluster_gpus, lambda: calls.append(1)) is None
    assert calls == []


def test_a_failed_probe_falls_back_to_one_gpu_and_says_why(spec):
    def boom():
        raise MemoryError("CUDA out of memory while probing")

    with pytest.warns(RuntimeWarning, match=r"probe failed \(MemoryError: CUDA out of memory while probing\); every task asks for 1 GPU"):
        decision = resolve_gpu_share(spec, 2.0, boom, log=lambda line: pytest.fail(f"logged {line!r}"))
    assert decision == GpuShareDecision(1.0, None, "MemoryError: CUDA out of memory while probing")
    assert task_options(spec, 2.0, decision.share)["num_gpus"] == 1.0
    assert decision.params() == {"resources.gpu_share": "1",
                                 "resources.gpu_probe.error": "MemoryError: CUDA out of memory while probing"}


def test_a_probe_without_cuda_is_a_failure_not_a_share(spec):
    cpu = MemoryProbe(device="cpu", batch_size=64, param_grad_bytes=10, split_bytes=10, resident=True)
    with pytest.warns(RuntimeWarning, match="ran on cpu, not on a CUDA device"):
        decision = resolve_gpu_share(spec, 1.0, lambda: cpu)
    assert decision.share == 1.0 and decision.probe is None


def test_probe_builds_and_trains_the_study_model_on_the_cpu(spec):
    from compbias import jobs
    from compbias.platform.tasks import study_dataset

    s = _with_resources(spec)
    data = s.resolved()
    data["train"]["batch_size"] = 32
    probe = probe_training_memory(data, device="cpu")
    bundle = study_dataset(parse_study(data, source="test"))
    images = bundle.train.images
    model = jobs.build_model(s.model.arch, bundle.n_classes, bundle.input_shape, s.model.width, seed=0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert probe.device == "cpu" and probe.batch_size == 32
    assert probe.peak_bytes is None and probe.total_bytes is None  # no CUDA numbers off CUDA
    assert probe.param_grad_bytes == 2 * params  # every parameter got a gradient from the one step
    assert probe.split_bytes == images.numel() * images.element_size() > 0 and probe.resident


def test_the_probe_of_a_split_left_in_its_files_counts_no_resident_bytes(tmp_path, monkeypatch):
    """A dataset too large for memory streams from its files: nothing is resident, and the probe's batch is uint8."""
    from compbias.jobs import train as train_mod
    from tests.jobs.conftest import write_celeba

    write_celeba(tmp_path / "celeba", n=24)
    data = parse_study({"name": "files", "dataset": {"kind": "celeba", "root": str(tmp_path / "celeba"),
                                                      "target": "Blond_Hair", "in_memory": False},
                        "train": {"batch_size": 8},
                        "compression": [{"method": "magnitude", "levels": [0.5]}]}).resolved()
    seen = []
    real_fit = train_mod.fit
    monkeypatch.setattr(train_mod, "fit", lambda model, bundle, **kw: seen.append(bundle.train.images.dtype) or real_fit(model, bundle, **kw))
    probe = probe_training_memory(data, device="cpu")
    assert probe.split_bytes == 0 and not probe.resident and probe.batch_size == 8
    assert seen == [torch.uint8]  # the step trains on what the loader's workers send: decoded uint8


@pytest.mark.slow
def test_ray_executor_probes_a_gpu_cluster_before_any_task():
    """A local Ray declaring one GPU: the probe runs as a Ray task on it. On a machine without CUDA its worker
    finds none and every task asks for 1 GPU, with a warning; with CUDA, the measured share is chosen."""
    import torch

    script = textwrap.dedent(
        """
        import json, warnings
        from compbias.platform.config import load_study
        from compbias.platform.orchestration import RayExecutor, init_ray
        init_ray(num_cpus=1, num_gpus=1)
        spec = load_study("configs/digits.yaml")
        lines = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex = RayExecutor(spec, log=lines.append)
        print("RESULT " + json.dumps({"options": ex.options, "params": ex.resource_params(), "lines": lines,
                                      "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    params = result["params"]
    if not torch.cuda.is_available():
        assert result["options"]["num_gpus"] == 1.0
        assert result["lines"] == []
        assert len(result["warnings"]) == 1 and "ran on cpu, not on a CUDA device" in result["warnings"][0]
        assert params == {"resources.gpu_share": "1", "resources.gpu_probe.error": params["resources.gpu_probe.error"]}
        assert params["resources.gpu_probe.error"].startswith("RuntimeError: the probe ran on cpu")
    else:  # the digits CNN is tiny: 16 tasks per GPU on any card of 16 GiB or more
        assert result["warnings"] == [] and len(result["lines"]) == 1
        assert 0 < result["options"]["num_gpus"] == float(params["resources.gpu_share"]) <= 1
        assert int(params["resources.gpu_probe.peak_bytes"]) > 0 and params["resources.gpu_probe.device"].startswith("cuda")
