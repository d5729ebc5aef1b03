"""An AI Act dossier per version (``fl models dossier NAME:VERSION --out DIR``, and the console's
printable page): the facts the provider's technical documentation needs, each tied to the record
that holds it.

Medical-imaging AI is high-risk under the EU AI Act (Regulation (EU) 2024/1689): its provider keeps
technical documentation (Art. 11 and Annex IV), data governance (Art. 10), logs (Art. 12) and
accuracy and robustness figures (Art. 15). Every statement here is read from the registry (the
version's manifest and those of its lineage, its validation records, its tags, as
:func:`fl.registry.card.card_data` checks them) and carries the record it came from with that
record's hash; the dossier ends with ``fl models verify``'s result over the whole chain. It is a
draft for the provider's documentation, not a conformity assessment: what the registry cannot
know (human oversight, risk management, post-market monitoring) is listed as left to the
provider.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl.errors import RegistryError
from fl.registry.card import card_data
from fl.registry.store import Registry, Version, _write

DRAFT = ("A draft for the provider's technical documentation, generated from the registry's records: not a "
         "conformity assessment, and not a claim that the system meets the Regulation.")
LEFT_TO_PROVIDER = [
    ("Annex IV 1(b), 1(d)-(h)", "interaction with other systems, hardware, forms of placing on the market, "
                                "instructions for use"),
    ("Art. 14; Annex IV 2(e)", "human oversight measures"),
    ("Art. 9; Annex IV 5", "risk management system"),
    ("Annex IV 7", "harmonised standards or common specifications applied"),
    ("Art. 47; Annex IV 8", "EU declaration of conformity"),
    ("Art. 72; Annex IV 9", "post-market monitoring plan"),
]
# What leaves a site in OncoFed, whatever the settings (docs/explanation/privacy.md): stated, not read
NEVER_LEFT = ("images, labels, file paths, patient or study identifiers and per-case outputs never left a site: "
              "nodes send model updates (under DP: DP releases), aggregate metrics (exact, with DP noise, or none, "
              "as each site's policy says) and dataset descriptors (the same modes)")


def _src(version: Version) -> dict[str, str]:
    return {"record": f"manifest {version.ref()}", "hash": version.hash}


def dossier_data(registry: Registry, version: Version, chain: Callable[[], str | None] | None = None) -> dict[str, Any]:
    """The dossier of ``version``: sections, each naming the Act's article or Annex IV item it
    serves, each statement with its source record. ``chain``: returns the chain's first problem or
    None (the console's cached ``verify``); by default :meth:`Registry.verify` runs here."""
    if chain is None:
        def chain() -> str | None:
            try:
                registry.verify(version.name)
            except RegistryError as exc:
                return str(exc)
            return None
    problem = chain()
    verified = {"ok": problem is None,
                "result": f"ok {version.name}: chains and hashes verified" if problem is None else problem}
    card = card_data(registry, version, verified=registry.versions(version.name)) if problem is None else None
    m = version.manifest
    lineage = registry.lineage(version)
    src = _src(version)
    sections = [
        _purpose(m, card, src),
        _data(m, card, lineage, src),
        _training(m, card, lineage, src),
        _validation(registry, version, card),
        _robustness(m, src),
        _records(registry, version, lineage, verified),
        {"title": "Left to the provider", "serves": "Annex IV items this dossier does not cover",
         "statements": [{"text": f"{ref}: {what}.", "source": None} for ref, what in LEFT_TO_PROVIDER]},
    ]
    return {"model": {"name": version.name, "version": version.number, "ref": version.ref(), "hash": version.hash,
                      "weights_sha256": m.get("weights_sha256"), "created_at": m.get("created_at"),
                      "software": m.get("software")},
            "draft": DRAFT, "verify": verified, "sections": sections}


def _purpose(m: dict[str, Any], card: dict[str, Any] | None, src: dict[str, str]) -> dict[str, Any]:
    bundle = m.get("bundle") or {}
    intended = card["intended_use"] if card else bundle.get("intended_use")
    out = [{"text": f"Intended purpose: {intended or 'not stated in the bundle metadata'}", "source": src},
           {"text": f"Task: {m.get('task')}" + (f"; MONAI bundle {bundle.get('name')} {bundle.get('version')} "
                                                 f"(digest {str(bundle.get('digest'))[:16]})" if bundle else "")
            + (f": {bundle['task']}" if bundle.get("task") else "") + ".", "source": src}]
    return {"title": "Intended purpose and task", "serves": "Art. 11, Art. 13; Annex IV 1(a)", "statements": out}


def _data(m: dict[str, Any], card: dict[str, Any] | None, lineage: list[Version],
          src: dict[str, str]) -> dict[str, Any]:
    out = []
    sites = card["training_sites"] if card else []
    out.append({"text": f"{len(sites)} training site(s), named by keyed dataset fingerprint (a site's key never "
                        "leaves it): " + (", ".join(f"{s['dataset_fingerprint'][:16]}"
                                                     + (f" ({s['cases']} cases)" if s["cases"] is not None else "")
                                                     for s in sites) or "none recorded") + ".",
                "source": {"record": "manifests " + ", ".join(v.ref() for v in lineage), "hash": m.get("hash", "")}})
    for d in (card["dataset_descriptors"] if card else []):
        release = "with DP noise (std %.3g)" % d["noise_std"] if d["release"] == "noisy" else d["release"]
        modality = ", ".join(f"{k} {v:g}" for k, v in (d.get("modality") or {}).items()) \
            if isinstance(d.get("modality"), dict) else d.get("modality")
        out.append({"text": f"Site {d['site']} (fingerprint {d['dataset_fingerprint'][:16]}, "
                            f"{'trained it' if d['trained_it'] else 'did not train it'}): released its dataset "
                            f"descriptors {release}: {d['cases_training']} training and {d['cases_validation']} "
                            f"validation cases, modality {modality}"
                            + (f", {d['dicom_series_training']:.0f} DICOM series in training"
                               if d.get("dicom_series_training") is not None else "") + ".",
                    "source": {"record": f"validation record of site {d['site']} ({d['time'][:10]})", "hash": ""}})
    if card and not card["dataset_descriptors"]:
        out.append({"text": "No site released dataset descriptors (their policies release none, or no site ran "
                            "`fl validate`).", "source": None})
    out.append({"text": "De-identification: each node's `fl node check` refuses DICOM that still carries PS3.15 "
                        "basic-profile attributes before any training unless its operator overrides it on the node "
                        "(`--allow-identifiable-dicom`); the coordinator holds no record of a site's override, so "
                        "each site's de-identification status must be confirmed by the site.", "source": None})
    out.append({"text": "What never left a site: " + NEVER_LEFT + ".", "source": None})
    return {"title": "Data and data governance", "serves": "Art. 10; Annex IV 2(d)", "statements": out}


def _training(m: dict[str, Any], card: dict[str, Any] | None, lineage: list[Version],
              src: dict[str, str]) -> dict[str, Any]:
    s = m.get("strategy") or {}
    dp, privacy = m.get("dp") or {}, m.get("privacy") or {}
    runs = sorted({str(v.manifest.get("run_id")) for v in lineage})
    out = [{"text": f"{m.get('round')} round(s) in run(s) {', '.join(runs)}; strategy {s.get('name')}, "
                    f"{s.get('local_epochs')} local epoch(s) per round, learning rate {s.get('local_lr')}, batch "
                    f"{s.get('batch_size')}, at least {s.get('min_nodes')} node(s).", "source": src},
           {"text": "Secure aggregation: " + (json.dumps(m.get("secure_aggregation"))
                                              if m.get("secure_aggregation") else "none") + ".", "source": src},
           {"text": "Client-level DP: " + (json.dumps(dp.get("central")) if dp.get("central") else "none")
                    + "; spent: " + (json.dumps(privacy.get("client_level")) if privacy.get("client_level")
                                     else "nothing") + ".", "source": src},
           {"text": "Record-level DP on each node: " + (json.dumps(dp.get("local")) if dp.get("local") else "none")
                    + "; spent per node: " + json.dumps(privacy.get("record_level") or {}) + ".", "source": src}]
    pre = m.get("pretraining")
    out.append({"text": "Pretraining: " + (f"{pre.get('source')} (public data SHA-256 "
                                           f"{str(pre.get('public_dataset_sha256'))[:16]}, {pre.get('training_cases')}"
                                           f" cases, {pre.get('epochs')} epochs)" if pre else "none") + ".",
                "source": src})
    if m.get("resumed_from"):
        out.append({"text": f"Resumed from {m['resumed_from']}.", "source": src})
    return {"title": "Training process", "serves": "Annex IV 2(a), 2(b)", "statements": out}


def _validation(registry: Registry, version: Version, card: dict[str, Any] | None) -> dict[str, Any]:
    out = []
    sites = card["validation"] if card else []
    for r in sites:
        trained = {True: "trained it", False: "never trained it", None: "unknown whether it trained it"}[
            r.get("trained_it")]
        out.append({"text": f"Site {r['site']} ({trained}): {r['metric']} {r['score']:.3f}, "
                            f"{r['confidence']:.0%} interval [{r['ci_low']:.3f}, {r['ci_high']:.3f}] on {r['cases']} "
                            f"cases, released {r['release']}, {r['time'][:10]}.",
                    "source": {"record": f"validation record of site {r['site']}", "hash": r.get("hash", "")}})
    if sites:
        worst = sites[0]
        out.append({"text": f"Worst site: {worst['site']} with {worst['metric']} {worst['score']:.3f}"
                            + (f"; best-to-worst gap {sites[-1]['score'] - worst['score']:.3f}" if len(sites) > 1
                               else "") + ".", "source": None})
    else:
        out.append({"text": "No site has validated this version (`fl validate`).", "source": None})
    if card:
        rel = card["release"]
        out.append({"text": f"Release gate {rel['gate']}: " + ("passed" if not rel["gate_problems"] else
                                                                "not passed (" + "; ".join(rel["gate_problems"]) + ")")
                            + ". Tags: " + ("; ".join(f"{t['tag']} ({t['time'][:10]}, gate {t['gate']})"
                                                      for t in rel["tags"]) or "none") + ".",
                    "source": {"record": f"{version.name}/tags.jsonl", "hash": ""}})
        out += [{"text": f"Limitation: {item}", "source": None} for item in card["limitations"]]
    return {"title": "Validation and accuracy", "serves": "Art. 15(1)-(3); Annex IV 2(g), 3, 4",
            "statements": out}


def _robustness(m: dict[str, Any], src: dict[str, str]) -> dict[str, Any]:
    config = m.get("config") or {}
    bound = config.get("strategy.max_update_norm")
    out = [{"text": f"Aggregation: {config.get('strategy.name')}"
                    + (f", trimmed fraction {config.get('strategy.trim_fraction')}"
                       if config.get("strategy.trim_fraction") else "") + "; update norm bound: "
                    + (f"{bound:g} (larger updates are excluded and named)" if bound else "none") + ".", "source": src},
           {"text": "Each node runs only app versions (FAB hashes) its operator approved, checks every privacy "
                    "parameter the coordinator sends against its own policy and ledger, and refuses with a reason "
                    "otherwise; every version, validation record and tag is hash-chained.", "source": None}]
    return {"title": "Robustness and cybersecurity", "serves": "Art. 15(4)-(5)", "statements": out}


def _records(registry: Registry, version: Version, lineage: list[Version], verified: dict[str, Any]) -> dict[str, Any]:
    out = [{"text": f"{v.ref()} (round {v.manifest.get('round')}, run {v.manifest.get('run_id')}, created "
                    f"{v.manifest.get('created_at')}): manifest hash {v.hash}, parent {v.manifest.get('parent')}, "
                    f"weights SHA-256 {v.manifest.get('weights_sha256')}.", "source": _src(v)} for v in lineage]
    out.append({"text": f"`fl models verify {version.name}`: {verified['result']}.", "source": None})
    return {"title": "Record-keeping: the hash chain", "serves": "Art. 12; Annex IV 1(c), 6", "statements": out}


def render_markdown(d: dict[str, Any]) -> str:
    m = d["model"]
    lines = [f"# AI Act dossier: {m['ref']}", "", f"> {d['draft']}", "",
             f"Version hash `{m['hash']}`; weights SHA-256 `{m['weights_sha256']}`; created {m['created_at']}.", ""]
    for section in d["sections"]:
        lines += [f"## {section['title']}", "", f"*Serves: {section['serves']}.*", ""]
        for st in section["statements"]:
            source = st.get("source")
            tail = f" *(source: {source['record']}" + (f", hash `{source['hash'][:16]}`" if source.get("hash") else "") \
                + ")*" if source else ""
            lines.append(f"- {st['text']}{tail}")
        lines.append("")
    return "\n".join(lines)


def write_dossier(registry: Registry, ref: str, out: Path) -> list[Path]:
    """``DOSSIER.md``, ``dossier.json`` and ``dossier.html`` (printable, self-contained) for ``ref``."""
    from fl.registry.dossier_html import render_html

    version = registry.get(ref)
    data = dossier_data(registry, version)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(f"--out: cannot create {out} ({exc.strerror})") from None
    written = []
    for name, text in (("dossier.json", json.dumps(data, indent=2) + "\n"), ("DOSSIER.md", render_markdown(data)),
                       ("dossier.html", render_html(data))):
        tmp = out / f".{name}.tmp"
        _write(tmp, text.encode())
        os.replace(tmp, out / name)
        written.append(out / name)
    return written
