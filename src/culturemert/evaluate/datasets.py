"""Tagging datasets for evaluation, read in the form their authors publish them.

Every loader returns a :class:`TaggingDataset`: a list of :class:`Item` (id, audio path, split, tags) plus a
vocabulary, the ordered list of tags the probe predicts. Vocabularies follow the rule of the ISMIR 2023
"From West to East" code (github pxaris/ccml), which CultureMERT's evaluation reuses:

* count, for every tag, the number of items that carry it on the vocabulary splits (``train``; for Lyra
  the whole official training split, see :func:`load_lyra`);
* keep the ``top_n`` most frequent, ordered by count (descending), ties broken by the tag string in
  ascending code-point order (ccml sorts the tags with ``np.sort`` before a stable sort by count, so
  ``"Lyra" < "Oud"`` and ``"V" < "o"``). This reproduces ccml's published vocabularies exactly, including
  their order (tested against ``ccml/evaluation/*/*.txt``).

Tags are type-prefixed as in ccml (``makam--Hicaz``, ``usul--Aksak``, ``instrument--Ney``, ``raga--``,
``tala--``, ``form--``; Lyra ``instruments--``, ``genres--``, ``place--``); FMA genres and MagnaTagATune tags
carry no prefix, again as in ccml. Pickled metadata (ccml's ``metadata.npy``, MagnaTagATune's ``.cP`` split
lists) is read with a restricted unpickler that admits only builtin containers and numpy array
reconstruction; anything else is refused before it can run.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from culturemert.files import atomic_write_text
from culturemert.config import StrictModel, short_repr
from culturemert.errors import ConfigError, DataError
from culturemert.safe_pickle import RestrictedUnpickler

logger = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "DEFAULT_TOP_N",
    "AUDIO_EXTENSIONS",
    "Item",
    "TaggingDataset",
    "DatasetConfig",
    "top_n_vocabulary",
    "dunya_recording_tags",
    "load_lyra",
    "load_dunya",
    "load_magnatagatune",
    "load_fma",
    "load_generic_csv",
    "load_dataset",
    "load_dataset_from_config",
    "fetch_dunya_metadata",
    "read_pickled_npy",
    "read_legacy_pickle",
    "DATASET_LOADERS",
]

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")

#: ccml's ``top_N_tags`` per dataset (config.py of pxaris/ccml; the paper's 30/20/20/30/20/50).
DEFAULT_TOP_N: dict[str, int] = {
    "makam": 30,
    "hindustani": 20,
    "carnatic": 20,
    "lyra": 30,
    "fma": 20,
    "magnatagatune": 50,
}

AUDIO_EXTENSIONS = frozenset(
    {".mp3", ".wav", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".webm", ".wv"}
)

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "test": "test",
}


def _normalise_split(value: str, where: str) -> str:
    split = _SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise DataError(
            f"{where}: unknown split value {short_repr(value)} (expected one of train/training, valid/validation/val, test)"
        )
    return split


# ----------------------------------------------------------------------------------------------------------
# record types


@dataclass
class Item:
    """One recording or clip: ``tags`` holds all its tags (not only those in the vocabulary)."""

    id: str
    audio_path: Path | None
    split: str
    tags: list[str]


@dataclass
class TaggingDataset:
    """A multi-label tagging dataset: items with splits and the vocabulary the probe predicts.

    ``missing_audio`` lists the ids whose audio was looked for under an audio root and not found (their
    ``audio_path`` is ``None``); ``dropped`` maps a reason to the ids left out of ``items``.
    """

    name: str
    vocabulary: list[str]
    items: list[Item]
    missing_audio: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    audio_root: Path | None = None

    def split(self, name: str) -> list[Item]:
        """Items of one split, in loader order."""
        if name not in SPLITS:
            raise DataError(f"{self.name}: unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return [item for item in self.items if item.split == name]

    def label_matrix(self, split: str) -> np.ndarray:
        """Binary labels ``[n_items, len(vocabulary)]`` (uint8) of one split, rows in :meth:`split` order."""
        items = self.split(split)
        column = {tag: j for j, tag in enumerate(self.vocabulary)}
        labels = np.zeros((len(items), len(self.vocabulary)), dtype=np.uint8)
        for i, item in enumerate(items):
            for tag in item.tags:
                j = column.get(tag)
                if j is not None:
                    labels[i, j] = 1
        return labels

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts: items per split, tags with no positive example per split, gaps."""
        splits: dict[str, Any] = {}
        for name in SPLITS:
            labels = self.label_matrix(name)
            missing = {item.id for item in self.split(name) if item.audio_path is None}
            splits[name] = {
                "items": int(labels.shape[0]),
                "positives": int(labels.sum()),
                "items_without_vocabulary_tag": int((labels.sum(axis=1) == 0).sum()),
                "tags_without_positives": [t for t, n in zip(self.vocabulary, labels.sum(axis=0)) if n == 0],
                "items_without_audio": len(missing),
            }
        return {
            "name": self.name,
            "vocabulary_size": len(self.vocabulary),
            "items": len(self.items),
            "splits": splits,
            "audio_root": None if self.audio_root is None else str(self.audio_root),
            "missing_audio": len(self.missing_audio),
            "dropped": {reason: len(ids) for reason, ids in self.dropped.items()},
        }


