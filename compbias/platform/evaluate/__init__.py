"""Bring your own models: evaluate registered versions that carry the lineage tags but no predictions.

A team that trains, prunes and quantizes its models with its own code can
register them in its MLflow Model Registry with the lineage tags of
:mod:`compbias.contract` (``compbias.study``, ``compbias.role``,
``compbias.seed``, and for compressed versions ``compbias.method``,
``compbias.level`` and ``compbias.baseline_version``) and no predictions.
:func:`evaluate_versions` runs each such version on the dataset an
**evaluation spec** names and logs its predictions table and ``member.json``
to the version's run, in one upload, so that ``compbias audit`` audits it
like any other member.  ``compbias audit --evaluate SPEC.yaml`` does this
before it audits; with ``--watch`` each pass does it for new versions.

Model kinds (docs/bring-your-own.md, "Bring your own models"):

* MLflow ``pytorch`` flavour saved with ``serialization_format="pt2"``
  (a ``torch.export`` program, MLflow 3's default): loaded after MLflow's own
  check that the archive holds no pickle payload.
* a state dict (``mlflow.pytorch.log_state_dict``'s ``state_dict.pth``, read
  with ``torch.load(weights_only=True)``, or ``*.safetensors``) rebuilt with the
  ``state_dict.factory`` the spec names.
* ONNX: the ``onnx`` flavour, or a ``.onnx`` file among the version's
  artifacts, run with onnxruntime on the CPU.
* MLflow ``pyfunc`` (and the ``pytorch`` flavour saved whole with pickle):
  loading them executes code stored with the model, so they are refused
  unless ``allow_pickle=True`` (``--allow-pickle``).  A ``pyfunc`` whose loader
  is ``mlflow.pytorch`` (pt2) or ``mlflow.onnx`` is loaded as that flavour.

Security rule: nothing is unpickled and no code stored with a model is run
unless the caller opts in; the refusal names the safe alternatives.

Layout: :mod:`~compbias.platform.evaluate.spec` (the evaluation spec, read and
checked), :mod:`~compbias.platform.evaluate.data` (the examples it names),
:mod:`~compbias.platform.evaluate.loaders` (model kinds and the pickle rule),
:mod:`~compbias.platform.evaluate.predict` (a model's predictions table),
:mod:`~compbias.platform.evaluate.versions` (pending versions, evaluating
them, logging their predictions) and :mod:`~compbias.platform.evaluate.errors`.
The run tags an evaluation writes are :data:`compbias.contract.EVALUATION_MODEL_KIND`
and :data:`compbias.contract.EVALUATION_SPEC_HASH`.
"""

from __future__ import annotations

from compbias import contract as C
from compbias.platform.evaluate.data import EvaluationData, load_data
from compbias.platform.evaluate.errors import SAFE_ALTERNATIVES, EvaluationError, PickleRefused
from compbias.platform.evaluate.loaders import LoadedModel, load_local_model
from compbias.platform.evaluate.predict import evaluate_model
from compbias.platform.evaluate.spec import OUTPUT_KINDS, EvalSpec, load_spec
from compbias.platform.evaluate.versions import (
    EvaluationReport,
    evaluate_versions,
    has_predictions,
    log_predictions,
    pending_versions,
    tag_errors,
)

__all__ = [
    "EvalSpec",
    "EvaluationData",
    "EvaluationError",
    "EvaluationReport",
    "LoadedModel",
    "PickleRefused",
    "SAFE_ALTERNATIVES",
    "evaluate_versions",
    "evaluate_model",
    "load_data",
    "load_local_model",
    "load_spec",
    "log_predictions",
    "pending_versions",
    "EvaluationReport",
    "OUTPUT_KINDS",
    "has_predictions",
    "tag_errors",
    "EVALUATED_KIND",
    "EVALUATED_SPEC",
]

#: Run tag naming the model format a version was evaluated as (:data:`compbias.contract.EVALUATION_MODEL_KIND`).
EVALUATED_KIND = C.EVALUATION_MODEL_KIND
#: Run tag holding a hash of the evaluation spec (:data:`compbias.contract.EVALUATION_SPEC_HASH`).
EVALUATED_SPEC = C.EVALUATION_SPEC_HASH
