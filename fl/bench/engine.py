"""``fl bench NAME``: run a suite's cells (resumable), then write its table, plots and report.

Every (cell, seed) result is stored as ``cells/<cell>--seed<k>.json`` the moment it is
measured, so an interrupted suite resumes where it stopped (a cell whose parameters changed is
measured again). At the end the suite writes ``results.json`` and ``results.csv`` (one row per
cell and seed), the plots (PNG) and ``report.md`` (mean and std over seeds, the plots, the
command and the machine).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl.bench import audit, runners  # noqa: F401  (importing them registers their runners)
from fl.bench.suite import RUNNERS, Cell, Row, Suite


def _cell_file(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / f"{cell.name}--seed{seed}.json"


def _fingerprint(suite: Suite, cell: Cell) -> dict[str, Any]:
    return {"runner": suite.runner, "settings": suite.settings, "params": cell.params}


def run_suite(suite: Suite, out: Path, say: Callable[[str], None] = print) -> list[Row]:
    """Measure every (cell, seed) not yet measured; then write results and the report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    runner = RUNNERS[suite.runner]
    todo = [(c, s) for c in suite.cells for s in range(suite.seeds)]
    rows: list[Row] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} cells"),
                  TimeElapsedColumn()) as progress:
        task = progress.add_task(suite.name, total=len(todo))
        for cell, seed in todo:
            path = _cell_file(out, cell, seed)
            if path.exists():
                stored = json.loads(path.read_text())
                if stored.get("fingerprint") == json.loads(json.dumps(_fingerprint(suite, cell))):
                    rows.append(stored["row"])
                    progress.advance(task)
                    continue
            progress.update(task, description=f"{suite.name}: {cell.name} (seed {seed})")
            started = time.perf_counter()
            row = {"cell": cell.name, "seed": seed, **{k: v for k, v in cell.params.items() if k != "set"},
                   **runner(suite, cell, seed, out)}
            row["cell_seconds"] = time.perf_counter() - started
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": _fingerprint(suite, cell), "row": row}, indent=2))
            tmp.replace(path)
            rows.append(row)
            progress.advance(task)
    write_results(suite, rows, out)
    return rows


# ----- results ---------------------------------------------------------------------------------
def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def summarise(suite: Suite, rows: list[Row]) -> list[Row]:
    """One row per cell: parameters as they are, measurements as mean and std over seeds."""
    out = []
    for cell in suite.cells:
        mine = [r for r in rows if r["cell"] == cell.name]
        if not mine:
            continue
        summary: Row = {"cell": cell.name, "seeds": len(mine)}
        keys = [k for k in mine[0] if k not in ("cell", "seed")]
        for key in keys:
            values = [r.get(key) for r in mine]
            if key in cell.params or not all(_numeric(v) for v in values):
                summary[key] = values[0]
            else:
                summary[key] = statistics.fmean(values)
                summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def _fmt(value: Any, std: Any = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if std:
        text += f" ± {std:.2g}"
    return text


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPU cores ({cpu}), Python "
            f"{platform.python_version()}, torch {torch.__version__}, flwr {_version('flwr')}")


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:  # not installed
        return "?"


def write_results(suite: Suite, rows: list[Row], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(suite, rows)
    images = [plot(suite, summary, spec, out) for spec in suite.plots]
    columns = suite.columns or [k for k in summary[0] if not k.endswith("_std")] if summary else []
    lines = [f"# {suite.title}", "",
             f"Command: `fl bench {suite.name}{' --quick' if suite.quick else ''} --seeds {suite.seeds}` "
             f"(suite `configs/bench/{suite.name}.toml`, runner `{suite.runner}`).", "",
             f"Machine: {machine()}.", "", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"mean ± std over {suite.seeds} seed(s).", "",
             "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in summary:
        lines.append("| " + " | ".join(_fmt(row.get(c), row.get(f"{c}_std")) for c in columns) + " |")
    for image in images:
        lines += ["", f"![{image.stem}]({image.name})"]
    if suite.conclusion:
        lines += ["", suite.conclusion.strip()]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(suite: Suite, summary: list[Row], spec: dict[str, Any], out: Path) -> Path:
    """One PNG: ``y`` against ``x`` (or bars per cell), one line per ``series``, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, series = spec.get("x"), spec["y"], spec.get("series")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if x is None:  # bars per cell; several y keys side by side
        names = [r["cell"] for r in summary]
        keys = y if isinstance(y, list) else [y]
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            values = [r.get(key) if r.get(key) is not None else float("nan") for r in summary]
            ax.bar([j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))], values, width,
                   yerr=[r.get(f"{key}_std", 0.0) for r in summary], capsize=3, label=key if len(keys) > 1 else None)
        ax.set_xticks(range(len(names)), names, rotation=30)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        y = ", ".join(keys)
    else:
        groups: dict[str, list[Row]] = {}
        for row in summary:
            if row.get(x) is not None and row.get(y) is not None:
                groups.setdefault(str(row.get(series, "")) if series else "", []).append(row)
        for label, members in groups.items():
            members.sort(key=lambda r: r[x])
            ax.errorbar([r[x] for r in members], [r[y] for r in members],
                        yerr=[r.get(f"{y}_std", 0.0) for r in members], marker="o", capsize=3, label=label or None)
        for row in summary:  # cells without an x value (e.g. no DP) as a reference line
            if row.get(x) is None and row.get(y) is not None and spec.get("reference", True):
                ax.axhline(row[y], ls="--", color="grey", lw=1, label=f"{row['cell']} (reference)")
        if spec.get("logx"):
            ax.set_xscale("log")
            ticks = sorted({float(r[x]) for rows in groups.values() for r in rows})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        if spec.get("logy"):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel(spec.get("xlabel", x))
    ax.set_ylabel(spec.get("ylabel", y))
    ax.set_title(spec.get("title", f"{y} ({suite.name})"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / spec.get("file", f"{y.replace(', ', '_')}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
