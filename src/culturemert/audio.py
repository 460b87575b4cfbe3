"""Audio decoding: any soundfile-readable file -> float32 mono at 24 kHz.

Decoding is streamed: the file is read in blocks, each block is downmixed (mean over channels) and fed to a
``soxr.ResampleStream``, so a two-hour 192 kHz / 8-channel recording never sits in memory at its original
rate. The container format is detected from the file's content (libsndfile), not from its extension.

Non-finite samples (NaN/inf, possible only in float WAV/AIFF/CAF files) are rejected by default: a float file
with NaNs is corrupt, and silently zeroing them would insert dropouts into training data. ``nonfinite="zero"``
replaces them with 0 instead and reports how many were replaced.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
import torch

from culturemert.label_grid import SAMPLE_RATE
from culturemert.errors import DataError

log = logging.getLogger(__name__)

#: MERT's sample rate: every prepared waveform is mono at this rate.
#: Multiply int16 samples by this to get the float waveform the model sees (and the teacher saw).
INT16_SCALE = 1.0 / 32768.0
#: Frames read per block while streaming (about 1.4 s at 44.1 kHz; bounded memory for any channel count).
DEFAULT_BLOCK_FRAMES = 65_536
#: Extensions accepted by manifests without a warning; decoding itself trusts the content, not the name.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".w64", ".caf", ".rf64")

NonFinitePolicy = Literal["reject", "zero"]


@dataclass
class AudioInfo:
    """What the header says about a file (before decoding)."""

    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate > 0 else 0.0


@dataclass
class DecodeReport:
    """Per-file facts collected while decoding, turned into warnings by ``prepare``."""

    info: AudioInfo | None = None
    nonfinite_replaced: int = 0
    frames_decoded: int = 0
    warnings: list[str] = field(default_factory=list)


def check_readable_path(path: str | os.PathLike) -> Path:
    """Raise DataError with a precise reason if ``path`` cannot be a readable regular file."""
    path = Path(path)
    try:
        st = path.stat()  # follows symlinks: ELOOP for loops, ENOENT for dangling links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: symlink loop") from None
        if exc.errno == errno.ENOENT:
            reason = "dangling symlink" if path.is_symlink() else "file not found"
            raise DataError(f"{path}: {reason}") from None
        if exc.errno == errno.EACCES:
            raise DataError(f"{path}: permission denied") from None
        raise DataError(f"{path}: cannot stat ({exc.strerror})") from None
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an audio file")
    if st.st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied")
    return path


def _open(path: Path) -> sf.SoundFile:
    try:
        return sf.SoundFile(str(path))
    except sf.LibsndfileError as exc:
        raise DataError(f"{path}: not a readable audio file ({exc.error_string})") from None
    except (RuntimeError, TypeError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable audio file ({exc})") from None


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Read only the header. Raises DataError (path + reason) for missing, empty or non-audio files."""
    path = check_readable_path(path)
    with _open(path) as f:
        info = AudioInfo(int(f.samplerate), int(f.channels), int(f.frames), f.format, f.subtype)
    if info.sample_rate <= 0 or info.channels <= 0:
        raise DataError(f"{path}: invalid header (sample rate {info.sample_rate}, {info.channels} channels)")
    return info


