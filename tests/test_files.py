"""culturemert.files: atomic writers give files and directories the permissions the umask gives plain ones."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from culturemert.files import atomic_write, atomic_write_bytes, atomic_write_text, save_npy_atomic
from culturemert.model import build_model, load_model, save_export


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _plain_modes(directory: Path) -> tuple[int, int]:
    """What a file made with open() and a directory made with mkdir() get right now (the reference)."""
    (directory / "plain.txt").write_text("x")
    (directory / "plain-dir").mkdir()
    return _mode(directory / "plain.txt"), _mode(directory / "plain-dir")


def test_current_umask_reads_the_process_umask(umask):
    from culturemert.files import current_umask

    assert current_umask() == umask
    assert os.umask(umask) == umask  # reading it did not change it


def test_atomic_writers_give_files_the_umask_default_mode(tmp_path, umask):
    file_mode, _ = _plain_modes(tmp_path)
    assert file_mode == {0o022: 0o644, 0o027: 0o640}[umask]
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_write_text(tmp_path / "b.txt", "abc")
    atomic_write(tmp_path / "c.csv", lambda fh: fh.write("a,b\n"), mode="w")
    save_npy_atomic(tmp_path / "d.npy", np.arange(3))
    for name in ("a.bin", "b.txt", "c.csv", "d.npy"):
        assert _mode(tmp_path / name) == file_mode, name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_writers_that_want_a_file_name_get_the_umask_default_mode(tmp_path, umask):
    from culturemert.files import atomic_path

    file_mode, _ = _plain_modes(tmp_path)
    with atomic_path(tmp_path / "e.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors replaces the file with a 0600 one of its own
    with atomic_path(tmp_path / "f.npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(2, 3))
        mm[:] = 1.0
        mm.flush()
        del mm
    for name in ("e.safetensors", "f.npy"):
        assert _mode(tmp_path / name) == file_mode, name
    assert torch.equal(load_file(tmp_path / "e.safetensors")["w"], torch.zeros(2))
    assert np.load(tmp_path / "f.npy").sum() == 6.0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_explicit_file_mode_still_wins(tmp_path, umask):
    atomic_write_bytes(tmp_path / "private", b"x", file_mode=0o600)
    assert _mode(tmp_path / "private") == 0o600


def test_atomic_path_removes_the_temp_file_and_keeps_the_old_one_on_failure(tmp_path):
    from culturemert.files import atomic_path

    atomic_write_text(tmp_path / "x.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("writer failed")
    assert (tmp_path / "x.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_temp_dirs_get_the_umask_default_mode(tmp_path, umask):
    from culturemert.files import apply_default_modes, make_temp_dir

    file_mode, dir_mode = _plain_modes(tmp_path)
    tmp = make_temp_dir(tmp_path, prefix=".t.")
    assert _mode(tmp) == dir_mode
    (tmp / "sub").mkdir(mode=0o700)
    save_file({"w": torch.zeros(1)}, str(tmp / "sub" / "w.safetensors"))
    assert _mode(tmp / "sub" / "w.safetensors") == 0o600
    apply_default_modes(tmp)
    assert _mode(tmp / "sub") == dir_mode and _mode(tmp / "sub" / "w.safetensors") == file_mode


def test_export_files_and_directory_get_the_umask_default_mode(tmp_path, umask):
    """`convert`'s model.safetensors was 0600 and its directory 0700 whatever the umask."""
    file_mode, dir_mode = _plain_modes(tmp_path)
    out = save_export(build_model("tiny", seed=0), tmp_path / "export")
    assert _mode(out) == dir_mode
    modes = {p.name: _mode(p) for p in out.iterdir()}
    assert "model.safetensors" in modes and "pretraining_heads.safetensors" in modes
    assert modes == {name: file_mode for name in modes}
    load_model(out)  # and it still verifies
