"""The on-disk feature format that ``embed`` writes and ``probe`` reads, and its in-memory form.

A consolidated features folder holds (see docs/evaluation.md):

* ``features.npy`` — float32 ``[C, L, D]``: C chunks (windows) of all tracks, L hidden states, D channels; each
  chunk's hidden states are mean-pooled over time;
* ``chunk_track.npy`` — int64 ``[C]``: the track (row of ``labels.npy`` / entry of ``meta.tracks``) each chunk
  belongs to, non-decreasing (chunks grouped by track, in track order);
* ``labels.npy`` — uint8 ``[N, K]``: multi-hot track labels over ``meta.vocabulary``;
* ``meta.json`` — written last: dataset, model, fingerprint, settings, ``format``, ``vocabulary``, ``num_chunks``,
  ``tracks`` (id, split and, when embed knows it, the ``sha256`` of the audio bytes of each row) and
  ``duplicate_audio`` (groups of tracks whose audio bytes are identical but which sit in different splits).
  Readers check the arrays against it, so a crash between the writes is detected, never trusted.

Window positions are not stored: embed cuts windows deterministically (``window`` s long, ``hop`` s apart,
starting at 0, see ``culturemert.evaluate.embed.chunk_bounds``), so window k of a track starts at ``k * hop``
seconds; :func:`truncate_windows` uses this to cut recordings at probe time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from culturemert.errors import DataError
from culturemert.files import atomic_path, atomic_write_text, save_npy_atomic

log = logging.getLogger(__name__)

__all__ = [
    "FEATURES_FORMAT",
    "SplitFeatures",
    "ProbeData",
    "label_row",
    "write_features",
    "read_features",
    "load_probe_data",
    "cross_split_duplicates",
    "describe_duplicates",
    "truncate_windows",
]

#: Version of the consolidated folder layout (stored as ``meta["format"]``).
FEATURES_FORMAT = 1


@dataclass
class SplitFeatures:
    """Chunk features of one split, chunks grouped by track (track t owns chunks chunk_start[t]:chunk_start[t+1])."""

    features: torch.Tensor  # [C, L, D] float32
    chunk_track: torch.Tensor  # [C] int64, non-decreasing
    labels: torch.Tensor  # [N, K] float32 track labels

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise DataError(f"features must be [chunks, layers, dim], got {tuple(self.features.shape)}")
        if self.chunk_track.shape[0] != self.features.shape[0]:
            raise DataError("chunk_track and features disagree on the number of chunks")
        if self.chunk_track.numel() and bool((self.chunk_track[1:] < self.chunk_track[:-1]).any()):
            raise DataError("chunks must be grouped by track (chunk_track non-decreasing)")
        counts = torch.bincount(self.chunk_track, minlength=self.labels.shape[0])
        if counts.shape[0] != self.labels.shape[0] or bool((counts == 0).any()):
            raise DataError("every track needs at least one chunk and chunk_track must index the label rows")
        self.chunk_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    @property
    def num_tracks(self) -> int:
        return int(self.labels.shape[0])

    def window_index(self) -> torch.Tensor:
        """[C] int64: the position of each chunk inside its track (0 for a track's first window)."""
        return torch.arange(self.chunk_track.shape[0]) - self.chunk_start[self.chunk_track]

    def select_chunks(self, keep: torch.Tensor) -> "SplitFeatures":
        """A copy holding only the chunks where ``keep`` [C] is true (every track must keep one)."""
        return SplitFeatures(self.features[keep], self.chunk_track[keep], self.labels)


@dataclass
class ProbeData:
    """The three splits of one features folder as tensors, plus the tag names of the label columns.

    ``test`` is None when only validation is needed (λ sweeps). ``num_layers``/``dim``/``num_tags`` are the
    L, D and K of the features and labels. ``dataset``, ``window_seconds``/``hop_seconds`` (the embed windows;
    None when unknown, ``window_seconds <= 0`` for whole-track chunks) and ``duplicates`` (audio found in two
    splits, see :func:`cross_split_duplicates`) come from ``meta.json`` when the data are read from a folder.
    """

    train: SplitFeatures
    valid: SplitFeatures
    test: SplitFeatures | None = None
    vocabulary: list[str] = field(default_factory=list)
    dataset: str = ""
    window_seconds: float | None = None
    hop_seconds: float | None = None
    duplicates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.train.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.train.features.shape[2])

    @property
    def num_tags(self) -> int:
        return int(self.train.labels.shape[1])


def label_row(tags: Iterable[str], vocabulary: Sequence[str]) -> np.ndarray:
    """Multi-hot uint8 ``[K]`` of ``tags`` over ``vocabulary`` (tags outside it ignored)."""
    index = {t: k for k, t in enumerate(vocabulary)}
    row = np.zeros(len(vocabulary), dtype=np.uint8)
    for tag in tags:
        if tag in index:
            row[index[tag]] = 1
    return row


