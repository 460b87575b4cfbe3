"""The MARBLE datasets of the paper's Western columns: MagnaTagATune (top-50 tags) and FMA (genres)."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal


from culturemert.config import short_repr
from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.datasets.base import DEFAULT_TOP_N, TaggingDataset, finish_dataset, normalise_split, resolve_audio
from culturemert.evaluate.datasets.readers import (
    SPLITS,
    load_id_array,
    load_npy_splits,
    read_legacy_pickle,
    read_pickled_npy,
    read_tsv,
    read_vocabulary_file,
    require_dir,
    require_file,
)

logger = logging.getLogger(__name__)


def mtat_tag_name(tag: str) -> str:
    """``noVocals`` -> ``no vocals``: the camelCase of jongpillee's ``top50_tags.txt`` to the CSV's names."""
    return re.sub(r"(?<=[a-z])([A-Z])", lambda m: " " + m.group(1).lower(), tag.strip())


def _mtat_split_lists(split_dir: Path) -> dict[str, list[str]]:
    """Clip paths (without extension) per split from jongpillee's ``*_list_pub.cP`` or ccml's npy lists."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        pickled = split_dir / f"{split}_list_pub.cP"
        listed = split_dir / f"{split}.npy"
        if pickled.is_file():
            entries = read_legacy_pickle(pickled)
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise DataError(f"{pickled}: expected a list of clip paths")
        elif listed.is_file():  # ccml: "row_index\tf/clip.mp3"
            entries = [entry.split("\t")[-1] for entry in load_id_array(listed)]
        else:
            raise DataError(f"{split_dir}: no {split} split list ({pickled.name} or {listed.name})")
        out[split] = [str(Path(e).with_suffix("").as_posix()) for e in entries]
    return out


