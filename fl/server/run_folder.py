"""The run folder: resolved config, one metrics line per round, final weights, summary.

Every file that is written whole (config, weights, summary) goes through a temporary file,
fsync and rename, so a crash never leaves a half-written one; ``metrics.jsonl`` is appended
one complete line per round and flushed to disk.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fl import schema
from fl.config import Config
from fl.errors import ConfigError
from fl.files import atomic_write  # noqa: F401  (re-exported: the server's writers import it from here)

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"  # where the run is now (round, phase, replies), for the console's live view
WEIGHTS_FILE = "model.safetensors"
TENSORBOARD_DIR = "tensorboard"

log = logging.getLogger("flwr.oncofed.server")


def run_dir_for(cfg: Config) -> Path:
    """``output.dir/output.run_name``, naming the run after the model and time when unset."""
    name = cfg.output.run_name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output.dir) / name


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """One round's numbers as TensorBoard tags: aggregates, per node, epsilon, seconds."""
    out: dict[str, float] = {}
    for phase in ("train", "evaluate"):
        block = record.get(phase) or {}
        for key, value in (block.get("aggregate") or {}).items():
            out[f"{phase}/{key}"] = float(value)
        for node, metrics in (block.get("nodes") or {}).items():
            for key, value in metrics.items():
                if key in ("dice", "auc", "val-loss", "train-loss"):
                    out[f"nodes/{key}/{node}"] = float(value)
    privacy = record.get("privacy") or {}
    if privacy.get("client_level"):
        out["privacy/client_level_epsilon"] = float(privacy["client_level"]["epsilon"])
    for node, spent in (privacy.get("record_level") or {}).items():
        out[f"privacy/record_level_epsilon/{node}"] = float(spent["epsilon"])
    if "seconds" in record:
        out["time/round_seconds"] = float(record["seconds"])
    return out


def _write_events(folder: Path, records: queue.Queue[Any]) -> None:
    """Drain ``records`` ((round, scalars) pairs; None ends) into a TensorBoard event file."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(folder), flush_secs=5)
    try:
        while (item := records.get()) is not None:
            step, values = item
            for name, value in values.items():
                writer.add_scalar(name, value, step)
            writer.flush()
    finally:
        writer.close()


def nested(cfg: Config) -> dict[str, Any]:
    """The config as nested tables, the shape of a config file."""
    out: dict[str, Any] = {}
    for key, value in cfg.to_flat().items():
        *sections, name = key.split(".")
        table = out
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    return out


class RunFolder:
    """Writes one run's artefacts under ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._events: queue.Queue[Any] | None = None
        self._events_thread: threading.Thread | None = None

    @classmethod
    def create(cls, path: Path, cfg: Config) -> RunFolder:
        """Make the folder (refusing to reuse a non-empty one) and record the config."""
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"output.run_name: run folder {path} already exists; pick another name")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output.dir: cannot create run folder {path} ({exc.strerror})") from None
        folder = cls(path)
        atomic_write(path / CONFIG_FILE, tomli_w.dumps(nested(cfg)).encode())
        folder._start_events()
        return folder

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed to disk, and to the TensorBoard
        event file in ``tensorboard/`` (watch a long run live: ``tensorboard --logdir RUN_DIR``)."""
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**record, **schema.stamp("run-metrics")}, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._log_scalars(record)

    def _log_scalars(self, record: Mapping[str, Any]) -> None:
        if self._events is None:
            self._start_events()
        self._events.put((int(record["round"]), scalars(record)))  # type: ignore[union-attr]

    def _start_events(self) -> None:
        """A writer thread for the TensorBoard event file: importing tensorboardX takes about
        a second here, which this keeps off the round loop (it overlaps the nodes' start-up)."""
        self._events = queue.Queue()
        self._events_thread = threading.Thread(target=_write_events, args=(self.path / TENSORBOARD_DIR, self._events),
                                               name="oncofed-tensorboard", daemon=True)
        self._events_thread.start()

    def close(self) -> None:
        """Flush and close the event file (waits for the writer thread)."""
        if self._events is not None:
            self._events.put(None)
            self._events_thread.join(timeout=60)  # type: ignore[union-attr]
            self._events = None

    def save_weights(self, state: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
        """Save the final global weights as safetensors."""
        from safetensors.torch import save

        tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
        atomic_write(self.path / WEIGHTS_FILE, save(tensors, metadata=dict(metadata)))

    def write_status(self, **fields: Any) -> None:
        """Replace ``status.json``: the round and phase the run is in and how many of the sampled
        nodes answered so far (rewritten as replies arrive; not fsynced: it is a view, the record of
        a round is its line in ``metrics.jsonl``)."""
        tmp = self.path / f".{STATUS_FILE}.tmp"
        try:
            tmp.write_text(json.dumps({**fields, "time": time.time(), **schema.stamp("run-status")}), encoding="utf-8")
            os.replace(tmp, self.path / STATUS_FILE)
        except OSError as exc:  # a view only: the round goes on, the console shows the run as silent
            log.warning("run folder: could not write %s (%s)", STATUS_FILE, exc)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write(self.path / SUMMARY_FILE,
                     (json.dumps({**summary, **schema.stamp("run-summary")}, indent=2, sort_keys=True) + "\n").encode())

    def read_summary(self) -> dict[str, Any]:
        path = self.path / SUMMARY_FILE
        summary = dict(json.loads(path.read_text(encoding="utf-8")))
        schema.check("run-summary", summary, path)
        return summary

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for number, record in enumerate(records, start=1):
            schema.check("run-metrics", record, f"{path}: line {number}")
        return records
