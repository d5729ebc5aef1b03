"""Bundle tasks: a MONAI bundle in the Model Zoo layout, trained federated.

OncoFed reads the bundle's ``configs/train.json`` (and ``configs/metadata.json``) with MONAI's
``ConfigParser`` and takes its components: the network (``network_def``), the training and
validation preprocessing (``train#preprocessing``, ``validate#preprocessing``), the loss
(``loss``), the optimizer and its learning rate (``optimizer``, built over OncoFed's own network
object), the mini-batch size (``train#dataloader#batch_size``), the validation inferer
(``validate#inferer``), its post-processing (``validate#postprocessing``) and the key metric
(``validate#key_metric``). It replaces only the data source (each node's own ``dataset.json``
instead of the bundle's ``dataset_dir``, globs or datalist) and the amount of training (the run's
``train.epochs`` per round instead of the trainer's ``max_epochs``).

OncoFed's own loop drives these components; the bundle's ignite trainer does not run. DP-SGD
must own the optimizer step (per-record clipping of gradients grouped by case, Poisson sampling
of cases, noise from the node's CSPRNG), a round trains a set amount, and what a node releases
must stay under its policy; an ignite trainer's handlers (checkpoints, TensorBoard, validation
with per-case outputs) would work against all three.

A bundle is code (its ``$`` expressions run on every node), so a node trains only the bundle
whose digest the server names, found in the app it approved (``configs/bundles/`` is part of
the app's files, hence of its hash) or at the same absolute path in simulation.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl.errors import ConfigError, DataError
from fl.learn.quiet import quiet_monai

if TYPE_CHECKING:
    import torch

    from fl.learn.data import LocalData
    from fl.learn.dp_train import DpOptions
    from fl.learn.task import PrivateSettings, TrainSettings
    from fl.learn.train import EvalResult, TrainResult

TRAIN_JSON = "configs/train.json"
METADATA_JSON = "configs/metadata.json"
INFERENCE_JSON = "configs/inference.json"
# what OncoFed takes from a bundle's train.json, by MONAI config id
REQUIRED_IDS = ("network_def", "loss", "optimizer", "train#preprocessing", "validate#preprocessing",
                "validate#inferer", "validate#postprocessing", "validate#key_metric")
DICE_TARGETS = ("MeanDice", "monai.handlers.MeanDice", "monai.handlers.mean_dice.MeanDice")
APP_ROOT = Path(__file__).resolve().parents[2]  # the app's folder: fl/, nodes/, configs/ ...
_PARSE_LOCK = threading.Lock()  # ConfigParser resolves in place; one instantiation at a time
_KEPT_LOCK = threading.RLock()  # a task object's kept components (BundleTask._kept)


def bundle_digest(root: Path) -> str:
    """SHA-256 over every config file of the bundle (name and bytes), sorted by name."""
    digest = hashlib.sha256()
    files = sorted(p for p in (root / "configs").rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".yml"))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def find_bundle(path: str, *, inside_app: bool = False) -> Path:
    """The bundle folder ``path`` names: absolute, or relative to the app's folder (on a deployed
    node: its copy of the approved app), else to the working directory. ``inside_app``: only a
    folder inside the app (what a deployed node runs: code its operator approved)."""
    given = Path(path).expanduser()
    if inside_app:
        found = (APP_ROOT / given).resolve()
        if given.is_absolute() or not found.is_relative_to(APP_ROOT.resolve()) or not (found / TRAIN_JSON).is_file():
            raise ConfigError(f"bundle: {path!r} is not a bundle inside the approved app ({APP_ROOT}); a deployed "
                              "node trains only bundles shipped with it (configs/bundles/)")
        return found
    candidates = [given] if given.is_absolute() else [APP_ROOT / given, given]
    for candidate in candidates:
        if (candidate / TRAIN_JSON).is_file():
            return candidate.resolve()
    where = " or ".join(str(c) for c in candidates)
    raise ConfigError(f"bundle: {path!r} is not a MONAI bundle folder (no {TRAIN_JSON} in {where})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a bundle in the Model Zoo layout has {TRAIN_JSON} and {METADATA_JSON})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return content


@functools.lru_cache(maxsize=8)
def _contents(root: Path, digest: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """train.json and metadata.json of the bundle (cached per digest)."""
    del digest  # part of the cache key only
    return _read_json(root / TRAIN_JSON), _read_json(root / METADATA_JSON)


@dataclass(frozen=True)
class BundleTask:
    """A MONAI bundle as an OncoFed task. ``private``: the network is converted for DP-SGD
    (Opacus's ``ModuleValidator.fix``: BatchNorm becomes GroupNorm) on server and nodes alike."""

    root: Path
    digest: str
    private: bool = False
    path: str = ""  # as the run config gave it (what nodes are told)
    # a catalogue task's bundle trains with the run config's learning rate and batch size
    lr_override: float | None = None
    batch_size_override: int | None = None
    # components parsed once per task object and reused (:meth:`_kept`): a node keeps one task object
    # per run (:mod:`nodes.working_set`), so a message parses nothing after the run's first
    _kept_components: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    metric = "dice"  # the key metric (MeanDice) nodes report
    record_metric = "dice"

    @classmethod
    def load(cls, path: str, *, private: bool = False, digest: str | None = None, lr: float | None = None,
             batch_size: int | None = None, inside_app: bool = False) -> BundleTask:
        """Find, parse and check the bundle; with ``digest``, refuse any other bundle; ``lr`` and
        ``batch_size`` replace the bundle's (a catalogue task's run settings); ``inside_app``: see
        :func:`find_bundle`."""
        root = find_bundle(path, inside_app=inside_app)
        actual = bundle_digest(root)
        if digest is not None and digest != actual:
            raise ConfigError(f"bundle: {root} differs from the bundle this run was started with "
                              f"(digest {actual[:12]}, expected {digest[:12]})")
        task = cls(root=root, digest=actual, private=private, path=path, lr_override=lr, batch_size_override=batch_size)
        task.check()
        return task

    # --- the bundle's content -----------------------------------------------------------------
    @property
    def train_config(self) -> dict[str, Any]:
        return _contents(self.root, self.digest)[0]

    @property
    def metadata(self) -> dict[str, Any]:
        return _contents(self.root, self.digest)[1]

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.root.name)

    @property
    def description(self) -> str:
        return str(self.metadata.get("description") or self.metadata.get("task") or self.name)

    def parser(self) -> Any:
        """A fresh ``ConfigParser`` over train.json (with ``bundle_root`` set to the folder)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser(copy.deepcopy(self.train_config))
        parser.locator = _locator()
        parser.read_meta(copy.deepcopy(self.metadata))
        parser["bundle_root"] = str(self.root)
        return parser

    def _parsed(self, id_: str, **overrides: Any) -> Any:
        with _PARSE_LOCK, quiet_monai():
            parser = self.parser()
            for key, value in overrides.items():
                parser[key] = value
            try:
                return parser.get_parsed_content(id_, lazy=False)
            except Exception as exc:
                raise ConfigError(f"{self.root / TRAIN_JSON}: cannot build '{id_}' ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''})") from None

    def _kept(self, id_: str) -> Any:
        """The component ``id_`` parsed once for this task object, then reused: only for components that
        keep no state between uses (the loss, the validation inferer and post-processing)."""
        with _KEPT_LOCK:
            if id_ not in self._kept_components:
                self._kept_components[id_] = self._parsed(id_)
            return self._kept_components[id_]

    def _raw(self, id_: str, default: Any = None) -> Any:
        node: Any = self.train_config
        for part in id_.split("#"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def _setting(self, id_: str, default: Any = None) -> Any:
        """A scalar setting: as written, or resolved when it refers elsewhere (``@id``, ``%id``,
        ``$expression``), as bundles often write ``"lr": "@learning_rate"``."""
        value = self._raw(id_, default)
        if isinstance(value, str) and value[:1] in ("@", "%", "$"):
            return self._parsed(id_)
        return value

    def check(self) -> None:
        """Every component OncoFed takes is there, and the key metric is one it can release."""
        missing = [i for i in REQUIRED_IDS if self._raw(i) is None]
        if missing:
            raise ConfigError(f"{self.root / TRAIN_JSON}: missing {', '.join(repr(m) for m in missing)} "
                              "(OncoFed takes these from a bundle)")
        self.key_metric()

    # --- components ---------------------------------------------------------------------------
    def build_network(self) -> torch.nn.Module:
        """The bundle's ``network_def``, freshly instantiated (converted for DP-SGD if private)."""
        net = self._parsed("network_def")
        if self.private:
            net, _ = private_network(net, self.root)
        return net

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a frozen, hashable task: the same answer every round)
    def conversion(self) -> dict[str, str]:
        """What ``ModuleValidator.fix`` replaced (module name: 'old -> new'), for the manifest."""
        if not self.private:
            return {}
        _, replaced = private_network(self._parsed("network_def"), self.root)
        return replaced

    def build_loss(self) -> torch.nn.Module:
        """The bundle's loss, parsed once per task object (a loss keeps no state between batches;
        :func:`fl.learn.bundle_train.onehot_outside` changes a copy)."""
        return self._kept("loss")

    def build_optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        """The bundle's optimizer (its type, learning rate and settings) over ``net``'s parameters: parsed
        the first time, then rebuilt from its class and settings without the parser where the bundle's
        optimizer is one group over all the network's parameters (:func:`_optimizer_recipe`)."""
        import torch

        with _KEPT_LOCK:
            recipe = self._kept_components.get("optimizer")
        if recipe:
            kind, settings = recipe
            optimizer = kind(list(net.parameters()), **settings)
        else:
            optimizer = self._parsed("optimizer", network=net, network_def=net, device=torch.device("cpu"))
            if recipe is None:
                with _KEPT_LOCK:
                    self._kept_components["optimizer"] = _optimizer_recipe(optimizer, net)
        if self.lr_override is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.lr_override
        return optimizer

    @property
    def lr(self) -> float:
        if self.lr_override is not None:
            return self.lr_override
        value = self._setting("optimizer#lr")
        return float(value) if isinstance(value, (int, float)) else float("nan")

    @property
    def batch_size(self) -> int:
        """Cases per training step: the bundle's ``train#dataloader#batch_size`` (1 if unset)."""
        if self.batch_size_override is not None:
            return self.batch_size_override
        value = self._setting("train#dataloader#batch_size", 1)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{self.root / TRAIN_JSON}: train#dataloader#batch_size must be a positive integer, "
                              f"got {value!r}")
        return value

    @property
    def spatial_dims(self) -> int:
        """The network's spatial dimensions (``network_def#spatial_dims``, 3 if unset)."""
        value = self._setting("network_def#spatial_dims", 3)
        return value if isinstance(value, int) else 3

    @property
    def out_channels(self) -> int:
        """The network's output channels (``network_def#out_channels``, else the metadata's)."""
        value = self._setting("network_def#out_channels")
        if not isinstance(value, int):
            value = self.metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("num_channels")
        if not isinstance(value, int):
            raise ConfigError(f"{self.root / TRAIN_JSON}: network_def#out_channels must be an integer")
        return value

    @property
    def loader_workers(self) -> int:
        value = self._setting("train#dataloader#num_workers", 0)
        return value if isinstance(value, int) and value >= 0 else 0

    def train_transform(self) -> Any:
        return self._parsed("train#preprocessing")

    def val_transform(self) -> Any:
        return self._parsed("validate#preprocessing")

    def inferer(self) -> Any:
        """The bundle's validation inferer (its sliding-window settings as written), parsed once."""
        return self._kept("validate#inferer")

    def postprocessing(self) -> Any:
        """The bundle's validation post-processing (deterministic transforms), parsed once."""
        return self._kept("validate#postprocessing")

    @property
    def eval_batch_size(self) -> int:
        """Validation cases per inferer call: the bundle's own evaluator's (``validate#dataloader#batch_size``,
        1 if unset); :func:`fl.learn.bundle_eval.evaluate_bundle` batches cases of one shape up to it."""
        value = self._setting("validate#dataloader#batch_size", 1)
        return value if isinstance(value, int) and value >= 1 else 1

    def key_metric(self) -> tuple[str, dict[str, Any]]:
        """The key metric's name and its Dice settings; only MeanDice is accepted (OncoFed
        releases a mean of per-case scores in [0, 1], which Dice is)."""
        metric = self._raw("validate#key_metric")
        if not isinstance(metric, dict) or len(metric) != 1:
            raise ConfigError(f"{self.root / TRAIN_JSON}: validate#key_metric must hold exactly one metric")
        (name, spec), = metric.items()
        target = spec.get("_target_") if isinstance(spec, dict) else None
        if target not in DICE_TARGETS:
            raise ConfigError(f"{self.root / TRAIN_JSON}: validate#key_metric#{name}: OncoFed supports MeanDice "
                              f"as the key metric, got {target!r}")
        return name, {"include_background": bool(spec.get("include_background", True))}

    def record_scores(self, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-case Dice in [0, 1] of post-processed (one-hot or multi-label) predictions: as
        MONAI's MeanDice, the mean over the classes the key metric counts, a class absent from
        the case's labels left out; a case with no foreground at all scores 1 if none is
        predicted, else 0 (so every case has a score, and a sum of scores sensitivity 1)."""
        return self.scores(preds, labels)[0]

    def scores(self, preds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`record_scores` and the per-case, per-class Dice it averages, ``(cases, classes the
        key metric counts)`` with NaN where the class is absent from the case's labels."""
        import torch
        from monai.metrics import compute_dice

        _, settings = self.key_metric()
        preds, labels = preds.float(), labels.float()
        present = compute_dice(preds, labels, include_background=settings["include_background"], ignore_empty=True)
        strict = compute_dice(preds, labels, include_background=settings["include_background"], ignore_empty=False)
        per_case = torch.nanmean(present, dim=1)
        empty = torch.isnan(per_case)
        per_case[empty] = strict[empty].mean(dim=1)
        return per_case.clamp(0.0, 1.0), present

    def class_labels(self) -> list[str]:
        """The names of the classes :meth:`scores` counts (the bundle's label names where its
        metadata gives them, else their indices)."""
        _, settings = self.key_metric()
        first = 0 if settings["include_background"] else 1
        outputs = (self.metadata.get("network_data_format") or {}).get("outputs", {}).get("pred", {})
        names = outputs.get("channel_def") or {}
        return [str(names.get(str(c), f"class {c}")) for c in range(first, self.out_channels)]

    def label_index(self, name: str) -> int:
        """The class index of label ``name`` (case aside) in the bundle's metadata
        (``network_data_format.outputs.pred.channel_def``, index -> name)."""
        outputs = (self.metadata.get("network_data_format") or {}).get("outputs", {}).get("pred", {})
        channel_def = outputs.get("channel_def") or {}
        names = {str(v).casefold(): int(k) for k, v in channel_def.items()}
        if name.casefold() not in names:
            known = ", ".join(repr(str(v)) for v in channel_def.values()) or "none declared"
            raise DataError(f"bundle {self.name} has no label {name!r} (its labels: {known})")
        return names[name.casefold()]

    def with_lr(self, lr: float) -> BundleTask:
        return dataclasses.replace(self, lr_override=lr)

    @property
    def bundle_digest(self) -> str:
        return self.digest

    def example_input(self) -> torch.Tensor:
        """A zero input of the shape the bundle's metadata declares (``network_data_format``)."""
        import torch

        image = self.metadata["network_data_format"]["inputs"]["image"]
        return torch.zeros(1, int(image["num_channels"]), *[int(n) for n in image["spatial_shape"]])

    # --- data (:mod:`fl.learn.data`, :mod:`fl.learn.cases`) -----------------------------------
    def load_data(self, data_dir: Path, *, use_cache: bool = True, disk_cache: Path | None = None) -> LocalData:
        from fl.learn.data import load_bundle_cases

        return load_bundle_cases(Path(data_dir).resolve(), self, use_cache, disk_cache)

    def load_pooled(self, data_dirs: list[Path]) -> LocalData:
        """Every node's cases in one list, preprocessed as each node does (no disk cache)."""
        from fl.learn.cases import bundle_cases
        from fl.learn.data import LocalData, read_datalist

        lists = [read_datalist(Path(d).resolve(), modality_lists=True) for d in data_dirs]
        return LocalData(bundle_cases([c for d in lists for c in d["training"]], self, None, train=True),
                         bundle_cases([c for d in lists for c in d["validation"]], self, None, train=False),
                         digest="")

    def record_labels(self, data: LocalData) -> None:
        del data
        return None  # label maps in the node's files: descriptors count them there

    # --- training (:mod:`fl.learn.bundle_train`) ----------------------------------------------
    def check_private_options(self, options: DpOptions, net: torch.nn.Module) -> None:
        from fl.learn.trainable import trained_names

        trained_names(net, options.trainable)

    def train(self, net: torch.nn.Module, split: Any, settings: TrainSettings) -> TrainResult:
        from fl.learn.bundle_train import train_bundle

        return train_bundle(net, self, split, epochs=settings.epochs, device=settings.device, amp=settings.amp,
                            proximal_mu=settings.proximal_mu, generator=settings.generator, workers=settings.workers)

    def train_private(self, net: torch.nn.Module, split: Any, settings: PrivateSettings) -> TrainResult:
        from fl.learn.bundle_train import train_bundle_dp

        return train_bundle_dp(net, self, split, epochs=settings.epochs, noise_multiplier=settings.noise_multiplier,
                               max_grad_norm=settings.max_grad_norm, noise=settings.noise, device=settings.device,
                               options=settings.options, generator=settings.generator)

    def evaluate(self, net: torch.nn.Module, split: Any, *, device: torch.device | None = None,
                 workers: int = 0, amp: bool = False) -> EvalResult:
        from fl.learn.bundle_eval import evaluate_bundle

        return evaluate_bundle(net, self, split, device=device, workers=workers, amp=amp)

    # --- what goes into a version's manifest -----------------------------------------------
    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path or str(self.root), "digest": self.digest,
                               "version": str(self.metadata.get("version", "")), "lr": self.lr, "batch_size": self.batch_size}
        for key in ("intended_use", "task", "description"):  # what a model card quotes (fl.registry.card)
            if self.metadata.get(key):
                out[key] = str(self.metadata[key])
        if self.private:
            out["dp_conversion"] = self.conversion()
        return out


