"""The fenced code blocks of one section of a page in docs/: what the docs tests run as written."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def section_snippets(page: str, heading: str, languages: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced block in ``languages`` under ``heading`` (up to the next ``## ``).

    Parameters
    ----------
    page : str
        File name in docs/, e.g. ``"bring-your-own.md"``.
    heading : str
        The section's heading line, e.g. ``"## Bring your own models"``.
    languages : tuple of str
        Fence languages to keep, e.g. ``("python", "bash")``.
    """
    text = (REPO / "docs" / page).read_text()
    assert heading in text, f"docs/{page} has no section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```({'|'.join(languages)})\n(.*?)```", section, re.S)
