"""``prepare``: a manifest → 24 kHz int16 audio shards + aligned teacher codes + the item index (see
:mod:`culturemert.data` for the layout). Resumable: a killed run continues from its last committed shard.
"""


from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from culturemert.label_grid import HOP_LENGTH, SAMPLE_RATE, check_label_alignment, label_frames
from culturemert.audio import (
    INT16_SCALE,
    DecodeReport,
    decode_to_int16,
    int16_to_float,
    probe_audio,
)
from culturemert.workers import ProcessMap
from culturemert.files import atomic_write, fsync_dir as _fsync_dir, json_text, make_temp_dir, save_npy_atomic, write_json_atomic
from culturemert.config import StrictModel, parse_config
from culturemert.errors import ConfigError, DataError
from culturemert.data.manifest import ManifestRow, read_manifest
from culturemert.teachers.base import Teacher, check_codebook_usage, teacher_fingerprint

log = logging.getLogger(__name__)

#: Version of ``index.json``; the loader refuses any other.
INDEX_VERSION = 1


def _remove_stale_tmp(directory: Path) -> None:
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):  # left by a killed run; never trusted, so safe to drop
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


@dataclass
class PrepareSummary:
    """What ``prepare`` produced; printed by the CLI."""

    out_dir: Path
    n_items: int
    hours_per_culture: dict[str, float]
    files_per_culture: dict[str, int]
    skipped: list[dict[str, Any]]
    warnings: list[dict[str, Any]]
    shards_total: int
    shards_reused: int

    def format_table(self) -> str:
        lines = [f"{'culture':<20} {'files':>7} {'hours':>9}"]
        for culture in sorted(self.hours_per_culture):
            lines.append(f"{culture:<20} {self.files_per_culture[culture]:>7} {self.hours_per_culture[culture]:>9.3f}")
        lines.append(f"{'total':<20} {sum(self.files_per_culture.values()):>7} {sum(self.hours_per_culture.values()):>9.3f}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s):")
            lines += [f"  {w['path']}: {w['warning']}" for w in self.warnings]
        return "\n".join(lines)


def _reason(exc: Exception, path: str) -> str:
    message = str(exc)
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _probe_row(task: tuple[int, str, float]) -> dict[str, Any]:
    row_id, path, min_seconds = task
    try:
        info = probe_audio(path)
    except DataError as exc:
        return {"id": row_id, "reason": _reason(exc, path)}
    except Exception as exc:  # one odd file must never stop a corpus-sized run
        return {"id": row_id, "reason": f"unexpected error while probing: {type(exc).__name__}: {exc}"}
    if 0 < info.duration < min_seconds:
        return {"id": row_id, "reason": f"too short ({info.duration:.2f} s < {min_seconds:g} s)"}
    return {"id": row_id, "seconds": info.duration, "sample_rate": info.sample_rate, "channels": info.channels}


def _decode_row(task: tuple[int, str, int, str]) -> dict[str, Any]:
    row_id, path, min_samples, nonfinite = task
    report = DecodeReport()
    try:
        samples = decode_to_int16(path, SAMPLE_RATE, nonfinite=nonfinite, report=report)  # type: ignore[arg-type]
    except DataError as exc:
        return {"id": row_id, "reason": _reason(exc, path)}
    except MemoryError:
        return {"id": row_id, "reason": "out of memory while decoding"}
    except Exception as exc:
        return {"id": row_id, "reason": f"unexpected decode error: {type(exc).__name__}: {exc}"}
    seconds = samples.size / SAMPLE_RATE
    if samples.size < min_samples:
        return {"id": row_id, "reason": f"too short ({seconds:.2f} s < {min_samples / SAMPLE_RATE:g} s)"}
    if not samples.any():
        return {"id": row_id, "reason": "silent (every sample is zero after decoding)"}
    warnings = list(report.warnings)
    at_full_scale = int(np.count_nonzero((samples == 32767) | (samples == -32768)))
    if at_full_scale > 0.001 * samples.size:
        warnings.append(f"clipping: {100 * at_full_scale / samples.size:.2f}% of samples at full scale")
    assert report.info is not None
    return {
        "id": row_id,
        "samples": samples,
        "warnings": warnings,
        "source_sample_rate": report.info.sample_rate,
        "source_channels": report.info.channels,
    }


