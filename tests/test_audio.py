"""Decoding, downmix, resampling and hostile inputs for culturemert.audio (audio made by the tests)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import soxr

from culturemert.audio import (
    INT16_SCALE,
    DecodeReport,
    decode_to_int16,
    float_to_int16,
    int16_to_float,
    load_audio,
    probe_audio,
)
from culturemert.errors import DataError


def tone(sr: int, seconds: float, freq: float = 440.0, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (0.5 + 0.1 * c) for c in range(channels)], axis=1)


def peak_frequency(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * sr / x.size)


@pytest.mark.parametrize(
    ("name", "fmt", "subtype", "sr"),
    [
        ("a.wav", "WAV", "PCM_16", 44100),
        ("a.flac", "FLAC", "PCM_24", 48000),
        ("a.ogg", "OGG", "VORBIS", 44100),
        ("a.opus", "OGG", "OPUS", 48000),
        ("a.mp3", "MP3", "MPEG_LAYER_III", 44100),
    ],
)
def test_every_format_decodes_to_24k_mono_and_keeps_440hz(tmp_path, name, fmt, subtype, sr):
    path = tmp_path / name
    sf.write(path, tone(sr, 2.0, channels=2), sr, format=fmt, subtype=subtype)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    # lossy codecs add encoder delay/padding; lossless ones are exact
    tolerance = 0 if fmt in ("WAV", "FLAC") else 0.1 * 24000
    assert abs(wav.size - 2.0 * 24000) <= tolerance
    assert abs(peak_frequency(wav[2400:-2400], 24000) - 440.0) < 1.0


@pytest.mark.parametrize("sr", [8000, 44100, 192000])
def test_resampling_length_frequency_and_parity_with_soxr(tmp_path, sr):
    x = tone(sr, 1.5, freq=440.0)
    sf.write(tmp_path / "x.wav", x, sr, subtype="FLOAT")
    wav = load_audio(tmp_path / "x.wav", block_frames=4096)  # many blocks: exercises the streaming resampler
    assert wav.size == round(x.size * 24000 / sr)
    assert abs(peak_frequency(wav, 24000) - 440.0) < 1.0
    reference = soxr.resample(x, sr, 24000, quality="HQ")
    assert reference.size == wav.size
    assert np.max(np.abs(reference - wav)) < 1e-3


def test_block_size_does_not_change_the_result_beyond_float_noise(tmp_path):
    x = tone(44100, 1.0, freq=1000.0)
    sf.write(tmp_path / "x.wav", x, 44100, subtype="FLOAT")
    a = load_audio(tmp_path / "x.wav", block_frames=1000)
    b = load_audio(tmp_path / "x.wav", block_frames=1 << 20)
    assert a.size == b.size and np.max(np.abs(a - b)) < 1e-4


@pytest.mark.parametrize("channels", [2, 8])
def test_downmix_is_the_channel_mean(tmp_path, channels):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(24000, channels)).astype(np.float32)
    sf.write(tmp_path / "multi.wav", x, 24000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "multi.wav"), x.mean(axis=1), atol=1e-7)
    assert probe_audio(tmp_path / "multi.wav").channels == channels


def test_wrong_extension_is_detected_by_content(tmp_path):
    sf.write(tmp_path / "real.flac", tone(24000, 1.0), 24000, format="FLAC")
    os.rename(tmp_path / "real.flac", tmp_path / "looks_like.mp3")
    assert load_audio(tmp_path / "looks_like.mp3").size == 24000


def test_nan_samples_rejected_by_default_or_zeroed_on_request(tmp_path):
    x = tone(24000, 1.0)
    x[1200] = np.nan
    x[5000] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, x, 24000, subtype="FLOAT")
    with pytest.raises(DataError, match=r"nan\.wav: non-finite samples \(NaN/inf\), first at 0\.050 s"):
        load_audio(path)
    report = DecodeReport()
    wav = load_audio(path, nonfinite="zero", report=report)
    assert np.isfinite(wav).all() and wav[1200] == 0 and wav[5000] == 0
    assert report.nonfinite_replaced == 2 and "replaced 2 non-finite" in report.warnings[0]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not audio\n" * 50), "not a readable audio file"),
        (lambda p: None, "file not found"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: sf.write(p, np.zeros(0, np.float32), 24000), "no audio frames"),
    ],
    ids=["zero-byte", "text-as-wav", "missing", "directory", "no-frames"],
)
def test_unreadable_inputs_raise_dataerror_naming_path_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad file é.wav"
    make(path)
    with pytest.raises(DataError) as info:
        load_audio(path)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_symlink_loop_is_reported(tmp_path):
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    with pytest.raises(DataError, match="symlink loop"):
        load_audio(tmp_path / "a.wav")


def test_truncated_flac_is_an_error_or_a_reported_truncation(tmp_path):
    sf.write(tmp_path / "full.flac", tone(44100, 3.0), 44100, format="FLAC")
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    report = DecodeReport()
    try:
        wav = load_audio(tmp_path / "cut.flac", report=report)
    except DataError as exc:
        assert "cut.flac" in str(exc)
    else:  # libsndfile may return the decodable prefix; then the truncation must be reported
        assert wav.size < 3.0 * 24000 and any("truncated" in w for w in report.warnings)


def test_int16_round_trip_and_clipping():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0, 1e-6], dtype=np.float32)
    q = float_to_int16(x)
    np.testing.assert_array_equal(q, [0, 16384, -16384, 32767, -32768, 32767, -32768, 0])
    back = int16_to_float(q)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, q.astype(np.float64) * INT16_SCALE)
    # every int16 value survives int16 -> float32 -> int16 exactly (the teacher sees exactly the stored audio)
    every = np.arange(-32768, 32768, dtype=np.int16)
    np.testing.assert_array_equal(float_to_int16(int16_to_float(every)), every)


def test_decode_to_int16_matches_quantised_load_audio(tmp_path):
    sf.write(tmp_path / "x.wav", tone(44100, 1.0, channels=2), 44100)
    np.testing.assert_array_equal(decode_to_int16(tmp_path / "x.wav"), float_to_int16(load_audio(tmp_path / "x.wav")))
