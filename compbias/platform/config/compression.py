"""A compression entry: one method at several levels, its schedule, fine-tuning and mitigation."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from compbias.jobs.vocabulary import (
    BYO_METHODS, FINETUNE_DEFAULTS, METHOD_OPTIONS, METHODS, MITIGATIONS, PRUNING_METHODS, SCHEDULES, check_level,
)

from ._base import IMPORT_PATH, Strict, format_level
from .sections import TrainSpec

__all__ = ["CompressionSpec"]


class CompressionSpec(Strict):
    """One compression method applied at several levels.

    ``levels`` are sparsities in (0, 1) for pruning (``magnitude``,
    ``structured``) and names in ``fp16 | bf16 | int8_weight | int8_static``
    for ``quantize`` (the rule of every method:
    :func:`compbias.jobs.vocabulary.check_level`). ``mitigation`` (pruning
    only) adds distillation from the baseline (``kd``, ``at``, ``pkt``,
    ``at_kd``, ``pkt_kd``) or the performance-weighted loss (``pw``) to
    fine-tuning. Unset, ``schedule`` and ``finetune_epochs`` of
    ``magnitude``/``structured`` resolve to ``FINETUNE_DEFAULTS`` (``gradual``,
    3 epochs); the other methods do not fine-tune unless told (0).
    ``finetune_lr`` sets the learning rate of that fine-tuning (and of a
    ``scratch`` schedule's training); unset, ``FINETUNE_DEFAULTS['lr']`` (0.01,
    ``compress_model``'s ``lr``) applies and the study's fingerprint is what it
    was without it.
    """

    method: Literal[METHODS]
    schedule: Literal[SCHEDULES] | None = None
    levels: list[Union[float, str]]
    finetune_epochs: int = Field(default=0, ge=0)
    finetune_lr: float | None = Field(default=None, gt=0.0)
    mitigation: Literal[MITIGATIONS] | None = None
    function: str | None = None
    options: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        for key in ("function", "options", "finetune_lr"):
            if data.get(key) is None:
                data.pop(key, None)  # built-in methods resolve (and fingerprint) as before
        return data

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill the pruning schedule and fine-tuning epochs the entry leaves unset (or null)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("method") in PRUNING_METHODS:
            if data.get("schedule") is None:
                data["schedule"] = FINETUNE_DEFAULTS["schedule"]
            if data.get("finetune_epochs") is None:
                data["finetune_epochs"] = FINETUNE_DEFAULTS["epochs"]
        elif "finetune_epochs" in data and data["finetune_epochs"] is None:
            del data["finetune_epochs"]  # the field's default: no fine-tuning
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
    def _check(self) -> "CompressionSpec":
        m = self.method
        if m != "custom" and self.function is not None:
            raise ValueError(f"function: 'function' applies to method custom only; remove it from the {m} entry")
        if not METHOD_OPTIONS.get(m) and self.options is not None:
            with_options = [name for name, allowed in METHOD_OPTIONS.items() if allowed]
            raise ValueError(f"options: method {m} takes no options; options apply to {', '.join(with_options)}")
        if m in BYO_METHODS:
            self._check_byo()
        else:
            self._check_levels()
            if m not in PRUNING_METHODS:  # quantize
                if self.schedule is not None:
                    raise ValueError("schedule: 'schedule' applies to pruning only; remove it from the quantize entry")
                if self.mitigation is not None:
                    raise ValueError("mitigation: 'mitigation' applies to pruning only; remove it from the quantize entry")
                if self.finetune_epochs != 0:
                    raise ValueError("finetune_epochs: 'finetune_epochs' applies to pruning only; post-training quantization does not fine-tune")
        if self.finetune_lr is not None and not self.finetune_epochs and self.schedule != "scratch":
            raise ValueError(
                f"finetune_lr: the {m} entry does not fine-tune (finetune_epochs is {self.finetune_epochs}); "
                "give finetune_epochs >= 1 with it, or remove it"
            )
        keys = [format_level(x) for x in self.levels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"levels: duplicates in {keys}; list each level once")
        return self

    def _check_levels(self) -> None:
        for i, lv in enumerate(self.levels):
            try:
                check_level(self.method, lv)
            except ValueError as exc:
                raise ValueError(f"levels[{i}]: {exc}") from None

    def _check_byo(self) -> None:
        m = self.method
        if self.schedule is not None:
            raise ValueError(f"schedule: 'schedule' applies to magnitude and structured; {m} prunes or quantizes at once, remove it")
        if m in ("torch_pruning", "torch_prune"):
            self._check_levels()
            if self.mitigation is not None and not self.finetune_epochs:
                raise ValueError("mitigation: a mitigation changes fine-tuning; give finetune_epochs >= 1 with it")
            self._check_options()
            return
        if self.mitigation is not None:
            raise ValueError(f"mitigation: 'mitigation' applies to pruning; remove it from the {m} entry")
        if self.finetune_epochs != 0:
            raise ValueError(f"finetune_epochs: {m} does not fine-tune (a custom function may train on its own); remove it")
        if m == "custom":
            if not self.function:
                raise ValueError("function: method custom needs 'function: package.module:function', called as function(model, bundle, level, seed)")
            if not IMPORT_PATH.match(self.function):
                raise ValueError(f"function: {self.function!r} is not an import path; write 'package.module:function'")
        self._check_levels()

    def _check_options(self) -> None:
        allowed = METHOD_OPTIONS[self.method]
        for key, value in (self.options or {}).items():
            if key not in allowed:
                raise ValueError(f"options.{key}: unknown {self.method} option; allowed: {', '.join(allowed)}")
            kind = allowed[key]
            if isinstance(kind, tuple) and value not in kind:
                raise ValueError(f"options.{key}: {value!r} is not one of {', '.join(kind)}")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"options.{key}: give true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"options.{key}: give a positive integer, got {value!r}")

    @property
    def name(self) -> str:
        """The method name used in tags and metric keys: ``<method>`` or ``<method>+<mitigation>``."""
        return self.method if self.mitigation is None else f"{self.method}+{self.mitigation}"

    def job_options(self, train: TrainSpec) -> dict[str, Any]:
        """Keyword arguments of :func:`compbias.jobs.compress_model` for this entry.

        Parameters
        ----------
        train : TrainSpec
            The study's training settings: batch size, momentum and weight
            decay of fine-tuning, and the epochs of a ``scratch`` schedule.

        Returns
        -------
        dict
            ``schedule``, ``mitigation``, ``finetune_epochs``, ``epochs``,
            ``batch_size``, ``momentum``, ``weight_decay``, ``function``,
            ``options``, and ``lr`` when ``finetune_lr`` is set (unset, the
            job's default is ``FINETUNE_DEFAULTS['lr']``).
        """
        out: dict[str, Any] = dict(
            schedule=self.schedule, mitigation=self.mitigation, finetune_epochs=self.finetune_epochs,
            epochs=train.epochs if self.schedule == "scratch" else None,
            batch_size=train.batch_size, momentum=train.momentum, weight_decay=train.weight_decay,
            function=self.function, options=self.options,
        )
        if self.finetune_lr is not None:
            out["lr"] = self.finetune_lr
        return out
