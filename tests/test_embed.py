import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from culturemert.evaluate.encoders import LogMelEncoder, MertEncoder
from culturemert.evaluate.embed import (
    EmbedSettings,
    FeatureCache,
    TrackInput,
    chunk_bounds,
    embed_dataset,
    embed_tracks,
    default_batch_size,
    normalize_waveform,
    tracks_from_paths,
)
from culturemert.evaluate.features import load_probe_data
from culturemert.model import build_model

SR = 24_000


@dataclass
class _Item:
    id: str
    audio_path: Path | None
    split: str
    tags: list[str] = field(default_factory=list)


@dataclass
class _Dataset:
    name: str
    vocabulary: list[str]
    items: list[_Item]


class _CountingModel(torch.nn.Module):
    """Wraps the tiny model and counts forward calls (proves cache hits never touch the model)."""

    def __init__(self, seed=0):
        super().__init__()
        self.inner = build_model("tiny", with_heads=False, seed=seed)
        self.calls = 0
        self.num_layers, self.hidden_size, self.backbone = self.inner.num_layers, self.inner.hidden_size, self.inner.backbone

    def forward(self, wav, output_hidden_states=False):
        self.calls += 1
        return self.inner(wav, output_hidden_states=output_hidden_states)


def _extractor(seed=0):
    return MertEncoder(_CountingModel(seed), "tiny", device="cpu")


def _write(path: Path, seconds: float, seed: int = 0, channels: int = 1, sr: int = SR, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    data = (rng.normal(size=(int(seconds * sr), channels)) * scale).astype(np.float32)
    sf.write(path, data if channels > 1 else data[:, 0], sr, subtype="FLOAT")
    return path


S = EmbedSettings(window=1.0, batch_size=3, group_tracks=2, device="cpu", decode_workers=0)


def test_chunk_bounds_policy():
    assert chunk_bounds(25, 10, 1.0, None, 0.5) == [(0, 10), (10, 20), (20, 25)]  # 5/10 >= 0.5 kept
    assert chunk_bounds(24, 10, 1.0, None, 0.5) == [(0, 10), (10, 20)]  # 4/10 < 0.5 dropped
    assert chunk_bounds(7, 10, 1.0, None, 0.9) == [(0, 7)]  # shorter than a window: one chunk
    assert chunk_bounds(10, 10, 1.0) == [(0, 10)]
    assert chunk_bounds(30, 10, 1.0, None, 0.0) == [(0, 10), (10, 20), (20, 30)]
    assert chunk_bounds(123, 10, 0.0) == [(0, 123)]  # window 0: whole track
    assert chunk_bounds(22, 10, 1.0, 0.5, 0.5) == [(0, 10), (5, 15), (10, 20), (15, 22)]  # overlapping hop
    assert chunk_bounds(0, 10, 1.0) == []
    # 30 s of 24 kHz audio with MARBLE-v2-like 30 s windows, and 29.1 s MTT clips with 5 s windows
    assert chunk_bounds(30 * SR, SR, 30.0) == [(0, 30 * SR)]
    assert len(chunk_bounds(int(29.1 * SR), SR, 5.0, None, 0.5)) == 6
    assert len(chunk_bounds(int(29.1 * SR), SR, 5.0, None, 0.9)) == 5


def test_normalize_matches_transformers_feature_extractor():
    transformers = pytest.importorskip("transformers")
    x = (np.random.default_rng(0).normal(size=5000) * 0.3 + 0.1).astype(np.float32)
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True)
    ref = fe(x, sampling_rate=SR, return_tensors="np")["input_values"][0]
    np.testing.assert_allclose(normalize_waveform(x), ref, atol=1e-5)


def test_shapes_chunk_counts_and_values(tmp_path):
    paths = [_write(tmp_path / f"t{i}.wav", d, seed=i) for i, d in enumerate([0.5, 2.3, 2.6])]
    ex = _extractor()
    report = embed_tracks(ex, tracks_from_paths(paths), tmp_path / "cache", S, progress=False)
    assert report.errors == {} and report.computed == 3
    cache = FeatureCache(tmp_path / "cache", ex, S)
    shapes = [cache.load(report.keys[p.as_posix()]).shape for p in paths]
    assert shapes == [(1, 3, 32), (2, 3, 32), (3, 3, 32)]  # tiny: 2 layers + conv state; 0.3 s tail dropped
    # value check: chunk 1 of track 2 = mean over time of each hidden state of the normalised track's 2nd window
    wav = normalize_waveform(sf.read(paths[2], dtype="float32")[0])
    with torch.no_grad():
        out = ex.model.inner(torch.from_numpy(wav[SR : 2 * SR])[None], output_hidden_states=True)
    expected = torch.stack(out.hidden_states, 1).mean(2)[0].numpy()
    np.testing.assert_allclose(cache.load(report.keys[paths[2].as_posix()])[1], expected, atol=1e-5)


