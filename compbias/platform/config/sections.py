"""The sections that say what is trained: the dataset, the model, given baselines, training, the population."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from compbias.jobs.vocabulary import ARCHS, DATASET_KINDS, TRAIN_DEFAULTS

from ._base import IMPORT_PATH, Strict

__all__ = ["BaselineSpec", "DatasetSpec", "ImbalanceSpec", "ModelSpec", "PopulationSpec", "TrainSpec"]


class ImbalanceSpec(Strict):
    """Induced imbalance in the training split.

    Either ``classes`` (keep a fraction ``keep`` of these classes, the biased
    CIFAR of "Simon Says") or ``group`` (keep a fraction of the training
    examples whose group attributes equal the given values), not both.
    """

    classes: list[int] | None = None
    group: dict[str, int] | None = None
    keep: float = Field(gt=0.0, le=1.0, description="fraction of the chosen examples kept")

    @model_validator(mode="after")
    def _one_of(self) -> "ImbalanceSpec":
        if (self.classes is None) == (self.group is None):
            raise ValueError("give exactly one of 'classes' (a list of class ids) or 'group' (a mapping attribute: value)")
        if self.classes is not None and (not self.classes or min(self.classes) < 0):
            raise ValueError("'classes' must be a non-empty list of class ids >= 0")
        if self.group is not None and not self.group:
            raise ValueError("'group' must name at least one attribute, e.g. {Male: 1}")
        return self


class DatasetSpec(Strict):
    """Which data, which label, which groups; see ``compbias.jobs.load_dataset``.

    ``in_memory`` (image files only) holds the decoded images in memory
    (``true``) or decodes each batch from the files (``false``); unset, the
    loader decides from the memory available. It changes where the images
    are, not what is trained: it is not serialized when unset and never part
    of a model's fingerprint.
    """

    kind: Literal[DATASET_KINDS] = "digits"
    root: str | None = None
    target: str | None = None
    groups: list[str] | None = None
    attributes_csv: str | None = None
    positive_class: int | str | None = None
    image_size: int | None = Field(default=None, gt=0)
    test_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    split_seed: int = Field(default=0, ge=0)
    max_train: int | None = Field(default=None, gt=0)
    max_test: int | None = Field(default=None, gt=0)
    imbalance: ImbalanceSpec | list[ImbalanceSpec] | None = None
    allow_download: bool = False
    in_memory: bool | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        if data.get("in_memory") is None:
            data.pop("in_memory", None)  # studies without it resolve (and fingerprint) as before
        return data

    @model_validator(mode="after")
    def _kind_needs(self) -> "DatasetSpec":
        if self.kind == "celeba" and not self.target:
            raise ValueError("kind 'celeba' needs 'target': the attribute used as the label, e.g. Blond_Hair")
        if self.kind != "celeba" and self.target is not None:
            raise ValueError(f"'target' is only used with kind 'celeba', not {self.kind!r}; remove it")
        if self.attributes_csv is not None and self.kind != "imagefolder":
            raise ValueError("'attributes_csv' is only used with kind 'imagefolder'; remove it")
        if self.groups is not None and len(set(self.groups)) != len(self.groups):
            raise ValueError(f"'groups' has duplicates: {self.groups}")
        if isinstance(self.imbalance, list):
            if not self.imbalance:
                raise ValueError("'imbalance' is an empty list: remove it or give entries like {classes: [3], keep: 0.1}")
            named = [c for entry in self.imbalance for c in entry.classes or []]
            if len(set(named)) != len(named):
                raise ValueError(f"'imbalance' names a class in two entries ({named}); give each class one keep fraction")
        return self

    def loader_options(self) -> dict[str, Any]:
        """Keyword arguments for ``compbias.jobs.load_dataset`` (everything but ``kind``).

        Returns
        -------
        dict
            The dataset section without ``kind``, with ``imbalance`` as a plain dict.
        """
        opts = self.model_dump(mode="json", exclude={"kind"})
        return opts


class ModelSpec(Strict):
    """The architecture: a built-in one with its width multiplier, or any ``nn.Module`` factory.

    ``arch`` is a built-in name (``smallcnn``, ``resnet20``, ``resnet32``,
    ``resnet18``) or the import path ``package.module:callable`` of a
    factory returning an ``nn.Module`` (also accepted as ``factory:``), called
    with ``kwargs``; its model must output ``(N, n_classes)`` logits on the
    dataset's inputs (checked on one batch before training). ``blocks`` names
    a factory model's stages (for the ``at``/``pkt`` mitigations and SVCCA).
    The whole section may be written as a string: ``model: resnet20`` or
    ``model: "mypkg.nets:tiny"``.
    """

    arch: str = "smallcnn"
    width: int = Field(default=1, ge=1, le=16)
    kwargs: dict[str, Any] | None = None
    blocks: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"arch": v}
        if isinstance(v, dict) and "factory" in v:
            v = dict(v)
            factory = v.pop("factory")
            if "arch" in v and v["arch"] != factory:
                raise ValueError("give either 'arch' (a built-in architecture) or 'factory' (an import path), not both")
            v["arch"] = factory
        return v

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.is_factory:
            if not IMPORT_PATH.match(self.arch):
                raise ValueError(f"arch: {self.arch!r} is not an import path; write 'package.module:callable', e.g. 'torchvision.models:resnet18'")
            if self.width != 1:
                raise ValueError("width: 'width' applies to the built-in architectures; pass a factory's own arguments in 'kwargs'")
            if self.blocks is not None and (not self.blocks or len(set(self.blocks)) != len(self.blocks)):
                raise ValueError(f"blocks: give distinct submodule names, e.g. [layer1, layer2] (got {self.blocks})")
        else:
            if self.arch not in ARCHS:
                raise ValueError(
                    f"arch: unknown architecture {self.arch!r}; use one of {', '.join(ARCHS)}, or the import path of an "
                    "nn.Module factory such as 'torchvision.models:resnet18' (with kwargs)"
                )
            if self.kwargs is not None or self.blocks is not None:
                raise ValueError(f"'kwargs' and 'blocks' apply to a factory import path, not to the built-in {self.arch!r}; remove them")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        for key in ("kwargs", "blocks"):
            if data.get(key) is None:
                data.pop(key, None)  # studies without a factory resolve (and fingerprint) as before
        return data

    @property
    def is_factory(self) -> bool:
        """Whether ``arch`` is an import path (``package.module:callable``) rather than a built-in."""
        return ":" in self.arch


class BaselineSpec(Strict):
    """Baselines given instead of trained: safetensors weights or registered MLflow versions.

    Exactly one of ``weights`` and ``model_uri``. Each is one entry per seed:
    a list in the order of ``population.seeds``, or one string with
    ``{seed}`` in it (``runs/s{seed}.safetensors``, ``models:/net/{seed}``); a
    plain string serves a population of one seed. The weights must fit the
    module ``model:`` builds (keys and shapes are checked, with a clear error).
    A ``model_uri`` must hold a ``weights.safetensors`` (a compbias-logged
    model, or an MLflow artifact folder holding one): pickled models are not
    loaded.
    """

    weights: str | list[str] | None = None
    model_uri: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "BaselineSpec":
        if (self.weights is None) == (self.model_uri is None):
            raise ValueError("give exactly one of 'weights' (safetensors files) or 'model_uri' (e.g. models:/name/3)")
        value = self.weights if self.weights is not None else self.model_uri
        if isinstance(value, list) and (not value or not all(isinstance(x, str) and x for x in value)):
            raise ValueError("give one non-empty path or URI per seed")
        return self

    @property
    def kind(self) -> str:
        """``weights`` or ``model_uri``."""
        return "weights" if self.weights is not None else "model_uri"

    def source_for(self, seed: int, seeds: list[int]) -> str:
        """The file or URI of the baseline of ``seed``.

        Parameters
        ----------
        seed : int
        seeds : list of int
            The population's seeds (a list entry is matched by position).

        Returns
        -------
        str
        """
        value = self.weights if self.weights is not None else self.model_uri
        if isinstance(value, list):
            return value[seeds.index(seed)]
        return value.replace("{seed}", str(seed))


class TrainSpec(Strict):
    """Baseline training settings (SGD with momentum); defaults: ``compbias.jobs.vocabulary.TRAIN_DEFAULTS``."""

    epochs: int = Field(default=TRAIN_DEFAULTS["epochs"], ge=1)
    batch_size: int = Field(default=TRAIN_DEFAULTS["batch_size"], ge=1)
    lr: float = Field(default=TRAIN_DEFAULTS["lr"], gt=0.0)
    momentum: float = Field(default=TRAIN_DEFAULTS["momentum"], ge=0.0, lt=1.0)
    weight_decay: float = Field(default=TRAIN_DEFAULTS["weight_decay"], ge=0.0)


class PopulationSpec(Strict):
    """How many baseline models: ``seeds: n`` means seeds ``0..n-1``; a list is taken as is."""

    seeds: Union[Annotated[int, Field(ge=1)], list[Annotated[int, Field(ge=0)]]] = 3

    @field_validator("seeds", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if not isinstance(v, (int, list)):
            raise ValueError(f"seeds must be a positive int n (meaning seeds 0..n-1) or a list of ints >= 0, got {v!r}")
        if isinstance(v, list) and not all(isinstance(x, int) for x in v):
            raise ValueError(f"seeds must be a list of ints >= 0, got {v!r}")
        if isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
            raise ValueError("seeds must be a positive int n (seeds 0..n-1) or a list of ints >= 0, not a boolean")
        if isinstance(v, list):
            if not v:
                raise ValueError("the list of seeds is empty; give at least one seed, e.g. [0, 1, 2]")
            if any(isinstance(x, int) and x < 0 for x in v):
                raise ValueError(f"seeds must be >= 0, got {v}")
            if len(set(v)) != len(v):
                raise ValueError(f"seeds has duplicates: {v}")
        elif isinstance(v, int) and v < 1:
            raise ValueError(f"seeds as a count must be >= 1 (seeds 0..n-1), got {v}")
        return v

    def seed_list(self) -> list[int]:
        """The seeds, as a list.

        Returns
        -------
        list of int
        """
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

