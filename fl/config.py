"""Typed, validated run configuration.

A config is a TOML file whose tables become dotted keys (``[train] lr = 0.01`` is
``train.lr``), the same flat shape as Flower's run config (``[tool.flwr.app.config]``).
It is parsed once, at the edge, into frozen dataclasses; nothing deeper sees a raw dict.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
key, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl import wire
from fl.errors import ConfigError
from fl.learn import TASK_NAMES, Task
from fl.learn.trainable import TRAINABLE

Scalar = bool | int | float | str

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedexp", "median", "trimmedavg", "krum")


def _key(default: Scalar, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _delta(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1): delta is a probability of failure, and 1 promises nothing"


def _device(value: str) -> str | None:
    ok = re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value)
    return None if ok else "must be auto, cpu, cuda or cuda:N"


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"must be one of {', '.join(choices)}{hint}"

    return check


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _model_name(value: str) -> str | None:
    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value)
    return None if ok else "must be 1-128 letters, digits, '.', '_' or '-', not starting with a dot"


@dataclass(frozen=True)
class DataConfig:
    """Where each node's data lives and how the synthetic default is made."""

    root: str = _key(
        "data/quickstart",
        "Folder with one sub-folder per simulated node (node-0, node-1, ...), each holding "
        "a dataset.json. Relative paths are taken from the working directory.",
        _non_empty,
    )
    nodes: int = _key(3, "Number of nodes (virtual SuperNodes in simulation).", _positive)
    synthesize: bool = _key(
        True, "Generate synthetic multi-site data under data.root when it does not exist yet."
    )
    image_size: int = _key(
        0,
        "Edge length of synthetic images in voxels; 0 takes the task's default.",
        _non_negative,
    )
    synthetic: str = _key(
        "task", "What data.synthesize writes: task (the catalogue task's images), ct (CT sites: HU, anisotropic "
        "spacing, organ and lesion) or brain-mri (4 modalities, 3 nested tumour sub-regions).",
        _one_of("task", "ct", "brain-mri"))
    synthetic_scale: float = _key(1.0, "Size factor of ct / brain-mri synthetic volumes (0.25 to 8).", _positive)
    synthetic_format: str = _key(
        "nifti", "How ct / brain-mri synthetic sites are written: nifti, or dicom (ct only: a CT series per "
        "case, labels as DICOM SEG at even-numbered nodes and RTSTRUCT at odd-numbered ones).",
        _one_of("nifti", "dicom"))


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each node."""

    epochs: int = _key(1, "Local epochs per round.", _positive)
    lr: float = _key(1e-2, "Learning rate of the node's Adam optimizer.", _positive)
    batch_size: int = _key(8, "Mini-batch size on the node.", _positive)
    proximal_mu: float = _key(
        0.0,
        "FedProx proximal weight mu; must be > 0 with strategy.name = 'fedprox'.",
        _non_negative,
    )
    device: str = _key("auto", "Where nodes train: auto (CUDA when present, else CPU), cpu, cuda or cuda:N; a "
                               "node's own node config 'device' overrides it.", _device)
    amp: bool = _key(False, "Mixed precision (float16 autocast) on CUDA; refused with local DP.")
    batchnorm: str = _key(
        "fedavg", "BatchNorm layers without local DP: fedavg (their weights and running statistics are averaged) "
        "or local (FedBN: each node keeps its own; they never leave it).", _one_of("fedavg", "local"))
    workers: int = _key(-1, "DataLoader worker processes per node for bundle tasks; -1: the bundle's own "
                            "num_workers on a deployed node (at most its cores - 1), none on a virtual node.")


@dataclass(frozen=True)
class StrategyConfig:
    """How the server samples nodes and aggregates their updates."""

    name: str = _key(
        "fedavg", "Aggregation: fedavg, fedprox, fedadam, fedavgm (server momentum), fedexp (a server step that "
                  "grows as the updates disagree), or robust median, trimmedavg, krum.", _one_of(*STRATEGIES)
    )
    fraction_train: float = _key(1.0, "Fraction of nodes sampled for training each round.", _fraction)
    fraction_evaluate: float = _key(
        1.0, "Fraction of nodes sampled for evaluation each round.", _fraction
    )
    min_nodes: int = _key(
        0,
        "Nodes that must be connected before a round starts; 0 means all data.nodes.",
        _non_negative,
    )
    server_lr: float = _key(0.1, "FedAdam server learning rate (eta).", _positive)
    server_momentum: float = _key(0.9, "FedAvgM server momentum (Hsu et al. 2019).",
                                  lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    server_step: float = _key(1.0, "FedAvgM server learning rate: the step along the averaged update (1: the "
                                   "average itself, plus momentum).", _positive)
    tau: float = _key(1e-3, "FedAdam adaptivity (tau).", _positive)
    timeout: float = _key(600.0, "Seconds to wait for the nodes' replies in one round.", _positive)
    min_replies: int = _key(
        1, "A training round fails unless at least this many valid updates arrive (the others are named).", _positive
    )
    max_update_norm: float = _key(
        0.0, "Exclude any update whose L2 norm exceeds this (all arrays as one vector); 0: no bound.",
        _non_negative,
    )
    trim_beta: float = _key(0.2, "trimmedavg: fraction cut from each end, in [0, 0.5).", _non_negative)
    krum_malicious: int = _key(0, "krum: number of malicious nodes to tolerate.", _non_negative)
    evaluate_initial: bool = _key(
        True, "Evaluate the initial model on the nodes before round 1 (round 0 in metrics.jsonl)."
    )


@dataclass(frozen=True)
class SimulationConfig:
    """Flower Simulation Engine resources (ignored in deployment)."""

    cpus_per_node: float = _key(
        1.0, "CPU cores Ray reserves for each virtual node; sets how many train at once.", _positive
    )
    threads_per_node: int = _key(1, "Torch threads inside each virtual node.", _positive)
    adversaries: int = _key(
        0, "Robustness experiments: virtual nodes 0..k-1 corrupt their updates (nodes/adversary.py).", _non_negative
    )
    attack: str = _key(
        "scale",
        "What adversaries do: scale (x100 update), nan, scale-then-nan, cycle (x1000, NaN, Inf, wrong shapes, "
        "missing array, one per round), or drop-round-1 (crash, then rejoin).",
        _one_of("scale", "nan", "scale-then-nan", "cycle", "drop-round-1"),
    )


@dataclass(frozen=True)
class OutputConfig:
    """Where the run folder goes."""

    dir: str = _key("runs", "Parent folder of run folders.", _non_empty)
    run_name: str = _key("", "Run folder name; empty makes MODEL_NAME-YYYYmmdd-HHMMSS.")


@dataclass(frozen=True)
class CentralDpConfig:
    """Client-level DP on the aggregate (DP-FedAvg); see strategies/central_dp.py."""

    enabled: bool = _key(False, "Clip each node's update and add Gaussian noise to their sum on the server.")
    noise_multiplier: float = _key(1.0, "Noise std divided by the clipping norm (z).", _positive)
    clipping: str = _key("fixed", "fixed, or adaptive (Andrew et al. 2021).", _one_of("fixed", "adaptive"))
    clipping_norm: float = _key(1.0, "L2 bound C on each update (initial value when adaptive).", _positive)
    clip_on: str = _key("server", "Who clips: server, or client (the node; the server checks).",
                        _one_of("server", "client"))
    sampling: str = _key("all", "Node sampling the accountant models: all, or poisson.", _one_of("all", "poisson"))
    sample_rate: float = _key(1.0, "Poisson sampling probability per node and round.", _fraction)
    target_quantile: float = _key(0.5, "Adaptive clipping: fraction of updates to leave unclipped.", _fraction)
    clip_lr: float = _key(0.2, "Adaptive clipping: geometric learning rate of the norm.", _positive)
    count_stddev: float = _key(
        0.0, "Adaptive clipping: noise std of the unclipped count; 0 takes expected nodes / 20.", _non_negative
    )
    delta: float = _key(1e-5, "Client-level delta.", _delta)
    target_epsilon: float = _key(
        0.0, "Stop before a round that would take client-level epsilon past this; 0: no limit.", _non_negative
    )
    accountant: str = _key("rdp", "rdp, prv or pld.", _one_of("rdp", "prv", "pld"))


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+): the server sees only the sum of the updates."""

    enabled: bool = _key(False, "Aggregate the nodes' (clipped) updates with SecAgg+; equal weights.")
    shares: float = _key(1.0, "Fraction of the sampled nodes each node shares its mask keys with.", _fraction)
    threshold: float = _key(0.7, "Fraction of a node's shares needed to rebuild its keys after a dropout.",
                            _fraction)
    clipping_range: float = _key(
        0.0, "Each update coordinate is clipped to +-this before quantisation; 0: central_dp.clipping_norm "
        "(no loss under DP), or 8; chosen by OncoFed under distributed noise.", _non_negative)
    noise: str = _key(
        "server", "Under central DP, who adds the noise: server (to the unmasked sum, which the coordinator "
        "sees without noise), or distributed (each node adds a discrete Gaussian share before masking).",
        _one_of("server", "distributed"))
    protocol: str = _key(
        "flower", "flower: Flower's SecAgg+ (holds against a coordinator that follows the protocol); malicious: "
        "OncoFed's stages with roster-signed keys, ChaCha20 masks, neighbourhoods from a public seed and a signed "
        "consistency round (holds against one that deviates; every node needs a site key and the pinned roster).",
        _one_of("flower", "malicious"))
    colluders: int = _key(1, "Malicious protocol: roster sites that may collude with the coordinator; the threshold "
                             "is raised so that 2t > s + colluders (each node checks its own policy's count).",
                          lambda v: None if v >= 0 else "must be >= 0")


