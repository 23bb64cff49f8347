"""The device the jobs tests train and evaluate on, and the tolerance between devices.

CPU unless ``COMPBIAS_TEST_DEVICE`` names another (``make test-gpu`` sets
``cuda``). Asking for CUDA on a machine without it is an error, not a
quiet fall-back to the CPU: a GPU run that passed on the CPU proves nothing.
"""

from __future__ import annotations

import os

import numpy as np
import torch

TEST_DEVICE_ENV = "COMPBIAS_TEST_DEVICE"

#: Float32 logits of one model computed on two devices (CPU vs CUDA) agree within these
#: (``numpy.allclose``); on one device they are bit-identical. Convolutions on CUDA may
#: use TF32 (10-bit mantissa products) and other summation orders, hence 1e-2, not 1e-5.
#: docs/performance.md has the account (unverified on a GPU so far).
CROSS_DEVICE_RTOL = 1e-2
CROSS_DEVICE_ATOL = 1e-2


def selected_device() -> torch.device:
    """``torch.device(COMPBIAS_TEST_DEVICE)``, default CPU; raises if that device is not present."""
    name = os.environ.get(TEST_DEVICE_ENV, "").strip() or "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{TEST_DEVICE_ENV}={name} but torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a GPU machine")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{TEST_DEVICE_ENV}={name}: the tests know 'cpu' and 'cuda'")
    return device


def assert_same_logits(a: np.ndarray, b: np.ndarray, *, same_device: bool) -> None:
    """Bit-identical on one device; within :data:`CROSS_DEVICE_RTOL` / :data:`CROSS_DEVICE_ATOL` across devices."""
    if same_device:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=CROSS_DEVICE_RTOL, atol=CROSS_DEVICE_ATOL)
