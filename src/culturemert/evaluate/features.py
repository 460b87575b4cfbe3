"""The on-disk feature format that ``embed`` writes and ``probe`` reads, and its in-memory form.

A consolidated features folder holds (see docs/evaluation.md):

* ``features.npy`` — float32 ``[C, L, D]``: C chunks (windows) of all tracks, L hidden states, D channels; each
  chunk's hidden states are mean-pooled over time;
* ``chunk_track.npy`` — int64 ``[C]``: the track (row of ``labels.npy`` / entry of ``meta.tracks``) each chunk
  belongs to, non-decreasing (chunks grouped by track, in track order);
* ``labels.npy`` — uint8 ``[N, K]``: multi-hot track labels over ``meta.vocabulary``;
* ``meta.json`` — written last: dataset, model, fingerprint, settings, ``format``, ``vocabulary``, ``num_chunks``,
  ``tracks`` (id and split of each row). Readers check the arrays against it, so a crash between the writes is
  detected, never trusted.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from culturemert.errors import DataError
from culturemert.files import atomic_write_text, save_npy_atomic

__all__ = ["FEATURES_FORMAT", "SplitFeatures", "ProbeData", "label_row", "write_features", "read_features", "load_probe_data"]

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


@dataclass
class ProbeData:
    """The three splits of one features folder as tensors, plus the tag names of the label columns.

    ``test`` is None when only validation is needed (λ sweeps). ``num_layers``/``dim``/``num_tags`` are the
    L, D and K of the features and labels.
    """

    train: SplitFeatures
    valid: SplitFeatures
    test: SplitFeatures | None = None
    vocabulary: list[str] = field(default_factory=list)

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
    index = {t: k for k, t in enumerate(vocabulary)}
    row = np.zeros(len(vocabulary), dtype=np.uint8)
    for tag in tags:
        if tag in index:
            row[index[tag]] = 1
    return row


def write_features(out_dir: Path, arrays: list[np.ndarray], items: list[Any], vocabulary: list[str], meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if arrays:
        n_layers, dim = arrays[0].shape[1:]
    else:
        n_layers, dim = meta["num_layers"], meta["dim"]
    n_chunks = sum(a.shape[0] for a in arrays)
    fd, tmp = tempfile.mkstemp(prefix=".features.npy.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_chunks, n_layers, dim))
        pos = 0
        for a in arrays:
            mm[pos : pos + a.shape[0]] = a
            pos += a.shape[0]
        mm.flush()
        del mm
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_dir / "features.npy")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    chunk_track = np.concatenate([np.full(a.shape[0], t, dtype=np.int64) for t, a in enumerate(arrays)]) if arrays else np.zeros(0, np.int64)
    save_npy_atomic(out_dir / "chunk_track.npy", chunk_track)
    labels = np.stack([label_row(it.tags, vocabulary) for it in items]) if items else np.zeros((0, len(vocabulary)), np.uint8)
    save_npy_atomic(out_dir / "labels.npy", labels)
    meta = {
        **meta,
        "format": FEATURES_FORMAT,
        "vocabulary": vocabulary,
        "num_chunks": int(n_chunks),
        "tracks": [{"id": it.id, "split": it.split} for it in items],
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


def load_probe_data(features_dir: str | Path, *, require_test: bool = True, splits: Sequence[str] = ("train", "valid", "test")):
    """Consolidated features -> :class:`ProbeData` (+ meta)."""
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
        parts[split] = SplitFeatures(
            torch.from_numpy(np.ascontiguousarray(features[chunk_index])),
            torch.from_numpy(owner.astype(np.int64)),
            torch.from_numpy(labels[tracks].astype(np.float32)),
        )
    data = ProbeData(parts["train"], parts["valid"], parts.get("test"), list(meta["vocabulary"]))
    return data, meta
