"""Dataset loaders: real published metadata (../shared/data) and fixtures in the published formats."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from culturemert.config import parse_config
from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.datasets.lyra import lyra_validation_indices
from culturemert.evaluate.datasets.marble import mtat_tag_name
from culturemert.evaluate.datasets import (
    DatasetConfig,
    dunya_recording_tags,
    fetch_dunya_metadata,
    load_dataset,
    load_dataset_from_config,
    load_dunya,
    load_fma,
    load_generic_csv,
    load_lyra,
    load_magnatagatune,
    read_legacy_pickle,
    read_pickled_npy,
    top_n_vocabulary,
)

SHARED = Path(os.environ.get("CULTUREMERT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real metadata not available: {path} (set CULTUREMERT_SHARED_DATA or provide ../shared/data)")
    return path


_REPORT_ROW = re.compile(r"^\s*(.+?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s*$")


def ccml_report(dataset: str) -> list[tuple[str, int]]:
    """(tag, test support) rows of ccml's sklearn classification report, in report (= vocabulary) order."""
    rows = []
    for line in shared("ccml", "evaluation", dataset, "vgg_ish.txt").read_text(encoding="utf-8").splitlines():
        match = _REPORT_ROW.match(line)
        if match and not match.group(1).endswith(" avg"):
            rows.append((match.group(1), int(match.group(5))))
    return rows


# ------------------------------------------------------------------------------------------------ real data


def test_lyra_real_split_vocabulary_and_supports():
    data = shared("lyra", "data")
    ds = load_lyra(data / "raw.tsv", data / "split")
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [1116, 124, 330]
    report = ccml_report("lyra")
    # same tags in the same order: count, then code-point order (first-seen order would swap Lyra/Oud)
    assert ds.vocabulary == [tag for tag, _ in report]
    assert "place--None" in ds.vocabulary
    assert ds.label_matrix("test").sum(axis=0).tolist() == [support for _, support in report]
    # the split files repeat raw.tsv's columns: reading tags from them gives the same dataset
    alone = load_lyra(None, data / "split")
    assert alone.vocabulary == ds.vocabulary and [i.tags for i in alone.items] == [i.tags for i in ds.items]


def test_lyra_validation_matches_ccml_global_rng_rule():
    n = 1240
    indices = list(range(n))
    state = np.random.get_state()
    try:
        np.random.seed(10)  # ccml's torch_train_val_split, verbatim rule
        np.random.shuffle(indices)
    finally:
        np.random.set_state(state)
    assert lyra_validation_indices(n, 0.1, 10) == sorted(indices[:124])
    assert lyra_validation_indices(n, 0.1, 11) != sorted(indices[:124])


def test_fma_real_metadata_npy_split_and_vocabulary():
    split = shared("ccml", "fma", "split")
    ds = load_fma(split / "metadata.npy", split)
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [17486, 2498, 4996]
    report = ccml_report("fma")
    assert ds.vocabulary == [tag for tag, _ in report]  # includes the Downtempo/Soundtrack tie at 557
    assert ds.label_matrix("test").sum(axis=0).tolist() == [support for _, support in report]
    # the restricted reader gives what np.load(allow_pickle=True) gives on this (trusted, published) file
    assert read_pickled_npy(split / "metadata.npy") == np.load(split / "metadata.npy", allow_pickle=True).item()


@pytest.mark.parametrize(
    "tradition, sizes", [("makam", (3709, 529, 1059)), ("hindustani", (844, 120, 240)), ("carnatic", (1829, 261, 522))]
)
def test_dunya_real_split_sizes(tmp_path, tradition, sizes):
    split = shared("ccml", tradition, "split")
    ids = [str(x) for s in ("train", "valid", "test") for x in np.load(split / f"{s}.npy", allow_pickle=False)]
    metadata = tmp_path / "tags.json"
    metadata.write_text(json.dumps({rid: [f"form--f{i % 7}"] for i, rid in enumerate(ids)}))
    ds = load_dunya(tradition, metadata, split)
    assert tuple(len(ds.split(s)) for s in ("train", "valid", "test")) == sizes
    assert len(ds.vocabulary) == 7