# ----------------------------------------------------------------------------------------------------------
# vocabulary


def top_n_vocabulary(tag_lists: Iterable[Iterable[str]], top_n: int | None) -> list[str]:
    """The ``top_n`` most frequent tags (all when ``None``), by count then code-point order of the tag.

    A tag counts once per item. ccml counts list entries, which is the same thing because its tag lists
    never repeat a tag (Dunya lists go through ``set``; Lyra and FMA rows have no duplicates).
    """
    if top_n is not None and top_n < 1:
        raise ConfigError(f"top_n must be a positive integer or None, got {top_n}")
    counts: Counter[str] = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocabulary = [tag for tag, _ in ranked]
    if top_n is None:
        return vocabulary
    if len(vocabulary) < top_n:
        logger.warning("only %d distinct tags on the vocabulary splits, fewer than top_n=%d", len(vocabulary), top_n)
    elif len(ranked) > top_n and ranked[top_n - 1][1] == ranked[top_n][1]:
        logger.info(
            "tie at the top-%d boundary (count %d): kept %r, left out %r by code-point order",
            top_n, ranked[top_n][1], ranked[top_n - 1][0], ranked[top_n][0],
        )
    return vocabulary[:top_n]


# ----------------------------------------------------------------------------------------------------------
# audio lookup


