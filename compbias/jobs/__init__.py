"""The torch side of compbias: datasets, models, training, compression, evaluation, weights I/O.

Plain Python in and out; nothing here knows about MLflow or Ray. See
``docs/architecture.md`` ("Jobs API") for the contract and ``docs/methods.md``
for the datasets, models and compression methods.
"""

from .compress import METHODS, SCHEDULES, compress_model, method_name
from .data import DATASET_KINDS, DatasetBundle, TensorImageDataset, load_dataset
from .distill import MITIGATIONS, pw_targets, pw_weights
from .evaluate import Evaluation, evaluate, predict_logits
from .io import load_model, model_spec, save_model
from .models import ARCHS, build_model, capture_blocks, layer_activations
from .prune import measure_sparsity, model_size_bytes
from .quantize import QUANT_LEVELS, quantize_model
from .train import resolve_device, train_model

__all__ = [
    "ARCHS", "DATASET_KINDS", "METHODS", "MITIGATIONS", "QUANT_LEVELS", "SCHEDULES",
    "DatasetBundle", "Evaluation", "TensorImageDataset",
    "build_model", "capture_blocks", "compress_model", "evaluate", "layer_activations", "load_dataset",
    "load_model", "measure_sparsity", "method_name", "model_size_bytes", "model_spec", "predict_logits",
    "pw_targets", "pw_weights", "quantize_model", "resolve_device", "save_model", "train_model",
]
