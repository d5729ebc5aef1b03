"""Export a registry version: safetensors, TorchScript, or a MONAI bundle.

Every format carries the version's manifest (provenance) beside the weights. An export is
written into a staging folder and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fl.errors import ConfigError
from fl.registry import MANIFEST_FILE, Version
from fl.tasks import IMAGE_KEY, Task, get_task, resolve_task

FORMATS = ("bundle", "safetensors", "torchscript")
# the Model Zoo's metadata schema (what `python -m monai.bundle verify_metadata` checks against)
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def version_task(version: Version) -> Any:
    """The task a version was trained for; a bundle must still be the one it was trained with."""
    bundle = version.manifest.get("bundle")
    if bundle:
        private = bool(bundle.get("dp_conversion")) or version.manifest.get("dp", {}).get("local") is not None
        try:
            return resolve_task("", str(bundle["path"]), private=private, digest=str(bundle["digest"]))
        except ConfigError as exc:
            raise ConfigError(f"{version.ref()}: {exc}") from None
    return get_task(str(version.manifest["task"]))


def load_network(version: Version) -> tuple[Task, torch.nn.Module]:
    """The version's task network with its weights, in eval mode."""
    from safetensors.torch import load_file

    task = version_task(version)
    net = task.build_network()
    net.load_state_dict(load_file(version.weights))
    return task, net.eval()


def _example(task: Task) -> torch.Tensor:
    if getattr(task, "kind", "segmentation") == "tabular":
        return torch.zeros(1, task.features)  # type: ignore[attr-defined]
    if getattr(task, "kind", "segmentation") == "bundle":
        image = task.metadata["network_data_format"]["inputs"]["image"]  # type: ignore[attr-defined]
        return torch.zeros(1, int(image["num_channels"]), *[int(n) for n in image["spatial_shape"]])
    return torch.zeros(1, 1, *([task.image_size] * task.spatial_dims))


def _from_bundle(version: Version, task: Any, net: torch.nn.Module, out: Path) -> None:
    """A version trained from a bundle, back as that bundle: its configs (the network converted
    for DP-SGD where it was), the version's weights as ``models/model.pt``, and its metadata with
    the Model Zoo's fields (``schema`` included) and OncoFed's provenance."""
    import monai
    import numpy as np

    shutil.copytree(task.root, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    (out / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), out / "models" / "model.pt")
    configs = out / "configs"
    if task.private:  # the weights are the converted network's: every config builds that network
        for path in sorted(configs.glob("*.json")):
            if path.name == "metadata.json":
                continue
            content = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(content, dict) and "network_def" in content:
                content["imports"] = [*content.get("imports", []), "$import opacus"]
                content["network_def_bundle"] = content["network_def"]
                content["network_def"] = "$opacus.validators.ModuleValidator.fix(@network_def_bundle)"
                path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
    metadata = copy.deepcopy(task.metadata)
    number = f"{version.number}.0.0"
    metadata.update({
        "schema": metadata.get("schema") or META_SCHEMA,
        "version": number,
        "changelog": {number: f"OncoFed {version.ref()}, round {version.manifest['round']}, from bundle "
                              f"{task.name} {task.metadata.get('version', '')}", **metadata.get("changelog", {})},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "oncofed": version.manifest,
    })
    eval_metrics = {task.key_metric()[0]: _final_score(version)} if _final_score(version) is not None else {}
    metadata["eval_metrics"] = eval_metrics or metadata.get("eval_metrics", {})
    (configs / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")


def _final_score(version: Version) -> float | None:
    """The round's aggregate Dice where the manifest holds one (a DP release under DP)."""
    from fl import wire

    evaluate = (version.manifest.get("metrics") or {}).get("evaluate") or {}
    value = wire.score(evaluate.get("aggregate") or {})
    return float(value) if value is not None else None


def _bundle(version: Version, out: Path) -> None:
    import monai
    import numpy as np

    task, net = load_network(version)
    if getattr(task, "kind", "segmentation") == "bundle":
        _from_bundle(version, task, net, out)
        return
    if getattr(task, "kind", "segmentation") != "segmentation":
        raise ConfigError(f"{version.ref()}: a MONAI bundle describes an image model; export task "
                          f"{task.name} as safetensors or torchscript")
    (out / "configs").mkdir()
    (out / "models").mkdir()
    torch.save(net.state_dict(), out / "models" / "model.pt")
    spatial = [task.image_size] * task.spatial_dims
    metadata = {
        "schema": META_SCHEMA,
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
