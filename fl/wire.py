"""Names on the wire between the ServerApp and the nodes' ClientApps, and the shapes of the
SecAgg+ messages both sides exchange.

Both sides import these; a message carries only weights (``arrays``), counts and metrics
(``metrics``) and instructions (``config``): never images, labels, paths or per-sample outputs.
Flower is imported inside the functions, so the constants stay cheap to import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import ConfigRecord, RecordDict

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NODE_INFO = "node-info"  # a ConfigRecord in train replies: strings that aren't metrics

# config sent with a train or evaluate instruction
SERVER_ROUND = "server-round"
TASK = "task"
EPOCHS = "epochs"
LR = "lr"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx strategy writes
SEED = "seed"
DEVICE = "device"  # auto, cpu, cuda or cuda:N (a deployed node's node config may override it)
AMP = "amp"  # 1: float16 autocast on CUDA
BUNDLE = "bundle"  # a bundle task: the bundle's path (absolute, or inside the app) ...
BUNDLE_DIGEST = "bundle-digest"  # ... and the digest of its configs, which the node checks
BATCHNORM = "batchnorm"  # fedavg, or local (FedBN: a node keeps its BatchNorm layers)
WORKERS = "workers"  # DataLoader workers for bundle tasks; -1: auto

# metrics in a node's reply
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
VAL_LOSS = "val-loss"
DICE = "dice"
AUC = "auc"  # the tabular task's score
ACCURACY = "accuracy"  # the tabular task's score when a node releases noisy metrics
SCORES = (DICE, AUC, ACCURACY)


def score(metrics: dict[str, Any]) -> float | None:
    """The task's validation score in an aggregate (Dice for segmentation, AUC for tabular)."""
    return next((metrics[k] for k in SCORES if k in metrics), None)

# node-info in a train reply
DEVICE_NAME = "device-name"  # the hardware the node trained on, e.g. "cpu" or "cuda:0 (NVIDIA H200)"
DATASET_FINGERPRINT = "dataset-fingerprint"  # HMAC-SHA256, under the node's own key, of its data's digest
LEDGER_HEAD = "ledger-head"  # in every reply: the node's ledger heads (nodes.witness), which the coordinator keeps
LEDGER_ACKS = "ledger-acks"  # in every instruction: the heads the coordinator acknowledged, by site id (JSON)

# node config (deployment: `--node-config "data-dir='/data/site'"`; simulation: partition-id)
NODE_DATA_DIR = "data-dir"
NODE_PARTITION_ID = "partition-id"
NODE_STATE_DIR = "state-dir"  # optional: where the node keeps its privacy policy and ledger
NODE_DEVICE = "device"  # optional: this node's device, over the run config's train.device

# SecAgg+ among fewer nodes lets a participant read another's update from the result (with two,
# each subtracts its own); a round with fewer sampled or surviving contributors aggregates nothing
SECAGG_MIN_NODES = 3
# OncoFed's SecAgg+ settings, pinned: each node's guard refuses any other (nodes.secagg_guard). A sum of
# n updates quantised to TARGET_RANGE stays below MOD_RANGE only for n < 1024; weights are equal
SECAGG_TARGET_RANGE = 2**22
SECAGG_MOD_RANGE = 2**32
SECAGG_MAX_WEIGHT = 1.0

# error reply codes a node may send instead of a result
ERROR_DATASET_INVALID = 4001
ERROR_TRAINING_FAILED = 4002
ERROR_BUDGET = 4003  # the node's record-level budget would be exceeded
ERROR_POLICY = 4004  # the request breaks the node's privacy policy
ERROR_LEDGER = 4005  # the node's ledger failed its checksum: it refuses to train
ERROR_APP_NOT_APPROVED = 4006  # the run's app (FAB) is not on the node operator's allowlist
ERROR_NODE_WORKER_DIED = 4007  # the node's warm worker process died while serving the message
ERROR_APP_LOAD_FAILED = 4008  # the node's worker could not import the run's (approved) app
ERROR_MALFORMED_REPLY = 4009  # the server could not unpack a reply's content (fl.packing)
ERROR_NODE_FAILED = 4010  # the node itself failed while serving the message (its disk full, ...)

