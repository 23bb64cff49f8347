"""compbias: find out whom the compression of a neural network hurts."""

from importlib.metadata import PackageNotFoundError, version as _version

from compbias._locations import configs_dir, mlproject_dir

__all__ = ["__version__", "configs_dir", "log_member", "mlproject_dir"]


def __getattr__(name: str):
    """``compbias.log_member`` (:func:`compbias.platform.register.log_member`), imported on first use.

    ``import compbias`` stays light: MLflow is imported only when the API is used.
    """
    if name == "log_member":
        from compbias.platform.register import log_member

        return log_member
    raise AttributeError(f"module 'compbias' has no attribute {name!r}")

try:
    #: The installed distribution's version (pyproject.toml's ``version``).
    __version__ = _version("compbias")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
