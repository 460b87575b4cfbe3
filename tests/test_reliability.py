"""Cross-cutting reliability and security tests (issue 9); docs/reliability.md maps each requirement to tests.

Module tests already prove most single-module guarantees (tests/test_train.py, test_data.py, test_embed.py,
test_checkpoint.py, test_datasets.py, ...). This file adds what crosses modules or was not covered:
a kill *during* a checkpoint write, SIGKILL of ``embed``, symlink loops and odd names in dataset audio roots,
configuration errors of every command before any compute, disk full / permission denied mid-write, a scan of
everything a small end-to-end run writes for pickles, inf gradients, and byte-level determinism.

Soak variants (``@pytest.mark.soak``, run with ``make soak``) repeat the crash tests many times.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _train_fakes import SyntheticSource, factory, make_prepared_dir  # noqa: E402
import test_train as _train_tests  # noqa: E402  (helpers only; its tests are collected from its own file)

from culturemert.errors import DataError, UserError  # noqa: E402
from culturemert.train import Trainer, list_checkpoints, load_checkpoint  # noqa: E402

REPO = TESTS.parent
TINY = REPO / "src" / "culturemert" / "recipes" / "tiny-test.yaml"
SR = 24_000
tiny_recipe, final_weights, assert_same, metrics = (
    _train_tests.tiny_recipe, _train_tests.final_weights, _train_tests.assert_same, _train_tests.metrics
)


def _env() -> dict[str, str]:
    # children use this process's torch thread count: results computed in a child and compared with (or resumed
    # by) this process are bit-identical only with the same float reduction order
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO / "src")}


def _tree(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not any(s in p.name for s in skip)
    }


def _tone(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _target_name(target) -> str:
    """The path a writer is writing to: a path argument, or the file behind an open handle (even an fdopen'd one)."""
    if isinstance(target, (str, os.PathLike)):
        return str(target)
    name = getattr(target, "name", "")
    if isinstance(name, int):
        return os.readlink(f"/proc/self/fd/{name}")
    return str(name)


def _enospc_after(real_write, fail_when, target_arg: int = 1):
    """Wrap a writer whose positional argument ``target_arg`` is the file (``save_file(tensors, filename)``: 1,
    ``np.save(file, array)``: 0): when ``fail_when(path)``, write some bytes to the target (as a filling disk
    would) and raise ENOSPC the way ``write(2)`` reports it: no file name attached."""

    def writer(*args, **kwargs):
        target = args[target_arg]
        if fail_when(_target_name(target)):
            if isinstance(target, (str, os.PathLike)):
                Path(target).write_bytes(b"\0" * 64)
            else:
                target.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(*args, **kwargs)

    return writer


# ====================================================================================================
# §1 crash safety: SIGKILL while a checkpoint is being written; keep the last K
# ====================================================================================================
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of test_train's two-stage tiny recipe on synthetic codes."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(tiny_recipe(), out, source_factory=factory()).run()
    return out


_KILL_DURING_SAVE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import culturemert.train.checkpoints as T
    from culturemert.train import Trainer
    from _train_fakes import factory
    from test_train import tiny_recipe
    real = T.save_file
    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        # the checkpoint of global step {step}: stall after its first file so the parent kills mid-write
        if "/.tmp-ckpt-g{step:09d}" in filename and filename.endswith("model.safetensors"):
            time.sleep(120)
    T.save_file = save_file
    Trainer(tiny_recipe(), {out!r}, source_factory=factory()).run()
    """
)


def _kill_during_checkpoint_write(out: Path, step: int) -> None:
    script = _KILL_DURING_SAVE.format(tests=str(TESTS), out=str(out), step=step)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stderr=subprocess.PIPE)
    ckpts = out / "checkpoints"
    deadline = time.time() + 120
    torn = None
    while time.time() < deadline and proc.poll() is None and torn is None:
        torn = next((p for p in ckpts.glob(f".tmp-ckpt-g{step:09d}*") if (p / "model.safetensors").is_file()), None)
        time.sleep(0.02)
    if proc.poll() is not None:
        raise AssertionError(f"trainer exited before the kill: {proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert torn is not None and torn.is_dir(), "no checkpoint write in progress was observed"


def test_sigkill_during_checkpoint_write_then_resume_is_bit_identical(tmp_path, reference_run):
    run = tmp_path / "run"
    _kill_during_checkpoint_write(run, step=4)  # stage 2's first checkpoint
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.glob(".tmp-ckpt-*")], "the kill should leave the torn temp dir behind"
    on_disk = list_checkpoints(ckpts)
    assert [p.name for p in on_disk] == ["ckpt-g000000002-s00-000000002", "ckpt-g000000003-s00-000000003"]
    for ckpt in on_disk:  # nothing under a final name is torn
        load_checkpoint(ckpt)
    Trainer(tiny_recipe(), run, source_factory=factory()).run()
    assert_same(final_weights(reference_run), final_weights(run))
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the torn temp dir was cleaned


def test_only_the_last_k_checkpoints_are_kept_and_each_verifies(reference_run):
    kept = list_checkpoints(reference_run / "checkpoints")
    # saves at global steps 2, 3 (end of stage 1), 4, 6, 8 (end of stage 2); keep_last = 3
    assert [p.name for p in kept] == [
        "ckpt-g000000004-s01-000000001", "ckpt-g000000006-s01-000000003", "ckpt-g000000008-s01-000000005"
    ]
    for path in kept:
        manifest = json.loads((path / "manifest.json").read_text())
        assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
        assert load_checkpoint(path).state.global_step == int(path.name[6:15])


# ----------------------------------------------------------------------------------------------------
# SIGKILL of `culturemert embed`
_SLOW_EMBED = textwrap.dedent(
    """
    import sys, time
    from culturemert.evaluate import embed as E
    from culturemert.evaluate.encoders import LogMelEncoder
    real = LogMelEncoder.__call__
    def slow(self, wav, with_frames):
        time.sleep(0.25)
        return real(self, wav, with_frames)
    LogMelEncoder.__call__ = slow
    # tracks of one group are written one after another: space the writes out so that the kill can land
    # between them however fast the machine computes the group
    real_save = E.save_npy_atomic
    def slow_save(path, array):
        real_save(path, array)
        time.sleep(0.3)
    E.save_npy_atomic = slow_save
    from culturemert.cli import main
    raise SystemExit(main(sys.argv[1:]))
    """
)


def _embed_args(audio: Path, out: Path) -> list[str]:
    return ["embed", "baseline:logmel", str(audio), "--out", str(out), "--window", "1", "--batch", "2", "--no-progress"]


def _audio_folder(root: Path, n: int, seconds: float = 2.0) -> Path:
    folder = root / "audio ü"
    folder.mkdir(parents=True)
    for k in range(n):
        sf.write(folder / f"track {k}.wav", _tone(seconds, seed=k), SR, subtype="FLOAT")
    return folder


def _consolidated(out: Path) -> dict[str, np.ndarray]:
    return {n: np.load(out / "files" / n, allow_pickle=False) for n in ("features.npy", "chunk_track.npy", "labels.npy")}


def test_sigkill_of_embed_then_resume_equals_clean_run(tmp_path):
    from culturemert.cli import main

    audio = _audio_folder(tmp_path, 8)
    assert main(_embed_args(audio, tmp_path / "clean")) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EMBED, *_embed_args(audio, run)], env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((run / "cache").rglob("*.npy"))) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, "embed finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(list((run / "cache").rglob("*.npy")))
    assert 3 <= done < 8 and not (run / "files" / "features.npy").exists()
    assert main(_embed_args(audio, run)) == 0
    clean, resumed = _consolidated(tmp_path / "clean"), _consolidated(run)
    for name in clean:
        assert clean[name].shape == resumed[name].shape and np.array_equal(clean[name], resumed[name]), name
    meta = json.loads((run / "files" / "meta.json").read_text())
    assert [t["id"] for t in meta["tracks"]] == [f"track {k}.wav" for k in range(8)]


# ====================================================================================================
# §2 hostile and odd inputs through the dataset loaders
# ====================================================================================================
def test_dataset_audio_root_with_symlink_loops_unicode_and_spaces(tmp_path, caplog):
    import logging

    from culturemert.evaluate.datasets import load_dunya, load_generic_csv

    root = tmp_path / "aûdio root"
    (root / "sub dir").mkdir(parents=True)
    sf.write(root / "m1 é.wav", _tone(0.5), SR)
    sf.write(root / "sub dir" / "m2.flac", _tone(0.5, seed=1), SR, format="FLAC")
    # two links to ancestors make an unguarded os.walk(followlinks=True) exponential (2^40 paths)
    (root / "sub dir" / "up").symlink_to("..")
    (root / "self").symlink_to(".")
    (root / "loop.wav").symlink_to("loop.wav")  # a file that is a loop of itself
    recordings = {
        "m1 é": {"mbid": "m1 é", "makamlist": [{"name": "Hicaz"}], "usullist": [], "performers": []},
        "m2": {"mbid": "m2", "makamlist": [{"name": "Rast"}], "usullist": [], "performers": []},
        "loop": {"mbid": "loop", "makamlist": [{"name": "Hicaz"}], "usullist": [], "performers": []},
        "gone": {"mbid": "gone", "makamlist": [{"name": "Rast"}], "usullist": [], "performers": []},
    }
    metadata = tmp_path / "makam ü.json"
    metadata.write_text(json.dumps(recordings, ensure_ascii=False), encoding="utf-8")
    split = tmp_path / "split"
    split.mkdir()
    for name, ids in {"train": ["m1 é", "m2", "loop"], "valid": ["gone"], "test": []}.items():
        np.save(split / f"{name}.npy", np.array(ids, dtype="<U36"), allow_pickle=False)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        ds = load_dunya("makam", metadata, split, audio_root=root)
    assert time.perf_counter() - start < 5
    paths = {i.id: i.audio_path for i in ds.items}
    assert paths["m1 é"] == root / "m1 é.wav" and paths["m2"] == root / "sub dir" / "m2.flac"
    assert paths["gone"] is None and ds.missing_audio == ["gone"] and "1 of 4" in caplog.text
    # the looping file is found by name; decoding it is what fails, with a per-file reason (embed reports it)
    from culturemert.evaluate.embed import EmbedSettings, embed_dataset
    from culturemert.evaluate.encoders import LogMelEncoder

    settings = EmbedSettings(window=0.5, batch_size=2, device="cpu", decode_workers=0)
    out, report = embed_dataset(LogMelEncoder(), ds, tmp_path / "feats" / "makam", settings, progress=False)
    assert set(report.keys) == {"m1 é", "m2"}
    assert "symlink loop" in report.errors["loop"] and "gone" in report.errors
    # the generic CSV loader: Unicode and spaces in paths, a missing file, a loop
    (tmp_path / "list ü.csv").write_text(
        "path,split,tags\naûdio root/m1 é.wav,train,a\naûdio root/loop.wav,train,a\naûdio root/none.wav,test,b\n",
        encoding="utf-8",
    )
    csv_ds = load_generic_csv(tmp_path / "list ü.csv")
    assert [i.audio_path for i in csv_ds.items] == [root / "m1 é.wav", None, None]
    assert csv_ds.missing_audio == ["aûdio root/loop", "aûdio root/none"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "invalid JSON|empty"),
        (b'{"m1": {"mbid": "m1", "makamlist": [{"name": 1}]', "invalid JSON|malformed"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
)
def test_malformed_dataset_metadata_is_a_dataerror_naming_the_file(tmp_path, content, message):
    from culturemert.evaluate.datasets import load_dunya

    metadata = tmp_path / "bad meta.json"
    metadata.write_bytes(content)
    split = tmp_path / "split"
    split.mkdir()
    for name, rid in (("train", "m1"), ("valid", "m2"), ("test", "m3")):
        np.save(split / f"{name}.npy", np.array([rid], dtype="<U36"), allow_pickle=False)
    with pytest.raises(DataError, match=message) as info:
        load_dunya("makam", metadata, split)
    assert "bad meta.json" in str(info.value)


def test_non_utf8_or_ragged_dataset_csv_is_a_dataerror_naming_file_and_line(tmp_path):
    from culturemert.evaluate.datasets import load_generic_csv

    (tmp_path / "latin1.csv").write_bytes("path,split,tags\ncaf\xe9.wav,train,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: not UTF-8"):
        load_generic_csv(tmp_path / "latin1.csv")
    (tmp_path / "ragged.csv").write_text("path,split,tags\na.wav,train,x\nb.wav,train\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.csv:3: malformed row"):
        load_generic_csv(tmp_path / "ragged.csv")


# ====================================================================================================
# §3 configuration errors fail before any compute, naming the key or path
# ====================================================================================================
class _ComputeStarted(Exception):
    pass


@pytest.fixture()
def no_compute(monkeypatch):
    """Any model load, training run, prepare, embedding or probe raises: a config error must come first."""

    def boom(*a, **k):
        raise _ComputeStarted

    import culturemert.data as data
    import culturemert.evaluate.embed as embed
    # modules that bind these functions by name at import: import them first (with the real functions) and
    # patch their bindings too, so nothing patched here outlives the test
    import culturemert.evaluate.pipeline as pipeline
    import culturemert.evaluate.probe as probe
    import culturemert.evaluate.probe.run as probe_run
    import culturemert.merge as merge
    import culturemert.merge.engine as merge_engine
    import culturemert.model as model

    monkeypatch.setattr(model, "build_model", boom)
    monkeypatch.setattr(Trainer, "run", boom)
    monkeypatch.setattr(data, "prepare", boom)
    monkeypatch.setattr(embed, "embed_tracks", boom)
    monkeypatch.setattr(probe, "run_probe", boom)
    monkeypatch.setattr(probe_run, "run_probe", boom)
    monkeypatch.setattr(pipeline, "run_probe", boom)
    monkeypatch.setattr(pipeline, "embed_dataset", boom)
    monkeypatch.setattr(merge, "merge_with_report", boom)
    monkeypatch.setattr(merge_engine, "merge_with_report", boom)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _config_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(label, argv, expected message) for each command that reads a config or options."""
    feats = tmp / "feats"
    feats.mkdir(exist_ok=True)
    recipe = str(TINY)
    fake_prepared = tmp / "prepared"
    fake_prepared.mkdir(exist_ok=True)
    (fake_prepared / "index.json").write_text("{}")
    audio = tmp / "audio"
    audio.mkdir(exist_ok=True)
    sf.write(audio / "a.wav", _tone(0.5), SR)
    eval_ok = "datasets: [{kind: csv, paths: {path: list.csv}}]\n"
    return [
        ("recipe unknown key", ["pretrain", recipe, "stages.0.stepz=3", "--out", str(tmp / "o")], "stages.0.stepz: unknown key"),
        ("recipe wrong type", ["pretrain", recipe, "seed=abc", "--out", str(tmp / "o")], "seed"),
        ("recipe replay > 1", ["pretrain", recipe, "stages.0.mixture.replay={western: 1.5}", "--out", str(tmp / "o")], "replay"),
        ("recipe missing file", ["pretrain", str(tmp / "nope.yaml"), "--out", str(tmp / "o")], "nope.yaml"),
        ("recipe missing data", ["pretrain", recipe, f"data.dirs=[{tmp / 'no data'}]", "--out", str(tmp / "o")], "no data"),
        ("recipe missing base", ["pretrain", recipe, f"data.dirs=[{fake_prepared}]", f"base={{source: {tmp / 'no-model'}}}",
                                 "--out", str(tmp / "o")], "no-model"),
        ("probe unknown key", ["probe", str(_write(tmp / "p1.yaml", f"features: {feats}\nlearning_rates: [1e-3]\n"))], "learning_rates: unknown key"),
        ("probe wrong type", ["probe", str(_write(tmp / "p2.yaml", f"features: {feats}\nseeds: many\n"))], "seeds"),
        ("probe bad value", ["probe", str(_write(tmp / "p3.yaml", f"features: {feats}\nlrs: [-1]\n"))], "lrs"),
        ("probe missing file", ["probe", str(tmp / "missing probe.yaml")], "missing probe.yaml"),
        ("probe missing features", ["probe", str(_write(tmp / "p4.yaml", f"features: {tmp / 'no feats'}\n"))], "no feats"),
        ("evaluate unknown key", ["evaluate", "--model", "baseline:logmel", "--datasets",
                                  str(_write(tmp / "e1.yaml", eval_ok + "embed: {windoww: 5}\n")), "--out", str(tmp / "o")], "windoww"),
        ("evaluate wrong type", ["evaluate", "--model", "baseline:logmel", "--datasets",
                                 str(_write(tmp / "e2.yaml", eval_ok + "probe: {seeds: many}\n")), "--out", str(tmp / "o")], "seeds"),
        ("evaluate missing dataset file", ["evaluate", "--model", "baseline:logmel", "--datasets",
                                           str(_write(tmp / "e3.yaml", eval_ok)), "--out", str(tmp / "o")], "list.csv"),
        ("evaluate missing model", ["evaluate", "--model", "baseline:logmel", str(tmp / "no model dir"), "--datasets",
                                    str(_write(tmp / "e4.yaml", "datasets: [{kind: csv, paths: {path: ok.csv}}]\n")), "--out", str(tmp / "o")],
         "no model dir"),
        ("merge bad density", ["merge", "--base", "b", "--models", "m", "--method", "ties", "--density", "1.5",
                               "--out", str(tmp / "o")], "density"),
        ("merge bad drop rate", ["merge", "--base", "b", "--models", "m", "--method", "dare", "--drop-rate", "1",
                                 "--out", str(tmp / "o")], "drop_rate"),
        ("merge missing model", ["merge", "--base", str(tmp / "no base"), "--models", str(tmp / "no model"),
                                 "--out", str(tmp / "o")], "no base|no model"),
        ("corpus unknown key", ["corpus", "--config", str(_write(tmp / "c1.yaml", "piecez: 3\n")), "--out", str(tmp / "o")], "piecez: unknown key"),
        ("corpus wrong type", ["corpus", "--config", str(_write(tmp / "c2.yaml", "duration_s: long\n")), "--out", str(tmp / "o")], "duration_s"),
        ("corpus missing file", ["corpus", "--config", str(tmp / "no corpus.yaml"), "--out", str(tmp / "o")], "no corpus.yaml"),
        ("prepare missing manifest", ["prepare", str(tmp / "no manifest.csv"), "--out", str(tmp / "o"), "--teacher", "kmeans"],
         "no manifest.csv"),
        ("prepare malformed manifest", ["prepare", str(_write(tmp / "m.csv", "path,label\na.wav,x\n")), "--out", str(tmp / "o"),
                                        "--teacher", "kmeans"], "culture"),
        ("embed missing input", ["embed", "baseline:logmel", str(tmp / "no audio"), "--out", str(tmp / "o")], "no audio"),
        ("embed missing model", ["embed", str(tmp / "no model"), str(audio), "--out", str(tmp / "o")], "no model"),
    ]


def test_configuration_errors_fail_before_any_compute_naming_key_or_path(tmp_path, no_compute, capsys):
    from culturemert.cli import main

    (tmp_path / "ok.csv").write_text("path,split,tags\na.wav,train,x\n", encoding="utf-8")
    failures = []
    for label, argv, message in _config_cases(tmp_path):
        start = time.perf_counter()
        try:
            code = main(argv)
        except _ComputeStarted:
            failures.append(f"{label}: compute started before the error")
            continue
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        if code != 2:
            failures.append(f"{label}: exit {code}, stderr {err[-300:]!r}")
        elif message not in err and not any(m in err for m in message.split("|")):
            failures.append(f"{label}: {message!r} not in {err[-300:]!r}")
        elif "Traceback" in err:
            failures.append(f"{label}: traceback instead of a one-line error")
        if time.perf_counter() - start > 5:
            failures.append(f"{label}: took {time.perf_counter() - start:.1f} s")
        if (tmp_path / "o").exists():
            failures.append(f"{label}: created the output directory")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------------
# disk full / permission denied while writing
def test_disk_full_while_writing_a_checkpoint(tmp_path, reference_run, monkeypatch):
    import culturemert.train.checkpoints as checkpoints

    monkeypatch.setattr(
        checkpoints, "save_file", _enospc_after(checkpoints.save_file, lambda n: "ckpt-g000000004" in n and n.endswith("optimizer.safetensors"))
    )
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write checkpoint .*ckpt-g000000004.*No space left on device"):
        Trainer(tiny_recipe(), run, source_factory=factory()).run()
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] and not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert [p.name for p in list_checkpoints(ckpts)][-1] == "ckpt-g000000003-s00-000000003"
    monkeypatch.undo()
    Trainer(tiny_recipe(), run, source_factory=factory()).run()  # space freed: resume, still exact
    assert_same(final_weights(reference_run), final_weights(run))


