"""CompMusic / Dunya collections: Turkish makam, Hindustani and Carnatic recordings, tags from their metadata."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal


from culturemert.files import atomic_write_text
from culturemert.config import short_repr
from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.datasets.base import DEFAULT_TOP_N, TaggingDataset, finish_dataset, resolve_audio
from culturemert.evaluate.datasets.readers import SPLITS, load_npy_splits, read_json, read_pickled_npy, read_tsv, require_file, split_multi

logger = logging.getLogger(__name__)


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
            recording = read_json(file)
            if not isinstance(recording, Mapping):
                raise DataError(f"{file}: expected one Dunya recording object")
            out[str(recording.get("mbid") or file.stem)] = dunya_recording_tags(tradition, recording)
        return out
    path = require_file(path, f"{tradition} metadata")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = read_json(path)
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
        rows = read_tsv(path, [], delimiter="\t" if suffix == ".tsv" else ",")
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
                tags = split_multi(row["tags"])
            else:
                tags = [f"{prefix}--{v}" for column, prefix in typed.items() for v in split_multi(row.get(column, ""))]
            out[row[id_column]] = _dunya_tags_from_value(tradition, row[id_column], tags, f"{path}:{line}")
        return out
    raise DataError(f"{path}: unsupported metadata format {suffix!r} (use .json, a directory of .json, .csv, .tsv or .npy)")


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
    splits = load_npy_splits(split_dir)
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
    items, missing = resolve_audio(tradition, records, audio_root)
    top = DEFAULT_TOP_N[tradition] if top_n is None else top_n
    return finish_dataset(tradition, items, missing, top, vocabulary, dropped={"no_metadata": without}, audio_root=audio_root)


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
    splits = load_npy_splits(split_dir)
    out_json = Path(out_json)
    done: dict[str, Any] = read_json(out_json) if out_json.is_file() else {}
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
