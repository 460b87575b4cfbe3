"""The offline multi-cultural corpus: real symbolic music rendered to 24 kHz audio with culture tags.

Sources (all installable from PyPI / Debian, nothing downloaded at build time):

* ``chinese``  -- Essen folk songs ``han1`` + ``han2`` from the music21 wheel (province from the ``O:`` field);
* ``german``   -- German-language Central-European Essen collections (Erk, Altdeutsche, Böhme, Fink, Kinderlieder,
  DVA, Zuccalmaglio, Lothringen, Luxemburg; region from ``O:``);
* ``irish``    -- O'Neill's *Music of Ireland* (1850) from the music21 wheel (tune type from ``R:``);
* ``scottish`` -- Aird's *Selection of Scotch, English, Irish and Foreign Airs* (optional, not in the default set);
* ``turkish``  -- SymbTr makam scores (txt format, microtonal; makam/form/usul from the file name), only when a
  SymbTr folder or ``symbtr-txt*.tar.gz`` archive is given.

Pipeline: scan the sources as text (cheap) -> choose candidates per culture in a seeded order -> parse only
those (music21 for ABC, a few lines of code for SymbTr) -> drop duplicates on (culture, first 40 pitches) ->
render each piece to a fixed duration with one instrument pool for every culture (FluidSynth + a General-MIDI
soundfont; a pure-numpy additive synthesiser when libfluidsynth is missing) -> RMS-normalise -> write
``audio/<culture>/<id>.flac`` atomically -> ``corpus.csv`` + ``pieces.csv`` + ``corpus.json``.

Everything random is derived from ``(seed, piece id)``, so the same seed gives the same CSV and the same audio
bytes whatever the number of workers and whichever worker renders which piece. FluidSynth keeps voice state
from note to note (voice slots, filters, reverb/chorus buffers) that no reset fully clears, so every piece gets
a fresh synthesiser (reverb/chorus off): a piece renders identically whatever was rendered before it (tested).
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from culturemert.label_grid import SAMPLE_RATE
from culturemert.config import StrictModel
from culturemert.errors import ConfigError, DataError
from culturemert.files import atomic_write_bytes
from culturemert.runtime import derive_seed

log = logging.getLogger(__name__)

__all__ = [
    "CorpusSettingsChanged",
    "ALL_CULTURES",
    "DEFAULT_CULTURES",
    "DEBIAN_SOUNDFONTS",
    "AdditiveRenderer",
    "CorpusConfig",
    "CorpusSummary",
    "FluidSynthRenderer",
    "ParsedPiece",
    "RenderParams",
    "ScheduledNote",
    "SourcePiece",
    "SplitFractions",
    "assign_splits",
    "build_corpus",
    "koma53_to_semitones",
    "make_renderer",
    "parse_abc_tune",
    "parse_symbtr_text",
    "piece_render_params",
    "render_piece_audio",
    "resolve_renderer",
    "resolve_soundfont",
    "scan_sources",
    "schedule_notes",
]

class CorpusSettingsChanged(DataError):
    """The output folder holds a corpus rendered with other settings (resume would mix two corpora)."""


#: Bump when a change in this module changes the rendered audio for the same config (invalidates resume).
RENDER_VERSION = 2  # 2: a fresh synthesiser per piece (1 let pieces depend on their predecessors)
#: Bump when parsing changes (notes, meter, key): invalidates the notes cache of earlier builds.
PARSER_VERSION = 2
#: Pitch-bend units per semitone with the General-MIDI default bend range of +-2 semitones.
BEND_PER_SEMITONE = 4096
#: Dedupe key length: pieces of one culture whose first DEDUPE_NOTES pitches agree are the same tune.
DEDUPE_NOTES = 40
#: Pieces with fewer notes are dropped (fragments, parse accidents).
MIN_NOTES = 8

DEFAULT_CULTURES = ("chinese", "german", "irish", "turkish")
ALL_CULTURES = ("chinese", "german", "irish", "scottish", "turkish")
NON_WESTERN = frozenset({"chinese", "turkish"})

#: Debian locations of fluid-soundfont-gm's FluidR3_GM.sf2 (tried in order before pretty_midi's TimGM6mb).
DEBIAN_SOUNDFONTS = (
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
)

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
_SOURCE_DESCRIPTIONS = {
    "chinese": "music21 corpus: Essen folk song collection, han1 + han2 (Chinese folk songs; O: China, <province>)",
    "german": "music21 corpus: Essen folk song collection, German-language Central-European sets "
    "(erk, altdeu, boehme, fink, kinder, dva, zuccal, lot = Lorraine, lux = Luxembourg)",
    "irish": "music21 corpus: O'Neill's Music of Ireland (1850), transcribed by Norbert Paap (R: = tune type)",
    "scottish": "music21 corpus: Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-)",
    "turkish": "SymbTr (MTG) Turkish makam scores, txt format, CC BY-NC-SA 4.0",
}
# Tag that a culture's tunes should carry first when choosing candidates (e.g. Irish tunes with a tune type).
_PRIMARY_TAG = {"irish": "tune_type--", "chinese": "region--"}

# Mode names for the interval (semitones) from the key signature's major tonic to the final note.
_CHINESE_MODES = {0: "gong", 2: "shang", 4: "jue", 7: "zhi", 9: "yu"}
_EUROPEAN_MODES = {0: "major", 2: "dorian", 4: "phrygian", 5: "lydian", 7: "mixolydian", 9: "minor", 11: "locrian"}

_CHINESE_PROVINCES = frozenset(
    "anhui beijing chongqing fujian gansu guangdong guangxi guizhou hainan hebei heilongjiang henan hubei hunan "
    "jiangsu jiangxi jilin liaoning neimeng neimenggu ningxia qinghai shaanxi shandong shanghai shanxi sichuan "
    "taiwan tianjin xinjiang xizang yunnan zhejiang".split()
)

_TUNE_TYPES = {
    "reel": "reel", "hornpipe": "hornpipe", "jig": "jig", "double jig": "double_jig", "doublejig": "double_jig",
    "slip jig": "slip_jig", "slipjig": "slip_jig", "air": "air", "waltz": "waltz", "march": "march", "slide": "slide",
}


# ----------------------------------------------------------------------------------------------------------------
# configuration


class SplitFractions(StrictModel):
    """Piece-level split fractions (per culture); they must sum to 1."""

    train: float = Field(0.60, ge=0.0, le=1.0)
    valid: float = Field(0.15, ge=0.0, le=1.0)
    test: float = Field(0.25, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + valid + test must be 1, got {total:g}")
        return self


class CorpusConfig(StrictModel):
    """Settings of ``culturemert corpus`` (YAML keys = field names).

    ``transpose_semitones``: every piece is transposed by a uniformly drawn integer in
    ``[-transpose_semitones, +transpose_semitones]``. Without it each source sits in its own notated register
    (SymbTr writes every makam at a fixed notated tonic), so an absolute-pitch histogram alone identifies makam
    and culture and a probe can score high without learning anything about the music (feasibility study, §7).
    """

    cultures: list[str] | None = None
    pieces_per_culture: int | dict[str, int] = 300
    duration_s: float = Field(20.0, gt=0.0, le=600.0)
    sample_rate: int = Field(SAMPLE_RATE, ge=8000, le=96000)
    seed: int = 0
    instrument_programs: list[int] = Field(default_factory=lambda: [0, 24, 40, 68, 71, 73], min_length=1)
    tempo_bpm: tuple[float, float] = (80.0, 140.0)
    symbtr_time_scale: tuple[float, float] = (0.8, 1.25)
    velocity: tuple[int, int] = (80, 110)
    transpose_semitones: int = Field(3, ge=0, le=12)
    loop_gap_s: float = Field(0.5, ge=0.0, le=10.0)
    fade_out_s: float = Field(0.02, ge=0.0, le=2.0)
    target_rms_dbfs: float = Field(-20.0, le=-3.0)
    symbtr: Path | None = None
    soundfont: Path | None = None
    synthesizer: Literal["auto", "fluidsynth", "additive"] = "auto"
    polyphony: int = Field(32, ge=4, le=256)
    audio_format: Literal["flac", "wav"] = "flac"
    workers: int = Field(2, ge=1, le=64)
    splits: SplitFractions = Field(default_factory=SplitFractions)

    @field_validator("cultures")
    @classmethod
    def _known_cultures(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [c for c in value if c not in ALL_CULTURES]
        if unknown:
            raise ValueError(f"unknown culture(s) {unknown}; choose from {list(ALL_CULTURES)}")
        if not value:
            raise ValueError("at least one culture is needed")
        return list(dict.fromkeys(value))

    @field_validator("pieces_per_culture")
    @classmethod
    def _positive_counts(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        counts = value.values() if isinstance(value, dict) else [value]
        if any(int(n) < 1 for n in counts):
            raise ValueError("pieces per culture must be >= 1")
        if isinstance(value, dict):
            unknown = [c for c in value if c not in ALL_CULTURES]
            if unknown:
                raise ValueError(f"unknown culture(s) {unknown}")
        return value

    @field_validator("instrument_programs")
    @classmethod
    def _gm_programs(cls, value: list[int]) -> list[int]:
        if any(not 0 <= p <= 127 for p in value):
            raise ValueError("General-MIDI programs are 0..127")
        return value

    @field_validator("tempo_bpm", "symbtr_time_scale")
    @classmethod
    def _positive_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"need 0 < low <= high, got {list(value)}")
        return value

    @field_validator("velocity")
    @classmethod
    def _velocity_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 127:
            raise ValueError(f"need 1 <= low <= high <= 127, got {list(value)}")
        return value

    def count_for(self, culture: str) -> int:
        if isinstance(self.pieces_per_culture, dict):
            return int(self.pieces_per_culture.get(culture, 300))
        return int(self.pieces_per_culture)


# ----------------------------------------------------------------------------------------------------------------
# small utilities


def _slug(text: str) -> str:
    """Lower-case ASCII tag value: accents folded, runs of other characters -> '_'."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9/]+", "_", folded).strip("_")


