"""The torch side of compbias: datasets, models, training, compression, evaluation, weights I/O.

Plain Python in and out; nothing here knows about MLflow or Ray. See
``docs/architecture.md`` ("Jobs API") for the contract and ``docs/methods.md``
for the datasets, models and compression methods.
"""

import os as _os
import sys as _sys
import types as _types


def _quiet_numba_threads() -> None:
    """Use numba's ``workqueue`` threading layer unless the user chose one.

    torch and numba's default ``omp`` layer each keep an OpenMP thread pool;
    once a numba parallel kernel has run (``compbias.metrics`` in
    :func:`evaluate`), its idle OpenMP threads spin and torch's training loop
    in the same process runs several times slower (measured: 0.6 s -> 3-13 s
    for a 3-epoch digits fine-tuning on 2 cores). The ``workqueue`` layer
    has no spinning pool. This only applies before numba starts its threads.
    """
    if "NUMBA_THREADING_LAYER" in _os.environ:
        return
    try:
        import numba
        from numba.np.ufunc import parallel as _parallel
    except ImportError:  # pragma: no cover - numba is a dependency
        return
    if not _parallel._is_initialized and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"


_quiet_numba_threads()

#: Public name -> the module that defines it. The torch modules load on first
#: use, so ``compbias.jobs.vocabulary`` (and the study config built on it)
#: imports without torch.
_EXPORTS = {
    "METHODS": "vocabulary", "SCHEDULES": "vocabulary", "DATASET_KINDS": "vocabulary", "MITIGATIONS": "vocabulary",
    "ARCHS": "vocabulary", "QUANT_LEVELS": "vocabulary",
    "compress_model": "compress", "method_name": "compress",
    "DatasetBundle": "data", "TensorImageDataset": "data", "load_dataset": "data",
    "pw_targets": "distill", "pw_weights": "distill",
    "Evaluation": "evaluate", "evaluate": "evaluate", "predict_logits": "evaluate",
    "load_model": "io", "load_state_file": "io", "load_weights": "io", "model_spec": "io", "save_model": "io",
    "build_model": "models", "capture_blocks": "models", "layer_activations": "models",
    "measure_sparsity": "prune", "model_size_bytes": "prune",
    "quantize_model": "quantize",
    "resolve_device": "train", "train_model": "train",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'compbias.jobs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(_types.ModuleType):
    """Keeps ``compbias.jobs.evaluate`` the function when its submodule of the same name is imported.

    Importing a submodule binds it on its package; an eager ``__init__`` rebound
    the name to the function afterwards. Loading lazily, the package refuses
    that one binding instead (the submodule stays in ``sys.modules``).
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


__all__ = [
    "ARCHS", "DATASET_KINDS", "METHODS", "MITIGATIONS", "QUANT_LEVELS", "SCHEDULES",
    "DatasetBundle", "Evaluation", "TensorImageDataset",
    "build_model", "capture_blocks", "compress_model", "evaluate", "layer_activations", "load_dataset",
    "load_model", "load_state_file", "load_weights", "measure_sparsity", "method_name", "model_size_bytes", "model_spec", "predict_logits",
    "pw_targets", "pw_weights", "quantize_model", "resolve_device", "save_model", "train_model",
]
