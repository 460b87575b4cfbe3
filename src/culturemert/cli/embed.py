"""``culturemert embed MODEL INPUT... --out DIR``: cached per-layer embeddings.

Under ``torchrun --nproc_per_node N -m culturemert.cli embed ...`` every rank embeds a disjoint share of the
tracks into the shared cache and rank 0 writes the features folders.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from culturemert.errors import UserError


@dataclass
class _FileItem:
    id: str
    audio_path: Path
    split: str
    tags: list[str]


@dataclass
class _FileDataset:
    name: str
    vocabulary: list[str]
    items: list[_FileItem]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="encoder spec: a checkpoint (export / HF dir / Hub id / fairseq .pt), 'hf:SOURCE', "
                        "'remote:SOURCE', 'muq:REPO', 'omar-rq:REPO', 'dasheng:base', 'baseline:logmel' or "
                        "'preset:NAME[:SEED]' (docs/evaluation.md, 'Encoders')")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="a dataset config (.yaml: one DatasetConfig or {datasets: [...]}), a generic CSV "
                             "(path,split,tags), audio files, folders of audio, or .txt lists of audio paths")
    parser.add_argument("--out", required=True, type=Path, help="output folder: one features folder per dataset")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache (default: OUT/cache)")
    parser.add_argument("--window", type=float, default=5.0, help="window length in seconds; 0 = whole track (default 5)")
    parser.add_argument("--hop", type=float, default=None, help="hop in seconds (default: = window, no overlap)")
    parser.add_argument("--min-last-fraction", type=float, default=0.5,
                        help="keep a trailing partial window if at least this fraction of a window (default 0.5)")
    parser.add_argument("--max-seconds", type=float, default=None, help="truncate recordings to this length")
    parser.add_argument("--frames", action="store_true", help="also store frame-level features (float16)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                        help="zero-mean/unit-variance waveform normalisation (MARBLE; default on)")
    parser.add_argument("--normalize-scope", choices=["track", "chunk"], default="track")
    parser.add_argument("--batch", type=int, default=None,
                        help="windows per forward pass (default: 16 on CUDA, 1 on CPU, where batching is slower)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast (CUDA only)")
    parser.add_argument("--splits", nargs="*", default=None, help="embed only these splits")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint that ships its own model code (e.g. MERT-v2); recorded in meta.json")
    parser.add_argument("--no-progress", action="store_true")


def _datasets_from_inputs(inputs: list[str]) -> list:
    from culturemert.config import load_yaml, parse_config
    from culturemert.evaluate.datasets import DatasetConfig, load_dataset_from_config, load_generic_csv
    from culturemert.evaluate.embed import tracks_from_paths

    if len(inputs) == 1 and inputs[0].endswith((".yaml", ".yml")):
        path = Path(inputs[0])
        raw = load_yaml(path)
        entries = raw.get("datasets") if isinstance(raw, dict) and "datasets" in raw else [raw]
        configs = [parse_config(e, DatasetConfig, source=str(path)) for e in entries]
        return [load_dataset_from_config(c, path.resolve().parent) for c in configs]
    if len(inputs) == 1 and inputs[0].endswith(".csv"):
        return [load_generic_csv(inputs[0])]
    paths: list[str] = []
    for entry in inputs:
        p = Path(entry)
        if not p.exists() and not p.is_symlink():  # a named input that is not there: fail before loading a model
            raise UserError(f"input not found: {p}")
        if p.suffix == ".txt" and p.is_file():
            paths += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            paths.append(entry)
    tracks = tracks_from_paths(paths)
    if not tracks:
        raise UserError(f"no audio files found in {', '.join(inputs)}")
    return [_FileDataset("files", [], [_FileItem(t.id, t.path, "none", []) for t in tracks])]


def run(args: argparse.Namespace) -> int:
    from culturemert.evaluate.embed import EmbedSettings, load_encoder, embed_dataset
    from culturemert.files import write_json_atomic

    settings = EmbedSettings(
        window=args.window, hop=args.hop, min_last_fraction=args.min_last_fraction, max_seconds=args.max_seconds,
        normalize=args.normalize, normalize_scope=args.normalize_scope, frames=args.frames, precision=args.precision,
        batch_size=args.batch, device=args.device,
    )
    datasets = _datasets_from_inputs(args.inputs)
    extractor = load_encoder(args.model, settings, trust_remote_code=args.trust_remote_code)
    cache = args.cache or args.out / "cache"
    for dataset in datasets:
        out_dir, report = embed_dataset(extractor, dataset, args.out / dataset.name, settings, cache_root=cache,
                                        splits=args.splits, progress=not args.no_progress)
        if report is None:  # a torchrun rank other than 0: its tracks are in the shared cache
            continue
        summary = report.as_dict()
        print(f"{dataset.name}: {summary['tracks_ok']} tracks -> {out_dir} "
              f"({summary['computed']} computed, {summary['cached']} cached, {len(report.errors)} errors)")
        for tid, reason in report.errors.items():
            print(f"  skipped {tid}: {reason}")
        write_json_atomic(args.out / dataset.name / "embed_report.json", summary)
    return 0