def _stable_int(*parts: Any) -> int:
    return derive_seed(*parts, sep="\x1f", bits=64)


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(_stable_int(*parts))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # mkstemp makes 0600 files; the corpus gets ordinary permissions
    atomic_write_bytes(path, data, file_mode=0o666 & ~_UMASK)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False, default=str) + "\n"


def koma53_to_semitones(koma53: float) -> float:
    """SymbTr pitch (53-TET commas, Do5 = 318) -> MIDI semitones (Do5 = C5 = 72.0): ``koma53 * 12 / 53``."""
    return float(koma53) * 12.0 / 53.0


# ----------------------------------------------------------------------------------------------------------------
# sources


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


def _abc_field(tune: str, letter: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^{letter}:[ \t]*(.*?)[ \t]*\r?$", tune)]


def _abc_body_key(tune: str) -> str:
    """Body without header fields/comments and whitespace: identical tunes in overlapping files share it."""
    body = [ln for ln in tune.splitlines() if ln.strip() and not re.match(r"^[A-Za-z]:|^%", ln.strip())]
    return re.sub(r"\s+", "", "".join(body))


def _header_tags(culture: str, tune: str, source_file: str) -> tuple[str, ...]:
    tags: list[str] = []
    origin = (_abc_field(tune, "O") or [""])[0].split(";")[0]  # "Deutschland; Frankreich, Elsass": first place
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
                tags.append(f"region--{_slug(rest[0])}")
            if len(rest) >= 2:
                tags.append(f"subregion--{_slug(rest[1])}")
    elif culture == "irish":
        rhythm = (_abc_field(tune, "R") or [""])[0].strip().lower()
        if rhythm in _TUNE_TYPES:
            tags.append(f"tune_type--{_TUNE_TYPES[rhythm]}")
    return tuple(tags)


def _german_origin_ok(tune: str, source_file: str) -> bool:
    if Path(source_file).stem in ("lot", "lux"):
        return True
    origin = (_abc_field(tune, "O") or [""])[0]
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
            title = (_abc_field(tune, "T") or [""])[0]
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
        makam, form, usul = (_slug(p) for p in parts[:3])
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


# ----------------------------------------------------------------------------------------------------------------
# parsing


@dataclass
class ParsedPiece:
    """Monophonic note list of one piece.

    ``notes`` is float64 ``[n, 3]``: onset, duration (in ``time_unit``: quarter notes for ABC, seconds for
    SymbTr) and pitch in MIDI semitones (fractional for microtones).
    """

    notes: np.ndarray
    time_unit: Literal["quarter", "second"]
    length: float  # total length in time_unit (end of the last note or bar)
    meter: str | None = None
    key_sharps: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "notes": [[round(float(x), 6) for x in row] for row in self.notes],
            "time_unit": self.time_unit,
            "length": round(float(self.length), 6),
            "meter": self.meter,
            "key_sharps": self.key_sharps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParsedPiece:
        notes = np.asarray(data["notes"], dtype=np.float64).reshape(-1, 3)
        return cls(notes, data["time_unit"], float(data["length"]), data.get("meter"), data.get("key_sharps"))

    def final_pitch_class(self) -> int | None:
        if not len(self.notes):
            return None
        return int(round(self.notes[-1, 2])) % 12


def _monophonic(events: Iterable[tuple[float, float, float, str | None]]) -> list[list[float]]:
    """Merge tied notes, drop notes that start before the previous one ends (second voices, chord doubling)."""
    notes: list[list[float]] = []
    for onset, duration, pitch, tie in events:
        if duration <= 0:
            continue
        if notes:
            prev = notes[-1]
            prev_end = prev[0] + prev[1]
            if tie in ("stop", "continue") and abs(prev_end - onset) < 1e-6 and abs(prev[2] - pitch) < 1e-6:
                prev[1] += duration
                continue
            if onset < prev_end - 1e-6:
                continue
        notes.append([onset, duration, pitch])
    return notes


def _abc_header_meter(text: str) -> str | None:
    """The tune's first ``M:`` value as ``n/d`` ("C" = 4/4, "C|" = 2/2); None when absent or free."""
    values = _abc_field(text, "M")
    if not values:
        return None
    first = values[0].split(",")[0].strip()
    if first in ("C", "c"):
        return "4/4"
    if first in ("C|", "c|"):
        return "2/2"
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", first)
    return f"{int(match.group(1))}/{int(match.group(2))}" if match else None


def parse_abc_tune(text: str) -> ParsedPiece:
    """Notes of one ABC tune via music21: top note of chords, ties merged, grace notes and overlaps dropped.

    ``pitch.ps`` is used so quarter-tone accidentals survive as fractional semitones.
    """
    from music21 import converter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = converter.parse(text, format="abc", forceSource=True)
    flat = score.flatten()
    events = []
    for element in flat.notes:
        duration = element.duration
        ql = float(duration.quarterLength)
        if duration.isGrace or ql <= 0:
            continue
        pitch = max(p.ps for p in element.pitches) if element.isChord else element.pitch.ps
        tie = element.tie.type if element.tie is not None else None
        events.append((float(element.offset), ql, float(pitch), tie))
    events.sort(key=lambda e: e[0])
    notes = np.asarray(_monophonic(events), dtype=np.float64).reshape(-1, 3)
    meter = _abc_header_meter(text)
    if meter is None:
        # music21's first TimeSignature can be a mid-tune change (a 1/4 bar inside a 3/4 Erk song), so it is
        # only the fallback for headers that music21 reads and this function does not
        signatures = list(flat.getElementsByClass("TimeSignature"))
        if signatures and not re.search(r"(?m)^M:\s*none", text, re.I):
            meter = signatures[0].ratioString
    sharps = None
    keys = list(flat.getElementsByClass("KeySignature"))
    if keys:
        sharps = int(keys[0].sharps)
    end = float(notes[:, 0].max() + notes[notes[:, 0].argmax(), 1]) if len(notes) else 0.0
    length = max(end, float(flat.highestTime or 0.0))
    return ParsedPiece(notes, "quarter", length, meter, sharps)


def parse_symbtr_text(text: str) -> ParsedPiece:
    """Notes of a SymbTr txt score: rows with ``Kod == 9``; ``Koma53 <= 0`` is a rest; ``Ms`` = duration in ms.

    Pitch = ``Koma53 * 12 / 53`` semitones (53-TET commas -> microtonal MIDI pitch, Do5 = 318 -> 72).
    """
    lines = text.splitlines()
    if not lines:
        raise DataError("empty SymbTr file")
    header = [h.strip() for h in lines[0].split("\t")]
    try:
        col_kod, col_koma, col_ms = header.index("Kod"), header.index("Koma53"), header.index("Ms")
    except ValueError as exc:
        raise DataError(f"not a SymbTr txt header (need Kod, Koma53, Ms): {header[:13]}") from exc
    notes: list[list[float]] = []
    clock_ms = 0.0
    for line in lines[1:]:
        cells = line.split("\t")
        if len(cells) <= max(col_kod, col_koma, col_ms):
            continue
        try:
            kod = int(cells[col_kod])
        except ValueError:
            continue
        if kod != 9:
            continue
        try:
            koma = float(cells[col_koma] or 0)
            ms = float(cells[col_ms] or 0)
        except ValueError:
            continue
        if ms <= 0:
            continue
        if koma > 0:
            notes.append([clock_ms / 1000.0, ms / 1000.0, koma53_to_semitones(koma)])
        clock_ms += ms
    array = np.asarray(notes, dtype=np.float64).reshape(-1, 3)
    return ParsedPiece(array, "second", clock_ms / 1000.0, None, None)


def _parse_task(task: tuple[str, str, str]) -> tuple[str, dict[str, Any] | None, str | None]:
    piece_id, kind, text = task
    try:
        parsed = parse_abc_tune(text) if kind == "abc" else parse_symbtr_text(text)
        return piece_id, parsed.to_json(), None
    except Exception as exc:  # noqa: BLE001 - one bad tune must not stop the build; it is reported
        return piece_id, None, f"{type(exc).__name__}: {exc}"


def _mode_tag(culture: str, parsed: ParsedPiece) -> str | None:
    """Cheap mode estimate: interval from the key signature's major tonic to the final note."""
    if parsed.key_sharps is None or culture == "turkish":
        return None
    final = parsed.final_pitch_class()
    if final is None:
        return None
    interval = (final - (7 * parsed.key_sharps) % 12) % 12
    names = _CHINESE_MODES if culture == "chinese" else _EUROPEAN_MODES
    name = names.get(interval)
    return f"mode--{name}" if name else None


def _dedupe_key(parsed: ParsedPiece) -> tuple[float, ...]:
    return tuple(round(float(p), 2) for p in parsed.notes[:DEDUPE_NOTES, 2])


# ----------------------------------------------------------------------------------------------------------------
# per-piece randomisation and note scheduling


@dataclass(frozen=True)
class RenderParams:
    """Everything random about one piece's rendering, derived from ``(seed, piece_id)`` only."""

    program: int
    tempo_bpm: float  # quarter notes per minute (ABC)
    time_scale: float  # duration multiplier (SymbTr, already in seconds)
    transpose: int
    note_seed: int  # velocities

    def to_json(self) -> dict[str, Any]:
        return {
            "program": self.program,
            "tempo_bpm": round(self.tempo_bpm, 3),
            "time_scale": round(self.time_scale, 4),
            "transpose": self.transpose,
        }


def piece_render_params(config: CorpusConfig, piece_id: str) -> RenderParams:
    """Draw instrument, tempo and transposition for a piece. The culture is deliberately not an input: every
    culture draws from the same instrument pool and ranges, so timbre and tempo do not reveal the culture."""
    rng = _rng("render", config.seed, piece_id)
    program = int(config.instrument_programs[int(rng.integers(len(config.instrument_programs)))])
    tempo = float(rng.uniform(*config.tempo_bpm))
    scale = float(rng.uniform(*config.symbtr_time_scale))
    transpose = int(rng.integers(-config.transpose_semitones, config.transpose_semitones + 1))
    note_seed = int(rng.integers(2**31))
    return RenderParams(program, tempo, scale, transpose, note_seed)


@dataclass(frozen=True)
class ScheduledNote:
    start: float  # seconds
    end: float
    pitch: float  # MIDI semitones, fractional for microtones
    velocity: int


def schedule_notes(
    parsed: ParsedPiece, params: RenderParams, duration_s: float, loop_gap_s: float, velocity: tuple[int, int]
) -> list[ScheduledNote]:
    """Notes in seconds, transposed, looped (with a short gap) until ``duration_s`` is filled."""
    if not len(parsed.notes):
        return []
    factor = 60.0 / params.tempo_bpm if parsed.time_unit == "quarter" else params.time_scale
    onsets = parsed.notes[:, 0] * factor
    durations = parsed.notes[:, 1] * factor
    pitches = parsed.notes[:, 2] + params.transpose
    # keep the piece inside the MIDI range by whole octaves
    while pitches.max() > 126:
        pitches = pitches - 12
    while pitches.min() < 1:
        pitches = pitches + 12
    period = max(parsed.length * factor, float((onsets + durations).max())) + loop_gap_s
    if period <= 0:
        return []
    rng = np.random.default_rng(params.note_seed)
    out: list[ScheduledNote] = []
    offset = 0.0
    while offset < duration_s:
        for onset, dur, pitch in zip(onsets, durations, pitches):
            start = offset + float(onset)
            if start >= duration_s:
                break
            vel = int(rng.integers(velocity[0], velocity[1] + 1))
            out.append(ScheduledNote(start, min(start + float(dur), duration_s), float(pitch), vel))
        offset += period
    return out


# ----------------------------------------------------------------------------------------------------------------
# renderers


def resolve_soundfont(explicit: Path | None) -> Path:
    """The soundfont to use: the given one, else Debian's FluidR3_GM, else pretty_midi's bundled TimGM6mb."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"soundfont not found: {explicit}")
        return explicit
    for candidate in DEBIAN_SOUNDFONTS:
        if candidate.is_file():
            return candidate
    try:
        import pretty_midi

        bundled = Path(pretty_midi.__file__).resolve().parent / "TimGM6mb.sf2"
        if bundled.is_file():
            log.warning("Debian soundfont not found (apt-get install fluid-soundfont-gm); using pretty_midi's "
                        "smaller TimGM6mb.sf2")
            return bundled
    except ImportError:
        pass
    raise DataError("no General-MIDI soundfont found: apt-get install fluid-soundfont-gm, or pip install "
                    "pretty_midi (bundles TimGM6mb.sf2), or set 'soundfont'")


class FluidSynthRenderer:
    """FluidSynth (float output, reverb/chorus off) with a fresh synthesiser for every piece.

    A persistent synthesiser carries state from one piece to the next (voice slots, their filters and
    interpolation history), and no reset we found removes all of it: a quarter of the quickstart's pieces came out
    differently depending on which pieces the worker had rendered before. A new synthesiser per piece costs ~13 ms
    with dynamic sample loading (the soundfont's samples are read when a preset is selected, not all at start-up)
    and makes every piece a function of its notes only.

    Consecutive notes alternate between two MIDI channels so that each note keeps its own pitch bend while the
    previous note is still releasing.
    """

    name = "fluidsynth"
    _CHANNELS = (0, 1)

    def __init__(self, soundfont: Path, sample_rate: int, polyphony: int = 32) -> None:
        import fluidsynth  # raises ImportError when libfluidsynth is missing

        self._fl = fluidsynth
        self.soundfont = soundfont
        self.sample_rate = sample_rate
        self.polyphony = polyphony
        self._write_float = fluidsynth.cfunc(
            "fluid_synth_write_float", ctypes.c_int,
            ("synth", ctypes.c_void_p, 1), ("len", ctypes.c_int, 1),
            ("lout", ctypes.c_void_p, 1), ("loff", ctypes.c_int, 1), ("lincr", ctypes.c_int, 1),
            ("rout", ctypes.c_void_p, 1), ("roff", ctypes.c_int, 1), ("rincr", ctypes.c_int, 1),
        )
        if self._write_float is None:  # pragma: no cover - every FluidSynth >= 1.0 has it
            raise ImportError("libfluidsynth lacks fluid_synth_write_float")
        self._open()[0].delete()  # fail here, not in the first piece, when the soundfont does not load

    def _open(self) -> tuple[Any, int]:
        """A new synthesiser with the soundfont loaded, and the soundfont's id in it."""
        synth = self._fl.Synth(
            gain=0.5,
            samplerate=float(self.sample_rate),
            channels=16,
            **{"synth.reverb.active": 0, "synth.chorus.active": 0, "synth.polyphony": self.polyphony,
               "synth.cpu-cores": 1, "synth.dynamic-sample-loading": 1},
        )
        sfid = synth.sfload(str(self.soundfont))
        if sfid < 0:
            synth.delete()
            raise DataError(f"FluidSynth could not load soundfont {self.soundfont}")
        return synth, sfid

    def _write(self, synth: Any, left: np.ndarray, right: np.ndarray, start: int, count: int) -> None:
        if count > 0:
            self._write_float(synth.synth, count, left.ctypes.data + 4 * start, 0, 1,
                              right.ctypes.data + 4 * start, 0, 1)

    def render(self, notes: Sequence[ScheduledNote], program: int, num_samples: int) -> np.ndarray:
        """Mono float32 audio of ``num_samples`` samples."""
        synth, sfid = self._open()
        try:
            return self._render(synth, sfid, notes, program, num_samples)
        finally:
            synth.delete()

    def _render(
        self, synth: Any, sfid: int, notes: Sequence[ScheduledNote], program: int, num_samples: int
    ) -> np.ndarray:
        for channel in self._CHANNELS:
            synth.program_select(channel, sfid, 0, program)
            # RPN 0 = pitch-bend range: +-2 semitones, explicitly (it is also the GM default)
            synth.cc(channel, 101, 0)
            synth.cc(channel, 100, 0)
            synth.cc(channel, 6, 2)
            synth.cc(channel, 38, 0)
        # (sample, note-off before note-on at the same sample, order, channel, key, bend, velocity)
        events: list[tuple[int, int, int, int, int, int, int]] = []
        for i, note in enumerate(notes):
            channel = self._CHANNELS[i % len(self._CHANNELS)]
            key = int(round(note.pitch))
            bend = int(round((note.pitch - key) * BEND_PER_SEMITONE))
            start = int(round(note.start * self.sample_rate))
            end = int(round(note.end * self.sample_rate))
            if start >= num_samples or end <= start:
                continue
            events.append((start, 1, i, channel, key, bend, note.velocity))
            events.append((end, 0, i, channel, key, 0, 0))
        events.sort()
        left = np.zeros(num_samples, np.float32)
        right = np.zeros(num_samples, np.float32)
        position = 0
        for sample, is_on, _, channel, key, bend, velocity in events:
            if sample >= num_samples:
                break
            if sample > position:
                self._write(synth, left, right, position, sample - position)
                position = sample
            if is_on:
                synth.pitch_bend(channel, bend)
                synth.noteon(channel, key, velocity)
            else:
                synth.noteoff(channel, key)
        self._write(synth, left, right, position, num_samples - position)
        return 0.5 * (left + right)


@dataclass(frozen=True)
class _AdditiveVoice:
    harmonics: tuple[float, ...]
    attack: float
    decay: float | None  # exponential decay time constant (plucked/struck) or None (sustained)
    release: float
    vibrato_cents: float = 0.0
    vibrato_hz: float = 5.5


# Rough spectral recipes for the default pool; unknown programs fall back to the piano recipe.
_ADDITIVE_VOICES: dict[int, _AdditiveVoice] = {
    0: _AdditiveVoice((1.0, 0.5, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03), 0.005, 0.9, 0.15),
    24: _AdditiveVoice((1.0, 0.6, 0.35, 0.2, 0.1, 0.05), 0.003, 0.5, 0.1),
    40: _AdditiveVoice(tuple(1.0 / k for k in range(1, 13)), 0.06, None, 0.12, 12.0, 5.5),
    68: _AdditiveVoice((0.6, 1.0, 0.8, 0.5, 0.35, 0.2, 0.1, 0.05), 0.03, None, 0.08, 6.0, 5.0),
    71: _AdditiveVoice((1.0, 0.05, 0.5, 0.04, 0.3, 0.03, 0.15, 0.02, 0.08), 0.03, None, 0.1),
    73: _AdditiveVoice((1.0, 0.25, 0.1, 0.04), 0.05, None, 0.1, 8.0, 5.0),
}


class AdditiveRenderer:
    """Pure-numpy additive synthesiser: the fallback when libfluidsynth is not installed.

    Much lower fidelity than a sampled soundfont (a few sine partials per instrument with simple envelopes), but
    it keeps the corpus buildable anywhere, with the same pitches (microtones exact), timing and instrument draw.
    """

    name = "additive"

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def render(self, notes: Sequence[ScheduledNote], program: int, num_samples: int) -> np.ndarray:
        voice = _ADDITIVE_VOICES.get(program, _ADDITIVE_VOICES[0])
        sr = self.sample_rate
        out = np.zeros(num_samples, np.float64)
        for note in notes:
            start = int(round(note.start * sr))
            if start >= num_samples:
                continue
            held = max(int(round((note.end - note.start) * sr)), 1)
            length = min(held + int(voice.release * sr), num_samples - start)
            t = np.arange(length) / sr
            f0 = 440.0 * 2.0 ** ((note.pitch - 69.0) / 12.0)
            if voice.vibrato_cents:
                # phase of a sinusoidally modulated frequency, integrated analytically
                depth = f0 * (2.0 ** (voice.vibrato_cents / 1200.0) - 1.0)
                phase = 2 * np.pi * (f0 * t - depth / (2 * np.pi * voice.vibrato_hz) *
                                     (np.cos(2 * np.pi * voice.vibrato_hz * t) - 1.0))
            else:
                phase = 2 * np.pi * f0 * t
            wave = np.zeros(length)
            for k, amp in enumerate(voice.harmonics, start=1):
                if k * f0 >= 0.45 * sr:
                    break
                wave += amp * np.sin(k * phase)
            env = np.minimum(t / voice.attack, 1.0) if voice.attack > 0 else np.ones(length)
            if voice.decay is not None:
                env = env * np.exp(-t / voice.decay)
            held_env = env[min(held, length) - 1]
            tail = t >= held / sr
            env[tail] = held_env * np.exp(-(t[tail] - held / sr) / (voice.release / 4.0))
            out[start : start + length] += (note.velocity / 127.0) ** 2 * env * wave
        return out.astype(np.float32)


def make_renderer(config: CorpusConfig) -> FluidSynthRenderer | AdditiveRenderer:
    """The renderer the config asks for; ``auto`` falls back to the additive synthesiser without libfluidsynth
    (see :func:`resolve_renderer`)."""
    resolved = resolve_renderer(config)
    if resolved.synthesizer == "additive":
        return AdditiveRenderer(resolved.sample_rate)
    assert resolved.soundfont is not None
    return FluidSynthRenderer(resolved.soundfont, resolved.sample_rate, resolved.polyphony)


def resolve_renderer(config: CorpusConfig) -> CorpusConfig:
    """Copy of ``config`` with ``synthesizer`` fixed to what will actually run (and ``soundfont`` resolved).

    ``auto`` becomes ``fluidsynth`` when libfluidsynth imports and a soundfont exists, else ``additive``. The
    build resolves once and hands the result to every worker, so all pieces use the same synthesiser and the
    resume fingerprint names it.
    """
    if config.synthesizer == "additive":
        return config.model_copy(update={"soundfont": None})
    try:
        import fluidsynth  # noqa: F401 - raises ImportError without libfluidsynth
    except ImportError as exc:
        if config.synthesizer == "fluidsynth":
            raise DataError(f"FluidSynth is not available ({exc}): apt-get install fluidsynth (libfluidsynth3), "
                            "or set synthesizer: additive") from exc
        log.warning("libfluidsynth not found (%s): using the pure-numpy additive synthesiser, which sounds far "
                    "less realistic; apt-get install fluidsynth fluid-soundfont-gm for the real corpus", exc)
        return config.model_copy(update={"synthesizer": "additive", "soundfont": None})
    try:
        soundfont = resolve_soundfont(config.soundfont)
    except DataError:
        if config.synthesizer == "fluidsynth":
            raise
        log.warning("no General-MIDI soundfont found: using the pure-numpy additive synthesiser")
        return config.model_copy(update={"synthesizer": "additive", "soundfont": None})
    return config.model_copy(update={"synthesizer": "fluidsynth", "soundfont": soundfont})


def _renderer_identity(resolved: CorpusConfig) -> dict[str, Any]:
    """What the audio depends on besides the per-piece parameters (part of the resume fingerprint)."""
    if resolved.synthesizer != "fluidsynth":
        return {"synthesizer": "additive"}
    assert resolved.soundfont is not None
    return {"synthesizer": "fluidsynth", "soundfont": str(resolved.soundfont),
            "soundfont_bytes": resolved.soundfont.stat().st_size}


def _finish_audio(audio: np.ndarray, config: CorpusConfig) -> np.ndarray:
    """Fade out, RMS-normalise (peak-limited to 0.99) and quantise to int16."""
    audio = audio.astype(np.float64)
    fade = int(config.fade_out_s * config.sample_rate)
    if fade > 1:
        audio[-fade:] *= np.linspace(1.0, 0.0, fade)
    rms = float(np.sqrt(np.mean(audio**2)))
    if not np.isfinite(rms) or rms < 1e-6:
        raise DataError("rendered audio is silent")
    gain = 10.0 ** (config.target_rms_dbfs / 20.0) / rms
    peak = float(np.abs(audio).max())
    gain = min(gain, 0.99 / peak)
    return np.clip(np.round(audio * gain * 32767.0), -32768, 32767).astype(np.int16)


def render_piece_audio(
    renderer: FluidSynthRenderer | AdditiveRenderer,
    parsed: ParsedPiece,
    params: RenderParams,
    config: CorpusConfig,
) -> np.ndarray:
    """int16 mono audio of exactly ``duration_s * sample_rate`` samples."""
    num_samples = int(round(config.duration_s * config.sample_rate))
    notes = schedule_notes(parsed, params, config.duration_s, config.loop_gap_s, config.velocity)
    if not notes:
        raise DataError("no notes to render")
    return _finish_audio(renderer.render(notes, params.program, num_samples), config)


def _encode_audio(samples: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=audio_format.upper(), subtype="PCM_16")
    return buffer.getvalue()


def _audio_complete(path: Path, expected_frames: int, sample_rate: int, expected_bytes: int | None = None) -> bool:
    """True when ``path`` is a mono file of the expected length and rate and, when the previous build recorded
    it, of the recorded byte size (a FLAC header states the length even when the file was cut short later)."""
    if not path.is_file():
        return False
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        return False
    try:
        import soundfile as sf

        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - unreadable means re-render
        return False
    return info.frames == expected_frames and info.samplerate == sample_rate and info.channels == 1


# ----------------------------------------------------------------------------------------------------------------
# worker side

_WORKER: dict[str, Any] = {}


def _worker_init(config_json: str) -> None:
    config = CorpusConfig.model_validate_json(config_json)
    _WORKER["config"] = config
    _WORKER["renderer"] = None


def _worker_renderer() -> FluidSynthRenderer | AdditiveRenderer:
    if _WORKER.get("renderer") is None:
        _WORKER["renderer"] = make_renderer(_WORKER["config"])
    return _WORKER["renderer"]


def _render_task(task: tuple[str, dict[str, Any], str]) -> tuple[str, str | None, str]:
    """Render one piece to ``path``; returns (piece id, error or None, synthesiser name)."""
    piece_id, parsed_json, path = task
    config: CorpusConfig = _WORKER["config"]
    try:
        renderer = _worker_renderer()
        parsed = ParsedPiece.from_json(parsed_json)
        params = piece_render_params(config, piece_id)
        samples = render_piece_audio(renderer, parsed, params, config)
        _atomic_write_bytes(Path(path), _encode_audio(samples, config.sample_rate, config.audio_format))
        return piece_id, None, renderer.name
    except Exception as exc:  # noqa: BLE001 - reported per piece
        return piece_id, f"{type(exc).__name__}: {exc}", ""


class _TaskRunner:
    """``map(fn, tasks)`` in order over ``config.workers`` processes, in-process for one worker.

    The process pool is started on first use and kept for every later batch (parse batches, then rendering),
    so the interpreter start-up and imports are paid once per worker. Processes are spawned, not forked: the
    caller may already have imported torch or started threads.
    """

    def __init__(self, config: CorpusConfig, progress: bool) -> None:
        self.config = config
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _TaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable, tasks: list, desc: str) -> Iterator:
        if not tasks:
            return
        bar = tqdm(total=len(tasks), desc=desc, unit="piece", disable=not self.progress, leave=False)
        try:
            if self.config.workers <= 1 or len(tasks) == 1 and self._pool is None:
                previous = dict(_WORKER)
                _worker_init(self.config.model_dump_json())
                try:
                    for task in tasks:
                        yield fn(task)
                        bar.update(1)
                finally:
                    _WORKER.clear()
                    _WORKER.update(previous)
                return
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.config.workers, mp_context=get_context("spawn"),
                                                 initializer=_worker_init, initargs=(self.config.model_dump_json(),))
            chunk = max(1, min(8, len(tasks) // (self.config.workers * 8)))
            for result in self._pool.map(fn, tasks, chunksize=chunk):
                yield result
                bar.update(1)
        finally:
            bar.close()


# ----------------------------------------------------------------------------------------------------------------
# building


class CorpusSummary(StrictModel):
    """What ``build_corpus`` produced."""

    out_dir: Path
    csv_path: Path
    json_path: Path
    n_pieces: int
    pieces_per_culture: dict[str, int]
    pieces_per_split: dict[str, dict[str, int]]
    rendered: int
    resumed: int
    parse_failures: int
    render_failures: int
    synthesizer: str
    soundfont: str | None
    parse_s: float  # scanning the sources + parsing the chosen tunes (0 parse time when cached)
    render_s: float
    elapsed_s: float


def assign_splits(piece_ids_by_culture: dict[str, list[str]], fractions: SplitFractions, seed: int) -> dict[str, str]:
    """Piece-level split per culture: a seeded permutation of the sorted ids, cut at the fractions."""
    out: dict[str, str] = {}
    for culture in sorted(piece_ids_by_culture):
        ids = sorted(piece_ids_by_culture[culture])
        order = _rng("split", seed, culture).permutation(len(ids))
        n_train = int(round(fractions.train * len(ids)))
        n_valid = int(round(fractions.valid * len(ids)))
        n_valid = min(n_valid, len(ids) - n_train)
        for rank, index in enumerate(order):
            out[ids[index]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return out


def _candidate_order(culture: str, pieces: list[SourcePiece], seed: int) -> list[SourcePiece]:
    """Seeded shuffle, pieces carrying the culture's primary tag (e.g. an Irish tune type) first."""
    order = _rng("select", seed, culture).permutation(len(pieces))
    shuffled = [pieces[i] for i in order]
    prefix = _PRIMARY_TAG.get(culture)
    if prefix is None:
        return shuffled
    return sorted(shuffled, key=lambda p: 0 if any(t.startswith(prefix) for t in p.tags) else 1)


def _notes_cache_key(piece: SourcePiece) -> str:
    import music21

    parser = f"v{PARSER_VERSION}-" + (f"music21-{music21.__version__}" if piece.kind == "abc" else "symbtr")
    return hashlib.sha256(f"{parser}\x1f{piece.kind}\x1f{piece.text}".encode()).hexdigest()[:24]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recorded_sizes(pieces_csv: Path) -> dict[str, int]:
    """path -> byte size of the audio as the previous build wrote it (empty when there is no pieces.csv)."""
    try:
        with pieces_csv.open(newline="", encoding="utf-8") as fh:
            return {row["path"]: int(row["bytes"]) for row in csv.DictReader(fh) if row.get("bytes")}
    except (OSError, KeyError, ValueError):
        return {}


def _fingerprint(config: CorpusConfig) -> dict[str, Any]:
    """Settings that the bytes of a piece's audio depend on. A different fingerprint makes resume unsafe."""
    fields = config.model_dump(
        mode="json",
        include={"duration_s", "sample_rate", "seed", "instrument_programs", "tempo_bpm", "symbtr_time_scale",
                 "velocity", "transpose_semitones", "loop_gap_s", "fade_out_s", "target_rms_dbfs", "polyphony",
                 "audio_format"},
    )
    return {"render_version": RENDER_VERSION, **fields, **_renderer_identity(config)}


def _select_and_parse(
    config: CorpusConfig,
    sources: dict[str, list[SourcePiece]],
    cache_path: Path,
    runner: _TaskRunner,
) -> tuple[dict[str, list[tuple[SourcePiece, ParsedPiece]]], int]:
    """Parse candidates in seeded order until each culture has its quota of distinct pieces."""
    cache: dict[str, Any] = _load_json(cache_path) or {}
    cache_dirty = False
    chosen: dict[str, list[tuple[SourcePiece, ParsedPiece]]] = {c: [] for c in sources}
    seen_keys: dict[str, set[tuple[float, ...]]] = {c: set() for c in sources}
    queues = {c: _candidate_order(c, pieces, config.seed) for c, pieces in sources.items()}
    cursor = {c: 0 for c in sources}
    failures = 0
    while True:
        batch: list[SourcePiece] = []
        for culture, queue in queues.items():
            missing = config.count_for(culture) - len(chosen[culture])
            if missing <= 0 or cursor[culture] >= len(queue):
                continue
            take = int(math.ceil(missing * 1.05)) + 4  # margin for duplicates and parse failures
            batch.extend(queue[cursor[culture] : cursor[culture] + take])
            cursor[culture] += take
        if not batch:
            break
        keys = {p.piece_id: _notes_cache_key(p) for p in batch}
        todo = [(p.piece_id, p.kind, p.text) for p in batch if keys[p.piece_id] not in cache]
        for piece_id, parsed_json, error in runner.map(_parse_task, todo, "parse"):
            cache[keys[piece_id]] = {"parsed": parsed_json, "error": error}
            cache_dirty = True
        # accept in candidate order (not completion order) so the selection is deterministic
        for piece in batch:
            entry = cache[keys[piece.piece_id]]
            if entry["parsed"] is None:
                failures += 1
                log.debug("parse failed for %s (%s): %s", piece.piece_id, piece.source, entry["error"])
                continue
            parsed = ParsedPiece.from_json(entry["parsed"])
            if len(parsed.notes) < MIN_NOTES:
                continue
            key = _dedupe_key(parsed)
            if key in seen_keys[piece.culture] or len(chosen[piece.culture]) >= config.count_for(piece.culture):
                continue
            seen_keys[piece.culture].add(key)
            chosen[piece.culture].append((piece, parsed))
    if cache_dirty:
        _atomic_write_text(cache_path, json.dumps(cache, separators=(",", ":")) + "\n")
    for culture, items in chosen.items():
        wanted = config.count_for(culture)
        if len(items) < wanted:
            log.warning("%s: only %d distinct pieces available (asked for %d)", culture, len(items), wanted)
    return chosen, failures


def _piece_tags(culture: str, piece: SourcePiece, parsed: ParsedPiece) -> list[str]:
    tags = [f"culture--{culture}", *piece.tags]
    mode = _mode_tag(culture, parsed)
    if mode:
        tags.append(mode)
    if parsed.meter:
        tags.append(f"meter--{parsed.meter}")
    return list(dict.fromkeys(tags))


def build_corpus(config: CorpusConfig, out_dir: str | os.PathLike, progress: bool = True,
                 overwrite: bool = False) -> CorpusSummary:
    """Build (or resume) the corpus in ``out_dir``; returns counts and where the CSV/JSON are.

    Resumes when ``out_dir`` holds a build with the same rendering fingerprint: pieces whose audio file is
    complete are not rendered again. A different fingerprint raises :class:`DataError` unless ``overwrite``.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requested = config
    config = resolve_renderer(config)
    fingerprint = _fingerprint(config)
    build_marker = out / ".corpus-build.json"
    previous = _load_json(build_marker)
    if previous is not None and previous != fingerprint and not overwrite:
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        raise CorpusSettingsChanged(f"{out} holds a corpus rendered with different settings ({', '.join(changed)}); "
                                    "use another --out directory or --overwrite")
    if previous != fingerprint:
        if previous is not None:
            for stale in (out / "audio").rglob("*") if (out / "audio").is_dir() else []:
                if stale.is_file():
                    stale.unlink()
        _atomic_write_text(build_marker, _json_text(fingerprint))

    with _TaskRunner(config, progress) as runner:
        return _build(config, requested, out, fingerprint, runner, started)


def _build(config: CorpusConfig, requested: CorpusConfig, out: Path, fingerprint: dict[str, Any],
           runner: _TaskRunner, started: float) -> CorpusSummary:
    sources = scan_sources(config)
    log.info("candidates: %s", ", ".join(f"{c} {len(p)}" for c, p in sources.items()))
    chosen, parse_failures = _select_and_parse(config, sources, out / ".notes-cache.json", runner)
    parsed_at = time.perf_counter()
    log.info("scanned and parsed in %.1f s (%d parse failures)", parsed_at - started, parse_failures)

    ids_by_culture = {c: [p.piece_id for p, _ in items] for c, items in chosen.items()}
    splits = assign_splits(ids_by_culture, config.splits, config.seed)
    expected_frames = int(round(config.duration_s * config.sample_rate))
    ext = config.audio_format
    recorded_bytes = _recorded_sizes(out / "pieces.csv")
    rows: list[dict[str, Any]] = []
    tasks: list[tuple[str, dict[str, Any], str]] = []
    resumed = 0
    for culture in sorted(chosen):
        for piece, parsed in sorted(chosen[culture], key=lambda item: item[0].piece_id):
            rel = Path("audio") / culture / f"{piece.piece_id}.{ext}"
            params = piece_render_params(config, piece.piece_id)
            rows.append({"piece": piece, "parsed": parsed, "rel": rel.as_posix(), "params": params,
                         "split": splits[piece.piece_id], "tags": _piece_tags(culture, piece, parsed)})
            if _audio_complete(out / rel, expected_frames, config.sample_rate, recorded_bytes.get(rel.as_posix())):
                resumed += 1
            else:
                tasks.append((piece.piece_id, parsed.to_json(), str(out / rel)))

    failed: dict[str, str] = {}
    synth_names: Counter[str] = Counter()
    for piece_id, error, synth_name in runner.map(_render_task, tasks, "render"):
        if error:
            failed[piece_id] = error
            log.warning("render failed for %s: %s", piece_id, error)
        else:
            synth_names[synth_name] += 1
    rows = [r for r in rows if r["piece"].piece_id not in failed]
    rendered_at = time.perf_counter()
    log.info("rendered %d pieces in %.1f s with %s", len(tasks) - len(failed), rendered_at - parsed_at,
             config.synthesizer)

    # corpus.csv: usable as a prepare manifest (path, culture, split) and as an evaluation CSV (path, split, tags)
    csv_buffer = io.StringIO()
    writer = csv.writer(csv_buffer, lineterminator="\n")
    writer.writerow(["path", "culture", "split", "tags"])
    for r in rows:
        writer.writerow([r["rel"], r["piece"].culture, r["split"], "|".join(r["tags"])])
    csv_path = out / "corpus.csv"
    _atomic_write_text(csv_path, csv_buffer.getvalue())

    detail = io.StringIO()
    writer = csv.writer(detail, lineterminator="\n")
    writer.writerow(["id", "path", "bytes", "culture", "split", "source", "title", "program", "tempo_bpm",
                     "time_scale", "transpose", "n_notes"])
    for r in rows:
        p, params = r["piece"], r["params"].to_json()
        tempo = params["tempo_bpm"] if r["parsed"].time_unit == "quarter" else ""
        scale = params["time_scale"] if r["parsed"].time_unit == "second" else ""
        writer.writerow([p.piece_id, r["rel"], (out / r["rel"]).stat().st_size, p.culture, r["split"], p.source,
                         p.title, params["program"], tempo, scale, params["transpose"], len(r["parsed"].notes)])
    _atomic_write_text(out / "pieces.csv", detail.getvalue())

    per_culture = Counter(r["piece"].culture for r in rows)
    per_split: dict[str, dict[str, int]] = {}
    for r in rows:
        per_split.setdefault(r["piece"].culture, {"train": 0, "valid": 0, "test": 0})[r["split"]] += 1
    tag_counts: dict[str, Counter[str]] = {}
    for r in rows:
        for tag in r["tags"]:
            tag_counts.setdefault(tag.split("--", 1)[0], Counter())[tag] += 1
    programs = Counter((r["piece"].culture, r["params"].program) for r in rows)
    identity = _renderer_identity(config)
    unexpected = {name for name in synth_names if name != identity["synthesizer"]}
    if unexpected:  # pragma: no cover - workers build exactly the resolved renderer
        raise DataError(f"pieces were rendered with {sorted(unexpected)} instead of {identity['synthesizer']}")
    try:
        import music21

        music21_version = music21.__version__
    except ImportError:  # pragma: no cover
        music21_version = None
    report = {
        "config": requested.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "synthesizer": identity["synthesizer"],
        "soundfont": identity.get("soundfont"),
        "n_pieces": len(rows),
        "pieces_per_culture": dict(sorted(per_culture.items())),
        "pieces_per_split": dict(sorted(per_split.items())),
        "tags": {kind: dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
                 for kind, counts in sorted(tag_counts.items())},
        "programs_per_culture": {c: {str(p): programs[(c, p)] for p in config.instrument_programs}
                                 for c in sorted(per_culture)},
        "sources": {
            c: {"description": _SOURCE_DESCRIPTIONS[c],
                "files": sorted({r["piece"].source for r in rows if r["piece"].culture == c})
                if c != "turkish" else [str(config.symbtr)],
                "candidates": len(sources[c])}
            for c in sorted(sources)
        },
        "music21_version": music21_version,
        "parse_failures": parse_failures,
        "render_failures": dict(sorted(failed.items())),
    }
    json_path = out / "corpus.json"
    _atomic_write_text(json_path, _json_text(report))

    elapsed = time.perf_counter() - started
    summary = CorpusSummary(
        out_dir=out,
        csv_path=csv_path,
        json_path=json_path,
        n_pieces=len(rows),
        pieces_per_culture=dict(sorted(per_culture.items())),
        pieces_per_split=dict(sorted(per_split.items())),
        rendered=len(tasks) - len(failed),
        resumed=resumed,
        parse_failures=parse_failures,
        render_failures=len(failed),
        synthesizer=identity["synthesizer"],
        soundfont=identity.get("soundfont"),
        parse_s=round(parsed_at - started, 2),
        render_s=round(rendered_at - parsed_at, 2),
        elapsed_s=round(elapsed, 2),
    )
    log.info("corpus: %d pieces (%s), %d rendered, %d resumed, %.1f s -> %s", len(rows),
             ", ".join(f"{c} {n}" for c, n in summary.pieces_per_culture.items()), summary.rendered, resumed,
             elapsed, csv_path)
    return summary