def _teacher_spec(teacher: Any) -> dict[str, Any]:
    return {
        "name": str(teacher.name),
        "n_codebooks": int(teacher.n_codebooks),
        "codebook_size": int(teacher.codebook_size),
        "frame_rate": float(teacher.frame_rate),
        "sample_rate": int(teacher.sample_rate),
    }


def _teacher_state(teacher: Any) -> dict[str, Any] | None:
    try:
        return teacher.state()
    except Exception:  # an unfitted k-means teacher has no state yet
        return None


def _needs_fit(teacher: Any) -> bool:
    if not hasattr(teacher, "fit"):
        return False
    fitted = getattr(teacher, "is_fitted", None)
    if fitted is None:
        fitted = getattr(teacher, "fitted", None)
    return not bool(fitted() if callable(fitted) else fitted)


def _shard_name(kind: str, k: int, ext: str) -> str:
    return f"shards/{kind}-{k:05d}.{ext}"


def _plan_shards(estimates: list[tuple[int, float]], shard_seconds: float) -> list[list[int]]:
    shards: list[list[int]] = []
    current: list[int] = []
    seconds = 0.0
    for row_id, est in estimates:
        current.append(row_id)
        seconds += est
        if seconds >= shard_seconds:
            shards.append(current)
            current, seconds = [], 0.0
    if current:
        shards.append(current)
    return shards


#: ``prepare`` fits a k-means teacher on one window of at most this many seconds per training file.
FIT_WINDOW_SECONDS = 30


