"""What every section of the study file shares: the error type, the strict base model, the name patterns."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["IMPORT_PATH", "NAME_PATTERN", "Strict", "StudyConfigError", "format_level"]

#: ``package.module:callable`` (a model factory, a custom compression function).
IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: A study's name (it becomes part of experiment and model names).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


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


class Strict(BaseModel):
    """Base for every section: unknown keys are refused, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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
