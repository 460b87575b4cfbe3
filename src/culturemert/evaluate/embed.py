"""Cached, batched, resumable extraction of per-layer embeddings.

For every track: decode to 24 kHz mono, optionally normalise, cut into windows (:func:`chunk_bounds`), run
the frozen model on batches of equal-length windows, and mean-pool every hidden state over time per window.
One track's result is an array ``[n_chunks, n_layers, D]`` float32 (n_layers = transformer layers + 1).

Chunking policy (deterministic; ``window``/``hop``/``min_last_fraction`` are settings):

* windows of ``window`` seconds start at 0, ``hop`` seconds apart (default hop = window: non-overlapping);
* a trailing partial window (what is left after the last full one) is kept if it is at least
  ``min_last_fraction`` of a window, otherwise dropped;
* a track no longer than one window is a single chunk (the whole track); ``window <= 0`` means the whole
  track is always one chunk (MARBLE v1 on MagnaTagATune);
* nothing is ever zero-padded: a batch only holds windows of identical length, so no padding enters the
  conv stack's GroupNorm (MERT issue #19).

Batching and exact resume. Tracks are taken in input order in fixed groups of ``group_tracks``; inside a
group, windows of all tracks are batched together by length. The group partition depends only on the input
list, so a resumed run forms exactly the batches of a clean run and writes bit-identical outputs (CPU float
results depend slightly on batch composition, ~1e-7). A group is recomputed if any of its tracks is missing.

Cache (see docs/evaluation.md for the layout): keyed by the model fingerprint and the result-relevant
settings (one folder), and inside it by the sha256 of each audio file's bytes. Per-track files are written
atomically and appended to ``index.jsonl``; a re-run never recomputes a cached track, a killed run resumes.
File hashes are memoised by (path, size, mtime_ns) in ``audio_hashes.jsonl`` so re-runs do not re-read audio.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

import numpy as np
import torch
from pydantic import Field

from culturemert.audio import TARGET_SAMPLE_RATE, load_audio, mel_filterbank
from culturemert.config import StrictModel
from culturemert.files import name_os_error, save_npy_atomic
from culturemert.errors import ConfigError, DataError, UserError
from culturemert.evaluate.features import write_features
from culturemert.runtime import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "EmbedSettings",
    "EmbedReport",
    "Extractor",
    "MertExtractor",
    "LogMelExtractor",
    "TrackInput",
    "chunk_bounds",
    "normalize_waveform",
    "embed_tracks",
    "embed_dataset",
    "build_extractor",
    "tracks_from_paths",
]

CACHE_FORMAT = 1
LOGMEL_NAME = "baseline:logmel"


class EmbedSettings(StrictModel):
    """Extraction settings. All but ``batch_size``/``device``/``group_tracks``/``decode_workers`` are part of
    the cache key."""

    window: float = 5.0  # seconds; <= 0 -> whole track as one chunk
    hop: float | None = None  # seconds; None -> window (non-overlapping)
    min_last_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    max_seconds: float | None = Field(default=None, gt=0)  # truncate long recordings (ccml did: 150/780/330 s)
    normalize: bool = True  # zero-mean/unit-variance waveform (MARBLE's processor do_normalize=True)
    normalize_scope: Literal["track", "chunk"] = "track"  # MARBLE v1: whole track, then windows
    frames: bool = False  # also keep frame-level features (float16)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast, CUDA only
    sample_rate: int = TARGET_SAMPLE_RATE
    #: windows per forward pass; None = 16 on CUDA, 1 on CPU (bench/embed.py: on CPU batching is slower, 0.8x)
    batch_size: int | None = Field(default=None, ge=1)
    group_tracks: int = Field(default=16, ge=1)
    device: str = "auto"
    decode_workers: int = Field(default=2, ge=0)

    def cache_fields(self) -> dict[str, Any]:
        keep = ("window", "hop", "min_last_fraction", "max_seconds", "normalize", "normalize_scope", "precision", "sample_rate")
        out = {k: getattr(self, k) for k in keep}
        out["hop"] = self.hop if self.hop is not None else self.window
        if not self.normalize:
            out["normalize_scope"] = None
        return out


# --------------------------------------------------------------------------------------------------------
# chunking and normalisation


def chunk_bounds(
    num_samples: int,
    sample_rate: int,
    window: float,
    hop: float | None = None,
    min_last_fraction: float = 0.5,
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of the chunks of a track (policy in the module docstring)."""
    if num_samples <= 0:
        return []
    if window is None or window <= 0:
        return [(0, num_samples)]
    win = int(round(window * sample_rate))
    step = int(round((hop if hop is not None else window) * sample_rate))
    if win <= 0 or step <= 0:
        raise ConfigError(f"window ({window}) and hop ({hop}) must be at least one sample")
    if num_samples <= win:
        return [(0, num_samples)]
    bounds = []
    start = 0
    while start + win <= num_samples:
        bounds.append((start, start + win))
        start += step
    if start < num_samples and bounds[-1][1] < num_samples:
        remaining = num_samples - start
        if remaining >= min_last_fraction * win:
            bounds.append((start, num_samples))
    return bounds


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-7): transformers' Wav2Vec2FeatureExtractor with do_normalize=True."""
    x = wav.astype(np.float32, copy=False)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# extractors


