"""Peak memory and start time of a node with hospital-size volumes, first start against second.

    python bench/bundle_memory.py [--cases 50] [--size 256 256 128] [--out bench-results/bundle-memory]

Writes ``--cases`` CT-like volumes of ``--size`` voxels (int16 HU, an organ with a lesion), then
runs a node twice, each time in a fresh process: load the node's cases (its start: every case
preprocessed and checked, or found in the disk cache), then train one epoch of the spleen-style
bundle (96^3 patches, 4 per case, 2 cases a step) with a narrower UNet. The first start
preprocesses every case into the node's disk cache; the second reads the cache. Prints each
start's time, the peak RSS at the end of the start and after the epoch, against the size of the
dataset held in memory as float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NODE = r'''
import json, resource, sys, time
from pathlib import Path
started = time.perf_counter()
import torch
torch.set_num_threads(2)
from fl.learn import TrainSettings
from fl.learn.bundle import BundleTask
from fl.learn.data import load_local_data
task = BundleTask.load(sys.argv[1])
data = load_local_data(sys.argv[2], task, use_cache=False, disk_cache=Path(sys.argv[3]))
loaded = time.perf_counter() - started
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.manual_seed(0)
net = task.build_network()
result = task.train(net, data.train, TrainSettings(epochs=1, generator=torch.Generator().manual_seed(0)))
print(json.dumps({"start_seconds": loaded, "peak_rss_mb_at_start": load_peak, "train_seconds": result.seconds,
                  "steps": result.steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def write_volumes(folder: Path, cases: int, size: tuple[int, int, int]) -> None:
    import nibabel as nib
    import numpy as np

    from fl.learn.synth_anatomy import Scanner, _affine, ct_case

    scanner = Scanner(spacing=(0.8, 0.8, 2.5), flip=(False, False, False), size_xy=(size[0], size[0] + 1),
                      size_z=(size[2], size[2] + 1), noise=15.0, gain=1.0, prevalence=0.6, train_cases=cases,
                      val_cases=1)
    rng = np.random.default_rng(0)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for i in range(cases + 1):
        image, label = ct_case(scanner, rng)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, _affine(scanner, image.shape)), folder / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, _affine(scanner, image.shape)), folder / "labelsTr" / name)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (folder / "dataset.json").write_text(json.dumps({"training": entries[:cases], "validation": entries[cases:]}))


def narrow_bundle(out: Path) -> Path:
    shutil.copytree(REPO / "configs" / "bundles" / "spleen_ct_segmentation", out)
    path = out / "configs" / "train.json"
    content = json.loads(path.read_text())
    content["network_def"].update(channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=1)
    path.write_text(json.dumps(content, indent=4))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--out", default="bench-results/bundle-memory")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    write_volumes(out / "node", args.cases, tuple(args.size))
    written = time.perf_counter() - t0
    bundle = narrow_bundle(out / "bundle")
    starts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", NODE, str(bundle), str(out / "node"), str(out / "cache")],
                              capture_output=True, text=True, cwd=REPO, check=True)
        starts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    dataset_mb = args.cases * args.size[0] * args.size[1] * args.size[2] * 4 / 2**20
    result = {"cases": args.cases, "size": args.size, "write_seconds": written, "dataset_float32_mb": dataset_mb,
              "first_start": starts[0], "second_start": starts[1],
              "second_start_over_first": starts[1]["start_seconds"] / starts[0]["start_seconds"]}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