def test_default_batch_size_is_one_window_on_cpu_and_batching_does_not_change_features(tmp_path):
    paths = [_write(tmp_path / f"t{i}.wav", d, seed=i) for i, d in enumerate([2.3, 3.1, 1.0])]
    tracks = tracks_from_paths(paths)
    auto = S.model_copy(update={"batch_size": None})
    ex = _extractor()
    assert default_batch_size(ex) == 1
    one = embed_tracks(ex, tracks, tmp_path / "auto", auto, progress=False)
    assert ex.model.calls == 6  # 2 + 3 + 1 windows, one forward pass each
    ex_batched = _extractor()
    batched = embed_tracks(ex_batched, tracks, tmp_path / "b3", S, progress=False)
    assert ex_batched.model.calls < 6
    for p in paths:
        a = FeatureCache(tmp_path / "auto", ex, auto).load(one.keys[p.as_posix()])
        b = FeatureCache(tmp_path / "b3", ex_batched, S).load(batched.keys[p.as_posix()])
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_normalize_flag(tmp_path):
    raw = _write(tmp_path / "raw.wav", 1.5, seed=3, scale=0.05)
    x = sf.read(raw, dtype="float32")[0] + 0.02
    sf.write(raw, x, SR, subtype="FLOAT")
    pre = tmp_path / "pre.wav"
    sf.write(pre, normalize_waveform(x), SR, subtype="FLOAT")
    ex = _extractor()

    def feats(path, **kw):
        settings = S.model_copy(update=kw)
        rep = embed_tracks(ex, [TrackInput("x", path)], tmp_path / "cache", settings, progress=False)
        return FeatureCache(tmp_path / "cache", ex, settings).load(rep.keys["x"])

    on, off, pre_off = feats(raw, normalize=True), feats(raw, normalize=False), feats(pre, normalize=False)
    np.testing.assert_allclose(on, pre_off, atol=1e-5)  # normalise-on == feeding a normalised waveform
    assert np.abs(on - off).max() > 1e-3  # and the flag changes the features
    # MERT's GroupNorm nearly cancels gain, so show the scope on the log-mel baseline: a quiet first second and
    # a loud rest have equal log-mel levels only when each chunk is normalised on its own
    loud = tmp_path / "loud.wav"
    rng = np.random.default_rng(5)
    sf.write(loud, np.concatenate([rng.normal(size=SR) * 0.01, rng.normal(size=SR) * 0.5]).astype(np.float32), SR, subtype="FLOAT")
    lm = LogMelEncoder()

    def level(scope):
        settings = S.model_copy(update={"normalize_scope": scope})
        rep = embed_tracks(lm, [TrackInput("l", loud)], tmp_path / "cache", settings, progress=False)
        pooled = FeatureCache(tmp_path / "cache", lm, settings).load(rep.keys["l"])
        return pooled[:, 0, :128].mean(1)  # mean log-mel level per chunk

    assert abs(level("track")[1] - level("track")[0]) > 5.0  # ~34 dB apart in log-power
    assert abs(level("chunk")[1] - level("chunk")[0]) < 0.5


def test_cache_hit_does_not_call_model_and_key_tracks_settings_and_model(tmp_path):
    paths = [_write(tmp_path / f"t{i}.wav", 1.2, seed=i) for i in range(3)]
    ex = _extractor()
    first = embed_tracks(ex, tracks_from_paths(paths), tmp_path / "cache", S, progress=False)
    calls = ex.model.calls
    assert calls > 0 and first.computed == 3
    again = embed_tracks(ex, tracks_from_paths(paths), tmp_path / "cache", S, progress=False)
    assert ex.model.calls == calls and again.cached == 3 and again.computed == 0
    # batch size and device do not change the key; window, normalisation and the model do
    assert FeatureCache(tmp_path / "c2", ex, S.model_copy(update={"batch_size": 7})).key == first.cache_key
    assert FeatureCache(tmp_path / "c2", ex, S.model_copy(update={"window": 2.0})).key != first.cache_key
    assert FeatureCache(tmp_path / "c2", ex, S.model_copy(update={"normalize": False})).key != first.cache_key
    assert FeatureCache(tmp_path / "c2", _extractor(seed=1), S).key != first.cache_key
    # the audio key is the content: a renamed copy is a cache hit, an edited file is not
    (tmp_path / "copy.wav").write_bytes(paths[0].read_bytes())
    embed_tracks(ex, tracks_from_paths([tmp_path / "copy.wav"]), tmp_path / "cache", S, progress=False)
    assert ex.model.calls == calls
    _write(paths[0], 1.2, seed=42)
    edited = embed_tracks(ex, tracks_from_paths([paths[0]]), tmp_path / "cache", S, progress=False)
    assert edited.computed == 1 and ex.model.calls > calls


class _Killed(Exception):
    pass


def _dataset(tmp_path):
    durations = [1.0, 2.5, 0.7, 3.2, 1.9, 1.1, 2.2]
    items = [
        _Item(f"id{i}", _write(tmp_path / f"a{i}.wav", d, seed=10 + i), ["train", "valid", "test"][i % 3], ["x"] if i % 2 else ["y"])
        for i, d in enumerate(durations)
    ]
    return _Dataset("toy", ["x", "y"], items)


