"""Reading a study file: validation errors turned into one line per bad key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ._base import StudyConfigError
from .compression import CompressionSpec
from .sections import BaselineSpec, DatasetSpec, ImbalanceSpec, ModelSpec, PopulationSpec, TrainSpec
from .settings import AuditSpec, GateSpec, MlflowSpec, ResourcesSpec, ThresholdsSpec
from .study import StudySpec

__all__ = ["load_study", "parse_study", "validation_problems"]


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


def validation_problems(err: ValidationError) -> list[str]:
    """One line per problem of a pydantic error of the study model: the key, what is wrong, what is allowed."""
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
        raise StudyConfigError(validation_problems(err), source) from None


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