def _write_mtat_annotations(path: Path, clips_and_tags: list[tuple[str, list[str]]], tag_columns: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerow(["clip_id", *tag_columns, "mp3_path"])
        for i, (mp3, tags) in enumerate(clips_and_tags):
            writer.writerow([str(i + 2), *("1" if t in tags else "0" for t in tag_columns), mp3])


def test_magnatagatune_real_split_lists_and_labels(tmp_path):
    mtat = shared("mtat")
    top50 = [mtat_tag_name(t) for t in (mtat / "top50_tags.txt").read_text().split()]
    ccml_tags = [str(t) for t in np.load(shared("ccml", "magnatagatune", "split", "tags.npy"), allow_pickle=False)]
    assert sorted(top50) == sorted(ccml_tags)  # camelCase names map onto the CSV / ccml names
    lists = {s: read_legacy_pickle(mtat / f"{s}_list_pub.cP") for s in ("train", "valid", "test")}
    y = {s: np.load(mtat / f"y_{s}_pub.npy") for s in ("valid", "test")}
    rng = np.random.default_rng(0)
    rows = []
    for split, clips in lists.items():
        for k, clip in enumerate(clips):
            labels = y[split][k] if split in y else rng.integers(0, 2, 50)
            tags = [t for t, v in zip(top50, labels) if v] + ["rare tag"]
            rows.append((clip[: -len(".npy")] + ".mp3", tags))
    rows.reverse()  # annotation order must not matter
    csv_path = tmp_path / "annotations_final.csv"
    _write_mtat_annotations(csv_path, rows, ["rare tag", *sorted(top50)])
    ds = load_magnatagatune(csv_path, mtat, vocabulary=mtat / "top50_tags.txt")
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [15244, 1529, 4332]
    assert ds.vocabulary == top50
    np.testing.assert_array_equal(ds.label_matrix("test"), y["test"].astype(np.uint8))
    np.testing.assert_array_equal(ds.label_matrix("valid"), y["valid"].astype(np.uint8))
    # ccml's "index\tpath.mp3" lists name the same valid/test clips
    ccml = shared("ccml", "magnatagatune", "split")
    for split in ("valid", "test"):
        listed = {e.split("\t")[1][:-4] for e in np.load(ccml / f"{split}.npy", allow_pickle=False)}
        assert listed == {i.id for i in ds.split(split)}


# ------------------------------------------------------------------------------------------ vocabulary rule


def test_top_n_vocabulary_ties_by_code_point_not_first_seen():
    tag_lists = [["b", "o"], ["V", "a"], ["o"], ["V"], ["b", "a"]]
    # counts: a2 b2 o2 V2 -> code-point order puts uppercase first
    assert top_n_vocabulary(tag_lists, None) == ["V", "a", "b", "o"]
    assert top_n_vocabulary(tag_lists, 2) == ["V", "a"]
    assert top_n_vocabulary([["x", "x", "y"], ["y"]], None) == ["y", "x"]  # a tag counts once per item
    with pytest.raises(ConfigError, match="top_n"):
        top_n_vocabulary(tag_lists, 0)


# ------------------------------------------------------------------------------------------ Dunya fixtures


def _makam_recording(mbid, makams, usuls, instruments):
    return {
        "mbid": mbid,
        "title": f"title {mbid}",
        "releases": [],
        "works": [],
        "artists": [{"mbid": "a1", "name": "someone"}],
        "makamlist": [{"uuid": f"u-{m}", "name": m} for m in makams],
        "usullist": [{"uuid": f"u-{u}", "name": u} for u in usuls],
        "performers": [
            {"mbid": f"p{i}", "name": f"player {i}", "instrument": None if ins is None else {"mbid": "i", "name": ins}}
            for i, ins in enumerate(instruments)
        ],
    }


def _write_split(split_dir: Path, splits: dict[str, list[str]]) -> Path:
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        np.save(split_dir / f"{split}.npy", np.array(ids, dtype="<U36"), allow_pickle=False)
    return split_dir


@pytest.fixture
def makam_fixture(tmp_path):
    recordings = [
        _makam_recording("m1", ["Hicaz"], ["Aksak"], ["Voice", "Voice", "Ney"]),
        _makam_recording("m2", ["Hicaz"], ["Düyek"], ["oud", None]),
        _makam_recording("m3", ["Rast"], ["Aksak"], ["Viola"]),
        _makam_recording("m4", ["Rast"], [], ["Viola", "oud"]),
        _makam_recording("m5", ["Segah"], ["Aksak"], ["Ney"]),
        _makam_recording("m6", ["Uşşak"], ["Sofyan"], ["Kanun"]),
    ]
    metadata = tmp_path / "makam.json"
    metadata.write_text(json.dumps({r["mbid"]: r for r in recordings}, ensure_ascii=False), encoding="utf-8")
    split = _write_split(tmp_path / "split", {"train": ["m1", "m2", "m3", "m4"], "valid": ["m5"], "test": ["m6"]})
    return metadata, split, recordings


def test_dunya_makam_api_shape_prefix_top_n_ties_and_splits(makam_fixture):
    metadata, split, _ = makam_fixture
    ds = load_dunya("makam", metadata, split, top_n=5)
    assert [(i.id, i.split) for i in ds.items] == [
        ("m1", "train"), ("m2", "train"), ("m3", "train"), ("m4", "train"), ("m5", "valid"), ("m6", "test")
    ]
    assert ds.items[0].tags == ["makam--Hicaz", "usul--Aksak", "instrument--Voice", "instrument--Ney"]
    assert ds.items[1].tags == ["makam--Hicaz", "usul--Düyek", "instrument--oud"]  # null instrument skipped
    # train counts: 2 each for Viola, oud, Hicaz, Rast, Aksak; 1 for Voice, Ney, Düyek.
    # code point: "instrument--V" < "instrument--o" < "makam--" < "usul--"
    assert ds.vocabulary == ["instrument--Viola", "instrument--oud", "makam--Hicaz", "makam--Rast", "usul--Aksak"]
    assert ds.label_matrix("valid").tolist() == [[0, 0, 0, 0, 1]]
    assert ds.label_matrix("test").dtype == np.uint8 and ds.label_matrix("test").sum() == 0
    assert ds.summary()["splits"]["test"]["tags_without_positives"] == ds.vocabulary


def test_dunya_hindustani_and_carnatic_field_names():
    hindustani = {
        "mbid": "h1",
        "raags": [{"uuid": "r", "common_name": "Yaman kalyan", "name": "Yaman Kalyāṇ"}],
        "taals": [{"uuid": "t", "common_name": "Teentaal", "name": "Tīntāl"}],
        "layas": [{"uuid": "l", "common_name": "Madhya", "name": "Madhya"}],
        "forms": [{"uuid": "f", "common_name": "Khayal", "name": "Khyāl"}],
        "artists": [
            {"artist": {"mbid": "a", "name": "x"}, "instrument": {"mbid": "i", "name": "Voice"}, "lead": True, "attributes": ""},
            {"artist": {"mbid": "b", "name": "y"}, "instrument": {"mbid": "j", "name": "Tabla"}, "lead": False, "attributes": ""},
        ],
    }
    assert dunya_recording_tags("hindustani", hindustani) == [
        "raga--Yaman kalyan", "tala--Teentaal", "instrument--Voice", "instrument--Tabla", "form--Khayal"
    ]
    carnatic = {
        "mbid": "c1",
        "raaga": [{"uuid": "r", "name": "Tōḍi", "common_name": "thodi"}],
        "taala": [{"uuid": "t", "name": "Ādi", "common_name": "adi"}],
        "form": [{"name": "Kriti"}],
        "artists": [{"artist": {"mbid": "a", "name": "x"}, "instrument": {"mbid": "i", "name": "Mridangam"}}],
    }
    assert dunya_recording_tags("carnatic", carnatic) == ["raga--thodi", "tala--adi", "instrument--Mridangam", "form--Kriti"]
    with pytest.raises(ConfigError, match="tradition"):
        dunya_recording_tags("flamenco", carnatic)


def test_dunya_other_export_forms_agree(makam_fixture, tmp_path):
    metadata, split, recordings = makam_fixture
    reference = load_dunya("makam", metadata, split)
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(recordings), encoding="utf-8")
    directory = tmp_path / "recordings"
    directory.mkdir()
    for r in recordings:
        (directory / f"{r['mbid']}.json").write_text(json.dumps(r), encoding="utf-8")
    as_tags = tmp_path / "tags.json"
    as_tags.write_text(json.dumps({r["mbid"]: dunya_recording_tags("makam", r) for r in recordings}), encoding="utf-8")
    as_csv = tmp_path / "typed.csv"
    with as_csv.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mbid", "makam", "usul", "instrument"])
        for r in recordings:
            tags = dunya_recording_tags("makam", r)
            writer.writerow([r["mbid"]] + ["|".join(t.split("--", 1)[1] for t in tags if t.startswith(p)) for p in ("makam--", "usul--", "instrument--")])
    for source in (as_list, directory, as_tags, as_csv):
        ds = load_dunya("makam", source, split)
        assert ds.vocabulary == reference.vocabulary, source
        assert [sorted(i.tags) for i in ds.items] == [sorted(i.tags) for i in reference.items], source


