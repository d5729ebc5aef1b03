"""The quickstart federation as a plain Flower app, written the way Flower's PyTorch quickstart
is: a ClientApp with ``@app.train`` / ``@app.evaluate`` over a DataLoader, a ServerApp that
calls ``FedAvg.start``, run with Flower's Simulation Engine. No OncoFed round loop, validation,
registry, progress or privacy: the yardstick for OncoFed's own overhead (``fl bench overhead``).

Only the task is shared with OncoFed: the network and loss (the seg2d bundle, ``fl.learn``) and
the data reading (``fl.learn.data.load_local_data``: the same MONAI reader, preprocessing and
on-disk cache of each case), so both train the same model on identical tensors.

    python bench/baselines/flower_app.py --data DIR --nodes 3 --rounds 5 --epochs 2 --lr 0.01 \
        --batch-size 8 --result result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
SETTINGS = "ONCOFED_BASELINE"  # the virtual nodes (Ray workers) inherit the environment

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.networks.utils import one_hot  # noqa: E402

# the quickstart imports its task module (model, data, train/test) at the top, as OncoFed does
from fl.learn import resolve_task  # noqa: E402
from fl.learn.data import CACHE_DIR, load_local_data  # noqa: E402
from fl.learn.synth import node_dir  # noqa: E402
from nodes.policy import state_dir  # noqa: E402

TASK = resolve_task("seg2d")


def settings() -> dict:  # type: ignore[type-arg]
    return json.loads(os.environ[SETTINGS])


def Net() -> torch.nn.Module:  # noqa: N802 (the quickstart's name)
    return TASK.build_network()


def load_data(partition_id: int) -> tuple[DataLoader, DataLoader]:
    folder = node_dir(settings()["data"], partition_id)
    data = load_local_data(folder, TASK, disk_cache=state_dir(folder) / CACHE_DIR)
    batch = settings()["batch_size"]
    return (DataLoader(data.train.dataset, batch_size=batch, shuffle=True),
            DataLoader(data.val.dataset, batch_size=batch))


def train_fn(net: torch.nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    loss_fn = TASK.build_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    running = 0.0
    for _ in range(epochs):
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            optimizer.zero_grad()
            loss = loss_fn(net(images), labels)
            loss.backward()
            optimizer.step()
            running += loss.item()
    return running / max(len(loader) * epochs, 1)


@torch.no_grad()
def test_fn(net: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    loss_fn = TASK.build_loss()
    net.eval()
    loss, dice, n = 0.0, 0.0, 0
    for batch in loader:
        images, labels = batch["image"], batch["label"]
        logits = net(images)
        loss += loss_fn(logits, labels).item() * len(images)
        dice += float(TASK.record_scores(one_hot(logits.argmax(1, keepdim=True), 2), one_hot(labels, 2)).sum())
        n += len(images)
    return loss / n, dice / n


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(int(context.node_config["partition-id"]))
    started = time.perf_counter()
    train_loss = train_fn(model, trainloader, settings()["epochs"], float(msg.content["config"]["lr"]))
    seconds = time.perf_counter() - started
    with open(settings()["train_log"], "a", encoding="utf-8") as fh:  # for the benchmark only
        fh.write(f"{seconds}\n")
    metrics = {"train_loss": train_loss, "num-examples": len(trainloader.dataset)}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, valloader = load_data(int(context.node_config["partition-id"]))
    loss, dice = test_fn(model, valloader)
    metrics = {"eval_loss": loss, "dice": dice, "num-examples": len(valloader.dataset)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    s = settings()
    torch.manual_seed(s["seed"])
    started = time.perf_counter()  # as OncoFed's clock: from the ServerApp's main, modules imported
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=s["nodes"])
    ends: list[float] = []  # FedAvg.start calls evaluate_fn before round 1 and after each round

    def clock(server_round: int, arrays: ArrayRecord) -> None:  # for the benchmark only
        ends.append(time.perf_counter())

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": s["lr"]}), num_rounds=s["rounds"], evaluate_fn=clock)
    wall = time.perf_counter() - started
    final = result.evaluate_metrics_clientapp[s["rounds"]]
    trained = sum(float(line) for line in Path(s["train_log"]).read_text().split())
    Path(s["result"]).write_text(json.dumps({"wall_per_round_s": wall / s["rounds"],
                                             "round_seconds": [b - a for a, b in zip([started, *ends[1:]], ends[1:])],
                                             "train_per_round_s": trained / s["rounds"], "dice": final["dice"]}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag, kind in (("--data", str), ("--nodes", int), ("--rounds", int), ("--epochs", int), ("--lr", float),
                       ("--batch-size", int), ("--seed", int), ("--result", str)):
        parser.add_argument(flag, type=kind, required=flag != "--seed", default=0)
    args = parser.parse_args()
    result = Path(args.result).resolve()
    train_log = result.with_suffix(".train-seconds")
    train_log.unlink(missing_ok=True)
    os.environ[SETTINGS] = json.dumps({
        "data": str(Path(args.data).resolve()), "nodes": args.nodes, "rounds": args.rounds, "epochs": args.epochs,
        "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "result": str(result),
        "train_log": str(train_log),
    })
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flwr.simulation import run_simulation

    # the same engine settings as `fl run`: one CPU per virtual node
    run_simulation(server_app=server, client_app=app, num_supernodes=args.nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
