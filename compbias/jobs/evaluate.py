"""Evaluate one model on a bundle's test split: predictions and rate tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from compbias.metrics import class_rates, confusion_counts, group_rates

from .data import DatasetBundle
from .models import model_device, model_input_dtype

__all__ = ["Evaluation", "evaluate", "predict_logits"]


@dataclass
class Evaluation:
    """Result of :func:`evaluate`.

    Attributes
    ----------
    predictions : pandas.DataFrame
        One row per test example in ``example_id`` order: ``example_id``,
        ``label``, ``pred``, ``prob`` (softmax probability of ``pred``) and
        the bundle's group columns.
    per_class : pandas.DataFrame
        One row per class: ``class``, ``class_name``, ``support``, ``tp``,
        ``fp``, ``fn``, ``tn``, ``fpr``, ``fnr`` (one-vs-rest, from
        :func:`compbias.metrics.confusion_counts` / ``class_rates``).
    per_group : pandas.DataFrame
        :func:`compbias.metrics.group_rates` ``.table``: one row per group and
        intersection of groups (and per class, unless the bundle names a
        positive class); empty when the bundle has no group columns.
    accuracy : float
    confusion : numpy.ndarray
        ``(C, C)`` counts, rows true, columns predicted.
    logits : numpy.ndarray or None
        ``(N, C)`` float32 when requested.
    n_ties : int
        Test examples whose largest logit is shared by two or more classes
        (``pred`` is then the lowest of those class indices). Float models
        almost never tie; a model whose logits sit on a coarse grid (e.g.
        requantized int8 outputs) can, and the lowest-index rule then favours
        class 0, so a non-zero count is worth a look before reading its rates.
    """

    predictions: pd.DataFrame
    per_class: pd.DataFrame
    per_group: pd.DataFrame
    accuracy: float
    confusion: np.ndarray
    logits: np.ndarray | None = None
    n_ties: int = 0


@torch.no_grad()
def predict_logits(model: nn.Module, x, *, batch_size: int = 512) -> np.ndarray:
    """Logits of ``model`` for inputs ``x``, as float32.

    ``x`` is a tensor ``(N, C, H, W)`` in dataset scaling, or a split
    (:class:`compbias.jobs.TensorImageDataset`,
    :class:`compbias.jobs.data.FileImageDataset`) read ``batch_size``
    examples at a time, so a large test split is never held as float32 at
    once. Works for float, pruned and quantized models on any device: each
    batch (on any device) is moved to the model's device and cast to the
    dtype a half-precision model expects; the logits come back on the CPU.
    Raises ``FloatingPointError`` if any logit is NaN or infinite.
    """
    was_training = model.training
    model.eval()
    device, dtype = model_device(model), model_input_dtype(model)
    n = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
    read = (lambda s: x[s]) if isinstance(x, torch.Tensor) else (lambda s: x.batch(s)[0])  # noqa: E731
    out = []
    try:
        for start in range(0, n, batch_size):
            out.append(model(read(slice(start, start + batch_size)).to(device=device, dtype=dtype)).float().cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"model produced non-finite logits for {int(bad.sum())} of {len(logits)} examples "
            f"(first at row {int(np.flatnonzero(bad)[0])}); the weights are likely corrupt or the quantization overflowed"
        )
    return logits


def evaluate(model: nn.Module, bundle: DatasetBundle, *, batch_size: int = 512, keep_logits: bool = False) -> Evaluation:
    """Predict the test split and compute per-class and per-group rates.

    Parameters
    ----------
    model : torch.nn.Module
        Float, pruned or quantized, on any device (the test images are sent
        to it batch by batch); its accuracy is that of its own arithmetic
        (e.g. int8 for ``int8_static``).
    bundle : DatasetBundle
    batch_size : int
    keep_logits : bool
        Also return the ``(N, C)`` logits.

    Returns
    -------
    Evaluation
        ``pred`` is the class of the largest logit; when several classes share
        it, the lowest class index (counted in ``n_ties``).

    Raises
    ------
    FloatingPointError
        When a logit is NaN or infinite.
    """
    test = bundle.test
    logits = predict_logits(model, test, batch_size=batch_size)
    if logits.shape != (len(test), bundle.n_classes):
        raise ValueError(f"model outputs {logits.shape[1:]} logits per example, the dataset has {bundle.n_classes} classes")
    top = logits.max(axis=1, keepdims=True)
    n_ties = int(((logits == top).sum(axis=1) > 1).sum())
    shifted = logits - top
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    pred = logits.argmax(axis=1).astype(np.int64)  # ties: the lowest class index (numpy's argmax), as counted in n_ties
    labels = bundle.test_frame["label"].to_numpy(np.int64)

    frame = bundle.test_frame
    predictions = pd.DataFrame({
        "example_id": frame["example_id"].to_numpy(np.int64),
        "label": labels,
        "pred": pred,
        "prob": probs[np.arange(len(pred)), pred].astype(np.float64),
    })
    for g in bundle.group_columns:
        predictions[g] = frame[g].to_numpy(np.int64)

    counts = confusion_counts(labels, pred, bundle.n_classes)
    rates = class_rates(counts)
    per_class = pd.DataFrame({
        "class": np.arange(bundle.n_classes, dtype=np.int64),
        "class_name": bundle.class_names,
        "support": rates.support.astype(np.int64),
        "tp": rates.tp, "fp": rates.fp, "fn": rates.fn, "tn": rates.tn,
        "fpr": rates.fpr, "fnr": rates.fnr,
    })
    if bundle.group_columns:
        per_group = group_rates(labels, pred, frame[bundle.group_columns], bundle.n_classes,
                                positive_class=bundle.positive_class).table
    else:
        per_group = pd.DataFrame(columns=["grouping", "group", "class", "size", "tp", "fp", "fn", "tn", "fpr", "fnr", "recall", "accuracy"])
    return Evaluation(
        predictions=predictions, per_class=per_class, per_group=per_group,
        accuracy=float((pred == labels).mean()), confusion=np.asarray(counts),
        logits=logits if keep_logits else None, n_ties=n_ties,
    )
