"""compbias: find out whom the compression of a neural network hurts."""

from importlib.metadata import PackageNotFoundError, version as _version

from compbias._locations import configs_dir, mlproject_dir

__all__ = ["__version__", "configs_dir", "mlproject_dir"]

try:
    #: The installed distribution's version (pyproject.toml's ``version``).
    __version__ = _version("compbias")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
