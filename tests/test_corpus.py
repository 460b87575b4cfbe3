"""Tests of the offline corpus: parsing, microtonal rendering, shared instrument pool, splits, CSV, resume."""

from __future__ import annotations

import csv
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from culturemert import corpus as C
from culturemert.config import parse_config
from culturemert.errors import ConfigError, DataError
from culturemert.workers import ProcessMap

SHARED_DATA = Path(os.environ.get("CULTUREMERT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SYMBTR = SHARED_DATA / "symbtr"


def _fluidsynth_available() -> bool:
    try:
        import fluidsynth  # noqa: F401
    except ImportError:
        return False
    return True


needs_fluidsynth = pytest.mark.skipif(not _fluidsynth_available(), reason="libfluidsynth not installed")


def _peak_frequency(audio: np.ndarray, sample_rate: int, low: float, high: float) -> float:
    """Frequency of the strongest spectral peak in [low, high] Hz (zero-padded FFT + parabolic interpolation)."""
    x = audio.astype(np.float64) * np.hanning(len(audio))
    n_fft = 1 << 20
    spectrum = np.abs(np.fft.rfft(x, n=n_fft))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    band = np.nonzero((freqs >= low) & (freqs <= high))[0]
    k = band[np.argmax(spectrum[band])]
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c)
    return float((k + shift) * sample_rate / n_fft)


def _cents(f: float, ref: float) -> float:
    return 1200.0 * np.log2(f / ref)


# ----------------------------------------------------------------------------------------------------------------
# parsing


def test_known_essen_tune_notes_tags_and_mode():
    """han1 X:1 'Renmin gongshe shizai hao': L:1/16, K:C, M:2/4, first line ``d4A2c2 | d4d4 | A3cd2g2 | c2A2G4``."""
    pieces = {p.piece_id: p for p in C.sources._scan_abc("chinese")}
    piece = pieces["essen_han1_0001"]
    assert piece.title == "Renmin gongshe shizai hao"
    assert "region--shaanxi" in piece.tags  # O: China, Shaanxi, Zizhou
    parsed = C.parse_abc_tune(piece.text)
    # hand-read from the ABC: (MIDI pitch, quarter lengths); d = D5 = 74, A = A4 = 69, c = C5 = 72, g = G5 = 79
    expected = [(74, 1.0), (69, 0.5), (72, 0.5), (74, 1.0), (74, 1.0), (69, 0.75), (72, 0.25), (74, 0.5),
                (79, 0.5), (72, 0.5), (69, 0.5), (67, 1.0)]
    got = [(float(p), float(d)) for _, d, p in parsed.notes[: len(expected)]]
    assert got == [(float(p), d) for p, d in expected]
    onsets = parsed.notes[: len(expected), 0]
    np.testing.assert_allclose(onsets, np.concatenate([[0.0], np.cumsum([d for _, d in expected])[:-1]]))
    assert parsed.time_unit == "quarter"
    assert parsed.meter == "2/4"
    assert parsed.key_sharps == 0
    # the tune ends on D8 over a C (gong) signature: D is the shang degree
    assert parsed.final_pitch_class() == 2
    assert C.parse.mode_tag("chinese", parsed) == "mode--shang"


def test_abc_ties_graces_chords_are_made_monophonic():
    text = "X:1\nT:t\nM:4/4\nL:1/4\nK:C\nC-C {d}E [CEG] ^^F | z A/B/ c2 |\n"
    parsed = C.parse_abc_tune(text)
    # tied C = one half note; grace d dropped; chord -> top note G; ^^F = G (67); rest leaves a gap
    assert parsed.notes[:, 2].tolist() == [60.0, 64.0, 67.0, 67.0, 69.0, 71.0, 72.0]
    assert parsed.notes[:, 1].tolist() == [2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 2.0]
    assert parsed.notes[:, 0].tolist() == [0.0, 2.0, 3.0, 4.0, 6.0, 6.5, 7.0]
    assert parsed.length == pytest.approx(9.0)


def test_koma53_conversion():
    assert C.koma53_to_semitones(318) == pytest.approx(72.0)  # Do5 = C5
    assert C.koma53_to_semitones(340) == pytest.approx(340 * 12 / 53)
    # one Holderian comma is 1200/53 cents
    assert (C.koma53_to_semitones(319) - C.koma53_to_semitones(318)) * 100 == pytest.approx(1200 / 53)


SYMBTR_SNIPPET = (
    "Sira\tKod\tNota53\tNotaAE\tKoma53\tKomaAE\tPay\tPayda\tMs\tLNS\tBas\tSoz1\tOffset\n"
    "1\t51\t\t\t0\t0\t3\t4\t0\t4\t0\tSem\t0.0\n"
    "2\t9\tFa5\tF5\t340\t340\t1\t4\t455\t95\t120\tA\t0.33\n"
    "3\t9\tMi5\tE5\t336\t336\t1\t8\t227\t95\t78\t.\t0.5\n"
    "4\t9\tEs\tEs\t-1\t-1\t1\t8\t300\t95\t78\t.\t0.6\n"
    "5\t8\tRe5\tD5\t327\t327\t1\t16\t0\t95\t78\t.\t0.6\n"
    "6\t9\tDo5#4\tC5#4\t322\t322\t1\t2\t909\t95\t96\t.\t1.0\n"
)


def test_symbtr_rows_to_notes():
    parsed = C.parse_symbtr_text(SYMBTR_SNIPPET)
    assert parsed.time_unit == "second"
    # usul row (Kod 51) and grace row (Kod 8) skipped; the rest (Koma53 -1) advances the clock by 300 ms
    np.testing.assert_allclose(parsed.notes[:, 0], [0.0, 0.455, 0.455 + 0.227 + 0.300])
    np.testing.assert_allclose(parsed.notes[:, 1], [0.455, 0.227, 0.909])
    np.testing.assert_allclose(parsed.notes[:, 2], [340 * 12 / 53, 336 * 12 / 53, 322 * 12 / 53])
    assert parsed.length == pytest.approx((455 + 227 + 300 + 909) / 1000)


def test_symbtr_header_is_checked():
    with pytest.raises(DataError, match="Koma53"):
        C.parse_symbtr_text("a\tb\tc\n1\t2\t3\n")


def test_symbtr_archive_matches_an_independent_reader():
    archive = SYMBTR / "symbtr-txt-half.tar.gz"
    if not archive.is_file():
        pytest.skip(f"SymbTr archive not found at {archive} (set CULTUREMERT_SHARED_DATA)")
    pieces = C.sources._scan_symbtr(SYMBTR)
    assert len(pieces) == 1100
    piece = next(p for p in pieces if p.source == "hicaz--sarki--semai--degdi_saclarima--bekirof.txt")
    assert set(piece.tags) == {"makam--hicaz", "form--sarki", "usul--semai"}
    rows = list(csv.DictReader(piece.text.splitlines(), delimiter="\t"))
    notes = [r for r in rows if r["Kod"] == "9" and float(r["Ms"]) > 0 and float(r["Koma53"]) > 0]
    parsed = C.parse_symbtr_text(piece.text)
    assert len(parsed.notes) == len(notes)
    np.testing.assert_allclose(parsed.notes[:, 2], [float(r["Koma53"]) * 12 / 53 for r in notes])
    total_ms = sum(float(r["Ms"]) for r in rows if r["Kod"] == "9" and float(r["Ms"]) > 0)
    assert parsed.length == pytest.approx(total_ms / 1000)


def test_duplicate_tunes_are_dropped(tmp_path):
    """Two files with the same notes (O'Neill's overlapping books) count once; the earlier candidate wins."""
    other = SYMBTR_SNIPPET.replace("Sem", "Other lyrics")
    extra = SYMBTR_SNIPPET.replace("\t340\t340\t", "\t349\t349\t")
    pieces = [C.SourcePiece(f"symbtr_{i}", "turkish", "symbtr", text, f"{i}.txt", "", ("makam--x",))
              for i, text in enumerate([SYMBTR_SNIPPET * 3, other * 3, extra * 3])]
    config = C.CorpusConfig(cultures=["turkish"], symbtr=tmp_path, pieces_per_culture=3, workers=1)
    with ProcessMap(config.workers, initializer=C.build._worker_init, initargs=(config.model_dump_json(),), progress=False) as runner:
        chosen, failures = C.build._select_and_parse(config, {"turkish": pieces}, tmp_path / "cache.json", runner)
    kept = sorted(p.piece_id for p, _ in chosen["turkish"])
    assert failures == 0
    assert len(kept) == 2 and "symbtr_2" in kept
    assert kept != ["symbtr_0", "symbtr_1"]


def test_oneill_overlapping_books_are_not_doubled():
    pieces = C.sources._scan_abc("irish")
    import music21

    root = Path(music21.__file__).resolve().parent / "corpus" / "oneills1850"
    raw = sum(path.read_text(encoding="utf-8").count("\nX:") + path.read_text(encoding="utf-8").startswith("X:")
              for path in root.glob("*.abc"))
    assert raw >= 2000
    # 0626-0635 repeats tunes of 0626-0700, 0732-0758_bs/_mh and 1116-1135_mh/_ml overlap, ...
    assert len(pieces) < raw - 15
    bodies = [C.sources._abc_body_key(p.text) for p in pieces]
    assert len(set(bodies)) == len(bodies)
    counts = Counter(t for p in pieces for t in p.tags)
    assert counts["tune_type--reel"] > 200 and counts["tune_type--slip_jig"] > 50


# ----------------------------------------------------------------------------------------------------------------
# rendering


@needs_fluidsynth
@pytest.mark.parametrize("pitch", [69.0, 69.5, 68.77])
def test_fluidsynth_microtone_frequency(pitch):
    renderer = C.FluidSynthRenderer(C.resolve_soundfont(None), 24000)
    audio = renderer.render([C.ScheduledNote(0.0, 1.5, pitch, 100)], program=0, num_samples=36000)
    expected = 440.0 * 2 ** ((pitch - 69.0) / 12)
    measured = _peak_frequency(audio[2400:33600], 24000, 400.0, 500.0)
    assert abs(_cents(measured, expected)) < 3.0, (measured, expected)


@needs_fluidsynth
def test_bundled_soundfont_renders_the_bend_interval(monkeypatch, tmp_path):
    """pretty_midi's TimGM6mb (the pip-only fallback) has samples a few cents off, but a 50-cent bend must
    still move the pitch by 50 cents (within a few cents)."""
    monkeypatch.setattr(C.render, "DEBIAN_SOUNDFONTS", (tmp_path / "none.sf2",))
    renderer = C.FluidSynthRenderer(C.resolve_soundfont(None), 24000)
    for program in (0, 40, 73):
        plain, bent = (_peak_frequency(renderer.render([C.ScheduledNote(0.0, 1.5, p, 100)], program, 36000)[2400:33600],
                                       24000, 400.0, 500.0) for p in (69.0, 69.5))
        # piano's layered samples shift the measured peak by a few cents; a koma (1/53 octave) is 22.6 cents
        assert abs(_cents(bent, plain) - 50.0) < 5.0, (program, plain, bent)


def test_additive_microtone_frequency():
    renderer = C.AdditiveRenderer(24000)
    audio = renderer.render([C.ScheduledNote(0.0, 1.5, 69.5, 100)], program=68, num_samples=36000)
    measured = _peak_frequency(audio[2400:33600], 24000, 400.0, 500.0)
    assert abs(_cents(measured, 440.0 * 2 ** (0.5 / 12))) < 1.0


def test_symbtr_pitch_reaches_audio_microtonally():
    """Koma53 322 (Do5#4) = 72.906 semitones: rendered 90.6 cents above C5, not rounded to a semitone."""
    parsed = C.ParsedPiece(np.array([[0.0, 2.0, C.koma53_to_semitones(322)]]), "second", 2.0)
    params = C.RenderParams(program=73, tempo_bpm=100.0, time_scale=1.0, transpose=0, note_seed=0)
    config = C.CorpusConfig(duration_s=1.5, synthesizer="additive", loop_gap_s=0.0)
    audio = C.render_piece_audio(C.AdditiveRenderer(24000), parsed, params, config)
    expected = 440.0 * 2 ** ((322 * 12 / 53 - 69.0) / 12)
    assert abs(_cents(_peak_frequency(audio[2400:33000].astype(float), 24000, 500, 600), expected)) < 1.0


def test_schedule_loops_transposes_and_scales_tempo():
    parsed = C.ParsedPiece(np.array([[0.0, 1.0, 60.0], [1.0, 1.0, 62.5]]), "quarter", 2.0)
    params = C.RenderParams(program=0, tempo_bpm=120.0, time_scale=1.0, transpose=-2, note_seed=1)
    notes = C.schedule_notes(parsed, params, duration_s=3.0, loop_gap_s=0.5, velocity=(90, 90))
    # 120 bpm: a quarter = 0.5 s, piece = 1 s + 0.5 s gap -> loops at 0, 1.5 (and not at 3.0)
    assert [n.start for n in notes] == [0.0, 0.5, 1.5, 2.0]
    assert [n.pitch for n in notes] == [58.0, 60.5, 58.0, 60.5]
    assert all(n.velocity == 90 for n in notes)


def test_every_culture_draws_from_the_same_instrument_pool():
    config = C.CorpusConfig()
    pool = config.instrument_programs
    for culture in ("chinese", "german", "irish", "turkish"):
        draws = Counter(C.piece_render_params(config, f"{culture}_{i:04d}").program for i in range(600))
        assert set(draws) == set(pool)
        for program in pool:  # each ~1/6 of the pieces
            assert abs(draws[program] / 600 - 1 / len(pool)) < 0.06, (culture, draws)
    transposes = Counter(C.piece_render_params(config, f"x{i}").transpose for i in range(700))
    assert set(transposes) == set(range(-3, 4))
    assert set(Counter(C.piece_render_params(config.model_copy(update={"transpose_semitones": 0}), f"x{i}").transpose
                       for i in range(50))) == {0}


# ----------------------------------------------------------------------------------------------------------------
# splits and config


def test_splits_are_piece_level_stratified_and_seeded():
    ids = {"a": [f"a{i}" for i in range(20)], "b": [f"b{i}" for i in range(40)]}
    fractions = C.SplitFractions()
    first = C.assign_splits(ids, fractions, seed=0)
    assert first == C.assign_splits({k: list(reversed(v)) for k, v in ids.items()}, fractions, seed=0)
    assert set(first) == set(ids["a"]) | set(ids["b"])
    for culture, n in (("a", 20), ("b", 40)):
        counts = Counter(first[i] for i in ids[culture])
        n_train, n_valid = round(0.6 * n), round(0.15 * n)
        assert counts == {"train": n_train, "valid": n_valid, "test": n - n_train - n_valid}
    assert first != C.assign_splits(ids, fractions, seed=1)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        parse_config({"bogus": 1}, C.CorpusConfig)
    with pytest.raises(ConfigError, match="sum|must be 1"):
        parse_config({"splits": {"train": 0.9, "valid": 0.2, "test": 0.1}}, C.CorpusConfig)
    with pytest.raises(ConfigError, match="unknown culture"):
        parse_config({"cultures": ["martian"]}, C.CorpusConfig)
    with pytest.raises(ConfigError, match="symbtr"):
        C.scan_sources(C.CorpusConfig(cultures=["turkish"]))
    with pytest.raises(ConfigError, match="soundfont not found"):
        C.resolve_soundfont(tmp_path / "missing.sf2")


def test_soundfont_falls_back_to_pretty_midi(monkeypatch, tmp_path):
    monkeypatch.setattr(C.render, "DEBIAN_SOUNDFONTS", (tmp_path / "none.sf2",))
    path = C.resolve_soundfont(None)
    assert path.name == "TimGM6mb.sf2" and path.is_file()


def test_additive_fallback_when_libfluidsynth_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "fluidsynth", None)  # makes `import fluidsynth` raise ImportError
    config = C.CorpusConfig()
    assert isinstance(C.make_renderer(config), C.AdditiveRenderer)
    assert C.resolve_renderer(config).synthesizer == "additive"
    with pytest.raises(DataError, match="FluidSynth is not available"):
        C.make_renderer(config.model_copy(update={"synthesizer": "fluidsynth"}))