def _optimizer_recipe(optimizer: Any, net: Any) -> tuple[type, dict[str, Any]] | bool:
    """``(class, settings)`` that rebuild ``optimizer`` over another copy of ``net`` without the config
    parser: where it is one parameter group over all of ``net``'s parameters, in order, with the
    class's own settings and nothing else; False (parse every time) for anything else."""
    groups = optimizer.param_groups
    if len(groups) != 1 or [id(p) for p in groups[0]["params"]] != [id(p) for p in net.parameters()]:
        return False
    settings = dict(optimizer.defaults)
    if {k: v for k, v in groups[0].items() if k != "params"} != settings:
        return False
    try:
        twin = type(optimizer)(list(net.parameters()), **settings)
    except Exception:  # noqa: BLE001 - a class whose settings are not its arguments: parse every time
        return False
    if {k: v for k, v in twin.param_groups[0].items() if k != "params"} != settings:
        return False
    return type(optimizer), settings


@functools.lru_cache(maxsize=1)
def _locator() -> Any:
    """One MONAI ``ComponentLocator`` per process (it maps ``_target_`` names to MONAI's classes).
    Each parser would build its own by iterating ``sys.modules`` while other threads of a node
    or server may be importing ("dictionary changed size during iteration"); this one iterates a
    snapshot, once (importing monai has loaded all its modules by then)."""
    import sys

    from monai.bundle.config_item import ComponentLocator

    class SnapshotLocator(ComponentLocator):  # type: ignore[misc]
        def _find_module_names(self) -> list[str]:
            return [m for m in list(sys.modules) if m.startswith(self.MOD_START)
                    and all(s not in m for s in self.excludes)]

    return SnapshotLocator()


def private_network(net: torch.nn.Module, root: Path) -> tuple[torch.nn.Module, dict[str, str]]:
    """``net`` made trainable with DP-SGD by Opacus's ``ModuleValidator.fix`` (BatchNorm ->
    GroupNorm, in-place activations off), and what was replaced; whatever the fix cannot make
    private is refused, naming the modules."""
    from opacus.validators import ModuleValidator

    before = {name: type(m).__name__ for name, m in net.named_modules()}
    fixed = ModuleValidator.fix(net)
    for module in fixed.modules():  # in-place activations would overwrite what per-sample gradients need
        if hasattr(module, "inplace") and module.inplace:
            module.inplace = False
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise ConfigError(f"{root / TRAIN_JSON}: network_def cannot be trained with local DP ({listed})")
    after = {name: type(m).__name__ for name, m in fixed.named_modules()}
    replaced = {name: f"{before[name]} -> {after[name]}" for name in after if name in before and before[name] != after[name]}
    return fixed, replaced
