"""Benchmark suites (``fl bench NAME``): suite definitions, the engine that runs and reports
them, the cell runners, the privacy audit, run reports and the centralised reference. Nothing in
the product imports this package (an import contract checks it)."""

from fl.bench.engine import run_suite, summarise
from fl.bench.suite import RUNNERS, Cell, Row, Suite, load_suite, suite_names

__all__ = ["RUNNERS", "Cell", "Row", "Suite", "load_suite", "run_suite", "suite_names", "summarise"]