def test_resume_after_interruption_equals_clean_run(tmp_path):
    ds = _dataset(tmp_path)
    clean_ex = _extractor()
    clean_dir, _ = embed_dataset(clean_ex, ds, tmp_path / "clean" / "toy", S, progress=False)
    clean_calls = clean_ex.model.calls

    ex = _extractor()

    def kill_after_second_group(group_index):
        if group_index == 1:
            raise _Killed

    with pytest.raises(_Killed):
        embed_dataset(ex, ds, tmp_path / "resumed" / "toy", S, progress=False, on_group_done=kill_after_second_group)
    calls_before = ex.model.calls
    # leftovers of a kill: a torn index line and a stray temp file must not be trusted
    cache_dir = next((tmp_path / "resumed" / "cache").glob("*-*"))
    with open(cache_dir / "index.jsonl", "a") as fh:
        fh.write('{"audio_key": "trunc')
    (cache_dir / "tracks" / ".partial.npy.tmp").write_bytes(b"\x93NUMPY garbage")
    resumed_dir, rep = embed_dataset(ex, ds, tmp_path / "resumed" / "toy", S, progress=False)
    assert rep.cached == 4 and rep.computed == 3  # groups of 2: two groups were done before the kill
    assert 0 < ex.model.calls - calls_before < clean_calls  # only the unfinished groups were recomputed
    for name in ("features.npy", "chunk_track.npy", "labels.npy"):
        a, b = np.load(clean_dir / name), np.load(resumed_dir / name)
        assert a.shape == b.shape and np.array_equal(a, b), name  # bit-identical
    data, meta = load_probe_data(resumed_dir)
    assert meta["dataset"] == "toy" and meta["num_layers"] == 3
    assert data.train.num_tracks == 3 and data.valid.num_tracks == 2 and data.test.num_tracks == 2
    assert data.train.labels[:, 1].tolist() == [1.0, 0.0, 1.0]  # ids 0, 3, 6 -> tags y, x, y


def test_hostile_inputs_are_reported_and_the_run_completes(tmp_path):
    good = _write(tmp_path / "good one é.wav", 1.0)
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(SR, np.float32), SR)
    multi = _write(tmp_path / "eight.wav", 1.0, channels=8, sr=8000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, np.zeros(100, np.float32), SR)
    truncated = tmp_path / "truncated.flac"
    sf.write(truncated, np.random.default_rng(0).normal(size=SR).astype(np.float32) * 0.1, SR)
    truncated.write_bytes(truncated.read_bytes()[:300])
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    tracks = [TrackInput(p.name, p) for p in (good, silence, multi, empty, text, nan, tiny, truncated, loop)]
    tracks.append(TrackInput("missing", tmp_path / "missing.wav"))
    tracks.append(TrackInput("no-path", None))
    rep = embed_tracks(_extractor(), tracks, tmp_path / "cache", S, progress=False)
    assert set(rep.keys) == {good.name, "silence.wav", "eight.wav"}
    assert set(rep.errors) == {"empty.wav", "notes.mp3", "nan.wav", "tiny.wav", "truncated.flac", "loop.wav", "missing", "no-path"}
    assert "empty" in rep.errors["empty.wav"] and "non-finite" in rep.errors["nan.wav"]
    assert "symlink loop" in rep.errors["loop.wav"] and "not found" in rep.errors["missing"]
    assert "400" in rep.errors["tiny.wav"]


def test_logmel_baseline_and_frames(tmp_path):
    t = np.arange(int(1.5 * SR)) / SR
    path = tmp_path / "sine.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32), SR, subtype="FLOAT")
    ex = LogMelEncoder()
    settings = S.model_copy(update={"frames": True})
    rep = embed_tracks(ex, [TrackInput("s", path)], tmp_path / "cache", settings, progress=False)
    cache = FeatureCache(tmp_path / "cache", ex, settings)
    pooled = cache.load(rep.keys["s"])
    assert pooled.shape == (2, 1, 256)
    mel_mean = pooled[0, 0, :128]
    centres = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 12000 / 700), 130)[1:-1] / 2595) - 1)
    assert abs(centres[int(mel_mean.argmax())] - 3000) < 150  # the sine's mel bin dominates
    frames = np.load(cache.track_path(rep.keys["s"], frames=True))
    assert frames.dtype == np.float16 and frames.shape[0] == 1 and frames.shape[2] == 128
    np.testing.assert_allclose(frames[0, :101].astype(np.float32).mean(0), mel_mean, rtol=2e-3, atol=2e-2)


def test_embed_cli_on_a_folder(tmp_path):
    from culturemert.cli import main

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(2):
        _write(audio / f"x{i}.wav", 1.3, seed=i)
    (audio / "readme.txt").write_text("not audio, not listed")
    out = tmp_path / "out"
    assert main(["embed", "baseline:logmel", str(audio), "--out", str(out), "--window", "1", "--no-progress"]) == 0
    meta = json.loads((out / "files" / "meta.json").read_text())
    assert [t["id"] for t in meta["tracks"]] == ["x0.wav", "x1.wav"] and meta["num_chunks"] == 2
    assert np.load(out / "files" / "features.npy").shape == (2, 1, 256)
