"""``culturemert corpus``: render the offline multi-cultural corpus from symbolic music."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from culturemert.config import load_config, parse_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory (audio/, corpus.csv, corpus.json)")
    parser.add_argument("--config", type=Path, help="YAML file with CorpusConfig keys; flags below override it")
    parser.add_argument("--per-culture", type=int, help="pieces per culture (default 300)")
    parser.add_argument("--duration", type=float, help="seconds of audio per piece, looped if shorter (default 20)")
    parser.add_argument("--symbtr", type=Path,
                        help="SymbTr txt folder or symbtr-txt*.tar.gz (adds the Turkish makam culture)")
    parser.add_argument("--cultures", help="comma-separated subset of chinese,german,irish,scottish,turkish")
    parser.add_argument("--seed", type=int, help="seed for selection, splits, instruments, tempi (default 0)")
    parser.add_argument("--workers", type=int, help="rendering processes (default 2)")
    parser.add_argument("--soundfont", type=Path, help="General-MIDI .sf2 (default: Debian FluidR3_GM, "
                        "else pretty_midi's TimGM6mb)")
    parser.add_argument("--synthesizer", choices=["auto", "fluidsynth", "additive"],
                        help="auto = FluidSynth when libfluidsynth is installed, else the additive fallback")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild when --out holds a corpus rendered with different settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from_args(args: argparse.Namespace):
    from culturemert.corpus import CorpusConfig

    config = load_config(args.config, CorpusConfig) if args.config else CorpusConfig()
    data = config.model_dump()
    overrides = {
        "pieces_per_culture": args.per_culture,
        "duration_s": args.duration,
        "symbtr": args.symbtr,
        "seed": args.seed,
        "workers": args.workers,
        "soundfont": args.soundfont,
        "synthesizer": args.synthesizer,
        "cultures": [c.strip() for c in args.cultures.split(",") if c.strip()] if args.cultures else None,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, CorpusConfig, source=str(args.config) if args.config else "command line")


def run(args: argparse.Namespace) -> int:
    from culturemert.corpus import build_corpus

    config = _config_from_args(args)
    summary = build_corpus(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"{summary.n_pieces} pieces in {summary.elapsed_s:.1f} s "
          f"({summary.rendered} rendered, {summary.resumed} already there) with {summary.synthesizer}")
    print(json.dumps(summary.pieces_per_split, indent=None))
    print(f"manifest: {summary.csv_path}")
    return 0 if summary.render_failures == 0 else 1
