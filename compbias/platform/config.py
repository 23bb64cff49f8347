"""The study file: schema, validation and defaults.

A study file is YAML (see ``configs/digits.yaml`` and ``docs/architecture.md``).
It is validated on load by :func:`load_study`; every default lives in the
pydantic models below and nowhere else (the CLI and the MLproject only pass
overrides through :meth:`StudySpec.with_overrides`).

Errors are raised as :class:`StudyConfigError`, whose message has one line per
problem naming the offending key (``compression[1].levels[0]``) and what is
allowed there.
"""

from __future__ import annotations

import hashlib
import re
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "StudyConfigError",
    "StudySpec",
    "DatasetSpec",
    "ImbalanceSpec",
    "ModelSpec",
    "BaselineSpec",
    "TrainSpec",
    "PopulationSpec",
    "CompressionSpec",
    "ResourcesSpec",
    "MlflowSpec",
    "AuditSpec",
    "ThresholdsSpec",
    "load_study",
    "parse_study",
    "format_level",
    "PRUNING_METHODS",
    "QUANT_LEVELS",
    "MITIGATIONS",
    "BYO_METHODS",
    "TORCHAO_LEVELS",
]

DATASET_KINDS = ("digits", "imagefolder", "celeba", "cifar10", "cifar100")
ARCHS = ("smallcnn", "resnet20", "resnet32", "resnet18")
PRUNING_METHODS = ("magnitude", "structured")
#: Bring-your-own compression (compbias.jobs.byo): the user's function, Torch-Pruning, torch.nn.utils.prune, torchao.
BYO_METHODS = ("custom", "torch_pruning", "torch_prune", "torchao")
METHODS = PRUNING_METHODS + ("quantize",) + BYO_METHODS
SCHEDULES = ("oneshot", "gradual", "scratch")
QUANT_LEVELS = ("fp16", "bf16", "int8_weight", "int8_static")
#: The same as compbias.jobs.torchao_quant.TORCHAO_LEVELS (checked by a test; config does not import torch).
TORCHAO_LEVELS = ("int8_weight_only", "int8_dynamic", "float8_weight_only", "int4_weight_only", "float8_dynamic")
#: Options of the methods that take some, with what each accepts (compbias.jobs.byo.METHOD_OPTIONS).
_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "torch_pruning": {"importance": ("l1", "l2", "random"), "global_pruning": bool, "round_to": int},
    "torch_prune": {"style": ("global_unstructured", "l1_unstructured", "random_unstructured", "ln_structured"), "n": int},
}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
MITIGATIONS = ("kd", "at", "pkt", "at_kd", "pkt_kd", "pw")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StudyConfigError(ValueError):
    """A study file that cannot be used; the message names each bad key.

    Parameters
    ----------
    problems : list of str
        One line per problem, ``"<key>: <what is wrong and what is allowed>"``.
    source : str, optional
        Where the config came from (a file path), prepended to the message.
    """

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid study file{where}:\n{lines}")