class _AudioIndex:
    """One walk of an audio root; finds a file by relative path without extension, else by unique stem."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"audio root is not a directory: {root}")
        self.root = root
        self.by_relative: dict[str, Path] = {}
        stems: dict[str, list[Path]] = {}
        # followlinks=True has no cycle check: a symlink to an ancestor makes the walk exponential, so each
        # real directory (device, inode) is entered once; the first path reaching it wins, in sorted order
        visited: set[tuple[int, int]] = set()
        for directory, subdirs, files in os.walk(root, followlinks=True):
            try:
                st = os.stat(directory)
            except OSError:
                subdirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in visited:
                subdirs[:] = []
                continue
            visited.add((st.st_dev, st.st_ino))
            subdirs.sort()
            for filename in sorted(files):
                path = Path(directory) / filename
                if path.suffix.lower() not in AUDIO_EXTENSIONS:
                    continue
                relative = path.relative_to(root).with_suffix("").as_posix()
                self.by_relative.setdefault(relative, path)
                stems.setdefault(path.stem, []).append(path)
        self.by_stem = {stem: paths[0] for stem, paths in stems.items() if len(paths) == 1}
        self.ambiguous_stems = {stem for stem, paths in stems.items() if len(paths) > 1}

    def find(self, candidates: Sequence[str]) -> Path | None:
        for candidate in candidates:
            hit = self.by_relative.get(candidate)
            if hit is not None:
                return hit
        for candidate in candidates:
            stem = candidate.rsplit("/", 1)[-1]
            hit = self.by_stem.get(stem)
            if hit is not None:
                return hit
        return None


def _resolve_audio(
    name: str,
    records: Sequence[tuple[str, str, list[str], Sequence[str]]],
    audio_root: str | Path | None,
) -> tuple[list[Item], list[str]]:
    """Build items from ``(id, split, tags, candidate relative paths)``; report the ids without audio."""
    if audio_root is None:
        return [Item(rid, None, split, tags) for rid, split, tags, _ in records], []
    index = _AudioIndex(Path(audio_root))
    items: list[Item] = []
    missing: list[str] = []
    for rid, split, tags, candidates in records:
        path = index.find(candidates)
        if path is None:
            missing.append(rid)
        items.append(Item(rid, path, split, tags))
    _warn_missing_audio(name, Path(audio_root), missing, len(records))
    return items, missing


def _warn_missing_audio(name: str, root: Path, missing: Sequence[str], total: int) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        logger.warning(
            "%s: audio not found under %s for %d of %d items (%s); they are kept with audio_path=None "
            "and listed in dataset.missing_audio",
            name, root, len(missing), total, shown,
        )


def _finish(
    name: str,
    items: list[Item],
    missing_audio: list[str],
    top_n: int | None,
    vocabulary: Sequence[str] | str | Path | None,
    vocabulary_splits: Sequence[str] = ("train",),
    dropped: dict[str, list[str]] | None = None,
    audio_root: str | Path | None = None,
) -> TaggingDataset:
    if isinstance(vocabulary, (str, Path)):
        vocabulary = _read_vocabulary_file(vocabulary)
    if vocabulary is None:
        vocab = top_n_vocabulary((it.tags for it in items if it.split in vocabulary_splits), top_n)
    else:
        vocab = list(vocabulary)
        if len(set(vocab)) != len(vocab):
            raise ConfigError(f"{name}: the given vocabulary repeats a tag")
    if not vocab:
        raise DataError(f"{name}: empty vocabulary (no tags on the {'/'.join(vocabulary_splits)} split)")
    return TaggingDataset(
        name=name,
        vocabulary=vocab,
        items=items,
        missing_audio=missing_audio,
        dropped={k: v for k, v in (dropped or {}).items() if v},
        audio_root=None if audio_root is None else Path(audio_root),
    )


# ----------------------------------------------------------------------------------------------------------
# safe readers


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} not found (expected a directory): {path}")
    return path


def read_pickled_npy(path: str | Path) -> Any:
    """Read a ``.npy`` holding a pickled object array (e.g. ccml's ``metadata.npy``) without running code.

    Equivalent to ``np.load(path, allow_pickle=True)`` for data made of numpy arrays, dicts, lists, strings
    and numbers; a file that would import anything else (``os.system``, ``builtins.exec``, ...) raises
    :class:`DataError` and nothing in it is executed. A 0-d object array is returned as its content.
    """
    path = _require_file(path, "pickled .npy file")
    with path.open("rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        except ValueError as exc:
            raise DataError(f"{path}: not a .npy file ({exc})") from None
        if dtype != np.dtype(object):
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        try:
            array = RestrictedUnpickler(fh, policy="data", encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: refused or unreadable pickle: {exc}") from None
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise DataError(f"{path}: pickle payload is not the object array announced by its header")
    return array.item() if array.shape == () else array


def read_legacy_pickle(path: str | Path) -> Any:
    """Read a Python-2 pickle of builtin data (the MagnaTagATune ``*_list_pub.cP`` lists): no globals at all."""
    path = _require_file(path, "pickle file")
    with path.open("rb") as fh:
        try:
            return RestrictedUnpickler(fh, policy="builtins", encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: refused or unreadable pickle: {exc}") from None


def _load_id_array(path: Path) -> list[str]:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: cannot read as a plain numpy string array ({exc})") from None
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise DataError(f"{path}: expected a 1-d string array of ids, got {array.dtype} {array.shape}")
    return [str(x) for x in array.tolist()]


def _load_npy_splits(split_dir: str | Path) -> dict[str, list[str]]:
    """``{train,valid,test}.npy`` id lists (ccml); an id in two splits is an error."""
    split_dir = _require_dir(split_dir, "split directory")
    splits = {s: _load_id_array(_require_file(split_dir / f"{s}.npy", f"{s} split file")) for s in SPLITS}
    seen: dict[str, str] = {}
    for split, ids in splits.items():
        for rid in ids:
            if rid in seen:
                raise DataError(f"{split_dir}: id {short_repr(rid)} is in both the {seen[rid]} and the {split} split")
            seen[rid] = split
    return splits


def _read_tsv(path: Path, required: Sequence[str], delimiter: str = "\t") -> list[dict[str, str]]:
    try:
        return _read_tsv_rows(path, required, delimiter)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _header_summary(header: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(short_repr(h, 40) for h in header[:limit])
    return shown + (f", ... ({len(header)} columns)" if len(header) > limit else "")


def _read_tsv_rows(path: Path, required: Sequence[str], delimiter: str) -> list[dict[str, str]]:
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
        except csv.Error as exc:
            raise DataError(f"{path}:1: malformed header ({exc})") from None
        absent = [c for c in required if c not in header]
        if absent:
            expected = "a header row " + delimiter.join(required) if required else "a header row"
            raise DataError(
                f"{path}: missing column(s) {', '.join(absent)}; expected {expected!r} "
                f"(found {_header_summary(header)})"
            )
        rows = []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. an unclosed quote swallowing the rest of the file into one field
                raise DataError(f"{path}:{reader.line_num}: malformed row ({exc})") from None
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                n_fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise DataError(
                    f"{path}:{line}: malformed row: {n_fields} field(s) separated by {delimiter!r}, "
                    f"the header has {len(header)}"
                )
            rows.append(row)
    return rows


def _split_multi(value: str) -> list[str]:
    return [v.strip() for v in value.split("|") if v.strip()]


# ----------------------------------------------------------------------------------------------------------
# Lyra


_LYRA_TAG_COLUMNS = ("instruments", "genres", "place")


def _lyra_tags(row: Mapping[str, str]) -> list[str]:
    # "None" in the place column is kept as the tag place--None, exactly as ccml does (it is in its top-30).
    return [f"{column}--{value}" for column in _LYRA_TAG_COLUMNS for value in _split_multi(row[column])]


def lyra_validation_indices(n_training: int, val_fraction: float = 0.1, seed: int = 10) -> list[int]:
    """Row indices of ``training.tsv`` that ccml uses for validation.

    ccml (``torch_train_val_split``): ``np.random.seed(seed)``, shuffle ``range(n)`` with the legacy global
    generator, the first ``floor(val_fraction * n)`` indices are validation. ``RandomState(seed)`` draws the
    same permutation without touching numpy's global state.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    indices = list(range(n_training))
    np.random.RandomState(seed).shuffle(indices)
    return sorted(indices[: int(math.floor(val_fraction * n_training))])


def load_lyra(
    raw_tsv: str | Path | None,
    split_dir: str | Path,
    audio_root: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 10,
    top_n: int | None = DEFAULT_TOP_N["lyra"],
    vocabulary: Sequence[str] | str | Path | None = None,
    vocabulary_splits: Sequence[str] = ("train", "valid"),
) -> TaggingDataset:
    """Lyra (pxaris/lyra-dataset): official ``split/{training,test}.tsv``; validation carved out of training.

    Tags come from ``raw.tsv`` (or, when ``raw_tsv`` is None, from the split files, which repeat its
    columns). The vocabulary is counted on the whole official training split (train + valid), as ccml
    computes it before splitting off validation; this reproduces ccml's 30 tags in their order.
    Audio is looked up as ``<audio_root>/<id>.<ext>`` (or ``<id>`` anywhere below the root).
    """
    split_dir = _require_dir(split_dir, "Lyra split directory")
    required = ("id", *_LYRA_TAG_COLUMNS)
    training = _read_tsv(_require_file(split_dir / "training.tsv", "Lyra training split"), ["id"])
    test = _read_tsv(_require_file(split_dir / "test.tsv", "Lyra test split"), ["id"])
    if raw_tsv is not None:
        raw_path = _require_file(raw_tsv, "Lyra raw.tsv")
        source = {row["id"]: row for row in _read_tsv(raw_path, required)}
        absent = [row["id"] for row in training + test if row["id"] not in source]
        if absent:
            raise DataError(f"{raw_path}: {len(absent)} split id(s) not in raw.tsv, e.g. {short_repr(absent[:3], 120)}")
    else:
        for path in ("training.tsv", "test.tsv"):
            _read_tsv(split_dir / path, required)
        source = {row["id"]: row for row in training + test}
    valid_rows = set(lyra_validation_indices(len(training), val_fraction, seed))
    records = []
    seen: set[str] = set()
    for rows, is_test in ((training, False), (test, True)):
        for i, row in enumerate(rows):
            rid = row["id"]
            if rid in seen:
                raise DataError(f"{split_dir}: Lyra id {short_repr(rid)} appears twice in the split files")
            seen.add(rid)
            split = "test" if is_test else ("valid" if i in valid_rows else "train")
            records.append((rid, split, _lyra_tags(source[rid]), [rid]))
    items, missing = _resolve_audio("lyra", records, audio_root)
    return _finish("lyra", items, missing, top_n, vocabulary, vocabulary_splits, audio_root=audio_root)


# ----------------------------------------------------------------------------------------------------------
# CompMusic / Dunya


_TRADITIONS = ("makam", "hindustani", "carnatic")


def _names(entries: Any, key: str, where: str) -> list[str]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise DataError(f"{where}: expected a list, got {type(entries).__name__}")
    out = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: expected objects with a {key!r} field, got {short_repr(entry)}")
        value = entry.get(key)
        if value is None and key == "common_name":
            value = entry.get("name")  # some Dunya entries lack a common name
        if isinstance(value, str) and value.strip():
            out.append(value.strip())
    return out


def _instrument_names(entries: Any, where: str) -> list[str]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise DataError(f"{where}: expected a list, got {type(entries).__name__}")
    out = []
    for entry in entries:
        instrument = entry.get("instrument") if isinstance(entry, Mapping) else None
        # a performance without an instrument (e.g. a plain artist credit) carries no instrument tag
        if isinstance(instrument, Mapping) and isinstance(instrument.get("name"), str):
            out.append(instrument["name"].strip())
    return out


def dunya_recording_tags(tradition: str, recording: Mapping[str, Any]) -> list[str]:
    """Prefixed tags of one recording as ``compmusic.dunya.<tradition>.get_recording(mbid)`` returns it.

    Mirrors ccml's ``preprocessing/dunya/get_metadata.py``:

    * makam: ``makamlist[].name`` -> ``makam--``, ``usullist[].name`` -> ``usul--``,
      ``performers[].instrument.name`` -> ``instrument--``;
    * hindustani: ``raags[].common_name`` -> ``raga--``, ``taals[].common_name`` -> ``tala--``,
      ``forms[].common_name`` -> ``form--``, ``artists[].instrument.name`` -> ``instrument--``;
    * carnatic: ``raaga[].common_name`` -> ``raga--``, ``taala[].common_name`` -> ``tala--``,
      ``form[].name`` -> ``form--``, ``artists[].instrument.name`` -> ``instrument--``.

    Duplicates are removed (first occurrence kept, for a deterministic order).
    """
    where = f"{tradition} recording {recording.get('mbid', '?')}"
    if tradition == "makam":
        performers = recording.get("performers")
        if performers is None:  # tolerate exports that put instrument credits under "artists"
            performers = recording.get("artists")
        tags = (
            [f"makam--{n}" for n in _names(recording.get("makamlist"), "name", where + " makamlist")]
            + [f"usul--{n}" for n in _names(recording.get("usullist"), "name", where + " usullist")]
            + [f"instrument--{n}" for n in _instrument_names(performers, where + " performers")]
        )
    elif tradition == "hindustani":
        tags = (
            [f"raga--{n}" for n in _names(recording.get("raags"), "common_name", where + " raags")]
            + [f"tala--{n}" for n in _names(recording.get("taals"), "common_name", where + " taals")]
            + [f"instrument--{n}" for n in _instrument_names(recording.get("artists"), where + " artists")]
            + [f"form--{n}" for n in _names(recording.get("forms"), "common_name", where + " forms")]
        )
    elif tradition == "carnatic":
        tags = (
            [f"raga--{n}" for n in _names(recording.get("raaga"), "common_name", where + " raaga")]
            + [f"tala--{n}" for n in _names(recording.get("taala"), "common_name", where + " taala")]
            + [f"instrument--{n}" for n in _instrument_names(recording.get("artists"), where + " artists")]
            + [f"form--{n}" for n in _names(recording.get("form"), "name", where + " form")]
        )
    else:
        raise ConfigError(f"unknown CompMusic tradition {tradition!r} (expected one of {', '.join(_TRADITIONS)})")
    return list(dict.fromkeys(tags))


_DUNYA_CSV_COLUMNS = {
    "makam": {"makam": "makam", "usul": "usul", "instrument": "instrument"},
    "hindustani": {"raga": "raga", "tala": "tala", "form": "form", "instrument": "instrument"},
    "carnatic": {"raga": "raga", "tala": "tala", "form": "form", "instrument": "instrument"},
}


def _dunya_tags_from_value(tradition: str, rid: str, value: Any, where: str) -> list[str] | None:
    if value is None:  # ccml writes None when the API call failed
        return None
    if isinstance(value, Mapping):
        return dunya_recording_tags(tradition, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        bad = [v for v in value if "--" not in v]
        if bad:
            raise DataError(f"{where}: recording {rid}: tags must be type-prefixed (e.g. 'makam--Hicaz'), got {short_repr(bad[:3])}")
        return list(dict.fromkeys(value))
    raise DataError(f"{where}: recording {rid}: expected a Dunya recording object or a list of tags")


def _read_dunya_metadata(tradition: str, metadata: str | Path) -> dict[str, list[str] | None]:
    """mbid -> tags from any supported export (see :func:`load_dunya`)."""
    path = Path(metadata)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path}: no <mbid>.json recording files in this directory")
        out: dict[str, list[str] | None] = {}
        for file in files:
            recording = _read_json(file)
            if not isinstance(recording, Mapping):
                raise DataError(f"{file}: expected one Dunya recording object")
            out[str(recording.get("mbid") or file.stem)] = dunya_recording_tags(tradition, recording)
        return out
    path = _require_file(path, f"{tradition} metadata")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, list):
            out = {}
            for i, recording in enumerate(data):
                if not isinstance(recording, Mapping) or not isinstance(recording.get("mbid"), str):
                    raise DataError(f"{path}: entry {i} is not a recording object with an 'mbid'")
                out[recording["mbid"]] = dunya_recording_tags(tradition, recording)
            return out
        if isinstance(data, Mapping):
            return {str(k): _dunya_tags_from_value(tradition, str(k), v, str(path)) for k, v in data.items()}
        raise DataError(f"{path}: expected a JSON object (mbid -> recording or tags) or a list of recordings")
    if suffix == ".npy":  # ccml's own metadata.npy: pickled {mbid: [prefixed tags] | None}
        data = read_pickled_npy(path)
        if not isinstance(data, Mapping):
            raise DataError(f"{path}: expected a pickled dict mbid -> tags")
        return {str(k): _dunya_tags_from_value(tradition, str(k), v, str(path)) for k, v in data.items()}
    if suffix in (".csv", ".tsv"):
        rows = _read_tsv(path, [], delimiter="\t" if suffix == ".tsv" else ",")
        header = set(rows[0]) if rows else set()
        id_column = "mbid" if "mbid" in header else "id"
        typed = _DUNYA_CSV_COLUMNS[tradition]
        if id_column not in header or not ({"tags"} & header or set(typed) & header):
            raise DataError(
                f"{path}: expected an 'mbid' (or 'id') column and either 'tags' (prefixed, '|'-joined) or "
                f"typed columns {', '.join(typed)}"
            )
        out = {}
        for line, row in enumerate(rows, start=2):
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}:{line}: malformed row (wrong number of fields)")
            if "tags" in row:
                tags = _split_multi(row["tags"])
            else:
                tags = [f"{prefix}--{v}" for column, prefix in typed.items() for v in _split_multi(row.get(column, ""))]
            out[row[id_column]] = _dunya_tags_from_value(tradition, row[id_column], tags, f"{path}:{line}")
        return out
    raise DataError(f"{path}: unsupported metadata format {suffix!r} (use .json, a directory of .json, .csv, .tsv or .npy)")


