"""Any tagging dataset as one CSV: ``path,split,tags`` with ``|``-joined tags."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path


from culturemert.config import short_repr
from culturemert.errors import DataError
from culturemert.evaluate.datasets.base import Item, TaggingDataset, finish_dataset, normalise_split, warn_missing_audio
from culturemert.evaluate.datasets.readers import read_tsv, require_file, split_multi

logger = logging.getLogger(__name__)


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
    csv_path = require_file(path, "dataset CSV")
    rows = read_tsv(csv_path, ["path", "split", "tags"], delimiter=",")
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
        split = normalise_split(row["split"], where)
        if not audio.is_file():
            missing.append(rid)
        items.append(Item(rid, audio if audio.is_file() else None, split, list(dict.fromkeys(split_multi(row["tags"])))))
    dataset_name = name or csv_path.stem
    warn_missing_audio(dataset_name, base, missing, len(items))
    return finish_dataset(dataset_name, items, missing, top_n, vocabulary, audio_root=base)
