"""Assemble BENCHMARKS.md from the suites' latest reports.

    python bench/collect.py [--results bench-results] [SUITE ...]

Reads ``<results>/<suite>/report.md`` (full runs; ``<suite>-quick`` when no full run exists),
copies its plots to ``bench/figures/<suite>/`` and writes BENCHMARKS.md: the intro, then each
suite's table, plots and conclusion, with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["privacy-utility", "privacy-utility-200", "real-tabular", "privacy-audit", "overhead", "deploy", "dp-cost", "strategies", "scale", "secagg-protocols"]
INTRO = """# Benchmarks

Every table and plot below comes from one command, `fl bench NAME` (a suite in
`configs/bench/NAME.toml`; `--quick` for the minutes-long variant, `--seeds N` to change the
number of seeds), which writes `bench-results/NAME/` (`results.csv`, `results.json`, the plots
and `report.md`). This page is assembled from those reports by `python bench/collect.py`. Each
section names the exact command, the machine and the date it was measured, the mean ± std over
seeds, and what a reader should conclude.

The robustness table (`python bench/robustness.py`) is reported in the README.
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="bench-results")
    parser.add_argument("suites", nargs="*", default=ORDER)
    args = parser.parse_args()
    results = Path(args.results)
    sections = [INTRO]
    for suite in args.suites:
        folder = next((f for f in (results / suite, results / f"{suite}-quick") if (f / "report.md").is_file()), None)
        if folder is None:
            print(f"{suite}: no report under {results}; run `fl bench {suite}` first")
            continue
        figures = REPO / "bench" / "figures" / suite
        shutil.rmtree(figures, ignore_errors=True)
        figures.mkdir(parents=True)
        text = (folder / "report.md").read_text(encoding="utf-8")
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
            shutil.copy(folder / image, figures / image)
            text = text.replace(f"]({image})", f"](bench/figures/{suite}/{image})")
        sections.append("#" + text.strip())  # the suite's title one level down
    (REPO / "BENCHMARKS.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    print(REPO / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
