"""A user's own training and compression script: plain torch, torchvision, Torch-Pruning, torchao, MLflow.

It imports nothing from compbias (tests/e2e/test_byo_user.py checks that).
It plays a team that already has its models in an MLflow Model Registry:

1. generates a small image set (16x16 RGB, two classes, a ``site``
   attribute that makes one group's images noisier) as an image folder
   (``train/<class>/*.png``, ``test/<class>/*.png``, ``attributes.csv``);
2. trains a small torchvision ResNet per seed;
3. compresses each baseline three ways: ``torch.nn.utils.prune`` (global L1
   unstructured, 50%), Torch-Pruning (50% of the channels physically
   removed) and torchao int8 weight-only quantization;
4. logs and registers every model, each in a format that loads without
   unpickling: the baseline with ``mlflow.pytorch`` (a torch.export program),
   the ``prune`` model as a state dict, the Torch-Pruning and the int8 models
   as ONNX (``mlflow.onnx``; torchao's int8 weights are tensor subclasses that
   a torch.export archive can only hold pickled), and puts the documented
   ``compbias.*`` lineage tags on each version (docs/contract.md).  No
   predictions are logged.

Usage: python byo_user_script.py --tracking-uri URI --data DIR --name MODEL [--seeds 3]
Prints one JSON line: the registered versions with their lineage.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("no_patch", "patch")
SIDE = 16


def small_resnet(num_classes: int = 2) -> nn.Module:
    """A torchvision ResNet with one basic block per stage (the factory the evaluation spec names)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, 3, 16, 16), labels (1: a red patch, 0: a blue one) and the site (1: noisy, 30%)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    site = (rng.random(n) < 0.3).astype(np.int64)
    x = rng.uniform(0.0, 0.5, (n, 3, SIDE, SIDE))
    for i in range(n):
        r, c = rng.integers(0, SIDE - 6, 2)
        x[i, 0 if y[i] else 2, r:r + 6, c:c + 6] += 0.5
        if site[i]:
            x[i] += rng.normal(0.0, 0.3, (3, SIDE, SIDE))
            x[i, 1] += 0.2
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), y, site


def write_image_folder(root: Path, seed: int = 0, n_train: int = 256, n_test: int = 192) -> dict:
    """Write the image folder and return the training arrays."""
    from PIL import Image

    rows = ["path,site"]
    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        x, y, site = make_images(n, s)
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rel = f"{split}/{CLASSES[y[i]]}/{i:04d}.png"
            Image.fromarray(x[i].transpose(1, 2, 0)).save(root / rel)
            rows.append(f"{rel},{site[i]}")
        out[split] = (x, y)
    (root / "attributes.csv").write_text("\n".join(rows) + "\n")
    return out


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = small_resnet(len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt = torch.from_numpy(x).float() / 255.0  # what torchvision's ToTensor does
    yt = torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def prune_l1(model: nn.Module, amount: float) -> nn.Module:
    import torch.nn.utils.prune as prune

    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for mod, name in params:
        prune.remove(mod, name)
    return m.eval()


def prune_channels(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[m.fc])
    pruner.step()
    return m.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Int8WeightOnlyConfig())
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--name", default="shapes-resnet")
    ap.add_argument("--study", default="byo-shapes")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import mlflow
    import onnx
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    mlflow.set_experiment("shapes")
    data = write_image_folder(args.data)
    x_train, y_train = data["train"]
    example = torch.rand(2, 3, SIDE, SIDE)
    reqs = ["torch", "torchvision"]
    versions = []

    def register(run, uri_or_source, tags, *, direct=False):
        if direct:  # a plain artifact folder (a state dict) becomes a version through the client
            try:
                client.create_registered_model(args.name)
            except mlflow.exceptions.MlflowException:
                pass
            mv = client.create_model_version(args.name, source=uri_or_source, run_id=run.info.run_id, tags=tags)
        else:
            mv = mlflow.register_model(uri_or_source, args.name, tags=tags)
        versions.append({"version": str(mv.version), "run_id": run.info.run_id, **tags})
        return str(mv.version)

    t0 = time.time()
    for seed in range(args.seeds):
        lineage = {"compbias.study": args.study, "compbias.seed": str(seed)}
        base = train(x_train, y_train, seed, args.epochs)
        with mlflow.start_run(run_name=f"baseline-{seed}") as run:
            info = mlflow.pytorch.log_model(base, name="model", serialization_format="pt2",
                                            input_example=example.numpy(), pip_requirements=reqs)
            base_version = register(run, info.model_uri, {**lineage, "compbias.role": "baseline"})
        compressed = {**lineage, "compbias.role": "compressed", "compbias.baseline_version": base_version}

        with mlflow.start_run(run_name=f"prune-l1-{seed}") as run:
            mlflow.pytorch.log_state_dict(prune_l1(base, 0.5).state_dict(), "state_dict")
            register(run, f"{run.info.artifact_uri}/state_dict",
                     {**compressed, "compbias.method": "torch_prune_l1", "compbias.level": "0.5"}, direct=True)

        def log_onnx(model):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
                return mlflow.onnx.log_model(onnx.load(path), name="model", pip_requirements=["onnxruntime"])

        with mlflow.start_run(run_name=f"torch-pruning-{seed}") as run:
            slim = prune_channels(base, 0.5, example)
            mlflow.log_metric("params", sum(p.numel() for p in slim.parameters()))
            info = log_onnx(slim)
            register(run, info.model_uri, {**compressed, "compbias.method": "torch_pruning", "compbias.level": "0.5"})

        with mlflow.start_run(run_name=f"int8-{seed}") as run:
            info = log_onnx(quantize_int8(base))
            register(run, info.model_uri, {**compressed, "compbias.method": "torchao_int8", "compbias.level": "int8"})
    print(json.dumps({"seconds": round(time.time() - t0, 1), "versions": versions}))


if __name__ == "__main__":
    main()
