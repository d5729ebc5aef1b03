"""``fl report RUN_DIR``: one run's curves from its ``metrics.jsonl``.

Three panels in ``RUN_DIR/report/curves.png``: validation Dice (or AUC) per round, global and
per node; training and validation loss per round, global and per node; epsilon per round,
client level and each node's record level (when the run used DP).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fl import schema
from fl.errors import ConfigError
from fl.server.run_folder import METRICS_FILE


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; give a run folder written by `fl run`")
    rounds = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        schema.check("run-metrics", rounds[-1], f"{path}:{number}", error=ConfigError)
    if not rounds:
        raise ConfigError(f"{path}: holds no round")
    return rounds


def _series(rounds: list[dict[str, Any]], phase: str, key: str) -> tuple[list[int], list[float], dict[str, tuple]]:
    xs, ys, nodes = [], [], {}  # type: ignore[var-annotated]
    for record in rounds:
        block = record.get(phase) or {}
        aggregate = (block.get("aggregate") or {}).get(key)
        if aggregate is not None:
            xs.append(record["round"])
            ys.append(aggregate)
        for node, metrics in (block.get("nodes") or {}).items():
            if key in metrics:
                nodes.setdefault(node, ([], []))
                nodes[node][0].append(record["round"])
                nodes[node][1].append(metrics[key])
    return xs, ys, nodes


def draw(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``curves.png`` for the run in ``run_dir``; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = read_rounds(run_dir)
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    score = "auc" if any("auc" in (r.get("evaluate") or {}).get("aggregate", {}) for r in rounds) else "dice"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    xs, ys, nodes = _series(rounds, "evaluate", score)
    for node, (nx, ny) in sorted(nodes.items()):
        axes[0].plot(nx, ny, lw=1, alpha=0.6, marker=".", label=f"node {node[:6]}")
    axes[0].plot(xs, ys, lw=2.5, color="black", marker="o", label="global (weighted)")
    axes[0].set(title=f"validation {score}", xlabel="round", ylabel=score)
    axes[0].legend(fontsize=7)
    for phase, key, style in (("train", "train-loss", "-"), ("evaluate", "val-loss", "--")):
        xs, ys, nodes = _series(rounds, phase, key)
        for node, (nx, ny) in sorted(nodes.items()):
            axes[1].plot(nx, ny, style, lw=1, alpha=0.5)
        if ys:
            axes[1].plot(xs, ys, style, lw=2.5, color="black", label=f"{key} (global)")
    axes[1].set(title="loss (thin: nodes)", xlabel="round", ylabel="loss")
    axes[1].legend(fontsize=7)
    client = [(r["round"], r["privacy"]["client_level"]["epsilon"]) for r in rounds
              if (r.get("privacy") or {}).get("client_level")]
    record: dict[str, tuple[list[int], list[float]]] = {}
    for r in rounds:
        for node, spent in ((r.get("privacy") or {}).get("record_level") or {}).items():
            record.setdefault(node, ([], []))
            record[node][0].append(r["round"])
            record[node][1].append(spent["epsilon"])
    if client:
        axes[2].plot(*zip(*client), lw=2.5, color="black", marker="o", label="client level (server)")
    for node, (nx, ny) in sorted(record.items()):
        axes[2].plot(nx, ny, lw=1, marker=".", label=f"record level, node {node[:6]}")
    axes[2].set(title="epsilon spent" if client or record else "epsilon: no DP in this run", xlabel="round",
                ylabel="epsilon")
    if client or record:
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
