"""Page load times of the consoles on a long history.

    python bench/console_load.py [--versions 200] [--entries 10000] [--repeat 20]

Builds, in a temporary folder, a registry of ``--versions`` versions of one model (four runs, each
resumed from the one before; small safetensors weights, hash-chained as ``fl run`` commits them;
three sites' validation records on the newest), a run folder with a round record per version, and
a node whose record-level ledger holds ``--entries`` hash-chained entries (and as many request log
lines). Then, for each main page, the median of ``--repeat`` loads:

- server: the whole response over HTTP on loopback (httpx), after one warm-up load;
- browser: Chromium's navigation timing (``loadEventEnd``: HTML, Plotly's script from the cache,
  the charts drawn) in the same headless Chromium the tests use, where one is installed.

The first load of a model page verifies the whole chain (every version's weights hashed); that
figure is printed apart (``first``), later loads reuse the result while no file changed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def build_registry(root: Path, runs: Path, versions: int) -> None:
    import torch
    from safetensors.torch import save

    from fl.config import Config
    from fl.registry import Registry
    from fl.server.run_folder import RunFolder, nested

    rng = random.Random(0)
    registry = Registry(root)
    per_run = max(versions // 4, 1)
    parent, resumed = None, None
    fps = [f"{i:02d}" * 32 for i in range(3)]
    cfg = Config().replace(model_name="bench")
    folder = runs / "bench-run"
    folder.mkdir(parents=True)
    import tomli_w

    (folder / "config.toml").write_text(tomli_w.dumps(nested(cfg)))
    log = RunFolder(folder)
    for i in range(versions):
        run = f"bench-{i // per_run}"
        weights = save({f"layer{k}.weight": torch.randn(16, 16) for k in range(8)})
        score = 0.5 + 0.4 * (1 - 1 / (i + 2)) + rng.gauss(0, 0.01)
        record = {"round": i + 1, "train": {"aggregate": {"train-loss": 1 / (i + 1)}, "nodes": {str(n): {} for n in range(3)}},
                  "evaluate": {"aggregate": {"dice": score},
                               "nodes": {str(n): {"dice": score + rng.gauss(0, 0.02)} for n in range(3)},
                               "dp_released": False},
                  "failures": {}, "privacy": {"client_level": None, "record_level": {}}}
        version = registry.commit("bench", weights=weights, state=b"state", expected_parent=parent, fields={
            "run_id": run, "round": i % per_run + 1, "task": "seg2d", "config": cfg.to_flat(),
            "resumed_from": resumed if i % per_run == 0 else None, "pretraining": None,
            "strategy": {"name": "fedavg", "local_epochs": 1, "local_lr": 0.01, "batch_size": 8, "min_nodes": 3},
            "dp": {"central": None, "local": None}, "secure_aggregation": None, "bundle": None,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "nodes": [{"node_id": str(n), "num_examples": 30, "dataset_fingerprint": fp} for n, fp in enumerate(fps)],
            "failures": {}, "metrics": {"train": record["train"], "evaluate": record["evaluate"]},
            "privacy": record["privacy"]})
        parent = version.hash
        if (i + 1) % per_run == 0:
            resumed = version.ref()
        log.append_round({**record, "version": version.ref(), "seconds": 1.0})
    log.close()
    log.write_summary({"rounds": versions})
    newest = registry.latest("bench")
    for n, fp in enumerate(fps):
        score = 0.8 + 0.05 * n
        registry.add_validation(newest, {"site": f"site-{n}", "dataset_fingerprint": fp, "trained_it": True,
                                         "metric": "dice", "score": score, "ci_low": score - 0.04,
                                         "ci_high": score + 0.04, "confidence": 0.95, "cases": 12,
                                         "release": "exact", "time": dt.datetime.now(dt.timezone.utc).isoformat()})


def build_node(data: Path, entries: int) -> None:
    from fl.privacy import hashchain
    from nodes.ledger import LEDGER_FILE
    from nodes.policy import Policy, save_policy, state_dir

    state = state_dir(data)
    state.mkdir(parents=True)
    save_policy(state, Policy(epsilon=8.0))
    written: list[dict[str, Any]] = []
    path = state / LEDGER_FILE
    eps = 0.0
    for i in range(entries):
        eps += 8.0 / entries * 0.9
        written.append(hashchain.append_entry(path, written, {
            "event": {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100}, "epsilon_after": eps,
            "delta": 1e-5, "accountant": "rdp", "release": "training", "run": 1 + i // 50,
            "server_round": i % 50 + 1, "schema": 1}))
    with open(state / "requests.jsonl", "w", encoding="utf-8") as fh:
        for i in range(entries):
            fh.write(json.dumps({"time": time.time(), "kind": "train", "run": 1 + i // 50, "server_round": i % 50 + 1,
                                 "outcome": "served", "code": None, "reason": "", "schema": 1}) + "\n")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=200)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import browser
    import httpx

    from fl.console.coordinator import coordinator_app
    from fl.console.web import Running, bind, guard_for, new_token
    from nodes.console import node_app

    tmp = Path(tempfile.mkdtemp(prefix="oncofed-console-bench-"))
    t0 = time.perf_counter()
    build_registry(tmp / "registry", tmp / "runs", args.versions)
    build_node(tmp / "node", args.entries)
    print(f"built {args.versions} versions and a ledger of {args.entries} entries in {time.perf_counter() - t0:.1f} s")

    servers = {}
    for kind, make in (("coordinator", lambda g: coordinator_app(tmp / "registry", tmp / "runs", g)),
                       ("node", lambda g: node_app(tmp / "node", g))):
        sock = bind("127.0.0.1", 0, None)
        guard = guard_for(sock, "127.0.0.1", new_token(), None)
        servers[kind] = (Running(make(guard), sock, None).start(), guard, f"http://127.0.0.1:{sock.getsockname()[1]}")
    newest = f"v{args.versions}"
    pages = [("coordinator", "/", "home"), ("coordinator", "/runs/bench-run", "run view"),
             ("coordinator", "/models/bench", "lineage and versions"),
             ("coordinator", f"/models/bench/{newest}", "version, validations"),
             ("coordinator", f"/models/bench/{newest}/dossier", "dossier"),
             ("node", "/", f"node: ledger of {args.entries}")]
    rows = []
    for kind, path, what in pages:
        _, guard, base = servers[kind]
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {guard.token}"}, timeout=120) as client:
            started = time.perf_counter()
            first = client.get(path)
            first_s = time.perf_counter() - started
            assert first.status_code == 200, (path, first.status_code, first.text[:300])
            samples = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                samples.append(time.perf_counter() - started)
        rows.append({"page": what, "path": path, "bytes": len(first.content), "first_ms": first_s * 1000,
                     "server_ms": median_ms(samples)})

    if browser.missing() is None:
        gen = browser.chromium()
        driver = next(gen)
        try:
            for row, (kind, path, _) in zip(rows, pages, strict=True):
                _, guard, base = servers[kind]
                driver.get(f"{base}/?token={guard.token}")
                loads = []
                for i in range(args.repeat + 1):
                    driver.get(f"{base}{path}")
                    timing = driver.execute_script(
                        "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd;")
                    if i:  # the first fills the cache with Plotly's script
                        loads.append(timing / 1000)
                row["browser_ms"] = median_ms(loads)
        finally:
            gen.close()
    else:
        print(f"browser figures skipped: {browser.missing()}")
    for server, _, _ in servers.values():
        server.stop()

    print(f"\n{'page':28} {'bytes':>9} {'first':>9} {'server':>9} {'browser':>9}   (ms; median of {args.repeat})")
    for r in rows:
        b = f"{r['browser_ms']:9.1f}" if "browser_ms" in r else f"{'-':>9}"
        print(f"{r['page']:28} {r['bytes']:9d} {r['first_ms']:9.1f} {r['server_ms']:9.1f} {b}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
