"""``culturemert quickstart``: the whole workflow offline on the embedded corpus (see culturemert.quickstart)."""

from __future__ import annotations

import argparse
from pathlib import Path

from culturemert.config import load_config, parse_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (re-run to resume)")
    parser.add_argument("--config", type=Path, help="YAML with QuickstartConfig keys; flags below override it")
    parser.add_argument("--seed", type=int, help="seed for the corpus, training and probing (default 0)")
    parser.add_argument("--symbtr", type=Path, help="SymbTr txt folder or archive: adds Turkish makam")
    parser.add_argument("--retrain-base", action="store_true", help="pre-train the base now instead of the shipped one")
    parser.add_argument("--base-steps", type=int, help="with --retrain-base: steps of the base pre-training")
    parser.add_argument("--cpt-steps-scale", type=float, help="scale every CPT/control/single-culture stage (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from culturemert.quickstart import QuickstartConfig, run_quickstart

    config = load_config(args.config, QuickstartConfig) if args.config else QuickstartConfig()
    updates = {
        "seed": args.seed,
        "symbtr": args.symbtr,
        "retrain_base": True if args.retrain_base else None,
        "base_steps": args.base_steps,
        "cpt_steps_scale": args.cpt_steps_scale,
    }
    data = config.model_dump()
    data.update({k: v for k, v in updates.items() if v is not None})
    config = parse_config(data, QuickstartConfig, source="quickstart options")
    run_quickstart(config, args.out, progress=not args.no_progress)
    return 0
