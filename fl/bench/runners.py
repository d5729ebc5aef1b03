"""How ``fl bench`` measures one cell of a suite (see :mod:`fl.bench.engine`).

- ``federation``: ``fl run`` of the suite's base config with the cell's ``--set`` values, DP
  calibrated to the cell's target ``epsilon`` (``dp = central | local | both``), on a fresh copy
  of the suite's data (synthetic images, real Breast Cancer Wisconsin, or synthetic tabular);
  final score, epsilon spent, wall per round, training per round, peak memory of the process tree.
- ``dp-cost``: DP-SGD step time and peak memory against non-private, per task.
- ``overhead``: the same federation as OncoFed, as a hand-written Flower app
  (``bench/baselines/flower_app.py``) and as a centralised loop over the pooled data.
- ``deploy``: the same run config on the Deployment Engine (SuperLink, gateway, 3 SuperNodes on
  this machine, TLS, node authentication) with the cell's node settings, or in simulation:
  wall per round, the slowest node's training, and the overhead (their difference).
- ``privacy-audit``: canaries in one node's training set; a loss-threshold membership attack
  turned into an empirical lower bound on epsilon (:mod:`fl.bench.audit`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl.bench.suite import runner
from fl.errors import FederationError
from fl.privacy import accounting

if TYPE_CHECKING:
    from fl.bench.suite import Cell, Row, Suite

REPO = Path(__file__).resolve().parents[2]


# ----- helpers -------------------------------------------------------------------------------------
def run_measured(command: list[str], *, cwd: Path, log: Path, timeout: float = 3600) -> tuple[float, float]:
    """Run ``command``; (wall seconds, peak RSS of its whole process tree in MB, sampled every 0.2 s)."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    peak = 0.0
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    total = 0
                    for p in tree:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak = max(peak, total / 2**20)
                except psutil.Error:
                    pass
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = proc.wait(timeout=timeout)
        finally:
            done.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise FederationError(f"{' '.join(command[:4])} ... exited {code}: {' | '.join(tail)} (log: {log})")
    return time.perf_counter() - started, peak


def prepare_data(suite: Suite, nodes: int, task: str, seed: int, out: Path) -> Path:
    """The suite's pristine federation for ``seed`` (made once, copied per cell)."""
    from fl.learn import get_task
    from fl.learn.synth import synthesize
    from fl.learn.tabular import write_federation

    source = suite.settings.get("data", "synthetic")
    pristine = out / "data" / f"{task}-{source}-{nodes}-{suite.settings.get('train_cases', 0)}-seed{seed}"
    if pristine.exists():
        return pristine
    if source == "breast-cancer":
        write_federation(pristine, nodes=nodes, source="breast-cancer", seed=seed,
                         alpha=float(suite.settings.get("alpha", 1.0)))
    elif task == "tabular":
        write_federation(pristine, nodes=nodes, source="synthetic", seed=seed,
                         records_per_node=int(suite.settings.get("records_per_node", 60)))
    else:
        synthesize(pristine, nodes=nodes, task=get_task(task), seed=seed,
                   image_size=int(suite.settings.get("image_size", 0)),
                   train_cases=int(suite.settings.get("train_cases", 0)))
    return pristine


def dp_overrides(cfg: Any, root: Path, dp: str | None, epsilon: float | None, delta: float) -> list[str]:
    """``--set`` values that calibrate the noise to ``epsilon`` over the whole run."""
    if not dp:
        return []
    if epsilon is None:
        raise FederationError(f"dp = {dp!r} needs a target 'epsilon'")
    sets = []
    if dp in ("central", "both"):
        q = cfg.central_dp.sample_rate if cfg.central_dp.sampling == "poisson" else 1.0
        sigma = accounting.calibrate(target_epsilon=epsilon, sample_rate=q, steps=cfg.rounds, delta=delta)
        sets += ["central_dp.enabled=true", f"central_dp.noise_multiplier={sigma}", f"central_dp.delta={delta}"]
    if dp in ("local", "both"):
        sigma = local_sigma(cfg, root, epsilon, delta)
        # the suites measure utility on synthetic or public sites: they release exact scores, so
        # the epsilon reported covers the model (what a hospital would publish), not the scores
        sets += ["local_dp.enabled=true", f"local_dp.noise_multiplier={sigma}", f"node_policy.epsilon={epsilon}",
                 f"node_policy.delta={delta}", "node_policy.release_metrics='exact'"]
    return sets