class Extractor(Protocol):
    name: str
    fingerprint: str
    num_layers: int  # number of feature "layers" per chunk (hidden states)
    dim: int
    min_samples: int

    def __call__(self, wav: torch.Tensor, with_frames: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, S] waveform -> (pooled [B, n_layers, D] float32, frames [B, n_layers, T, D] or None)."""
        ...


class MertExtractor:
    """All hidden states of a (culturemert/HF) MERT model, mean-pooled over time."""

    def __init__(self, model: Any, name: str, device: str = "auto", precision: str = "fp32", fingerprint: str | None = None):

        self.device = resolve_device(device)
        if precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("precision bf16 needs a CUDA device (use fp32 on CPU)")
        self.precision = precision
        if fingerprint is None:
            from culturemert.checkpoint import model_fingerprint
            from culturemert.model import MertPretrainModel

            # wrappers exposing ``.backbone`` are fingerprinted by their backbone weights, as models are
            fingerprint = model_fingerprint(model if isinstance(model, MertPretrainModel) else model.backbone.state_dict())
        self.fingerprint = fingerprint
        self.model = model.eval().float().to(self.device)
        self.name = name
        self.num_layers = int(model.num_layers) + 1
        self.dim = int(model.hidden_size)
        self.min_samples = 400  # receptive field of MERT's conv stack (one frame)
        self.calls = 0

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, with_frames: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        wav = wav.to(self.device)
        if self.precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model(wav, output_hidden_states=True)
        else:
            out = self.model(wav, output_hidden_states=True)
        hidden = torch.stack([h.float() for h in out.hidden_states], dim=1)  # [B, L+1, T, D]
        pooled = hidden.mean(dim=2)
        return pooled.cpu(), (hidden.cpu() if with_frames else None)


class LogMelExtractor:
    """Baseline features: mean and std over time of a 128-bin log-mel spectrogram (one "layer", 256-d)."""

    N_FFT, HOP, N_MELS, FMIN, LOG_FLOOR = 1024, 240, 128, 0.0, 1e-6

    def __init__(self, sample_rate: int = TARGET_SAMPLE_RATE):
        self.sample_rate = sample_rate
        self.name = LOGMEL_NAME
        params = f"logmel-v1:sr={sample_rate}:nfft={self.N_FFT}:hop={self.HOP}:mels={self.N_MELS}:floor={self.LOG_FLOOR}"
        self.fingerprint = hashlib.sha256(params.encode()).hexdigest()
        self.num_layers = 1
        self.dim = 2 * self.N_MELS
        self.min_samples = 1
        self.mel = mel_filterbank(sample_rate, self.N_FFT, self.N_MELS, self.FMIN, sample_rate / 2)
        self.window = torch.hann_window(self.N_FFT)
        self.calls = 0

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, with_frames: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        wav = wav.float().cpu()
        if wav.shape[1] < self.N_FFT:  # reflect padding needs at least n_fft/2 samples; zero-pad short clips
            wav = torch.nn.functional.pad(wav, (0, self.N_FFT - wav.shape[1]))
        spec = torch.stft(wav, self.N_FFT, self.HOP, window=self.window, center=True, return_complex=True)
        power = spec.abs().pow(2).transpose(1, 2)  # [B, T, F]
        logmel = torch.log(power @ self.mel + self.LOG_FLOOR)  # [B, T, M]
        pooled = torch.cat([logmel.mean(1), logmel.std(1, unbiased=False)], dim=-1).unsqueeze(1)
        return pooled, (logmel.unsqueeze(1) if with_frames else None)


def build_extractor(model: str | Any, settings: EmbedSettings, name: str | None = None) -> Extractor:
    """``baseline:logmel``, ``preset:<name>[:seed]`` (random init, for tests/quickstart), a checkpoint source
    understood by :func:`culturemert.checkpoint.load_model`, or an already built model object."""
    if isinstance(model, str):
        if model == LOGMEL_NAME:
            return LogMelExtractor(settings.sample_rate)
        if model.startswith("preset:"):
            from culturemert.model import build_model

            parts = model.split(":")
            seed = int(parts[2]) if len(parts) > 2 else 0
            return MertExtractor(build_model(parts[1], with_heads=False, seed=seed), name or model, settings.device, settings.precision)
        from culturemert.checkpoint import load_model

        return MertExtractor(load_model(model, with_heads=False), name or model, settings.device, settings.precision)
    return MertExtractor(model, name or type(model).__name__, settings.device, settings.precision)


# --------------------------------------------------------------------------------------------------------
# small atomic-I/O helpers


#: errors of the output side (the cache), which must stop a run instead of being reported per track
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        name_os_error(exc, path)
        raise


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of an append-only log; a torn last line (killed while appending) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# --------------------------------------------------------------------------------------------------------
# the cache


class FeatureCache:
    """``<root>/<key>/tracks/<aa>/<audio sha256>.npy`` (+ ``.frames.npy``), ``index.jsonl``, ``key.json``."""

    def __init__(self, root: Path, extractor: Extractor, settings: EmbedSettings):
        self.root = Path(root)
        key_material = {
            "format": CACHE_FORMAT,
            "extractor": extractor.fingerprint,
            "settings": settings.cache_fields(),
        }
        digest = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
        self.key = f"{extractor.fingerprint[:12]}-{digest[:16]}"
        self.dir = self.root / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.is_file():
            from culturemert.files import atomic_write_text

            atomic_write_text(key_file, json.dumps({**key_material, "model": extractor.name}, indent=2))
        self.frames = settings.frames
        self._hash_memo_path = self.root / "audio_hashes.jsonl"
        self._hash_memo = {
            (r["path"], r["size"], r["mtime_ns"]): r["sha256"] for r in _read_jsonl(self._hash_memo_path) if "sha256" in r
        }

    def track_path(self, audio_key: str, frames: bool = False) -> Path:
        return self.dir / "tracks" / audio_key[:2] / (audio_key + (".frames.npy" if frames else ".npy"))

    def has(self, audio_key: str) -> bool:
        if not self.track_path(audio_key).is_file():
            return False
        return not self.frames or self.track_path(audio_key, frames=True).is_file()

    def load(self, audio_key: str) -> np.ndarray:
        return np.load(self.track_path(audio_key), allow_pickle=False)

    def store(self, audio_key: str, pooled: np.ndarray, frames: np.ndarray | None, info: dict[str, Any]) -> None:
        if frames is not None:
            save_npy_atomic(self.track_path(audio_key, frames=True), frames.astype(np.float16))
        # the pooled file is written last: its presence marks the track done
        save_npy_atomic(self.track_path(audio_key), pooled.astype(np.float32))
        _append_jsonl(self.dir / "index.jsonl", {"audio_key": audio_key, **info})

    def audio_key(self, path: Path) -> str:
        """sha256 of the file's bytes, memoised by (resolved path, size, mtime_ns)."""
        from culturemert.audio import check_readable_path

        path = check_readable_path(path)
        st = path.stat()
        memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        cached = self._hash_memo.get(memo_key)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        digest = h.hexdigest()
        self._hash_memo[memo_key] = digest
        _append_jsonl(self._hash_memo_path, {"path": memo_key[0], "size": memo_key[1], "mtime_ns": memo_key[2], "sha256": digest})
        return digest


