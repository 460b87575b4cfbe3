"""Scanning the symbolic sources as text: ABC collections from the music21 wheel and SymbTr makam scores."""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


from culturemert.errors import ConfigError, DataError
from culturemert.corpus.config import DEFAULT_CULTURES, CorpusConfig, slug

log = logging.getLogger(__name__)


# music21 corpus files per ABC culture, relative to music21's corpus folder.
_ABC_SOURCES: dict[str, tuple[str, ...]] = {
    "chinese": ("essenFolksong/han1.abc", "essenFolksong/han2.abc"),
    "german": tuple(
        f"essenFolksong/{stem}.abc"
        for stem in (
            "erk5", "erk10", "erk20", "erk30", "altdeu10", "altdeu20", "boehme10", "boehme20", "fink0",
            "kinder0", "dva0", "zuccal0", "lot", "lux",
        )
    ),
    "irish": ("oneills1850/*.abc",),
    "scottish": ("airdsAirs/*.abc",),
}
SOURCE_DESCRIPTIONS = {
    "chinese": "music21 corpus: Essen folk song collection, han1 + han2 (Chinese folk songs; O: China, <province>)",
    "german": "music21 corpus: Essen folk song collection, German-language Central-European sets "
    "(erk, altdeu, boehme, fink, kinder, dva, zuccal, lot = Lorraine, lux = Luxembourg)",
    "irish": "music21 corpus: O'Neill's Music of Ireland (1850), transcribed by Norbert Paap (R: = tune type)",
    "scottish": "music21 corpus: Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-)",
    "turkish": "SymbTr (MTG) Turkish makam scores, txt format, CC BY-NC-SA 4.0",
}
# Tag that a culture's tunes should carry first when choosing candidates (e.g. Irish tunes with a tune type).
PRIMARY_TAG = {"irish": "tune_type--", "chinese": "region--"}

_CHINESE_PROVINCES = frozenset(
    "anhui beijing chongqing fujian gansu guangdong guangxi guizhou hainan hebei heilongjiang henan hubei hunan "
    "jiangsu jiangxi jilin liaoning neimeng neimenggu ningxia qinghai shaanxi shandong shanghai shanxi sichuan "
    "taiwan tianjin xinjiang xizang yunnan zhejiang".split()
)

_TUNE_TYPES = {
    "reel": "reel", "hornpipe": "hornpipe", "jig": "jig", "double jig": "double_jig", "doublejig": "double_jig",
    "slip jig": "slip_jig", "slipjig": "slip_jig", "air": "air", "waltz": "waltz", "march": "march", "slide": "slide",
}


@dataclass(frozen=True)
class SourcePiece:
    """One tune as found in a source file, before parsing."""

    piece_id: str
    culture: str
    kind: Literal["abc", "symbtr"]
    text: str
    source: str  # file it comes from, relative to its collection root
    title: str
    tags: tuple[str, ...]  # header-derived tags (without culture/meter/mode, which come from parsing)


def music21_corpus_root() -> Path:
    """The music21 wheel's bundled corpus folder.

    Raises:
        DataError: music21 (the ``corpus`` extra) is not installed.
    """
    try:
        import music21
    except ImportError as exc:  # pragma: no cover - music21 is a declared dependency of the corpus extra
        raise DataError("the corpus needs music21: pip install 'culturemert[corpus]'") from exc
    return Path(music21.__file__).resolve().parent / "corpus"


def _split_abc(text: str) -> tuple[str, list[str]]:
    """(file header, tune texts): tunes start at a line beginning with ``X:``."""
    parts = re.split(r"(?m)^(?=X:)", text)
    header = "" if parts and parts[0].startswith("X:") else parts[0]
    return header, [p for p in parts if p.startswith("X:")]


def abc_field(tune: str, letter: str) -> list[str]:
    """Every value of header field ``letter`` (e.g. ``T``) in an ABC tune, stripped."""
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^{letter}:[ \t]*(.*?)[ \t]*\r?$", tune)]


def _abc_body_key(tune: str) -> str:
    """Body without header fields/comments and whitespace: identical tunes in overlapping files share it."""
    body = [ln for ln in tune.splitlines() if ln.strip() and not re.match(r"^[A-Za-z]:|^%", ln.strip())]
    return re.sub(r"\s+", "", "".join(body))


def _header_tags(culture: str, tune: str, source_file: str) -> tuple[str, ...]:
    tags: list[str] = []
    origin = (abc_field(tune, "O") or [""])[0].split(";")[0]  # "Deutschland; Frankreich, Elsass": first place
    fields = [f.strip() for f in origin.split(",") if f.strip()]
    if culture == "chinese":
        # "China, Shaanxi, Zizhou", "China, Jiangsu Nantong", "China, nan Jiangsu": first province-name token
        if fields and fields[0].lower() == "china":
            tokens = [t.lower() for f in fields[1:] for t in f.split()]
            province = next((t for t in tokens if t in _CHINESE_PROVINCES), None)
            if province:
                tags.append(f"region--{province}")
    elif culture == "german":
        stem = Path(source_file).stem
        if stem == "lot":
            tags.append("region--lothringen")
        elif stem == "lux":
            tags.append("region--luxemburg")
        elif "Mitteleuropa" in fields:
            rest = fields[fields.index("Mitteleuropa") + 1 :]
            if rest:
                tags.append(f"region--{slug(rest[0])}")
            if len(rest) >= 2:
                tags.append(f"subregion--{slug(rest[1])}")
    elif culture == "irish":
        rhythm = (abc_field(tune, "R") or [""])[0].strip().lower()
        if rhythm in _TUNE_TYPES:
            tags.append(f"tune_type--{_TUNE_TYPES[rhythm]}")
    return tuple(tags)


