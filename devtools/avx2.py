"""The environment that makes an AVX-512 machine run the code paths of an AVX2-only CPU.

CI runs on x86 machines of one kind whose CPUs differ: some have AVX-512
(and VNNI), some AMD EPYCs only AVX2. A test whose expectation depends on
the vector unit passes on one and fails on the other, so the suite is also
run with every library that dispatches on the CPU held to AVX2:

* torch's own kernels (``ATEN_CPU_CAPABILITY``), fbgemm's int8 kernels
  (``FBGEMM_ENABLE_INSTRUCTIONS``) and oneDNN (``ONEDNN_MAX_CPU_ISA``);
* numpy's dispatched loops (``NPY_DISABLE_CPU_FEATURES``: every dispatch
  target above AVX2 that this numpy knows, read from numpy itself since the
  names change between versions);
* OpenBLAS's kernels (``OPENBLAS_CORETYPE=Haswell``);
* numba's code generation (``NUMBA_CPU_NAME=haswell``), with its own cache
  folder so that AVX-512 machine code cached by the ordinary runs is not
  reused.

``make test-avx2`` runs the suite so; docs/reliability.md has the account.

    python -m devtools.avx2                 # print the settings, NAME=value
    python -m devtools.avx2 -m pytest ...   # run this Python with them
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: torch's CPU paths held to AVX2 (what tests/jobs/test_quantize_cpu_paths.py forces per process).
TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

# numpy's x86 dispatch targets up to AVX2 (both the numpy 1.x feature names and 2.x's levels)
_UP_TO_AVX2 = {"SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "POPCNT", "SSE42", "AVX", "F16C", "FMA3", "AVX2", "X86_V2", "X86_V3"}


def numpy_targets_above_avx2() -> list[str]:
    """The dispatch targets of the installed numpy beyond AVX2 (what ``NPY_DISABLE_CPU_FEATURES`` must name)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__
    return [t for t in __cpu_dispatch__ if t not in _UP_TO_AVX2]


def avx2_environment(cache_root: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables to set (on top of the current environment) for an AVX2-only run.

    Parameters
    ----------
    cache_root : path, optional
        Where numba's AVX2 cache goes (``<cache_root>/numba-avx2``); default
        the repository's ``.cache``.
    """
    root = Path(cache_root) if cache_root is not None else Path(__file__).resolve().parents[1] / ".cache"
    env = dict(TORCH_AVX2)
    env.update({
        "OPENBLAS_CORETYPE": "Haswell",
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CACHE_DIR": str(root / "numba-avx2"),
    })
    above = numpy_targets_above_avx2()
    if above:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(above)
    return env


def main(argv: list[str]) -> None:
    env = avx2_environment()
    if not argv:
        for name, value in env.items():
            print(f"{name}={value}")
        return
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **env})


if __name__ == "__main__":
    main(sys.argv[1:])
