"""int8_static computes the same integers on every CPU path: AVX-512 (VNNI) and AVX2, in and beyond the calibrated range.

torch's int8 kernels pick their vector unit from the CPU at start-up. On
CPUs without AVX-512 VNNI (AMD EPYC before Zen 4, older Xeons, most CUDA
hosts) fbgemm and oneDNN sum pairs of uint8 x int8 products in int16; 7-bit
activations keep those sums below 2**15, but only if no 8-bit activation
reaches the kernel. Each case runs the same model in a fresh process with
the AVX2 path forced (``ATEN_CPU_CAPABILITY=avx2``,
``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``) and with
the machine's own, so both paths are checked on every machine (on an
AVX2-only machine the two are the same path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.avx2 import TORCH_AVX2

REPO = Path(__file__).resolve().parents[2]
PATH_ENV = {"native": {}, "avx2": TORCH_AVX2}
ENGINES = [e for e in ("x86", "fbgemm", "qnnpack") if e in torch.backends.quantized.supported_engines]


@pytest.fixture(scope="module")
def inputs(baseline, digits, tmp_path_factory) -> Path:
    idx = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(digits.train), 512, replace=False)))
    calibration = [digits.train.batch(idx[i : i + 128])[0] for i in range(0, 512, 128)]
    x = digits.test.batch(slice(0, 256))[0]
    gen = torch.Generator().manual_seed(0)
    sets = {
        "test images (calibrated range)": x,
        "test images x4": x * 4,
        "test images x16": x * 16,
        "gaussian noise, sd 10": torch.randn(x.shape, generator=gen) * 10,
    }
    path = tmp_path_factory.mktemp("int8paths") / "inputs.pt"
    state = {k: v.cpu() for k, v in baseline.state_dict().items()}  # the probes run on the CPU
    torch.save({"state": state, "input_shape": list(digits.input_shape),
                "calibration": calibration, "inputs": sets}, path)
    return path


@pytest.fixture(scope="module")
def results(inputs) -> dict:
    out = {}
    for path, extra in PATH_ENV.items():
        result = inputs.parent / f"{path}.json"
        env = {**os.environ, **extra, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run([sys.executable, "-m", "tests.jobs.int8_cpu_probe", str(inputs), str(result), *ENGINES],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[path] = json.loads(result.read_text())
    return out


def test_the_avx2_path_is_really_taken(results):
    assert results["avx2"]["cpu_capability"] == "AVX2"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", list(PATH_ENV))
def test_every_int8_layer_computes_the_integer_formula_on_every_cpu_path(results, path, engine):
    """In and far beyond the calibrated range: hidden layers within one output quantum, the classifier to float32 rounding."""
    r = results[path]["engines"][engine]
    assert r["range"] == [0, 127 if engine in ("x86", "fbgemm") else 255]
    for name, s in r["sets"].items():
        for layer, stats in s["layers"].items():
            assert stats["max_quanta"] <= 1, f"{path}/{engine}, {name}, {layer}: {stats}"
            assert stats["exact"] > 0.99, f"{path}/{engine}, {name}, {layer}: {stats}"
        assert s["fc_relative"] <= 1e-5, f"{path}/{engine}, {name}: classifier off its formula by {s['fc_relative']:.2e}"
    # the inputs beyond the calibrated range really reach past the top of every layer's input grid
    for name in ("test images x16", "gaussian noise, sd 10"):
        assert max(stats["inputs_beyond_grid"] for stats in r["sets"][name]["layers"].values()) > 0.01, name


@pytest.mark.parametrize("engine", ENGINES)
def test_the_same_model_gives_the_same_predictions_on_both_paths(results, engine):
    for name in results["native"]["engines"][engine]["sets"]:
        a = np.array(results["native"]["engines"][engine]["sets"][name]["logits"])
        b = np.array(results["avx2"]["engines"][engine]["sets"][name]["logits"])
        scale = max(1.0, float(np.abs(a).max()))
        # requantization rounds the other way on a few outputs (float32 multipliers differ per kernel): tiny logit changes
        assert np.abs(a - b).max() <= 0.05 * scale, f"{engine}, {name}"
        assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99, f"{engine}, {name}"
