"""What every discrete teacher is: the :class:`Teacher` protocol, padded batching on the label grid, and the
codebook-usage guard that catches a collapsed or mis-wired teacher before its codes are trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from culturemert.label_grid import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, label_frames
from culturemert.errors import DataError

logger = logging.getLogger(__name__)


def check_codebook_usage(
    codes: np.ndarray | Sequence[np.ndarray],
    codebook_size: int,
    min_fraction: float = 0.02,
    min_frames: int = 1000,
    teacher: str = "teacher",
) -> None:
    """Raise :class:`DataError` if any codebook has collapsed onto a few entries.

    ``codes`` is ``[n_codebooks, T]``, ``[B, n_codebooks, T]`` or a sequence of ``[n_codebooks, T_i]`` arrays;
    negative values are padding and ignored. A codebook that uses fewer than ``ceil(min_fraction *
    codebook_size)`` distinct entries fails, but only when the corpus holds at least ``min_frames`` valid
    frames: on a tiny corpus few distinct codes are expected. Codes outside ``[0, codebook_size)`` always fail.
    """
    if isinstance(codes, np.ndarray):
        arrays = [codes] if codes.ndim == 2 else list(codes)
    else:
        arrays = list(codes)
    if not arrays:
        return
    n_codebooks = arrays[0].shape[0]
    for arr in arrays:
        if arr.ndim != 2 or arr.shape[0] != n_codebooks:
            raise DataError(
                f"{teacher}: codes must be [n_codebooks, T] arrays with the same n_codebooks, got shape {arr.shape}"
            )
    required = max(1, math.ceil(min_fraction * codebook_size))
    for book in range(n_codebooks):
        values = np.concatenate([np.asarray(a[book]).ravel() for a in arrays]).astype(np.int64)
        values = values[values >= 0]
        if values.size and values.max() >= codebook_size:
            raise DataError(
                f"{teacher}: codebook {book} has code {int(values.max())} >= codebook_size {codebook_size}"
            )
        if values.size < min_frames:
            continue
        used = np.unique(values).size
        if used < required:
            raise DataError(
                f"{teacher}: codebook {book} collapsed: only {used} of {codebook_size} entries used over "
                f"{values.size} frames (need >= {required}, i.e. {min_fraction:.1%}); check the audio (silence, "
                f"wrong sample rate) or the teacher model"
            )


@runtime_checkable
class Teacher(Protocol):
    """A tokeniser that turns 24 kHz audio into codes on the 75 Hz label grid."""

    name: str
    n_codebooks: int
    codebook_size: int
    frame_rate: float
    sample_rate: int
    hop_length: int

    def encode(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[B, L]`` (or ``[L]``) float32 audio at 24 kHz -> int16 codes ``[B, n_codebooks, ceil(L / 320)]``."""
        ...

    def encode_many(self, wavs: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
        """Clips of different lengths -> one int16 ``[n_codebooks, ceil(L_i / 320)]`` array per clip."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable description of the teacher (what produced the codes)."""
        ...


def as_batch(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate audio and return a float32 ``[B, L]`` tensor (``[L]`` becomes ``[1, L]``)."""
    x = torch.from_numpy(np.asarray(wav)) if not isinstance(wav, torch.Tensor) else wav
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2:
        raise DataError(f"teacher input must be a [batch, samples] waveform, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise DataError(f"teacher input must be float audio in [-1, 1], got dtype {x.dtype}")
    x = x.detach().to(torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise DataError("teacher input contains NaN or infinite samples")
    return x


class BatchedTeacher:
    """Shared batching logic: ``encode_many`` pads clips of similar length into batches for ``encode``."""

    name: str
    n_codebooks: int
    codebook_size: int
    sample_rate: int = SAMPLE_RATE
    hop_length: int = HOP_LENGTH
    frame_rate: float = FRAME_RATE
    batch_size: int
    # shorter clips are encoded one at a time by encode_many (see there)
    min_batched_samples: int = 0

    def encode(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode_many(
        self,
        wavs: Sequence[np.ndarray | torch.Tensor],
        batch_size: int | None = None,
        max_batch_samples: int = 8 * 10 * SAMPLE_RATE,
    ) -> list[np.ndarray]:
        """Encode 1-D clips of different lengths in padded batches; clip ``i`` gets ``ceil(len_i / 320)`` frames.

        Clips are sorted by length and grouped greedily: a batch holds at most ``batch_size`` clips, at most
        ``max_batch_samples`` padded samples (memory), and no clip shorter than half the longest (padding
        waste). Clips shorter than ``min_batched_samples`` are encoded alone. Hence padding can only touch the
        last code frame of a clip: for EnCodec (causal, but reflect-padded at each layer's edges) the last frame
        of a padded clip may differ from encoding the clip alone and every other frame is the same; the k-means
        features zero-pad anyway, so their codes are the same in every frame.
        """
        batch_size = batch_size or self.batch_size
        clips = []
        for index, wav in enumerate(wavs):
            if len(np.shape(wav)) != 1:
                raise DataError(f"encode_many expects 1-D clips, item {index} has shape {tuple(np.shape(wav))}")
            clips.append(as_batch(wav)[0])
        results: list[np.ndarray | None] = [None] * len(clips)
        for index, clip in enumerate(clips):
            if clip.shape[0] < self.min_batched_samples:
                results[index] = self.encode(clip[None])[0]
        pending = sorted(
            (i for i in range(len(clips)) if results[i] is None), key=lambda i: clips[i].shape[0], reverse=True
        )
        while pending:
            longest = clips[pending[0]].shape[0]
            members = [pending[0]]
            for index in pending[1:]:
                fits = (len(members) + 1) * longest <= max_batch_samples and 2 * clips[index].shape[0] >= longest
                if len(members) == batch_size or not fits:
                    break
                members.append(index)
            pending = pending[len(members) :]
            batch = torch.zeros(len(members), longest)
            for row, index in enumerate(members):
                batch[row, : clips[index].shape[0]] = clips[index]
            codes = self.encode(batch)
            for row, index in enumerate(members):
                frames = label_frames(clips[index].shape[0])
                results[index] = np.ascontiguousarray(codes[row, :, :frames])
        return results  # type: ignore[return-value]


def teacher_fingerprint(teacher: Any) -> str:
    """sha256 hex digest of everything that decides a teacher's codes, so two prepared directories can be checked
    for a common teacher: code 7 of one k-means codebook is not code 7 of another fitted elsewhere.

    Uses ``teacher.fingerprint()`` when the teacher has one (:class:`KMeansTeacher`: centroids, mean, std and
    feature settings; :class:`EncodecTeacher`: weights and bandwidth; neither includes file paths), otherwise the
    sha256 of its name and :meth:`Teacher.state` as sorted JSON.
    """
    method = getattr(teacher, "fingerprint", None)
    if callable(method):
        return str(method())
    described = json.dumps({"name": str(teacher.name), "state": teacher.state()}, sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()


def array_fingerprint(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """sha256 of sorted-JSON ``meta`` plus each array's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