def _german_origin_ok(tune: str, source_file: str) -> bool:
    if Path(source_file).stem in ("lot", "lux"):
        return True
    origin = (abc_field(tune, "O") or [""])[0]
    return "Mitteleuropa" in origin


def _scan_abc(culture: str) -> list[SourcePiece]:
    root = music21_corpus_root()
    files: list[Path] = []
    for pattern in _ABC_SOURCES[culture]:
        matched = sorted(root.glob(pattern))
        if not matched:
            raise DataError(f"music21 corpus file(s) {pattern!r} not found under {root}")
        files.extend(matched)
    pieces: list[SourcePiece] = []
    seen_bodies: set[str] = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        header, tunes = _split_abc(path.read_text(encoding="utf-8", errors="replace"))
        # global fields before the first tune (default note length, meter) apply to every tune of the file
        prefix = "".join(ln + "\n" for ln in header.splitlines() if re.match(r"^[LMKQ]:", ln))
        collection = path.parent.name.replace("essenFolksong", "essen").replace("oneills1850", "oneills")
        collection = collection.replace("airdsAirs", "aird")
        for index, tune in enumerate(tunes, start=1):
            body = _abc_body_key(tune)
            if len(body) < 8 or body in seen_bodies:
                continue  # empty tune or a verbatim copy in an overlapping O'Neill file
            if culture == "german" and not _german_origin_ok(tune, rel):
                continue
            seen_bodies.add(body)
            lines = tune.splitlines()
            text = lines[0] + "\n" + prefix + "\n".join(lines[1:]) + "\n"
            title = (abc_field(tune, "T") or [""])[0]
            pieces.append(
                SourcePiece(
                    piece_id=f"{collection}_{path.stem}_{index:04d}",
                    culture=culture,
                    kind="abc",
                    text=text,
                    source=rel,
                    title=title,
                    tags=_header_tags(culture, tune, rel),
                )
            )
    return pieces


def _iter_symbtr_texts(path: Path) -> Iterator[tuple[str, str]]:
    """(file name, text) of every SymbTr ``.txt`` in a folder (recursively) or a ``.tar.gz`` archive."""
    if path.is_dir():
        txts = sorted(p for p in path.rglob("*.txt") if "--" in p.name)
        if txts:
            for p in txts:
                yield p.name, p.read_text(encoding="utf-8", errors="replace")
            return
        archives = sorted(path.glob("*.tar.gz")) + sorted(path.glob("*.tgz"))
        if not archives:
            raise DataError(f"{path}: no SymbTr '*--*.txt' files and no .tar.gz archive in this folder")
        for archive in archives:
            yield from _iter_symbtr_texts(archive)
        return
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        found: list[tuple[str, str]] = []
        # one sequential pass: random access into a gzip stream would decompress from the start every time
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                name = Path(member.name).name
                if not (member.isfile() and name.endswith(".txt") and "--" in name):
                    continue
                handle = tar.extractfile(member)
                if handle is not None:  # member bytes are read in memory; nothing is extracted to disk
                    found.append((name, handle.read().decode("utf-8", errors="replace")))
        yield from sorted(found)
        return
    raise DataError(f"SymbTr path {path} is neither a folder nor a .tar.gz archive")


def _scan_symbtr(path: Path) -> list[SourcePiece]:
    pieces: list[SourcePiece] = []
    seen: set[str] = set()
    for name, text in _iter_symbtr_texts(path):
        stem = name[: -len(".txt")]
        parts = stem.split("--")
        if len(parts) < 3:
            log.debug("SymbTr file name without makam--form--usul: %s", name)
            continue
        makam, form, usul = (slug(p) for p in parts[:3])
        piece_id = "symbtr_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
        if piece_id in seen:
            continue
        seen.add(piece_id)
        tags = tuple(t for t in (f"makam--{makam}" if makam else "", f"form--{form}" if form else "",
                                 f"usul--{usul}" if usul else "") if t)
        pieces.append(SourcePiece(piece_id, "turkish", "symbtr", text, name, parts[3] if len(parts) > 3 else "", tags))
    if not pieces:
        raise DataError(f"no SymbTr scores found in {path}")
    return pieces


def _resolve_cultures(config: CorpusConfig) -> list[str]:
    if config.cultures is None:
        chosen = [c for c in DEFAULT_CULTURES if c != "turkish" or config.symbtr is not None]
        if config.symbtr is None:
            log.info("no SymbTr path given: building without the Turkish makam part (non-Western = Chinese)")
        return chosen
    if "turkish" in config.cultures and config.symbtr is None:
        raise ConfigError("culture 'turkish' needs SymbTr scores: set 'symbtr' (--symbtr PATH) to a folder of "
                          "SymbTr txt files or to symbtr-txt-half.tar.gz")
    return list(config.cultures)


def scan_sources(config: CorpusConfig) -> dict[str, list[SourcePiece]]:
    """All candidate tunes per culture (text level only, no music parsing), in source order."""
    out: dict[str, list[SourcePiece]] = {}
    for culture in _resolve_cultures(config):
        if culture == "turkish":
            assert config.symbtr is not None
            if not config.symbtr.exists():
                raise DataError(f"SymbTr path not found: {config.symbtr}")
            out[culture] = _scan_symbtr(config.symbtr)
        else:
            out[culture] = _scan_abc(culture)
    return out
