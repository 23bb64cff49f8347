"""Synthetic studies for tests, benchmarks and demos of the audit, without training.

:func:`make_predictions` draws predictions tables with a real compression
bias: compressed models lose examples of one *victim* class and of one group
to a *cannibal* class, more so at higher levels, and a mitigated method
(``<method>+kd``) loses fewer.  :func:`register_synthetic_study` logs one
model run per model with the artifacts of the tracking contract
(``predictions.parquet``, ``rates/per_class.parquet``,
``rates/per_group.parquet``, ``study.yaml``) and registers a version carrying
the lineage tags, exactly as a study would.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from compbias.platform.audit import tags as T


@dataclass
class SyntheticStudy:
    """Shape and strength of a synthetic study.

    Attributes
    ----------
    name : str
    n_examples, n_classes, seeds : int
    methods : dict of str to list of str
        Method name to its levels (e.g. ``{"magnitude": ["0.5", "0.9"]}``).
    victim_class, cannibal_class : int
        Compressed models move examples of the victim class (and of group
        ``ink == 1``) to the cannibal class.
    base_error : float
        Baseline error rate (uniformly wrong class).
    bias : float
        Extra error on victim examples at level 1.0 for unmitigated methods;
        methods whose name contains ``+`` get a quarter of it.
    thresholds : dict
        Written into the study file's ``audit.thresholds``.
    """

    name: str = "synth"
    n_examples: int = 600
    n_classes: int = 10
    seeds: int = 3
    methods: dict[str, list[str]] = field(default_factory=lambda: {"magnitude": ["0.5", "0.9"], "magnitude+kd": ["0.9"]})
    victim_class: int = 3
    cannibal_class: int = 5
    base_error: float = 0.05
    bias: float = 0.6
    thresholds: dict = field(default_factory=dict)
    cie_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05])
    bootstrap: int = 100

    @property
    def registered_model(self) -> str:
        """Registered model name, ``compbias-<name>`` as the study uses."""
        return f"compbias-{self.name}"

    def study_file(self) -> dict:
        """The study file logged with every run."""
        return {
            "name": self.name,
            "dataset": {"kind": "digits", "groups": ["ink"]},
            "population": {"seeds": self.seeds},
            "compression": [{"method": m.split("+")[0], "levels": list(lv)} for m, lv in self.methods.items()],
            "audit": {
                "cie_fractions": list(self.cie_fractions),
                "bootstrap": int(self.bootstrap),
                "thresholds": dict(self.thresholds),
                "alias": "audited",
            },
        }


def test_set(spec: SyntheticStudy) -> pd.DataFrame:
    """The synthetic test set: ``example_id``, ``label``, ``ink`` (two groups)."""
    rng = np.random.default_rng(12345)
    n = spec.n_examples
    labels = np.arange(n) % spec.n_classes
    rng.shuffle(labels)
    ink = (rng.random(n) < 0.4).astype(np.int64)
    return pd.DataFrame({"example_id": np.arange(n, dtype=np.int64), "label": labels.astype(np.int64), "ink": ink})


def make_predictions(spec: SyntheticStudy, seed: int, method: str | None = None, level: str | None = None) -> pd.DataFrame:
    """Draw one model's predictions table.

    Parameters
    ----------
    spec : SyntheticStudy
    seed : int
        The population seed (baseline and its compressed models share the
        baseline's errors).
    method, level : str, optional
        None for the baseline.

    Returns
    -------
    pandas.DataFrame
        ``example_id``, ``label``, ``pred``, ``prob``, ``ink``.
    """
    frame = test_set(spec)
    y = frame["label"].to_numpy()
    n, c = len(y), spec.n_classes
    rng = np.random.default_rng(1000 + seed)
    wrong = rng.random(n) < spec.base_error
    pred = np.where(wrong, (y + rng.integers(1, c, n)) % c, y)
    if method is not None:
        strength = float(level) if _is_number(level) else 0.5
        scale = spec.bias * strength * (0.25 if "+" in method else 1.0)
        crng = np.random.default_rng(zlib.crc32(f"{seed}/{method}/{level}".encode()))
        victim = (y == spec.victim_class) | (frame["ink"].to_numpy() == 1) & (y % 2 == 1)
        flip = victim & (crng.random(n) < scale)
        pred = np.where(flip, spec.cannibal_class, pred)
        noise = crng.random(n) < 0.02 * strength
        pred = np.where(noise, (y + crng.integers(1, c, n)) % c, pred)
    frame["pred"] = pred.astype(np.int64)
    frame["prob"] = np.where(frame["pred"] == y, 0.9, 0.55)
    return frame[["example_id", "label", "pred", "prob", "ink"]]


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def _rates(frame: pd.DataFrame, n_classes: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    y, p = frame["label"].to_numpy(), frame["pred"].to_numpy()
    rows = []
    for k in range(n_classes):
        tp = int(((y == k) & (p == k)).sum())
        fp = int(((y != k) & (p == k)).sum())
        fn = int(((y == k) & (p != k)).sum())
        tn = len(y) - tp - fp - fn
        rows.append({"class": k, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
    per_class = pd.DataFrame(rows)
    per_group = frame.assign(correct=(y == p)).groupby("ink", as_index=False)["correct"].mean()
    return per_class, per_group


def log_model_run(
    client: MlflowClient,
    experiment_id: str,
    spec: SyntheticStudy,
    predictions: pd.DataFrame,
    tags: dict[str, str],
    *,
    with_model_dir: bool = False,
) -> str:
    """Log one finished model run with the contract's artifacts.

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    spec : SyntheticStudy
    predictions : pandas.DataFrame
    tags : dict of str to str
        Lineage tags.
    with_model_dir : bool
        Also log a ``model/`` directory with a placeholder ``model_spec.json``
        (no weights), so similarity is reported as unavailable.

    Returns
    -------
    str
        The run id.
    """
    run = client.create_run(experiment_id, tags={T.RUN_KIND: "model", **tags})
    rid = run.info.run_id
    acc = float((predictions["label"] == predictions["pred"]).mean())
    client.log_metric(rid, "acc", acc)
    per_class, per_group = _rates(predictions, spec.n_classes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictions.to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "rates").mkdir()
        per_class.to_parquet(tmp / "rates" / "per_class.parquet", index=False)
        per_group.to_parquet(tmp / "rates" / "per_group.parquet", index=False)
        (tmp / "study.yaml").write_text(yaml.safe_dump(spec.study_file()))
        client.log_artifact(rid, str(tmp / "predictions.parquet"))
        client.log_artifact(rid, str(tmp / "study.yaml"))
        client.log_artifacts(rid, str(tmp / "rates"), "rates")
    client.set_terminated(rid, "FINISHED")
    return rid


def register_synthetic_study(
    client: MlflowClient,
    spec: SyntheticStudy,
    *,
    seeds: Sequence[int] | None = None,
    methods: dict[str, list[str]] | None = None,
    baseline_versions: dict[int, str] | None = None,
    artifact_location: str | None = None,
) -> dict[tuple[int, str, str], str]:
    """Log and register a synthetic study's models (or some of them).

    Parameters
    ----------
    client : MlflowClient
    spec : SyntheticStudy
    seeds : sequence of int, optional
        Default ``range(spec.seeds)``.
    methods : dict, optional
        Compressed methods and levels to register (default ``spec.methods``);
        pass ``{}`` to register baselines only.
    baseline_versions : dict of int to str, optional
        Existing baseline version per seed; baselines are registered for the
        seeds missing from it.

    Returns
    -------
    dict
        ``(seed, method, level) -> version`` (``("baseline", "none")`` for
        baselines).
    """
    name = spec.registered_model
    exp_name = f"compbias/{spec.name}"
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(exp_name, artifact_location=artifact_location)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    out: dict[tuple[int, str, str], str] = {}
    seeds = list(range(spec.seeds)) if seeds is None else list(seeds)
    methods = spec.methods if methods is None else methods
    baseline_versions = dict(baseline_versions or {})
    for seed in seeds:
        common = {T.STUDY: spec.name, T.SEED: str(seed)}
        if seed not in baseline_versions:
            btags = {**common, T.ROLE: T.ROLE_BASELINE, T.METHOD: "none", T.LEVEL: "none"}
            rid = log_model_run(client, exp_id, spec, make_predictions(spec, seed), btags)
            mv = client.create_model_version(name, f"runs:/{rid}/model", run_id=rid, tags=btags)
            baseline_versions[seed] = str(mv.version)
            out[(seed, "baseline", "none")] = str(mv.version)
        for method, levels in methods.items():
            for level in levels:
                ctags = {**common, T.ROLE: T.ROLE_COMPRESSED, T.METHOD: method, T.LEVEL: str(level), T.BASELINE_VERSION: baseline_versions[seed]}
                rid = log_model_run(client, exp_id, spec, make_predictions(spec, seed, method, str(level)), ctags)
                mv = client.create_model_version(name, f"runs:/{rid}/model", run_id=rid, tags=ctags)
                out[(seed, method, str(level))] = str(mv.version)
    return out
