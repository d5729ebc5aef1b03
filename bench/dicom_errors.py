"""What a node says about each kind of malformed DICOM input, as a markdown table.

    python bench/dicom_errors.py

Each kind (``tests/dicom_fixtures.py``'s ``MALFORMED``, the cases ``tests/test_dicom.py`` checks)
is written into a fresh node folder and loaded for the test-sized spleen bundle as a node
loads its data (``fl.learn.data.load_local_data``); the table holds the first line of the
error it raises, with the temporary folder shown as ``node/`` and UIDs shortened.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> int:
    from bundles import small_spleen
    from dicom_fixtures import MALFORMED

    from fl.errors import DataError
    from fl.learn.bundle import BundleTask
    from fl.learn.data import load_local_data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        task = BundleTask.load(str(small_spleen(Path(tmp) / "bundle")))
        for number, (kind, make) in enumerate(MALFORMED.items()):
            node = Path(tmp) / f"n{number}"
            node.mkdir()
            folder, _ = make(node)
            try:
                load_local_data(folder, task, use_cache=False)
                message = "(accepted)"
            except DataError as exc:
                message = _shown(str(exc).splitlines()[0], node)
            rows.append((kind, message))
    print("| malformed input | error (first line) |\n| --- | --- |")
    for kind, message in rows:
        print(f"| {kind} | `{message}` |")
    return 0


def _shown(message: str, node: Path) -> str:
    message = message.replace(str(node), "node")
    return re.sub(r"\b[\d.]{33,}", lambda m: m.group()[:24] + "…", message).replace("|", "\\|")


if __name__ == "__main__":
    raise SystemExit(main())
