"""``culturemert probe CONFIG``: the probe grid of a named protocol (default MARBLE v1) on cached features."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML probe config (features, protocol, layers, lrs, seeds, ...)")
    parser.add_argument("--protocol", choices=["marble", "marble-windows", "culturemert-paper"], default=None,
                        help="override the config's protocol (docs/evaluation.md: default marble)")
    parser.add_argument("--duplicate-audio", choices=["warn", "error"], default=None,
                        help="identical audio in two splits: warn (default) or refuse")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from culturemert.config import load_config
    from culturemert.evaluate.probe import ProbeConfig, run_probe_config

    config = load_config(args.config, ProbeConfig)
    overrides = {k: v for k, v in (("protocol", args.protocol), ("duplicate_audio", args.duplicate_audio)) if v}
    if overrides:
        config = ProbeConfig.model_validate({**config.model_dump(), **overrides})
    results, path = run_probe_config(config, progress=not args.no_progress)
    sel = results["summary"]["selected"]
    details = results["protocol_details"]
    cut = f", recordings cut at {details['truncate_seconds']:g} s" if details["truncate_seconds"] else ""
    print(f"protocol {results['protocol']}: {details['batch_size']} {details['batch_unit']} per step "
          f"({details['batching']} batching){cut}")
    if "selection_fallback" in details:
        print(f"warning: {details['selection_fallback']}")
    print(f"{results['model']} / {results['dataset']}: selected layer {sel['layer']}, lr {sel['lr']:g} "
          f"(on validation {results['summary']['selection_metric']})")
    for split in ("valid", "test"):
        if split in sel:
            cells = ", ".join(f"{m} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for m, v in sel[split].items())
            print(f"  {split}: {cells}")
    print(f"results: {path}")
    return 0
