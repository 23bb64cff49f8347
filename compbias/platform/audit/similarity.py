"""SVCCA and linear CKA between each compressed version and its baseline.

For every audited compressed version whose lineage names a baseline version
("Simon Says", section 4): both models are loaded from their safetensors
weights (:func:`compbias.jobs.load_model`; nothing is unpickled), run on a
probe set drawn (seeded) from the test split of the dataset the run's
``study.yaml`` describes (:class:`~compbias.platform.audit.studyfile.TestSplit`,
loaded once per audit), and each
block's output and the logits are compared (:func:`compbias.jobs.layer_activations`,
:func:`compbias.metrics.svcca`, :func:`compbias.metrics.linear_cka`).  Across
versions, CEV is correlated with the SVCCA distance at each layer (Fig. 5 and
Table 3 of the paper).

Whatever cannot be computed (no weights, no dataset) is reported in the
audit's notes; it never changes a version's verdict.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import compbias.metrics as M
from compbias.platform.audit.compute import key_part, pop_key
from compbias.platform.audit.population import StudyData
from compbias.platform.audit.selection import VersionRecord
from compbias.platform.audit.settings import AuditSettings
from compbias.platform.audit.studyfile import TestSplit


@dataclass
class SimilarityResult:
    """SVCCA/CKA results to merge into an audit."""

    metrics: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    plots: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    per_version: dict = field(default_factory=dict)


class ModelLoader:
    """Download a version's saved model (``model_spec.json`` + ``weights.safetensors``) and rebuild it.

    Parameters
    ----------
    cache_dir : path or None
        Model files are kept under ``<cache_dir>/models/<name>/<version>``.
    client : MlflowClient, optional
        The store to download from (its tracking and registry URIs); default:
        MLflow's current URIs (read, not set).
    """

    def __init__(self, cache_dir: Path | None, client=None):
        self.cache_dir = Path(cache_dir) / "models" if cache_dir is not None else None
        self.client = client
        self._tmp: list[str] = []

    def directory(self, record: VersionRecord) -> Path:
        """Local directory holding the version's weights and spec.

        Raises
        ------
        FileNotFoundError
            When the version's artifacts hold no ``model_spec.json``.
        """
        import mlflow

        if self.cache_dir is not None:
            cached = self.cache_dir / record.name / record.version
            if (cached / "model_spec.json").is_file():
                return cached
        tmp = tempfile.mkdtemp(prefix="compbias-model-")
        self._tmp.append(tmp)
        if self.client is None:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{record.name}/{record.version}", dst_path=tmp))
        else:  # through the client: MLflow's models:/ repository would look the version up in the process's registry
            from compbias.platform.tracking import download_version

            local = download_version(self.client, record.name, record.version, tmp)
        hits = sorted(p.parent for p in local.rglob("model_spec.json") if "code" not in p.relative_to(local).parts)
        if not hits:
            raise FileNotFoundError(f"version {record.key} has no saved weights (no model_spec.json in its model artifacts)")
        found = hits[0]
        if self.cache_dir is None:
            return found
        cached = self.cache_dir / record.name / record.version
        if cached.exists():
            shutil.rmtree(cached, ignore_errors=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        for f in ("model_spec.json", "weights.safetensors"):
            if (found / f).is_file():
                shutil.copy2(found / f, staging / f)
        os.replace(staging, cached)
        return cached

    def load(self, record: VersionRecord):
        """Rebuild the version's torch model (eval mode, CPU)."""
        from compbias.jobs import load_model

        return load_model(self.directory(record))

    def cleanup(self) -> None:
        """Remove temporary downloads."""
        for t in self._tmp:
            shutil.rmtree(t, ignore_errors=True)
        self._tmp.clear()


def probe_inputs(split: TestSplit, size: int, seed: int) -> np.ndarray:
    """Draw the probe set: ``size`` test inputs chosen with a seeded generator.

    Parameters
    ----------
    split : TestSplit
        The study's test split (loaded once per audit).
    size : int
    seed : int

    Returns
    -------
    numpy.ndarray of shape (size, C, H, W)
    """
    bundle = split.bundle()
    n = len(bundle.test)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    import torch

    x, _ = bundle.test.batch(torch.as_tensor(idx))
    return x.numpy()


def compare_activations(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[dict]:
    """SVCCA and linear CKA between two models' activations, layer by layer.

    Parameters
    ----------
    a, b : dict of str to numpy.ndarray
        Layer name -> ``(N, C, H, W)`` maps or ``(N, K)`` logits, same probe.

    Returns
    -------
    list of dict
        ``layer``, ``svcca_similarity``, ``svcca_distance``, ``cka``.
    """
    rows = []
    for layer in a:
        if layer not in b:
            continue
        x, y = np.asarray(a[layer], np.float64), np.asarray(b[layer], np.float64)
        sx, sy = (x, y) if x.ndim == 4 else (x.T, y.T)
        try:
            res = M.svcca(sx, sy)
            sim, dist = float(res.similarity), float(res.distance)
        except ValueError:
            sim = dist = float("nan")
        try:
            cka = float(M.linear_cka(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)))
        except ValueError:
            cka = float("nan")
        rows.append({"layer": layer, "svcca_similarity": sim, "svcca_distance": dist, "cka": cka})
    return rows


