"""The ``fl`` command line: one module per command group, this one only dispatches.

A user's mistake (bad config, bad data, a failed federation) prints one line starting with
``error:`` and exits with status 2; only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fl.engine_env  # noqa: F401  (before Flower is imported)
from fl.errors import OncoFedError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    from fl.cli import bench, console, deploy, models, privacy, run

    parser = argparse.ArgumentParser(prog="fl", description="OncoFed: federated learning for medical imaging")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    bench.add_parsers(sub)
    models.add_parsers(sub)
    console.add_parsers(sub)
    node = privacy.add_parsers(sub)
    deploy.add_parsers(sub, node)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fl`` console script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OncoFedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
