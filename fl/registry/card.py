"""Model cards built only from provenance (``fl models card NAME:VERSION``).

Everything in a card comes from the registry: the version's manifest and those of its ancestors
(task, network, strategy, rounds, privacy guarantees with their accountants, pretraining, training
sites by keyed fingerprint), its validation records (checked against their chain and the
version's hash first) and its release tags. Nothing is typed in by hand, so a card cannot claim
what the provenance does not hold; where the provenance holds nothing (a site that released no
dataset descriptors), the card says so. Dataset descriptors come from the sites' validation
records (:mod:`nodes.descriptors`: exact, or counts with DP noise) and are shown as
post-processing of those counts (:func:`describe`).

Sections follow Mitchell et al. 2019 ("Model Cards for Model Reporting"); :data:`COVERAGE` names
the items of the EU AI Act's Annex IV (technical documentation of high-risk AI systems) that a
card covers and those it leaves to the provider.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from statistics import NormalDist
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
        "2(d) training data: provenance by keyed fingerprint; case counts, modality, spacing and label "
        "prevalence where the sites' policies release them (exact or with DP noise)",
        "2(g) validation and testing: sites, metrics, intervals, dates",
        "3 performance limits: worst site, best-to-worst gap, unvalidated sites",
        "4 appropriateness of the metrics: the task's key metric, stated"],
    "EU AI Act Annex IV, left to the provider": [
        "1(b) interaction with other systems", "1(d)-(h) hardware, user instructions, forms of placing on the market",
        "2(e) human oversight measures", "5 risk management", "7 standards applied",
        "8 declaration of conformity", "9 post-market monitoring plan"],
}


def card_data(registry: Registry, version: Version, verified: list[Version] | None = None) -> dict[str, Any]:
    """The card's facts; ``verified``: the model's versions as :meth:`Registry.verify` just returned
    them (a caller that checked the chain already, and saw no file change since), else it is checked."""
    versions = verified if verified is not None else registry.verify(version.name)
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
    described = _descriptors(registry, versions, trained)
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
        "dataset_descriptors": described,
        "privacy": {"settings": m.get("dp"), "spent": m.get("privacy")},
        "lineage": {"versions": [v.ref() for v in lineage], "pretraining": m.get("pretraining"),
                    "resumed_from": m.get("resumed_from")},
        "validation": sites,
        "release": {"gate": gate.__dict__, "gate_problems": judge(gate, records),
                    "tags": [{"tag": t["tag"], "gate": t["gate"], "time": t["time"]} for t in registry.tags(version.name)
                             if current.get(t["tag"]) == t["version_number"] == version.number]},
        "limitations": _limitations(sites, trained, validated_fps, described),
        "coverage": COVERAGE,
    }


VISIBLE_SIGMAS = 3.0  # a noisy spacing bin counts as holding cases above this many noise stds


def describe(d: dict[str, Any], confidence: float = 0.95) -> dict[str, Any]:
    """A reader's view of a site's released descriptors, post-processing only: the spacing span
    from the bins that hold cases (above ``VISIBLE_SIGMAS`` noise stds for a noisy release; None
    for an open upper end), and each label's share of the cases with a normal interval for the
    noise (the case counts are public)."""
    total = max(int(d["cases_training"]) + int(d["cases_validation"]), 1)
    std = float(d.get("noise_std") or 0.0)
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    edges = [0.0, *d["spacing_edges"], math.inf]

    def span(counts: list[float] | None) -> list[float | None] | None:
        if counts is None:
            return None
        shown = [i for i, c in enumerate(counts) if c > VISIBLE_SIGMAS * std]
        if not shown:
            return None
        high = edges[shown[-1] + 1]
        return [edges[shown[0]], high if math.isfinite(high) else None]

    prevalence = {}
    for name, held in zip(d["labels"], d["label_cases"], strict=True):
        share, half = min(max(held / total, 0.0), 1.0), z * std / total
        prevalence[name] = {"share": share, "ci_low": max(share - half, 0.0), "ci_high": min(share + half, 1.0)}
    return {"cases_training": int(d["cases_training"]), "cases_validation": int(d["cases_validation"]),
            "modality": d["modality"], "dicom_series_training": (d.get("dicom_series") or [None])[0],
            "spacing_finest_mm": span(d.get("spacing_finest")),
            "spacing_coarsest_mm": span(d.get("spacing_coarsest")), "spacing_range_mm": d.get("spacing_range"),
            "label_prevalence": prevalence, "release": d["release"], "noise_std": std,
            "epsilon_after": d.get("epsilon_after")}


def _descriptors(registry: Registry, versions: list[Version], trained: dict[str, Any]) -> list[dict[str, Any]]:
    """Each site's newest released descriptors, from the validation records of any of the model's
    ``versions`` (they describe the dataset, which the keyed fingerprint names, not the weights)."""
    newest: dict[str, dict[str, Any]] = {}
    for v in versions:
        for record in registry.validations(v):
            if record.get("descriptors"):
                newest[record["dataset_fingerprint"]] = record
    return [{"site": r["site"], "dataset_fingerprint": fp, "trained_it": fp in trained, "time": r["time"],
             **describe(r["descriptors"])} for fp, r in sorted(newest.items(), key=lambda kv: kv[0] not in trained)]


def _limitations(sites: list[dict[str, Any]], trained: dict[str, Any], validated: set[str],
                 described: list[dict[str, Any]]) -> list[str]:
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
    undescribed = [fp for fp in trained if fp not in {d["dataset_fingerprint"] for d in described}]
    if undescribed:
        out.append(f"{len(undescribed)} training site(s) released no dataset descriptors: "
                   + ", ".join(fp[:12] for fp in undescribed) + ".")
    out.append("Validated on held-out cases of the sites that answered; populations, scanners and protocols "
               "outside them are untested.")
    return out


def render(card: dict[str, Any]) -> str:
    lines = (_intro(card) + _training(card) + _data(card) + _privacy(card) + _lineage(card) + _validation(card)
             + _release_and_scope(card))
    return "\n".join(lines) + "\n"


def _intro(card: dict[str, Any]) -> list[str]:
    m = card["model"]
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
    return lines


def _training(card: dict[str, Any]) -> list[str]:
    t = card["training"]
    s = t.get("strategy") or {}
    lines = ["", "## Training", "",
             f"{t['rounds']} round(s) over run(s) {', '.join(str(r) for r in t['runs'])}; strategy {s.get('name')}, "
             f"{s.get('local_epochs')} local epoch(s), learning rate {s.get('local_lr')}, batch {s.get('batch_size')}; "
             f"secure aggregation: {'yes' if t.get('secure_aggregation') else 'no'}.", "",
             "| training site (keyed fingerprint) | cases | validated this version |", "| --- | --- | --- |"]
    for site in card["training_sites"]:
        lines.append(f"| `{site['dataset_fingerprint'][:16]}` | {site['cases'] if site['cases'] is not None else '-'} "
                     f"| {'yes' if site['validated_this_version'] else 'no'} |")
    return lines


def _data(card: dict[str, Any]) -> list[str]:
    lines = ["", "## Data", ""]
    described = card["dataset_descriptors"]
    if not described:
        lines.append("No site has released dataset descriptors (each site's `release_descriptors` policy; "
                     "`fl validate` asks for them).")
    else:
        lines += ["Dataset descriptors as each site released them with `fl validate`: exact, or counts with DP noise "
                  "(the interval covers the noise; a noisy spacing bin shows only above "
                  f"{VISIBLE_SIGMAS:g} noise stds).", "",
                  *_series_line(described),
                  "| site | trained it | cases (train/val) | modality | spacing, finest axis (mm) | "
                  "spacing, coarsest axis (mm) | cases holding each label | release |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d in described:
            prevalence = ", ".join(f"{label} {p['share']:.0%}" + (f" [{p['ci_low']:.0%}, {p['ci_high']:.0%}]"
                                                                   if d["noise_std"] else "")
                                   for label, p in d["label_prevalence"].items()) or "-"
            release = "exact" if d["release"] == "exact" else (
                f"noisy (std {d['noise_std']:.1f} per count" + (f", site epsilon after {d['epsilon_after']:.2f}"
                                                               if d.get("epsilon_after") is not None else "") + ")")
            lines.append(f"| {d['site']} | {'yes' if d['trained_it'] else 'no'} | {d['cases_training']}/"
                         f"{d['cases_validation']} | {', '.join(d['modality']) or '-'} | "
                         f"{_span(d['spacing_finest_mm'], d['spacing_range_mm'], 0)} | "
                         f"{_span(d['spacing_coarsest_mm'], d['spacing_range_mm'], 1)} | {prevalence} | {release} |")
    return lines


def _series_line(described: list[dict[str, Any]]) -> list[str]:
    """"Trained on N DICOM series from K sites", from the training sites' released series counts
    (rounded; noisy counts say so)."""
    counts = [(d["dicom_series_training"], d["noise_std"]) for d in described
              if d["trained_it"] and d.get("dicom_series_training") is not None]
    if not counts or sum(n for n, _ in counts) < 0.5:
        return []
    total, std = sum(n for n, _ in counts), math.sqrt(sum(s**2 for _, s in counts))
    noisy = f" (DP counts: +/- {1.96 * std:.0f} at 95%)" if std else ""
    return [f"Trained on {max(round(total), 0)} DICOM series{noisy} from {len(counts)} site(s), as they released "
            "their counts; the series themselves are known to each site only (`fl node provenance`).", ""]


def _privacy(card: dict[str, Any]) -> list[str]:
    lines = ["", "## Privacy", ""]
    settings, spent = card["privacy"]["settings"] or {}, card["privacy"]["spent"] or {}
    lines.append(f"Client-level DP: {json.dumps(settings.get('central')) if settings.get('central') else 'none'}; "
                 f"spent: {json.dumps(spent.get('client_level'))}.")
    lines.append(f"Record-level DP on each node: {json.dumps(settings.get('local')) if settings.get('local') else 'none'}; "
                 f"spent per node: {json.dumps(spent.get('record_level') or {})}.")
    return lines


def _lineage(card: dict[str, Any]) -> list[str]:
    pre = card["lineage"]["pretraining"]
    return ["", "## Lineage", "", " -> ".join(card["lineage"]["versions"]) + ".",
            "Pretraining: " + (f"{pre.get('source')} (public data SHA-256 `{str(pre.get('public_dataset_sha256'))[:16]}`, "
                               f"{pre.get('training_cases')} cases, {pre.get('epochs')} epochs)" if pre else "none") + "."]


def _validation(card: dict[str, Any]) -> list[str]:
    lines = ["", "## Validation", "",
             "| site | trained it | cases | score | interval | release | date |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in card["validation"]:
        trained = {True: "yes", False: "no", None: "unknown"}[r.get("trained_it")]
        lines.append(f"| {r['site']} | {trained} | {r['cases']} | {r['score']:.3f} | [{r['ci_low']:.3f}, "
                     f"{r['ci_high']:.3f}] ({r['confidence']:.0%}) | {r['release']} | {r['time'][:10]} |")
    per_class = [(r["site"], label, v) for r in card["validation"] for label, v in (r.get("per_class") or {}).items()]
    if per_class:
        lines += ["", "Per-class scores of a multi-class task, over the cases that hold each class (under a noisy "
                  "release the score and the case count are DP values):", "",
                  "| site | class | score | interval | cases |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {site} | {label} | {v['score']:.3f} | [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | {v['cases']:g} |"
                  for site, label, v in per_class]
    return lines


def _release_and_scope(card: dict[str, Any]) -> list[str]:
    rel = card["release"]
    tags = "; ".join(f"{t['tag']} (gate {t['gate']}, {t['time'][:10]})" for t in rel["tags"]) or "none"
    lines = ["", f"The run config's release gate {rel['gate']}: " + (
        "passed" if not rel["gate_problems"] else "not passed (" + "; ".join(rel["gate_problems"]) + ")")
             + f". Current tags, with the gate each passed: {tags}.", "", "## Limitations", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    lines += ["", "## What this card covers", ""]
    for source, items in card["coverage"].items():
        lines.append(f"- {source}: " + "; ".join(items) + ".")
    return lines


def _span(bins: list[float | None] | None, exact: list[float] | None, end: int) -> str:
    text = "-" if bins is None else (f"{bins[0]:g} to {bins[1]:g}" if bins[1] is not None else f"{bins[0]:g} or more")
    if exact is not None:
        text += f" (smallest {exact[0]:g})" if end == 0 else f" (largest {exact[1]:g})"
    return text


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