def study_similarity(client, data: StudyData, targets: list[VersionRecord], settings: AuditSettings,
                     split: TestSplit, cache, models_table: pd.DataFrame | None = None) -> SimilarityResult:
    """SVCCA/CKA of each audited compressed version against its own baseline.

    Parameters
    ----------
    client : MlflowClient
    data : StudyData
    targets : list of VersionRecord
    settings : AuditSettings
        ``probe_size`` and ``seed``.
    split : TestSplit
        The study's test split; the probe set is drawn from it.
    cache : ArtifactFetcher
        Its cache directory keeps downloaded model files.
    models_table : pandas.DataFrame, optional
        The audit's per-model table (for the CEV of each version).

    Returns
    -------
    SimilarityResult
    """
    out = SimilarityResult()
    comp = [r for r in targets if not r.is_baseline and data.population_of(r) is not None]
    if not comp:
        return out
    try:
        from compbias.jobs import layer_activations  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        out.notes.append(f"SVCCA/CKA left out: compbias.jobs is not importable ({exc})")
        return out
    base_by_version = {r.version: r for r in data.baseline.records}
    loader = ModelLoader(getattr(cache, "cache_dir", None), client)
    try:
        try:
            probe = probe_inputs(split, settings.probe_size, settings.seed)
        except Exception as exc:
            out.notes.append(f"SVCCA/CKA left out: the probe set could not be loaded ({type(exc).__name__}: {exc})")
            return out
        from compbias.jobs import layer_activations

        acts_cache: dict[str, dict | Exception] = {}

        def acts(rec: VersionRecord):
            if rec.key not in acts_cache:  # a failure is remembered too: a baseline is loaded once
                try:
                    acts_cache[rec.key] = layer_activations(loader.load(rec), probe)
                except Exception as exc:
                    acts_cache[rec.key] = exc
            got = acts_cache[rec.key]
            if isinstance(got, Exception):
                raise got
            return got

        rows, skipped = [], []
        for r in comp:
            base = base_by_version.get(r.baseline_version or "")
            if base is None:
                skipped.append(f"{r.key} (its baseline version {r.baseline_version} is not in the baseline population)")
                continue
            try:
                pairs = compare_activations(acts(base), acts(r))
            except Exception as exc:
                skipped.append(f"{r.key} ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            for p in pairs:
                rows.append({"version": r.key, "baseline_version": base.key, "method": r.method, "level": r.level, "seed": r.seed, **p})
        if skipped:
            out.notes.append("SVCCA/CKA not computed for: " + "; ".join(skipped))
        if not rows:
            return out
        table = pd.DataFrame(rows)
        # each version's CEV against its own baseline (the one SVCCA compares it with), else against the baseline mean
        cols = [c for c in ("cev_paired", "cev") if models_table is not None and c in models_table]
        if cols:
            table = table.merge(models_table[["version", *cols]], on="version", how="left")
            if "cev_paired" in table:
                table["cev"] = table["cev_paired"].astype(float).where(table["cev_paired"].notna(), table.get("cev"))
        else:
            table["cev"] = np.nan
        out.tables["similarity"] = table
        for (method, level, layer), part in table.groupby(["method", "level", "layer"], sort=False):
            pk = pop_key(method, level)
            out.metrics[f"svcca/{pk}/{key_part(layer)}"] = float(np.nanmean(part["svcca_distance"]))
            out.metrics[f"cka/{pk}/{key_part(layer)}"] = float(np.nanmean(part["cka"]))
        corr_rows = []
        for layer, part in table.groupby("layer", sort=False):
            ok = part[np.isfinite(part["svcca_distance"].astype(float)) & np.isfinite(part["cev"].astype(float))]
            if len(ok) >= 3 and ok["svcca_distance"].nunique() > 1 and ok["cev"].nunique() > 1:
                r, p = stats.pearsonr(ok["svcca_distance"].astype(float), ok["cev"].astype(float))
                # versions that share a baseline are not independent: the interval resamples baselines (seeds)
                cc = M.pearson_cluster_ci(ok["svcca_distance"].astype(float), ok["cev"].astype(float),
                                          ok["baseline_version"].astype(str), n_resamples=max(settings.bootstrap, 200),
                                          confidence=settings.confidence, seed=settings.seed)
                out.metrics[f"svcca/cev_corr/{key_part(layer)}"] = float(r)
                corr_rows.append({"layer": layer, "n_versions": len(ok), "n_baselines": cc.n_clusters,
                                  "pearson_r": float(r), "ci_low": cc.ci_low, "ci_high": cc.ci_high,
                                  "p_value_versions_independent": float(p)})
        out.tables["similarity_cev_correlation"] = pd.DataFrame(corr_rows)
        for key, part in table.groupby("version"):
            logits = part[part["layer"] == "logits"]
            if len(logits):
                out.per_version[key] = {"svcca_distance_logits": float(logits["svcca_distance"].iloc[0])}
        return out
    finally:
        loader.cleanup()
