"""`kill -9` of a running federation, then --resume: no version lost or duplicated, no budget forgotten.

A kill at an exact point of the round loop comes through the server's observer: run as a script,
this module is the test's own launcher of ``fl``, the same command with the progress observer
wrapped in :class:`KillAfterRelease`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fl.engine_env  # noqa: F401  (before Flower is imported)
from fl.config import Config
from fl.privacy import accounting
from fl.privacy.journal import ReleaseJournal
from fl.registry import Registry
from fl.server.rounds import EVALUATE  # the phase that sends the round's model out
from strategies.factory import central_dp_settings

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4


class KillAfterRelease:
    """An observer that passes everything on to ``inner`` and kills this process group (the server
    and every engine process it started) once every node answered round ``server_round``'s
    evaluation: the round's model left the server, its version is not committed yet."""

    def __init__(self, server_round: int, inner: Any) -> None:
        self.server_round, self.inner = server_round, inner

    def on_start(self, rounds: int) -> None:
        self.inner.on_start(rounds)

    def on_phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        self.inner.on_phase(server_round, phase, done, total)
        if (server_round, phase, done) == (self.server_round, EVALUATE, total):
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_round(self, record: dict[str, Any]) -> None:
        self.inner.on_round(record)


def _launch(kill_after_release: int, argv: list[str]) -> int:
    """``fl *argv``, its server's observer wrapped in :class:`KillAfterRelease`."""
    from fl.cli import main
    from fl.server import simulation

    simulate = simulation.simulate
    simulation.simulate = lambda cfg, observer=None, started=None: simulate(
        cfg, KillAfterRelease(kill_after_release, observer), started)
    return main(argv)


def _command(tmp: Path, name: str, rounds: int, *extra: str, kill_after_release: int | None = None) -> list[str]:
    launcher = (["-m", "fl.cli"] if kill_after_release is None
                else [str(Path(__file__).resolve()), str(kill_after_release)])
    return [sys.executable, *launcher, "run", str(REPO / "configs" / "dp-central.toml"),
            "--out", str(tmp / "runs"), "--set", f'data.root="{tmp / "data"}"', "--set", "data.nodes=2",
            "--set", "data.image_size=32", "--set", f"rounds={rounds}", "--set", f'registry.root="{tmp / "reg"}"',
            "--set", f"output.run_name={name}", *extra]


def _resume(tmp: Path, rounds: int) -> int:
    """The operator's ``fl run ... --resume`` after the crash (in this process: the crash is over)."""
    from fl.cli import main

    argv = _command(tmp, "resumed", rounds, "--resume")
    return main(argv[argv.index("run"):])


@pytest.mark.parametrize("kill_after", [2])  # one kill mid-run (1 and 3 ran the same path; CI time)
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_chain_and_epsilon(tmp_path: Path, kill_after: int) -> None:
    registry = Registry(tmp_path / "reg")
    proc = subprocess.Popen(_command(tmp_path, "first", ROUNDS), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(registry.versions("dp-central")) < kill_after:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the server and every engine process it started
    proc.wait()
    done = registry.verify("dp-central")
    assert kill_after <= len(done) < ROUNDS

    remaining = ROUNDS - done[-1].manifest["round"]
    assert _resume(tmp_path, remaining) == 0

    versions = registry.verify("dp-central")
    assert [v.manifest["round"] for v in versions] == list(range(1, ROUNDS + 1))
    assert [v.number for v in versions] == list(range(1, ROUNDS + 1))
    # the kill may land after a round's model left the server but before its commit: that
    # release is in the journal and counts; nothing else may be added or forgotten
    journaled = ReleaseJournal.of(tmp_path / "reg", "dp-central").entries(
        versions[-1].manifest["privacy"]["client_level"]["lineage"])
    assert ROUNDS <= len(journaled) <= ROUNDS + 1
    assert versions[-1].manifest["privacy"]["client_level"]["epsilon"] == pytest.approx(_epsilon(len(journaled)))
    assert versions[-1].manifest["privacy"]["client_level"]["rounds"] == len(journaled)


def _epsilon(releases: int) -> float:
    cfg = Config().replace(**{"central_dp.enabled": True, "central_dp.noise_multiplier": 0.3, "data.nodes": 2})
    return accounting.epsilon([central_dp_settings(cfg).round_event()] * releases, 1e-5)


def test_a_release_between_evaluation_and_commit_is_counted_after_resume(tmp_path: Path) -> None:
    """Round 2's model went out for evaluation, then the server died before committing it: the
    resumed run's client-level history holds that release as well as the rounds it commits."""
    crashed = subprocess.run(_command(tmp_path, "first", 3, kill_after_release=2), start_new_session=True,
                             capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL
    registry = Registry(tmp_path / "reg")
    assert [v.manifest["round"] for v in registry.verify("dp-central")] == [1]

    assert _resume(tmp_path, 2) == 0
    last = registry.verify("dp-central")[-1].manifest
    assert last["round"] == 3
    assert last["privacy"]["client_level"]["rounds"] == 4  # rounds 1, 2 (lost commit), 2 again, 3
    assert last["privacy"]["client_level"]["epsilon"] == pytest.approx(_epsilon(4))


if __name__ == "__main__":  # the launcher: python tests/test_crash_resume.py ROUND fl-arguments...
    sys.exit(_launch(int(sys.argv[1]), sys.argv[2:]))
