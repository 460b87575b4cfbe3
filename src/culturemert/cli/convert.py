"""``culturemert convert SRC --out DIR``: any supported checkpoint -> a safetensors export."""

from __future__ import annotations

import argparse
import logging

import torch

from culturemert.model import export_bytes_summary, load_model, model_fingerprint, save_export

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="HF MERT directory, Hub id (org/name or org/name::file.pt), fairseq .pt, or export")
    parser.add_argument("--out", required=True, help="output export directory")
    parser.add_argument("--no-heads", action="store_true", help="drop the pre-training heads")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast weights (default: keep)")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.source, with_heads=not args.no_heads)
    if args.no_heads:
        model.heads = None
    card = {"name": f"converted from {args.source}", "converted_from": str(args.source),
            "source_fingerprint": model_fingerprint(model)}
    out = save_export(model, args.out, card=card, dtype=_DTYPES.get(args.dtype) if args.dtype else None)
    report = getattr(model, "load_report", {})
    if report.get("unused_keys"):
        print(f"unused source tensors ({len(report['unused_keys'])}): {', '.join(report['unused_keys'][:10])}")
    if report.get("skipped_recomputable"):
        print(f"skipped recomputable buffers: {', '.join(report['skipped_recomputable'])}")
    if report.get("missing_keys"):
        print(f"missing in source, freshly initialised: {', '.join(report['missing_keys'])}")
    for note in model.preprocessor_notes:
        print(f"note: {note}")
    sizes = export_bytes_summary(out)
    heads = "with pre-training heads" if model.heads is not None else "without pre-training heads"
    print(f"wrote {out} ({heads}; {model.num_layers} layers, hidden {model.hidden_size}; "
          f"{model.sample_rate} Hz input, {model.frame_rate:g} frames/s)")
    for name, size in sorted(sizes.items()):
        print(f"  {name:34s} {size / 1e6:9.2f} MB")
    return 0
