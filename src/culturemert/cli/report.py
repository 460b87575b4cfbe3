"""``culturemert report RUNS... --out DIR``: paper-layout tables, layer curves and the transfer matrix."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="results.json files or folders containing them")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--base", default=None, help="base model of the transfer matrix (default: the first)")


def run(args: argparse.Namespace) -> int:
    from culturemert.evaluate.report import load_runs, write_report

    written = write_report(load_runs(args.runs), args.out, base=args.base)
    for name in sorted(written):
        print(written[name])
    return 0