def test_dunya_missing_metadata_error_or_drop(makam_fixture, tmp_path):
    metadata, _, _ = makam_fixture
    split = _write_split(tmp_path / "split2", {"train": ["m1", "m2", "zz"], "valid": ["m5"], "test": ["m6"]})
    with pytest.raises(DataError, match=r"no makam metadata for 1 of 5 .*zz"):
        load_dunya("makam", metadata, split)
    ds = load_dunya("makam", metadata, split, missing_metadata="drop")
    assert ds.dropped == {"no_metadata": ["zz"]} and len(ds.items) == 4


def test_dunya_audio_lookup_reports_missing(makam_fixture, tmp_path, caplog):
    metadata, split, _ = makam_fixture
    audio = tmp_path / "audios"
    (audio / "sub").mkdir(parents=True)
    (audio / "m1.mp3").write_bytes(b"")
    (audio / "sub" / "m3.flac").write_bytes(b"")
    (audio / "m2.txt").write_bytes(b"")  # not audio
    with caplog.at_level(logging.WARNING):
        ds = load_dunya("makam", metadata, split, audio_root=audio)
    assert {i.id: i.audio_path for i in ds.items}["m1"] == audio / "m1.mp3"
    assert {i.id: i.audio_path for i in ds.items}["m3"] == audio / "sub" / "m3.flac"
    assert ds.missing_audio == ["m2", "m4", "m5", "m6"]
    assert "audio not found" in caplog.text and "4 of 6" in caplog.text
    assert ds.summary()["missing_audio"] == 4


