"""Crash-safe file writing shared by every stage.

A file that a later run trusts (index, shard, checkpoint part, cache entry, export) is written to a temp file in
the same directory, fsynced and renamed over its final name, then the directory is fsynced: readers see the old
file or the complete new one, never a partial one. Temp files start with ``.`` and end in ``.tmp``.

Permissions: every file and directory culturemert writes gets the mode a plainly created one would get under the
process umask (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for directories; 0644/0755 under umask 022).
``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 entries and ``os.replace`` keeps the mode, and safetensors'
``save_file`` writes its own 0600 temp file, so each writer here sets the mode explicitly before the rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "name_os_error", "fsync_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text", "save_npy_atomic",
    "sha256_file", "current_umask", "default_file_mode", "default_dir_mode", "atomic_path", "make_temp_dir",
    "apply_default_modes",
]


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7: /proc/self/status);
    elsewhere by setting and restoring it (which another thread creating a file at that instant could observe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Permission bits of a file created now with ``open(path, "w")``: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """Permission bits of a directory created now with ``os.mkdir``: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


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

    ``file_mode`` sets the permissions; by default the file gets :func:`default_file_mode` (what the umask gives a
    plainly created file; mkstemp alone would leave it 0600). On failure the temp file is removed and an
    ``OSError`` without a file name (``write(2)`` on a full disk) gets ``path`` attached, so the CLI can name it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode() if file_mode is None else file_mode)
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, file_mode: int | None = None) -> Iterator[Path]:
    """A temp path next to ``path`` for writers that want a file *name* (``safetensors.torch.save_file``,
    ``np.lib.format.open_memmap``); when the block ends without an exception the file gets ``file_mode`` (default
    :func:`default_file_mode`, even if the writer replaced the file with a 0600 one of its own), is fsynced and
    renamed over ``path``. On an exception the temp file is removed and a nameless ``OSError`` gets ``path``.

    Example: ``with atomic_path(out / "features.npy") as tmp: mm = np.lib.format.open_memmap(tmp, mode="w+", ...)``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode() if file_mode is None else file_mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        name_os_error(exc, path)
        raise
    fsync_dir(path.parent)


def make_temp_dir(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with :func:`default_dir_mode` instead of 0700, for directories that are
    filled and then renamed into place (exports, checkpoints, teacher dirs)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, default_dir_mode())
    return tmp


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything below it the umask's default modes (files :func:`default_file_mode`,
    directories :func:`default_dir_mode`): call it on a temp directory before renaming it into place, after
    writers such as safetensors' ``save_file`` (which always creates 0600 files) have filled it."""
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    root = Path(root)
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dir_mode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, file_mode)


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

