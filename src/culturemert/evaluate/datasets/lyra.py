"""Lyra (Greek traditional and folk music): official training/test lists, tags from instruments, genres, place."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from culturemert.config import short_repr
from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.datasets.base import DEFAULT_TOP_N, TaggingDataset, finish_dataset, resolve_audio
from culturemert.evaluate.datasets.readers import read_tsv, require_dir, require_file, split_multi

logger = logging.getLogger(__name__)


_LYRA_TAG_COLUMNS = ("instruments", "genres", "place")


def _lyra_tags(row: Mapping[str, str]) -> list[str]:
    # "None" in the place column is kept as the tag place--None, exactly as ccml does (it is in its top-30).
    return [f"{column}--{value}" for column in _LYRA_TAG_COLUMNS for value in split_multi(row[column])]


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
    split_dir = require_dir(split_dir, "Lyra split directory")
    required = ("id", *_LYRA_TAG_COLUMNS)
    training = read_tsv(require_file(split_dir / "training.tsv", "Lyra training split"), ["id"])
    test = read_tsv(require_file(split_dir / "test.tsv", "Lyra test split"), ["id"])
    if raw_tsv is not None:
        raw_path = require_file(raw_tsv, "Lyra raw.tsv")
        source = {row["id"]: row for row in read_tsv(raw_path, required)}
        absent = [row["id"] for row in training + test if row["id"] not in source]
        if absent:
            raise DataError(f"{raw_path}: {len(absent)} split id(s) not in raw.tsv, e.g. {short_repr(absent[:3], 120)}")
    else:
        for path in ("training.tsv", "test.tsv"):
            read_tsv(split_dir / path, required)
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
    items, missing = resolve_audio("lyra", records, audio_root)
    return finish_dataset("lyra", items, missing, top_n, vocabulary, vocabulary_splits, audio_root=audio_root)