def _read_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_dunya(
    tradition: Literal["makam", "hindustani", "carnatic"],
    metadata: str | Path,
    split_dir: str | Path,
    audio_root: str | Path | None = None,
    top_n: int | None = None,
    vocabulary: Sequence[str] | str | Path | None = None,
    missing_metadata: Literal["error", "drop"] = "error",
) -> TaggingDataset:
    """Turkish-makam, Hindustani or Carnatic (CompMusic corpora on Dunya) with ccml's splits.

    ``metadata`` is one of: a JSON object ``{mbid: recording}`` where each recording is what
    ``compmusic.dunya.<tradition>.get_recording(mbid)`` returns (see :func:`fetch_dunya_metadata`); a JSON
    list of such recordings; a directory of ``<mbid>.json`` recordings; a JSON object ``{mbid: [prefixed
    tags]}``; ccml's ``metadata.npy`` (read with the restricted unpickler); or a CSV/TSV with ``mbid`` and
    either ``tags`` (prefixed, ``|``-joined) or typed columns (``makam``, ``usul``, ``instrument`` /
    ``raga``, ``tala``, ``form``, ``instrument``). Split ids: ``split_dir/{train,valid,test}.npy``.
    Ids without metadata raise :class:`DataError` unless ``missing_metadata="drop"`` (then reported in
    ``dataset.dropped["no_metadata"]``). Audio: ``<audio_root>/<mbid>.mp3`` as ccml's ``get_audios.py``
    saves it (any audio extension, any depth).
    """
    if tradition not in _TRADITIONS:
        raise ConfigError(f"unknown CompMusic tradition {tradition!r} (expected one of {', '.join(_TRADITIONS)})")
    if missing_metadata not in ("error", "drop"):
        raise ConfigError(f"missing_metadata must be 'error' or 'drop', got {missing_metadata!r}")
    splits = _load_npy_splits(split_dir)
    tags_by_id = _read_dunya_metadata(tradition, metadata)
    records = []
    without: list[str] = []
    for split in SPLITS:
        for rid in splits[split]:
            tags = tags_by_id.get(rid)
            if tags is None:
                without.append(rid)
                continue
            records.append((rid, split, tags, [rid]))
    if without and missing_metadata == "error":
        raise DataError(
            f"{metadata}: no {tradition} metadata for {len(without)} of "
            f"{sum(len(v) for v in splits.values())} split ids, e.g. {without[:3]} "
            "(pass missing_metadata='drop' to leave them out and report them)"
        )
    if without:
        logger.warning("%s: %d split ids have no metadata and are left out", tradition, len(without))
    items, missing = _resolve_audio(tradition, records, audio_root)
    top = DEFAULT_TOP_N[tradition] if top_n is None else top_n
    return _finish(tradition, items, missing, top, vocabulary, dropped={"no_metadata": without}, audio_root=audio_root)


