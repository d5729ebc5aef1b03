"""MONAI's package import skips the integrations OncoFed never uses, and leaves them importable."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import nodes.client_app  # what a Ray actor or a node's worker imports first
from fl.learn import get_task

get_task("seg2d").build_network()  # its first message builds the network with MONAI
assert "monai" in sys.modules
print(sorted(m for m in ("mlflow", "matplotlib.pyplot") if m in sys.modules))
import matplotlib.pyplot, mlflow  # both still import normally afterwards
from monai.utils import optional_import
print(optional_import("mlflow")[1], "mlflow" in sys.modules)
"""


def test_monai_is_imported_without_mlflow_or_pyplot_which_still_import_afterwards() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # neither was loaded by MONAI's import
    assert out[1] == "True True"  # and MONAI's own optional import finds mlflow once it is there
