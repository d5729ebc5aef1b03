"""`kill -9` of a running federation, then --resume: no version lost or duplicated, no budget forgotten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl import accounting
from fl.config import Config
from fl.registry import Registry
from strategies.factory import central_dp_settings

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4


def _command(tmp: Path, name: str, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fl.cli", "run", str(REPO / "configs" / "dp-central.toml"),
            "--out", str(tmp / "runs"), "--set", f'data.root="{tmp / "data"}"', "--set", "data.nodes=2",
            "--set", "data.image_size=32", "--set", f"rounds={rounds}", "--set", f'registry.root="{tmp / "reg"}"',
            "--set", f"output.run_name={name}", *extra]


@pytest.mark.parametrize("kill_after", [1, 3])
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
    resumed = subprocess.run(_command(tmp_path, "resumed", remaining, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    versions = registry.verify("dp-central")
    assert [v.manifest["round"] for v in versions] == list(range(1, ROUNDS + 1))
    assert [v.number for v in versions] == list(range(1, ROUNDS + 1))
    cfg = Config().replace(**{"central_dp.enabled": True, "central_dp.noise_multiplier": 0.3, "data.nodes": 2})
    uninterrupted = accounting.epsilon([central_dp_settings(cfg).round_event()] * ROUNDS, 1e-5)
    assert versions[-1].manifest["privacy"]["client_level"]["epsilon"] == pytest.approx(uninterrupted)
    assert versions[-1].manifest["privacy"]["client_level"]["rounds"] == ROUNDS
