"""OncoFed: privacy-preserving federated learning for medical imaging (core and developer side)."""

from importlib.metadata import PackageNotFoundError, version

from fl import monai_import

monai_import.install()  # before anything imports MONAI (see fl.monai_import)

try:
    __version__ = version("oncofed")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
