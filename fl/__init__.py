"""OncoFed: privacy-preserving federated learning for medical imaging (core and developer side)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oncofed")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
