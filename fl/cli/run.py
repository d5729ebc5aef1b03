"""``fl run``, ``fl data`` and ``fl config``: a federation on the Simulation Engine, its data,
its configuration."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fl.config import Config


def add_parsers(sub: Any) -> None:
    run = sub.add_parser("run", help="run a federation on Flower's Simulation Engine")
    run.add_argument("config", help="TOML config, e.g. configs/quickstart.toml")
    run.add_argument("--out", help="parent folder of the run folder (sets output.dir)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set rounds=5 --set train.lr=0.005")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest registry version of model_name (sets registry.resume)")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own log lines")
    validate = sub.add_parser("validate", help="score a registered version at every site that answers (external "
                                               "validation): per-site score and confidence interval, recorded")
    validate.add_argument("ref", metavar="NAME:VERSION")
    validate.add_argument("config", nargs="?", default="configs/quickstart.toml",
                          help="the federation to validate at (its data.root, data.nodes, registry.root)")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--registry", help="registry root (config registry.root)")
    validate.add_argument("--out", help="parent folder of the run folder (sets output.dir)")
    validate.add_argument("--verbose", action="store_true")
    validate.set_defaults(func=cmd_validate)
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic multi-site NIfTI or DICOM data, one folder per node")
    synth.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    synth.add_argument("--nodes", type=int, required=True, help="number of sites")
    synth.add_argument("--task", default="seg2d", help="task from the catalogue (seg2d, seg3d)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=0, help="edge length; 0 takes the task's default")
    synth.add_argument("--kind", choices=["ct", "brain-mri"],
                       help="realistic volumes instead of a task's images: CT-like (HU, anisotropic spacing, "
                            "organ and lesion) or brain-MRI-like (4 modalities, 3 nested tumour sub-regions)")
    synth.add_argument("--scale", type=float, default=1.0, help="with --kind: image size factor")
    synth.add_argument("--format", choices=["nifti", "dicom"], default="nifti",
                       help="with --kind ct: dicom writes each case as a CT series with its labels as DICOM SEG "
                            "(even-numbered sites) or RTSTRUCT (odd-numbered), the same cases as nifti")
    synth.set_defaults(func=cmd_data_synth)
    tab = data.add_parser("tabular", help="split a tabular dataset (real Breast Cancer Wisconsin, or synthetic) "
                                          "across nodes with label skew")
    tab.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    tab.add_argument("--nodes", type=int, required=True)
    tab.add_argument("--source", default="breast-cancer", choices=["breast-cancer", "synthetic"])
    tab.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label skew (smaller: more skewed)")
    tab.add_argument("--records-per-node", type=int, default=60, help="synthetic source only")
    tab.add_argument("--seed", type=int, default=0)
    tab.set_defaults(func=cmd_data_tabular)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    keys = config.add_parser("keys", help="print every config key with its type, default and meaning")
    keys.set_defaults(func=cmd_config_keys)



def prepare_data(cfg: Config, say: Callable[[str], None]) -> None:
    """Make the synthetic federation on first use, then check every node's folder."""
    from fl.learn import get_task
    from fl.learn.data import CACHE_DIR, load_local_data
    from fl.learn.synth import node_dir, synthesize
    from nodes.policy import state_dir

    root, task = Path(cfg.data.root), cfg.resolved_task()
    if not root.exists():
        if not cfg.data.synthesize:
            raise DataError(f"data.root: {root} does not exist (set data.synthesize = true to generate it)")
        say(f"generating synthetic data for {cfg.data.nodes} nodes in {root}")
        if cfg.data.synthetic == "task":
            synthesize(root, nodes=cfg.data.nodes, task=get_task(cfg.task), seed=cfg.seed,
                       image_size=cfg.data.image_size)
        else:
            from fl.learn.synth_anatomy import synthesize_anatomy

            synthesize_anatomy(root, nodes=cfg.data.nodes, kind=cfg.data.synthetic, seed=cfg.seed,
                               scale=cfg.data.synthetic_scale, fmt=cfg.data.synthetic_format)
    for index in range(cfg.data.nodes):  # every case checked, and preprocessed into the node's own cache
        folder = node_dir(root, index)
        load_local_data(folder, task, use_cache=False, disk_cache=state_dir(folder) / CACHE_DIR)
    if cfg.secagg.enabled and cfg.secagg.protocol == "malicious":  # each virtual node's site key, one roster
        from nodes.roster import pin_local_federation

        roster = pin_local_federation(root, cfg.data.nodes)  # secure aggregation's config needs 3 nodes or more
        assert roster is not None
        say(f"malicious-secure aggregation: {len(roster.sites)} site keys and roster {roster.digest[:16]}... "
            "pinned on the simulated nodes")
    p = cfg.node_policy
    if p.sets_a_policy:  # the launcher acts as every node's operator
        from dataclasses import asdict

        from nodes.policy import Policy, save_policy

        try:
            policy = Policy(**asdict(p))  # the same fields, by name
        except ConfigError as exc:
            raise ConfigError(f"node_policy: {exc}") from None
        for index in range(cfg.data.nodes):
            save_policy(state_dir(node_dir(root, index)), policy)


