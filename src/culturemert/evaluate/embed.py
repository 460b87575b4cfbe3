"""Cached, batched, resumable extraction of per-layer embeddings.

For every track: decode to mono at the encoder's own sample rate (:mod:`culturemert.evaluate.encoders`),
optionally normalise, cut into windows (:func:`chunk_bounds`, in seconds), run the frozen encoder on batches of
equal-length windows, and pool every hidden state over time per window. One track's result is an array
``[n_chunks, n_layers, D]`` float32 (n_layers = the encoder's number of hidden states).

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
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from culturemert.audio import load_audio
from culturemert.label_grid import SAMPLE_RATE
from culturemert.config import StrictModel
from culturemert.files import append_jsonl, read_jsonl, save_npy_atomic
from culturemert.errors import ConfigError, DataError, UserError
from culturemert.evaluate.encoders import Encoder, PeakMemory, build_encoder
from culturemert.evaluate.features import write_features

log = logging.getLogger(__name__)

__all__ = [
    "EmbedSettings",
    "EmbedReport",
    "TrackInput",
    "chunk_bounds",
    "normalize_waveform",
    "embed_tracks",
    "embed_dataset",
    "load_encoder",
    "encoder_rate",
    "tracks_from_paths",
    "dist_context",
]

CACHE_FORMAT = 1


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
    #: None = each encoder's own declared rate (what audio is resampled to); a value that differs from the
    #: encoder's rate is refused, never used to feed the model the wrong rate
    sample_rate: int | None = Field(default=None, gt=0)
    #: windows per forward pass; None = 16 on CUDA, 1 on CPU (bench/embed.py: on CPU batching is slower, 0.8x)
    batch_size: int | None = Field(default=None, ge=1)
    group_tracks: int = Field(default=16, ge=1)
    device: str = "auto"
    decode_workers: int = Field(default=2, ge=0)

    def cache_fields(self, sample_rate: int | None = None) -> dict[str, Any]:
        """The settings that change features; ``sample_rate`` is the encoder's rate the audio was decoded at."""
        keep = ("window", "hop", "min_last_fraction", "max_seconds", "normalize", "normalize_scope", "precision")
        out = {k: getattr(self, k) for k in keep}
        out["sample_rate"] = int(sample_rate or self.sample_rate or SAMPLE_RATE)
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
# the encoder of a spec string, as embedding settings ask for it



def load_encoder(
    model: str | Any, settings: EmbedSettings, name: str | None = None, *, trust_remote_code: bool = False
) -> Encoder:
    """The encoder of a spec string (see :mod:`culturemert.evaluate.encoders`: ``baseline:logmel``,
    ``preset:<name>[:seed]``, checkpoint paths and Hub ids, ``hf:``, ``remote:``, ``muq:``, ``omar-rq:``,
    ``dasheng:``) or of an already built MERT model object, on ``settings.device`` at ``settings.precision``.

    Raises:
        ConfigError: ``settings.sample_rate`` is set and differs from the encoder's own rate.
    """
    encoder = build_encoder(model, device=settings.device, precision=settings.precision,
                            trust_remote_code=trust_remote_code, name=name)
    encoder_rate(encoder, settings)
    return encoder


def encoder_rate(encoder: Any, settings: EmbedSettings) -> int:
    """The rate audio is decoded at for ``encoder``: its declared rate; a different explicit
    ``settings.sample_rate`` is an error rather than a silent resampling to the wrong rate."""
    rate = int(getattr(encoder, "sample_rate", SAMPLE_RATE))
    if settings.sample_rate is not None and settings.sample_rate != rate:
        raise ConfigError(
            f"embed.sample_rate is {settings.sample_rate} Hz but {getattr(encoder, 'name', 'the encoder')} takes "
            f"{rate} Hz; leave sample_rate unset (audio is resampled to each encoder's own rate)"
        )
    return rate


# --------------------------------------------------------------------------------------------------------
# small atomic-I/O helpers


#: errors of the output side (the cache), which must stop a run instead of being reported per track
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


# --------------------------------------------------------------------------------------------------------
# the cache


