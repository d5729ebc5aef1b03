"""Loading a DICOM series case against the same volume as NIfTI.

    python bench/dicom_load.py [--slices 300] [--size 256] [--repeat 3]

Writes a CT series (``--slices`` files of ``--size`` x ``--size`` int16, written with pydicom)
and its NIfTI twin (``.nii.gz``, as a NIfTI site holds it) into a temporary folder, then times:

- conversion: a node's first load of the case (``fl.learn.dicom_cache.convert``: every file
  read and checked, the volume assembled by highdicom, written as NIfTI into an empty cache);
- second start: the same call on the filled cache (the source files' stamps and the cache
  entry found again);
- the MONAI ``LoadImage`` a bundle then runs, on the converted ``image.nii`` and on the twin's
  ``.nii.gz``, and (for reference) MONAI on the series folder itself (its DICOM reader, unchecked).

Each figure is the median of ``--repeat`` runs (conversion: each into a fresh cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def _median_seconds(run: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import nibabel as nib
    import numpy as np
    from dicom_fixtures import write_series

    from fl.learn import dicom_cache
    from fl.learn.cases import image_loader
    from fl.learn.dicom import Series

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        series = write_series(root / "ct", slices=args.slices, rows=args.size, cols=args.size, spacing=(0.8, 0.8),
                              step=1.0)
        twin = root / "ct.nii.gz"
        nib.save(nib.Nifti1Image(series.values.astype(np.int16).transpose(2, 1, 0), series.ras_affine()), twin)
        label = root / "label.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(series.values.shape[::-1], np.uint8), series.ras_affine()), label)
        case = {"image": Series(tuple(sorted((root / "ct").iterdir())), str(root / "ct")), "label": label}
        convert = dicom_cache.convert

        first = _median_seconds(lambda i: convert(case, _no_labels, root / f"cache{i}"), args.repeat)
        again = _median_seconds(lambda i: convert(case, _no_labels, root / "cache0"), args.repeat)
        converted = convert(case, _no_labels, root / "cache0")["image"]
        loader = image_loader()
        loader(str(twin))  # MONAI's readers warmed up
        rows = [
            ("conversion (first load: read, check, assemble, write NIfTI)", first),
            ("second start (cache entry found)", again),
            ("MONAI LoadImage of the converted image.nii", _median_seconds(lambda i: loader(converted), args.repeat)),
            ("MONAI LoadImage of the NIfTI twin (.nii.gz)", _median_seconds(lambda i: loader(str(twin)), args.repeat)),
            ("MONAI LoadImage of the series folder (reference; unchecked)",
             _median_seconds(lambda i: loader(str(root / "ct")), args.repeat)),
        ]
    megabytes = args.slices * args.size * args.size * 2 / 2**20
    print(f"{args.slices} slices of {args.size}x{args.size} int16 ({megabytes:.0f} MiB of pixels), "
          f"median of {args.repeat}\n")
    print("| step | seconds |\n| --- | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    return 0


def _no_labels(name: str) -> int:
    raise AssertionError(f"a NIfTI label maps no names ({name})")


if __name__ == "__main__":
    raise SystemExit(main())
