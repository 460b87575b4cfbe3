"""What every loader returns (:class:`TaggingDataset` of :class:`Item`), the vocabulary rule, split names and
audio lookup."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from culturemert.config import short_repr
from culturemert.errors import ConfigError, DataError
from culturemert.audio import AUDIO_EXTENSIONS
from culturemert.evaluate.datasets.readers import SPLITS, read_vocabulary_file

logger = logging.getLogger(__name__)


Split = Literal["train", "valid", "test"]

#: ccml's ``top_N_tags`` per dataset (config.py of pxaris/ccml; the paper's 30/20/20/30/20/50).
DEFAULT_TOP_N: dict[str, int] = {
    "makam": 30,
    "hindustani": 20,
    "carnatic": 20,
    "lyra": 30,
    "fma": 20,
    "magnatagatune": 50,
}


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "test": "test",
}


def normalise_split(value: str, where: str) -> str:
    """A split name in the canonical spelling (``train``/``valid``/``test``; ``validation``, ``val`` ... accepted).

    Raises:
        DataError: any other name (``where`` says which file and line).
    """
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


def resolve_audio(
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
    warn_missing_audio(name, Path(audio_root), missing, len(records))
    return items, missing


def warn_missing_audio(name: str, root: Path, missing: Sequence[str], total: int) -> None:
    """One warning naming how many items have no audio under ``root`` (first five ids shown)."""
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        logger.warning(
            "%s: audio not found under %s for %d of %d items (%s); they are kept with audio_path=None "
            "and listed in dataset.missing_audio",
            name, root, len(missing), total, shown,
        )


def finish_dataset(
    name: str,
    items: list[Item],
    missing_audio: list[str],
    top_n: int | None,
    vocabulary: Sequence[str] | str | Path | None,
    vocabulary_splits: Sequence[str] = ("train",),
    dropped: dict[str, list[str]] | None = None,
    audio_root: str | Path | None = None,
) -> TaggingDataset:
    """Build the :class:`TaggingDataset`: the vocabulary (given, read from a file, or the top-N rule over
    ``vocabulary_splits``), tags outside it dropped, the missing-audio warning."""
    if isinstance(vocabulary, (str, Path)):
        vocabulary = read_vocabulary_file(vocabulary)
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


