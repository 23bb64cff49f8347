"""Inference speed of int8 models (torch.ao kernels) against named baselines in the same process.

Baselines: the float32 model the ``int8_static`` one was made from, and the
package's weight-only ``int8_weight`` level of the same model (float32
activations times dequantized int8 weights: what the integer kernels save over
storing int8 weights alone). Models: the digits small CNN (trained 3 epochs,
so its weights are realistic) on the 449 digits test images, and an untrained
ResNet-20 on 128 random 32x32 images. All on one torch thread; best of
``--repeat`` runs. The int8 and float32 predictions are compared and printed
(agreement), so a broken int8 path shows up as a number, not just a time.
(compbias's first int8, the float64 simulation, is the tests' reference,
``tests/jobs/int8_simulation.py``, and is not timed here: benchmarks import
nothing from the tests; docs/performance.md keeps its last measurement.)

    .venv/bin/python benchmarks/quantize.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from compbias.jobs import build_model, load_dataset, quantize_model, train_model  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def compare(name: str, model: torch.nn.Module, x: torch.Tensor, calibration: list[torch.Tensor], repeat: int) -> None:
    model = model.eval()
    q, _ = quantize_model(model, "int8_static", calibration=calibration)
    w, _ = quantize_model(model, "int8_weight")
    agree = float((q(x).argmax(1) == model(x).argmax(1)).float().mean())
    t_float, t_int8, t_weight = best(lambda: model(x), repeat), best(lambda: q(x), repeat), best(lambda: w(x), repeat)
    print(f"{name}: int8_static {t_int8 * 1e3:7.1f} ms | float32 {t_float * 1e3:7.1f} ms ({t_float / t_int8:4.2f}x) | "
          f"int8_weight {t_weight * 1e3:7.1f} ms ({t_weight / t_int8:4.2f}x) | int8_static vs float32: same prediction on {agree:.1%}")


def main(argv=None) -> int:
    """Run both comparisons and print the ratios.

    Parameters
    ----------
    argv : list of str, optional

    Returns
    -------
    int
        0.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = load_dataset("digits")
    cnn = build_model("smallcnn", digits.n_classes, digits.input_shape, seed=0)
    cnn, _ = train_model(cnn, digits, epochs=3, log=None)
    x = digits.test.images.float() * digits.test.scale
    calib = [digits.train.images[:256].float() * digits.train.scale]
    compare(f"smallcnn, {len(x)} digits images", cnn, x, calib, args.repeat)
    resnet = build_model("resnet20", 10, (3, 32, 32), seed=0)
    xr = torch.rand(128, 3, 32, 32)
    compare("resnet20, 128 random 32x32 images", resnet, xr, [torch.rand(128, 3, 32, 32)], max(3, args.repeat // 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