def test_disk_full_while_writing_an_export_keeps_the_old_export(tmp_path, monkeypatch):
    import culturemert.model.export as export
    from culturemert.model import build_model, load_model

    old = export.save_export(build_model("tiny", seed=0), tmp_path / "export")
    before = _tree(old)
    monkeypatch.setattr(
        export, "save_file", _enospc_after(export.save_file, lambda n: n.endswith("pretraining_heads.safetensors"))
    )
    with pytest.raises(OSError) as info:
        export.save_export(build_model("tiny", seed=1), tmp_path / "export")
    assert info.value.errno == errno.ENOSPC
    assert _tree(tmp_path / "export") == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    load_model(tmp_path / "export")  # checksums still verify


def _prepare_corpus(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,culture,split"]
    for k in range(n):
        sf.write(root / f"f {k}.wav", _tone(4.0, seed=k), SR)
        lines.append(f"f {k}.wav,{'western' if k % 2 else 'makam'},train")
    (root / "m.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "m.csv"


def test_disk_full_during_prepare_leaves_nothing_trusted_and_resume_is_exact(tmp_path, monkeypatch):
    from _train_fakes import LevelTeacher

    from culturemert.data import prepare

    manifest = _prepare_corpus(tmp_path / "corpus")
    prepare(manifest, tmp_path / "clean", LevelTeacher(), shard_seconds=4, progress=False, workers=0)
    monkeypatch.setattr(np, "save", _enospc_after(np.save, lambda n: "codes-00002" in n, 0))
    with pytest.raises((OSError, DataError)) as info:
        prepare(manifest, tmp_path / "full", LevelTeacher(), shard_seconds=4, progress=False, workers=0)
    assert "No space left" in str(info.value) or getattr(info.value, "errno", None) == errno.ENOSPC
    out = tmp_path / "full"
    assert not (out / "index.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    for shard in (out / "shards").glob("*.npy"):  # every shard under its final name is complete
        np.load(shard, allow_pickle=False)
    monkeypatch.undo()
    prepare(manifest, out, LevelTeacher(), shard_seconds=4, progress=False, workers=0)
    assert _tree(tmp_path / "clean") == _tree(out)


def test_disk_full_during_embed_then_resume_equals_clean_run(tmp_path, monkeypatch):
    from culturemert.cli import main

    audio = _audio_folder(tmp_path, 5)
    assert main(_embed_args(audio, tmp_path / "clean")) == 0
    calls = {"n": 0}

    def third_track(name):
        if name.endswith(".npy.tmp") or ".npy." in name:
            calls["n"] += 1
            return calls["n"] == 3
        return False

    monkeypatch.setattr(np, "save", _enospc_after(np.save, third_track, 0))
    run = tmp_path / "full"
    assert main(_embed_args(audio, run)) == 2  # one-line error, see the CLI test below for the message
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    for f in (run / "cache").rglob("*.npy"):
        np.load(f, allow_pickle=False)
    monkeypatch.undo()
    assert main(_embed_args(audio, run)) == 0
    clean, resumed = _consolidated(tmp_path / "clean"), _consolidated(run)
    assert all(np.array_equal(clean[k], resumed[k]) for k in clean)


def test_disk_full_and_permission_denied_are_one_line_cli_errors(tmp_path, monkeypatch, capsys):
    from culturemert.cli import main

    audio = _audio_folder(tmp_path, 2, seconds=1.0)
    monkeypatch.setattr(np, "save", _enospc_after(np.save, lambda n: True, 0))
    assert main(_embed_args(audio, tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and str(tmp_path / "a") in err
    monkeypatch.undo()

    import tempfile

    real_mkstemp = tempfile.mkstemp

    def denied(*args, dir=None, **kwargs):
        if dir is not None and str(tmp_path / "b") in str(dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert main(_embed_args(audio, tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err and str(tmp_path / "b") in err
    monkeypatch.undo()

    # a full disk while appending to the cache's hash log must stop the run, not skip every track as "unreadable"
    import culturemert.evaluate.embed as embed

    real_append = embed.append_jsonl

    def full(path, record):
        if path.name == "audio_hashes.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_append(path, record)

    monkeypatch.setattr(embed, "append_jsonl", full)
    assert main(_embed_args(audio, tmp_path / "c")) == 2
    assert "No space left on device" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory_is_a_clear_error(tmp_path, capsys):
    from culturemert.cli import main

    audio = _audio_folder(tmp_path, 1, seconds=1.0)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(_embed_args(audio, out)) == 2
        err = capsys.readouterr().err
        assert "Permission denied" in err and "Traceback" not in err
    finally:
        out.chmod(0o755)


# ====================================================================================================
# §4 safe loading: a small end-to-end run writes no pickle anywhere
# ====================================================================================================
def _pickle_like(path: Path) -> str | None:
    head = path.read_bytes()[:4]
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "raw pickle"
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith(".pkl") for n in names):
            return f"zip with pickle {[n for n in names if n.endswith('.pkl')][:2]}"
        if path.suffix == ".npz":
            for member in names:
                with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
                    np.lib.format.read_array(fh, allow_pickle=False)
    return None


def test_end_to_end_outputs_hold_no_pickle_and_npy_loads_without_pickle(tmp_path):
    from culturemert.cli import main

    prepared = make_prepared_dir(tmp_path / "prep", files_per_culture=3, valid_files=1)  # the recipe validates
    runs = tmp_path / "outputs"
    assert main(["pretrain", str(TINY), f"data.dirs=[{prepared}]", "--out", str(runs / "pretrain")]) == 0
    exports = runs / "pretrain" / "exports"
    assert main(["convert", str(exports / "final"), "--out", str(runs / "converted")]) == 0
    assert main(["merge", "--base", str(exports / "stage-1-input-side"), "--models", str(exports / "final"),
                 "--lambda", "0.5", "--allow-unrelated", "--out", str(runs / "merged")]) == 0
    assert main(["embed", str(runs / "merged"), str(tmp_path / "prep" / "audio"), "--out", str(runs / "embed"),
                 "--window", "1", "--device", "cpu", "--no-progress"]) == 0
    written = [p for p in sorted({*runs.rglob("*"), *prepared.rglob("*")}) if p.is_file()]
    assert len(written) > 20
    offenders = {str(p): why for p in written if (why := _pickle_like(p))}
    assert not offenders, offenders
    npys = [p for p in written if p.suffix == ".npy"]
    assert npys and all(np.load(p, allow_pickle=False) is not None for p in npys)
    allowed = {".safetensors", ".json", ".jsonl", ".npy", ".npz", ".csv", ".md", ".png", ".log", ".txt", ".yaml"}
    assert {p.suffix for p in written} <= allowed, {p.suffix for p in written} - allowed


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("command", ["convert", "embed", "merge"])
def test_malicious_pickle_checkpoint_is_refused_by_every_command(tmp_path, command, capsys):
    from culturemert.cli import main

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": {}}, "extra_state": _Payload(str(marker))}, evil)
    audio = _audio_folder(tmp_path, 1, seconds=1.0)
    argv = {
        "convert": ["convert", str(evil), "--out", str(tmp_path / "o")],
        "embed": ["embed", str(evil), str(audio), "--out", str(tmp_path / "o"), "--device", "cpu"],
        "merge": ["merge", "--base", str(evil), "--models", str(evil), "--out", str(tmp_path / "o")],
    }[command]
    assert main(argv) == 2
    assert "refusing to load global" in capsys.readouterr().err
    assert not marker.exists()


# ====================================================================================================
# §5 training faults: inf inputs and inf gradients are skipped and logged
# ====================================================================================================
def test_inf_input_and_inf_gradient_steps_are_skipped_and_logged(tmp_path, monkeypatch):
    class InfInput(SyntheticSource):
        def batch(self, step):
            b = super().batch(step)
            if step == 1:
                b["wav"][1, 50:60] = np.inf
            return b

    Trainer(tiny_recipe(), tmp_path / "inf", source_factory=lambda r, s, i: InfInput(4, s.crop_samples, seed=i)).run()
    skipped = [r for r in metrics(tmp_path / "inf") if r.get("skipped")]
    assert [r["global_step"] for r in skipped] == [2, 5] and all("non-finite" in r["skipped"] for r in skipped)
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "inf").values())

    # a finite loss whose gradient overflows (e.g. a bf16 overflow in backward): poison one parameter's grad
    original = Trainer._accumulate

    def poisoned(self, clean, inp, codes, mask, micro, per_rank):
        out = original(self, clean, inp, codes, mask, micro, per_rank)
        if self.state.global_step == 4:
            self.trainable_params[0].grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(Trainer, "_accumulate", poisoned)
    Trainer(tiny_recipe(), tmp_path / "grad", source_factory=factory()).run()
    recs = metrics(tmp_path / "grad")
    skipped = [r for r in recs if r.get("skipped")]
    assert [(r["global_step"], r["skipped"]) for r in skipped] == [(5, "non-finite gradient")]
    assert any(r.get("event") == "skip" and "non-finite gradient" in r["message"] for r in recs)
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "grad").values())


# ====================================================================================================
# §6 determinism: same seed -> same bytes (prepare, merge) or tensors (pretrain: test_train, probe below)
# ====================================================================================================
def test_prepare_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    from _train_fakes import LevelTeacher

    from culturemert.data import prepare

    manifest = _prepare_corpus(tmp_path / "corpus")
    prepare(manifest, tmp_path / "a", LevelTeacher(), shard_seconds=6, progress=False, workers=0)
    prepare(manifest, tmp_path / "b", LevelTeacher(), shard_seconds=6, progress=False, workers=2)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) >= 5
    assert [k for k in a if a[k] != b[k]] == []


def test_merge_is_byte_identical_for_the_same_seed_and_differs_for_another(tmp_path):
    from culturemert.model import save_export
    from culturemert.cli import main
    from culturemert.model import build_model

    base = build_model("tiny", seed=0)
    save_export(base, tmp_path / "base")
    for k in (1, 2):
        m = build_model("tiny", seed=0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.01)
        save_export(m, tmp_path / f"m{k}")
    models = [str(tmp_path / "m1"), str(tmp_path / "m2")]

    def merged(name: str, seed: int) -> dict[str, bytes]:
        argv = ["merge", "--base", str(tmp_path / "base"), "--models", *models, "--method", "dare_ties",
                "--drop-rate", "0.5", "--lambda", "0.7", "--seed", str(seed), "--out", str(tmp_path / name)]
        assert main(argv) == 0
        return _tree(tmp_path / name, skip=("culturemert.json", "README.md"))  # provenance holds paths/times

    a, b, c = merged("a", 3), merged("b", 3), merged("c", 4)
    assert a == b and "model.safetensors" in a
    assert a["model.safetensors"] != c["model.safetensors"]
    meta_a = json.loads((tmp_path / "a" / "culturemert.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "culturemert.json").read_text())
    assert meta_a["fingerprint"] == meta_b["fingerprint"] and meta_a["files"] == meta_b["files"]


def test_probe_results_are_identical_across_runs(tmp_path):
    from culturemert.evaluate.probe import ProbeSettings, results_digest, run_probe
    from test_probe import _data

    settings = ProbeSettings(lrs=[1e-3, 5e-3], seeds=2, hidden=8, max_epochs=3, device="cpu")
    first = run_probe(_data(seed=7), settings, progress=False)
    second = run_probe(_data(seed=7), settings, progress=False)
    assert results_digest(first) == results_digest(second)
    assert json.dumps(first["summary"], sort_keys=True) == json.dumps(second["summary"], sort_keys=True)
    other = run_probe(_data(seed=7), settings.model_copy(update={"seed": 99}), progress=False)
    assert results_digest(other) != results_digest(first)


# ====================================================================================================
# soak variants (make soak)
# ====================================================================================================
_SLOW_DISK_CLI = textwrap.dedent(
    """
    import sys, time
    import culturemert.train.checkpoints as T
    real = T.save_file
    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        time.sleep(0.05)  # a slow shared filesystem: each checkpoint write takes ~0.2 s, so kills can land in it
    T.save_file = save_file
    from culturemert.cli import main
    raise SystemExit(main(sys.argv[1:]))
    """
)


@pytest.mark.soak
def test_soak_many_sigkills_of_pretrain_cli_half_of_them_mid_checkpoint(tmp_path):
    """>= 10 SIGKILLs of ``culturemert pretrain`` (tiny-test recipe, checkpoint every step, a slow disk): half at
    random moments, half at a random instant inside a checkpoint write; every checkpoint on disk verifies after
    each kill and the final weights equal an uninterrupted run bit for bit."""
    kills = max(10, int(os.environ.get("CULTUREMERT_SOAK_KILLS", "12")))
    prepared = make_prepared_dir(tmp_path / "prep", files_per_culture=3, valid_files=1)  # the recipe validates
    # 80 steps, so that every kill interrupts a run that still has work to do
    args = ["pretrain", str(TINY), f"data.dirs=[{prepared}]", "stages.0.steps=20", "stages.1.steps=60"]

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _SLOW_DISK_CLI, *args, "--out", str(out)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    rng = random.Random(0)
    run = tmp_path / "run"
    mid_save = killed = 0
    for k in range(kills):
        proc = start(run)
        if k % 2:
            time.sleep(rng.uniform(2.0, 8.0))
        else:  # wait for a checkpoint write to begin, then kill at a random instant inside it
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None:
                if any((run / "checkpoints").glob(".tmp-*")):
                    time.sleep(rng.uniform(0.0, 0.15))
                    break
                time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        mid_save += any((run / "checkpoints").glob(".tmp-*"))
        for ckpt in list_checkpoints(run / "checkpoints"):
            load_checkpoint(ckpt)
    assert killed == kills, f"the run finished before kill {killed + 1}"
    last = start(run)
    assert last.wait(timeout=600) == 0, last.stderr.read().decode()
    assert_same(final_weights(tmp_path / "ref"), final_weights(run))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert mid_save >= kills // 4, f"only {mid_save} of {kills} kills landed during a checkpoint write"
    print(f"{kills} kills, {mid_save} during a checkpoint write")


@pytest.mark.soak
def test_soak_prepare_killed_many_times_equals_clean_run(tmp_path):
    from _train_fakes import LevelTeacher

    from culturemert.data import prepare

    manifest = _prepare_corpus(tmp_path / "corpus", n=12)
    prepare(manifest, tmp_path / "clean", LevelTeacher(), shard_seconds=4, progress=False, workers=0)
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from _train_fakes import LevelTeacher
        from culturemert.data import prepare
        class Slow(LevelTeacher):
            def encode(self, batch):
                time.sleep(0.2)
                return super().encode(batch)
        prepare({str(manifest)!r}, {str(tmp_path / 'killed')!r}, Slow(), shard_seconds=4, progress=False, workers=0)
        """
    )
    rng = random.Random(1)
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
        time.sleep(rng.uniform(1.5, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for shard in (tmp_path / "killed" / "shards").glob("*.npy"):
            np.load(shard, allow_pickle=False)
    prepare(manifest, tmp_path / "killed", LevelTeacher(), shard_seconds=4, progress=False, workers=0)
    assert _tree(tmp_path / "clean") == _tree(tmp_path / "killed")


@pytest.mark.soak
def test_soak_two_hour_recording_through_prepare_and_embed_in_bounded_memory(tmp_path):
    """A 2-hour 8 kHz file (173 M samples once resampled to 24 kHz) goes through prepare and embed and comes out
    whole. prepare holds one decoded item in memory (float32 at 24 kHz: 691 MB for two hours), so its peak RSS
    is checked against 2 GB rather than a streaming bound; embed decodes with --window 30 chunks."""
    seconds = 2 * 3600
    path = tmp_path / "two hours.wav"
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_16") as fh:
        block = _tone(60.0, sr=8000)
        for _ in range(seconds // 60):
            fh.write(block)
    (tmp_path / "m.csv").write_text(f"path,culture\n{path.name},western\n", encoding="utf-8")
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(TESTS)!r})
        from _train_fakes import LevelTeacher
        from culturemert.data import prepare, PreparedDataset
        summary = prepare({str(tmp_path / 'm.csv')!r}, {str(tmp_path / 'prep')!r}, LevelTeacher(), progress=False,
                          workers=0, shard_seconds=600)
        ds = PreparedDataset({str(tmp_path / 'prep')!r})
        assert len(ds) == 1 and abs(ds.length[0] - {seconds} * 24000) <= 24000, ds.length
        print("maxrss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    assert float(done.stdout.split("maxrss_mb")[-1]) < 2048
    from culturemert.cli import main

    assert main(["embed", "baseline:logmel", str(path), "--out", str(tmp_path / "emb"), "--window", "30",
                 "--no-progress"]) == 0
    feats = np.load(tmp_path / "emb" / "files" / "features.npy", allow_pickle=False)
    assert feats.shape[0] == seconds // 30 and np.isfinite(feats).all()
