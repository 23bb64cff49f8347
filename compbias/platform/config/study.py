"""The whole study: its sections, cross-section checks, derived names and fingerprints."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import Field, field_validator, model_serializer, model_validator

from ._base import NAME_PATTERN, Strict, format_level
from .compression import CompressionSpec
from .sections import BaselineSpec, DatasetSpec, ModelSpec, PopulationSpec, TrainSpec
from .settings import AuditSpec, MlflowSpec, ResourcesSpec

__all__ = ["StudySpec"]


class StudySpec(Strict):
    """A whole study: data, model, training, population, compression, resources, tracking, audit."""

    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    baseline: BaselineSpec | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    population: PopulationSpec = Field(default_factory=PopulationSpec)
    compression: list[CompressionSpec]
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)

    @field_validator("compression", mode="before")
    @classmethod
    def _some_compression(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError(
                "the list of compression methods is empty; give at least one entry, "
                "e.g. [{method: magnitude, levels: [0.5, 0.9]}]"
            )
        return v

    @model_validator(mode="after")
    def _unique_methods(self) -> "StudySpec":
        seen: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(self.compression):
            for lv in entry.levels:
                key = (entry.name, format_level(lv))
                if key in seen:
                    raise ValueError(
                        f"compression[{i}]: repeats method {entry.name!r} at level {key[1]} "
                        f"(already in compression[{seen[key]}]); each (method, level) may appear once"
                    )
                seen[key] = i
        if self.baseline is not None:
            seeds = self.population.seed_list()
            value = self.baseline.weights if self.baseline.weights is not None else self.baseline.model_uri
            key = f"baseline.{self.baseline.kind}"
            if isinstance(value, list) and len(value) != len(seeds):
                raise ValueError(f"{key}: {len(value)} entries for {len(seeds)} seeds {seeds}; give one per seed, in the order of population.seeds")
            if isinstance(value, str) and "{seed}" not in value and len(seeds) > 1:
                raise ValueError(
                    f"{key}: one baseline for {len(seeds)} seeds; give one per seed (a list, or a path with {{seed}} in it), "
                    "or population.seeds: 1"
                )
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        if data.get("baseline") is None:
            data.pop("baseline", None)  # studies that train their baselines resolve as before
        return data

    # -- derived values -------------------------------------------------
    @property
    def experiment_name(self) -> str:
        """The MLflow experiment: ``mlflow.experiment`` or ``compbias/<name>``."""
        return self.mlflow.experiment or f"compbias/{self.name}"

    @property
    def registered_model_name(self) -> str:
        """The registered model: ``mlflow.registered_model`` or ``compbias-<name>``."""
        return self.mlflow.registered_model or f"compbias-{self.name}"

    def seeds(self) -> list[int]:
        """The population's seeds.

        Returns
        -------
        list of int
        """
        return self.population.seed_list()

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as plain JSON-able data.

        Returns
        -------
        dict
        """
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved config as YAML text (what is logged as ``study.yaml``).

        Returns
        -------
        str
        """
        return yaml.safe_dump(self.resolved(), sort_keys=False)

    def model_fingerprint(self, compression_index: int | None) -> str:
        """A short hash of everything that determines one model besides its seed and level.

        Used to refuse resuming a study whose file changed in a way that would
        make already-trained models stale.

        Parameters
        ----------
        compression_index : int or None
            Index into ``compression`` for compressed models, ``None`` for baselines.

        Returns
        -------
        str
            12 hex digits.
        """
        data = self.resolved()
        part = {
            "dataset": {k: v for k, v in data["dataset"].items() if k not in ("root", "allow_download", "in_memory")},
            "model": data["model"],
            "train": data["train"],
        }
        if data.get("baseline") is not None:
            part["baseline"] = data["baseline"]  # given baselines: the source is what determines the model
        if compression_index is not None:
            c = dict(data["compression"][compression_index])
            c.pop("levels")
            part["compression"] = c
        blob = json.dumps(part, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def with_overrides(self, *, data_root: str | None = None, seeds: list[int] | int | None = None) -> "StudySpec":
        """A copy with command-line overrides applied and validated.

        Parameters
        ----------
        data_root : str, optional
            Replaces ``dataset.root``.
        seeds : int or list of int, optional
            Replaces ``population.seeds``.

        Returns
        -------
        StudySpec
        """
        from .loading import parse_study  # the loader builds on this model

        data = self.resolved()
        if data_root:
            data["dataset"]["root"] = data_root
        if seeds is not None:
            data["population"]["seeds"] = seeds
        return parse_study(data, source="command-line overrides")
