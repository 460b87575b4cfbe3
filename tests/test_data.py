"""Manifests, prepare (hostile inputs, alignment, resume) and the mixture crop loader of culturemert.data."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from culturemert.train.recipe import RECIPES_DIR
from culturemert.audio import float_to_int16, load_audio
from culturemert.label_grid import HOP_LENGTH
from culturemert.data import (
    PAD_CODE,
    MixtureLoader,
    MixtureSpec,
    PreparedDataset,
    mixture_weights,
    prepare,
    read_manifest,
    torch_loader,
)
from culturemert.errors import ConfigError, DataError

SR = 24000
REPO = Path(__file__).resolve().parents[1]


class FrameTeacher:
    """A frame-local stand-in for EnCodec: code of frame k depends only on samples [320k, 320k+320).

    Zero padding does not change a frame's sum, so whole-file, chunked and cropped encodings agree exactly.
    """

    name = "frame-test"
    n_codebooks = 2
    codebook_size = 64
    frame_rate = 75.0
    sample_rate = SR

    def encode(self, wav):
        wav = np.asarray(wav, dtype=np.float32)
        B, L = wav.shape
        T = -(-L // HOP_LENGTH)
        padded = np.zeros((B, T * HOP_LENGTH), np.int64)
        padded[:, :L] = np.rint(wav * 32768).astype(np.int64)
        sums = padded.reshape(B, T, HOP_LENGTH).sum(axis=2)
        return np.stack([(sums // 7) % 64, (sums // 3 + 5) % 64], axis=1).astype(np.int16)

    def state(self):
        return {"kind": "frame-test"}


class NeighbourTeacher(FrameTeacher):
    """Frame k's code depends on samples of frames k-2..k+2 (zeros beyond the clip), like an analysis window."""

    name = "neighbour-test"

    def encode(self, wav):
        wav = np.asarray(wav, dtype=np.float32)
        B, L = wav.shape
        T = -(-L // HOP_LENGTH)
        padded = np.zeros((B, (T + 4) * HOP_LENGTH), np.int64)
        padded[:, 2 * HOP_LENGTH : 2 * HOP_LENGTH + L] = np.rint(wav * 32768).astype(np.int64)
        sums = padded.reshape(B, T + 4, HOP_LENGTH).sum(axis=2)
        mixed = sum(sums[:, k : k + T] * (k + 1) for k in range(5))
        return np.stack([(mixed // 7) % 64, (mixed // 3) % 64], axis=1).astype(np.int16)


class ConstantTeacher(FrameTeacher):
    name = "collapsed"

    def encode(self, wav):
        return np.zeros_like(super().encode(wav))


class FitTeacher(FrameTeacher):
    """k-means-shaped: must be fitted, saved and reloaded; its codes depend on the fitted offset."""

    name = "fit-test"

    def __init__(self, offset=None):
        self.offset = offset
        self.fit_calls = 0

    @property
    def is_fitted(self):
        return self.offset is not None

    def fit(self, waveforms, n_frames_max, seed):
        total = sum(float(np.abs(w).sum()) for w in waveforms)
        self.offset = int(total * 1000) % 61 + 1
        self.fit_calls += 1

    def encode(self, wav):
        return ((super().encode(wav).astype(np.int64) + self.offset) % 64).astype(np.int16)

    def state(self):
        if self.offset is None:
            raise RuntimeError("not fitted")
        return {"offset": self.offset}

    def save(self, path):
        Path(path).write_text(json.dumps({"offset": self.offset}))

    @classmethod
    def load(cls, path):
        return cls(json.loads(Path(path).read_text())["offset"])


def music(seconds: float, sr: int = SR, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * (220 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    lines = ["path,culture,split"] + [f"{r['path']},{r['culture']},{r.get('split', 'train')}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def small_corpus(root: Path) -> Path:
    """Good files of two cultures plus every kind of hostile input; returns the manifest path."""
    audio = root / "audio dir ü"
    audio.mkdir(parents=True)
    good = [
        ("turk 1.flac", "turkish", music(7.0, 44100, 1, channels=2), 44100, {"format": "FLAC"}),
        ("turk_2.wav", "turkish", music(6.0, 8000, 2), 8000, {}),
        ("中文.ogg", "chinese", music(6.5, 48000, 3), 48000, {"format": "OGG", "subtype": "VORBIS"}),
        ("cn2.wav", "chinese", music(5.2, 192000, 4, channels=8), 192000, {}),
        ("west.mp3", "western", music(6.0, 44100, 5), 44100, {"format": "MP3"}),
        ("clipped.wav", "western", np.clip(music(5.5, SR, 6) * 8, -1, 1), SR, {}),
    ]
    for name, _, x, sr, kw in good:
        sf.write(audio / name, x, sr, **kw)
    (audio / "zero.wav").write_bytes(b"")
    (audio / "text.wav").write_text("definitely not audio\n" * 40)
    sf.write(audio / "short.wav", music(1.0), SR)
    sf.write(audio / "silence.wav", np.zeros(4 * SR, np.float32), SR)
    nan = music(4.0)
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(audio / "full.flac", music(4.0, 44100, 7), 44100, format="FLAC")
    data = (audio / "full.flac").read_bytes()
    (audio / "truncated.flac").write_bytes(data[: len(data) // 3])
    (audio / "full.flac").unlink()
    sf.write(audio / "flac_named.mp3", music(4.0, SR, 8), SR, format="FLAC")
    (audio / "loop_a.wav").symlink_to(audio / "loop_b.wav")
    (audio / "loop_b.wav").symlink_to(audio / "loop_a.wav")
    rows = [{"path": f"audio dir ü/{name}", "culture": culture} for name, culture, *_ in good]
    rows += [
        {"path": f"audio dir ü/{n}", "culture": "turkish"}
        for n in ("zero.wav", "text.wav", "short.wav", "silence.wav", "nan.wav", "truncated.flac",
                  "missing.wav", "loop_a.wav", "flac_named.mp3")
    ]
    return write_manifest(root / "manifest.csv", rows)


# ------------------------------------------------------------------------------------------------ manifests


def test_manifest_formats_and_relative_paths(tmp_path):
    sub = tmp_path / "m"
    sub.mkdir()
    (sub / "a.csv").write_text("path,culture,split,weight\nx y/ä.wav,turkish,valid,2.5\n/abs/b.flac,greek,,\n")
    (sub / "a.tsv").write_text("culture\tpath\nturkish\tx y/ä.wav\n")
    (sub / "a.jsonl").write_text('{"path": "x y/ä.wav", "culture": "turkish", "weight": 0}\n\n')
    csv_rows = read_manifest(sub / "a.csv")
    assert csv_rows[0].path == str(sub / "x y" / "ä.wav") and csv_rows[0].split == "valid"
    assert csv_rows[0].weight == 2.5 and csv_rows[0].line == 2
    assert csv_rows[1].path == "/abs/b.flac" and csv_rows[1].split == "train" and csv_rows[1].weight == 1.0
    assert read_manifest(sub / "a.tsv")[0].path == csv_rows[0].path
    jsonl = read_manifest(sub / "a.jsonl")[0]
    assert jsonl.path == csv_rows[0].path and jsonl.weight == 0.0


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.csv", "path,label\na.wav,x\n", r"line 1: header lacks required column\(s\) 'culture'"),
        ("m.csv", "path,culture\na.wav,x\nb.wav,\n", r"line 3: empty value in column 'culture'"),
        ("m.csv", "path,culture,weight\na.wav,x,heavy\n", r"line 2: column 'weight' is not a number"),
        ("m.csv", "path,culture,weight\na.wav,x,-1\n", r"line 2: column 'weight' must be finite and >= 0"),
        ("m.tsv", "path\tculture\na.wav\tx\textra\n", r"line 2: 3 fields but the header has 2"),
        ("m.jsonl", '{"path": "a.wav", "culture": "x"}\n{"path": "b.wav"\n', r"line 2: invalid JSON"),
        ("m.jsonl", '{"path": "a.wav"}\n', r"line 1: missing key 'culture'"),
        ("m.txt", "path,culture\n", r"unknown manifest type '\.txt'"),
        ("m.csv", "path,culture\n", r"no entries"),
    ],
)
def test_manifest_errors_name_line_and_column(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(tmp_path / name)


# ------------------------------------------------------------------------------------------------ prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = small_corpus(root)
    summary = prepare(manifest, root / "out", FrameTeacher(), shard_seconds=12, progress=False)
    return root, manifest, summary


def test_prepare_reports_each_hostile_file_and_keeps_the_good_ones(prepared):
    root, _, summary = prepared
    reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
    assert "empty file" in reasons["zero.wav"]
    assert "not a readable audio file" in reasons["text.wav"]
    assert "too short (1.00 s < 3 s)" == reasons["short.wav"]
    assert "silent" in reasons["silence.wav"]
    assert "non-finite" in reasons["nan.wav"]
    assert "file not found" in reasons["missing.wav"]
    assert "symlink loop" in reasons["loop_a.wav"]
    kept = {Path(it["path"]).name for it in PreparedDataset(root / "out").items}
    assert kept >= {"turk 1.flac", "turk_2.wav", "中文.ogg", "cn2.wav", "west.mp3", "clipped.wav", "flac_named.mp3"}
    # truncated FLAC: either skipped with a reason or kept with a truncation warning, never silently
    warned = {Path(w["path"]).name: w["warning"] for w in summary.warnings}
    assert "truncated.flac" in reasons or "truncated" in warned.get("truncated.flac", "")
    assert "clipping" in warned["clipped.wav"]
    assert len(kept) + len(reasons) == 15
    info = json.loads((root / "out" / "prepare.json").read_text())
    assert info["n_skipped"] == len(reasons) and info["teacher"]["state"] == {"kind": "frame-test"}
    assert info["hours_per_culture"]["chinese"] == pytest.approx((6.5 + 5.2) / 3600, rel=1e-3)
    assert "zero.wav" in summary.format_table()


def test_prepared_audio_and_codes_match_direct_decoding_and_teacher(prepared):
    root, manifest, _ = prepared
    ds = PreparedDataset(root / "out")
    teacher = FrameTeacher()
    assert len({int(s) for s in ds.shard}) >= 2  # shard_seconds=12 spreads the corpus over several shards
    for i, item in enumerate(ds.items):
        audio = ds.audio(i)
        expected = float_to_int16(load_audio(manifest.parent / item["path"]))
        np.testing.assert_array_equal(audio, expected)
        assert item["n_frames"] == -(-item["length"] // 320) == ds.codes(i).shape[1]
        direct = teacher.encode(audio[None].astype(np.float32) / 32768)[0]
        np.testing.assert_array_equal(ds.codes(i), direct)
    index_csv = (root / "out" / "index.csv").read_text(encoding="utf-8").splitlines()
    assert len(index_csv) == len(ds) + 1 and "中文.ogg" in "".join(index_csv)


@pytest.mark.parametrize(("context", "exact"), [(0.1, True), (0.0, False)])
def test_long_items_are_tokenised_in_chunks_with_whole_item_codes(tmp_path, context, exact):
    sf.write(tmp_path / "long.wav", music(9.3), SR)
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "long.wav", "culture": "x"}])
    prepare(
        manifest, tmp_path / "out", NeighbourTeacher(), teacher_chunk_seconds=2.0, teacher_context_seconds=context,
        teacher_batch_size=3, progress=False,
    )
    ds = PreparedDataset(tmp_path / "out")
    direct = NeighbourTeacher().encode(ds.audio(0)[None].astype(np.float32) / 32768)[0]
    assert ds.codes(0).shape == direct.shape
    # with context the chunk seams are invisible; without it the frames next to each seam differ
    assert np.array_equal(ds.codes(0), direct) == exact


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_after_interruption_is_byte_identical(tmp_path):
    manifest = small_corpus(tmp_path)
    prepare(manifest, tmp_path / "clean", FrameTeacher(), shard_seconds=12, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare(manifest, tmp_path / "resumed", FrameTeacher(), shard_seconds=12, progress=False, _stop_after_shards=1)
    assert not (tmp_path / "resumed" / "index.json").exists()
    first_shard = (tmp_path / "resumed" / "shards" / "audio-00000.npy").stat().st_mtime_ns
    summary = prepare(manifest, tmp_path / "resumed", FrameTeacher(), shard_seconds=12, progress=False)
    assert summary.shards_reused == 1
    assert (tmp_path / "resumed" / "shards" / "audio-00000.npy").stat().st_mtime_ns == first_shard
    assert _tree(tmp_path / "clean") == _tree(tmp_path / "resumed")


def test_resume_with_other_settings_is_refused(prepared):
    root, manifest, _ = prepared
    with pytest.raises(DataError, match="different manifest or settings"):
        prepare(manifest, root / "out", FrameTeacher(), shard_seconds=12, min_seconds=4.0, progress=False)


def test_sigkill_mid_run_then_resume_equals_clean_run(tmp_path):
    rows = []
    for k in range(4):
        sf.write(tmp_path / f"f{k}.wav", music(4.0, SR, k), SR)
        rows.append({"path": f"f{k}.wav", "culture": "x"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    prepare(manifest, tmp_path / "clean", FrameTeacher(), shard_seconds=4, progress=False)
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from test_data import FrameTeacher
        from culturemert.data import prepare
        class Slow(FrameTeacher):
            def encode(self, wav):
                time.sleep(0.4)
                return super().encode(wav)
        prepare({str(manifest)!r}, {str(tmp_path / 'killed')!r}, Slow(), shard_seconds=4, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    codes0 = tmp_path / "killed" / "shards" / "codes-00000.npy"
    deadline = time.time() + 60
    while not codes0.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert codes0.exists() and not (tmp_path / "killed" / "index.json").exists()
    prepare(manifest, tmp_path / "killed", FrameTeacher(), shard_seconds=4, workers=2, progress=False)
    assert _tree(tmp_path / "clean") == _tree(tmp_path / "killed")


def test_unfitted_teacher_is_fitted_saved_and_reused_on_resume(tmp_path):
    rows = []
    for k in range(3):
        sf.write(tmp_path / f"f{k}.wav", music(5.0, SR, k), SR)
        rows.append({"path": f"f{k}.wav", "culture": "x"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    teacher = FitTeacher()
    prepare(manifest, tmp_path / "a", teacher, shard_seconds=5, kmeans_fit_seconds=4, progress=False)
    assert teacher.fit_calls == 1 and (tmp_path / "a" / "teacher" / "kmeans.safetensors").is_file()
    saved = FitTeacher.load(tmp_path / "a" / "teacher" / "kmeans.safetensors")
    assert saved.offset == teacher.offset
    assert json.loads((tmp_path / "a" / "prepare.json").read_text())["teacher"]["state"] == {"offset": teacher.offset}
    # a fresh unfitted teacher on the same directory reloads the saved fit instead of refitting
    (tmp_path / "a" / "index.json").unlink()
    for codes in (tmp_path / "a" / "shards").glob("codes-*.npy"):
        codes.unlink()
    again = FitTeacher()
    prepare(manifest, tmp_path / "a", again, shard_seconds=5, kmeans_fit_seconds=4, progress=False)
    assert again.fit_calls == 0
    ds = PreparedDataset(tmp_path / "a")
    np.testing.assert_array_equal(ds.codes(0), saved.encode(ds.audio(0)[None].astype(np.float32) / 32768)[0])


def test_kmeans_fit_log_states_the_audio_actually_used_not_the_budget(tmp_path, caplog):
    # one window of at most 30 s per training file: 3 files of 4 s give 12 s, far below a 3600-s budget
    rows = []
    for k in range(3):
        sf.write(tmp_path / f"f{k}.wav", music(4.0, SR, k), SR)
        rows.append({"path": f"f{k}.wav", "culture": "x"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with caplog.at_level(logging.INFO, logger="culturemert.data.prepare"):
        prepare(manifest, tmp_path / "a", FitTeacher(), kmeans_fit_seconds=3600, progress=False)
    fit_lines = [r.getMessage() for r in caplog.records if "fitting" in r.getMessage()]
    assert len(fit_lines) == 1 and "12.0 s" in fit_lines[0] and "3 file(s)" in fit_lines[0], fit_lines
    assert "up to 3600" not in fit_lines[0] and "not reached" in fit_lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="culturemert.data.prepare"):
        prepare(manifest, tmp_path / "b", FitTeacher(), kmeans_fit_seconds=6, progress=False)
    (line,) = [r.getMessage() for r in caplog.records if "fitting" in r.getMessage()]
    assert "6.0 s" in line and "2 file(s)" in line and "budget 6 s reached" in line, line


def test_collapsed_teacher_fails_loudly_and_writes_no_index(tmp_path):
    sf.write(tmp_path / "a.wav", music(15.0), SR)  # 1125 frames: above the guard's minimum
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.wav", "culture": "x"}])
    with pytest.raises(DataError, match="collapsed"):
        prepare(manifest, tmp_path / "out", ConstantTeacher(), progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def test_all_files_bad_is_a_clear_error(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.wav", "culture": "x"}])
    with pytest.raises(DataError, match="no usable audio"):
        prepare(manifest, tmp_path / "out", FrameTeacher(), progress=False)


# ------------------------------------------------------------------------------------------------ loader


def test_crops_are_grid_aligned_and_codes_match_the_teacher_on_the_crop(prepared):
    root, _, _ = prepared
    loader = MixtureLoader(root / "out", batch_size=16, crop_samples=3 * SR, seed=3)
    teacher = FrameTeacher()
    for step in range(3):
        batch = loader.batch(step)
        plan = loader.plan(step)
        assert batch["wav"].shape == (16, 72000) and batch["wav"].dtype == np.float32
        assert batch["codes"].shape == (16, 2, 225) and batch["codes"].dtype == np.int64
        assert (plan.start % HOP_LENGTH == 0).all()
        np.testing.assert_array_equal(batch["codes"], teacher.encode(batch["wav"]).astype(np.int64))
        ds = loader.datasets[0]
        for b in range(16):
            i, s = int(plan.item[b]), int(plan.start[b])
            np.testing.assert_array_equal(batch["wav"][b], ds.audio(i)[s : s + 72000] / np.float32(32768))
            assert batch["culture"][b] == ds.items[i]["culture"]


def test_batches_are_a_pure_function_of_seed_rank_and_step(prepared):
    root, _, _ = prepared
    a = MixtureLoader(root / "out", batch_size=8, crop_samples=3 * SR, seed=11)
    b = MixtureLoader(root / "out", batch_size=8, crop_samples=3 * SR, seed=11)
    late = b.batch(57)  # no need to iterate 0..56 first
    for step in range(3):
        a.batch(step)
    np.testing.assert_array_equal(a.batch(57)["wav"], late["wav"])
    np.testing.assert_array_equal(a.batch(57)["codes"], late["codes"])
    other_seed = MixtureLoader(root / "out", batch_size=8, crop_samples=3 * SR, seed=12).plan(57)
    other_rank = MixtureLoader(root / "out", batch_size=8, crop_samples=3 * SR, seed=11, rank=1).plan(57)
    assert not np.array_equal(other_seed.start, a.plan(57).start)
    assert not np.array_equal(other_rank.start, a.plan(57).start)
    resumed = list(a.iterate(start_step=5, num_steps=2))
    np.testing.assert_array_equal(resumed[0]["wav"], b.batch(5)["wav"])
    assert a.state_dict(5) == {"seed": 11, "rank": 0, "step": 5}


def test_mixture_and_replay_fractions_match_the_spec(prepared):
    root, _, _ = prepared
    spec = MixtureSpec(sources={"turkish": 3, "chinese": 1}, replay={"western": 0.2})
    loader = MixtureLoader(root / "out", spec, batch_size=64, crop_samples=3 * SR, seed=0)
    assert loader.culture_probabilities == pytest.approx({"turkish": 0.6, "chinese": 0.2, "western": 0.2})
    counts: dict[str, int] = {}
    n_batches = 150
    for step in range(n_batches):
        for culture in loader.plan(step).culture:
            counts[culture] = counts.get(culture, 0) + 1
    n = 64 * n_batches
    for culture, p in loader.culture_probabilities.items():
        sd = np.sqrt(p * (1 - p) / n)
        assert abs(counts[culture] / n - p) < 4 * sd, (culture, counts[culture] / n, p)


def test_within_a_culture_every_second_is_equally_likely(prepared):
    root, _, _ = prepared
    loader = MixtureLoader(root / "out", MixtureSpec(sources={"turkish": 1}), batch_size=64, crop_samples=3 * SR)
    ds = loader.datasets[0]
    items = [i for i, it in enumerate(ds.items) if it["culture"] == "turkish"]
    positions = {i: (ds.length[i] - 3 * SR) // HOP_LENGTH + 1 for i in items}
    total = sum(positions.values())
    counts = {i: 0 for i in items}
    for step in range(100):
        for i in loader.plan(step).item:
            counts[int(i)] += 1
    n = 6400
    for i in items:
        p = positions[i] / total
        assert abs(counts[i] / n - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_short_items_skip_or_pad(prepared):
    root, _, _ = prepared
    crop = 6 * SR  # longer than several items
    ds = PreparedDataset(root / "out")
    skip = MixtureLoader(ds, batch_size=32, crop_samples=crop, seed=1)
    assert all(ds.length[i] >= crop for step in range(5) for i in skip.plan(step).item)
    pad = MixtureLoader(ds, batch_size=64, crop_samples=crop, seed=1, short_items="pad")
    batch, plan = pad.batch(0), pad.plan(0)
    short = [b for b in range(64) if ds.length[plan.item[b]] < crop]
    assert short, "expected some short items to be drawn"
    for b in short:
        n = int(ds.length[plan.item[b]])
        assert batch["length"][b] == n and (batch["wav"][b, n:] == 0).all()
        valid = -(-n // HOP_LENGTH)
        assert (batch["codes"][b, :, valid:] == PAD_CODE).all() and (batch["codes"][b, :, :valid] >= 0).all()


def test_mixture_spec_validation():
    with pytest.raises(ValueError, match="replay: fractions sum to 1"):
        MixtureSpec(sources={"a": 1}, replay={"w": 0.6, "v": 0.4})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        MixtureSpec(sources={"a": -1})
    with pytest.raises(ValueError, match="Extra inputs"):
        MixtureSpec(sources={"a": 1}, replay_fraction=0.2)
    with pytest.raises(ConfigError, match=r"culture\(s\) \['greek'\] not in the prepared data"):
        MixtureSpec(sources={"greek": 1}).probabilities({"turkish": 1.0})
    assert mixture_weights({"a": 9.0, "b": 1.0}, "temperature", 2.0) == pytest.approx({"a": 0.75, "b": 0.25})
    assert mixture_weights({"a": 9.0, "b": 1.0}, "uniform") == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_yields_the_same_batches_in_order(prepared, workers):
    root, _, _ = prepared
    loader = MixtureLoader(root / "out", batch_size=4, crop_samples=3 * SR, seed=5)
    got = list(torch_loader(loader, start_step=10, num_steps=4, num_workers=workers, prefetch_factor=2))
    assert [b["step"] for b in got] == [10, 11, 12, 13]
    for b in got:
        np.testing.assert_array_equal(b["wav"].numpy(), loader.batch(b["step"])["wav"])
        np.testing.assert_array_equal(b["codes"].numpy(), loader.batch(b["step"])["codes"])


def test_real_kmeans_teacher_end_to_end_and_resume(tmp_path):
    teachers = pytest.importorskip("culturemert.teachers")
    if not hasattr(teachers, "KMeansTeacher"):
        pytest.skip("culturemert.teachers.KMeansTeacher not available yet")
    rows = []
    for k in range(3):
        sf.write(tmp_path / f"f{k}.flac", music(6.0, 44100, k), 44100, format="FLAC")
        rows.append({"path": f"f{k}.flac", "culture": "x"})
    manifest = write_manifest(tmp_path / "m.csv", rows)

    def make():
        return teachers.build_teacher("kmeans", n_clusters=16, n_codebooks=2, n_mels=16, n_fft=512)

    prepare(manifest, tmp_path / "clean", make(), shard_seconds=6, kmeans_fit_seconds=12, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare(manifest, tmp_path / "resumed", make(), shard_seconds=6, kmeans_fit_seconds=12, progress=False,
                _stop_after_shards=2)
    prepare(manifest, tmp_path / "resumed", make(), shard_seconds=6, kmeans_fit_seconds=12, progress=False)
    assert _tree(tmp_path / "clean") == _tree(tmp_path / "resumed")
    fitted = teachers.KMeansTeacher.load(tmp_path / "clean" / "teacher" / "kmeans.safetensors")
    ds = PreparedDataset(tmp_path / "clean")
    assert ds.n_codebooks == 2 and ds.codebook_size == 16
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.codes(i), fitted.encode(ds.audio(i)[None] / np.float32(32768))[0])


def test_cli_prepare_kmeans_prints_summary_and_bad_manifest_exits_2(tmp_path, capsys):
    teachers = pytest.importorskip("culturemert.teachers")
    if not hasattr(teachers, "KMeansTeacher"):
        pytest.skip("culturemert.teachers.KMeansTeacher not available yet")
    from culturemert.cli import main

    for k in range(2):
        sf.write(tmp_path / f"f{k}.wav", music(5.0, 44100, k), 44100)
    (tmp_path / "bad.wav").write_text("not audio")
    manifest = write_manifest(
        tmp_path / "m.csv", [{"path": f"f{k}.wav", "culture": "x"} for k in range(2)] + [{"path": "bad.wav", "culture": "x"}]
    )
    code = main(["prepare", str(manifest), "--out", str(tmp_path / "out"), "--teacher", "kmeans",
                 "--kmeans-clusters", "8", "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "bad.wav: not a readable audio file" in out and "total" in out
    assert PreparedDataset(tmp_path / "out").codebook_size == 8
    (tmp_path / "broken.csv").write_text("path\nf0.wav\n")
    assert main(["prepare", str(tmp_path / "broken.csv"), "--out", str(tmp_path / "o2"), "--teacher", "kmeans"]) == 2
    assert "lacks required column(s) 'culture'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ one teacher per training set
def _culture_manifest(root: Path, culture: str, base_freq: float) -> Path:
    rows = []
    for k in range(2):
        t = np.arange(5 * SR) / SR
        x = 0.3 * np.sin(2 * np.pi * base_freq * (k + 1) * t) + 0.02 * np.random.default_rng(k).standard_normal(t.size)
        sf.write(root / f"{culture}{k}.wav", x.astype(np.float32), SR)
        rows.append({"path": f"{culture}{k}.wav", "culture": culture})
    return write_manifest(root / f"{culture}.csv", rows)


def test_prepared_dirs_record_their_teacher_and_dirs_of_different_teachers_are_refused(tmp_path):
    from culturemert.cli import main
    from culturemert.data.loader import check_same_teacher
    from culturemert.teachers import KMeansTeacher, teacher_fingerprint
    from culturemert.train import check_recipe_paths, load_recipe

    west, makam = _culture_manifest(tmp_path, "western", 220.0), _culture_manifest(tmp_path, "makam", 330.0)
    kmeans = ["--teacher", "kmeans", "--kmeans-clusters", "8", "--workers", "0", "--no-progress"]
    assert main(["prepare", str(west), "--out", str(tmp_path / "w"), *kmeans]) == 0
    assert main(["prepare", str(makam), "--out", str(tmp_path / "m"), *kmeans]) == 0  # fits its own codebook
    # the documented workflow: reuse the teacher fitted for the first directory
    assert main(["prepare", str(makam), "--out", str(tmp_path / "m2"), *kmeans, "--teacher-model", str(tmp_path / "w")]) == 0

    fitted = {d: KMeansTeacher.load(tmp_path / d / "teacher" / "kmeans.safetensors") for d in ("w", "m")}
    for d in ("w", "m", "m2"):
        index = json.loads((tmp_path / d / "index.json").read_text())
        info = json.loads((tmp_path / d / "prepare.json").read_text())
        source = fitted["m" if d == "m" else "w"]
        assert index["teacher"]["fingerprint"] == info["teacher"]["fingerprint"] == teacher_fingerprint(source)
    assert fitted["w"].fingerprint() != fitted["m"].fingerprint()
    assert not (tmp_path / "m2" / "teacher").exists()  # nothing refitted

    spec = MixtureSpec(sources={"makam": 1.0, "western": 1.0})
    with pytest.raises(DataError, match=r"different teachers") as err:
        MixtureLoader([tmp_path / "w", tmp_path / "m"], spec, batch_size=2, crop_samples=24_000)
    message = str(err.value)
    assert str(tmp_path / "w") in message and str(tmp_path / "m") in message and "\n" not in message
    assert fitted["w"].fingerprint()[:12] in message and fitted["m"].fingerprint()[:12] in message
    recipe = load_recipe(RECIPES_DIR / "tiny-test.yaml", [f"data.dirs=[{tmp_path / 'w'}, {tmp_path / 'm'}]"])
    with pytest.raises(DataError, match="different teachers"):
        check_recipe_paths(recipe)
    loader = MixtureLoader([tmp_path / "w", tmp_path / "m2"], spec, batch_size=2, crop_samples=24_000)
    assert loader.batch(0)["codes"].shape == (2, 1, 75)

    # a directory prepared before fingerprints were recorded cannot be combined (it is fine alone)
    index = json.loads((tmp_path / "m2" / "index.json").read_text())
    del index["teacher"]["fingerprint"]
    (tmp_path / "m2" / "index.json").write_text(json.dumps(index))
    assert len(check_same_teacher([tmp_path / "m2"])) == 1
    with pytest.raises(DataError, match="no teacher fingerprint"):
        check_same_teacher([tmp_path / "w", tmp_path / "m2"])


# ------------------------------------------------------------------------- index.json vs the files it describes
def _edit_index(out: Path, edit) -> None:
    index = json.loads((out / "index.json").read_text())
    edit(index)
    (out / "index.json").write_text(json.dumps(index))


def _first_item_of_shard(index: dict, k: int) -> dict:
    return next(it for it in index["items"] if it["shard"] == k)


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


CORRUPTIONS = {
    "codes shorter than the index": (
        lambda out: _save(out / "shards/codes-00000.npy", np.load(out / "shards/codes-00000.npy")[:, :-3]),
        "codes-00000.npy: int16 (2,",
    ),
    "audio stored as float32": (
        lambda out: _save(out / "shards/audio-00000.npy", np.load(out / "shards/audio-00000.npy").astype(np.float32)),
        "audio-00000.npy: float32",
    ),
    "truncated audio file": (
        lambda out: (out / "shards/audio-00001.npy").write_bytes((out / "shards/audio-00001.npy").read_bytes()[:-1000]),
        "truncated",
    ),
    "missing codes file": (lambda out: (out / "shards/codes-00001.npy").unlink(), "codes-00001.npy: missing"),
    "extra shard file": (
        lambda out: shutil.copy(out / "shards/audio-00000.npy", out / "shards/audio-00099.npy"),
        "shards/ holds shards/audio-00099.npy, which index.json does not list",
    ),
    "item n_frames is not ceil(length / 320)": (
        lambda out: _edit_index(out, lambda ix: _first_item_of_shard(ix, 0).update(n_frames=_first_item_of_shard(ix, 0)["n_frames"] - 1)),
        "n_frames is not ceil(length / 320)",
    ),
    "item beyond its shard": (
        lambda out: _edit_index(out, lambda ix: _first_item_of_shard(ix, 0).update(offset=10**9)),
        "audio outside its shard",
    ),
    "shard size in the index differs from its items": (
        lambda out: _edit_index(out, lambda ix: ix["shards"][0].update(n_samples=ix["shards"][0]["n_samples"] + 320)),
        "shard 0 lists",
    ),
    "items overlap": (
        lambda out: _edit_index(out, lambda ix: [it.update(offset=0, frame_offset=0) for it in ix["items"] if it["shard"] == 0]),
        "shard 0",
    ),
    "shard path outside the directory": (
        lambda out: _edit_index(out, lambda ix: ix["shards"][0].update(audio="../elsewhere/audio-00000.npy")),
        "is not inside",
    ),
    "index without items": (lambda out: _edit_index(out, lambda ix: ix.pop("items")), "malformed"),
    "index not JSON": (lambda out: (out / "index.json").write_text("{not json"), "unreadable"),
    "another sample rate": (lambda out: _edit_index(out, lambda ix: ix.update(sample_rate=16000)), "sample_rate 16000"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_prepared_reader_refuses_an_index_that_disagrees_with_its_files(prepared, tmp_path, case):
    root, _, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    assert len(PreparedDataset(out)) > 0
    corrupt, message = CORRUPTIONS[case]
    corrupt(out)
    with pytest.raises(DataError) as err:
        PreparedDataset(out)  # refused when opened, before any batch is drawn
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_prepared_reader_ignores_leftover_temp_files(prepared, tmp_path):
    root, _, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (out / "shards" / ".codes-00000.npy.abc.tmp").write_bytes(b"partial")
    assert len(PreparedDataset(out)) == len(PreparedDataset(root / "out"))


def test_a_saved_kmeans_teacher_with_other_settings_is_refused_not_reused(tmp_path):
    from culturemert.teachers import build_teacher

    manifest = _culture_manifest(tmp_path, "x", 220.0)
    prepare(manifest, tmp_path / "out", build_teacher("kmeans", n_clusters=8, n_mels=16), progress=False)
    (tmp_path / "out" / "plan.json").unlink()  # the only guard that would have caught a changed setting
    with pytest.raises(DataError, match=r"fitted with other settings: codebook_size 8 \(asked 16\)"):
        prepare(manifest, tmp_path / "out", build_teacher("kmeans", n_clusters=16, n_mels=16), progress=False)
    (tmp_path / "out" / "plan.json").unlink()  # the refused run planned with its own settings
    summary = prepare(manifest, tmp_path / "out", build_teacher("kmeans", n_clusters=8, n_mels=16), progress=False)
    assert summary.n_items == 2 and PreparedDataset(tmp_path / "out").codebook_size == 8  # same settings: reused
