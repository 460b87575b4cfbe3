"""``culturemert probe CONFIG``: the MARBLE-protocol probe grid on cached features."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML probe config (features, layers, lrs, seeds, ...)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from culturemert.evaluate.probe import run_probe_config

    results, path = run_probe_config(args.config, progress=not args.no_progress)
    sel = results["summary"]["selected"]
    print(f"{results['model']} / {results['dataset']}: selected layer {sel['layer']}, lr {sel['lr']:g} (on validation)")
    for split in ("valid", "test"):
        if split in sel:
            cells = ", ".join(f"{m} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for m, v in sel[split].items())
            print(f"  {split}: {cells}")
    print(f"results: {path}")
    return 0
