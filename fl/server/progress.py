"""What the developer sees: a live progress line per run and a summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fl import wire


class LiveProgress:
    """Round i/R, nodes done in the current phase, last validation Dice (an Observer)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[phase]}"),
            TextColumn("score {task.fields[dice]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("rounds", total=None, phase="starting", dice="-")

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_start(self, rounds: int) -> None:
        self.progress.update(self.task, total=rounds, phase="waiting for nodes")

    def on_phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        label = f"round {server_round} {phase}"
        self.progress.update(self.task, phase=f"{label}: {done}/{total} nodes")

    def on_round(self, record: dict[str, Any]) -> None:
        dice = wire.score(record.get("evaluate", {}).get("aggregate", {}))
        fields: dict[str, Any] = {"dice": "-" if dice is None else f"{dice:.3f}"}
        if not record.get("initial"):
            self.progress.advance(self.task)
        failures = record.get("failures") or {}
        if failures:
            names = ", ".join(sorted(failures))
            self.progress.console.print(f"[yellow]round {record['round']}: node(s) {names} failed")
        self.progress.update(self.task, **fields)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _client_level(summary: dict[str, Any]) -> str:
    central = (summary.get("privacy") or {}).get("client_level")
    if not central:
        return "- (no central DP)"
    return f"{central['epsilon']:.3f} at delta {central['delta']:g} ({central['accountant']}, {central['rounds']} rounds)"


def _record_level(summary: dict[str, Any]) -> str:
    nodes = (summary.get("privacy") or {}).get("record_level") or {}
    if not nodes:
        return "- (no local DP)"
    return ", ".join(f"{node[-6:]}: {v['epsilon']:.3f}" for node, v in sorted(nodes.items()))


def summary_table(summary: dict[str, Any], run_dir: str) -> Table:
    """The final summary: metrics, time and where the time went."""
    table = Table(title="OncoFed run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    final, initial = summary["final_metrics"], summary.get("initial_metrics", {})
    rows = [
        ("task / strategy", f"{summary['task']} / {summary['strategy']}"),
        ("rounds x nodes", f"{summary['rounds']} x {summary['nodes']}"),
        (f"validation {summary.get('metric', 'dice')}",
         f"{_num(initial.get(summary.get('metric', 'dice')), '.4f')} -> "
         f"{_num(final.get(summary.get('metric', 'dice')), '.4f')}"),
        ("validation loss", f"{_num(initial.get('val_loss'), '.4f')} -> {_num(final.get('val_loss'), '.4f')}"),
        ("rounds wall (s)", _num(summary["wall_seconds"], ".1f")),
        ("node training (s, summed)", _num(summary["train_seconds"], ".1f")),
        ("overhead (wall / training)", _num(summary.get("overhead"), ".2f")),
        ("total incl. engine start (s)", _num(summary.get("total_seconds"), ".1f")),
        ("client-level epsilon (central DP)", _client_level(summary)),
        ("record-level epsilon per node (local DP)", _record_level(summary)),
        ("versions", ", ".join(summary.get("versions", [])[-3:]) or "-"),
        ("run folder", run_dir),
    ]
    if summary.get("stopped"):
        rows.append(("stopped early", summary["stopped"]))
    for what, value in rows:
        table.add_row(what, value)
    return table


def validation_table(result: dict[str, Any]) -> Table:
    """One row per validating site, the worst named below (``fl validate``)."""
    sites = sorted(result["sites"], key=lambda s: s["score"])
    table = Table(title=f"{result['version']}: validation at {len(sites)} site(s)")
    for column in ("site", "trained it", "cases", "score", "interval", "release", "descriptors"):
        table.add_column(column)
    for site in sites:
        trained = {True: "yes", False: "no", None: "unknown"}[site.get("trained_it")]
        described = site.get("descriptors")
        table.add_row(site["site"], trained, str(site["cases"]), f"{site['score']:.3f} ({site['metric']})",
                      f"[{site['ci_low']:.3f}, {site['ci_high']:.3f}] at {site['confidence']:.0%}",
                      site["release"], described["release"] if described else
                      f"none: {site.get('descriptors_declined') or 'not asked'}")
    for node, why in sorted(result.get("declined", {}).items()):
        table.add_row(f"node {node}", "-", "-", "-", "-", f"no release: {why}", "-")
    if sites:
        worst = sites[0]
        table.caption = (f"worst site: {worst['site']} ({worst['score']:.3f}); "
                         f"gap best - worst: {sites[-1]['score'] - worst['score']:.3f}")
    return table