def fetch_dunya_metadata(
    tradition: Literal["makam", "hindustani", "carnatic"],
    split_dir: str | Path,
    out_json: str | Path,
    token: str | None = None,
    client: Any = None,
) -> Path:
    """Download the recording metadata of ccml's split ids from Dunya into ``out_json`` (resumable).

    Needs the ``compmusic`` client (``pip install compmusic``) and a Dunya token, or any ``client`` object
    with ``get_recording(mbid)``. The file is ``{mbid: recording | null}`` (null when the API call failed,
    like ccml) and is rewritten atomically every 50 recordings, so an interrupted run resumes where it
    stopped. Read it back with :func:`load_dunya`.
    """
    from tqdm import tqdm

    if tradition not in _TRADITIONS:
        raise ConfigError(f"unknown CompMusic tradition {tradition!r}")
    if client is None:
        try:
            from compmusic import dunya  # type: ignore[import-not-found]
        except ImportError:
            raise DataError("fetching Dunya metadata needs the 'compmusic' package: pip install compmusic") from None
        if token:
            dunya.set_token(token)
        client = getattr(dunya, tradition)
    splits = _load_npy_splits(split_dir)
    out_json = Path(out_json)
    done: dict[str, Any] = _read_json(out_json) if out_json.is_file() else {}
    todo = [rid for s in SPLITS for rid in splits[s] if rid not in done]
    for n, rid in enumerate(tqdm(todo, desc=f"dunya {tradition}", unit="rec"), start=1):
        try:
            done[rid] = client.get_recording(rid)
        except Exception as exc:  # noqa: BLE001 - a failed recording is recorded, not fatal (as in ccml)
            logger.warning("dunya %s: get_recording(%s) failed: %s", tradition, rid, exc)
            done[rid] = None
        if n % 50 == 0:
            atomic_write_text(out_json, json.dumps(done, ensure_ascii=False))
    atomic_write_text(out_json, json.dumps(done, ensure_ascii=False))
    return out_json


