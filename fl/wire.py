"""Names on the wire between the ServerApp and the nodes' ClientApps.

Both sides import these constants; a message carries only weights (``arrays``), counts and
metrics (``metrics``) and instructions (``config``): never images, labels, paths or
per-sample outputs.
"""

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

# metrics in a node's reply
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
VAL_LOSS = "val-loss"
DICE = "dice"
AUC = "auc"  # the tabular task's score
ACCURACY = "accuracy"  # the tabular task's score when a node releases noisy metrics
SCORES = (DICE, AUC, ACCURACY)


def score(metrics: dict) -> float | None:  # type: ignore[type-arg]
    """The task's validation score in an aggregate (Dice for segmentation, AUC for tabular)."""
    return next((metrics[k] for k in SCORES if k in metrics), None)

# node-info in a train reply
DATASET_FINGERPRINT = "dataset-fingerprint"  # HMAC-SHA256, under the node's own key, of its data's digest

# node config (deployment: `--node-config "data-dir='/data/site'"`; simulation: partition-id)
NODE_DATA_DIR = "data-dir"
NODE_PARTITION_ID = "partition-id"
NODE_STATE_DIR = "state-dir"  # optional: where the node keeps its privacy policy and ledger

# SecAgg+ among fewer nodes lets a participant read another's update from the result (with two,
# each subtracts its own); a round with fewer sampled or surviving contributors aggregates nothing
SECAGG_MIN_NODES = 3

# error reply codes a node may send instead of a result
ERROR_DATASET_INVALID = 4001
ERROR_TRAINING_FAILED = 4002
ERROR_BUDGET = 4003  # the node's record-level budget would be exceeded
ERROR_POLICY = 4004  # the request breaks the node's privacy policy
ERROR_LEDGER = 4005  # the node's ledger failed its checksum: it refuses to train
ERROR_APP_NOT_APPROVED = 4006  # the run's app (FAB) is not on the node operator's allowlist

# local DP (record level) in a train instruction; absent: no local DP
LOCAL_NOISE_MULTIPLIER = "local-dp-noise-multiplier"
LOCAL_MAX_GRAD_NORM = "local-dp-max-grad-norm"
# central DP with client-side clipping: the node clips its update to this norm
CLIENT_CLIP_NORM = "central-dp-clip-norm"
# distributed noise under SecAgg+: the node adds its share of z C noise for this many contributors
DDP_NOISE_MULTIPLIER = "ddp-noise-multiplier"
DDP_MIN_CONTRIBUTORS = "ddp-min-contributors"

# privacy figures in a train reply
EPSILON_RECORD = "epsilon-record"  # this node's cumulative record-level epsilon after the round
DELTA_RECORD = "delta-record"
UPDATE_NORM_BELOW_CLIP = "update-norm-below-clip"  # 1.0/0.0, for adaptive client-side clipping
METRICS_DP = "metrics-dp"  # 1.0 in an evaluate reply whose score was released with DP noise
