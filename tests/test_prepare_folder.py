"""``culturemert prepare FOLDER --culture NAME``: a folder of audio instead of a manifest."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_fakes import LevelTeacher  # noqa: E402

from culturemert.cli import main
from culturemert.data.folder import scan_audio_folder

SR = 24_000


def _tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "greek music"
    (root / "album 1" / "disc").mkdir(parents=True)
    (root / ".git").mkdir()
    sf.write(root / "album 1" / "a.wav", _tone(3.5, 220), SR, subtype="PCM_16")
    sf.write(root / "album 1" / "disc" / "b.flac", _tone(3.5, 330), SR, format="FLAC")
    sf.write(root / "c.ogg", _tone(3.5, 440), SR, format="OGG", subtype="VORBIS")
    sf.write(root / "d.aiff", _tone(3.5, 550), SR, format="AIFF", subtype="PCM_16")
    sf.write(root / "e.dat", _tone(3.5, 660), SR, format="FLAC")  # a FLAC under a foreign extension
    (root / "notes.txt").write_text("liner notes")
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    sf.write(root / ".hidden.wav", _tone(3.5, 220), SR)
    sf.write(root / ".git" / "x.wav", _tone(3.5, 220), SR)
    return root


def _expected_split(relative: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"culturemert-valid/{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def test_scan_finds_every_readable_format_recursively_and_splits_by_path_hash(folder):
    scan = scan_audio_folder(folder, "greek", valid_fraction=0.5)
    relative = [Path(p).relative_to(folder.resolve()).as_posix() for p, _ in scan.items]
    assert relative == ["album 1/a.wav", "album 1/disc/b.flac", "c.ogg", "d.aiff", "e.dat"]
    assert dict(scan.ignored) == {".txt": 1, ".jpg": 1}
    splits = {rel: split for rel, (_, split) in zip(relative, scan.items)}
    expected = {rel: "valid" if _expected_split(rel, 0.5) else "train" for rel in relative}
    assert "valid" in expected.values() and splits == expected
    # no held-out file by hash: the smallest hash is held out so validation has crops of this culture
    small = scan_audio_folder(folder, "greek", valid_fraction=1e-9)
    assert [s for _, s in small.items].count("valid") == 1
    assert [s for _, s in scan_audio_folder(folder, "greek", valid_fraction=0.0).items] == ["train"] * 5


def test_prepare_cli_takes_a_folder_with_culture(folder, tmp_path, monkeypatch, capsys):
    from culturemert.data import PreparedDataset

    monkeypatch.setattr("culturemert.cli.prepare._build_teacher", lambda args: LevelTeacher())
    out = tmp_path / "prepared"
    args = ["prepare", str(folder), "--culture", "greek", "--valid-fraction", "0.3", "--out", str(out),
            "--workers", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "5 audio file(s) as culture 'greek'" in printed and "ignored (not audio): .jpg x1, .txt x1" in printed
    data = PreparedDataset(out)
    assert len(data) == 5 and set(data.culture) == {"greek"}
    manifest = (out / "folder-manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,culture,split" and len(manifest) == 6
    assert list(data.split) == [line.rsplit(",", 1)[1] for line in manifest[1:]]
    assert "valid" in set(data.split)
    # a re-run with the same folder resumes (the same manifest, the same plan)
    assert main(args) == 0


def test_prepare_cli_folder_errors_name_the_fix(folder, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["prepare", str(folder), "--out", out]) == 2
    assert "is a folder: pass --culture NAME" in capsys.readouterr().err
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,culture\n{folder / 'c.ogg'},greek\n")
    assert main(["prepare", str(manifest), "--culture", "greek", "--out", out]) == 2
    assert "--culture is for a folder of audio" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing here")
    assert main(["prepare", str(empty), "--culture", "greek", "--out", out]) == 2
    assert "no audio file that soundfile reads" in capsys.readouterr().err
