"""Readers for the files datasets are published in: pickled metadata through the restricted unpickler, split
lists, TSV/CSV tables."""

from __future__ import annotations

import csv
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from culturemert.config import short_repr
from culturemert.errors import DataError
from culturemert.safe_pickle import RestrictedUnpickler

logger = logging.getLogger(__name__)

#: The split names every loader produces.
SPLITS: tuple[str, ...] = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------------------------
# safe readers


def read_pickled_npy(path: str | Path) -> Any:
    """Read a ``.npy`` holding a pickled object array (e.g. ccml's ``metadata.npy``) without running code.

    Equivalent to ``np.load(path, allow_pickle=True)`` for data made of numpy arrays, dicts, lists, strings
    and numbers; a file that would import anything else (``os.system``, ``builtins.exec``, ...) raises
    :class:`DataError` and nothing in it is executed. A 0-d object array is returned as its content.
    """
    path = require_file(path, "pickled .npy file")
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
    path = require_file(path, "pickle file")
    with path.open("rb") as fh:
        try:
            return RestrictedUnpickler(fh, policy="builtins", encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: refused or unreadable pickle: {exc}") from None


def load_id_array(path: Path) -> list[str]:
    """A 1-d numpy string array of ids (read without pickle).

    Raises:
        DataError: not a plain string array.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: cannot read as a plain numpy string array ({exc})") from None
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise DataError(f"{path}: expected a 1-d string array of ids, got {array.dtype} {array.shape}")
    return [str(x) for x in array.tolist()]


def load_npy_splits(split_dir: str | Path) -> dict[str, list[str]]:
    """``{train,valid,test}.npy`` id lists (ccml); an id in two splits is an error."""
    split_dir = require_dir(split_dir, "split directory")
    splits = {s: load_id_array(require_file(split_dir / f"{s}.npy", f"{s} split file")) for s in SPLITS}
    seen: dict[str, str] = {}
    for split, ids in splits.items():
        for rid in ids:
            if rid in seen:
                raise DataError(f"{split_dir}: id {short_repr(rid)} is in both the {seen[rid]} and the {split} split")
            seen[rid] = split
    return splits


def read_tsv(path: Path, required: Sequence[str], delimiter: str = "\t") -> list[dict[str, str]]:
    """Rows of a delimited UTF-8 table with the ``required`` columns.

    Raises:
        DataError: not UTF-8, malformed, or a required column missing (one line, cells cut short).
    """
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


def split_multi(value: str) -> list[str]:
    """The values of a ``|``-separated cell, stripped, empty ones dropped."""
    return [v.strip() for v in value.split("|") if v.strip()]


def read_json(path: Path) -> Any:
    """JSON of a metadata file.

    Raises:
        DataError: unreadable or invalid JSON.
    """
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_vocabulary_file(path: str | Path) -> list[str]:
    """A tag list from ``.npy``, ``.json`` (a list, or a mapping with a ``train`` list) or a text file (one tag a line).

    Raises:
        DataError: missing file or not a list of tags.
    """
    path = require_file(path, "vocabulary file")
    if path.suffix == ".npy":
        tags = load_id_array(path)
    elif path.suffix == ".json":
        data = read_json(path)
        tags = data.get("train", []) if isinstance(data, Mapping) else data
    else:
        tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not tags or not all(isinstance(t, str) for t in tags):
        raise DataError(f"{path}: expected a list of tags")
    return list(tags)


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file; else a DataError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a directory; else a DataError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} not found (expected a directory): {path}")
    return path
