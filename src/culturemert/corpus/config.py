"""Corpus settings (:class:`CorpusConfig`), the version constants that invalidate a resumed build, and the
seeded helpers every stage of the build shares."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from culturemert.label_grid import SAMPLE_RATE
from culturemert.config import StrictModel
from culturemert.errors import DataError
from culturemert.runtime import derive_seed

log = logging.getLogger(__name__)


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


def slug(text: str) -> str:
    """Lower-case ASCII tag value: accents folded, runs of other characters -> '_'."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9/]+", "_", folded).strip("_")


def _stable_int(*parts: Any) -> int:
    return derive_seed(*parts, sep="\x1f", bits=64)


def piece_rng(*parts: Any) -> np.random.Generator:
    """A numpy generator seeded from ``parts`` (e.g. seed, piece id): the same piece gets the same numbers in any worker."""
    return np.random.default_rng(_stable_int(*parts))


def koma53_to_semitones(koma53: float) -> float:
    """SymbTr pitch (53-TET commas, Do5 = 318) -> MIDI semitones (Do5 = C5 = 72.0): ``koma53 * 12 / 53``."""
    return float(koma53) * 12.0 / 53.0
