"""Training manifests: one row per recording (path, culture, optional split), from CSV, TSV or JSON Lines."""


from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from culturemert.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestRow:
    """One manifest entry. ``path`` is absolute (relative entries resolve against the manifest's directory)."""

    line: int
    path: str
    raw_path: str
    culture: str
    split: str = "train"
    weight: float = 1.0


def _manifest_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    raise DataError(f"{path}: unknown manifest type {suffix!r}; use .csv, .tsv or .jsonl")


def _parse_row(manifest: Path, line: int, record: dict[str, Any], base: Path) -> ManifestRow:
    def text(column: str, required: bool) -> str | None:
        value = record.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise DataError(f"{manifest}: line {line}: empty value in column {column!r}")
            return None
        if not isinstance(value, str):
            if column == "path" or isinstance(value, (dict, list)):
                raise DataError(f"{manifest}: line {line}: column {column!r} must be a string, got {value!r}")
            value = str(value)
        return value.strip() if column != "path" else value

    raw_path = text("path", True)
    culture = text("culture", True)
    split = text("split", False) or "train"
    weight_text = record.get("weight")
    weight = 1.0
    if weight_text is not None and not (isinstance(weight_text, str) and not weight_text.strip()):
        try:
            weight = float(weight_text)
        except (TypeError, ValueError):
            raise DataError(f"{manifest}: line {line}: column 'weight' is not a number: {weight_text!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"{manifest}: line {line}: column 'weight' must be finite and >= 0, got {weight_text!r}")
    expanded = os.path.expanduser(raw_path)
    absolute = os.path.abspath(os.path.join(base, expanded))  # no symlink resolution: loops must stay reportable
    return ManifestRow(line, absolute, raw_path, culture, split, weight)


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a CSV/TSV (by extension, header row required) or JSONL manifest.

    Required columns: ``path``, ``culture``; optional ``split`` (default ``train``) and ``weight`` (default 1).
    Errors name the manifest, the line and the column.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    kind = _manifest_kind(manifest)
    base = manifest.resolve().parent
    rows: list[ManifestRow] = []
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as f:
            if kind == "jsonl":
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{manifest}: line {line_no}: invalid JSON ({exc.msg})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{manifest}: line {line_no}: expected a JSON object")
                    for column in ("path", "culture"):
                        if column not in record:
                            raise DataError(f"{manifest}: line {line_no}: missing key {column!r}")
                    rows.append(_parse_row(manifest, line_no, record, base))
            else:
                reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",")
                header: list[str] | None = None
                for fields in reader:
                    line_no = reader.line_num
                    if not fields or all(not x.strip() for x in fields):
                        continue
                    if header is None:
                        header = [h.strip().lower() for h in fields]
                        missing = [c for c in ("path", "culture") if c not in header]
                        if missing:
                            raise DataError(
                                f"{manifest}: line {line_no}: header lacks required column(s) "
                                f"{', '.join(map(repr, missing))} (found {', '.join(map(repr, header))})"
                            )
                        continue
                    if len(fields) != len(header):
                        raise DataError(
                            f"{manifest}: line {line_no}: {len(fields)} fields but the header has {len(header)}"
                        )
                    rows.append(_parse_row(manifest, line_no, dict(zip(header, fields)), base))
    except UnicodeDecodeError as exc:
        raise DataError(f"{manifest}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise DataError(f"{manifest}: no entries")
    return rows
