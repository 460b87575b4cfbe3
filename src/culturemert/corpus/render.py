"""Per-piece randomisation, note scheduling and rendering to audio (FluidSynth + a General-MIDI soundfont, or a
pure-numpy additive synthesiser), RMS normalisation and encoding."""

from __future__ import annotations

import ctypes
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from culturemert.errors import ConfigError, DataError
from culturemert.corpus.config import BEND_PER_SEMITONE, CorpusConfig, piece_rng
from culturemert.corpus.parse import ParsedPiece

log = logging.getLogger(__name__)


#: Debian locations of fluid-soundfont-gm's FluidR3_GM.sf2 (tried in order before pretty_midi's TimGM6mb).
DEBIAN_SOUNDFONTS = (
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
)


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
    rng = piece_rng("render", config.seed, piece_id)
    program = int(config.instrument_programs[int(rng.integers(len(config.instrument_programs)))])
    tempo = float(rng.uniform(*config.tempo_bpm))
    scale = float(rng.uniform(*config.symbtr_time_scale))
    transpose = int(rng.integers(-config.transpose_semitones, config.transpose_semitones + 1))
    note_seed = int(rng.integers(2**31))
    return RenderParams(program, tempo, scale, transpose, note_seed)


@dataclass(frozen=True)
class ScheduledNote:
    """One note of a rendered piece: start and end in seconds, pitch in (fractional) MIDI semitones, velocity 1..127."""

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


def renderer_identity(resolved: CorpusConfig) -> dict[str, Any]:
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


def encode_audio(samples: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    """Samples (float, [-1, 1]) -> bytes of a 16-bit PCM file in ``audio_format`` (e.g. FLAC)."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=audio_format.upper(), subtype="PCM_16")
    return buffer.getvalue()


def audio_complete(path: Path, expected_frames: int, sample_rate: int, expected_bytes: int | None = None) -> bool:
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
