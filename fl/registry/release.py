"""Release gates and promotion (``fl models promote NAME:VERSION --tag production``).

A gate is part of the run config that trained the version (``validation.gate_*``, recorded in its
manifest), or given on the command line: the lowest score any validating site may report, the
largest gap between the best and the worst site, the number of sites that must have validated the
version. It is judged on the version's validation records (each site's newest), which
:meth:`Registry.validations` checks against their chain and the version's hash first. A version
that fails is refused with the failing sites named; one that passes gets a hash-chained tag record
naming the gate and its result.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from fl.errors import RegistryError
from fl.registry.store import Registry, Version


@dataclass(frozen=True)
class Gate:
    min_score: float = 0.0  # 0: none
    max_gap: float = 0.0  # 0: none
    min_sites: int = 1

    @classmethod
    def of(cls, version: Version, **overrides: float | int | None) -> Gate:
        config = version.manifest.get("config") or {}
        gate = cls(min_score=float(config.get("validation.gate_min_score", 0.0)),
                   max_gap=float(config.get("validation.gate_max_gap", 0.0)),
                   min_sites=int(config.get("validation.gate_min_sites", 1)))
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**asdict(gate), **chosen})


def latest_per_site(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for record in records:  # oldest first: a site's newer validation replaces its older one
        out[record["site"]] = record
    return out


def judge(gate: Gate, records: list[dict[str, Any]]) -> list[str]:
    """What fails the gate, one line each (empty: it passes)."""
    sites = latest_per_site(records)
    problems = []
    if len(sites) < gate.min_sites:
        problems.append(f"{len(sites)} site(s) validated it; the gate needs {gate.min_sites}")
    if gate.min_score > 0:
        for site, record in sorted(sites.items(), key=lambda kv: kv[1]["score"]):
            if record["score"] < gate.min_score:
                problems.append(f"site {site}: {record['metric']} {record['score']:.3f} < {gate.min_score:g}")
    if gate.max_gap > 0 and len(sites) >= 2:
        ordered = sorted(sites.values(), key=lambda r: r["score"])
        gap = ordered[-1]["score"] - ordered[0]["score"]
        if gap > gate.max_gap:
            problems.append(f"gap {gap:.3f} between site {ordered[-1]['site']} ({ordered[-1]['score']:.3f}) and site "
                            f"{ordered[0]['site']} ({ordered[0]['score']:.3f}) > {gate.max_gap:g}")
    return problems


class GateFailed(RegistryError):
    """A promotion refused by its gate; the message names the failing sites."""


def promote(registry: Registry, ref: str, tag: str, gate: Gate) -> dict[str, Any]:
    """Tag ``ref`` if it passes ``gate``; raises :class:`GateFailed` naming what fails."""
    if not tag or not tag.replace("-", "").replace("_", "").isalnum():
        raise RegistryError(f"--tag: {tag!r} must be letters, digits, '-' or '_'")
    version = registry.get(ref)
    registry.verify(version.name)
    records = registry.validations(version)
    problems = judge(gate, records)
    if problems:
        raise GateFailed(f"{version.ref()} not promoted to {tag!r}: " + "; ".join(problems))
    sites = latest_per_site(records)
    return registry.add_tag(version, tag, {
        "gate": asdict(gate),
        "sites": {site: r["score"] for site, r in sorted(sites.items())},
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