def local_sigma(cfg: Any, root: Path, target: float, delta: float) -> float:
    """The DP-SGD noise multiplier keeping every node within ``target`` after all rounds."""
    from fl.learn import get_task
    from fl.learn.data import load_local_data
    from fl.learn.synth import node_dir

    counts = [len(load_local_data(node_dir(root, i), get_task(cfg.task), use_cache=False).train)
              for i in range(cfg.data.nodes)]
    return accounting.dp_sgd_noise(counts, target_epsilon=target, delta=delta, rounds=cfg.rounds,
                                   epochs=cfg.train.epochs, batch_size=cfg.train.batch_size)


def _fl_run(base: Path, sets: list[str], work: Path, data: Path) -> list[str]:
    command = [sys.executable, "-m", "fl.cli", "run", str(base), "--out", str(work / "runs"),
               "--set", "output.run_name=run", "--set", f'data.root="{data}"', "--set", "data.synthesize=false",
               "--set", f'registry.root="{work / "registry"}"', "--set", "model_name=bench"]
    for item in sets:
        command += ["--set", item]
    return command


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ----- runners --------------------------------------------------------------------------------------
def cell_config(suite: Suite, cell: Cell, seed: int) -> tuple[Path, list[str], Any]:
    """The suite's base config file, the cell's ``--set`` values and the resulting Config."""
    from fl import config

    base = REPO / suite.settings.get("base", "configs/quickstart.toml")
    sets = list(suite.settings["set"]) + list(cell.get("set", [])) + [f"seed={seed}"]
    return base, sets, config.load(base, sets)


def run_cell(suite: Suite, cell: Cell, seed: int, out: Path, data: Path) -> tuple[Path, dict[str, Any], float, float]:
    """``fl run`` of the cell on a fresh copy of ``data``, DP calibrated to its target epsilon:
    (run folder, its summary, command seconds, peak RSS MB). The copy is removed afterwards;
    the run folder stays, for ``fl report``."""
    base, sets, cfg = cell_config(suite, cell, seed)
    work = _fresh(out / "work" / f"{cell.name}--seed{seed}")
    shutil.copytree(data, work / "data")
    delta = float(suite.settings.get("delta", 1e-5))
    sets += dp_overrides(cfg, work / "data", cell.get("dp"), cell.get("epsilon"), delta)
    wall, peak = run_measured(_fl_run(base, sets, work, work / "data"), cwd=REPO, log=work / "fl-run.log")
    run_dir = work / "runs" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(work / "data", ignore_errors=True)
    return run_dir, summary, wall, peak


@runner("federation")
def federation(suite: Suite, cell: Cell, seed: int, out: Path) -> Row:
    _, _, cfg = cell_config(suite, cell, seed)
    pristine = prepare_data(suite, cfg.data.nodes, cfg.task, seed, out)
    run_dir, summary, wall, peak = run_cell(suite, cell, seed, out, pristine)
    metric = summary.get("metric", "dice")
    privacy = summary.get("privacy") or {}
    record = (privacy.get("record_level") or {})
    rounds_run = len(summary.get("versions", []))
    return {
        "nodes": cfg.data.nodes, "rounds": rounds_run, "metric": metric,
        metric: summary["final_metrics"].get(metric),
        f"initial_{metric}": summary.get("initial_metrics", {}).get(metric),
        "client_epsilon": (privacy.get("client_level") or {}).get("epsilon"),
        "record_epsilon": max((v["epsilon"] for v in record.values()), default=None),
        "wall_per_round_s": summary["wall_seconds"] / max(rounds_run, 1),
        "train_per_round_s": summary["train_seconds"] / max(rounds_run, 1),
        "overhead": summary.get("overhead"), "command_s": wall, "peak_rss_mb": peak,
        "run_dir": str(run_dir),
    }


