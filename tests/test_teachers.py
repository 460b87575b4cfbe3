"""Tests for culturemert.teachers: CQT parity with nnAudio, EnCodec and k-means tokenisers, label-grid guards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from culturemert.errors import CheckpointError, ConfigError, DataError, UserError
from culturemert.label_grid import check_label_alignment, label_frames
from culturemert.teachers import (
    EncodecTeacher,
    KMeansTeacher,
    MertCQT,
    Teacher,
    build_teacher,
    check_codebook_usage,
    teacher_fingerprint,
)

SR = 24000


def music_like(batch: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """Three harmonic tones with 5 Hz vibrato per clip, plus white noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / SR
    clips = []
    for _ in range(batch):
        clip = torch.zeros(num_samples, dtype=torch.float64)
        for _ in range(3):
            f0 = 55.0 * 2 ** (5 * torch.rand(1, generator=gen).item())
            inst_freq = f0 * (1 + 0.01 * torch.sin(2 * math.pi * 5.0 * t))
            phase = 2 * math.pi * torch.cumsum(inst_freq, 0) / SR
            for harmonic in range(1, 8):
                if f0 * harmonic < SR / 2 - 500:
                    clip += torch.sin(harmonic * phase) / harmonic
        clip += 0.05 * torch.randn(num_samples, generator=gen, dtype=torch.float64)
        clips.append(clip)
    return (0.1 * torch.stack(clips)).float()


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-3) -> None:
    assert ours.shape == ref.shape
    overall = ((ours - ref).norm() / ref.norm()).item()
    assert overall < tol, overall
    bin_norm = ref.norm(dim=-1)
    energetic = bin_norm >= 0.01 * bin_norm.max()
    assert energetic.sum() > 10
    per_bin = ((ours - ref).norm(dim=-1) / bin_norm.clamp_min(1e-30))[energetic]
    assert per_bin.max().item() < tol, per_bin.max().item()


# --------------------------------------------------------------------------------------------- label grid


def test_label_frames_is_ceil_of_hops():
    assert [label_frames(n) for n in (0, 1, 319, 320, 321, 120_000, 120_001)] == [0, 1, 1, 1, 2, 375, 376]
    with pytest.raises(ValueError):
        label_frames(-1)


def test_check_label_alignment_tolerates_one_frame_only():
    check_label_alignment(120_000, 375)
    check_label_alignment(120_000, 374)
    check_label_alignment(120_000, 376)
    with pytest.raises(DataError, match=r"label length 377 .*120000 samples.*375"):
        check_label_alignment(120_000, 377)
    with pytest.raises(DataError):
        check_label_alignment(120_000, 373)


def test_check_codebook_usage_names_the_collapsed_codebook():
    rng = np.random.default_rng(0)
    healthy = rng.integers(0, 1024, size=(2, 3000))
    check_codebook_usage(healthy, 1024)
    collapsed = healthy.copy()
    collapsed[1] = rng.integers(0, 5, size=3000)  # 5 of 1024 entries < 2 %
    with pytest.raises(DataError, match="codebook 1 collapsed: only 5 of 1024"):
        check_codebook_usage(collapsed, 1024)
    # the same as a batch [B, n_codebooks, T] and as a list of per-file arrays
    with pytest.raises(DataError, match="codebook 1"):
        check_codebook_usage(collapsed.reshape(2, 3, 1000).transpose(1, 0, 2), 1024)
    with pytest.raises(DataError, match="codebook 1"):
        check_codebook_usage([collapsed[:, :1500], collapsed[:, 1500:]], 1024)
    # a tiny corpus is not judged; a lower min_frames makes it judged
    check_codebook_usage(collapsed[:, :500], 1024)
    with pytest.raises(DataError, match="codebook 1"):
        check_codebook_usage(collapsed[:, :500], 1024, min_frames=100)
    # 21 entries = ceil(2 % of 1024) is enough; 20 is not
    exactly = np.stack([healthy[0], np.arange(3000) % 21])
    check_codebook_usage(exactly, 1024)
    with pytest.raises(DataError):
        check_codebook_usage(np.stack([healthy[0], np.arange(3000) % 20]), 1024)