def iter_audio_blocks(
    path: str | os.PathLike,
    target_sr: int = SAMPLE_RATE,
    *,
    block_frames: int = DEFAULT_BLOCK_FRAMES,
    nonfinite: NonFinitePolicy = "reject",
    report: DecodeReport | None = None,
) -> Iterator[np.ndarray]:
    """Yield float32 mono blocks at ``target_sr``; their concatenation is the whole resampled file.

    Memory stays O(block_frames x channels) regardless of the file's length.
    """
    if nonfinite not in ("reject", "zero"):
        raise ValueError(f"nonfinite must be 'reject' or 'zero', got {nonfinite!r}")
    path = check_readable_path(path)
    report = report if report is not None else DecodeReport()
    with _open(path) as f:
        sr = int(f.samplerate)
        report.info = AudioInfo(sr, int(f.channels), int(f.frames), f.format, f.subtype)
        if sr <= 0 or f.channels <= 0:
            raise DataError(f"{path}: invalid header (sample rate {sr}, {f.channels} channels)")
        resampler = None if sr == target_sr else soxr.ResampleStream(sr, target_sr, 1, dtype="float32", quality="HQ")
        while True:
            try:
                block = f.read(block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                seconds = report.frames_decoded / sr
                raise DataError(f"{path}: decode error after {seconds:.2f} s ({exc})") from None
            last = block.shape[0] < block_frames
            if block.shape[0]:
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
                bad = ~np.isfinite(mono)
                if bad.any():
                    n_bad = int(bad.sum())
                    if nonfinite == "reject":
                        at = (report.frames_decoded + int(np.argmax(bad))) / sr
                        raise DataError(f"{path}: non-finite samples (NaN/inf), first at {at:.3f} s")
                    mono[bad] = 0.0
                    report.nonfinite_replaced += n_bad
                report.frames_decoded += block.shape[0]
                out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
                if out.size:
                    yield out
            elif resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                if tail.size:
                    yield tail
            if last:
                break
    if report.info.frames > 0 and report.frames_decoded < report.info.frames:
        report.warnings.append(
            f"truncated: decoded {report.frames_decoded} of {report.info.frames} frames the header announces"
        )
    if report.nonfinite_replaced:
        report.warnings.append(f"replaced {report.nonfinite_replaced} non-finite samples with 0")


def load_audio(
    path: str | os.PathLike,
    target_sr: int = SAMPLE_RATE,
    *,
    nonfinite: NonFinitePolicy = "reject",
    block_frames: int = DEFAULT_BLOCK_FRAMES,
    report: DecodeReport | None = None,
) -> np.ndarray:
    """Decode ``path`` to a float32 mono waveform at ``target_sr`` (mean downmix, soxr HQ resampling).

    Raises DataError naming the path and the reason for missing, empty, non-audio, corrupt files, files with
    no audio frames, and (with ``nonfinite="reject"``) files containing NaN/inf samples.
    """
    blocks = list(iter_audio_blocks(path, target_sr, block_frames=block_frames, nonfinite=nonfinite, report=report))
    if not blocks:
        raise DataError(f"{path}: no audio frames")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def float_to_int16(wav: np.ndarray) -> np.ndarray:
    """Quantise a float waveform to int16 (round to nearest, clip to [-32768, 32767])."""
    scaled = np.rint(np.asarray(wav, dtype=np.float32) * np.float32(32768.0))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def int16_to_float(samples: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 -> float32 in [-1, 1) using ``INT16_SCALE`` (the convention shared by trainer and embedder)."""
    return np.multiply(samples, np.float32(INT16_SCALE), out=out, dtype=np.float32)


def decode_to_int16(
    path: str | os.PathLike,
    target_sr: int = SAMPLE_RATE,
    *,
    nonfinite: NonFinitePolicy = "reject",
    block_frames: int = DEFAULT_BLOCK_FRAMES,
    report: DecodeReport | None = None,
) -> np.ndarray:
    """Like ``load_audio`` but quantises block by block, so peak memory is 2 bytes per output sample."""
    blocks = [
        float_to_int16(b)
        for b in iter_audio_blocks(path, target_sr, block_frames=block_frames, nonfinite=nonfinite, report=report)
    ]
    if not blocks:
        raise DataError(f"{path}: no audio frames")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


__all__ = [
    "INT16_SCALE",
    "AUDIO_EXTENSIONS",
    "AudioInfo",
    "DecodeReport",
    "check_readable_path",
    "probe_audio",
    "iter_audio_blocks",
    "load_audio",
    "decode_to_int16",
    "float_to_int16",
    "int16_to_float",
    "mel_filterbank",
]


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular HTK-mel filters ``[n_fft // 2 + 1, n_mels]`` (peak 1, no area normalisation), frequencies in Hz.

    HTK mel scale m = 2595 log10(1 + f / 700) (Young et al., The HTK Book), ``n_mels`` filters with edges equally
    spaced in mel between ``f_min`` and ``f_max``, evaluated at the ``n_fft // 2 + 1`` FFT bin centres. Used by the
    k-means teacher's features and the log-mel baseline.
    """

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    bin_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(f_min)), hz_to_mel(np.array(f_max)), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_freqs[:, None] - lower) / (centre - lower)
    falling = (upper - bin_freqs[:, None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32))