class FeatureCache:
    """``<root>/<key>/tracks/<aa>/<audio sha256>.npy`` (+ ``.frames.npy``), ``index.jsonl``, ``key.json``."""

    def __init__(self, root: Path, extractor: Encoder, settings: EmbedSettings):
        self.root = Path(root)
        key_material = {
            "format": CACHE_FORMAT,
            "extractor": extractor.fingerprint,
            "settings": settings.cache_fields(getattr(extractor, "sample_rate", None)),
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
            (r["path"], r["size"], r["mtime_ns"]): r["sha256"] for r in read_jsonl(self._hash_memo_path) if "sha256" in r
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
        append_jsonl(self.dir / "index.jsonl", {"audio_key": audio_key, **info})

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
        append_jsonl(self._hash_memo_path, {"path": memo_key[0], "size": memo_key[1], "mtime_ns": memo_key[2], "sha256": digest})
        return digest


# --------------------------------------------------------------------------------------------------------
# extraction


@dataclass
class TrackInput:
    """One track to embed: its id (the key of its features) and its audio file (None: missing, reported as an error)."""

    id: str
    path: Path | None


@dataclass
class EmbedReport:
    """What one ``embed_tracks`` / ``embed_dataset`` call did. Under torchrun, ``embed_dataset`` on rank 0
    returns the sums over all ranks (``seconds`` and ``peak_memory_bytes``: the largest rank's)."""

    cache_dir: Path
    cache_key: str
    keys: dict[str, str] = field(default_factory=dict)  # track id -> audio key (successful tracks)
    errors: dict[str, str] = field(default_factory=dict)  # track id -> reason
    computed: int = 0
    cached: int = 0
    model_calls: int = 0
    seconds: float = 0.0  # wall time of the call
    forward_seconds: float = 0.0  # time inside the encoder's forward passes
    audio_seconds: float = 0.0  # seconds of audio (at the encoder's rate) that went through the encoder
    peak_memory_bytes: int = 0
    memory_kind: str = ""  # cuda_max_allocated | process_rss (see encoders.PeakMemory)
    world_size: int = 1

    @property
    def real_time_factor(self) -> float | None:
        """Embedding wall time per second of computed audio (lower is faster); None when nothing was computed."""
        return self.seconds / self.audio_seconds if self.audio_seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "cache_dir": str(self.cache_dir),
            "cache_key": self.cache_key,
            "tracks_ok": len(self.keys),
            "computed": self.computed,
            "cached": self.cached,
            "model_calls": self.model_calls,
            "seconds": self.seconds,
            "forward_seconds": self.forward_seconds,
            "audio_seconds": self.audio_seconds,
            "real_time_factor": self.real_time_factor,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_kind": self.memory_kind,
            "world_size": self.world_size,
            "errors": self.errors,
        }


def _decode(path: Path, settings: EmbedSettings, rate: int) -> np.ndarray:
    wav = load_audio(path, rate)
    if settings.max_seconds is not None:
        wav = wav[: int(round(settings.max_seconds * rate))]
    return wav


def _chunks_of(wav: np.ndarray, settings: EmbedSettings, rate: int, min_samples: int, where: str) -> list[np.ndarray]:
    if wav.shape[0] < min_samples:
        raise DataError(f"{where}: only {wav.shape[0]} samples after decoding, the model needs at least {min_samples}")
    if settings.normalize and settings.normalize_scope == "track":
        wav = normalize_waveform(wav)
    bounds = chunk_bounds(wav.shape[0], rate, settings.window, settings.hop, settings.min_last_fraction)
    chunks = [wav[a:b] for a, b in bounds if b - a >= min_samples]
    if settings.normalize and settings.normalize_scope == "chunk":
        chunks = [normalize_waveform(c) for c in chunks]
    if not chunks:
        raise DataError(f"{where}: no chunk of at least {min_samples} samples")
    return chunks


def default_batch_size(extractor: Encoder) -> int:
    """Windows per forward pass when the settings leave it open: a GPU needs batches to stay busy, while on CPU
    a batch pushes the convolutional front end out of cache and one window at a time is faster (bench/embed.py)."""
    device = getattr(extractor, "device", None)
    return 16 if device is not None and torch.device(device).type == "cuda" else 1