# ----------------------------------------------------------------------------------------------------------
# MagnaTagATune


def mtat_tag_name(tag: str) -> str:
    """``noVocals`` -> ``no vocals``: the camelCase of jongpillee's ``top50_tags.txt`` to the CSV's names."""
    return re.sub(r"(?<=[a-z])([A-Z])", lambda m: " " + m.group(1).lower(), tag.strip())


def _read_vocabulary_file(path: str | Path) -> list[str]:
    path = _require_file(path, "vocabulary file")
    if path.suffix == ".npy":
        tags = _load_id_array(path)
    elif path.suffix == ".json":
        data = _read_json(path)
        tags = data.get("train", []) if isinstance(data, Mapping) else data
    else:
        tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not tags or not all(isinstance(t, str) for t in tags):
        raise DataError(f"{path}: expected a list of tags")
    return list(tags)


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
            entries = [entry.split("\t")[-1] for entry in _load_id_array(listed)]
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
    annotations_csv = _require_file(annotations_csv, "MagnaTagATune annotations_final.csv")
    tags_by_clip, mp3_by_clip = _read_mtat_annotations(annotations_csv)
    if isinstance(vocabulary, (str, Path)):
        vocabulary = _read_vocabulary_file(vocabulary)
    if vocabulary is not None:
        vocabulary = [mtat_tag_name(t) for t in vocabulary]
        known = {t for tags in tags_by_clip.values() for t in tags}
        unknown = [t for t in vocabulary if t not in known]
        if unknown:
            logger.warning("magnatagatune: vocabulary tags never set in %s: %s", annotations_csv, unknown)
    assignment: list[tuple[str, str]] = []
    dropped: dict[str, list[str]] = {}
    if split_dir is not None:
        lists = _mtat_split_lists(_require_dir(split_dir, "MagnaTagATune split directory"))
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
    items, missing = _resolve_audio("magnatagatune", records, audio_root)
    dataset = _finish("magnatagatune", items, missing, top_n, vocabulary, audio_root=audio_root)
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
        for row in _read_tsv(_require_file(genres_csv, "FMA genres.csv"), ["genre_id", "title"], delimiter=","):
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
            own_split[track_id] = _normalise_split(row[split_col], f"{tracks_csv}:{line}")
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
    path = _require_file(metadata, "FMA metadata")
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
        splits = _load_npy_splits(split_dir)
    elif own_split:
        splits = {s: [rid for rid, v in own_split.items() if v == s] for s in SPLITS}
    else:
        raise DataError(f"{path}: no split information; pass split_dir (ccml's fma/split)")
    absent = [rid for s in SPLITS for rid in splits[s] if rid not in tags_by_id]
    if absent:
        raise DataError(f"{path}: {len(absent)} split track id(s) have no metadata, e.g. {short_repr(absent[:3], 120)}")
    records = [(rid, s, tags_by_id[rid], [f"{rid[:3]}/{rid}", rid]) for s in SPLITS for rid in splits[s]]
    items, missing = _resolve_audio("fma", records, audio_root)
    return _finish("fma", items, missing, top_n, vocabulary, audio_root=audio_root)


