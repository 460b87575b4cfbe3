"""``culturemert evaluate --model M [M ...] --datasets CONFIG --out DIR``: embed + probe + report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True,
                        help="model sources (checkpoint dirs, Hub ids, 'baseline:logmel', 'preset:NAME')")
    parser.add_argument("--datasets", required=True, type=Path, help="evaluation config (datasets, embed, probe)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--base", default=None, help="base model of the transfer matrix (default: the first)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from culturemert.evaluate.pipeline import evaluate

    written = evaluate(args.model, args.datasets, args.out, base=args.base, progress=not args.no_progress)
    print(f"report: {written['report.md']}")
    return 0
