"""What the coordinator's console shows, read from a registry and a runs folder: plain data, no
HTML (the templates render it; tests read it directly).

The console shows what the coordinator holds and nothing more: the run folders' round records,
the registry's manifests, validation records and tags. Under DP these hold only DP releases and
public configuration (the nodes send nothing else), and each figure says which it is.
"""

from __future__ import annotations

import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl import schema, wire
from fl.console.web import read_object as _json
from fl.errors import RegistryError
from fl.registry import Registry, Version
from fl.registry.release import Gate, judge, latest_per_site
from fl.server.run_folder import CONFIG_FILE, METRICS_FILE, STATUS_FILE, SUMMARY_FILE

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STALE_AFTER_S = 120.0  # a running run whose status has not changed this long is shown as silent


class NotFound(LookupError):
    """A page's subject (run, model, version) does not exist or its name is not one."""


# ----- runs --------------------------------------------------------------------------------------
def run_folder(runs: Path, name: str) -> Path:
    """The folder of run ``name`` under ``runs``; a name with a path in it is not a run."""
    if not RUN_NAME.match(name) or name in (".", ".."):
        raise NotFound(f"{name!r} is not a run name")
    folder = runs / name
    if not (folder / CONFIG_FILE).is_file():
        raise NotFound(f"no run {name!r} in {runs}")
    return folder


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` (a line being written is skipped until whole)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            schema.check("run-metrics", record, f"{path}: line {number}")
            out.append(record)
    return out


def _config(folder: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def runs_overview(runs: Path) -> list[dict[str, Any]]:
    """Every run folder under ``runs``, newest first: its model, state and last score."""
    if not runs.is_dir():
        return []
    rows = []
    for folder in runs.iterdir():
        if not folder.is_dir() or not RUN_NAME.match(folder.name) or not (folder / CONFIG_FILE).is_file():
            continue
        status = run_status(folder)
        records = _records(folder / METRICS_FILE)
        last = records[-1] if records else {}
        cfg = _config(folder)
        rows.append({"name": folder.name, "model": cfg.get("model_name"), "task": cfg.get("task"),
                     "rounds": cfg.get("rounds"), "round": last.get("round"), "state": status["state"],
                     "phase": status.get("phase"), "score": wire.score(last.get("evaluate", {}).get("aggregate", {})),
                     "updated": status.get("time") or folder.stat().st_mtime})
    return sorted(rows, key=lambda r: r["updated"], reverse=True)


def run_status(folder: Path) -> dict[str, Any]:
    """The run's state: finished (a summary), running (a status that moves), silent (a status that
    stopped moving: the server died or waits for nodes), or unknown (an older run, no status)."""
    status = _json(folder / STATUS_FILE) or {}
    if (folder / SUMMARY_FILE).is_file():
        return {**status, "state": "finished"}
    if not status:
        return {"state": "unknown"}
    if status.get("state") == "failed":  # the server wrote why before it stopped
        return status
    if time.time() - float(status.get("time", 0)) > STALE_AFTER_S:
        return {**status, "state": "silent"}
    return status


def run_view(folder: Path) -> dict[str, Any]:
    """One run: its status, per-round curves, nodes per round with failures, and epsilon spent at
    each level against its target."""
    cfg = _config(folder)
    records = _records(folder / METRICS_FILE)
    central, local = cfg.get("central_dp") or {}, cfg.get("local_dp") or {}
    policy = cfg.get("node_policy") or {}
    dp = bool(central.get("enabled") or local.get("enabled"))
    rounds, train_loss, score, client_eps = [], [], [], []
    node_scores: dict[str, list[tuple[int, float]]] = {}
    record_eps: dict[str, list[tuple[int, float]]] = {}
    table = []
    for r in records:
        n = int(r["round"])
        ev, tr = r.get("evaluate") or {}, r.get("train") or {}
        rounds.append(n)
        # under DP: the aggregate score only where every scoring node released it with noise, per-node
        # scores only where that node's were noisy, no training loss (as the version's manifest)
        train_loss.append(None if dp else (tr.get("aggregate") or {}).get(wire.TRAIN_LOSS))
        score.append(wire.score(ev.get("aggregate") or {}) if not dp or ev.get("dp_released") else None)
        for node, m in (ev.get("nodes") or {}).items():
            if (s := wire.score(m)) is not None and (not dp or m.get(wire.METRICS_DP) == 1.0):
                node_scores.setdefault(str(node), []).append((n, s))
        privacy = r.get("privacy") or {}
        client_eps.append((privacy.get("client_level") or {}).get("epsilon"))
        for node, spent in (privacy.get("record_level") or {}).items():
            record_eps.setdefault(str(node), []).append((n, float(spent["epsilon"])))
        table.append({"round": n, "initial": bool(r.get("initial")), "trained": sorted(map(str, tr.get("nodes") or {})),
                      "evaluated": sorted(map(str, ev.get("nodes") or {})),
                      "failures": {str(k): _reason(v, dp) for k, v in (r.get("failures") or {}).items()},
                      "score": score[-1], "train_loss": train_loss[-1], "dp_released": bool(ev.get("dp_released")),
                      "version": r.get("version"), "seconds": r.get("seconds")})
    return {
        "name": folder.name, "model": cfg.get("model_name"), "task": cfg.get("task"), "rounds": cfg.get("rounds"),
        "strategy": (cfg.get("strategy") or {}).get("name"), "status": run_status(folder),
        "summary": _json(folder / SUMMARY_FILE),
        "privacy": {
            "dp": dp, "central": bool(central.get("enabled")), "local": bool(local.get("enabled")),
            "secagg": bool((cfg.get("secagg") or {}).get("enabled")),
            "client_target": central.get("target_epsilon") or None, "client_delta": central.get("delta"),
            "record_target": policy.get("epsilon") or None, "record_delta": policy.get("delta"),
        },
        "table": table,
        "charts": {
            "score": {"rounds": rounds, "aggregate": score, "train_loss": train_loss,
                      "nodes": {k: list(zip(*v, strict=True)) for k, v in sorted(node_scores.items())}},
            "epsilon": {"rounds": rounds, "client": client_eps,
                        "nodes": {k: list(zip(*v, strict=True)) for k, v in sorted(record_eps.items())}},
        },
    }


def _reason(why: Any, dp: bool) -> str:
    """A failure's reason; under DP the server's own rejections (which quote an update's exact norm)
    are named without their figures, as in the version's manifest."""
    text = str(why)
    if dp and text.startswith("rejected"):
        return "rejected by the server's update checks (figures withheld under DP)"
    return text


# ----- models ------------------------------------------------------------------------------------
def _signature(registry: Registry, name: str) -> tuple[Any, ...]:
    """What changes when anything of ``name``'s chain changes (files' sizes and times)."""
    folder = registry.root / name
    sig = []
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            for f in sorted(child.iterdir()):
                st = f.stat()
                sig.append((f.name, child.name, st.st_size, st.st_mtime_ns))
        elif child.is_file():
            st = child.stat()
            sig.append((child.name, st.st_size, st.st_mtime_ns))
    return tuple(sig)


@dataclass
class VerifyCache:
    """``Registry.verify`` per model, recomputed only when a file of the model changed (hashing
    every version's weights on every page would cost seconds on a long chain)."""

    found: dict[str, tuple[tuple[Any, ...], str | None]] = field(default_factory=dict)

    def status(self, registry: Registry, name: str) -> str | None:
        """None when every hash and link checks out, else the first problem."""
        sig = _signature(registry, name)
        cached = self.found.get(name)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            registry.verify(name)
            problem = None
        except RegistryError as exc:
            problem = str(exc)
        self.found[name] = (sig, problem)
        return problem


def check_model(registry: Registry, name: str) -> list[Version]:
    try:
        versions = registry.versions(name)
    except RegistryError as exc:
        raise NotFound(str(exc)) from None
    if not versions:
        raise NotFound(f"no model {name!r} in registry {registry.root}")
    return versions


def get_version(registry: Registry, name: str, version: str) -> Version:
    if not re.fullmatch(r"v?[1-9][0-9]{0,8}", version):
        raise NotFound(f"{version!r} is not a version (v1, v2, ...)")
    check_model(registry, name)
    try:
        return registry.get(f"{name}:{version}")
    except RegistryError as exc:
        raise NotFound(str(exc)) from None


def models_overview(registry: Registry, verified: VerifyCache) -> list[dict[str, Any]]:
    rows = []
    for name in registry.models():
        try:
            versions = registry.versions(name)
        except RegistryError as exc:  # an unreadable manifest: shown on the row, not a broken page
            rows.append({"name": name, "versions": 0, "latest": None, "score": None, "created_at": None, "tags": {},
                         "verify": str(exc)})
            continue
        if not versions:
            continue
        latest = versions[-1]
        try:
            tags = registry.current_tags(name)
        except RegistryError:
            tags = {}
        rows.append({"name": name, "versions": len(versions), "latest": latest.number,
                     "score": _score(latest), "created_at": latest.manifest.get("created_at"),
                     "tags": tags, "verify": verified.status(registry, name)})
    return rows


def _score(v: Version) -> float | None:
    return wire.score(((v.manifest.get("metrics") or {}).get("evaluate") or {}).get("aggregate") or {})


def model_view(registry: Registry, name: str, verified: VerifyCache) -> dict[str, Any]:
    versions = check_model(registry, name)
    problem = verified.status(registry, name)
    try:
        tags = registry.current_tags(name)
    except RegistryError:
        tags = {}
    rows = []
    for v in versions:
        m = v.manifest
        rows.append({"number": v.number, "round": m.get("round"), "run_id": m.get("run_id"), "hash": v.hash,
                     "score": _score(v), "nodes": len(m.get("nodes") or []), "created_at": m.get("created_at"),
                     "dp": bool((m.get("dp") or {}).get("central") or (m.get("dp") or {}).get("local")),
                     "resumed_from": m.get("resumed_from"),
                     "tags": sorted(t for t, n in tags.items() if n == v.number)})
    return {"name": name, "versions": rows, "verify": problem, "graph": lineage_graph(versions, tags)}


def lineage_graph(versions: list[Version], tags: dict[str, int]) -> dict[str, Any]:
    """An SVG layout of the chain: one lane per run, versions left to right by number; solid edges
    join the rounds of a run (each trains on the one before), a dashed edge joins a resumed run to
    the version it resumed from, a thin grey line the hash chain (``parent``) across runs."""
    lanes: dict[str, int] = {}
    for v in versions:
        lanes.setdefault(str(v.manifest.get("run_id")), len(lanes))
    step, lane_h, left, top = 34, 46, 150, 26
    nodes, edges = [], []
    where: dict[str, tuple[float, float]] = {}
    prev_in_run: dict[str, Version] = {}
    previous: Version | None = None
    tagged = {n: t for t, n in tags.items()}
    for i, v in enumerate(versions):
        run = str(v.manifest.get("run_id"))
        x, y = left + i * step, top + lanes[run] * lane_h
        where[v.ref()] = (x, y)
        nodes.append({"x": x, "y": y, "label": f"v{v.number}", "ref": v.ref(), "number": v.number,
                      "tag": tagged.get(v.number), "score": _score(v)})
        if run in prev_in_run:
            px, py = where[prev_in_run[run].ref()]
            edges.append({"x1": px, "y1": py, "x2": x, "y2": y, "kind": "run"})
        elif (ref := v.manifest.get("resumed_from")) and ref in where:
            px, py = where[ref]
            edges.append({"x1": px, "y1": py, "x2": x, "y2": y, "kind": "resume"})
        elif previous is not None:
            px, py = where[previous.ref()]
            edges.append({"x1": px, "y1": py, "x2": x, "y2": y, "kind": "chain"})
        prev_in_run[run], previous = v, v
    return {"nodes": nodes, "edges": edges, "lanes": [{"run": r, "y": top + i * lane_h} for r, i in lanes.items()],
            "width": left + max(len(versions), 1) * step + 20, "height": top + max(len(lanes), 1) * lane_h}


def version_view(registry: Registry, version: Version, verified: VerifyCache) -> dict[str, Any]:
    """One version: manifest, lineage, validations per site with intervals, the gate, tags."""
    problem = verified.status(registry, version.name)
    try:
        records = registry.validations(version)
        records_problem = None
    except RegistryError as exc:
        records, records_problem = [], str(exc)
    sites = sorted(latest_per_site(records).values(), key=lambda r: r["score"])
    gate = Gate.of(version)
    try:
        tags = sorted(t for t, n in registry.current_tags(version.name).items() if n == version.number)
    except RegistryError:
        tags = []
    m = version.manifest
    return {
        "ref": version.ref(), "name": version.name, "number": version.number, "hash": version.hash,
        "manifest": m, "manifest_json": json.dumps(m, indent=2, sort_keys=True),
        "lineage": [v.ref() for v in registry.lineage(version)], "verify": problem or records_problem,
        "validations": sites, "worst": sites[0] if sites else None,
        "gate": gate.__dict__, "gate_problems": judge(gate, records) if not records_problem else [records_problem],
        "tags": tags, "score": _score(version),
        "others": [v.number for v in registry.versions(version.name) if v.number != version.number],
        "dp": m.get("dp"), "privacy": m.get("privacy"),
    }


def finite(value: Any) -> Any:
    """NaN and infinity as None (JSON for the charts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