@runner("dp-cost")
def dp_cost(suite: Suite, cell: Cell, seed: int, out: Path) -> Row:
    """Plain step, today's DP-SGD step and the ghost-clipping one, each in a fresh process
    (``bench/dp_cost.py``); a cell's ``steps``/``warmup`` override the suite's."""
    steps = int(cell.get("steps", suite.settings.get("steps", 20)))
    warmup = int(cell.get("warmup", suite.settings.get("warmup", 3)))
    threads = int(suite.settings.get("threads", 2))
    proc = subprocess.run([sys.executable, "-c", "import sys, json; sys.path.insert(0, 'bench'); import dp_cost; "
                           f"print(json.dumps(dp_cost.measure({str(cell.get('task'))!r}, seed={seed}, steps={steps}, "
                           f"warmup={warmup}, threads={threads})))"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FederationError(f"dp_cost {cell.get('task')}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@runner("overhead")
def overhead(suite: Suite, cell: Cell, seed: int, out: Path) -> Row:
    engine = str(cell.get("engine"))
    if engine == "oncofed":
        row = federation(suite, cell, seed, out)
        with (Path(row["run_dir"]) / "metrics.jsonl").open(encoding="utf-8") as fh:
            rounds = [json.loads(line) for line in fh if line.strip()]
        seconds = [r["seconds"] for r in rounds if not r.get("initial")]
        keep = ("wall_per_round_s", "train_per_round_s", "overhead", "dice", "peak_rss_mb", "command_s")
        return {**{k: row[k] for k in keep},
                **_first_and_steady(seconds)}
    _, _, cfg = cell_config(suite, cell, seed)
    pristine = prepare_data(suite, cfg.data.nodes, cfg.task, seed, out)
    work = _fresh(out / "work" / f"{cell.name}--seed{seed}")
    if engine == "flower":
        result = work / "result.json"
        command = [sys.executable, str(REPO / "bench" / "baselines" / "flower_app.py"), "--data", str(pristine),
                   "--nodes", str(cfg.data.nodes), "--rounds", str(cfg.rounds), "--epochs", str(cfg.train.epochs),
                   "--lr", str(cfg.train.lr), "--batch-size", str(cfg.train.batch_size), "--seed", str(seed),
                   "--result", str(result)]
    elif engine == "centralised":
        result = work / "result.json"
        command = [sys.executable, "-m", "fl.bench.centralised", "--data", str(pristine), "--nodes", str(cfg.data.nodes),
                   "--rounds", str(cfg.rounds), "--epochs", str(cfg.train.epochs), "--lr", str(cfg.train.lr),
                   "--batch-size", str(cfg.train.batch_size), "--seed", str(seed), "--result", str(result),
                   "--task", cfg.task] + (["--bundle", str(cfg.bundle)] if cfg.bundle else [])
    else:
        raise FederationError(f"overhead: unknown engine {engine!r} (oncofed, flower, centralised)")
    command_s, peak = run_measured(command, cwd=REPO, log=work / "run.log")
    measured = json.loads(result.read_text())
    wall, train = measured["wall_per_round_s"], measured["train_per_round_s"]
    return {"wall_per_round_s": wall, "train_per_round_s": train, "overhead": wall / train if train else None,
            "dice": measured.get("dice"), "peak_rss_mb": peak, "command_s": command_s,
            **_first_and_steady(measured["round_seconds"])}


def _first_and_steady(round_seconds: list[float]) -> dict[str, float | None]:
    """The first round (it pays for starting the virtual nodes) apart from the others."""
    steady = round_seconds[1:]
    return {"first_round_s": round_seconds[0] if round_seconds else None,
            "steady_round_s": sum(steady) / len(steady) if steady else None}


def _deploy_rounds(run_dir: Path) -> dict[str, Any]:
    """Wall, slowest node's training and overhead per round; the first round apart (it starts the
    nodes' workers or processes), the later rounds averaged."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in records if r["round"] >= 1]
    rows = []
    for record in trained:
        nodes = record.get("train", {}).get("nodes", {}).values()
        slowest = max((n.get("train-seconds", 0.0) for n in nodes), default=0.0)
        rows.append((record["seconds"], slowest))
    steady = rows[1:] or rows

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {"first_round_s": rows[0][0], "round_wall_s": mean([w for w, _ in steady]),
            "slowest_train_s": mean([t for _, t in steady]), "overhead_s": mean([w - t for w, t in steady]),
            "dice": records[-1].get("evaluate", {}).get("aggregate", {}).get("dice")}


def _data_reads_after_first_round(logs: Path, run_id: str) -> int | None:
    """Files of the nodes' data each warm worker opened after its first two messages (its first
    evaluation and training), summed over nodes; None for cold nodes (no worker logs)."""
    from nodes.worker import served_in_log

    total, seen = 0, False
    for log in sorted(logs.glob("hospital-*.log")):
        reads = [n for _, _, n, _ in served_in_log(log.read_text(encoding="utf-8", errors="replace"), run_id)]
        seen = seen or bool(reads)
        total += sum(reads[2:])
    return total if seen else None


@runner("deploy")
def deploy_overhead(suite: Suite, cell: Cell, seed: int, out: Path) -> Row:
    import os

    from fl.config import from_flat
    from fl.deploy.demo import NodeOptions, run_config, run_demo
    from fl.learn import get_task
    from fl.learn.synth import synthesize
    from fl.packing import SWITCH_ENV
    from fl.server.simulation import simulate
    from nodes.roster import pin_local_federation

    rounds = int(suite.settings.get("rounds", 3))
    sets = list(suite.settings["set"]) + list(cell.get("set", [])) + [f"seed={seed}"]
    work = _fresh(out / "work" / f"{cell.name}--seed{seed}")
    nodes = int(cell.get("nodes", 3))
    if cell.get("engine") == "simulation":
        synthesize(work / "data", nodes=nodes, task=get_task("seg2d"))
        pin_local_federation(work / "data", nodes)
        flat = run_config(work, rounds, nodes, sets)
        cfg = from_flat({**flat, "output.run_name": "sim"}, source=f"bench cell {cell.name}")
        simulate(cfg)
        return {**_deploy_rounds(work / "runs" / "sim"), "data_reads_after_round1": None}
    # a cell's superexec_poll is the nodes' and the coordinator's; without one, OncoFed's defaults
    superexec = {} if cell.get("superexec_poll") is None else {
        "superexec_poll": float(cell.get("superexec_poll")), "coordinator_poll": float(cell.get("superexec_poll"))}
    if cell.get("coordinator_poll") is not None:
        superexec["coordinator_poll"] = float(cell.get("coordinator_poll"))
    options = NodeOptions(warm=bool(cell.get("warm", True)), poll_interval=float(cell.get("poll", 0.25)),
                          threads=cell.get("threads"), follow_up=cell.get("follow_up"), **superexec)
    previous = os.environ.get(SWITCH_ENV)
    os.environ[SWITCH_ENV] = "1" if cell.get("pack", True) else "0"  # the SuperLink's and nodes' environment
    try:
        summary = run_demo(work, rounds=rounds, nodes=nodes, budget=None, overrides=sets, say=lambda _: None,
                           options=options)
    finally:
        if previous is None:
            os.environ.pop(SWITCH_ENV, None)
        else:
            os.environ[SWITCH_ENV] = previous
    return {**_deploy_rounds(work / "runs" / "deploy"),
            "data_reads_after_round1": _data_reads_after_first_round(work / "logs", str(summary["run_id"]))}
