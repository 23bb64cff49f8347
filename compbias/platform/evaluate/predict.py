"""Running a loaded model on the evaluation data and building its predictions table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from compbias import contract as C
from compbias.platform.evaluate.data import EvaluationData
from compbias.platform.evaluate.errors import EvaluationError, first_line
from compbias.platform.evaluate.loaders import LoadedModel
from compbias.platform.evaluate.spec import EvalSpec

__all__ = ["evaluate_model"]


def evaluate_model(model: LoadedModel, data: EvaluationData, spec: EvalSpec, *, what: str = "the model") -> pd.DataFrame:
    """Run a loaded model on the evaluation data and build its predictions table.

    Parameters
    ----------
    model : LoadedModel
    data : EvaluationData
    spec : EvalSpec
    what : str
        Named in messages.

    Returns
    -------
    pandas.DataFrame
        The contract's table: ``example_id``, ``label``, ``pred`` (argmax of
        the scores), ``prob`` (probability of ``pred``, when the model returns
        scores), the group columns and ``path`` when present.

    Raises
    ------
    EvaluationError
        The outputs do not have one row per example and ``num_classes``
        columns (or one class id per example for ``output: labels``), or hold
        non-finite values.
    """
    k = data.info.num_classes
    n = len(data.frame)
    bs = spec.batch_size
    chunks = []
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        if model.wants_frame and data.features is not None:
            batch = data.features.iloc[start:stop]
        else:
            batch = data.inputs[start:stop]
            if stop - start < bs:  # pad a short batch: models exported with a fixed batch size
                batch = np.concatenate([batch, np.repeat(batch[-1:], bs - (stop - start), axis=0)])
        try:
            out = np.asarray(model.predict(batch))
        except Exception as exc:
            raise EvaluationError(f"{what}: the model failed on inputs of shape {tuple(np.shape(batch))}: "
                                  f"{type(exc).__name__}: {first_line(exc)}") from None
        chunks.append(out[: stop - start] if out.ndim >= 1 else out)
    try:
        out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    except ValueError:
        raise EvaluationError(f"{what}: the model's output shape changes between batches "
                              f"({[tuple(c.shape) for c in chunks][:3]})") from None
    frame = data.frame.copy()
    labels_out = spec.output == "labels" or (spec.output == "auto" and out.ndim == 1 and np.issubdtype(out.dtype, np.integer))
    if labels_out:
        if out.shape != (n,) or not np.issubdtype(out.dtype, np.number) or not np.all(np.mod(out, 1) == 0):
            raise EvaluationError(f"{what}: expected {n} class ids (output: labels), the model returned shape {out.shape}")
        pred = out.astype(np.int64)
        if pred.min() < 0 or pred.max() >= k:
            raise EvaluationError(f"{what}: the model predicts class {int(pred.max())} (min {int(pred.min())}) but "
                                  f"the evaluation spec has {k} classes (ids 0..{k - 1})")
        prob = None
    else:
        if out.ndim != 2 or out.shape != (n, k):
            raise EvaluationError(
                f"{what}: the model returns outputs of shape {tuple(out.shape)} but the evaluation has {n} examples "
                f"of {k} classes, so (N, {k}) scores are expected; check num_classes in the spec and the model's "
                "output layer (or output: labels for a model that returns class ids)"
            )
        scores = out.astype(np.float64)
        if not np.isfinite(scores).all():
            raise EvaluationError(f"{what}: the model returned {int((~np.isfinite(scores)).sum())} NaN or infinite scores")
        is_prob = spec.output == "probabilities" or (
            spec.output == "auto" and (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4))
        if is_prob:
            probs = scores
        else:
            z = scores - scores.max(axis=1, keepdims=True)
            e = np.exp(z)
            probs = e / e.sum(axis=1, keepdims=True)
        pred = scores.argmax(axis=1).astype(np.int64)
        prob = np.clip(probs[np.arange(n), pred], 0.0, 1.0)
    cols = {C.EXAMPLE_ID: frame[C.EXAMPLE_ID].to_numpy(np.int64), C.LABEL: frame[C.LABEL].to_numpy(np.int64),
            C.PRED: pred}
    if prob is not None:
        cols[C.PROB] = prob
    table = pd.DataFrame(cols)
    for c in frame.columns:
        if c not in (C.EXAMPLE_ID, C.LABEL):
            table[c] = frame[c].to_numpy()
    try:
        return C.validate_predictions(table, num_classes=k, groups=list(data.info.groups or ()), where=what)
    except C.ContractError as exc:
        raise EvaluationError(str(exc)) from None