def test_fetch_dunya_metadata_with_client_is_resumable(makam_fixture, tmp_path):
    _, split, recordings = makam_fixture
    by_id = {r["mbid"]: r for r in recordings if r["mbid"] != "m4"}
    calls = []

    class FakeClient:
        def get_recording(self, mbid):
            calls.append(mbid)
            return by_id[mbid]  # m4 raises KeyError, recorded as null like ccml

    out = tmp_path / "fetched.json"
    fetch_dunya_metadata("makam", split, out, client=FakeClient())
    assert json.loads(out.read_text())["m4"] is None and len(calls) == 6
    fetch_dunya_metadata("makam", split, out, client=FakeClient())
    assert len(calls) == 6  # nothing fetched twice
    ds = load_dunya("makam", out, split, missing_metadata="drop")
    assert ds.dropped == {"no_metadata": ["m4"]}


# ------------------------------------------------------------------------------------------ FMA tracks.csv


def test_fma_tracks_csv_two_row_header(tmp_path):
    genres = tmp_path / "genres.csv"
    genres.write_text("genre_id,#tracks,parent,title,top_level\n12,1,0,Rock,12\n25,1,12,Punk,12\n15,1,0,Electronic,15\n", encoding="utf-8")
    tracks = tmp_path / "tracks.csv"
    rows = [
        ",track,track,track,set,set",
        ",genre_top,genres,genres_all,split,subset",
        "track_id,,,,,",
        '2,Rock,[25],"[12, 25]",training,small',
        "3,Electronic,[15],[15],validation,medium",
        "5,Rock,[12],[12],test,medium",
        "7,Rock,[12],[12],training,large",
    ]
    tracks.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = load_fma(tracks, genres_csv=genres)
    assert [(i.id, i.split, i.tags) for i in ds.items] == [
        ("000002", "train", ["Rock", "Punk"]), ("000003", "valid", ["Electronic"]), ("000005", "test", ["Rock"])
    ]
    assert load_fma(tracks, genre_field="genre_top", subset="large").vocabulary == ["Rock"]
    with pytest.raises(DataError, match="genres_csv"):
        load_fma(tracks)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(rows[:3] + ["2,Rock,[25]"]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:4: malformed row"):
        load_fma(bad, genres_csv=genres)


# ------------------------------------------------------------------------------------------ generic CSV


def test_generic_csv_paths_splits_vocabulary_and_missing_audio(tmp_path, caplog):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"")
    (tmp_path / "audio" / "c.wav").write_bytes(b"")
    (tmp_path / "list.csv").write_text(
        "path,split,tags\naudio/a.wav,train,mode--x|mode--y\naudio/b.wav,training,mode--x\n"
        "audio/c.wav,validation,mode--z\n/abs/none.wav,test,\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        ds = load_generic_csv(tmp_path / "list.csv")
    assert ds.name == "list"
    assert [(i.id, i.split, i.audio_path) for i in ds.items] == [
        ("audio/a", "train", tmp_path / "audio" / "a.wav"),
        ("audio/b", "train", None),
        ("audio/c", "valid", tmp_path / "audio" / "c.wav"),
        ("/abs/none", "test", None),
    ]
    assert ds.vocabulary == ["mode--x", "mode--y"]  # z never occurs in train
    assert ds.missing_audio == ["audio/b", "/abs/none"] and "2 of 4" in caplog.text
    assert load_generic_csv(tmp_path / "list.csv", top_n=1).vocabulary == ["mode--x"]


# ------------------------------------------------------------------------------------------ error messages


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"Lyra split directory not found.*nowhere"):
        load_lyra(tmp_path / "raw.tsv", tmp_path / "nowhere")
    (tmp_path / "split").mkdir()
    with pytest.raises(DataError, match=r"Lyra training split not found: .*training.tsv"):
        load_lyra(None, tmp_path / "split")
    with pytest.raises(DataError, match=r"dataset CSV not found: .*x.csv"):
        load_generic_csv(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"train split file not found"):
        load_dunya("makam", tmp_path / "m.json", tmp_path / "split")


