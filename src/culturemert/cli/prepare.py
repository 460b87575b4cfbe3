"""``culturemert prepare MANIFEST --out DIR``: decode audio into 24 kHz int16 shards with aligned teacher codes.

``culturemert prepare FOLDER --culture NAME --out DIR`` takes a folder of audio instead (recursively, every format
soundfile reads; a small hashed ``valid`` split is held out, see :mod:`culturemert.data.folder`); the manifest it
implies is written to ``DIR/folder-manifest.csv``.
"""

from __future__ import annotations

import argparse
import os

from culturemert.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest",
        help="CSV/TSV/JSONL manifest with columns path, culture [, split, weight], or a folder of audio (with --culture)",
    )
    parser.add_argument("--culture", default=None, help="with a folder: the culture tag of every file in it")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.02,
        help="with a folder: fraction of files held out as split 'valid' (validation during pretrain); default 0.02",
    )
    parser.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    parser.add_argument("--teacher", choices=["encodec", "kmeans"], default="encodec", help="label teacher")
    parser.add_argument(
        "--teacher-model",
        default=None,
        help="encodec: Hub id or local dir (default facebook/encodec_24khz); kmeans: a fitted teacher to reuse "
        "instead of fitting on this corpus: its file, or a directory prepared with it (DIR/teacher/kmeans.safetensors). "
        "Directories trained on together must share one teacher",
    )
    parser.add_argument("--kmeans-clusters", type=int, default=128, help="k-means codebook size")
    parser.add_argument("--kmeans-codebooks", type=int, default=1, help="number of k-means codebooks")
    parser.add_argument(
        "--kmeans-fit-seconds",
        type=float,
        default=3600.0,
        help="most audio used to fit k-means: one window of at most 30 s per training file until this many seconds",
    )
    parser.add_argument("--min-seconds", type=float, default=3.0, help="skip files shorter than this")
    parser.add_argument("--shard-seconds", type=float, default=1800.0, help="audio per shard (unit of resume)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--seed", type=int, default=0, help="seed for the k-means fitting sample")
    parser.add_argument("--device", default=None, help="teacher device (default: cuda if available, else cpu)")
    parser.add_argument("--teacher-batch-size", type=int, default=8, help="30-s chunks per teacher batch")
    parser.add_argument(
        "--nan",
        choices=["reject", "zero"],
        default="reject",
        help="files with NaN/inf samples: skip them (default) or replace those samples with 0",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _build_teacher(args: argparse.Namespace):
    from culturemert import teachers

    if args.teacher == "kmeans":
        if args.kmeans_clusters < 2 or args.kmeans_codebooks < 1:
            raise ConfigError("--kmeans-clusters must be >= 2 and --kmeans-codebooks >= 1")
        if args.teacher_model:
            path = args.teacher_model
            if os.path.isdir(path) and os.path.isfile(os.path.join(path, "teacher", "kmeans.safetensors")):
                path = os.path.join(path, "teacher", "kmeans.safetensors")  # a prepared directory: reuse its teacher
            elif not os.path.isfile(path):
                raise ConfigError(
                    f"--teacher-model: {args.teacher_model} is neither a k-means teacher file nor a prepared directory "
                    "holding teacher/kmeans.safetensors"
                )
            return teachers.build_teacher("kmeans", path=path, **({"device": args.device} if args.device else {}))
        options = {"n_clusters": args.kmeans_clusters, "n_codebooks": args.kmeans_codebooks, "seed": args.seed}
        if args.device:
            options["device"] = args.device
        return teachers.build_teacher("kmeans", **options)
    options = {}
    if args.teacher_model:
        options["model"] = args.teacher_model
    if args.device:
        options["device"] = args.device
    return teachers.build_teacher("encodec", **options)


def _manifest(args: argparse.Namespace) -> str:
    """The manifest to prepare: the given file, or one written for a folder of audio (checked before any model loads)."""
    from culturemert.data import read_manifest

    if os.path.isdir(args.manifest):
        from culturemert.data.folder import scan_audio_folder, write_folder_manifest

        if not args.culture:
            raise ConfigError(f"{args.manifest} is a folder: pass --culture NAME (the tag of every file in it)")
        folder = scan_audio_folder(args.manifest, args.culture, args.valid_fraction)
        print(folder.summary())
        return str(write_folder_manifest(folder, os.path.join(args.out, "folder-manifest.csv")))
    if args.culture:
        raise ConfigError("--culture is for a folder of audio; a manifest names each file's culture")
    read_manifest(args.manifest)  # fail on a bad manifest before loading any model
    return args.manifest


def run(args: argparse.Namespace) -> int:
    from culturemert.data import prepare

    manifest = _manifest(args)
    teacher = _build_teacher(args)
    summary = prepare(
        manifest,
        args.out,
        teacher,
        min_seconds=args.min_seconds,
        shard_seconds=args.shard_seconds,
        workers=args.workers,
        seed=args.seed,
        nonfinite=args.nan,
        kmeans_fit_seconds=args.kmeans_fit_seconds,
        teacher_batch_size=args.teacher_batch_size,
        progress=not args.no_progress,
    )
    print(summary.format_table())
    if summary.shards_reused:
        print(f"resumed: reused {summary.shards_reused} of {summary.shards_total} finished audio shard(s)")
    print(f"wrote {args.out} (index.json, prepare.json, shards/)")
    return 0