def _read_mtat_annotations(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """clip (mp3 path without extension) -> tags, and -> mp3 path, from ``annotations_final.csv``."""
    tags_by_clip: dict[str, list[str]] = {}
    mp3_by_clip: dict[str, str] = {}
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if not header or header[0] != "clip_id" or header[-1] != "mp3_path":
            raise DataError(f"{path}: expected a tab-separated header 'clip_id ... mp3_path' (annotations_final.csv)")
        tag_names = header[1:-1]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: malformed row: {len(row)} fields, header has {len(header)}")
            values = row[1:-1]
            if any(v not in ("0", "1") for v in values):
                raise DataError(f"{path}:{reader.line_num}: tag values must be 0 or 1")
            clip = str(Path(row[-1]).with_suffix("").as_posix())
            tags_by_clip[clip] = [t for t, v in zip(tag_names, values) if v == "1"]
            mp3_by_clip[clip] = row[-1]
    return tags_by_clip, mp3_by_clip


def load_magnatagatune(
    annotations_csv: str | Path,
    split_dir: str | Path | None = None,
    audio_root: str | Path | None = None,
    top_n: int | None = DEFAULT_TOP_N["magnatagatune"],
    vocabulary: Sequence[str] | str | Path | None = None,
) -> TaggingDataset:
    """MagnaTagATune from ``annotations_final.csv`` (tab-separated, quoted) and the standard split.

    ``split_dir`` holds jongpillee's ``{train,valid,test}_list_pub.cP`` (15244 / 1529 / 4332 clips, the split
    of MARBLE, minzwon and ccml; clips of >= 29.1 s with >= 1 top-50 tag) or ccml's ``{split}.npy`` lists.
    Without it the first-hex-digit rule applies (folders ``0``-``b`` train, ``c`` valid, ``d``-``f`` test) and
    clips with no vocabulary tag are dropped (``dataset.dropped["no_vocabulary_tag"]``); the 29.1 s filter
    needs the audio and is not applied. ``vocabulary``: a list or a file (``top50_tags.txt``, ccml's
    ``tags.npy``); camelCase names are mapped to the CSV's (``noVocals`` -> ``no vocals``). Without it, the
    top-``top_n`` of the training split. Audio: ``<audio_root>/<mp3_path>``.
    """
    annotations_csv = require_file(annotations_csv, "MagnaTagATune annotations_final.csv")
    tags_by_clip, mp3_by_clip = _read_mtat_annotations(annotations_csv)
    if isinstance(vocabulary, (str, Path)):
        vocabulary = read_vocabulary_file(vocabulary)
    if vocabulary is not None:
        vocabulary = [mtat_tag_name(t) for t in vocabulary]
        known = {t for tags in tags_by_clip.values() for t in tags}
        unknown = [t for t in vocabulary if t not in known]
        if unknown:
            logger.warning("magnatagatune: vocabulary tags never set in %s: %s", annotations_csv, unknown)
    assignment: list[tuple[str, str]] = []
    dropped: dict[str, list[str]] = {}
    if split_dir is not None:
        lists = _mtat_split_lists(require_dir(split_dir, "MagnaTagATune split directory"))
        absent = [c for s in SPLITS for c in lists[s] if c not in tags_by_clip]
        if absent:
            raise DataError(f"{annotations_csv}: {len(absent)} clip(s) of the split lists are not annotated, e.g. {short_repr(absent[:3], 120)}")
        assignment = [(clip, s) for s in SPLITS for clip in lists[s]]
    else:
        hex_split = {**{d: "train" for d in "0123456789ab"}, "c": "valid", **{d: "test" for d in "def"}}
        for clip in tags_by_clip:
            split = hex_split.get(clip[:1].lower())
            if split is None or clip[1:2] != "/":
                raise DataError(f"{annotations_csv}: clip {short_repr(clip)} is not under a hex-digit folder")
            assignment.append((clip, split))
    records = [(clip, split, tags_by_clip[clip], [clip]) for clip, split in assignment]
    items, missing = resolve_audio("magnatagatune", records, audio_root)
    dataset = finish_dataset("magnatagatune", items, missing, top_n, vocabulary, audio_root=audio_root)
    if split_dir is None:
        vocab = set(dataset.vocabulary)
        dropped["no_vocabulary_tag"] = [it.id for it in dataset.items if not vocab & set(it.tags)]
        dropped_set = set(dropped["no_vocabulary_tag"])
        dataset.items = [it for it in dataset.items if it.id not in dropped_set]
        dataset.missing_audio = [rid for rid in dataset.missing_audio if rid not in dropped_set]
        dataset.dropped = {k: v for k, v in dropped.items() if v}
    return dataset


# ----------------------------------------------------------------------------------------------------------
# FMA


def _read_fma_tracks(
    tracks_csv: Path, genres_csv: Path | None, subset: str, genre_field: str
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """track id (6-digit) -> genre names and -> FMA's own split, from the release's ``tracks.csv``."""
    with tracks_csv.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        top = next(reader, None)
        sub = next(reader, None)
        if not top or not sub:
            raise DataError(f"{tracks_csv}: expected FMA's two-row header (e.g. 'track' / 'genres_all')")
        columns = {(a, b): i for i, (a, b) in enumerate(zip(top, sub))}
        rows = list(reader)
    if rows and rows[0] and rows[0][0] == "track_id" and not any(rows[0][1:]):
        rows = rows[1:]  # the index-name row pandas writes under a two-level header
    try:
        genre_col = columns[("track", genre_field)]
    except KeyError:
        raise DataError(f"{tracks_csv}: no ('track', {genre_field!r}) column") from None
    subset_col = columns.get(("set", "subset"))
    split_col = columns.get(("set", "split"))
    titles: dict[str, str] = {}
    if genre_field != "genre_top":
        if genres_csv is None:
            raise DataError(f"FMA {genre_field} holds genre ids: pass genres_csv (fma_metadata/genres.csv) to name them")
        for row in read_tsv(require_file(genres_csv, "FMA genres.csv"), ["genre_id", "title"], delimiter=","):
            titles[row["genre_id"]] = row["title"]
    allowed = {"small": {"small"}, "medium": {"small", "medium"}, "large": {"small", "medium", "large"}}
    if subset not in allowed:
        raise ConfigError(f"FMA subset must be small, medium or large, got {subset!r}")
    tags: dict[str, list[str]] = {}
    own_split: dict[str, str] = {}
    for line, row in enumerate(rows, start=4):
        if len(row) != len(top):
            raise DataError(f"{tracks_csv}:{line}: malformed row: {len(row)} fields, header has {len(top)}")
        if subset_col is not None and row[subset_col] not in allowed[subset]:
            continue
        try:
            track_id = f"{int(row[0]):06d}"
        except ValueError:
            raise DataError(f"{tracks_csv}:{line}: track id {short_repr(row[0])} is not an integer") from None
        value = row[genre_col].strip()
        if genre_field == "genre_top":
            names = [value] if value else []
        else:
            ids = re.findall(r"\d+", value)
            unknown = [g for g in ids if g not in titles]
            if unknown:
                raise DataError(f"{tracks_csv}:{line}: genre id(s) {unknown} not in genres.csv")
            names = [titles[g] for g in ids]
        tags[track_id] = list(dict.fromkeys(names))
        if split_col is not None:
            own_split[track_id] = normalise_split(row[split_col], f"{tracks_csv}:{line}")
    return tags, own_split


def load_fma(
    metadata: str | Path,
    split_dir: str | Path | None = None,
    audio_root: str | Path | None = None,
    genres_csv: str | Path | None = None,
    top_n: int | None = DEFAULT_TOP_N["fma"],
    vocabulary: Sequence[str] | str | Path | None = None,
    subset: Literal["small", "medium", "large"] = "medium",
    genre_field: Literal["genres_all", "genres", "genre_top"] = "genres_all",
) -> TaggingDataset:
    """FMA from ccml's ``metadata.npy`` (pickled ``{track_id: [genres]}``) or the release's ``tracks.csv``.

    ``metadata.npy`` is read by :func:`read_pickled_npy` (no code runs). ``tracks.csv`` needs ``genres_csv``
    for ``genres_all`` / ``genres`` (ids -> titles); rows outside ``subset`` are skipped (medium includes
    small). Splits: ccml's ``split_dir/{train,valid,test}.npy`` (17486 / 2498 / 4996), or, for ``tracks.csv``
    without ``split_dir``, FMA's own ``set/split`` column. Audio: ``<audio_root>/<id[:3]>/<id>.mp3`` as in
    the ``fma_medium`` archive (or ``<id>.<ext>`` anywhere below the root).
    """
    path = require_file(metadata, "FMA metadata")
    own_split: dict[str, str] = {}
    if path.suffix.lower() == ".npy":
        data = read_pickled_npy(path)
        if not isinstance(data, Mapping):
            raise DataError(f"{path}: expected a pickled dict track_id -> genres")
        tags_by_id = {}
        for key, value in data.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f"{path}: track {short_repr(key)}: expected a list of genre names")
            tags_by_id[str(key)] = value
    elif path.suffix.lower() == ".csv":
        tags_by_id, own_split = _read_fma_tracks(
            path, None if genres_csv is None else Path(genres_csv), subset, genre_field
        )
    else:
        raise DataError(f"{path}: unsupported FMA metadata (use ccml's metadata.npy or FMA's tracks.csv)")
    if split_dir is not None:
        splits = load_npy_splits(split_dir)
    elif own_split:
        splits = {s: [rid for rid, v in own_split.items() if v == s] for s in SPLITS}
    else:
        raise DataError(f"{path}: no split information; pass split_dir (ccml's fma/split)")
    absent = [rid for s in SPLITS for rid in splits[s] if rid not in tags_by_id]
    if absent:
        raise DataError(f"{path}: {len(absent)} split track id(s) have no metadata, e.g. {short_repr(absent[:3], 120)}")
    records = [(rid, s, tags_by_id[rid], [f"{rid[:3]}/{rid}", rid]) for s in SPLITS for rid in splits[s]]
    items, missing = resolve_audio("fma", records, audio_root)
    return finish_dataset("fma", items, missing, top_n, vocabulary, audio_root=audio_root)
