"""``fl bench NAME``: run a benchmark suite and write its table, plots and report.

A suite is ``configs/bench/NAME.toml``: a runner, a grid of cells (each a set of parameters),
a number of seeds, the table's columns and the plots. Every (cell, seed) result is stored as
``cells/<cell>--seed<k>.json`` the moment it is measured, so an interrupted suite resumes where
it stopped (a cell whose parameters changed is measured again). At the end the suite writes
``results.json`` and ``results.csv`` (one row per cell and seed), the plots (PNG) and
``report.md`` (mean and std over seeds, the plots, the command and the machine).

``--quick`` applies the suite's ``[quick]`` table (fewer seeds, rounds or cells) so that every
suite finishes in minutes on a laptop.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "configs" / "bench"

Row = dict[str, Any]
Runner = Callable[["Suite", "Cell", int, Path], Row]


@dataclass(frozen=True)
class Cell:
    name: str
    params: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    runner: str
    seeds: int
    cells: list[Cell]
    settings: dict[str, Any]  # runner settings (base config, --set list, rounds, ...), quick applied
    columns: list[str]
    plots: list[dict[str, Any]]
    conclusion: str = ""
    quick: bool = False
    path: Path = field(default=Path())


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES.glob("*.toml"))


def load_suite(name: str, *, quick: bool = False, seeds: int | None = None) -> Suite:
    """Read ``configs/bench/NAME.toml``; unknown names and malformed suites are ConfigErrors."""
    path = SUITES / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"bench suite {name!r}: no {path.relative_to(REPO)}; suites: {', '.join(suite_names())}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    for key in ("title", "runner", "cells"):
        if key not in raw:
            raise ConfigError(f"{path}: missing '{key}'")
    quick_table = raw.get("quick", {}) if quick else {}
    settings = {k: v for k, v in raw.items()
                if k not in ("title", "runner", "cells", "quick", "columns", "plots", "conclusion", "seeds")}
    settings.update({k: v for k, v in quick_table.items() if k not in ("seeds", "cells")})
    settings["set"] = list(raw.get("set", [])) + list(quick_table.get("set", []))
    cells = []
    for index, entry in enumerate(raw["cells"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{path}: cells[{index}] needs a 'name'")
        cells.append(Cell(entry["name"], {k: v for k, v in entry.items() if k != "name"}))
    if "cells" in quick_table:
        wanted = list(quick_table["cells"])
        unknown = [w for w in wanted if w not in {c.name for c in cells}]
        if unknown:
            raise ConfigError(f"{path}: quick.cells names unknown cell {unknown[0]!r}")
        cells = [c for c in cells if c.name in wanted]
    if len({c.name for c in cells}) != len(cells):
        raise ConfigError(f"{path}: cell names must be distinct")
    n_seeds = seeds if seeds is not None else int(quick_table.get("seeds", raw.get("seeds", 1)))
    if n_seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {n_seeds}")
    from fl import bench_runners

    if raw["runner"] not in bench_runners.RUNNERS:
        raise ConfigError(f"{path}: runner {raw['runner']!r} unknown; one of {', '.join(bench_runners.RUNNERS)}")
    return Suite(name=name, title=raw["title"], runner=raw["runner"], seeds=n_seeds, cells=cells, settings=settings,
                 columns=list(raw.get("columns", [])), plots=list(raw.get("plots", [])),
                 conclusion=str(raw.get("conclusion", "")), quick=quick, path=path)


def _cell_file(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / f"{cell.name}--seed{seed}.json"


def _fingerprint(suite: Suite, cell: Cell) -> dict[str, Any]:
    return {"runner": suite.runner, "settings": suite.settings, "params": cell.params}


def run_suite(suite: Suite, out: Path, say: Callable[[str], None] = print) -> list[Row]:
    """Measure every (cell, seed) not yet measured; then write results and the report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fl.bench_runners import RUNNERS

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