def test_malformed_lyra_row_names_line(tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    header = "id\tinstruments\tgenres\tplace\tcoordinates\tis-danced\tyoutube-id\tstart-ts\tend-ts\n"
    (split / "training.tsv").write_text(header + "a\tVoice\tLaiko\tNone\tNone\t0\tyt\t1\t2\nb\tVoice\tLaiko\n", encoding="utf-8")
    (split / "test.tsv").write_text(header, encoding="utf-8")
    with pytest.raises(DataError, match=r"training.tsv:3: malformed row: 3 field\(s\)"):
        load_lyra(None, split)


def test_unknown_split_value(tmp_path):
    (tmp_path / "l.csv").write_text("path,split,tags\na.wav,train,x\nb.wav,holdout,x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"l.csv:3: unknown split value 'holdout'"):
        load_generic_csv(tmp_path / "l.csv")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_generic_csv(_one_row_csv(tmp_path)).split("dev")


def _big_csv(path: Path, rows: int = 5100, header: str = "path,split,tags") -> list[str]:
    lines = [f"audio/clip_{i:04d}.wav,{('train', 'valid', 'test')[i % 3]},genre--{'ab'[i % 2]}|mood--calm" for i in range(rows)]
    path.write_text(header + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return lines


def _cli_error(capsys, argv: list[str]) -> str:
    from culturemert.cli import main

    assert main(argv) == 2
    return capsys.readouterr().err


def test_evaluate_accepts_a_generic_csv_as_datasets(tmp_path):
    from culturemert.evaluate.pipeline import EvalConfig, _load_eval_config

    csv_path = tmp_path / "mytradition.csv"
    _big_csv(csv_path, rows=9)
    config, base = _load_eval_config(csv_path)
    assert isinstance(config, EvalConfig) and base == tmp_path.resolve()
    (entry,) = config.datasets
    assert (entry.kind, entry.name, entry.paths) == ("csv", "mytradition", {"path": str(csv_path.resolve())})
    dataset = load_dataset_from_config(entry, base)
    assert [it.split for it in dataset.items][:3] == ["train", "valid", "test"]
    assert dataset.vocabulary == ["mood--calm", "genre--a", "genre--b"]


@pytest.mark.parametrize("case", ["no split column", "unclosed quote", "csv under a .yaml name", "list yaml"])
def test_errors_on_large_inputs_are_one_short_line(tmp_path, capsys, case):
    # a 5,100-row input that is not what was expected: the error names the file and what was expected, in one
    # line, and never echoes the input (the old message printed the whole CSV, 316 KB)
    path = tmp_path / ("big.yaml" if "yaml" in case else "big.csv")
    if case == "list yaml":
        path.write_text("".join(f"- row {i}\n" for i in range(5100)), encoding="utf-8")
        rows = [f"row {i}" for i in range(5100)]
    else:
        rows = _big_csv(path, header="path,tags" if case == "no split column" else "path,split,tags")
    if case == "unclosed quote":
        text = path.read_text(encoding="utf-8").replace("audio/clip_0002.wav", '"audio/clip_0002.wav', 1)
        path.write_text(text, encoding="utf-8")
    err = _cli_error(capsys, ["evaluate", "--model", "baseline:logmel", "--datasets", str(path),
                              "--out", str(tmp_path / "out"), "--no-progress"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0].replace(str(path), "")) < 300, err[:500]
    assert str(path) in lines[0]
    assert sum(row in err for row in rows[:50]) <= 1
    expected = {"no split column": "missing column\(s\) split; expected 'a header row path,split,tags'",
                "unclosed quote": "big.csv:.*(malformed row|unknown split value)",
                "csv under a .yaml name": "expected a YAML mapping of EvalConfig settings.*plain text",
                "list yaml": "expected a YAML mapping of EvalConfig settings.*a list of 5100 item"}[case]
    assert re.search(expected, lines[0]), lines[0]


def test_config_errors_name_the_key_in_one_line_without_echoing_values(tmp_path):
    from culturemert.config import load_config
    from culturemert.evaluate.probe import ProbeConfig

    long_value = "x" * 10_000
    bad = tmp_path / "probe.yaml"
    bad.write_text(f"features: f\nseeds: {long_value}\nlearning_rates: [1]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad, ProbeConfig)
    message = str(info.value)
    assert "\n" not in message and len(message.replace(str(bad), "")) < 250
    assert "seeds: Input should be a valid integer" in message and "learning_rates: unknown key" in message
    text = tmp_path / "text.yaml"
    text.write_text(long_value + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"text.yaml: expected a YAML mapping of ProbeConfig settings") as info:
        load_config(text, ProbeConfig)
    assert len(str(info.value).replace(str(text), "")) < 200
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\nb: " + long_value + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line \d+, column \d+") as info:
        load_config(broken, ProbeConfig)
    assert "\n" not in str(info.value) and len(str(info.value).replace(str(broken), "")) < 150


def _one_row_csv(tmp_path: Path) -> Path:
    path = tmp_path / "one.csv"
    path.write_text("path,split,tags\na.wav,train,x\n", encoding="utf-8")
    return path


class _CreatesFile:
    """Unpickling this would call open(path, "w"), creating the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_metadata_npy_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    split = tmp_path / "split"
    split.mkdir()
    payload = np.empty((), dtype=object)
    payload[()] = {"000002": ["Rock"], "evil": _CreatesFile(marker)}
    np.save(split / "metadata.npy", payload, allow_pickle=True)
    assert b"open" in (split / "metadata.npy").read_bytes()  # the payload really is in the file
    for s in ("train", "valid", "test"):
        np.save(split / f"{s}.npy", np.array(["000002"] if s == "train" else [], dtype="<U6"))
    with pytest.raises(DataError, match=r"metadata.npy: refused or unreadable pickle: refusing to load global '(io|builtins)\.open'"):
        load_fma(split / "metadata.npy", split)
    with pytest.raises(DataError, match="refused"):
        load_dunya("makam", split / "metadata.npy", split)
    assert not marker.exists()


def test_legacy_pickle_admits_no_globals(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "train_list_pub.cP").write_bytes(pickle.dumps([_CreatesFile(marker)], protocol=0))
    with pytest.raises(DataError, match="refusing to load global"):
        read_legacy_pickle(tmp_path / "train_list_pub.cP")
    assert not marker.exists()
    (tmp_path / "ok.cP").write_bytes(pickle.dumps(["0/a.npy", "1/b.npy"], protocol=0))
    assert read_legacy_pickle(tmp_path / "ok.cP") == ["0/a.npy", "1/b.npy"]


def test_magnatagatune_hex_rule_and_bad_rows(tmp_path):
    rows = [("0/a-0-29.mp3", ["rock"]), ("b/b-0-29.mp3", ["rock", "guitar"]), ("c/c-0-29.mp3", ["guitar"]),
            ("d/d-0-29.mp3", []), ("f/e-0-29.mp3", ["rock"]), ("3/f-0-29.mp3", ["opera"])]
    csv_path = tmp_path / "annotations_final.csv"
    _write_mtat_annotations(csv_path, rows, ["rock", "guitar", "opera"])
    ds = load_magnatagatune(csv_path, top_n=2)
    assert ds.vocabulary == ["rock", "guitar"]  # 2 vs 1, opera (1) loses the tie to guitar by code point
    assert [(i.id, i.split) for i in ds.items] == [
        ("0/a-0-29", "train"), ("b/b-0-29", "train"), ("c/c-0-29", "valid"), ("f/e-0-29", "test")
    ]
    assert ds.dropped == {"no_vocabulary_tag": ["d/d-0-29", "3/f-0-29"]}
    with csv_path.open("a", encoding="utf-8") as fh:
        fh.write('"99"\t"1"\t"0/x.mp3"\n')
    with pytest.raises(DataError, match=r"annotations_final.csv:8: malformed row: 3 fields"):
        load_magnatagatune(csv_path)


# ------------------------------------------------------------------------------------------ registry, config


def test_registry_and_config(makam_fixture, tmp_path):
    metadata, split, _ = makam_fixture
    assert load_dataset("makam", metadata=metadata, split_dir=split, top_n=2).vocabulary == [
        "instrument--Viola", "instrument--oud"
    ]
    with pytest.raises(ConfigError, match="unknown dataset 'klezmer'"):
        load_dataset("klezmer")
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) splitdir .*accepted: metadata, split_dir"):
        load_dataset("makam", metadata=metadata, splitdir=split)
    with pytest.raises(ConfigError, match="'oops' is not a path argument"):
        parse_config({"kind": "makam", "paths": {"oops": "x"}}, DatasetConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"kind": "makam", "topn": 3}, DatasetConfig)
    config = parse_config(
        {"kind": "makam", "name": "turkish", "top_n": 3, "paths": {"metadata": metadata.name, "split_dir": "split"}},
        DatasetConfig,
    )
    ds = load_dataset_from_config(config, base_dir=metadata.parent)
    assert ds.name == "turkish" and len(ds.vocabulary) == 3


def test_vocabulary_file_lc_protonets_json(makam_fixture):
    metadata, split, _ = makam_fixture
    labels = shared("lc-protonets-labels", "makam.json")
    expected = json.loads(labels.read_text(encoding="utf-8"))["train"]
    ds = load_dunya("makam", metadata, split, vocabulary=labels)
    assert ds.vocabulary == expected and len(expected) == 30
    # the same 30 makam tags as ccml's report
    assert sorted(expected) == sorted(tag for tag, _ in ccml_report("makam"))
    assert ds.label_matrix("train")[:, expected.index("makam--Hicaz")].tolist() == [1, 1, 0, 0]