# --------------------------------------------------------------------------------------------------------
# extraction


@dataclass
class TrackInput:
    id: str
    path: Path | None


@dataclass
class EmbedReport:
    cache_dir: Path
    cache_key: str
    keys: dict[str, str] = field(default_factory=dict)  # track id -> audio key (successful tracks)
    errors: dict[str, str] = field(default_factory=dict)  # track id -> reason
    computed: int = 0
    cached: int = 0
    model_calls: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cache_dir": str(self.cache_dir),
            "cache_key": self.cache_key,
            "tracks_ok": len(self.keys),
            "computed": self.computed,
            "cached": self.cached,
            "model_calls": self.model_calls,
            "seconds": self.seconds,
            "errors": self.errors,
        }


def _decode(path: Path, settings: EmbedSettings) -> np.ndarray:
    wav = load_audio(path, settings.sample_rate)
    if settings.max_seconds is not None:
        wav = wav[: int(round(settings.max_seconds * settings.sample_rate))]
    return wav


def _chunks_of(wav: np.ndarray, settings: EmbedSettings, min_samples: int, where: str) -> list[np.ndarray]:
    if wav.shape[0] < min_samples:
        raise DataError(f"{where}: only {wav.shape[0]} samples after decoding, the model needs at least {min_samples}")
    if settings.normalize and settings.normalize_scope == "track":
        wav = normalize_waveform(wav)
    bounds = chunk_bounds(wav.shape[0], settings.sample_rate, settings.window, settings.hop, settings.min_last_fraction)
    chunks = [wav[a:b] for a, b in bounds if b - a >= min_samples]
    if settings.normalize and settings.normalize_scope == "chunk":
        chunks = [normalize_waveform(c) for c in chunks]
    if not chunks:
        raise DataError(f"{where}: no chunk of at least {min_samples} samples")
    return chunks


