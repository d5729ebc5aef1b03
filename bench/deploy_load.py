"""How many SuperNodes one machine holds: memory per node, round overhead, the SuperLink's CPU.

    python bench/deploy_load.py [--nodes 3 6 12 24] [--rounds 3] [--front nginx]

For each count, a fresh deployment on this machine (SuperLink behind the Fleet-only front, that
many `fl node start` SuperNodes, each with its warm worker; seg2d, FedAvg, no DP, every node
sampled every round). After the run: each node's memory as the proportional set size (PSS:
shared pages split between the processes sharing them) of its whole process tree (node
supervisor, SuperNode, worker), the later rounds' overhead (wall minus the slowest node's
training, as `fl bench deploy`), and the SuperLink's and the front's CPU seconds per round.
Writes ``load.json``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fl.bench.runners import _deploy_rounds  # noqa: E402
from fl.deploy import processes as deploy  # noqa: E402
from fl.deploy.demo import Cluster, run_config  # noqa: E402


def tree_pss_mb(pid: int) -> float:
    import psutil

    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total / 2**20


def cpu_seconds(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def measure(out: Path, nodes: int, rounds: int, front: str) -> dict[str, Any]:
    cluster = Cluster(out, nodes=nodes, budget=None, front=front, say=lambda _: None)
    with deploy.stopped_on_exit(cluster.procs):
        try:
            started = time.monotonic()
            cluster.start()
            ready = time.monotonic() - started
            link, front_proc = cluster.started["superlink"].pid, dict(cluster.procs.procs)["front"].pid
            cpu_before = cpu_seconds(link), cpu_seconds(front_proc)
            flat = run_config(cluster.out, rounds, nodes, ["local_dp.enabled=false", "output.run_name='load'",
                                                            "model_name='load'"])
            began = time.monotonic()
            run = cluster.submit(flat, "load", 1800)
            wall = time.monotonic() - began
            if run.get("status") != "finished:completed":
                raise RuntimeError(f"{nodes} nodes: {run.get('status')}; see {cluster.out / 'logs' / 'load.log'}")
            link_cpu = cpu_seconds(link) - cpu_before[0]
            front_cpu = cpu_seconds(front_proc) - cpu_before[1]
            memory = [tree_pss_mb(cluster.started[name].pid) for name in cluster.names]
        finally:
            cluster.stop()
    rounds_info = _deploy_rounds(cluster.out / "runs" / "load")
    return {"nodes": nodes, "start_s": round(ready, 1), "run_wall_s": round(wall, 1),
            "pss_per_node_mb": sum(memory) / len(memory), "pss_max_node_mb": max(memory),
            "superlink_cpu_s_per_round": link_cpu / (rounds + 1), "front_cpu_s_per_round": front_cpu / (rounds + 1),
            **rounds_info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/deploy-load")
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 6, 12, 24])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--front", choices=["gateway", "nginx"], default="nginx")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    if root.exists():
        shutil.rmtree(root)
    rows = []
    for n in args.nodes:
        try:
            rows.append(measure(root / f"nodes-{n}", n, args.rounds, args.front))
        except Exception as exc:  # noqa: BLE001 - where it breaks is a result
            rows.append({"nodes": n, "failed": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
        (root / "load.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print("| nodes | memory per node (PSS MB) | round wall s | slowest training s | overhead s | "
          "SuperLink CPU s per round | front CPU s per round | start s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['nodes']} | failed: {r['failed']} | | | | | | |")
            continue
        print(f"| {r['nodes']} | {r['pss_per_node_mb']:.0f} | {r['round_wall_s']:.2f} | {r['slowest_train_s']:.2f} | "
              f"{r['overhead_s']:.2f} | {r['superlink_cpu_s_per_round']:.2f} | {r['front_cpu_s_per_round']:.2f} | "
              f"{r['start_s']:.0f} |")


if __name__ == "__main__":
    main()
