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

import torch

from fl.errors import ConfigError
from fl.learn import Task, resolve_task
from fl.learn.bundle import BundleTask
from fl.registry import MANIFEST_FILE, Registry, Version

FORMATS = ("bundle", "safetensors", "torchscript")
# the Model Zoo's metadata schema (what `python -m monai.bundle verify_metadata` checks against)
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def version_task(version: Version) -> Task:
    """The task a version was trained for; a bundle must still be the one it was trained with."""
    bundle = version.manifest.get("bundle")
    if bundle:
        private = bool(bundle.get("dp_conversion")) or version.manifest.get("dp", {}).get("local") is not None
        try:
            return resolve_task("", str(bundle["path"]), private=private, digest=str(bundle["digest"]))
        except ConfigError as exc:
            raise ConfigError(f"{version.ref()}: {exc}") from None
    return resolve_task(str(version.manifest["task"]))  # a version from before tasks were bundles


def load_network(version: Version) -> tuple[Task, torch.nn.Module]:
    """The version's task network with its weights, in eval mode."""
    from safetensors.torch import load_file

    task = version_task(version)
    net = task.build_network()
    net.load_state_dict(load_file(version.weights))
    return task, net.eval()


def _from_bundle(version: Version, task: BundleTask, net: torch.nn.Module, out: Path) -> None:
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
    score = _final_score(version)
    if score is not None:
        metadata["eval_metrics"] = {task.key_metric()[0]: score}
    (configs / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")


def _final_score(version: Version) -> float | None:
    """The round's aggregate Dice where the manifest holds one (a DP release under DP)."""
    from fl import wire

    evaluate = (version.manifest.get("metrics") or {}).get("evaluate") or {}
    value = wire.score(evaluate.get("aggregate") or {})
    return float(value) if value is not None else None


def _bundle(version: Version, out: Path) -> None:
    task, net = load_network(version)
    if task.bundle_digest is None:
        raise ConfigError(f"{version.ref()}: a MONAI bundle describes an image model; export task "
                          f"{task.name} as safetensors or torchscript")
    _from_bundle(version, task, net, out)


def _torchscript(version: Version, out: Path) -> None:
    task, net = load_network(version)
    traced = torch.jit.trace(net, task.example_input())
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
        if fmt == "bundle":  # the model card travels with the bundle (MONAI's docs/ folder)
            from fl.registry.card import write_card

            write_card(Registry(version.path.parent.parent), version.ref(), staging / "docs")
        shutil.copyfile(version.path / MANIFEST_FILE, staging / MANIFEST_FILE)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
