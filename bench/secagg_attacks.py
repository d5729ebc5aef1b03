"""A coordinator that deviates from secure aggregation, against both protocols, and what each
protocol costs on the wire.

Part 1 runs the four attacks of :mod:`fl.bench.attacks` on the nodes' real code (five seg2d sites,
site keys and one pinned roster each) under ``secagg.protocol = "flower"`` (Flower's SecAgg+ with
OncoFed's node guard) and ``"malicious"`` (OncoFed's stages); an attack succeeds when the
coordinator holds the victim's own update. The mask brute force times MT19937 candidates and
extrapolates a whole 2^32 search to one core.

Part 2 runs one honest round of each protocol with 3 and 10 nodes and counts the serialised bytes
each node receives and sends (every stage, Flower's protobuf encoding of the records; the update
itself is the same 4-byte-per-parameter masked vector under both).

    python bench/secagg_attacks.py [--out DIR] [--nodes 3,10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import fl.engine_env  # noqa: F401  (before Flower is imported)
from fl.bench import attacks
from fl.bench.inprocess import InProcessGrid, error_reasons


def _attack_table(root: Path) -> list[str]:
    rows = ["| attack | protocol | coordinator recovers the victim's update | max error | refused by the nodes |",
            "| --- | --- | --- | --- | --- |"]
    for o in attacks.all_attacks(root):
        error = f"{o.error:.1e}" if o.error is not None else "-"
        refusal = o.refusals[0] if o.refusals else "-"
        rows.append(f"| {o.attack} | {o.protocol} | {'yes' if o.recovered else 'no'} | {error} | "
                    f"{len(o.refusals)} node(s): {refusal} |")
    for protocol in (attacks.FLOWER, attacks.MALICIOUS):
        b = attacks.attack_mask_brute_force(protocol)
        space = (f"the whole 2^32 seed space: {b.full_search_hours:.0f} core-hours" if protocol == attacks.FLOWER
                 else "no 32-bit seed exists: each mask is ChaCha20 under a 256-bit key")
        rows.append(f"| mask-brute-force | {protocol} | {'yes' if b.found else 'no'} "
                    f"| {b.candidates} MT19937 seeds tried, {b.seconds_per_candidate * 1e6:.0f} us each | {space} |")
    return rows


def _size(content) -> int:  # noqa: ANN001 - a RecordDict
    from fl.flower_compat.serde import recorddict_size

    return recorddict_size(content)


def _traffic(root: Path, nodes: int, protocol: str) -> tuple[float, float, float, int]:
    """(kB received, kB sent per node, seconds, contributors) for one honest round."""
    from flwr.app import ConfigRecord

    from fl.server.rounds import _instructions, initial_arrays
    from strategies.factory import build_strategy
    from strategies.secagg import secure_train

    base = attacks.federation(root / f"sites-{nodes}", nodes)
    folders = attacks.fresh(base, root / f"traffic-{nodes}-{protocol}")
    cfg = attacks._cfg(folders[0].parent, nodes, **{"secagg.protocol": protocol})
    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders)})
    arrays = initial_arrays(cfg)
    t0 = time.perf_counter()
    result = secure_train(grid, build_strategy(cfg), 1, arrays, ConfigRecord(dict(_instructions(cfg)[0])), cfg)
    seconds = time.perf_counter() - t0
    if error_reasons(grid) or result.arrays is None:
        raise SystemExit(f"{protocol} with {nodes} nodes did not release: {error_reasons(grid)}")
    received = sent = 0
    for delivered, reply in grid.answers:
        received += _size(delivered.content)
        sent += _size(reply.content)
    return received / nodes / 1e3, sent / nodes / 1e3, seconds, len(result.scalars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the sites here (default: a temporary folder)")
    parser.add_argument("--nodes", default="3,10", help="federation sizes for the traffic table")
    parser.add_argument("--skip-attacks", action="store_true")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="oncofed-attacks-"))
    try:
        if not args.skip_attacks:
            print("\n".join(_attack_table(root / "attacks")), flush=True)
            print()
        print("| nodes | protocol | kB received / node | kB sent / node | contributors | round (s, in-process) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for n in (int(x) for x in args.nodes.split(",")):
            for protocol in (attacks.FLOWER, attacks.MALICIOUS):
                rx, tx, seconds, k = _traffic(root / "traffic", n, protocol)
                print(f"| {n} | {protocol} | {rx:.1f} | {tx:.1f} | {k} | {seconds:.1f} |", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
