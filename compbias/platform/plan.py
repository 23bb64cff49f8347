"""The plan of a study: one task per (seed, method, level).

Baseline tasks come first; every compressed task names the baseline task it
depends on (same seed). Nothing here touches Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from compbias.platform.config import StudySpec, format_level

__all__ = ["ModelTask", "plan_study", "BASELINE_METHOD", "BASELINE_LEVEL"]

BASELINE_METHOD = "baseline"
BASELINE_LEVEL = "0"


@dataclass(frozen=True)
class ModelTask:
    """One model to produce: a baseline (trained) or a compressed model (from its baseline).

    Attributes
    ----------
    seed : int
        The population member.
    method : str
        ``baseline`` or the compression method name (``magnitude``, ``structured+at_kd``, ``quantize``).
    level : str
        The level as written (``0.9``, ``int8_static``); ``0`` for baselines.
    compression_index : int or None
        Index of the entry in ``StudySpec.compression``; ``None`` for baselines.
    level_value : float or str or None
        The level as a number (pruning) or name (quantize); ``None`` for baselines.
    """

    seed: int
    method: str
    level: str
    compression_index: int | None = None
    level_value: float | str | None = None

    @property
    def role(self) -> str:
        """``baseline`` or ``compressed``."""
        return "baseline" if self.compression_index is None else "compressed"

    @property
    def key(self) -> tuple[int, str, str]:
        """``(seed, method, level)``: the identity of the model within its study."""
        return (self.seed, self.method, self.level)

    @property
    def baseline_key(self) -> tuple[int, str, str] | None:
        """The key of the baseline this task compresses, or ``None`` for a baseline."""
        if self.compression_index is None:
            return None
        return (self.seed, BASELINE_METHOD, BASELINE_LEVEL)

    @property
    def label(self) -> str:
        """A short human-readable name, also the MLflow run name."""
        if self.compression_index is None:
            return f"baseline-s{self.seed}"
        return f"{self.method}@{self.level}-s{self.seed}"


def plan_study(
    spec: StudySpec,
    *,
    roles: Iterable[str] = ("baseline", "compressed"),
    methods: Iterable[str] | None = None,
    levels: Iterable[str] | None = None,
) -> list[ModelTask]:
    """All model tasks of a study, baselines first.

    Parameters
    ----------
    spec : StudySpec
        The validated study.
    roles : iterable of {"baseline", "compressed"}
        Which kinds of task to include (``compbias train`` plans baselines only).
    methods : iterable of str, optional
        Keep only compressed tasks whose method name is in this set.
    levels : iterable of str, optional
        Keep only compressed tasks whose level (as written) is in this set.

    Returns
    -------
    list of ModelTask
        One per (seed, method, level); seeds in the study's order.

    Raises
    ------
    ValueError
        If ``methods`` or ``levels`` name something the study does not have.
    """
    roles = set(roles)
    unknown_roles = roles - {"baseline", "compressed"}
    if unknown_roles:
        raise ValueError(f"unknown roles {sorted(unknown_roles)}; use 'baseline' and/or 'compressed'")
    all_methods = {c.name for c in spec.compression}
    all_levels = {format_level(lv) for c in spec.compression for lv in c.levels}
    if methods is not None:
        methods = set(methods)
        bad = methods - all_methods
        if bad:
            raise ValueError(f"the study has no method {sorted(bad)}; its methods are {sorted(all_methods)}")
    if levels is not None:
        levels = {format_level(x) for x in levels}
        bad = levels - all_levels
        if bad:
            raise ValueError(f"the study has no level {sorted(bad)}; its levels are {sorted(all_levels)}")

    tasks: list[ModelTask] = []
    seeds = spec.seeds()
    if "baseline" in roles:
        tasks += [ModelTask(seed=s, method=BASELINE_METHOD, level=BASELINE_LEVEL) for s in seeds]
    if "compressed" in roles:
        for s in seeds:
            for i, entry in enumerate(spec.compression):
                if methods is not None and entry.name not in methods:
                    continue
                for lv in entry.levels:
                    text = format_level(lv)
                    if levels is not None and text not in levels:
                        continue
                    tasks.append(ModelTask(seed=s, method=entry.name, level=text, compression_index=i, level_value=lv))
    return tasks