# ----------------------------------------------------------------------------------------------------------
# generic CSV


def load_generic_csv(
    path: str | Path,
    name: str | None = None,
    top_n: int | None = None,
    vocabulary: Sequence[str] | str | Path | None = None,
) -> TaggingDataset:
    """Any tradition: a CSV with columns ``path``, ``split``, ``tags`` (``|``-joined), optional ``id``.

    Relative audio paths are resolved against the CSV's folder; rows whose file does not exist are kept
    with ``audio_path=None`` and reported in ``missing_audio``. Splits accept train/training,
    valid/validation/val and test. Vocabulary: all tags (``top_n=None``) or the top-N of the train split,
    same ordering rule as every loader.
    """
    csv_path = _require_file(path, "dataset CSV")
    rows = _read_tsv(csv_path, ["path", "split", "tags"], delimiter=",")
    base = csv_path.parent
    items: list[Item] = []
    missing: list[str] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}:{line}"
        if not row["path"].strip():
            raise DataError(f"{where}: empty path")
        audio = Path(row["path"].strip())
        audio = audio if audio.is_absolute() else base / audio
        rid = (row.get("id") or "").strip() or Path(row["path"].strip()).with_suffix("").as_posix()
        if rid in seen:
            raise DataError(f"{where}: duplicate id {short_repr(rid)}")
        seen.add(rid)
        split = _normalise_split(row["split"], where)
        if not audio.is_file():
            missing.append(rid)
        items.append(Item(rid, audio if audio.is_file() else None, split, list(dict.fromkeys(_split_multi(row["tags"])))))
    dataset_name = name or csv_path.stem
    _warn_missing_audio(dataset_name, base, missing, len(items))
    return _finish(dataset_name, items, missing, top_n, vocabulary, audio_root=base)