def default_batch_size(extractor: Extractor) -> int:
    """Windows per forward pass when the settings leave it open: a GPU needs batches to stay busy, while on CPU
    a batch pushes the convolutional front end out of cache and one window at a time is faster (bench/embed.py)."""
    device = getattr(extractor, "device", None)
    return 16 if device is not None and torch.device(device).type == "cuda" else 1


def _run_group(
    extractor: Extractor, chunk_lists: list[list[np.ndarray]], settings: EmbedSettings
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Batch the windows of a group of tracks by length; return (pooled, frames) per track."""
    flat = [(t, c, chunk) for t, chunks in enumerate(chunk_lists) for c, chunk in enumerate(chunks)]
    by_length: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for entry in flat:
        by_length.setdefault(entry[2].shape[0], []).append(entry)
    pooled: dict[tuple[int, int], np.ndarray] = {}
    frames: dict[tuple[int, int], np.ndarray] = {}
    batch_size = settings.batch_size or default_batch_size(extractor)
    for length in sorted(by_length, reverse=True):
        entries = by_length[length]
        for b0 in range(0, len(entries), batch_size):
            batch = entries[b0 : b0 + batch_size]
            wav = torch.from_numpy(np.stack([e[2] for e in batch]))
            p, f = extractor(wav, settings.frames)
            for i, (t, c, _) in enumerate(batch):
                pooled[(t, c)] = p[i].numpy()
                if f is not None:
                    frames[(t, c)] = f[i].numpy()
    results = []
    for t, chunks in enumerate(chunk_lists):
        pt = np.stack([pooled[(t, c)] for c in range(len(chunks))])
        ft = np.concatenate([frames[(t, c)] for c in range(len(chunks))], axis=1) if settings.frames else None
        results.append((pt, ft))
    return results


def embed_tracks(
    extractor: Extractor,
    tracks: Sequence[TrackInput],
    cache_root: str | Path,
    settings: EmbedSettings,
    *,
    progress: bool = True,
    on_group_done: Callable[[int], None] | None = None,
) -> EmbedReport:
    """Embed ``tracks`` into the cache (skipping cached ones); returns which succeeded and per-file errors."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    cache = FeatureCache(Path(cache_root), extractor, settings)
    report = EmbedReport(cache.dir, cache.key)
    calls_before = getattr(extractor, "calls", 0)
    executor = ThreadPoolExecutor(max_workers=settings.decode_workers) if settings.decode_workers > 0 else None

    def submit(path: Path) -> Future | np.ndarray | Exception:
        if executor is not None:
            return executor.submit(_decode, path, settings)
        try:
            return _decode(path, settings)
        except Exception as exc:  # noqa: BLE001 - reported per file
            return exc

    def result(job: Future | np.ndarray | Exception) -> np.ndarray:
        if isinstance(job, Future):
            return job.result()
        if isinstance(job, Exception):
            raise job
        return job

    bar = tqdm(total=len(tracks), desc=f"embed {extractor.name}", unit="track", disable=not progress)
    try:
        for g0 in range(0, len(tracks), settings.group_tracks):
            group = tracks[g0 : g0 + settings.group_tracks]
            keys: dict[int, str] = {}
            for i, track in enumerate(group):
                try:
                    if track.path is None:
                        raise DataError("no audio file for this track")
                    keys[i] = cache.audio_key(Path(track.path))
                except UserError as exc:
                    report.errors[track.id] = str(exc)
                except OSError as exc:
                    if exc.errno in _OUTPUT_ERRNOS:  # our disk is full or read-only: stop, never drop tracks
                        raise
                    report.errors[track.id] = f"{track.path}: {exc}"
            missing = [i for i in keys if not cache.has(keys[i])]
            if missing:
                jobs = {i: submit(Path(group[i].path)) for i in keys}  # type: ignore[arg-type]
                chunk_lists: dict[int, list[np.ndarray]] = {}
                for i, job in jobs.items():
                    try:
                        wav = result(job)
                        chunk_lists[i] = _chunks_of(wav, settings, extractor.min_samples, str(group[i].path))
                    except UserError as exc:
                        report.errors[group[i].id] = str(exc)
                    except Exception as exc:  # noqa: BLE001 - a hostile file must not stop the run
                        report.errors[group[i].id] = f"{group[i].path}: {type(exc).__name__}: {exc}"
                if any(i in chunk_lists for i in missing):
                    order = sorted(chunk_lists)
                    outputs = _run_group(extractor, [chunk_lists[i] for i in order], settings)
                    for i, (pooled, frames) in zip(order, outputs):
                        if cache.has(keys[i]):
                            continue
                        info = {"id": group[i].id, "n_chunks": int(pooled.shape[0]),
                                "chunk_samples": [int(c.shape[0]) for c in chunk_lists[i]]}
                        cache.store(keys[i], pooled, frames, info)
                        report.computed += 1
            for i in keys:
                if group[i].id in report.errors:
                    continue
                report.keys[group[i].id] = keys[i]
                if i not in missing:
                    report.cached += 1
            bar.update(len(group))
            if on_group_done is not None:
                on_group_done(g0 // settings.group_tracks)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    report.model_calls = getattr(extractor, "calls", 0) - calls_before
    report.seconds = time.perf_counter() - t_start
    for tid, reason in report.errors.items():
        log.warning("embed: skipped %s: %s", tid, reason)
    return report


# --------------------------------------------------------------------------------------------------------
# datasets -> consolidated features


def tracks_from_paths(paths: Iterable[str | Path]) -> list[TrackInput]:
    """Audio files and folders (searched recursively for audio extensions, sorted) -> tracks."""
    from culturemert.audio import AUDIO_EXTENSIONS

    out: list[TrackInput] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS and not f.is_dir())
            out.extend(TrackInput(f.relative_to(p).as_posix(), f) for f in files)
        else:
            out.append(TrackInput(p.as_posix(), p))
    return out


def embed_dataset(
    extractor: Extractor,
    dataset: Any,
    out_dir: str | Path,
    settings: EmbedSettings,
    *,
    cache_root: str | Path | None = None,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    on_group_done: Callable[[int], None] | None = None,
) -> tuple[Path, EmbedReport]:
    """Embed a tagging dataset (``name``, ``vocabulary``, ``items`` with id/audio_path/split/tags) and write the
    consolidated features folder ``out_dir`` (features.npy, chunk_track.npy, labels.npy, meta.json)."""
    out_dir = Path(out_dir)
    items = [it for it in dataset.items if splits is None or it.split in splits]
    tracks = [TrackInput(it.id, Path(it.audio_path) if it.audio_path is not None else None) for it in items]
    cache_root = Path(cache_root) if cache_root is not None else out_dir.parent / "cache"
    report = embed_tracks(extractor, tracks, cache_root, settings, progress=progress, on_group_done=on_group_done)
    vocabulary = list(getattr(dataset, "vocabulary", []) or [])
    cache = FeatureCache(cache_root, extractor, settings)
    kept = [it for it in items if it.id in report.keys]
    arrays = [cache.load(report.keys[it.id]) for it in kept]
    write_features(out_dir, arrays, kept, vocabulary, {
        "dataset": getattr(dataset, "name", out_dir.name),
        "model": extractor.name,
        "model_fingerprint": extractor.fingerprint,
        "settings": settings.cache_fields(),
        "cache_key": report.cache_key,
        "num_layers": extractor.num_layers,
        "dim": extractor.dim,
        "errors": report.errors,
    }, audio_keys=[report.keys[it.id] for it in kept])
    return out_dir, report