class _Strict(BaseModel):
    """Base for every section: unknown keys are refused, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ImbalanceSpec(_Strict):
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


class DatasetSpec(_Strict):
    """Which data, which label, which groups; see ``compbias.jobs.load_dataset``."""

    kind: Literal["digits", "imagefolder", "celeba", "cifar10", "cifar100"] = "digits"
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


class ModelSpec(_Strict):
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
            if not _IMPORT_PATH.match(self.arch):
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


class BaselineSpec(_Strict):
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


class TrainSpec(_Strict):
    """Baseline training settings (SGD with momentum)."""

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.05, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0005, ge=0.0)


class PopulationSpec(_Strict):
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


def format_level(level: Any) -> str:
    """The level as written in tags and metric keys (``0.9``, ``int8_static``).

    Parameters
    ----------
    level : float or str

    Returns
    -------
    str
    """
    if isinstance(level, float):
        return repr(level)
    return str(level)


class CompressionSpec(_Strict):
    """One compression method applied at several levels.

    ``levels`` are sparsities in (0, 1) for pruning (``magnitude``,
    ``structured``) and names in ``fp16 | bf16 | int8_weight | int8_static``
    for ``quantize``. ``mitigation`` (pruning only) adds distillation from the
    baseline (``kd``, ``at``, ``pkt``, ``at_kd``, ``pkt_kd``) or the
    performance-weighted loss (``pw``) to fine-tuning. ``finetune_lr`` sets
    the learning rate of that fine-tuning (and of a ``scratch`` schedule's
    training); unset, the jobs layer's default (``compress_model``'s ``lr``,
    0.01) applies and the study's fingerprint is what it was without it.
    """

    method: Literal["magnitude", "structured", "quantize", "custom", "torch_pruning", "torch_prune", "torchao"]
    schedule: Literal["oneshot", "gradual", "scratch"] | None = None
    levels: list[Union[float, str]]
    finetune_epochs: int | None = Field(default=None, ge=0)
    finetune_lr: float | None = Field(default=None, gt=0.0)
    mitigation: Literal["kd", "at", "pkt", "at_kd", "pkt_kd", "pw"] | None = None
    function: str | None = None
    options: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        for key in ("function", "options", "finetune_lr"):
            if data.get(key) is None:
                data.pop(key, None)  # built-in methods resolve (and fingerprint) as before
        return data

    @field_validator("levels", mode="before")
    @classmethod
    def _levels_nonempty(cls, v: Any) -> Any:
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v:
            raise ValueError("give at least one level, e.g. [0.5, 0.9] for pruning or [int8_weight] for quantize")
        return v

    @model_validator(mode="after")
    def _check_levels(self) -> "CompressionSpec":
        if self.method != "custom" and self.function is not None:
            raise ValueError(f"function: 'function' applies to method custom only; remove it from the {self.method} entry")
        if self.method not in _METHOD_OPTIONS and self.options is not None:
            raise ValueError(f"options: method {self.method} takes no options; options apply to {', '.join(_METHOD_OPTIONS)}")
        if self.method in BYO_METHODS:
            self._check_byo()
        elif self.method in PRUNING_METHODS:
            out = []
            for i, lv in enumerate(self.levels):
                if isinstance(lv, bool) or not isinstance(lv, (int, float)):
                    raise ValueError(f"levels[{i}]: {lv!r} is not a sparsity; pruning levels are numbers in (0, 1) such as 0.9")
                if not 0.0 < float(lv) < 1.0:
                    raise ValueError(f"levels[{i}]: sparsity {lv!r} is out of range; it must be > 0 and < 1 (0.95 keeps 5% of the weights)")
                out.append(float(lv))
            if self.schedule is None:
                object.__setattr__(self, "schedule", "gradual")
            if self.finetune_epochs is None:
                object.__setattr__(self, "finetune_epochs", 3)
            object.__setattr__(self, "levels", out)
        else:
            for i, lv in enumerate(self.levels):
                if lv not in QUANT_LEVELS:
                    raise ValueError(f"levels[{i}]: {lv!r} is not a quantization level; quantize levels are one of {', '.join(QUANT_LEVELS)}")
            if self.schedule is not None:
                raise ValueError("schedule: 'schedule' applies to pruning only; remove it from the quantize entry")
            if self.mitigation is not None:
                raise ValueError("mitigation: 'mitigation' applies to pruning only; remove it from the quantize entry")
            if self.finetune_epochs not in (None, 0):
                raise ValueError("finetune_epochs: 'finetune_epochs' applies to pruning only; post-training quantization does not fine-tune")
            object.__setattr__(self, "finetune_epochs", 0)
        if self.finetune_lr is not None and not self.finetune_epochs and self.schedule != "scratch":
            raise ValueError(
                f"finetune_lr: the {self.method} entry does not fine-tune (finetune_epochs is {self.finetune_epochs or 0}); "
                "give finetune_epochs >= 1 with it, or remove it"
            )
        keys = [format_level(x) for x in self.levels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"levels: duplicates in {keys}; list each level once")
        return self

    def _check_byo(self) -> None:
        m = self.method
        if self.schedule is not None:
            raise ValueError(f"schedule: 'schedule' applies to magnitude and structured; {m} prunes or quantizes at once, remove it")
        if m in ("torch_pruning", "torch_prune"):
            out = []
            for i, lv in enumerate(self.levels):
                if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0.0 < float(lv) < 1.0:
                    what = "a channel pruning ratio" if m == "torch_pruning" else "a sparsity"
                    raise ValueError(f"levels[{i}]: {lv!r} is not {what}; {m} levels are numbers in (0, 1) such as 0.5")
                out.append(float(lv))
            object.__setattr__(self, "levels", out)
            if self.finetune_epochs is None:
                object.__setattr__(self, "finetune_epochs", 0)
            if self.mitigation is not None and not self.finetune_epochs:
                raise ValueError("mitigation: a mitigation changes fine-tuning; give finetune_epochs >= 1 with it")
            allowed = _METHOD_OPTIONS[m]
            for key, value in (self.options or {}).items():
                if key not in allowed:
                    raise ValueError(f"options.{key}: unknown {m} option; allowed: {', '.join(allowed)}")
                kind = allowed[key]
                if isinstance(kind, tuple) and value not in kind:
                    raise ValueError(f"options.{key}: {value!r} is not one of {', '.join(kind)}")
                if kind is bool and not isinstance(value, bool):
                    raise ValueError(f"options.{key}: give true or false, got {value!r}")
                if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"options.{key}: give a positive integer, got {value!r}")
            return
        if self.mitigation is not None:
            raise ValueError(f"mitigation: 'mitigation' applies to pruning; remove it from the {m} entry")
        if self.finetune_epochs not in (None, 0):
            raise ValueError(f"finetune_epochs: {m} does not fine-tune (a custom function may train on its own); remove it")
        object.__setattr__(self, "finetune_epochs", 0)
        if m == "torchao":
            for i, lv in enumerate(self.levels):
                if lv not in TORCHAO_LEVELS:
                    raise ValueError(f"levels[{i}]: {lv!r} is not a torchao level; torchao levels are one of {', '.join(TORCHAO_LEVELS)}")
            return
        # custom
        if not self.function:
            raise ValueError("function: method custom needs 'function: package.module:function', called as function(model, bundle, level, seed)")
        if not _IMPORT_PATH.match(self.function):
            raise ValueError(f"function: {self.function!r} is not an import path; write 'package.module:function'")
        for i, lv in enumerate(self.levels):
            if isinstance(lv, bool) or not isinstance(lv, (int, float, str)) or lv == "":
                raise ValueError(f"levels[{i}]: {lv!r}; custom levels are numbers or names, passed to the function as written")

    @property
    def name(self) -> str:
        """The method name used in tags and metric keys: ``<method>`` or ``<method>+<mitigation>``."""
        return self.method if self.mitigation is None else f"{self.method}+{self.mitigation}"


class ResourcesSpec(_Strict):
    """What each Ray task asks for."""

    cpus_per_task: float = Field(default=1, gt=0)
    gpus_per_task: Union[Literal["auto"], Annotated[float, Field(ge=0)]] = "auto"
    max_retries: int = Field(default=3, ge=0)


class MlflowSpec(_Strict):
    """Where the study is recorded; ``None`` means the defaults derived from the study name."""

    experiment: str | None = None
    registered_model: str | None = None


class ThresholdsSpec(_Strict):
    """Audit pass/fail thresholds; ``None`` disables a check."""

    cev: float | None = Field(default=None, ge=0)
    sde: float | None = Field(default=None, ge=0)
    worst_group_fpr_change: float | None = None
    acc_drop: float | None = None


class GateSpec(_Strict):
    """The default gate, used when no threshold is set (docs/audit.md, "The default gate").

    A compressed population fails when, for some class or group value with
    at least ``audit.min_count`` test examples, the lower end of the two-level
    bootstrap interval of its *excess harm* (the cell's error-rate increase
    minus the overall one, in percentage points, each model against its own
    baseline: ``compbias.metrics.excess_harm``) lies above ``tolerance_pp``,
    or when the lower end of the interval of the overall error-rate increase
    lies above ``overall_tolerance_pp`` (compression costs everyone).
    """

    tolerance_pp: float = Field(default=2.0, ge=0)
    overall_tolerance_pp: float = Field(default=2.0, ge=0)


class AuditSpec(_Strict):
    """Settings read by the audit service (``compbias.platform.audit``)."""

    cie_fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=lambda: [0.01, 0.05, 0.1], min_length=1)
    bootstrap: int = Field(default=1000, ge=0)
    probe_size: int = Field(default=256, ge=1)
    thresholds: ThresholdsSpec = Field(default_factory=ThresholdsSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    #: The estimability rule: a rate (or gate cell) whose denominator has fewer examples is reported as
    #: "not estimable (n=7)", never as a number with a degenerate interval.
    min_count: int = Field(default=10, ge=1)
    #: Confidence intervals: ``two_level`` resamples models (seeds; each compressed model with its own
    #: baseline) and test examples; ``examples`` resamples test examples only, the models fixed.
    intervals: Literal["two_level", "examples"] = "two_level"
    alias: str = Field(default="audited", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")


class StudySpec(_Strict):
    """A whole study: data, model, training, population, compression, resources, tracking, audit."""

    name: str = Field(pattern=_NAME_PATTERN, max_length=100)
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
            "dataset": {k: v for k, v in data["dataset"].items() if k not in ("root", "allow_download")},
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
        data = self.resolved()
        if data_root:
            data["dataset"]["root"] = data_root
        if seeds is not None:
            data["population"]["seeds"] = seeds
        return parse_study(data, source="command-line overrides")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith(("function-", "union[", "literal[", "int", "float", "str", "list[")) or part in ("function-after", "function-before")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _allowed_keys(model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    return ", ".join(model.model_fields)


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "": StudySpec,
    "dataset": DatasetSpec,
    "dataset.imbalance": ImbalanceSpec,
    "model": ModelSpec,
    "baseline": BaselineSpec,
    "train": TrainSpec,
    "population": PopulationSpec,
    "compression[]": CompressionSpec,
    "resources": ResourcesSpec,
    "mlflow": MlflowSpec,
    "audit": AuditSpec,
    "audit.thresholds": ThresholdsSpec,
    "audit.gate": GateSpec,
}


def _section_of(loc: tuple) -> type[BaseModel] | None:
    parent = ""
    for part in loc[:-1]:
        if isinstance(part, int):
            parent += "[]"
        else:
            parent += ("." if parent else "") + str(part)
    return _SECTION_MODELS.get(parent)


def _problems(err: ValidationError) -> list[str]:
    problems: list[str] = []
    seen = set()
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        key = _loc(loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(_section_of(loc))
            msg = f"{key}: unknown key; allowed here: {allowed}"
        elif e["type"] == "missing":
            msg = f"{key}: required key is missing"
        else:
            text = e["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, "):]
                m = re.match(r"^([A-Za-z_][A-Za-z0-9_\[\]\.]*): (.*)$", text, re.S)
                if m:
                    sub, text = m.group(1), m.group(2)
                    key = sub if key == "<top level>" else f"{key}.{sub}"
            msg = f"{key}: {text} (got {e.get('input')!r})" if "got" not in text and not isinstance(e.get("input"), dict) else f"{key}: {text}"
        if msg not in seen:
            seen.add(msg)
            problems.append(msg)
    return problems


def parse_study(data: Any, *, source: str | None = None) -> StudySpec:
    """Validate a study given as plain data (the parsed YAML).

    Parameters
    ----------
    data : dict
        The parsed study file.
    source : str, optional
        Where it came from, for the error message.

    Returns
    -------
    StudySpec

    Raises
    ------
    StudyConfigError
        With one line per problem, naming the key and what is allowed.
    """
    if not isinstance(data, dict):
        raise StudyConfigError([f"<top level>: a study file is a YAML mapping with keys {_allowed_keys(StudySpec)}; got {type(data).__name__}"], source)
    try:
        return StudySpec.model_validate(data)
    except ValidationError as err:
        raise StudyConfigError(_problems(err), source) from None


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file.

    Parameters
    ----------
    path : str or Path
        A YAML file.

    Returns
    -------
    StudySpec

    Raises
    ------
    StudyConfigError
        When the file is missing, is not YAML, or does not validate.
    """
    p = Path(path)
    if not p.is_file():
        raise StudyConfigError([f"no such study file: {p} (give a path to a YAML file such as configs/digits.yaml)"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise StudyConfigError([f"not valid YAML: {exc}"], str(p)) from None
    return parse_study(data, source=str(p))
