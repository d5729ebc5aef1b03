"""``fl bench`` and ``fl report``: benchmark suites and one run's curves."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    bench = sub.add_parser("bench", help="run a benchmark suite (configs/bench/NAME.toml): table, plots, report")
    bench.add_argument("name", help="suite name, e.g. privacy-utility, overhead, deploy, dp-cost, scale, strategies, "
                                    "privacy-audit, real-tabular")
    bench.add_argument("--quick", action="store_true", help="the suite's quick variant (minutes)")
    bench.add_argument("--seeds", type=int, help="seeds per cell (default: the suite's)")
    bench.add_argument("--cells", help="comma-separated cell names: measure and report these alone (stored results of "
                                       "the others stay for a later full run)")
    bench.add_argument("--out", help="results folder (default bench-results/NAME, or NAME-quick)")
    bench.set_defaults(func=cmd_bench)
    report = sub.add_parser("report", help="draw one run's curves: score and loss per round and node, epsilon")
    report.add_argument("run_dir", help="a run folder written by `fl run`")
    report.add_argument("--out", help="folder for the PNG (default RUN_DIR/report)")
    report.set_defaults(func=cmd_report)



def cmd_bench(args: argparse.Namespace) -> int:
    from fl.bench import load_suite, run_suite

    only = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None
    suite = load_suite(args.name, quick=args.quick, seeds=args.seeds, only=only)
    out = Path(args.out or f"bench-results/{args.name}{'-quick' if args.quick else ''}").resolve()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_suite(suite, out)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"results: {out}/report.md, results.csv, results.json and the plots")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fl.bench.report import draw

    print(draw(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0