def _fit_windows(
    shard_items: list[list[dict]], rows: list[ManifestRow], fit_seconds: float, seed: int
) -> list[tuple[int, int, int]]:
    """A seeded sample of the prepared training audio for fitting a teacher: ``(shard, start, n_samples)`` windows,
    one random window of at most 30 s (on the 320-sample grid) per training file, files in random order, until
    ``fit_seconds`` are drawn. The budget binds only when the training split holds more than
    ``fit_seconds / 30`` files' worth of windows; the caller logs what was actually drawn."""
    window = FIT_WINDOW_SECONDS * SAMPLE_RATE
    pool = [(k, it) for k, items in enumerate(shard_items) for it in items if rows[it["id"]].split == "train"]
    if not pool:
        pool = [(k, it) for k, items in enumerate(shard_items) for it in items]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6B6D]))
    order = rng.permutation(len(pool))
    budget = int(fit_seconds * SAMPLE_RATE)
    windows: list[tuple[int, int, int]] = []
    for i in order:
        if budget <= 0:
            break
        k, it = pool[i]
        n = min(it["length"], window, budget)
        n -= n % HOP_LENGTH
        if n <= 0:
            continue
        start = int(rng.integers(0, (it["length"] - n) // HOP_LENGTH + 1)) * HOP_LENGTH
        budget -= n
        windows.append((k, it["offset"] + start, n))
    return windows


def _iter_fit_waveforms(out_dir: Path, windows: list[tuple[int, int, int]]) -> Iterator[np.ndarray]:
    """The float audio of :func:`_fit_windows`' windows, one shard memory-mapped at a time."""
    audio_cache: dict[int, np.ndarray] = {}
    for k, start, n in windows:
        if k not in audio_cache:
            audio_cache.clear()
            audio_cache[k] = np.load(out_dir / _shard_name("audio", k, "npy"), mmap_mode="r")
        yield int16_to_float(np.asarray(audio_cache[k][start : start + n]))


def _encode_shard(
    teacher: Any, audio: np.ndarray, items: list[dict], chunk_samples: int, context_samples: int, batch_size: int
) -> np.ndarray:
    """Codes [n_codebooks, sum of n_frames] for a shard, items in order, long items encoded in chunks.

    Chunk starts are multiples of 320 samples, so the chunks' kept frames concatenate to exactly
    ceil(length / 320) frames. Each chunk is encoded with up to ``context_samples`` of real audio on both sides
    (frames from the context are dropped), so a teacher whose frames look a little ahead or behind (STFT
    windows, EnCodec's edge padding) gives the codes of a whole-item pass. Batches are zero-padded on the right.
    """

    # (window start, window length, first kept frame, kept frames) per chunk, all in shard coordinates
    chunks: list[tuple[int, int, int, int]] = []
    for it in items:
        for start in range(0, it["length"], chunk_samples):
            n = min(chunk_samples, it["length"] - start)
            left = min(context_samples, start)
            right = min(context_samples, it["length"] - start - n)
            chunks.append((it["offset"] + start - left, left + n + right, left // HOP_LENGTH, label_frames(n)))
    out: list[np.ndarray] = [np.empty(0)] * len(chunks)
    order = sorted(range(len(chunks)), key=lambda c: -chunks[c][1])  # similar lengths share a batch
    for b in range(0, len(order), batch_size):
        members = order[b : b + batch_size]
        width = chunks[members[0]][1]
        batch = np.zeros((len(members), width), dtype=np.float32)
        for row, c in enumerate(members):
            start, n = chunks[c][:2]
            int16_to_float(audio[start : start + n], out=batch[row, :n])
        codes = np.asarray(teacher.encode(batch))
        if codes.ndim != 3 or codes.shape[0] != len(members) or codes.shape[1] != teacher.n_codebooks:
            raise DataError(
                f"teacher {teacher.name!r} returned codes of shape {codes.shape}, expected "
                f"[{len(members)}, {teacher.n_codebooks}, T]"
            )
        check_label_alignment(width, codes.shape[2])
        for row, c in enumerate(members):
            _, _, first, n_frames = chunks[c]
            if codes.shape[2] < first + n_frames:
                raise DataError(f"teacher {teacher.name!r} returned {codes.shape[2]} frames for {width} samples")
            out[c] = codes[row, :, first : first + n_frames]
    if not out:
        return np.zeros((teacher.n_codebooks, 0), dtype=np.int16)
    merged = np.concatenate(out, axis=1)
    if merged.size and (merged.min() < 0 or merged.max() >= min(teacher.codebook_size, 32768)):
        raise DataError(
            f"teacher {teacher.name!r} produced codes outside [0, {teacher.codebook_size}): "
            f"min {merged.min()}, max {merged.max()}"
        )
    return merged.astype(np.int16)


def _codes_done(path: Path, n_codebooks: int, n_frames: int) -> bool:
    if not path.is_file():
        return False
    try:
        codes = np.load(path, mmap_mode="r") if n_frames else np.load(path)
    except (OSError, ValueError):
        return False
    return codes.shape == (n_codebooks, n_frames) and codes.dtype == np.int16


def _audio_done(out_dir: Path, k: int) -> dict | None:
    items_path = out_dir / _shard_name("items", k, "json")
    audio_path = out_dir / _shard_name("audio", k, "npy")
    if not (items_path.is_file() and audio_path.is_file()):
        return None
    try:
        meta = json.loads(items_path.read_text(encoding="utf-8"))
        audio = np.load(audio_path, mmap_mode="r") if meta["n_samples"] else np.load(audio_path)
    except (OSError, ValueError, KeyError):
        return None
    if audio.shape != (meta["n_samples"],) or audio.dtype != np.int16:
        return None
    return meta


class PrepareSettings(StrictModel):
    """Everything that shapes a prepared directory besides its manifest and teacher.

    All fields but ``workers`` enter the directory's fingerprint (``plan.json``): a resumed run must use the same
    values. Units: seconds, except ``teacher_batch_size`` (clips) and ``min_codebook_fraction`` (a fraction of the
    codebook that must be used, see :func:`~culturemert.teachers.check_codebook_usage`).
    """

    min_seconds: float = Field(3.0, ge=0)  # shorter files are skipped
    shard_seconds: float = Field(1800.0, gt=0)  # audio per shard file
    workers: int = Field(0, ge=0)  # decoding processes (0/1: in-process)
    seed: int = 0  # k-means fitting sample
    nonfinite: Literal["reject", "zero"] = "reject"  # NaN/inf samples: skip the file, or zero them with a warning
    kmeans_fit_seconds: float = Field(3600.0, gt=0)  # budget for fitting k-means: <= 30 s per training file
    teacher_chunk_seconds: float = Field(30.0, gt=0)  # teacher encodes audio in chunks this long
    teacher_context_seconds: float = Field(1.0, ge=0)  # real audio on both sides of a chunk, codes discarded
    teacher_batch_size: int = Field(8, ge=1)
    min_codebook_fraction: float = Field(0.02, ge=0, le=1)

    def fingerprinted(self, teacher: Any) -> dict[str, Any]:
        """The settings recorded in ``plan.json``/``prepare.json``: lengths on the label grid, the teacher's spec and
        (for a fitted teacher) its state."""
        return {
            "sample_rate": SAMPLE_RATE,
            "hop": HOP_LENGTH,
            "min_seconds": float(self.min_seconds),
            "shard_seconds": float(self.shard_seconds),
            "nonfinite": self.nonfinite,
            "seed": int(self.seed),
            "kmeans_fit_seconds": float(self.kmeans_fit_seconds),
            "teacher_chunk_samples": self.chunk_samples,
            "teacher_context_samples": self.context_samples,
            "teacher": _teacher_spec(teacher),
            "teacher_state": None if _needs_fit(teacher) else _teacher_state(teacher),
        }

    @property
    def chunk_samples(self) -> int:
        return max(HOP_LENGTH, int(self.teacher_chunk_seconds * SAMPLE_RATE) // HOP_LENGTH * HOP_LENGTH)

    @property
    def context_samples(self) -> int:
        return max(0, int(self.teacher_context_seconds * SAMPLE_RATE)) // HOP_LENGTH * HOP_LENGTH


@dataclass
class _PrepareRun:
    """The state that flows through the phases of one ``prepare`` call."""

    manifest: Path
    out: Path
    rows: list[ManifestRow]
    settings: PrepareSettings
    fingerprinted: dict[str, Any]
    progress: bool
    plan: dict[str, Any] = field(default_factory=dict)
    metas: list[dict[str, Any]] = field(default_factory=list)
    shards_reused: int = 0


def prepare(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    teacher: Teacher,
    settings: PrepareSettings | None = None,
    *,
    progress: bool = True,
    _stop_after_shards: int | None = None,
    **overrides: Any,
) -> PrepareSummary:
    """Decode a manifest into 24 kHz int16 shards with aligned teacher codes in ``out_dir``.

    ``settings`` (or keyword ``overrides`` of its fields) are validated as :class:`PrepareSettings`. Five phases:
    plan (probe headers, assign rows to shards), audio shards, fit the teacher (k-means only), teacher codes,
    verify and index. Bad files are skipped and reported (path + reason), never fatal. Re-running on the same
    ``out_dir`` with the same manifest and settings resumes: finished shards (audio and codes) are kept, the rest
    is redone; the final files equal those of an uninterrupted run. A k-means teacher that is not fitted yet is
    fitted on a seeded sample of the prepared training audio and saved in ``out_dir/teacher/`` before tokenising.
    After tokenising the collapse guard and the label/audio alignment check run; on failure no index is written.
    ``_stop_after_shards`` simulates an interruption (tests only).

    Raises:
        ConfigError: invalid settings, or a teacher that does not work at 24 kHz.
        DataError: ``out_dir`` holds a run with other settings, no usable audio, or a failed check.
    """
    if settings is None or overrides:
        base = settings.model_dump() if settings is not None else {}
        settings = parse_config({**base, **overrides}, PrepareSettings, source="prepare settings")
    if int(teacher.sample_rate) != SAMPLE_RATE:
        raise ConfigError(f"teacher {teacher.name!r} expects {teacher.sample_rate} Hz; prepare writes 24 kHz")
    run = _PrepareRun(
        manifest=Path(manifest),
        out=Path(out_dir),
        rows=read_manifest(manifest),
        settings=settings,
        fingerprinted=settings.fingerprinted(teacher),
        progress=progress,
    )
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "shards").mkdir(exist_ok=True)
    _remove_stale_tmp(run.out)
    _remove_stale_tmp(run.out / "shards")
    with ProcessMap(settings.workers, progress=progress) as pool:
        _plan_phase(run, pool)
        _audio_phase(run, pool, _stop_after_shards)
    teacher = _fit_phase(run, teacher)
    _codes_phase(run, teacher)
    return _index_phase(run, teacher)


def _plan_phase(run: _PrepareRun, pool: ProcessMap) -> None:
    """Probe headers and assign rows to shards; a resumed run reuses ``plan.json`` (same fingerprint only)."""
    row_dicts = [asdict(r) for r in run.rows]
    fingerprint = hashlib.sha256(json_text({"settings": run.fingerprinted, "rows": row_dicts}).encode()).hexdigest()
    plan_path = run.out / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        if plan.get("fingerprint") != fingerprint:
            raise DataError(
                f"{run.out} holds a prepare run with a different manifest or settings "
                f"(plan.json fingerprint differs); use a new --out directory or delete {run.out}"
            )
        log.info("resuming prepare in %s", run.out)
    else:
        tasks = [(r_id, r.path, run.settings.min_seconds) for r_id, r in enumerate(run.rows)]
        probe_results = list(pool.map(_probe_row, tasks, "probe"))
        plan = {
            "version": INDEX_VERSION,
            "fingerprint": fingerprint,
            "settings": run.fingerprinted,
            "rows": row_dicts,
            "plan_skipped": [{"id": p["id"], "reason": p["reason"]} for p in probe_results if "reason" in p],
            "shards": _plan_shards(
                [(p["id"], p["seconds"]) for p in probe_results if "reason" not in p], run.settings.shard_seconds
            ),
        }
        write_json_atomic(plan_path, plan)
    run.plan = plan


def _audio_phase(run: _PrepareRun, pool: ProcessMap, stop_after_shards: int | None) -> None:
    """Decode every shard's rows into ``audio-K.npy``; ``items-K.json`` (written after it) commits the shard."""
    shards: list[list[int]] = run.plan["shards"]
    min_samples = int(round(run.settings.min_seconds * SAMPLE_RATE))
    shard_meta: list[dict | None] = [_audio_done(run.out, k) for k in range(len(shards))]
    run.shards_reused = sum(m is not None for m in shard_meta)
    done_now = 0
    for k, row_ids in enumerate(tqdm(shards, desc="audio shards", unit="shard", disable=not run.progress)):
        if shard_meta[k] is not None:
            continue
        if stop_after_shards is not None and done_now >= stop_after_shards:
            raise KeyboardInterrupt("simulated interruption")
        tasks = [(r_id, run.rows[r_id].path, min_samples, run.settings.nonfinite) for r_id in row_ids]
        items, skipped, pieces, offset = [], [], [], 0
        for res in pool.map(_decode_row, tasks, f"decode shard {k}"):
            if "reason" in res:
                skipped.append({"id": res["id"], "reason": res["reason"]})
                continue
            samples = res.pop("samples")
            items.append({**res, "offset": offset, "length": int(samples.size)})
            pieces.append(samples)
            offset += samples.size
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
        save_npy_atomic(run.out / _shard_name("audio", k, "npy"), audio)
        meta = {"shard": k, "n_samples": int(audio.size), "items": items, "skipped": skipped}
        write_json_atomic(run.out / _shard_name("items", k, "json"), meta)  # commit marker: written after the audio
        shard_meta[k] = meta
        done_now += 1
    run.metas = [m for m in shard_meta if m is not None]


def _fit_phase(run: _PrepareRun, teacher: Teacher) -> Teacher:
    """Fit a k-means teacher on the training audio (or reload the one a previous run fitted); return the teacher
    that encodes, always the saved copy so a clean and a resumed run use (and record) the same model."""
    if not _needs_fit(teacher):
        return teacher
    out, settings = run.out, run.settings
    teacher_dir = out / "teacher"
    model_path = teacher_dir / "kmeans.safetensors"
    if model_path.is_file():
        log.info("using the k-means teacher fitted by a previous run: %s", model_path)
    else:
        n_frames_max = int(settings.kmeans_fit_seconds * teacher.frame_rate)
        windows = _fit_windows([m["items"] for m in run.metas], run.rows, settings.kmeans_fit_seconds, settings.seed)
        used = sum(n for _, _, n in windows) / SAMPLE_RATE
        log.info(
            "fitting the %s teacher on %.1f s of training audio: one window of at most %d s from each of %d file(s)%s",
            teacher.name,
            used,
            FIT_WINDOW_SECONDS,
            len(windows),
            f" (budget {settings.kmeans_fit_seconds:g} s reached)"
            if used >= settings.kmeans_fit_seconds - HOP_LENGTH / SAMPLE_RATE
            else f" (all of them; the {settings.kmeans_fit_seconds:g}-s budget is not reached)",
        )
        teacher.fit(_iter_fit_waveforms(out, windows), n_frames_max, settings.seed)
        tmp_dir = make_temp_dir(out, prefix=".teacher.", suffix=".tmp")
        teacher.save(tmp_dir / "kmeans.safetensors")
        for p in tmp_dir.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if teacher_dir.exists():  # an empty or stale dir from an interrupted run
            for p in teacher_dir.iterdir():
                p.unlink()
            teacher_dir.rmdir()
        os.replace(tmp_dir, teacher_dir)
        _fsync_dir(out)
    load_options = {k: getattr(teacher, k) for k in ("device", "batch_size") if hasattr(teacher, k)}
    try:
        saved = type(teacher).load(model_path, **load_options)
    except TypeError:
        saved = type(teacher).load(model_path)
    # a teacher left by an earlier run (e.g. plan.json deleted since) must be the one this run asks for
    asked, found = _teacher_spec(teacher), _teacher_spec(saved)
    asked_state, found_state = _teacher_state(teacher), _teacher_state(saved)
    if isinstance(asked_state, dict) and isinstance(found_state, dict):
        asked["features"], found["features"] = asked_state.get("features"), found_state.get("features")
    if asked != found:
        differ = ", ".join(f"{k} {found[k]!r} (asked {asked[k]!r})" for k in asked if asked[k] != found.get(k))
        raise DataError(
            f"{model_path} was fitted with other settings: {differ}; delete {teacher_dir} or use another --out"
        )
    return saved


def _codes_phase(run: _PrepareRun, teacher: Teacher) -> None:
    """Encode every committed audio shard into ``codes-K.npy`` (skipping shards whose codes are complete)."""
    n_cb = int(teacher.n_codebooks)
    for k, meta in enumerate(tqdm(run.metas, desc="teacher codes", unit="shard", disable=not run.progress)):
        n_frames = sum(label_frames(it["length"]) for it in meta["items"])
        codes_path = run.out / _shard_name("codes", k, "npy")
        if _codes_done(codes_path, n_cb, n_frames):
            continue
        audio = np.load(run.out / _shard_name("audio", k, "npy"), mmap_mode="r") if meta["n_samples"] else np.zeros(0, np.int16)
        codes = _encode_shard(teacher, audio, meta["items"], run.settings.chunk_samples, run.settings.context_samples,
                              run.settings.teacher_batch_size)
        save_npy_atomic(codes_path, codes)


def _index_phase(run: _PrepareRun, teacher: Teacher) -> PrepareSummary:
    """Check label/audio alignment and codebook usage, then write ``prepare.json``, ``index.csv`` and, last,
    ``index.json`` (its presence means "complete and verified")."""
    out, rows, metas, manifest, settings = run.out, run.rows, run.metas, run.manifest, run.fingerprinted
    n_cb = int(teacher.n_codebooks)


    all_codes: list[np.ndarray] = []
    index_items: list[dict[str, Any]] = []
    for k, meta in enumerate(metas):
        codes_path = out / _shard_name("codes", k, "npy")
        codes = np.load(codes_path, mmap_mode="r") if meta["items"] else np.zeros((n_cb, 0), np.int16)
        frame_offset = 0
        for it in meta["items"]:
            n_frames = label_frames(it["length"])
            check_label_alignment(it["length"], min(n_frames, codes.shape[1] - frame_offset))
            row = rows[it["id"]]
            index_items.append(
                {
                    "id": it["id"],
                    "path": row.raw_path,
                    "culture": row.culture,
                    "split": row.split,
                    "weight": row.weight,
                    "shard": k,
                    "offset": it["offset"],
                    "length": it["length"],
                    "frame_offset": frame_offset,
                    "n_frames": n_frames,
                    "source_sample_rate": it["source_sample_rate"],
                    "source_channels": it["source_channels"],
                }
            )
            frame_offset += n_frames
        if codes.shape != (n_cb, frame_offset):
            raise DataError(f"{codes_path}: codes of shape {codes.shape}, expected ({n_cb}, {frame_offset})")
        all_codes.append(codes)
    if not index_items:
        raise DataError(f"{manifest}: no usable audio (all {len(rows)} files skipped); see {out / 'plan.json'}")
    check_codebook_usage(all_codes, int(teacher.codebook_size), min_fraction=run.settings.min_codebook_fraction, teacher=teacher.name)

    skipped = [
        {"line": rows[s["id"]].line, "path": rows[s["id"]].raw_path, "reason": s["reason"]}
        for s in sorted(run.plan["plan_skipped"] + [s for m in metas for s in m["skipped"]], key=lambda s: s["id"])
    ]
    warnings = [
        {"line": rows[it["id"]].line, "path": rows[it["id"]].raw_path, "warning": w}
        for m in metas for it in m["items"] for w in it["warnings"]
    ]
    hours: dict[str, float] = {}
    files: dict[str, int] = {}
    for it in index_items:
        hours[it["culture"]] = hours.get(it["culture"], 0.0) + it["length"] / SAMPLE_RATE / 3600
        files[it["culture"]] = files.get(it["culture"], 0) + 1
    shard_table = [
        {
            "audio": _shard_name("audio", k, "npy"),
            "codes": _shard_name("codes", k, "npy"),
            "n_samples": m["n_samples"],
            "n_frames": sum(label_frames(it["length"]) for it in m["items"]),
        }
        for k, m in enumerate(metas)
    ]
    state = _teacher_state(teacher)
    if isinstance(state, dict) and isinstance(state.get("path"), str):
        try:  # a teacher saved inside out_dir is recorded relative to it: the directory stays relocatable
            state = {**state, "path": Path(state["path"]).resolve().relative_to(out.resolve()).as_posix()}
        except ValueError:
            pass
    # which teacher made the codes; the loader refuses to mix directories whose fingerprints differ
    identity = {**_teacher_spec(teacher), "fingerprint": teacher_fingerprint(teacher)}
    teacher_info = {**identity, "state": state}
    write_json_atomic(
        out / "prepare.json",
        {
            "version": INDEX_VERSION,
            "manifest": str(manifest.resolve()),
            "settings": settings,
            "teacher": teacher_info,
            "hours_per_culture": {c: round(h, 6) for c, h in sorted(hours.items())},
            "files_per_culture": dict(sorted(files.items())),
            "n_items": len(index_items),
            "n_skipped": len(skipped),
            "skipped": skipped,
            "warnings": warnings,
        },
    )
    columns = list(index_items[0])

    def write_csv(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(index_items)

    atomic_write(out / "index.csv", write_csv, mode="w")
    write_json_atomic(
        out / "index.json",
        {
            "version": INDEX_VERSION,
            "sample_rate": SAMPLE_RATE,
            "hop": HOP_LENGTH,
            "int16_scale": INT16_SCALE,
            "teacher": identity,
            "shards": shard_table,
            "items": index_items,
        },
    )
    summary = PrepareSummary(out, len(index_items), hours, files, skipped, warnings, len(run.plan["shards"]), run.shards_reused)
    log.info("prepared %d files (%.3f h) into %s; skipped %d", len(index_items), sum(hours.values()), out, len(skipped))
    return summary
