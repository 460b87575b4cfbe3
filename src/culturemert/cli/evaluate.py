"""``culturemert evaluate --model M [M ...] --datasets CONFIG --out DIR``: embed + probe + report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True,
                        help="encoder specs, compared side by side: checkpoints (dirs, Hub ids), 'hf:SOURCE', "
                             "'remote:SOURCE', 'muq:REPO', 'omar-rq:REPO', 'dasheng:base', 'baseline:logmel', "
                             "'preset:NAME' (docs/evaluation.md, 'Encoders')")
    parser.add_argument("--datasets", required=True, type=Path,
                        help="evaluation YAML (datasets, embed, probe) or a generic dataset CSV (path,split,tags)")
    parser.add_argument("--protocol", choices=["marble", "marble-windows", "culturemert-paper"], default=None,
                        help="probing protocol (overrides probe.protocol; default marble, see docs/evaluation.md)")
    parser.add_argument("--duplicate-audio", choices=["warn", "error"], default=None,
                        help="identical audio in two splits: warn (default) or refuse")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--base", default=None, help="base model of the transfer matrix (default: the first)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow checkpoints that ship their own model code (e.g. MERT-v2); the report records it")
    parser.add_argument("--no-progress", action="store_true")


def _check_model_sources(models: list[str]) -> None:
    """A local model path that does not exist fails now, not after the models before it were embedded."""
    from culturemert.errors import UserError

    from culturemert.evaluate.encoders import split_spec

    for spec in models:
        prefix, model = split_spec(spec)
        if prefix in ("baseline", "preset", "dasheng"):
            continue
        path = Path(model).expanduser()
        looks_local = model.startswith((".", "/", "~")) or path.suffix in (".pt", ".bin", ".ckpt") or model.count("/") != 1
        if looks_local and not path.exists():
            raise UserError(f"--model {spec}: no such file or directory")


def run(args: argparse.Namespace) -> int:
    from culturemert.evaluate.pipeline import evaluate

    _check_model_sources(args.model)
    overrides = {k: v for k, v in (("protocol", args.protocol), ("duplicate_audio", args.duplicate_audio)) if v}
    written = evaluate(args.model, args.datasets, args.out, base=args.base, progress=not args.no_progress,
                       trust_remote_code=args.trust_remote_code, probe_overrides=overrides)
    if written:  # empty on torchrun ranks other than 0
        print(f"report: {written['report.md']}")
        if "leaderboard.md" in written:
            print(written["leaderboard.md"].read_text(encoding="utf-8"))
    return 0
