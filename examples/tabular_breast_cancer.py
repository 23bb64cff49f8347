"""Bring your own predictions: audit a tabular model population compressed outside compbias.

Plain scikit-learn and torch user code trains a small MLP on scikit-learn's
breast-cancer data for three seeds, makes an int8 version (per-channel int8
weight rounding) and a pruned version (``torch.nn.utils.prune``, 80% of the
weights by magnitude) of each, and logs every model's test predictions inside
its own ``mlflow.start_run()`` with :func:`compbias.log_member`.  Then
``compbias``'s audit compares the compressed populations with the baselines
and prints its verdicts.

The group attribute ``large`` (mean radius above the training median) is a
*synthetic* group made up for this example, standing in for a protected
attribute the data set does not have; it shows how group columns travel with
the predictions, not a finding about patients.

Run it (well under a minute on a laptop CPU)::

    MLFLOW_TRACKING_URI=sqlite:///example.db python examples/tabular_breast_cancer.py

then ``mlflow ui --backend-store-uri sqlite:///example.db`` to browse the runs,
the registered model ``breast-cancer-mlp`` and the audit run with its report.
"""

from __future__ import annotations

import argparse
import os
import time

import mlflow
import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn.utils import prune

import compbias

STUDY = "breast-cancer"
SEEDS = (0, 1, 2)


def load_data():
    """Standardised train/test split (seeded), labels (0 malignant, 1 benign) and the synthetic group."""
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.3, stratify=data.target, random_state=0
    )
    radius = list(data.feature_names).index("mean radius")
    large_test = (x_test[:, radius] > np.median(x_train[:, radius])).astype(np.int64)  # synthetic group
    scaler = StandardScaler().fit(x_train)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (as_tensor(scaler.transform(x_train)), torch.tensor(y_train), as_tensor(scaler.transform(x_test)),
            np.asarray(y_test, dtype=np.int64), large_test, [str(n) for n in data.target_names])


def train_mlp(x, y, seed: int) -> nn.Module:
    """A two-hidden-layer MLP trained full-batch with Adam."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def int8(model: nn.Module) -> nn.Module:
    """int8 weights: each output row of every linear layer rounded to 255 symmetric levels (weight-only int8)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                scale = m.weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
                m.weight.copy_(torch.clamp(torch.round(m.weight / scale), -127, 127) * scale)
    return model


def pruned(model: nn.Module, amount: float = 0.8) -> nn.Module:
    """Global magnitude pruning of the linear weights, made permanent."""
    import copy

    model = copy.deepcopy(model)
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for m, name in params:
        prune.remove(m, name)
    return model


def predictions(model: nn.Module, x_test, y_test, large) -> pd.DataFrame:
    """The contract's predictions table: one row per test example."""
    with torch.no_grad():
        prob = torch.softmax(model(x_test), dim=1).numpy()
    pred = prob.argmax(axis=1)
    return pd.DataFrame({
        "example_id": np.arange(len(y_test)), "label": y_test, "pred": pred,
        "prob": prob[np.arange(len(pred)), pred], "large": large,
    })


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registered-model", default="breast-cancer-mlp")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the audit's intervals")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    mlflow.set_experiment(f"examples/{STUDY}")
    x_train, y_train, x_test, y_test, large, class_names = load_data()

    from mlflow import MlflowClient

    done = [v for v in MlflowClient().search_model_versions(f"name = '{args.registered_model}'")
            if v.tags.get("compbias.study") == STUDY]
    if done:
        print(f"{args.registered_model} already holds {len(done)} members of {STUDY!r}; auditing them again")
    else:
        for seed in SEEDS:
            base = train_mlp(x_train, y_train, seed)
            with mlflow.start_run(run_name=f"mlp-s{seed}"):
                mlflow.log_params({"seed": seed, "hidden": "64,32"})
                table = predictions(base, x_test, y_test, large)
                mlflow.log_metric("acc", float((table["pred"] == table["label"]).mean()))
                member = compbias.log_member(
                    table, study=STUDY, role="baseline", seed=seed, registered_model_name=args.registered_model,
                    class_names=class_names, positive_class="malignant", groups=["large"],
                )
            for method, level, model in (("int8", "weights", int8(base)), ("magnitude", "0.8", pruned(base))):
                with mlflow.start_run(run_name=f"mlp-{method}-s{seed}"):
                    table = predictions(model, x_test, y_test, large)
                    mlflow.log_metric("acc", float((table["pred"] == table["label"]).mean()))
                    compbias.log_member(
                        table, study=STUDY, role="compressed", seed=seed, method=method, level=level,
                        baseline_version=member.version, registered_model_name=args.registered_model,
                    )
            print(f"seed {seed}: baseline version {member.version}, int8 and pruned versions logged")

    from compbias.platform.audit import AuditOptions, Selection, run_audit

    options = AuditOptions(bootstrap=args.bootstrap, similarity=False, gallery=False, cache_dir=None)
    (result,) = run_audit(MlflowClient(), Selection(registered_model=args.registered_model, force=True), options)
    client = MlflowClient()
    print(f"\naudit run {result.run_id} of {args.registered_model} (study {STUDY}):")
    for key in sorted(result.statuses, key=lambda k: int(k.split("/")[1])):
        tags = client.get_model_version(*key.split("/")).tags
        what = "baseline" if tags["compbias.role"] == "baseline" else f"{tags['compbias.method']}@{tags['compbias.level']}"
        figures = "" if tags["compbias.role"] == "baseline" else (
            f"acc drop {float(tags.get('compbias.audit.acc_drop', 'nan')):+.2f} pp, worst group "
            f"{tags.get('compbias.audit.worst_group', '-')}: malignant-class FPR "
            f"{float(tags.get('compbias.audit.worst_group_fpr_change', 'nan')):+.0f}% (population vs baselines)")
        reason = result.reasons.get(key, "") if result.statuses[key] != "pass" else ""
        print(f"  version {key.split('/')[1]:>2}  seed {tags['compbias.seed']}  {what:<16} {result.statuses[key]:<5} {figures} {reason}")
    if result.report_path:
        print(f"report: {result.report_path}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    raise SystemExit(main())
