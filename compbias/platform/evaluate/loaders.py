"""Loading a registered model for evaluation without running code stored with it.

Model kinds (docs/bring-your-own.md, "Bring your own models"): a
``torch.export`` program (``.pt2``, loaded after MLflow's check that the
archive holds no pickle payload), a state dict (``state_dict.pth`` read with
``torch.load(weights_only=True)``, or ``*.safetensors``) rebuilt with the
spec's ``state_dict.factory``, ONNX (onnxruntime on the CPU), and -- only with
``allow_pickle=True`` -- MLflow ``pyfunc`` models and ``pytorch`` models saved
whole with pickle.  :func:`_load_executing_code` is the one place compbias
unpickles a model or runs code stored with it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from compbias.platform.evaluate.errors import SAFE_ALTERNATIVES, EvaluationError, PickleRefused, first_line
from compbias.platform.evaluate.spec import EvalSpec

__all__ = ["LoadedModel", "load_local_model"]


@dataclass
class LoadedModel:
    """A model ready to predict.

    Attributes
    ----------
    kind : str
        ``pytorch-pt2``, ``pytorch-state-dict``, ``pytorch-pickle``, ``onnx`` or ``pyfunc``.
    predict : callable
        ``inputs -> numpy.ndarray`` for one batch (numpy array, or a DataFrame
        of features for a pyfunc on a table).
    wants_frame : bool
        True when ``predict`` takes a DataFrame of the table's features.
    """

    kind: str
    predict: Callable[[Any], np.ndarray]
    wants_frame: bool = False


def _refuse(what: str, why: str) -> PickleRefused:
    return PickleRefused(
        f"{what}: {why}; loading it executes code stored with the model, so compbias refuses it by default. "
        f"Safe alternatives: {SAFE_ALTERNATIVES}. If you trust the registry and everyone who can write to it, "
        "opt in with --allow-pickle (allow_pickle=True)."
    )


@contextlib.contextmanager
def _mlflow_pickle_allowed():
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    old = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _torch_module_predict(module) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "dequantize") and getattr(out, "is_quantized", False):
            out = out.dequantize()
        return out.detach().float().cpu().numpy()

    return predict


def _load_pt2(path: Path, allow_pickle: bool, what: str) -> LoadedModel:
    import torch

    if not allow_pickle:
        try:
            from mlflow.pytorch import _validate_pt2_archive_is_pickle_free as check
        except ImportError:  # pragma: no cover - depends on the MLflow version
            raise _refuse(what, "this MLflow cannot check that the torch.export archive is free of pickles") from None
        try:
            check(str(path))
        except Exception as exc:
            raise _refuse(what, f"its torch.export archive holds a pickled payload ({first_line(exc)})") from None
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise EvaluationError(f"{what}: cannot load the torch.export program {path.name}: {first_line(exc)}") from None
    return LoadedModel("pytorch-pt2", _torch_module_predict(module))


def _load_state_dict(path: Path, spec: EvalSpec, what: str) -> LoadedModel:
    import torch

    if spec.factory is None:
        raise EvaluationError(
            f"{what} is a state dict ({path.name}) without its architecture; name the function that builds the "
            "model in the evaluation spec: state_dict: {factory: 'torchvision.models:resnet18', kwargs: {num_classes: 2}}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise EvaluationError(f"{what}: {path.name} is corrupt or truncated ({first_line(exc)}); log it again") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # the restricted unpickler: tensors only
        except Exception as exc:
            if "weights_only" in str(exc) or "Weights only" in str(exc):
                raise _refuse(what, f"{path.name} holds objects other than tensors ({first_line(exc)})") from None
            raise EvaluationError(f"{what}: {path.name} cannot be read ({first_line(exc)}); log it again") from None
    if not isinstance(state, Mapping):
        raise EvaluationError(f"{what}: {path.name} holds a {type(state).__name__}, not a state dict")
    state = _fold_prune_masks(dict(state))
    module_name, _, func_name = spec.factory.partition(":")
    added = [p for p in spec.python_path if p not in sys.path]
    sys.path[:0] = added
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise EvaluationError(f"cannot import the state_dict factory {spec.factory!r}: {exc}; "
                              "install its package or add its folder to state_dict.python_path") from None
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)
    try:
        model = factory(**spec.factory_kwargs)
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise EvaluationError(f"{what}: the state dict does not fit {spec.factory}(**{spec.factory_kwargs}): "
                              f"{first_line(exc)}") from None
    model.eval()
    return LoadedModel("pytorch-state-dict", _torch_module_predict(model))


def _fold_prune_masks(state: dict) -> dict:
    """``torch.nn.utils.prune`` leaves ``<p>_orig`` and ``<p>_mask``: fold them into ``<p>``."""
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")
    return state


def _load_onnx(path: Path, spec: EvalSpec, what: str) -> LoadedModel:
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EvaluationError(f"{what}: onnxruntime cannot load {path.name}: {first_line(exc)}") from None
    inputs = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    if spec.onnx_input is not None:
        chosen = [i for i in inputs if i.name == spec.onnx_input]
        if not chosen:
            raise EvaluationError(f"{what}: the ONNX model has no input {spec.onnx_input!r}; inputs: {[i.name for i in inputs]}")
        inp = chosen[0]
    elif len(inputs) == 1:
        inp = inputs[0]
    else:
        raise EvaluationError(f"{what}: the ONNX model has {len(inputs)} inputs {[i.name for i in inputs]}; "
                              "name the one that takes the examples in the spec (onnx: {input: NAME})")
    out_name = spec.onnx_output or outputs[0]
    if out_name not in outputs:
        raise EvaluationError(f"{what}: the ONNX model has no output {out_name!r}; outputs: {outputs}")
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}.get(inp.type)
    if dtype is None:
        raise EvaluationError(f"{what}: the ONNX input {inp.name!r} takes {inp.type}; only float inputs are supported")

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([out_name], {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0])

    return LoadedModel("onnx", predict)


def _load_mlmodel(root: Path, spec: EvalSpec, allow_pickle: bool, what: str) -> LoadedModel:
    try:
        mlmodel = yaml.safe_load((root / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise EvaluationError(f"{what}: its MLmodel file is unreadable: {exc}") from None
    flavors = mlmodel.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    if "onnx" in flavors or pyfunc.get("loader_module") == "mlflow.onnx":
        name = (flavors.get("onnx") or {}).get("data") or pyfunc.get("data") or "model.onnx"
        return _load_onnx(root / name, spec, what)
    if "pytorch" in flavors or pyfunc.get("loader_module") == "mlflow.pytorch":
        data = root / ((flavors.get("pytorch") or {}).get("model_data") or pyfunc.get("data") or "data")
        if (data / "model.pt2").is_file():
            return _load_pt2(data / "model.pt2", allow_pickle, what)
        if not (data / "model.pth").is_file():
            raise EvaluationError(f"{what}: its pytorch flavour has neither data/model.pt2 nor data/model.pth")
        if not allow_pickle:
            raise _refuse(what, "it is an MLflow pytorch model saved whole with pickle (data/model.pth)")
        module = _load_executing_code(root, "pytorch", what)
        module.eval()
        return LoadedModel("pytorch-pickle", _torch_module_predict(module))
    if pyfunc:
        if pyfunc.get("python_model") or pyfunc.get("model_code_path") or mlmodel.get("model_code_path"):
            why = "it is an MLflow pyfunc whose Python model is cloudpickled or a code file run at load time"
        else:
            why = f"it is an MLflow pyfunc loaded by {pyfunc.get('loader_module')!r}, which may unpickle its data"
        if not allow_pickle:
            raise _refuse(what, why)
        model = _load_executing_code(root, "pyfunc", what)
        return LoadedModel("pyfunc", lambda x: np.asarray(_pyfunc_output(model.predict(x))), wants_frame=True)
    raise EvaluationError(f"{what}: its MLmodel has flavours {sorted(flavors)}; compbias evaluates the pytorch, "
                          "onnx and python_function flavours (or log predictions only: compbias register)")


def _load_executing_code(root: Path, flavour: str, what: str):
    """The one place compbias unpickles a model or runs code stored with it.

    Reached only with ``allow_pickle=True`` (``--allow-pickle``); the
    security scan (tests/reliability/test_rel_security.py) exempts this
    function and nothing else.
    """
    import mlflow.pyfunc
    import mlflow.pytorch

    try:
        with _mlflow_pickle_allowed():
            if flavour == "pytorch":
                return mlflow.pytorch.load_model(str(root), map_location="cpu", weights_only=False)
            return mlflow.pyfunc.load_model(str(root))
    except Exception as exc:
        raise EvaluationError(f"{what}: cannot load the {flavour} model: {first_line(exc)}") from None


def _pyfunc_output(out):
    if isinstance(out, pd.DataFrame):
        return out.to_numpy()
    if isinstance(out, pd.Series):
        return out.to_numpy()
    if isinstance(out, dict) and len(out) == 1:
        return np.asarray(next(iter(out.values())))
    return out


def load_local_model(root: str | os.PathLike, spec: EvalSpec, *, allow_pickle: bool = False,
                     what: str = "the model") -> LoadedModel:
    """Load a downloaded model directory (or file) for evaluation.

    Parameters
    ----------
    root : path
        A directory holding an ``MLmodel`` file, a state dict, a ``.pt2`` or
        an ``.onnx`` file, or one such file.
    spec : EvalSpec
        For the state-dict factory and ONNX tensor names.
    allow_pickle : bool
        Load models whose loading unpickles data or runs code stored with them.
    what : str
        Named in messages (e.g. ``version NAME/3``).

    Returns
    -------
    LoadedModel

    Raises
    ------
    PickleRefused
        The model would be unpickled and ``allow_pickle`` is false.
    EvaluationError
        Any other reason it cannot be loaded.
    """
    root = Path(root)
    if root.is_file():
        files, base = [root], root.parent
    else:
        base = root
        if (root / "MLmodel").is_file():
            return _load_mlmodel(root, spec, allow_pickle, what)
        nested = sorted(p.parent for p in root.rglob("MLmodel"))
        if len(nested) == 1:  # a version registered from a folder that holds the MLflow model
            return _load_mlmodel(nested[0], spec, allow_pickle, what)
        if len(nested) > 1:
            raise EvaluationError(f"{what}: its artifacts hold {len(nested)} MLflow models "
                                  f"({[str(p.relative_to(root)) for p in nested]}); register one model per version")
        files = sorted(p for p in root.rglob("*") if p.is_file())
    by_suffix = {}
    for f in files:
        by_suffix.setdefault(f.suffix.lower(), []).append(f)
    for suffix, loader in ((".onnx", lambda f: _load_onnx(f, spec, what)),
                           (".pt2", lambda f: _load_pt2(f, allow_pickle, what)),
                           (".safetensors", lambda f: _load_state_dict(f, spec, what))):
        found = by_suffix.get(suffix, [])
        if len(found) > 1:
            raise EvaluationError(f"{what}: its artifacts hold {len(found)} {suffix} files "
                                  f"({[str(f.relative_to(base)) for f in found]}); register one model per version")
        if found:
            return loader(found[0])
    state = [f for f in files if f.name == "state_dict.pth"]
    if state:
        return _load_state_dict(state[0], spec, what)
    pickles = [f for f in files if f.suffix.lower() in (".pth", ".pt", ".pkl", ".pickle", ".joblib", ".bin")]
    if pickles:
        raise _refuse(what, f"{pickles[0].name} is a pickle of unknown content") if not allow_pickle else EvaluationError(
            f"{what}: {pickles[0].name} is not an MLflow model; log it with mlflow.pytorch.log_model, "
            "mlflow.pytorch.log_state_dict or mlflow.onnx.log_model")
    raise EvaluationError(f"{what}: its artifacts hold no model compbias can evaluate (no MLmodel, .onnx, .pt2, "
                          f"state_dict.pth or .safetensors; found {[f.name for f in files][:10]})")