# local DP (record level) in a train instruction; absent: no local DP
LOCAL_NOISE_MULTIPLIER = "local-dp-noise-multiplier"
LOCAL_MAX_GRAD_NORM = "local-dp-max-grad-norm"
VALIDATE = "validate"  # in an evaluate instruction: bootstrap resamples for the site's confidence interval
CONFIDENCE = "confidence"
SCORE_LOW = "score-ci-low"  # a validation reply's interval around its score
SCORE_HIGH = "score-ci-high"
SITE_ID = "site-id"  # a node's pseudonymous id (HMAC under its own key), in validation replies
DESCRIBE = "describe"  # in a validation instruction: 1 asks each site for its dataset descriptors
DESCRIPTORS = "descriptors"  # a ConfigRecord in a validation reply: nodes.descriptors' release
DESCRIPTORS_DECLINED = "descriptors-declined"  # in node-info: why a site released no descriptors
CLASS_PREFIX = "class-"  # a validation reply's per-class Dice of a multi-class task: class-<i>[-low|-high|-cases]
LOCAL_TRAINABLE = "local-dp-trainable"  # fl.learn.trainable: which parameters DP-SGD trains
LOCAL_VIEWS = "local-dp-views"  # augmentation multiplicity
LOCAL_VIEW_AUGMENT = "local-dp-view-augment"
LOCAL_EMA_DECAY = "local-dp-ema-decay"
# A train instruction's local-DP keys, each once for both sides: (wire key, ``local_dp`` config key and
# DP-SGD option of the same name, its type, what a node assumes when the server sends none)
LOCAL_PER_CASE = "local-dp-per-case"
LOCAL_DP_OPTIONS = ((LOCAL_TRAINABLE, "trainable", str, "all"), (LOCAL_VIEWS, "views", int, 1),
                    (LOCAL_VIEW_AUGMENT, "view_augment", str, "flips"), (LOCAL_EMA_DECAY, "ema_decay", float, 0.0),
                    (LOCAL_PER_CASE, "per_case", str, "auto"))


def local_dp_instruction(section: Any) -> dict[str, Any]:
    """What the server sends of its ``local_dp`` config section: the mechanism and its options."""
    mechanism = {LOCAL_NOISE_MULTIPLIER: section.noise_multiplier, LOCAL_MAX_GRAD_NORM: section.max_grad_norm}
    return {**mechanism, **{key: getattr(section, name) for key, name, _, _ in LOCAL_DP_OPTIONS}}


def local_dp_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The DP-SGD options a node reads from a train instruction, by name (defaults where absent)."""
    return {name: kind(config.get(key, default)) for key, name, kind, default in LOCAL_DP_OPTIONS}
# central DP with client-side clipping: the node clips its update to this norm
CLIENT_CLIP_NORM = "central-dp-clip-norm"
# distributed noise under SecAgg+: the node adds its share of z C noise for this many contributors
DDP_NOISE_MULTIPLIER = "ddp-noise-multiplier"
DDP_MIN_CONTRIBUTORS = "ddp-min-contributors"

# privacy figures in a train reply
EPSILON_RECORD = "epsilon-record"  # this node's cumulative record-level epsilon after the round
DELTA_RECORD = "delta-record"
UPDATE_NORM_BELOW_CLIP = "update-norm-below-clip"  # 1.0/0.0, for adaptive client-side clipping
SERVER_STEP = "server-step"  # fedexp: the round's step along the average update, in its train metrics
METRICS_DP = "metrics-dp"  # 1.0 in an evaluate reply whose score was released with DP noise


# ----- OncoFed's malicious-secure aggregation (secagg.protocol = "malicious") ----------------------
SECURE_SUM = "oncofed-secure-sum"  # the ConfigRecord of each of its stage messages
SECURE_SUM_STAGES = ("advertise", "share-keys", "collect", "consistency", "unmask")
SECURE_SUM_MASKED = "masked"  # the ArrayRecord of a collect reply: one uint32 vector, "vector"


def is_secure_sum_message(content: RecordDict) -> bool:
    return SECURE_SUM in content.config_records


# ----- SecAgg+ (Flower's legacy FitIns / FitRes shapes, as secaggplus_mod expects them) -----------
SECAGG_ARRAY_KEYS = "secagg-array-keys"  # in the instruction's config: array names, in travel order


def is_secagg_message(content: RecordDict) -> bool:
    """A SecAgg+ stage message (setup, share keys, collect masked vectors, unmask)."""
    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in content.config_records


def legacy_instruction(content: RecordDict) -> tuple[dict[str, np.ndarray], ConfigRecord] | None:
    """The global weights (by name) and config of a SecAgg+ training instruction, or None."""
    from flwr.common import Parameters, parameters_to_ndarrays

    if "fitins.parameters" not in content.array_records:
        return None
    config = content.config_records["fitins.config"]
    keys = json.loads(str(config[SECAGG_ARRAY_KEYS]))
    ndarrays = parameters_to_ndarrays(Parameters(
        tensors=[a.data for a in content.array_records["fitins.parameters"].values()], tensor_type="numpy.ndarray"))
    return dict(zip(keys, ndarrays, strict=True)), config


def legacy_reply(update: dict[str, np.ndarray], keys: list[str], metrics: dict[str, Any]) -> RecordDict:
    """A FitRes for ``secaggplus_mod``: the update (weight 1) and the node's scalar metrics."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fl.flower_compat.legacy import fitres_to_recorddict

    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update[k] for k in keys]), 1, dict(metrics))
    return fitres_to_recorddict(fitres, keep_input=False)


def legacy_reply_parts(content: RecordDict) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The update (in travel order) and the scalars of a :func:`legacy_reply`."""
    from flwr.common import parameters_to_ndarrays

    from fl.flower_compat.legacy import recorddict_to_fitres

    fitres = recorddict_to_fitres(content, keep_input=True)
    return parameters_to_ndarrays(fitres.parameters), dict(fitres.metrics)