def _refuse_nonfinite(values: torch.Tensor, batch: list[tuple[int, int, np.ndarray]], names: list[str], what: str) -> None:
    """A non-finite value must never reach the cache: name the first track and hidden state that has one."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = (~finite).flatten(2).any(dim=2)  # [B, L]
    item, layer = (int(v) for v in bad.nonzero()[0])
    track, chunk = batch[item][0], batch[item][1]
    raise DataError(
        f"{names[track]}: the encoder returned non-finite values (NaN/inf){what} in hidden state {layer} "
        f"(window {chunk}); nothing of this track was cached - check the model's weights"
    )


def _run_group(
    extractor: Encoder, chunk_lists: list[list[np.ndarray]], settings: EmbedSettings, names: list[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Batch the windows of a group of tracks by length; return (pooled, frames) per track.

    Raises:
        DataError: the encoder returned NaN/inf for a window (the message names the track and hidden state).
    """
    names = names if names is not None else [str(t) for t in range(len(chunk_lists))]
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
            _refuse_nonfinite(p, batch, names, "")
            if f is not None:  # frames are stored as float16: a finite float32 beyond 65504 would become inf
                _refuse_nonfinite(f.to(torch.float16), batch, names, " (beyond float16's range, in the frames)")
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


def dist_context() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun (``RANK``/``WORLD_SIZE``); (0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a barrier too). Starts a gloo process group when torchrun has not: embedding only
    needs this rendezvous, and gloo works whatever device each rank embeds on."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        # probes train on rank 0 while the others wait here: the default 30 min timeout would be too short
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def embed_tracks(
    extractor: Encoder,
    tracks: Sequence[TrackInput],
    cache_root: str | Path,
    settings: EmbedSettings,
    *,
    progress: bool = True,
    on_group_done: Callable[[int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> EmbedReport:
    """Embed ``tracks`` into the cache (skipping cached ones); returns which succeeded and per-file errors.

    Audio is decoded at the encoder's own rate (:func:`encoder_rate`). ``shard=(rank, world)`` embeds only the
    groups ``g`` with ``g % world == rank``: whole groups, so every batch is the one a single process forms and
    the features are bit-identical to a one-process run. The report then covers this rank's groups only.

    Raises:
        DataError: the encoder returned NaN/inf (nothing of that group is cached).
        ConfigError: the windows are longer than the encoder accepts, or ``settings.sample_rate`` conflicts.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    rate = encoder_rate(extractor, settings)
    if hasattr(extractor, "check_window"):
        extractor.check_window(settings.window, settings.max_seconds)
    cache = FeatureCache(Path(cache_root), extractor, settings)
    report = EmbedReport(cache.dir, cache.key)
    calls_before = getattr(extractor, "calls", 0)
    forward_before = getattr(extractor, "forward_seconds", 0.0)
    executor = ThreadPoolExecutor(max_workers=settings.decode_workers) if settings.decode_workers > 0 else None
    rank, world = shard if shard is not None else (0, 1)

    def submit(path: Path) -> Future | np.ndarray | Exception:
        if executor is not None:
            return executor.submit(_decode, path, settings, rate)
        try:
            return _decode(path, settings, rate)
        except Exception as exc:  # noqa: BLE001 - reported per file
            return exc

    def result(job: Future | np.ndarray | Exception) -> np.ndarray:
        if isinstance(job, Future):
            return job.result()
        if isinstance(job, Exception):
            raise job
        return job

    groups = [(g, tracks[g0 : g0 + settings.group_tracks]) for g, g0 in enumerate(range(0, len(tracks), settings.group_tracks))]
    mine = [(g, group) for g, group in groups if g % world == rank]
    bar = tqdm(total=sum(len(group) for _, group in mine), desc=f"embed {extractor.name}", unit="track",
               disable=not progress)
    memory = PeakMemory(getattr(extractor, "device", torch.device("cpu")))
    try:
        with memory:
            for g, group in mine:
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
                            chunk_lists[i] = _chunks_of(wav, settings, rate, extractor.min_samples, str(group[i].path))
                        except UserError as exc:
                            report.errors[group[i].id] = str(exc)
                        except Exception as exc:  # noqa: BLE001 - a hostile file must not stop the run
                            report.errors[group[i].id] = f"{group[i].path}: {type(exc).__name__}: {exc}"
                    if any(i in chunk_lists for i in missing):
                        order = sorted(chunk_lists)
                        outputs = _run_group(extractor, [chunk_lists[i] for i in order], settings,
                                             [group[i].id for i in order])
                        for i, (pooled, frames) in zip(order, outputs):
                            if cache.has(keys[i]):
                                continue
                            info = {"id": group[i].id, "n_chunks": int(pooled.shape[0]),
                                    "chunk_samples": [int(c.shape[0]) for c in chunk_lists[i]], "rank": rank}
                            cache.store(keys[i], pooled, frames, info)
                            report.computed += 1
                            report.audio_seconds += sum(int(c.shape[0]) for c in chunk_lists[i]) / rate
                for i in keys:
                    if group[i].id in report.errors:
                        continue
                    report.keys[group[i].id] = keys[i]
                    if i not in missing:
                        report.cached += 1
                bar.update(len(group))
                if on_group_done is not None:
                    on_group_done(g)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    report.model_calls = getattr(extractor, "calls", 0) - calls_before
    report.forward_seconds = getattr(extractor, "forward_seconds", 0.0) - forward_before
    report.seconds = time.perf_counter() - t_start
    report.peak_memory_bytes, report.memory_kind = memory.peak_bytes, memory.kind
    report.world_size = world
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


def _embed_sharded(extractor: Encoder, tracks: list[TrackInput], cache_root: Path, settings: EmbedSettings,
                   progress: bool, on_group_done: Callable[[int], None] | None) -> EmbedReport | None:
    """torchrun: each rank embeds its groups, then rank 0 reads everything back from the merged cache (no model
    call for a track another rank computed). Returns the summed report on rank 0, None on the others."""
    rank, world = dist_context()
    mine = embed_tracks(extractor, tracks, cache_root, settings, progress=progress, on_group_done=on_group_done,
                        shard=(rank, world))
    stats = _all_gather({k: getattr(mine, k) for k in ("computed", "model_calls", "seconds", "forward_seconds",
                                                       "audio_seconds", "peak_memory_bytes")})
    if rank != 0:
        return None
    # the other ranks' audio hashes are in the shared memo now: re-reading it costs no audio decoding
    report = embed_tracks(extractor, tracks, cache_root, settings, progress=False)
    report.computed += sum(s["computed"] for s in stats)
    report.cached -= sum(s["computed"] for s in stats)
    report.model_calls += sum(s["model_calls"] for s in stats)
    report.forward_seconds += sum(s["forward_seconds"] for s in stats)
    report.audio_seconds += sum(s["audio_seconds"] for s in stats)
    report.seconds += max(s["seconds"] for s in stats)
    report.peak_memory_bytes = max([report.peak_memory_bytes] + [s["peak_memory_bytes"] for s in stats])
    report.world_size = world
    return report


def embed_dataset(
    extractor: Encoder,
    dataset: Any,
    out_dir: str | Path,
    settings: EmbedSettings,
    *,
    cache_root: str | Path | None = None,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    on_group_done: Callable[[int], None] | None = None,
    distributed: bool | None = None,
) -> tuple[Path, EmbedReport | None]:
    """Embed a tagging dataset (``name``, ``vocabulary``, ``items`` with id/audio_path/split/tags) and write the
    consolidated features folder ``out_dir`` (features.npy, chunk_track.npy, labels.npy, meta.json).

    ``distributed`` (default: when torchrun's ``WORLD_SIZE`` > 1) splits the tracks over the ranks by whole
    groups; rank 0 then consolidates from the shared cache and gets the report, the other ranks get None and
    write nothing but their cache entries. Same features as one process (tested).
    """
    out_dir = Path(out_dir)
    items = [it for it in dataset.items if splits is None or it.split in splits]
    tracks = [TrackInput(it.id, Path(it.audio_path) if it.audio_path is not None else None) for it in items]
    cache_root = Path(cache_root) if cache_root is not None else out_dir.parent / "cache"
    if distributed is None:
        distributed = dist_context()[1] > 1
    if distributed:
        report = _embed_sharded(extractor, tracks, cache_root, settings, progress, on_group_done)
        if report is None:
            return out_dir, None
    else:
        report = embed_tracks(extractor, tracks, cache_root, settings, progress=progress, on_group_done=on_group_done)
    vocabulary = list(getattr(dataset, "vocabulary", []) or [])
    cache = FeatureCache(cache_root, extractor, settings)
    kept = [it for it in items if it.id in report.keys]
    arrays = [cache.load(report.keys[it.id]) for it in kept]
    describe = extractor.describe() if hasattr(extractor, "describe") else {}
    write_features(out_dir, arrays, kept, vocabulary, {
        "dataset": getattr(dataset, "name", out_dir.name),
        "model": extractor.name,
        "model_fingerprint": extractor.fingerprint,
        "encoder": describe,
        "settings": settings.cache_fields(getattr(extractor, "sample_rate", None)),
        "cache_key": report.cache_key,
        "num_layers": extractor.num_layers,
        "dim": extractor.dim,
        "errors": report.errors,
    }, audio_keys=[report.keys[it.id] for it in kept])
    return out_dir, report
