"""Benchmark suites: what ``configs/bench/NAME.toml`` declares, read and checked.

A suite is ``configs/bench/NAME.toml``: a runner, a grid of cells (each a set of parameters),
a number of seeds, the table's columns and the plots. Every (cell, seed) result is stored as
``cells/<cell>--seed<k>.json`` the moment it is measured, so an interrupted suite resumes where
it stopped (a cell whose parameters changed is measured again). At the end the suite writes
``results.json`` and ``results.csv`` (one row per cell and seed), the plots (PNG) and
``report.md`` (mean and std over seeds, the plots, the command and the machine).

``--quick`` applies the suite's ``[quick]`` table (fewer seeds, rounds or cells) so that every
suite finishes in minutes on a laptop. :mod:`fl.bench.engine` runs a suite.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUITES = REPO / "configs" / "bench"

Row = dict[str, Any]
Runner = Callable[["Suite", "Cell", int, Path], Row]
RUNNERS: dict[str, Runner] = {}  # filled by @runner in fl.bench.runners and fl.bench.audit


def runner(name: str) -> Callable[[Runner], Runner]:
    """Register a function as the suite runner ``name`` (a suite's ``runner = "..."``)."""

    def register(func: Runner) -> Runner:
        if name in RUNNERS:
            raise ValueError(f"bench runner {name!r} is registered twice")
        RUNNERS[name] = func
        return func

    return register


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


def load_suite(name: str, *, quick: bool = False, seeds: int | None = None, only: list[str] | None = None) -> Suite:
    """Read ``configs/bench/NAME.toml``; unknown names and malformed suites are ConfigErrors.
    ``only``: measure these cells alone (``fl bench --cells``)."""
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
    if only:
        unknown = [w for w in only if w not in {c.name for c in cells}]
        if unknown:
            raise ConfigError(f"--cells: {path.name} has no cell {unknown[0]!r}; cells: {', '.join(c.name for c in cells)}")
        cells = [c for c in cells if c.name in only]
    if len({c.name for c in cells}) != len(cells):
        raise ConfigError(f"{path}: cell names must be distinct")
    n_seeds = seeds if seeds is not None else int(quick_table.get("seeds", raw.get("seeds", 1)))
    if n_seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {n_seeds}")
    if raw["runner"] not in RUNNERS:
        raise ConfigError(f"{path}: runner {raw['runner']!r} unknown; one of {', '.join(RUNNERS)}")
    return Suite(name=name, title=raw["title"], runner=raw["runner"], seeds=n_seeds, cells=cells, settings=settings,
                 columns=list(raw.get("columns", [])), plots=list(raw.get("plots", [])),
                 conclusion=str(raw.get("conclusion", "")), quick=quick, path=path)
