"""How the round loop reports progress: the Observer protocol and the default that logs."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from fl import wire

log = logging.getLogger("flwr.oncofed.server")  # under Flower's logger: same handler, same levels


class Observer(Protocol):
    """Receives progress from the round loop (the CLI draws it; the default logs it).

    ``on_phase`` reports a phase's replies as they arrive (``done`` of ``total``). In a round's
    ``evaluate`` phase, ``done == total`` means every sampled node answered the evaluation of the
    round's model, whose version is not committed yet. A test wraps an observer to inject a fault
    at such a step (the kill of ``tests/test_crash_resume.py``); the round loop holds no test hook."""

    def on_start(self, rounds: int) -> None: ...
    def on_phase(self, server_round: int, phase: str, done: int, total: int) -> None: ...
    def on_round(self, record: dict[str, Any]) -> None: ...


class LogObserver:
    """One log line per round: what ``flwr run`` users see."""

    def on_start(self, rounds: int) -> None:
        log.info("OncoFed: starting %d rounds", rounds)

    def on_phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        pass

    def on_round(self, record: dict[str, Any]) -> None:
        agg = record.get("evaluate", {}).get("aggregate", {})
        log.info(
            "round %d: train loss %s, val score %s, %d node(s) failed, %.1f s",
            record["round"],
            _fmt(record.get("train", {}).get("aggregate", {}).get(wire.TRAIN_LOSS)),
            _fmt(wire.score(agg)),
            len(record.get("failures", {})),
            record["seconds"],
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
