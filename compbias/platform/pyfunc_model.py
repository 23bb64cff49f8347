"""The MLflow pyfunc wrapper of a compbias model (logged as code, nothing pickled).

This file is given to ``mlflow.pyfunc.save_model(python_model=<this file>)``
("models from code"; ``compbias.platform.tracking`` uploads the result as an
MLflow LoggedModel): MLflow copies it into the model and runs it on load, so
no cloudpickle is involved. The weights are an artifact named ``weights``: the
directory written by ``compbias.jobs.save_model`` (``weights.safetensors`` and
``model_spec.json``), read back with ``compbias.jobs.load_model``.

Input: images as a float32 array ``(N, C, H, W)`` (a 2-D array or DataFrame
of flattened pixels is reshaped to the model's input shape). Output: a
DataFrame with ``pred`` (class id) and ``prob`` (top-class probability).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class CompbiasModel(PythonModel):
    """Serve a compbias classifier: images in, ``pred`` and ``prob`` out."""

    def load_context(self, context):
        """Load the weights (safetensors) with ``compbias.jobs.load_model``.

        Parameters
        ----------
        context : mlflow.pyfunc.PythonModelContext
            ``context.artifacts["weights"]`` is the saved model directory.
        """
        import torch  # noqa: F401  (fail early with a clear ImportError)

        from compbias import jobs

        directory = Path(context.artifacts["weights"])
        loaded = jobs.load_model(directory)
        self.model = loaded[0] if isinstance(loaded, tuple) else loaded
        self.model.eval()
        spec = json.loads((directory / "model_spec.json").read_text())
        self.input_shape = tuple(int(x) for x in spec.get("input_shape", ()))

    def _as_tensor(self, model_input):
        import torch

        if isinstance(model_input, pd.DataFrame):
            x = model_input.to_numpy()
        elif isinstance(model_input, dict):
            x = next(iter(model_input.values()))
        else:
            x = model_input
        x = np.asarray(x, dtype=np.float32)
        if self.input_shape and x.ndim == 2 and x.shape[1] == int(np.prod(self.input_shape)):
            x = x.reshape((x.shape[0],) + self.input_shape)
        if self.input_shape and x.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected images of shape (N, {', '.join(map(str, self.input_shape))}) "
                f"or flattened to (N, {int(np.prod(self.input_shape))}); got {x.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(x))

    def predict(self, context, model_input: np.ndarray, params=None):
        """Classify a batch of images.

        Parameters
        ----------
        context : mlflow.pyfunc.PythonModelContext
        model_input : numpy.ndarray or pandas.DataFrame
            ``(N, C, H, W)`` float32, or ``(N, C*H*W)``.
        params : dict, optional
            Unused.

        Returns
        -------
        pandas.DataFrame
            ``pred`` (int64) and ``prob`` (float64) per row.

        Notes
        -----
        The ``np.ndarray`` annotation tells MLflow not to infer a schema from
        type hints: the signature (a float32 tensor) is given when logging.
        """
        import torch

        x = self._as_tensor(model_input)
        with torch.no_grad():
            logits = self.model(x)
            probs = torch.softmax(logits.float(), dim=1)
            prob, pred = probs.max(dim=1)
        return pd.DataFrame({"pred": pred.numpy().astype(np.int64), "prob": prob.numpy().astype(np.float64)})


mlflow.models.set_model(CompbiasModel())
