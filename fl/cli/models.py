"""``fl models``: list, show, verify, export and diff registry versions."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fl.registry import Registry, RegistryError, Version


def add_parsers(sub: Any) -> None:
    models = sub.add_parser("models", help="the versioned model registry").add_subparsers(
        dest="models_command", required=True
    )

    def cmd(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        parser = models.add_parser(name, help=help_text)
        parser.add_argument("--registry", default="./registry", help="registry root (config registry.root)")
        parser.set_defaults(func=func)
        return parser

    cmd("list", "every version, oldest first", cmd_list).add_argument("--json", action="store_true")
    cmd("show", "a version's manifest and lineage", cmd_show).add_argument("ref", metavar="NAME[:VERSION]")
    cmd("verify", "recompute every hash and the parent chain", cmd_verify).add_argument("name", nargs="?")
    export = cmd("export", "write a version as a MONAI bundle, safetensors or TorchScript", cmd_export)
    export.add_argument("ref", metavar="NAME:VERSION")
    export.add_argument("--format", required=True, choices=("bundle", "safetensors", "torchscript"))
    export.add_argument("--out", required=True)
    diff = cmd("diff", "metric, config and parameter differences between two versions", cmd_diff)
    diff.add_argument("a", metavar="NAME:VERSION")
    diff.add_argument("b", metavar="NAME:VERSION")
    promote = cmd("promote", "tag a version (e.g. production) if its validations pass the release gate", cmd_promote)
    promote.add_argument("ref", metavar="NAME:VERSION")
    promote.add_argument("--tag", required=True)
    promote.add_argument("--min-score", type=float, help="gate: lowest score at any site (default: the version's "
                                                          "validation.gate_min_score)")
    promote.add_argument("--max-gap", type=float, help="gate: largest best-to-worst gap (validation.gate_max_gap)")
    promote.add_argument("--min-sites", type=int, help="gate: sites that must have validated it")
    card = cmd("card", "write the version's model card (Markdown and JSON) from its provenance", cmd_card)
    card.add_argument("ref", metavar="NAME:VERSION")
    card.add_argument("--out", required=True, help="folder for MODEL_CARD.md and model_card.json")
    dossier = cmd("dossier", "write the version's AI Act dossier (Markdown, JSON, printable HTML) from its records",
                  cmd_dossier)
    dossier.add_argument("ref", metavar="NAME:VERSION")
    dossier.add_argument("--out", required=True, help="folder for DOSSIER.md, dossier.json and dossier.html")


def cmd_promote(args: argparse.Namespace) -> int:
    from fl.registry.release import Gate, promote

    registry = Registry(args.registry)
    gate = Gate.of(registry.get(args.ref), min_score=args.min_score, max_gap=args.max_gap, min_sites=args.min_sites)
    record = promote(registry, args.ref, args.tag, gate)
    print(f"{args.ref} is now {args.tag!r} (gate {record['gate']}; sites {record['sites']})")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fl.registry.card import write_card

    for path in write_card(Registry(args.registry), args.ref, Path(args.out)):
        print(path)
    return 0


def cmd_dossier(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fl.registry.dossier import write_dossier

    for path in write_dossier(Registry(args.registry), args.ref, Path(args.out)):
        print(path)
    return 0


def _row(v: Version) -> dict[str, Any]:
    m = v.manifest
    return {
        "name": v.name, "version": v.number, "round": m.get("round"), "hash": v.hash,
        "parent": m.get("parent"), "run_id": m.get("run_id"), "created_at": m.get("created_at"),
        "metrics": ((m.get("metrics") or {}).get("evaluate") or {}).get("aggregate", {}),
        "nodes": len(m.get("nodes") or []),
    }


def cmd_list(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    rows = []
    for name in registry.models():
        tags = registry.current_tags(name)
        for v in registry.versions(name):
            rows.append({**_row(v), "tags": sorted(t for t, n in tags.items() if n == v.number)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"registry {registry.root}")
    for column in ("model", "version", "round", "dice", "nodes", "tags", "run", "hash"):
        table.add_column(column)
    for r in rows:
        dice = r["metrics"].get("dice")
        table.add_row(r["name"], f"v{r['version']}", str(r["round"]), "-" if dice is None else f"{dice:.4f}",
                      str(r["nodes"]), ", ".join(r["tags"]) or "-", str(r["run_id"]), r["hash"][:12])
    Console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    version = registry.get(args.ref)
    lineage = [f"{v.ref()} (round {v.manifest.get('round')}, run {v.manifest.get('run_id')})"
               for v in registry.lineage(version)]
    tags = sorted(t for t, n in registry.current_tags(version.name).items() if n == version.number)
    print(json.dumps({"manifest": version.manifest, "lineage": lineage, "tags": tags,
                      "validations": registry.validations(version)}, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    if not registry.root.is_dir():
        raise RegistryError(f"{registry.root}: no registry folder here (check --registry or registry.root)")
    names = [args.name] if args.name else registry.models()
    if not names:
        print(f"registry {registry.root}: no models")
        return 0
    for name in names:
        versions = registry.verify(name)
        checked = sum(len(registry.validations(v)) for v in versions)
        print(f"ok {name}: {len(versions)} version(s), {checked} validation record(s) and "
              f"{len(registry.tags(name, versions))} tag record(s); chains and hashes verified")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fl.registry.export import export

    print(export(Registry(args.registry).get(args.ref), args.format, args.out))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from fl.registry.diff import diff

    registry = Registry(args.registry)
    print(json.dumps(diff(registry.get(args.a), registry.get(args.b)), indent=2))
    return 0