# ----------------------------------------------------------------------------------------------------------------
# end to end


def _small_config(tmp_path: Path, **update) -> C.CorpusConfig:
    cultures = ["chinese", "irish"] + (["turkish"] if (SYMBTR / "symbtr-txt-half.tar.gz").is_file() else [])
    values = {"cultures": cultures, "pieces_per_culture": 4, "duration_s": 1.5, "workers": 1, "seed": 3,
              "symbtr": SYMBTR if "turkish" in cultures else None}
    values.update(update)
    return C.CorpusConfig(**values)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _check_build(out: Path, config: C.CorpusConfig, summary: C.CorpusSummary) -> list[dict[str, str]]:
    rows = _read_rows(out / "corpus.csv")
    assert list(rows[0]) == ["path", "culture", "split", "tags"]
    assert len(rows) == summary.n_pieces == 4 * len(config.cultures)
    for row in rows:
        tags = row["tags"].split("|")
        assert tags[0] == f"culture--{row['culture']}"
        assert row["split"] in {"train", "valid", "test"}
        assert row["path"] == f"audio/{row['culture']}/{Path(row['path']).name}"
        info = sf.info(str(out / row["path"]))
        assert (info.samplerate, info.channels, info.frames) == (24000, 1, 36000)
        if row["culture"] == "turkish":
            assert any(t.startswith("makam--") for t in tags) and any(t.startswith("usul--") for t in tags)
        if row["culture"] == "irish":
            assert any(t.startswith("tune_type--") for t in tags)
        if row["culture"] == "chinese":
            assert any(t.startswith("region--") for t in tags)
    assert len({r["path"] for r in rows}) == len(rows)
    return rows