@dataclass(frozen=True)
class LocalDpConfig:
    """Record-level DP on each node (DP-SGD with Opacus); each node enforces its own budget."""

    enabled: bool = _key(False, "Train on every node with DP-SGD (per-sample clipping, Poisson sampling).")
    noise_multiplier: float = _key(1.0, "DP-SGD noise multiplier.", _positive)
    max_grad_norm: float = _key(1.0, "DP-SGD per-sample gradient clipping norm.", _positive)
    trainable: str = _key(
        "all", "Parameters trained under DP-SGD (image tasks): all, decoder (from the first transposed convolution "
        "on), bias (biases and normalisation affines) or decoder+bias; the others keep the global model's values.",
        _one_of(*TRAINABLE))
    views: int = _key(1, "Augmentation multiplicity (image tasks): augmented views of each sampled case whose "
                         "gradients are averaged before clipping; 1: off.", _positive)
    view_augment: str = _key(
        "flips", "The views' augmentation: flips (random flips and quarter turns, on top of the bundle's own random "
        "transforms) or bundle (the bundle's random training transforms only).", _one_of("flips", "bundle"))
    per_case: str = _key(
        "auto", "How a node clips each case's gradient (bundle tasks; the same clipped sum either way): auto (ghost/mixed "
        "clipping where the network allows, fl/learn/ghost.py, else per-case gradients by torch.func), ghost (refuse "
        "the fallback) or vmap (per-case gradients always).", _one_of("auto", "ghost", "vmap"))
    ema_decay: float = _key(0.0, "Each node releases the exponential moving average of its DP-SGD iterates with this "
                                 "decay (post-processing, free of privacy cost); 0: the last iterate.",
                            lambda v: None if 0 <= v < 1 else "must be in [0, 1)")


