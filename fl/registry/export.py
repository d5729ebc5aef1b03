"""Export a registry version: safetensors, TorchScript, or a MONAI bundle.

Every format carries the version's manifest (provenance) beside the weights. An export is
written into a staging folder and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fl.errors import ConfigError
from fl.registry import MANIFEST_FILE, Version
from fl.tasks import IMAGE_KEY, Task, get_task

FORMATS = ("bundle", "safetensors", "torchscript")


def load_network(version: Version) -> tuple[Task, torch.nn.Module]:
    """The version's task network with its weights, in eval mode."""
    from safetensors.torch import load_file

    task = get_task(str(version.manifest["task"]))
    net = task.build_network()
    net.load_state_dict(load_file(version.weights))
    return task, net.eval()


def _example(task: Task) -> torch.Tensor:
    if getattr(task, "kind", "segmentation") == "tabular":
        return torch.zeros(1, task.features)  # type: ignore[attr-defined]
    return torch.zeros(1, 1, *([task.image_size] * task.spatial_dims))


def _bundle(version: Version, out: Path) -> None:
    import monai
    import numpy as np

    task, net = load_network(version)
    if getattr(task, "kind", "segmentation") != "segmentation":
        raise ConfigError(f"{version.ref()}: a MONAI bundle describes an image model; export task "
                          f"{task.name} as safetensors or torchscript")
    (out / "configs").mkdir()
    (out / "models").mkdir()
    torch.save(net.state_dict(), out / "models" / "model.pt")
    spatial = [task.image_size] * task.spatial_dims
    metadata = {
        "version": f"{version.number}.0.0",
        "changelog": {f"{version.number}.0.0": f"OncoFed {version.ref()}, round {version.manifest['round']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": version.name,
        "task": task.description,
        "description": f"Federated model {version.ref()} trained with OncoFed; provenance under 'oncofed'.",
        "authors": "OncoFed federation",
        "copyright": "See the federation's data agreements",
        "network_data_format": {
            "inputs": {IMAGE_KEY: {"type": "image", "format": "magnitude", "modality": "any",
                                   "num_channels": 1, "spatial_shape": spatial, "dtype": "float32",
                                   "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": task.num_classes,
                                 "spatial_shape": spatial, "dtype": "float32", "value_range": [],
                                 "is_patch_data": False,
                                 "channel_def": {str(c): "background" if c == 0 else f"lesion-{c}"
                                                 for c in range(task.num_classes)}}},
        },
        "oncofed": version.manifest,
    }
    inference = {
        "network_def": {"_target_": task.network_target, **task.network_kwargs()},
        "network": "$@network_def.to('cpu')",
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")


def _torchscript(version: Version, out: Path) -> None:
    task, net = load_network(version)
    traced = torch.jit.trace(net, _example(task))
    traced.save(str(out / "model.ts"))


def _safetensors(version: Version, out: Path) -> None:
    shutil.copyfile(version.weights, out / "model.safetensors")


def export(version: Version, fmt: str, out_dir: str | Path) -> Path:
    """Write ``version`` as ``fmt`` into ``out_dir/<name>-v<N>-<fmt>``; returns that folder."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    target = out_dir / f"{version.name}-v{version.number}-{fmt}"
    if target.exists():
        raise ConfigError(f"--out: {target} already exists")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        {"bundle": _bundle, "safetensors": _safetensors, "torchscript": _torchscript}[fmt](version, staging)
        shutil.copyfile(version.path / MANIFEST_FILE, staging / MANIFEST_FILE)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
