"""Parsing one piece into a monophonic note list (music21 for ABC, a few lines of code for SymbTr) and its tags."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from culturemert.errors import DataError
from culturemert.corpus.config import DEDUPE_NOTES, koma53_to_semitones
from culturemert.corpus.sources import abc_field

log = logging.getLogger(__name__)


# Mode names for the interval (semitones) from the key signature's major tonic to the final note.
_CHINESE_MODES = {0: "gong", 2: "shang", 4: "jue", 7: "zhi", 9: "yu"}
_EUROPEAN_MODES = {0: "major", 2: "dorian", 4: "phrygian", 5: "lydian", 7: "mixolydian", 9: "minor", 11: "locrian"}



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
    values = abc_field(text, "M")
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


def parse_task(task: tuple[str, str, str]) -> tuple[str, dict[str, Any] | None, str | None]:
    """Worker task: ``(piece id, 'abc' or 'symbtr', text)`` -> ``(piece id, parsed piece as JSON or None, error or None)``."""
    piece_id, kind, text = task
    try:
        parsed = parse_abc_tune(text) if kind == "abc" else parse_symbtr_text(text)
        return piece_id, parsed.to_json(), None
    except Exception as exc:  # noqa: BLE001 - one bad tune must not stop the build; it is reported
        return piece_id, None, f"{type(exc).__name__}: {exc}"


def mode_tag(culture: str, parsed: ParsedPiece) -> str | None:
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


def dedupe_key(parsed: ParsedPiece) -> tuple[float, ...]:
    """The first ``DEDUPE_NOTES`` pitches (semitones, 2 decimals): pieces of one culture with equal keys are one tune."""
    return tuple(round(float(p), 2) for p in parsed.notes[:DEDUPE_NOTES, 2])
