"""Where compbias finds its own files and keeps its caches, installed or in a checkout.

Installed from a wheel, compbias lives in ``site-packages`` and its study files
and MLflow project ship inside it (``compbias/configs``, ``compbias/share/mlproject``);
caches go to the user's cache directory, never into ``site-packages``. Imported
from a source checkout (an editable install, or the checkout on ``PYTHONPATH``),
the study files are the checkout's ``configs/`` and the caches its ``.cache/``,
as before.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "PACKAGE_DIR", "source_checkout", "configs_dir", "mlproject_dir", "cache_dir"]

#: The environment variable naming the root of every compbias cache (datasets, audit artifacts, numba).
CACHE_ENV = "COMPBIAS_CACHE_DIR"

#: The directory of the imported ``compbias`` package.
PACKAGE_DIR = Path(__file__).resolve().parent


def source_checkout() -> Path | None:
    """The repository root when ``compbias`` is imported from a source checkout.

    Returns
    -------
    pathlib.Path or None
        The directory holding ``pyproject.toml`` next to the package, or None
        when the package is installed (under ``site-packages`` or
        ``dist-packages``, or with no ``pyproject.toml`` beside it).
    """
    if {"site-packages", "dist-packages"} & set(PACKAGE_DIR.parts):
        return None
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None


def _shipped(inside: Path, name: str) -> Path:
    if inside.is_dir():  # a wheel: package data
        return inside
    checkout = source_checkout()
    return checkout / name if checkout is not None else inside


def configs_dir() -> Path:
    """The study files shipped with compbias (``digits.yaml``, ``celeba.yaml``, ...)."""
    return _shipped(PACKAGE_DIR / "configs", "configs")


def mlproject_dir() -> Path:
    """The MLflow project shipped with compbias (``mlflow run <this> -e study``)."""
    return _shipped(PACKAGE_DIR / "share" / "mlproject", "mlproject")


def cache_dir(*parts: str) -> Path:
    """A directory for compbias's caches (not created here).

    Parameters
    ----------
    *parts : str
        Sub-directories, e.g. ``"numba"``.

    Returns
    -------
    pathlib.Path
        ``$COMPBIAS_CACHE_DIR/...`` when that is set; else
        ``<checkout>/.cache/...`` in a source checkout; otherwise
        ``$XDG_CACHE_HOME/compbias/...`` (default ``~/.cache/compbias/...``).
        The one rule for every cache: decoded datasets under ``datasets``,
        downloaded audit artifacts under ``audit``, numba's under ``numba``.
    """
    root = os.environ.get(CACHE_ENV)
    checkout = source_checkout()
    if root:
        base = Path(root)
    elif checkout is not None:
        base = checkout / ".cache"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compbias"
    return base.joinpath(*parts)
