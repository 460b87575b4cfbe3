"""A folder of audio as a manifest: ``culturemert prepare DIR --culture NAME`` without writing a CSV first.

Every file under the folder (recursively, hidden files and folders skipped) whose extension names a format
libsndfile reads (soundfile's ``available_formats``: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, CAF, ...) is an
item; a file with any other extension is an item only if soundfile can read its header (libsndfile detects the
container from the content). Items are sorted by their path relative to the folder, so the manifest does not
depend on the file system's listing order.

Held-out split: a file is ``valid`` when the first 8 bytes of sha256("culturemert-valid/" + relative path),
read as a fraction of 2^64, are below ``valid_fraction`` (its own path decides, so adding files never moves
another file between splits); when that leaves no ``valid`` file among two or more, the file with the smallest
hash is ``valid``, so the run's validation has crops of this culture. Everything else is ``train``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from culturemert.errors import DataError
from culturemert.files import atomic_write_text

__all__ = ["FolderManifest", "scan_audio_folder", "write_folder_manifest", "audio_extensions"]

# libsndfile format name -> the file extensions it is written with
_FORMAT_EXTENSIONS = {
    "WAV": ("wav",), "WAVEX": ("wav",), "AIFF": ("aif", "aiff", "aifc"), "AU": ("au", "snd"), "AVR": ("avr",),
    "CAF": ("caf",), "FLAC": ("flac",), "HTK": ("htk",), "IRCAM": ("sf", "ircam"), "MAT4": ("mat",),
    "MAT5": ("mat",), "MP3": ("mp3",), "MPC2K": ("mpc2k",), "NIST": ("nist", "sph"), "OGG": ("ogg", "oga", "opus"),
    "PAF": ("paf",), "PVF": ("pvf",), "RF64": ("rf64",), "SD2": ("sd2",), "SDS": ("sds",),
    "SVX": ("svx", "8svx", "iff"), "VOC": ("voc",), "W64": ("w64",), "WVE": ("wve",), "XI": ("xi",),
}


def audio_extensions() -> set[str]:
    """Lower-case extensions (no dot) of the formats the installed libsndfile reads (RAW excluded: no header)."""
    import soundfile as sf

    out: set[str] = set()
    for name in sf.available_formats():
        if name == "RAW":
            continue
        out.update(_FORMAT_EXTENSIONS.get(name, (name.lower(),)))
    return out


def _valid_hash(relative: str) -> float:
    digest = hashlib.sha256(f"culturemert-valid/{relative}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class FolderManifest:
    """The items found under ``root`` (absolute paths, sorted) with their split, and what was ignored."""

    root: Path
    culture: str
    items: list[tuple[str, str]]  # (absolute path, split)
    ignored: Counter = field(default_factory=Counter)  # extension -> files that are not readable audio

    def summary(self) -> str:
        valid = sum(1 for _, split in self.items if split == "valid")
        text = f"{self.root}: {len(self.items)} audio file(s) as culture {self.culture!r} ({valid} held out as 'valid')"
        if self.ignored:
            text += "; ignored (not audio): " + ", ".join(f"{ext or '(no extension)'} x{n}" for ext, n in
                                                         sorted(self.ignored.items()))
        return text


def scan_audio_folder(root: str | os.PathLike, culture: str, valid_fraction: float = 0.02) -> FolderManifest:
    """Every readable audio file under ``root`` as a manifest item of ``culture`` (see the module docstring).

    Raises:
        DataError: ``root`` is not a folder, holds no readable audio, or ``valid_fraction`` is outside [0, 1).
    """
    import soundfile as sf

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    if not culture.strip():
        raise DataError("--culture: empty culture name")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    known = audio_extensions()
    found: list[str] = []
    ignored: Counter = Counter()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            ext = path.suffix.lower().lstrip(".")
            if ext not in known:
                try:  # libsndfile reads the container from the content: a mis-named file may still be audio
                    sf.info(str(path))
                except Exception:
                    ignored[f".{ext}" if ext else ""] += 1
                    continue
            found.append(path.relative_to(root).as_posix())
    if not found:
        raise DataError(f"{root}: no audio file that soundfile reads (looked for {', '.join(sorted(known))})")
    found.sort()
    hashes = {rel: _valid_hash(rel) for rel in found}
    valid = {rel for rel in found if hashes[rel] < valid_fraction}
    if valid_fraction > 0 and not valid and len(found) >= 2:
        valid = {min(found, key=hashes.__getitem__)}
    items = [(str((root / rel).resolve()), "valid" if rel in valid else "train") for rel in found]
    return FolderManifest(root, culture.strip(), items, ignored)


def write_folder_manifest(folder: FolderManifest, path: str | os.PathLike) -> Path:
    """Write the items as a ``path,culture,split`` CSV manifest (atomically); returns ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "culture", "split"])
    for item, split in folder.items:
        writer.writerow([item, folder.culture, split])
    atomic_write_text(path, buf.getvalue())
    return Path(path)