def test_check_codebook_usage_rejects_out_of_range_and_ignores_padding():
    codes = np.random.default_rng(1).integers(0, 100, size=(1, 2000))
    codes[0, :50] = -1  # padding
    check_codebook_usage(codes, 100)
    codes[0, 60] = 100
    with pytest.raises(DataError, match="code 100 >= codebook_size 100"):
        check_codebook_usage(codes, 100)


# --------------------------------------------------------------------------------------------- CQT


def _nnaudio_cqt(**overrides):
    features = pytest.importorskip("nnAudio.features.cqt", reason="nnAudio is not installed; parity test skipped")
    params = {"sr": 24000, "hop_length": 320, "fmin": 32.7, "n_bins": 336, "bins_per_octave": 48, "filter_scale": 1}
    params |= {"norm": 1, "window": "hann", "center": True, "pad_mode": "constant", "trainable": False}
    params |= {"output_format": "Magnitude"} | overrides
    return features.CQT1992v2(**params, verbose=False)


def test_mert_cqt_matches_nnaudio_with_mert_parameters():
    reference = _nnaudio_cqt()
    ours = MertCQT()
    wav = music_like(2, 24_000 + 123)
    expected = reference(wav)
    got = ours(wav)
    assert got.shape == (2, 336, (24_000 + 123) // 320 + 1)
    assert got.dtype == torch.float32
    assert_close_to_reference(got, expected)


def test_mert_cqt_overlap_save_blocks_match_nnaudio():
    # a short FFT block forces several overlap-save blocks per clip
    ours = MertCQT(fft_frames=180)
    wav = music_like(1, 16_000, seed=3)
    assert 2 * ours.frames_per_block < ours.num_frames(16_000) < 3 * ours.frames_per_block
    assert_close_to_reference(ours(wav), _nnaudio_cqt()(wav))


def test_mert_cqt_generic_parameters_match_nnaudio():
    params = {"sr": 16000, "hop_length": 160, "fmin": 55.0, "n_bins": 60, "bins_per_octave": 12, "filter_scale": 0.5}
    reference = _nnaudio_cqt(**params)
    ours = MertCQT(sample_rate=16000, hop_length=160, fmin=55.0, n_bins=60, bins_per_octave=12,
                   filter_scale=0.5, fft_frames=64)
    wav = music_like(2, 9000, seed=5)[:, :9000]
    assert_close_to_reference(ours(wav), reference(wav))
    uncentred = MertCQT(sample_rate=16000, hop_length=160, fmin=55.0, n_bins=60, bins_per_octave=12,
                        filter_scale=0.5, fft_frames=64, center=False)
    assert_close_to_reference(uncentred(wav), _nnaudio_cqt(**params, center=False)(wav))


def test_mert_cqt_pitch_and_frame_alignment_by_hand():
    cqt = MertCQT()
    t = torch.arange(SR) / SR
    spectrum = cqt(torch.sin(2 * math.pi * 440.0 * t)[None])[0]
    # bin b has frequency 32.7 * 2^(b/48): 440 Hz -> b = 48 * log2(440 / 32.7) = 180.0
    assert round(48 * math.log2(440.0 / 32.7)) == 180
    assert spectrum[:, 30:45].mean(dim=1).argmax().item() == 180
    # a click at sample 320 * 12 is seen best by the shortest kernels in frame 12 (frames centred at 320 k)
    click = torch.zeros(1, SR)
    click[0, 320 * 12] = 1.0
    top_bins = cqt(click)[0, -48:]
    assert top_bins.sum(dim=0).argmax().item() == 12


def test_mert_cqt_needs_no_grad_and_checks_input():
    cqt = MertCQT()
    wav = music_like(1, 4000).double().requires_grad_(True)
    out = cqt(wav)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert cqt(torch.zeros(2, 0)).shape == (2, 336, 1)
    with pytest.raises(ValueError, match="batch, samples"):
        cqt(torch.zeros(100))
    with pytest.raises(ConfigError, match="pad_mode"):
        MertCQT(pad_mode="reflect")
    with pytest.raises(ConfigError, match="fft_frames"):
        MertCQT(fft_frames=100)


# --------------------------------------------------------------------------------------------- EnCodec


def tiny_encodec(seed: int = 0):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    config = EncodecConfig(hidden_size=16, num_filters=4, num_lstm_layers=1, target_bandwidths=[1.5, 6.0])
    model = EncodecModel(config).eval()
    # transformers initialises codebooks to zeros (every code would be 0); use encoder outputs as entries
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        embeddings = model.encoder(torch.randn(4, 1, 12_000, generator=gen) * 0.1)
        frames = embeddings.transpose(1, 2).reshape(-1, embeddings.shape[1])
        for index, layer in enumerate(model.quantizer.layers):
            picks = torch.randint(0, frames.shape[0], (layer.codebook.embed.shape[0],), generator=gen)
            noise = torch.randn(layer.codebook.embed.shape, generator=gen) * frames.std()
            layer.codebook.embed.copy_((frames[picks] + 0.1 * noise) / (index + 1))
    return model


@pytest.fixture(scope="module")
def encodec_teacher():
    return EncodecTeacher(tiny_encodec(), bandwidth=6.0, batch_size=4)


def test_encodec_shapes_lengths_and_batch_equality(encodec_teacher):
    teacher = encodec_teacher
    assert (teacher.n_codebooks, teacher.codebook_size, teacher.frame_rate, teacher.sample_rate) == (8, 1024, 75.0, SR)
    assert isinstance(teacher, Teacher)
    wav = music_like(6, 12_000 + 17, seed=7)
    codes = teacher.encode(wav.numpy())
    assert codes.dtype == np.int16 and codes.shape == (6, 8, label_frames(12_017))
    assert len(np.unique(codes[:, 0])) > 3  # the check below would be vacuous on a constant code
    one_by_one = np.concatenate([teacher.encode(wav[i : i + 1]) for i in range(6)])
    np.testing.assert_array_equal(codes, one_by_one)
    assert teacher.encode(np.zeros(100, dtype=np.float32)).shape == (1, 8, 1)
    with pytest.raises(DataError, match="float"):
        teacher.encode(np.zeros((1, 640), dtype=np.int16))
    with pytest.raises(DataError, match="NaN"):
        teacher.encode(np.full((1, 640), np.nan, dtype=np.float32))


def test_encodec_encode_many_pads_and_trims(encodec_teacher):
    lengths = [9000, 12_345, 6401, 700, 10_000]
    wav = music_like(5, 12_345, seed=11)
    clips = [wav[i, :n].numpy() for i, n in enumerate(lengths)]
    codes = encodec_teacher.encode_many(clips, batch_size=3)
    for clip, got in zip(clips, codes):
        alone = encodec_teacher.encode(clip)[0]
        assert got.shape == (8, label_frames(len(clip)))
        # padding may change only the last frame (EnCodec reflect-pads a partial final hop)
        np.testing.assert_array_equal(got[:, :-1], alone[:, :-1])


def test_encodec_loads_saved_directory_and_reports_state(tmp_path, encodec_teacher):
    encodec_teacher.model.save_pretrained(tmp_path / "encodec")
    reloaded = build_teacher("encodec", model=str(tmp_path / "encodec"), bandwidth=6.0)
    wav = music_like(2, 6400, seed=2)
    np.testing.assert_array_equal(reloaded.encode(wav), encodec_teacher.encode(wav))
    state = reloaded.state()
    json.dumps(state)
    assert state["model"] == str((tmp_path / "encodec").resolve())
    assert state["weights_sha256"] == encodec_teacher.state()["weights_sha256"]
    assert (state["n_codebooks"], state["codebook_size"], state["bandwidth"]) == (8, 1024, 6.0)


def test_encodec_missing_weights_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass
    with pytest.raises(CheckpointError, match=r"needed for the encodec teacher.*save_pretrained"):
        EncodecTeacher("culturemert-tests/no-such-encodec")
    with pytest.raises(CheckpointError, match="not found"):
        EncodecTeacher(str(tmp_path / "missing" / "encodec"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        EncodecTeacher(tmp_path / "empty")


def test_encodec_rejects_unsuitable_models():
    from transformers import EncodecConfig, EncodecModel

    with pytest.raises(ConfigError, match="bandwidth 3.0"):
        EncodecTeacher(tiny_encodec(), bandwidth=3.0)
    wrong_rate = EncodecModel(EncodecConfig(hidden_size=8, num_filters=2, num_lstm_layers=1, sampling_rate=16_000))
    with pytest.raises(ConfigError, match="sampling_rate 16000"):
        EncodecTeacher(wrong_rate, bandwidth=6.0)


# --------------------------------------------------------------------------------------------- k-means


def harmonic_tone(freq: float, num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SR
    wave = sum(np.sin(2 * np.pi * freq * h * t + rng.uniform(0, 6)) / h for h in range(1, 5))
    return (0.2 * wave + 0.001 * rng.standard_normal(num_samples)).astype(np.float32)


PITCHES = (110.0, 220.0, 440.0, 880.0)


@pytest.fixture(scope="module")
def fitted_kmeans():
    clips = [harmonic_tone(f, SR, seed=i) for i, f in enumerate(PITCHES)]
    return KMeansTeacher(n_codebooks=2, codebook_size=8, n_mels=32, seed=3).fit(iter(clips), n_frames_max=200)


def test_kmeans_codes_distinguish_pitches(fitted_kmeans):
    assert fitted_kmeans.n_frames_fitted == 200  # 300 frames seen, reservoir of 200
    test_clips = np.stack([harmonic_tone(f, SR, seed=10 + i) for i, f in enumerate(PITCHES)])
    codes = fitted_kmeans.encode(test_clips)
    assert codes.dtype == np.int16 and codes.shape == (4, 2, 75)
    assert codes.min() >= 0 and codes.max() < 8
    majority = [np.bincount(codes[i, 0, 2:-2], minlength=8).argmax() for i in range(4)]
    assert len(set(majority)) == 4, majority


def test_kmeans_lengths_alignment_and_batching(fitted_kmeans):
    for n in (1, 319, 320, 321, 5000):
        assert fitted_kmeans.encode(np.zeros(n, dtype=np.float32)).shape == (1, 2, label_frames(n))
    # frame i is centred at 320 i + 200: a click there gives frame i the most broadband energy
    click = np.zeros(6400, dtype=np.float32)
    click[320 * 7 + 200] = 1.0
    feats = fitted_kmeans.features(click)[0]
    assert feats.shape == (20, 32)
    assert feats.mean(dim=1).argmax().item() == 7
    clips = [harmonic_tone(220.0, n, seed=n) for n in (3000, 7001, 640, 5555)]
    many = fitted_kmeans.encode_many(clips, batch_size=3)
    for clip, got in zip(clips, many):
        np.testing.assert_array_equal(got, fitted_kmeans.encode(clip)[0])


@pytest.mark.parametrize("file_name", ["kmeans.npz", "kmeans.safetensors", "teacher_dir"])
def test_kmeans_save_load_round_trip_without_pickle(tmp_path, fitted_kmeans, file_name):
    saved = fitted_kmeans.save(tmp_path / file_name)
    expected = tmp_path / file_name / "kmeans_teacher.npz" if file_name == "teacher_dir" else tmp_path / file_name
    assert saved == expected.resolve() and saved.is_file()
    if saved.suffix == ".npz":
        with np.load(saved, allow_pickle=False) as arrays:  # no object arrays: loads without pickle
            assert arrays["centroids"].shape == (2, 8, 32)
            assert json.loads(str(arrays["meta_json"][()]))["codebook_size"] == 8
    loaded = build_teacher("kmeans", path=tmp_path / file_name)
    assert loaded.is_fitted and not KMeansTeacher().is_fitted
    wav = np.stack([harmonic_tone(f, 8000, seed=20) for f in PITCHES])
    np.testing.assert_array_equal(loaded.encode(wav), fitted_kmeans.encode(wav))
    state = loaded.state()
    json.dumps(state)
    assert state["path"] == str(saved)
    assert state["n_codebooks"] == 2 and state["features"]["n_mels"] == 32 and state["seed"] == 3


def test_kmeans_load_refuses_damaged_or_missing_files(tmp_path, fitted_kmeans):
    for name in ("a.npz", "b.safetensors"):
        saved = fitted_kmeans.save(tmp_path / name)
        raw = saved.read_bytes()
        saved.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(CheckpointError, match="not a readable culturemert kmeans teacher"):
            KMeansTeacher.load(saved)
    with pytest.raises(CheckpointError, match="not found"):
        KMeansTeacher.load(tmp_path / "nowhere.npz")
    np.savez(tmp_path / "other.npz", meta_json=np.array(json.dumps({"format": "something-else"})),
             centroids=np.zeros(1), mean=np.zeros(1), std=np.zeros(1))
    with pytest.raises(CheckpointError, match="something-else"):
        KMeansTeacher.load(tmp_path / "other.npz")


def test_kmeans_fit_is_deterministic_for_a_seed(fitted_kmeans):
    clips = [harmonic_tone(f, SR, seed=i) for i, f in enumerate(PITCHES)]
    again = KMeansTeacher(n_codebooks=2, codebook_size=8, n_mels=32, seed=3).fit(clips, n_frames_max=200)
    np.testing.assert_array_equal(again.centroids, fitted_kmeans.centroids)
    np.testing.assert_array_equal(again.mean, fitted_kmeans.mean)


def test_kmeans_errors():
    teacher = build_teacher("kmeans", codebook_size=64, n_mels=16)
    assert isinstance(teacher, KMeansTeacher)
    with pytest.raises(UserError, match="not fitted"):
        teacher.encode(np.zeros(640, dtype=np.float32))
    with pytest.raises(DataError, match="too few"):
        teacher.fit([np.zeros(3200, dtype=np.float32)])
    with pytest.raises(ConfigError, match="unknown teacher 'hubert'"):
        build_teacher("hubert")
    with pytest.raises(ConfigError, match="invalid options"):
        build_teacher("kmeans", clusters=5)
    assert build_teacher("kmeans", n_clusters=5).codebook_size == 5
    with pytest.raises(ConfigError, match="codebook_size"):
        KMeansTeacher(codebook_size=40_000)


# --------------------------------------------------------------------------------------------- teacher identity
def test_kmeans_fingerprint_identifies_the_fitted_codebooks_not_the_file(tmp_path, fitted_kmeans):
    fp = fitted_kmeans.fingerprint()
    assert len(fp) == 64 and teacher_fingerprint(fitted_kmeans) == fp
    a = KMeansTeacher.load(fitted_kmeans.save(tmp_path / "a" / "kmeans.safetensors"))
    b = KMeansTeacher.load(fitted_kmeans.save(tmp_path / "b.npz"))
    b.seed, b.n_frames_fitted = 99, 1  # bookkeeping that does not change a code
    assert a.fingerprint() == b.fingerprint() == fp
    for attr in ("centroids", "mean", "std"):
        changed = KMeansTeacher.load(tmp_path / "b.npz")
        value = getattr(changed, attr).copy()
        value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf))  # one ulp
        setattr(changed, attr, value)
        assert changed.fingerprint() != fp, attr
    other_audio = [harmonic_tone(f * 1.5, SR, seed=i) for i, f in enumerate(PITCHES)]
    refit = KMeansTeacher(n_codebooks=2, codebook_size=8, n_mels=32, seed=3).fit(iter(other_audio), n_frames_max=200)
    assert refit.fingerprint() != fp  # same settings, other corpus: code k means another sound
    with pytest.raises(UserError, match="not fitted"):
        KMeansTeacher().fingerprint()


def test_encodec_fingerprint_follows_weights_and_bandwidth_not_location(tmp_path, encodec_teacher):
    encodec_teacher.model.save_pretrained(tmp_path / "one")
    encodec_teacher.model.save_pretrained(tmp_path / "two")
    one = build_teacher("encodec", model=str(tmp_path / "one"), bandwidth=6.0)
    two = build_teacher("encodec", model=str(tmp_path / "two"), bandwidth=6.0)
    assert one.state()["model"] != two.state()["model"]
    assert one.fingerprint() == two.fingerprint() == teacher_fingerprint(encodec_teacher)
    assert build_teacher("encodec", model=str(tmp_path / "one"), bandwidth=1.5).fingerprint() != one.fingerprint()
    assert EncodecTeacher(tiny_encodec(seed=5), bandwidth=6.0).fingerprint() != one.fingerprint()


def test_teacher_fingerprint_of_other_teachers_hashes_their_state():
    class Plain:
        name = "plain"

        def __init__(self, state):
            self._state = state

        def state(self):
            return self._state

    assert teacher_fingerprint(Plain({"a": 1, "b": [2]})) == teacher_fingerprint(Plain({"b": [2], "a": 1}))
    assert teacher_fingerprint(Plain({"a": 1})) != teacher_fingerprint(Plain({"a": 2}))


# --------------------------------------------------------------------------------------------- teacher file audit
def _resave(path, tmp_path, name, meta_edit=None, arrays_edit=None):
    """Rewrite a saved .npz teacher with edited metadata / arrays (what a foreign or hand-edited file looks like)."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta_json"][()]))
        arrays = {k: archive[k] for k in archive.files if k != "meta_json"}
    if meta_edit:
        meta_edit(meta)
    if arrays_edit:
        arrays_edit(arrays)
    target = tmp_path / name
    np.savez(target, meta_json=np.array(json.dumps(meta)), **arrays)
    return target


@pytest.mark.parametrize(
    "case, meta_edit, arrays_edit, message",
    [
        ("extra array", None, lambda a: a.update(centroids_v2=a["centroids"] * 2), "not described by its metadata"),
        ("missing mean", None, lambda a: a.pop("mean"), "missing ['mean']"),
        ("no seed", lambda m: m.pop("seed"), None, "metadata incomplete"),
        ("16 kHz", lambda m: m.update(sample_rate=16000), None, "16000 Hz"),
        ("other features", lambda m: m["features"].update(kind="mfcc"), None, "'mfcc'"),
        ("NaN centroid", None, lambda a: a["centroids"].__setitem__((0, 0, 0), np.nan), "NaN/inf"),
        ("zero std", None, lambda a: a["std"].__setitem__(0, 0.0), "std <= 0"),
        ("bad size", lambda m: m.update(codebook_size=1), None, "codebook_size"),
        ("shape vs meta", lambda m: m.update(codebook_size=9), None, "do not match its metadata"),
    ],
)
def test_kmeans_load_refuses_a_file_whose_metadata_and_arrays_disagree(
    tmp_path, fitted_kmeans, case, meta_edit, arrays_edit, message
):
    saved = fitted_kmeans.save(tmp_path / "ok.npz")
    bad = _resave(saved, tmp_path, "bad.npz", meta_edit, arrays_edit)
    with pytest.raises(CheckpointError) as err:
        KMeansTeacher.load(bad)
    assert message in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_kmeans_load_of_a_directory_takes_its_one_teacher_file_or_refuses(tmp_path, fitted_kmeans):
    prepared_style = tmp_path / "teacher"
    fitted_kmeans.save(prepared_style / "kmeans.safetensors")  # the name `prepare` writes
    assert KMeansTeacher.load(prepared_style).fingerprint() == fitted_kmeans.fingerprint()
    fitted_kmeans.save(prepared_style / "kmeans_teacher.npz")
    with pytest.raises(CheckpointError, match="holds both"):
        KMeansTeacher.load(prepared_style)
