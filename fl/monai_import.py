"""MONAI's package import without the integrations OncoFed never uses.

``import monai`` (MONAI 1.6) imports every submodule of the package, and with them, when they are
installed, MLflow (its ``MLFlowHandler``: mlflow, opentelemetry, fastapi) and matplotlib's pyplot
(its notebook helpers). Every process that trains or scores pays it: each virtual node's Ray
actor, each node's warm worker, each ``fl`` command. OncoFed uses neither (its registry mirrors
to MLflow itself, :mod:`fl.registry.mlflow_mirror`, and its plots import matplotlib themselves),
so while MONAI's own package import runs, those two modules read as not installed: MONAI binds
its optional-import placeholders for them, and both import normally afterwards. Measured: 7.9 to
6.1 CPU seconds per ``import monai`` on the project's CI machine type.

:func:`install` puts a finder in front of the import system (``fl`` does it when imported); it
acts once, on the first ``import monai``, and then removes itself. A bundle whose own config
names ``MLFlowHandler`` gets MONAI's optional-import error when that handler is built.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

HIDDEN = ("mlflow", "matplotlib.pyplot")


class _MonaiFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != "monai":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            hidden = [m for m in HIDDEN if m not in sys.modules]
            for m in hidden:
                sys.modules[m] = None  # type: ignore[assignment]  # "import m" raises ImportError
            try:
                real(module)
            finally:
                for m in hidden:
                    if m in sys.modules and sys.modules[m] is None:
                        del sys.modules[m]

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Hide :data:`HIDDEN` from MONAI's first import in this process (no-op once MONAI is imported)."""
    if "monai" not in sys.modules and not any(isinstance(f, _MonaiFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MonaiFinder())