def client_dp_warning(cfg: Any) -> str | None:
    """The warning for client-level DP this federation cannot carry (:mod:`fl.privacy.plan`), or None."""
    if not cfg.central_dp.enabled:
        return None
    from fl.cli.privacy import client_sample_rate, trained_parameters
    from fl.privacy.plan import CARRIES, client_line

    line = client_line(cfg.data.nodes, cfg.central_dp.noise_multiplier, sample_rate=client_sample_rate(cfg),
                       rounds=cfg.rounds, params=trained_parameters(cfg))
    if line.ratio <= CARRIES:
        return None
    return (f"central_dp: with {cfg.data.nodes} nodes, noise multiplier {cfg.central_dp.noise_multiplier:g} and "
            f"{cfg.rounds} rounds, the noise on the aggregate is r = {line.ratio:.0f} times the largest signal over "
            f"the run (utility needs r <= {CARRIES:g}): expect the model not to learn. Client-level DP needs many "
            "nodes per round; for a few hospitals use record-level DP on each (local_dp). "
            "`fl privacy plan` shows the figures.")


def cmd_run(args: argparse.Namespace) -> int:
    from fl.server.progress import summary_table
    from fl.server.run_folder import RunFolder

    run_dir, seconds, console = _simulate(args.config, list(args.overrides), args.out, args.resume, args.verbose)
    folder = RunFolder(run_dir)
    summary = folder.read_summary()
    summary["total_seconds"] = seconds
    folder.write_summary(summary)
    console.print(summary_table(summary, str(run_dir)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """``fl validate NAME:VERSION``: the version scored at every site of the config's federation."""
    from fl.registry import Registry
    from fl.server.progress import validation_table
    from fl.server.validate import RESULT_FILE

    overrides = list(args.overrides) + [f"validation.ref={_toml_str(args.ref)}"]
    if args.registry:
        overrides.append(f"registry.root={_toml_str(args.registry)}")
    from fl import config as config_mod

    cfg = config_mod.load(args.config, overrides)
    Registry(cfg.registry.root).get(args.ref)  # an unknown version fails before any engine work
    run_dir, _, console = _simulate(args.config, overrides, args.out, False, args.verbose)
    result = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
    console.print(validation_table(result))
    return 0 if result["sites"] else 1


def _simulate(config_path: str, overrides: list[str], out: str | None, resume: bool,
              verbose: bool) -> tuple[Path, float, Any]:
    """Load the config, check it, prepare the data and run it in the Simulation Engine with live
    progress: (run folder, seconds from the engine's start, console)."""
    from rich.console import Console

    from fl import config as config_mod
    from fl.server.progress import LiveProgress
    from fl.server.run_folder import run_dir_for
    from fl.server.simulation import simulate, start_nodes

    overrides = overrides + ([f"output.dir={_toml_str(out)}"] if out else [])
    overrides += ["registry.resume=true"] if resume else []
    cfg = config_mod.load(config_path, overrides)
    run_dir = run_dir_for(cfg).resolve()
    cfg = cfg.replace(
        **{
            "output.dir": str(run_dir.parent),
            "output.run_name": run_dir.name,
            "data.root": str(Path(cfg.data.root).resolve()),
            "registry.root": str(Path(cfg.registry.root).resolve()),
            # simulated nodes share this machine: they find the bundle at the same absolute path
            "bundle": str(cfg.resolved_task().root) if cfg.bundle else "",
        }
    )
    from fl.registry import Registry

    Registry(cfg.registry.root).check_writable(cfg.model_name)  # fail before any data or engine work
    if cfg.registry.resume:
        from fl.registry.checkpoint import resume_point

        resume_point(Registry(cfg.registry.root), cfg)
    console = Console()
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if (warning := client_dp_warning(cfg)) is not None:
        console.print(f"[bold yellow]warning:[/] {warning}")
    began = time.perf_counter()
    started = start_nodes(cfg)  # Ray and the virtual nodes' processes start while the data are prepared
    try:
        prepare_data(cfg, lambda text: console.print(f"[dim]{text}"))
        with LiveProgress(console) as progress:
            simulate(cfg, progress, started)
    finally:
        started.discard()
    return run_dir, time.perf_counter() - began, console


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fl.learn import get_task
    from fl.learn.synth import synthesize

    if args.format != "nifti" and not args.kind:
        raise DataError(f"--format {args.format}: only --kind ct is written as DICOM; add --kind ct")
    if args.kind:
        from fl.learn.synth_anatomy import synthesize_anatomy

        folders = synthesize_anatomy(args.out, nodes=args.nodes, kind=args.kind, seed=args.seed, scale=args.scale,
                                     fmt=args.format)
    else:
        folders = synthesize(args.out, nodes=args.nodes, task=get_task(args.task), seed=args.seed,
                             image_size=args.image_size)
    for folder in folders:
        print(folder)
    return 0


def cmd_data_tabular(args: argparse.Namespace) -> int:
    from fl.learn.tabular import write_federation

    if not args.alpha > 0:
        raise DataError(f"--alpha: must be > 0, got {args.alpha}")
    for folder in write_federation(args.out, nodes=args.nodes, source=args.source, seed=args.seed, alpha=args.alpha,
                                   records_per_node=args.records_per_node):
        print(folder)
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from fl.config import reference_markdown

    print(reference_markdown())
    return 0
