"""torch's quantized engines and the per-channel int8 tensors every int8 layer stores.

Which engine ``int8_static`` runs on (:func:`select_engine`), the top of its
activation grid there (:func:`activation_qmax`, the 7-bit rule of
docs/methods.md), the run-time clamp that enforces it
(:func:`clamp_to_grid`), and how per-output-channel qint8 weights are kept as
plain tensors (:func:`per_channel_qweight`, :func:`store_scale`,
:func:`store_zero_points`) so that ``weights.safetensors`` needs no pickling.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

__all__ = [
    "ENGINES",
    "TORCH_AO_BACKEND",
    "activation_qmax",
    "clamp_to_grid",
    "quiet",
    "select_engine",
    "use_engine",
    "per_channel_qweight",
    "store_scale",
    "store_zero_points",
]

#: Quantized engines in order of preference (the first one torch supports is used).
ENGINES = ("x86", "fbgemm", "qnnpack")
#: ``quantization["backend"]`` of models built on torch.ao (the engine is appended).
TORCH_AO_BACKEND = "torch.ao.quantization"
_REDUCE_RANGE_ENGINES = ("x86", "fbgemm")


def activation_qmax(engine: str) -> int:
    """The top of the quint8 activation grid of ``int8_static`` on ``engine``.

    Returns
    -------
    int
        127 (7-bit activations, ``reduce_range``) on the x86 and fbgemm
        engines, whose int8 kernels sum pairs of uint8 x int8 products in
        int16 on CPUs without AVX-512 VNNI (``2 * 127 * 128 = 32512`` fits,
        ``2 * 255 * 128`` does not); 255 on the others (qnnpack).
    """
    return 127 if engine in _REDUCE_RANGE_ENGINES else 255


def clamp_to_grid(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """``x`` clamped to the largest value the quint8 grid ``(scale, zero_point)`` holds below ``qmax``.

    The quantizer rounds ``x / scale + zero_point`` and clamps it to
    ``[0, 255]``; clamping the float input at ``(qmax - zero_point) * scale``
    first makes that ``[0, qmax]``, so an input beyond the calibrated range
    saturates at ``qmax`` instead of reaching the kernel as an 8-bit value.
    """
    return x if qmax >= 255 else x.clamp(max=(qmax - zero_point) * scale)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (the eager flow and quantized tensors still work)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions")
        warnings.filterwarnings("ignore", message=r"(?s).*must run observer before calling calculate_qparams")
        yield


def select_engine(engine: str | None = None) -> str:
    """The quantized engine to use: ``engine`` if given, else the first of :data:`ENGINES` torch supports.

    Raises
    ------
    RuntimeError
        If ``engine`` (or every engine of :data:`ENGINES`) is not supported by
        this torch build; the message lists the supported ones.
    """
    supported = list(torch.backends.quantized.supported_engines)
    if engine is not None:
        if engine not in supported:
            raise RuntimeError(f"quantized engine {engine!r} is not supported by this torch build (supported: {supported})")
        return engine
    for name in ENGINES:
        if name in supported:
            return name
    raise RuntimeError(f"this torch build has none of the quantized engines {list(ENGINES)} (supported: {supported}); "
                       "int8 quantization needs one of them")


@contextlib.contextmanager
def use_engine(engine: str) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` (weights are packed for it), restoring it afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with quiet():
            yield
    finally:
        torch.backends.quantized.engine = previous


def per_channel_qweight(int_repr: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """A per-output-channel qint8 tensor from its stored parts (bit-exact)."""
    with quiet():
        return torch._make_per_channel_quantized_tensor(
            int_repr.to(torch.int8).contiguous(), scale.to(torch.float64), zero_point.to(torch.int64), 0
        )


def store_scale(scale: torch.Tensor) -> torch.Tensor:
    """Per-channel scales as float32 when that is exact (it is for observer scales), else float64."""
    scale = scale.detach().to(torch.float64)
    as32 = scale.to(torch.float32)
    return as32 if torch.equal(as32.to(torch.float64), scale) else scale


def store_zero_points(zp: torch.Tensor) -> torch.Tensor:
    """Per-channel zero points as int32 when they fit (they do for observer zero points), else int64."""
    zp = zp.detach().to(torch.int64)
    return zp.to(torch.int32) if bool((zp.abs() < 2**31).all()) else zp