@dataclass(frozen=True)
class PretrainConfig:
    """Non-private pretraining of the initial model on public data, by the server, before round 1."""

    source: str = _key(
        "", "Public data the server pretrains the initial model on: empty (none), synthetic (the public synthetic "
        "generator, fl/learn/synth.py: its parameters are in the code) or a folder with a dataset.json of public cases.")
    cases: int = _key(128, "Training cases the synthetic source generates.", _positive)
    epochs: int = _key(10, "Pretraining epochs over the public cases.", _positive)
    lr: float = _key(1e-2, "Pretraining learning rate (the task's optimizer).", _positive)
    seed: int = _key(20250101, "Seed of the public synthetic cases and of the pretraining; public, like the data.")


@dataclass(frozen=True)
class ValidationConfig:
    """Federated validation of a registered version (`fl validate`) and the gate for its release."""

    ref: str = _key("", "NAME:VERSION to validate at every site that answers, instead of training; empty: train.")
    bootstrap: int = _key(1000, "Bootstrap resamples of a site's per-case scores for its confidence interval.",
                          lambda v: None if v >= 100 else "must be >= 100")
    confidence: float = _key(0.95, "Confidence level of the sites' intervals.",
                             lambda v: None if 0.5 <= v < 1 else "must be in [0.5, 1)")
    descriptors: bool = _key(True, "Ask each site for its dataset descriptors (case counts, modality, spacing, label "
                                   "prevalence) for the model card; each site's policy says exact, noisy (DP, charged) "
                                   "or none (release_descriptors).")
    gate_min_score: float = _key(0.0, "Release gate: the lowest score any validating site may report; 0: none.",
                                 _non_negative)
    gate_max_gap: float = _key(0.0, "Release gate: the largest gap between the best and the worst site; 0: none.",
                               _non_negative)
    gate_min_sites: int = _key(1, "Release gate: sites that must have validated the version.", _positive)


