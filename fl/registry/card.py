"""Model cards built only from provenance (``fl models card NAME:VERSION``).

Everything in a card comes from the registry: the version's manifest and those of its ancestors
(task, network, strategy, rounds, privacy guarantees with their accountants, pretraining, training
sites by keyed fingerprint), its validation records (checked against their chain and the
version's hash first) and its release tags. Nothing is typed in by hand, so a card cannot claim
what the provenance does not hold; where the provenance holds nothing (e.g. dataset descriptors,
which no node releases yet), the card says so.

Sections follow Mitchell et al. 2019 ("Model Cards for Model Reporting"); :data:`COVERAGE` names
the items of the EU AI Act's Annex IV (technical documentation of high-risk AI systems) that a
card covers and those it leaves to the provider.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fl.registry.release import Gate, judge, latest_per_site
from fl.registry.store import Registry, Version, _write

COVERAGE = {
    "Mitchell et al. 2019": ["model details", "intended use", "metrics", "evaluation data (per-site validation)",
                             "training data (sites by keyed fingerprint)", "quantitative analyses (per-site scores "
                             "with intervals)", "caveats and recommendations (weakest and unvalidated sites)"],
    "EU AI Act Annex IV, covered": [
        "1(a) intended purpose, provider-side (from the bundle metadata or the task)",
        "1(c) versions of the software and the model (code version, hashes, lineage)",
        "2(a) development methods and steps, including the pretrained system it starts from",
        "2(b) design choices: strategy, rounds, local training, privacy mechanisms",
        "2(d) training data: provenance by keyed fingerprint (descriptors: not released)",
        "2(g) validation and testing: sites, metrics, intervals, dates",
        "3 performance limits: worst site, best-to-worst gap, unvalidated sites",
        "4 appropriateness of the metrics: the task's key metric, stated"],
    "EU AI Act Annex IV, left to the provider": [
        "1(b) interaction with other systems", "1(d)-(h) hardware, user instructions, forms of placing on the market",
        "2(e) human oversight measures", "5 risk management", "7 standards applied",
        "8 declaration of conformity", "9 post-market monitoring plan"],
}


def card_data(registry: Registry, version: Version) -> dict[str, Any]:
    registry.verify(version.name)
    m = version.manifest
    lineage = registry.lineage(version)
    trained = registry.training_sites(version)
    current = registry.current_tags(version.name)
    records = registry.validations(version)
    sites = sorted(latest_per_site(records).values(), key=lambda r: r["score"])
    validated_fps = {r["dataset_fingerprint"] for r in sites}
    bundle = m.get("bundle") or {}
    gate = Gate.of(version)
    intended = bundle.get("intended_use") or (
        f"Research: {m.get('task')} on images like those of the training sites. Not a medical device; not for "
        "clinical decisions without a conformity assessment.")
    return {
        "model": {"name": version.name, "version": version.number, "hash": version.hash,
                  "weights_sha256": m.get("weights_sha256"), "created_at": m.get("created_at"),
                  "software": m.get("software"), "config_hash": m.get("config_hash")},
        "intended_use": intended,
        "task": {"name": m.get("task"), "bundle": bundle or None,
                 "metric": sites[0]["metric"] if sites else "dice"},
        "training": {"rounds": m.get("round"), "runs": sorted({v.manifest.get("run_id") for v in lineage}),
                     "strategy": m.get("strategy"), "secure_aggregation": m.get("secure_aggregation")},
        "training_sites": [{"dataset_fingerprint": fp, "cases": n, "validated_this_version": fp in validated_fps}
                           for fp, n in sorted(trained.items())],
        "dataset_descriptors": "not released: no node releases case counts, modality, spacing or prevalence "
                               "with noise yet",
        "privacy": {"settings": m.get("dp"), "spent": m.get("privacy")},
        "lineage": {"versions": [v.ref() for v in lineage], "pretraining": m.get("pretraining"),
                    "resumed_from": m.get("resumed_from")},
        "validation": sites,
        "release": {"gate": gate.__dict__, "gate_problems": judge(gate, records),
                    "tags": [{"tag": t["tag"], "gate": t["gate"], "time": t["time"]} for t in registry.tags(version.name)
                             if current.get(t["tag"]) == t["version_number"] == version.number]},
        "limitations": _limitations(sites, trained, validated_fps),
        "coverage": COVERAGE,
    }


def _limitations(sites: list[dict[str, Any]], trained: dict[str, Any], validated: set[str]) -> list[str]:
    out = []
    if not sites:
        out.append("No site has validated this version (run `fl validate`).")
    else:
        worst = sites[0]
        out.append(f"Weakest site: {worst['site']} with {worst['metric']} {worst['score']:.3f} "
                   f"[{worst['ci_low']:.3f}, {worst['ci_high']:.3f}] on {worst['cases']} cases.")
        if len(sites) > 1:
            out.append(f"Best-to-worst gap: {sites[-1]['score'] - worst['score']:.3f}.")
        external = [s for s in sites if s.get("trained_it") is False]
        out.append(f"{len(external)} of {len(sites)} validating site(s) never trained it.")
    missing = [fp for fp in trained if fp not in validated]
    if missing:
        out.append(f"{len(missing)} training site(s) never validated this version: "
                   + ", ".join(fp[:12] for fp in missing) + ".")
    out.append("Validated on held-out cases of the sites that answered; populations, scanners and protocols "
               "outside them are untested.")
    return out


def render(card: dict[str, Any]) -> str:
    m, t = card["model"], card["training"]
    lines = [f"# Model card: {m['name']} v{m['version']}", "",
             f"Version hash `{m['hash']}`, weights SHA-256 `{m['weights_sha256']}`, created {m['created_at']}, "
             f"OncoFed {(m.get('software') or {}).get('oncofed', '?')}. Built by `fl models card` from the "
             "registry's provenance only.", "",
             "## Intended use", "", card["intended_use"], "",
             "## Model", "", f"Task `{card['task']['name']}`; key metric {card['task']['metric']}."]
    if card["task"]["bundle"]:
        b = card["task"]["bundle"]
        lines.append(f"MONAI bundle `{b.get('name')}` {b.get('version')} (digest `{str(b.get('digest'))[:16]}`)"
                     + (f": {b['task']}." if b.get("task") else "."))
    s = t.get("strategy") or {}
    lines += ["", "## Training", "",
              f"{t['rounds']} round(s) over run(s) {', '.join(str(r) for r in t['runs'])}; strategy {s.get('name')}, "
              f"{s.get('local_epochs')} local epoch(s), learning rate {s.get('local_lr')}, batch {s.get('batch_size')}; "
              f"secure aggregation: {'yes' if t.get('secure_aggregation') else 'no'}.", "",
              "| training site (keyed fingerprint) | cases | validated this version |", "| --- | --- | --- |"]
    for site in card["training_sites"]:
        lines.append(f"| `{site['dataset_fingerprint'][:16]}` | {site['cases'] if site['cases'] is not None else '-'} "
                     f"| {'yes' if site['validated_this_version'] else 'no'} |")
    lines += ["", f"Dataset descriptors: {card['dataset_descriptors']}.", "", "## Privacy", ""]
    settings, spent = card["privacy"]["settings"] or {}, card["privacy"]["spent"] or {}
    lines.append(f"Client-level DP: {json.dumps(settings.get('central')) if settings.get('central') else 'none'}; "
                 f"spent: {json.dumps(spent.get('client_level'))}.")
    lines.append(f"Record-level DP on each node: {json.dumps(settings.get('local')) if settings.get('local') else 'none'}; "
                 f"spent per node: {json.dumps(spent.get('record_level') or {})}.")
    pre = card["lineage"]["pretraining"]
    lines += ["", "## Lineage", "", " -> ".join(card["lineage"]["versions"]) + ".",
              "Pretraining: " + (f"{pre.get('source')} (public data SHA-256 `{str(pre.get('public_dataset_sha256'))[:16]}`, "
                                 f"{pre.get('training_cases')} cases, {pre.get('epochs')} epochs)" if pre else "none") + ".",
              "", "## Validation", "",
              "| site | trained it | cases | score | interval | release | date |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in card["validation"]:
        trained = {True: "yes", False: "no", None: "unknown"}[r.get("trained_it")]
        lines.append(f"| {r['site']} | {trained} | {r['cases']} | {r['score']:.3f} | [{r['ci_low']:.3f}, "
                     f"{r['ci_high']:.3f}] ({r['confidence']:.0%}) | {r['release']} | {r['time'][:10]} |")
    per_class = [(r["site"], label, v) for r in card["validation"] for label, v in (r.get("per_class") or {}).items()]
    if per_class:
        lines += ["", "Per-class scores (exact releases of a multi-class task):", "",
                  "| site | class | score | interval | cases |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {site} | {label} | {v['score']:.3f} | [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | {v['cases']} |"
                  for site, label, v in per_class]
    rel = card["release"]
    tags = "; ".join(f"{t['tag']} (gate {t['gate']}, {t['time'][:10]})" for t in rel["tags"]) or "none"
    lines += ["", f"The run config's release gate {rel['gate']}: " + (
        "passed" if not rel["gate_problems"] else "not passed (" + "; ".join(rel["gate_problems"]) + ")")
              + f". Current tags, with the gate each passed: {tags}.", "", "## Limitations", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    lines += ["", "## What this card covers", ""]
    for source, items in card["coverage"].items():
        lines.append(f"- {source}: " + "; ".join(items) + ".")
    return "\n".join(lines) + "\n"


def write_card(registry: Registry, ref: str, out: Path) -> list[Path]:
    """``MODEL_CARD.md`` and ``model_card.json`` for ``ref`` under ``out``."""
    card = card_data(registry, registry.get(ref))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("model_card.json", json.dumps(card, indent=2) + "\n"), ("MODEL_CARD.md", render(card))):
        tmp = out / f".{name}.tmp"
        _write(tmp, text.encode())
        os.replace(tmp, out / name)  # a reader sees the old card or the new one, never half of one
        written.append(out / name)
    return written
