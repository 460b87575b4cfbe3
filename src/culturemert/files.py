"""Crash-safe file writing shared by every stage.

A file that a later run trusts (index, shard, checkpoint part, cache entry, export) is written to a temp file in
the same directory, fsynced and renamed over its final name, then the directory is fsynced: readers see the old
file or the complete new one, never a partial one. Temp files start with ``.`` and end in ``.tmp``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "name_os_error", "fsync_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text", "save_npy_atomic",
    "sha256_file",
]


def name_os_error(exc: BaseException, path: str | os.PathLike) -> None:
    """Attach ``path`` to an ``OSError`` raised without a file name (``write(2)`` on a full disk), so the CLI's
    one-line storage error can say where."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", file_mode: int | None = None
) -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, fsync, rename over ``path`` (never a partial file).

    ``file_mode`` sets the permissions (mkstemp creates 0600 files). On failure the temp file is removed and an
    ``OSError`` without a file name (``write(2)`` on a full disk) gets ``path`` attached, so the CLI can name it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        name_os_error(exc, path)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, file_mode: int | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), "wb", file_mode)


def atomic_write_text(path: str | os.PathLike, text: str, file_mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), file_mode)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` (never pickled) through :func:`atomic_write`."""
    atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)  # Path and anything else with a meaningful str()


def json_text(obj: Any) -> str:
    """The project's JSON file text: indent 1, UTF-8 kept, numpy values as Python numbers/lists, newline-terminated."""
    return json.dumps(obj, indent=1, ensure_ascii=False, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """:func:`json_text` of ``obj`` to ``path`` through :func:`atomic_write` (never a partial file)."""
    atomic_write_text(path, json_text(obj))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line to an append-only log and fsync it (a crash loses at most this line, as a torn line)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        name_os_error(exc, path)
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of an append-only JSON-lines log; a torn line (killed while appending) is skipped, a missing file is []."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out