@dataclass(frozen=True)
class NodePolicyConfig:
    """A privacy policy `fl run` writes into every simulated node (deployed nodes set their own)."""

    epsilon: float = _key(0.0, "Record-level budget of each simulated node; 0 (with no other budget, requirement, "
                               "release mode or distributed-noise bound set) leaves the nodes' policies as they are.",
                          _non_negative)
    delta: float = _key(1e-5, "Record-level delta of that budget.", _delta)
    min_noise_multiplier: float = _key(0.0, "Weakest DP-SGD noise a node accepts.", _non_negative)
    max_clip_norm: float = _key(0.0, "Largest DP-SGD clipping norm a node accepts; 0: any.", _non_negative)
    require_secagg: bool = _key(False, "Each simulated node sends its update only masked by SecAgg+ "
                                       "(refuses plain train requests).")
    require_distributed_noise: bool = _key(False, "Each simulated node sends its update only under SecAgg+ with "
                                                  "its own share of the central noise (secagg.noise = distributed).")
    release_metrics: str = _key(
        "auto", "What each simulated node releases besides its model: exact metrics, noisy (DP, charged to its "
        "ledger), none; auto: none under a budget or local DP, exact otherwise.",
        _one_of("auto", "exact", "noisy", "none"))
    metrics_noise_multiplier: float = _key(5.0, "Noise std on a noisy metric's sum (sensitivity 1).", _positive)
    release_descriptors: str = _key(
        "auto", "The dataset descriptors each simulated node releases to fl validate: exact, noisy (DP, charged to "
        "its ledger), none; auto as for metrics.", _one_of("auto", "exact", "noisy", "none"))
    descriptors_noise_multiplier: float = _key(5.0, "Noise std over the descriptors' L2 sensitivity "
                                                    "(sqrt(2 + labels) cases).", _positive)
    client_epsilon: float = _key(0.0, "Each simulated node's client-level budget against the coordinator, counting "
                                      "its own share of distributed noise only (z / sqrt(t)); 0: none.", _non_negative)
    client_delta: float = _key(1e-5, "Delta of that client-level budget.", _delta)
    min_distributed_noise: float = _key(0.0, "Weakest distributed-noise multiplier z on the sum a node accepts.",
                                        _non_negative)
    max_distributed_clip: float = _key(0.0, "Largest update clipping norm a node accepts under distributed noise; "
                                            "0: any.", _non_negative)
    min_contributors: int = _key(3, "Smallest SecAgg+ threshold t a node accepts (at least 3).",
                                 lambda v: None if v >= wire.SECAGG_MIN_NODES else f"must be >= {wire.SECAGG_MIN_NODES}")
    max_contributors: int = _key(0, "Largest SecAgg+ threshold t a node accepts (its share is sized z / sqrt(t)); "
                                    "0: any.", _non_negative)
    max_evaluations_per_round: int = _key(1, "Evaluation requests a node serves per run and round.", _positive)
    secagg_protocol: str = _key("any", "any, or malicious: each simulated node sends its update only under "
                                       "OncoFed's malicious-secure aggregation (secagg.protocol = malicious).",
                                _one_of("any", "malicious"))
    colluding_sites: int = _key(1, "Roster sites each simulated node assumes may collude with the coordinator "
                                   "(malicious protocol: it accepts t only with 2t > s + this).",
                                lambda v: None if v >= 0 else "must be >= 0")

    @property
    def sets_a_policy(self) -> bool:
        """Whether `fl run` writes these settings into every simulated node: a budget, a requirement, a
        release mode or a distributed-noise bound is set (the others only accompany one)."""
        d = type(self)()
        return (self.epsilon > 0 or self.client_epsilon > 0 or self.require_secagg or self.require_distributed_noise
                or self.release_metrics != d.release_metrics or self.release_descriptors != d.release_descriptors
                or self.min_distributed_noise > 0 or self.max_distributed_clip > 0
                or self.min_contributors != d.min_contributors or self.max_contributors > 0
                or self.max_evaluations_per_round != d.max_evaluations_per_round
                or self.secagg_protocol != d.secagg_protocol or self.colluding_sites != d.colluding_sites)


