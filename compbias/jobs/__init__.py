"""The torch side of compbias: datasets, models, training, compression, evaluation, weights I/O.

Plain Python in and out; nothing here knows about MLflow or Ray. See
``docs/architecture.md`` ("Jobs API") for the contract and ``docs/methods.md``
for the datasets, models and compression methods.
"""

import os as _os


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

from .compress import METHODS, SCHEDULES, compress_model, method_name
from .data import DATASET_KINDS, DatasetBundle, TensorImageDataset, load_dataset
from .distill import MITIGATIONS, pw_targets, pw_weights
from .evaluate import Evaluation, evaluate, predict_logits
from .io import load_model, load_state_file, load_weights, model_spec, save_model
from .models import ARCHS, build_model, capture_blocks, layer_activations
from .prune import measure_sparsity, model_size_bytes
from .quantize import QUANT_LEVELS, quantize_model
from .train import resolve_device, train_model

__all__ = [
    "ARCHS", "DATASET_KINDS", "METHODS", "MITIGATIONS", "QUANT_LEVELS", "SCHEDULES",
    "DatasetBundle", "Evaluation", "TensorImageDataset",
    "build_model", "capture_blocks", "compress_model", "evaluate", "layer_activations", "load_dataset",
    "load_model", "load_state_file", "load_weights", "measure_sparsity", "method_name", "model_size_bytes", "model_spec", "predict_logits",
    "pw_targets", "pw_weights", "quantize_model", "resolve_device", "save_model", "train_model",
]