def cross_split_duplicates(tracks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of tracks with byte-identical audio (same ``sha256``) that are not all in one split.

    ``tracks`` are ``meta["tracks"]`` entries (``id``, ``split``, optional ``sha256``; entries without a hash
    are ignored). Returns ``[{"sha256": ..., "tracks": [{"id", "split"}, ...]}]`` in order of first appearance:
    the same recording under two names in, e.g., train and test leaks test audio into training.
    """
    groups: dict[str, list[dict[str, str]]] = {}
    for t in tracks:
        digest = t.get("sha256")
        if digest:
            groups.setdefault(digest, []).append({"id": str(t["id"]), "split": str(t["split"])})
    return [
        {"sha256": digest, "tracks": members}
        for digest, members in groups.items()
        if len({m["split"] for m in members}) > 1
    ]


def describe_duplicates(duplicates: Sequence[dict[str, Any]], limit: int = 3) -> str:
    """One line naming the first ``limit`` groups, e.g. ``'a.wav' (train) = 'b.wav' (test)``."""
    shown = [
        " = ".join(f"{m['id']!r} ({m['split']})" for m in group["tracks"]) for group in list(duplicates)[:limit]
    ]
    more = f"; and {len(duplicates) - limit} more" if len(duplicates) > limit else ""
    return "; ".join(shown) + more


def write_features(
    out_dir: Path,
    arrays: list[np.ndarray],
    items: list[Any],
    vocabulary: list[str],
    meta: dict[str, Any],
    audio_keys: Sequence[str] | None = None,
) -> None:
    """Write a consolidated folder; ``audio_keys`` (sha256 of each item's audio bytes) lets readers find the same
    recording listed under two names in two splits (recorded in ``meta["duplicate_audio"]`` and warned about)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if audio_keys is not None and len(audio_keys) != len(items):
        raise ValueError(f"{len(audio_keys)} audio keys for {len(items)} items")
    if arrays:
        n_layers, dim = arrays[0].shape[1:]
    else:
        n_layers, dim = meta["num_layers"], meta["dim"]
    n_chunks = sum(a.shape[0] for a in arrays)
    with atomic_path(out_dir / "features.npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_chunks, n_layers, dim))
        pos = 0
        for a in arrays:
            mm[pos : pos + a.shape[0]] = a
            pos += a.shape[0]
        mm.flush()
        del mm
    chunk_track = np.concatenate([np.full(a.shape[0], t, dtype=np.int64) for t, a in enumerate(arrays)]) if arrays else np.zeros(0, np.int64)
    save_npy_atomic(out_dir / "chunk_track.npy", chunk_track)
    labels = np.stack([label_row(it.tags, vocabulary) for it in items]) if items else np.zeros((0, len(vocabulary)), np.uint8)
    save_npy_atomic(out_dir / "labels.npy", labels)
    tracks = [{"id": it.id, "split": it.split} for it in items]
    if audio_keys is not None:
        for entry, key in zip(tracks, audio_keys):
            entry["sha256"] = key
    duplicates = cross_split_duplicates(tracks)
    if duplicates:
        log.warning(
            "%s: %d recording(s) with identical audio bytes are in two splits (train/test leakage): %s",
            meta.get("dataset", out_dir.name), len(duplicates), describe_duplicates(duplicates),
        )
    meta = {
        **meta,
        "format": FEATURES_FORMAT,
        "vocabulary": vocabulary,
        "num_chunks": int(n_chunks),
        "tracks": tracks,
        "duplicate_audio": duplicates,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # meta.json last: readers check the arrays against it, so a crash in between is detected, not trusted
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))


def read_features(features_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(features [C, L, D] memory-mapped, chunk_track [C], labels [N, K], meta) of a consolidated folder."""
    d = Path(features_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{d}: no meta.json (not a features folder written by `culturemert embed`)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    try:
        features = np.load(d / "features.npy", mmap_mode="r", allow_pickle=False)
        chunk_track = np.load(d / "chunk_track.npy", allow_pickle=False)
        labels = np.load(d / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{d}: unreadable features ({exc}); re-run embed") from None
    n_tracks = len(meta["tracks"])
    if features.shape[0] != meta["num_chunks"] or chunk_track.shape[0] != meta["num_chunks"] or labels.shape[0] != n_tracks:
        raise DataError(f"{d}: arrays do not match meta.json (interrupted write?); re-run embed")
    return features, chunk_track, labels, meta


def _check_finite(x: np.ndarray, features_dir: str | Path, split: str, tracks: list[int], owner: np.ndarray,
                  meta: dict[str, Any]) -> None:
    """Refuse NaN/inf features: they would poison every probe of the grid (and its selection) silently."""
    block = max(1, 16_000_000 // max(1, x[0].size))  # bounds the temporary mask of a multi-GB split
    if all(np.isfinite(x[c0 : c0 + block]).all() for c0 in range(0, x.shape[0], block)):
        return
    bad_rows = ~np.isfinite(x).reshape(x.shape[0], x.shape[1], -1).all(axis=2)  # [C, L]
    chunks = np.flatnonzero(bad_rows.any(axis=1))
    first = int(chunks[0])
    track = meta["tracks"][tracks[int(owner[first])]]
    layer = int(np.flatnonzero(bad_rows[first])[0])
    n_tracks = len({int(owner[c]) for c in chunks})
    more = f" (and {n_tracks - 1} more track(s) of the split)" if n_tracks > 1 else ""
    raise DataError(
        f"{features_dir}: non-finite features (NaN/inf) in track {track['id']!r} ({split} split), hidden state "
        f"{layer}{more}; re-embed the folder (check the model weights and the audio of that track)"
    )


def load_probe_data(features_dir: str | Path, *, require_test: bool = True, splits: Sequence[str] = ("train", "valid", "test")):
    """Consolidated features -> :class:`ProbeData` (+ meta).

    Raises :class:`DataError` when a split is empty or when a feature is NaN/inf (naming the folder, the track
    and the hidden state).
    """
    features, chunk_track, labels, meta = read_features(features_dir)
    starts = np.concatenate([[0], np.cumsum(np.bincount(chunk_track, minlength=len(meta["tracks"])))])
    parts: dict[str, SplitFeatures] = {}
    for split in splits:
        tracks = [t for t, info in enumerate(meta["tracks"]) if info["split"] == split]
        if not tracks:
            if split == "test" and not require_test:
                continue
            raise DataError(f"{features_dir}: no embedded tracks in the {split!r} split")
        chunk_index = np.concatenate([np.arange(starts[t], starts[t + 1]) for t in tracks])
        owner = np.concatenate([np.full(starts[t + 1] - starts[t], i) for i, t in enumerate(tracks)])
        x = np.ascontiguousarray(features[chunk_index])
        _check_finite(x, features_dir, split, tracks, owner, meta)
        parts[split] = SplitFeatures(
            torch.from_numpy(x),
            torch.from_numpy(owner.astype(np.int64)),
            torch.from_numpy(labels[tracks].astype(np.float32)),
        )
    settings = meta.get("settings") or {}
    window = settings.get("window")
    hop = settings.get("hop", window)
    loaded = set(parts)
    in_loaded = [t for t in meta["tracks"] if t["split"] in loaded]
    data = ProbeData(
        parts["train"], parts["valid"], parts.get("test"), list(meta["vocabulary"]),
        dataset=str(meta.get("dataset", Path(features_dir).name)),
        window_seconds=None if window is None else float(window),
        hop_seconds=None if hop is None else float(hop),
        duplicates=cross_split_duplicates(in_loaded),
    )
    return data, meta


def truncate_windows(data: ProbeData, max_seconds: float) -> tuple[ProbeData, dict[str, int]]:
    """Cut every recording at ``max_seconds`` by dropping the windows that end after it.

    Window k of a track covers [k * hop, k * hop + window) seconds (its nominal span; a track's last window may
    be shorter) and is kept when ``k * hop + window <= max_seconds``; a track's first window is always kept.
    When ``max_seconds`` is a multiple of the hop and hop = window (non-overlapping windows, e.g. 5-s windows
    and the 150/780/330-s cuts of the CultureMERT evaluation) this keeps exactly the windows that embedding
    the truncated audio would produce; only the waveform normalisation differs (``normalize_scope: track``
    normalises with the statistics of the whole recording). Returns the truncated data and the number of
    windows dropped per split. Raises :class:`DataError` when the window positions are unknown (whole-track
    chunks or a folder without embed settings).
    """
    window, hop = data.window_seconds, data.hop_seconds
    if window is None or hop is None or window <= 0 or hop <= 0:
        raise DataError(
            f"{data.dataset or 'features'}: cannot truncate to {max_seconds:g} s at probe time: the features hold "
            "whole-track chunks (window <= 0) or no embed settings; embed with a window (e.g. --window 5) or "
            "truncate at embed time with max_seconds"
        )
    dropped: dict[str, int] = {}
    parts: dict[str, SplitFeatures | None] = {}
    for name in ("train", "valid", "test"):
        split = getattr(data, name)
        if split is None:
            parts[name] = None
            continue
        k = split.window_index().to(torch.float64)
        keep = (k * hop + window <= max_seconds + 1e-6) | (k == 0)
        dropped[name] = int((~keep).sum())
        parts[name] = split.select_chunks(keep) if dropped[name] else split
    return replace(data, train=parts["train"], valid=parts["valid"], test=parts["test"]), dropped