@dataclass(frozen=True)
class RegistryConfig:
    """Where global model versions are committed, and whether to continue the newest."""

    root: str = _key("./registry", "Registry folder: <root>/<model_name>/v<N>/ per committed round.", _non_empty)
    resume: bool = _key(
        False,
        "Continue from the newest version of model_name: its weights, strategy state and round "
        "counter (`fl run --resume`).",
    )
    mlflow_uri: str = _key(
        "",
        "Also mirror each version into this MLflow Model Registry (e.g. sqlite:///mlflow.db); "
        "empty: off. Needs the mlflow extra.",
    )


@dataclass(frozen=True)
class Config:
    """One federation run. Sections are nested dataclasses; keys are dotted names."""

    task: str = _key("seg2d", f"Task from the catalogue: {', '.join(TASK_NAMES)}.", _one_of(*TASK_NAMES))
    bundle: str = _key(
        "", "A MONAI bundle folder (Model Zoo layout: configs/train.json, configs/metadata.json) to train "
        "instead of task: its network, preprocessing, loss, optimizer, inferer and key metric; nodes use "
        "their own dataset.json and train.epochs per round. Deployed nodes find it in the app (configs/bundles/).")
    rounds: int = _key(3, "Number of federated rounds.", _positive)
    seed: int = _key(0, "Seed for the initial model, data synthesis and local shuffling.")
    model_name: str = _key(
        "oncofed", "Name of the model in the registry (letters, digits, '.', '_', '-').", _model_name
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    central_dp: CentralDpConfig = field(default_factory=CentralDpConfig)
    local_dp: LocalDpConfig = field(default_factory=LocalDpConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    node_policy: NodePolicyConfig = field(default_factory=NodePolicyConfig)

    def __post_init__(self) -> None:
        if self.central_dp.enabled and self.strategy.fraction_train < 1:
            raise ConfigError(
                "strategy.fraction_train: under central DP the accountant must know the sampling; "
                "set central_dp.sampling = 'poisson' with central_dp.sample_rate instead"
            )
        if self.local_dp.enabled and self.train.amp:
            raise ConfigError(
                "train.amp: float16 per-sample gradients would be clipped and noised at reduced precision; "
                "mixed precision cannot be combined with local_dp.enabled"
            )
        if self.local_dp.enabled and self.train.proximal_mu > 0:
            raise ConfigError(
                "train.proximal_mu: the FedProx term is not privatised by DP-SGD; it cannot be combined "
                "with local_dp.enabled"
            )
        if self.central_dp.enabled and self.strategy.name == "fedexp":
            raise ConfigError(
                "strategy.name: fedexp takes its step from each node's update; under central DP the server sees "
                "only their noisy sum (use fedavg or fedavgm)"
            )
        if self.strategy.name == "fedprox" and self.train.proximal_mu <= 0:
            raise ConfigError(
                "train.proximal_mu: strategy.name = 'fedprox' needs a proximal weight > 0 "
                f"(got {self.train.proximal_mu})"
            )
        if self.bundle:
            self._check_bundle()
        if self.data.synthetic_format == "dicom" and self.data.synthetic != "ct":
            raise ConfigError(f"data.synthetic_format: dicom is written for data.synthetic = 'ct' only, not "
                              f"{self.data.synthetic!r}; set data.synthetic = 'ct' or "
                              "data.synthetic_format = 'nifti'")
        if self.simulation.adversaries > self.data.nodes:
            raise ConfigError(f"simulation.adversaries: {self.simulation.adversaries} is more than data.nodes")
        if not self.strategy.trim_beta < 0.5:
            raise ConfigError(f"strategy.trim_beta: must be < 0.5, got {self.strategy.trim_beta}")
        if self.strategy.min_replies > self.data.nodes:
            raise ConfigError(
                f"strategy.min_replies: {self.strategy.min_replies} is more than data.nodes = {self.data.nodes}"
            )
        if self.strategy.min_nodes > self.data.nodes:
            raise ConfigError(
                f"strategy.min_nodes: {self.strategy.min_nodes} is more than data.nodes = "
                f"{self.data.nodes}"
            )
        if self.central_dp.enabled and self.central_dp.delta >= 1 / self.data.nodes:
            raise ConfigError(f"central_dp.delta: {self.central_dp.delta:g} is not below 1/{self.data.nodes} (one over "
                              "the nodes); with it, releasing one node's update outright would meet the guarantee")
        if self.secagg.enabled:
            self._check_secagg()
        self._check_dp_options()

    def _check_dp_options(self) -> None:
        """The local DP options that need an image task (a bundle's network and cases)."""
        d = self.local_dp
        image = bool(self.bundle) or self.task != "tabular"
        if not image:
            for key, value, default in (("trainable", d.trainable, "all"), ("views", d.views, 1),
                                        ("ema_decay", d.ema_decay, 0.0)):
                if value != default:
                    raise ConfigError(f"local_dp.{key}: {value!r} is for image tasks; task {self.task!r} trains an "
                                      f"MLP on records: leave it at {default!r}")
        if self.pretrain.source and not image:
            raise ConfigError(f"pretrain.source: pretraining is for image tasks, not task {self.task!r}")
        if self.pretrain.source == "synthetic" and self.bundle:
            raise ConfigError("pretrain.source: the public synthetic generator makes the catalogue tasks' images; "
                              "for a bundle, name a folder of public cases (a dataset.json)")

    def check_resources(self) -> None:
        """What the config names outside itself exists and is what it should be: the bundle (found,
        parsed, every component there; converted for DP-SGD under local DP) and the public cases of
        ``pretrain.source``. Building a config never touches the file system; the command line and
        the ServerApp call this once, where a config enters, so a bad path is a clear error there
        rather than on every node."""
        if self.pretrain.source not in ("", "synthetic") and not (Path(self.pretrain.source) / "dataset.json").is_file():
            raise ConfigError(f"pretrain.source: {self.pretrain.source!r} is neither 'synthetic' nor a folder with a "
                              "dataset.json of public cases")
        if self.bundle:
            self.resolved_task()

    def _check_bundle(self) -> None:
        if self.train.workers < -1:
            raise ConfigError(f"train.workers: must be -1 (auto) or >= 0, got {self.train.workers}")
        if self.data.synthesize and self.data.synthetic == "task":
            raise ConfigError("data.synthetic: a bundle trains on volumes; set it to ct or brain-mri to synthesize "
                              "data for it, or data.synthesize = false with your own node folders")

    def _check_secagg(self) -> None:
        """Refuse what SecAgg+ cannot honour: anything that needs one node's update."""
        why = None
        if self.strategy.name in ("median", "trimmedavg", "krum", "fedexp"):
            why = f"strategy.name: {self.strategy.name} needs every update; SecAgg+ reveals only their sum"
        elif self.strategy.max_update_norm > 0:
            why = "strategy.max_update_norm: the server cannot check one update's norm under SecAgg+"
        elif self.central_dp.enabled and self.central_dp.clip_on != "client":
            why = "central_dp.clip_on: the server cannot clip updates it never sees; set it to 'client' with SecAgg+"
        elif self.central_dp.enabled and self.central_dp.clipping == "adaptive":
            why = "central_dp.clipping: adaptive clipping needs each node's unclipped bit; use 'fixed' with SecAgg+"
        elif self.data.nodes < wire.SECAGG_MIN_NODES or self.min_nodes < wire.SECAGG_MIN_NODES:
            why = (f"data.nodes: SecAgg+ among 2 nodes shows each node the other's update; use "
                   f"{wire.SECAGG_MIN_NODES} or more")
        elif self.central_dp.enabled and 0 < self.secagg.clipping_range < self.central_dp.clipping_norm:
            why = (f"secagg.clipping_range: {self.secagg.clipping_range} is below central_dp.clipping_norm = "
                   f"{self.central_dp.clipping_norm}; clipped coordinates would change the update")
        elif self.simulation.adversaries > 0:
            why = "simulation.adversaries: hostile virtual nodes are not modelled under SecAgg+"
        elif self.data.nodes * wire.SECAGG_TARGET_RANGE >= wire.SECAGG_MOD_RANGE:
            why = (f"data.nodes: a SecAgg+ sum of {self.data.nodes} updates quantised to 2^22 wraps its 2^32 field; "
                   f"at most {wire.SECAGG_MOD_RANGE // wire.SECAGG_TARGET_RANGE - 1} nodes")
        elif self.secagg.noise == "distributed":
            why = self._distributed_noise_problem()
        if why:
            raise ConfigError(why)

    def _distributed_noise_problem(self) -> str | None:
        if not self.central_dp.enabled:
            return "secagg.noise: distributed noise is central DP's noise, added by the nodes; set central_dp.enabled"
        if self.secagg.shares < 1:
            return ("secagg.shares: distributed noise is sized for SecAgg+'s reconstruction threshold over the whole "
                    "cohort; use 1.0")
        if self.secagg.clipping_range > 0:
            return ("secagg.clipping_range: under distributed noise OncoFed chooses it (a power of two that holds "
                    "the noise); leave it 0")
        return None

    def resolved_task(self) -> Task:
        """The run's task object: the bundle (converted for DP-SGD under local DP) or the catalogue's."""
        return self._task

    @functools.cached_property
    def _task(self) -> Task:  # found and parsed once per config (a bundle's files are read then)
        from fl.learn import resolve_task

        return resolve_task(self.task, self.bundle, private=self.local_dp.enabled, lr=self.train.lr,
                            batch_size=self.train.batch_size)

    @property
    def task_label(self) -> str:
        """How manifests and summaries name the task: ``bundle:<name>`` or the catalogue name."""
        return f"bundle:{self.resolved_task().name}" if self.bundle else self.task

    @property
    def min_nodes(self) -> int:
        """Nodes the server waits for before sampling (all of them unless set)."""
        return self.strategy.min_nodes or self.data.nodes

    def to_flat(self) -> dict[str, Scalar]:
        """The config as Flower run config: dotted keys, scalar values."""
        return {spec.key: spec.get(self) for spec in KEYS}

    def settings_hash(self) -> str:
        """SHA-256 of the keys that shape the model (not where outputs go or whether resumed)."""
        shaping = {k: v for k, v in self.to_flat().items() if not k.startswith(("output.", "registry."))}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()

    def replace(self, **flat: Scalar) -> Config:
        """A copy with some dotted keys changed, validated like a loaded file (its resources are
        not looked at again: :meth:`check_resources`)."""
        return from_flat({**self.to_flat(), **flat}, source="override")


@dataclass(frozen=True)
class KeySpec:
    """One documented config key."""

    key: str
    section: str | None
    name: str
    type: type
    default: Scalar
    doc: str
    check: Callable[[Any], str | None] | None

    def get(self, cfg: Config) -> Scalar:
        holder = getattr(cfg, self.section) if self.section else cfg
        return typing.cast(Scalar, getattr(holder, self.name))


def _specs() -> Iterator[KeySpec]:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            sub_hints = typing.get_type_hints(kind)
            for g in dataclasses.fields(kind):
                yield KeySpec(
                    f"{f.name}.{g.name}", f.name, g.name, sub_hints[g.name], g.default,
                    g.metadata["doc"], g.metadata["check"],
                )
        else:
            yield KeySpec(f.name, None, f.name, kind, f.default, f.metadata["doc"], f.metadata["check"])


KEYS: tuple[KeySpec, ...] = tuple(_specs())
_BY_KEY = {spec.key: spec for spec in KEYS}


def _coerce(spec: KeySpec, value: Any, source: str) -> Scalar:
    where = f"{source}: {spec.key}"
    expected = spec.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if spec.check is not None and (problem := spec.check(value)):
        raise ConfigError(f"{where}: {problem}, got {value!r}")
    return typing.cast(Scalar, value)


def from_flat(flat: Mapping[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from dotted keys; missing keys take their defaults."""
    unknown = [k for k in flat if k not in _BY_KEY]
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {key!r}{hint}; `fl config keys` lists them")
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, raw in flat.items():
        spec = _BY_KEY[key]
        value = _coerce(spec, raw, source)
        if spec.section:
            sections.setdefault(spec.section, {})[spec.name] = value
        else:
            top[spec.name] = value
    hints = typing.get_type_hints(Config)
    for name, values in sections.items():
        top[name] = hints[name](**values)
    try:
        return Config(**top)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def flatten(table: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Turn nested TOML tables into dotted keys."""
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            if key in _BY_KEY:
                raise ConfigError(f"{source}: {key} must be a value, not a table")
            flat.update(flatten(value, source, f"{key}."))
        else:
            flat[key] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from ``--set``; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rounds=5")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config file and apply ``--set`` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    flat = flatten(table, str(path))
    flat.update(parse_override(item) for item in overrides)
    cfg = from_flat(flat, source=str(path))
    try:
        cfg.check_resources()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def _toml_literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def reference_markdown() -> str:
    """The config reference as a Markdown table (docs/reference/config.md; a test keeps it current)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in KEYS:
        rows.append(
            f"| `{spec.key}` | {spec.type.__name__} | `{_toml_literal(spec.default)}` | {spec.doc} |"
        )
    return "\n".join(rows)