def test_build_resume_and_consumers(tmp_path):
    out = tmp_path / "corpus"
    config = _small_config(tmp_path)
    summary = C.build_corpus(config, out, progress=False)
    rows = _check_build(out, config, summary)
    assert summary.rendered == len(rows) and summary.resumed == 0

    # the CSV is a prepare manifest (path, culture, split) and an evaluation CSV (path, split, tags)
    from culturemert.data import read_manifest
    from culturemert.evaluate import load_generic_csv

    manifest = read_manifest(out / "corpus.csv")
    assert [m.culture for m in manifest] == [r["culture"] for r in rows]
    assert all(Path(m.path).is_file() for m in manifest)
    dataset = load_generic_csv(out / "corpus.csv")
    assert len(dataset.items) == len(rows) and not dataset.missing_audio

    report = C.build._load_json(out / "corpus.json")
    assert report["pieces_per_culture"] == {c: 4 for c in config.cultures}
    assert report["synthesizer"] == summary.synthesizer

    # rerun: nothing rendered, files untouched
    mtimes = {r["path"]: (out / r["path"]).stat().st_mtime_ns for r in rows}
    csv_before = (out / "corpus.csv").read_bytes()
    again = C.build_corpus(config, out, progress=False)
    assert (again.rendered, again.resumed) == (0, len(rows))
    assert {p: (out / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert (out / "corpus.csv").read_bytes() == csv_before

    # a missing or truncated file is rendered again, and only that one
    victim, gone = out / rows[0]["path"], out / rows[-1]["path"]
    original = victim.read_bytes()
    victim.write_bytes(original[:1000])
    gone.unlink()
    third = C.build_corpus(config, out, progress=False)
    assert (third.rendered, third.resumed) == (2, len(rows) - 2)
    assert victim.read_bytes() == original and gone.is_file()

    # different rendering settings in the same folder are refused
    with pytest.raises(DataError, match="different settings"):
        C.build_corpus(config.model_copy(update={"seed": 4}), out, progress=False)


def test_same_seed_same_bytes_across_worker_counts(tmp_path):
    """Rendering order differs between 1 and 2 workers; the CSV and every audio byte must not."""
    config = _small_config(tmp_path)
    one = tmp_path / "one"
    C.build_corpus(config, one, progress=False)
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(one / ".notes-cache.json", two / ".notes-cache.json")  # skip re-parsing in the workers
    C.build_corpus(config.model_copy(update={"workers": 2}), two, progress=False)
    assert (one / "corpus.csv").read_bytes() == (two / "corpus.csv").read_bytes()
    for row in _read_rows(one / "corpus.csv"):
        assert (one / row["path"]).read_bytes() == (two / row["path"]).read_bytes(), row["path"]
    other = tmp_path / "other"
    shutil.copytree(one, other, ignore=shutil.ignore_patterns("audio", "corpus.*", ".corpus-build.json"))
    C.build_corpus(config.model_copy(update={"seed": 4}), other, progress=False)
    assert (one / "corpus.csv").read_bytes() != (other / "corpus.csv").read_bytes()


@needs_fluidsynth
def test_fluidsynth_output_does_not_depend_on_previous_pieces():
    soundfont = C.resolve_soundfont(None)
    notes_a = [C.ScheduledNote(0.3 * i, 0.3 * i + 0.5, 60 + i % 12 + 0.3, 100) for i in range(20)]
    notes_b = [C.ScheduledNote(0.25 * i, 0.25 * i + 0.2, 67 + (i * 5) % 7, 90) for i in range(16)]
    used = C.FluidSynthRenderer(soundfont, 24000)
    used.render(notes_a, 40, 24000 * 3 + 13)
    after_a = used.render(notes_b, 73, 24000 * 3)
    fresh = C.FluidSynthRenderer(soundfont, 24000).render(notes_b, 73, 24000 * 3)
    np.testing.assert_array_equal(after_a, fresh)
    assert np.abs(fresh).max() > 0.01


@needs_fluidsynth
def test_fluidsynth_pieces_render_identically_in_any_order():
    """Workers take pieces in whatever order they free up, so a piece must not depend on the pieces a process
    rendered before it. Dense, bent, overlapping notes over the whole instrument pool (a persistent synthesiser
    with a warmed-up voice pool failed this for a quarter of the quickstart's pieces)."""
    renderer = C.FluidSynthRenderer(C.resolve_soundfont(None), 24000)
    rng = np.random.default_rng(5)
    pieces = []
    for k in range(10):
        notes, t = [], 0.0
        while t < 2.5:
            length = float(rng.uniform(0.05, 0.6))
            pitch = float(rng.integers(40, 90)) + float(rng.choice([0.0, 0.25, 0.5, 0.77]))
            notes.append(C.ScheduledNote(t, t + length, pitch, int(rng.integers(60, 120))))
            t += length * float(rng.uniform(0.3, 1.0))
        pieces.append((notes, (0, 24, 40, 68, 71, 73)[k % 6], 24000 * 3 - int(rng.integers(0, 200))))
    forward = [renderer.render(*piece) for piece in pieces]
    backward = [renderer.render(*piece) for piece in reversed(pieces)][::-1]
    for k, (a, b) in enumerate(zip(forward, backward)):
        np.testing.assert_array_equal(a, b, err_msg=f"piece {k}")


def test_additive_build_when_fluidsynth_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fluidsynth", None)
    config = _small_config(tmp_path, cultures=["chinese"], symbtr=None)
    summary = C.build_corpus(config, tmp_path / "additive", progress=False)
    assert summary.synthesizer == "additive" and summary.n_pieces == 4 and summary.render_failures == 0
    audio, rate = sf.read(str(tmp_path / "additive" / _read_rows(tmp_path / "additive" / "corpus.csv")[0]["path"]))
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(audio**2)))
    assert rate == 24000 and abs(rms_dbfs - config.target_rms_dbfs) < 0.5


def test_cli_builds_from_yaml_with_flag_overrides(tmp_path, capsys):
    from culturemert.cli import main

    config = tmp_path / "corpus.yaml"
    config.write_text("duration_s: 1.0\npieces_per_culture: 9\nworkers: 1\ntranspose_semitones: 0\n")
    out = tmp_path / "cli"
    rc = main(["corpus", "--out", str(out), "--config", str(config), "--per-culture", "2", "--cultures", "chinese",
               "--seed", "5", "--no-progress"])
    assert rc == 0
    rows = _read_rows(out / "corpus.csv")
    assert len(rows) == 2 and {r["culture"] for r in rows} == {"chinese"}
    report = C.build._load_json(out / "corpus.json")
    assert report["config"]["seed"] == 5 and report["config"]["duration_s"] == 1.0
    assert report["config"]["transpose_semitones"] == 0
    assert sf.info(str(out / rows[0]["path"])).frames == 24000
    config.write_text("duraton_s: 1.0\n")
    assert main(["corpus", "--out", str(tmp_path / "bad"), "--config", str(config)]) == 2
    assert "duraton_s: unknown key" in capsys.readouterr().err