# ----------------------------------------------------------------------------------------------------------
# registry and config


def _load_makam(**kw: Any) -> TaggingDataset:
    return load_dunya("makam", **kw)


def _load_hindustani(**kw: Any) -> TaggingDataset:
    return load_dunya("hindustani", **kw)


def _load_carnatic(**kw: Any) -> TaggingDataset:
    return load_dunya("carnatic", **kw)


DATASET_LOADERS: dict[str, Callable[..., TaggingDataset]] = {
    "lyra": load_lyra,
    "makam": _load_makam,
    "hindustani": _load_hindustani,
    "carnatic": _load_carnatic,
    "magnatagatune": load_magnatagatune,
    "fma": load_fma,
    "csv": load_generic_csv,
}

_SIGNATURE_OF = {"makam": load_dunya, "hindustani": load_dunya, "carnatic": load_dunya}


def _accepted_arguments(kind: str) -> list[str]:
    params = inspect.signature(_SIGNATURE_OF.get(kind, DATASET_LOADERS[kind])).parameters
    return [p for p in params if p != "tradition"]


def load_dataset(name: str, **arguments: Any) -> TaggingDataset:
    """Load a dataset by registry name (``lyra``, ``makam``, ``hindustani``, ``carnatic``,
    ``magnatagatune``, ``fma``, ``csv``) with the keyword arguments of its loader."""
    if name not in DATASET_LOADERS:
        raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(DATASET_LOADERS)})")
    accepted = _accepted_arguments(name)
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ConfigError(f"dataset {name!r}: unknown argument(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    return DATASET_LOADERS[name](**arguments)


class DatasetConfig(StrictModel):
    """One dataset of a probe/evaluate config.

    ``kind`` picks the loader, ``paths`` and ``options`` are its keyword arguments (paths are resolved
    against the config file's folder by :func:`load_dataset_from_config`), ``name`` labels the results.

    .. code-block:: yaml

        - kind: lyra
          paths: {raw_tsv: data/lyra/raw.tsv, split_dir: data/lyra/split, audio_root: audio/lyra}
          options: {seed: 10}
    """

    kind: Literal["lyra", "makam", "hindustani", "carnatic", "magnatagatune", "fma", "csv"]
    name: str | None = None
    paths: dict[str, str] = Field(default_factory=dict)
    top_n: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("paths")
    @classmethod
    def _paths_are_path_arguments(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in _PATH_ARGUMENTS:
                raise ValueError(f"{key!r} is not a path argument (known: {', '.join(sorted(_PATH_ARGUMENTS))})")
        return value


_PATH_ARGUMENTS = {
    "raw_tsv", "split_dir", "audio_root", "metadata", "annotations_csv", "genres_csv", "path", "vocabulary",
}


def load_dataset_from_config(config: DatasetConfig, base_dir: str | Path | None = None) -> TaggingDataset:
    """Load ``config``; relative paths are taken relative to ``base_dir`` (the config file's folder)."""
    base = Path(base_dir) if base_dir is not None else None
    arguments: dict[str, Any] = {}
    for key, value in config.paths.items():
        path = Path(value).expanduser()
        arguments[key] = base / path if base is not None and not path.is_absolute() else path
    overlap = set(arguments) & set(config.options)
    if overlap:
        raise ConfigError(f"dataset {config.kind!r}: {', '.join(sorted(overlap))} given in both paths and options")
    arguments.update(config.options)
    if config.top_n is not None:
        arguments["top_n"] = config.top_n
    dataset = load_dataset(config.kind, **arguments)
    if config.name:
        dataset.name = config.name
    return dataset
