"""Pre-training targets: discrete 75 Hz teacher codes (EnCodec RVQ or k-means) and MERT's CQT target.

Label grid
    Every teacher emits codes on the grid of :mod:`culturemert.label_grid` (one code per codebook per 320-sample
    hop of 24 kHz audio, ``ceil(L / 320)`` codes for ``L`` samples, code ``k`` paired with model frame ``k``).

CQT target (:class:`MertCQT`)
    Reproduces ``nnAudio.features.cqt.CQT`` (= ``CQT1992v2``) with MERT's parameters (24 kHz, hop 320, 32.7 Hz,
    336 bins, 48 bins/octave, L1-normalised Hann kernels, centred with zero padding, librosa scaling, linear
    magnitude), but through the FFT instead of 65 536-tap time-domain convolutions.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from culturemert.label_grid import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, label_frames
from culturemert.audio import mel_filterbank
from culturemert.files import atomic_write_bytes
from culturemert.errors import CheckpointError, ConfigError, DataError, UserError
from culturemert.runtime import resolve_device

logger = logging.getLogger(__name__)

__all__ = [
    "TEACHERS",
    "EncodecTeacher",
    "KMeansTeacher",
    "MertCQT",
    "Teacher",
    "build_teacher",
    "check_codebook_usage",
]

DEFAULT_ENCODEC = "facebook/encodec_24khz"


# ---------------------------------------------------------------------------------------------------------------
# Label grid helpers and guards
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# CQT target
# ---------------------------------------------------------------------------------------------------------------


def _cqt_time_kernels(
    sample_rate: int,
    fmin: float,
    n_bins: int,
    bins_per_octave: int,
    filter_scale: float,
    norm: int | None,
    window: str | tuple | float,
) -> tuple[np.ndarray, np.ndarray, int, list[int], list[np.ndarray]]:
    """Time-domain CQT kernels laid out as in nnAudio's ``create_cqt_kernels`` (float64).

    Returns (frequencies, lengths, kernel_width, start offset of each kernel inside the kernel_width window,
    kernel samples).
    """
    from scipy.signal import get_window

    q_factor = float(filter_scale) / (2 ** (1 / bins_per_octave) - 1)
    freqs = fmin * 2.0 ** (np.arange(n_bins) / float(bins_per_octave))
    if freqs.max() > sample_rate / 2:
        raise ConfigError(f"CQT top bin {freqs.max():.1f} Hz exceeds Nyquist ({sample_rate / 2} Hz); reduce n_bins")
    lengths = np.ceil(q_factor * sample_rate / freqs)
    width = int(2 ** np.ceil(np.log2(lengths.max())))
    starts: list[int] = []
    kernels: list[np.ndarray] = []
    for freq, length in zip(freqs, lengths):
        n = int(length)
        # nnAudio centres each kernel in the window, odd lengths one sample further left
        start = int(np.ceil(width / 2.0 - length / 2.0)) - (1 if n % 2 == 1 else 0)
        # sample times floor(-n/2) .. floor(n/2) - 1, as np.r_[-l//2 : l//2] gives for float l
        times = np.arange(n, dtype=np.float64) + math.floor(-length / 2)
        kernel = get_window(window, n, fftbins=True) * np.exp(2j * np.pi * freq / sample_rate * times) / length
        if norm:
            kernel = kernel / np.linalg.norm(kernel, norm)
        starts.append(start)
        kernels.append(kernel)
    return freqs, lengths, width, starts, kernels


@dataclass(frozen=True)
class _SpectralKernels:
    frequencies: np.ndarray
    lengths: torch.Tensor  # float32 filter lengths (nnAudio's ``lenghts``)
    kernel_width: int  # nnAudio's power-of-two kernel width
    support_start: int  # first sample of the window that any kernel covers
    support: int  # samples from support_start to the end of the last kernel
    crow_indices: torch.Tensor  # int64 [rows + 1] CSR row pointers
    col_indices: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # complex64 [nnz]


@functools.lru_cache(maxsize=4)
def _spectral_cqt_kernels(
    sample_rate: int,
    hop: int,
    fmin: float,
    n_bins: int,
    bins_per_octave: int,
    filter_scale: float,
    norm: int | None,
    window: str | tuple | float,
    fft_frames: int,
    threshold: float,
) -> _SpectralKernels:
    """Sparse ``[n_bins * fft_frames, 2 * (N/2 + 1)]`` matrix taking a block's rfft to folded CQT spectra.

    Cached because building it costs ~2 s for MERT's parameters. Columns ``[0, N/2]`` act on the block's rfft
    ``X[j]``, columns ``N/2 + 1 + j`` on ``conj(X[j])``, which stands in for the negative frequency ``X[N - j]``
    of a real signal.
    """
    freqs, lengths, width, starts, kernels = _cqt_time_kernels(
        sample_rate, fmin, n_bins, bins_per_octave, filter_scale, norm, window
    )
    support_start = min(starts)
    support = max(s + len(k) for s, k in zip(starts, kernels)) - support_start
    n_fft = fft_frames * hop
    if n_fft < support:
        raise ConfigError(
            f"fft_frames={fft_frames} is too small: the FFT block ({n_fft} samples) must cover the longest CQT "
            f"kernel ({support} samples); use fft_frames >= {-(-support // hop)}"
        )
    half = n_fft // 2
    n_rfft = half + 1
    rows, cols, vals = [], [], []
    chunk = 16  # kernels per batched FFT: bounds memory at chunk * N complex values
    for first in range(0, n_bins, chunk):
        members = range(first, min(first + chunk, n_bins))
        padded = torch.zeros(len(members), n_fft, dtype=torch.complex64)
        for row_index, bin_index in enumerate(members):
            offset = starts[bin_index] - support_start
            kernel = torch.from_numpy(kernels[bin_index].astype(np.complex64))
            padded[row_index, offset : offset + len(kernel)] = kernel
        spectra = torch.fft.fft(padded, dim=-1)
        magnitude = spectra.abs()
        keep_mask = magnitude >= threshold * magnitude.max(dim=-1, keepdim=True).values
        for row_index, bin_index in enumerate(members):
            keep = torch.nonzero(keep_mask[row_index]).squeeze(1).numpy()
            # y[hop*m] = 1/N sum_j X[j] conj(K[j]) e^{2 pi i j m / fft_frames}: fold j modulo fft_frames; the
            # ifft's 1/fft_frames leaves a factor 1/hop. sqrt(length) is the librosa scaling, from fp32
            # lengths as in nnAudio's buffer.
            scale = math.sqrt(float(np.float32(lengths[bin_index]))) / hop
            negative = keep > half
            rows.append(bin_index * fft_frames + keep % fft_frames)
            # one column per frequency and one fold slot per (bin, frequency): no duplicate entries
            cols.append(np.where(negative, n_rfft + (n_fft - keep), keep))
            vals.append(np.conj(spectra[row_index, keep].numpy()) * scale)
    row = np.concatenate(rows)
    col = np.concatenate(cols)
    order = np.lexsort((col, row))  # CSR wants entries sorted row-major
    row_counts = np.bincount(row, minlength=n_bins * fft_frames)
    crow = np.concatenate([[0], np.cumsum(row_counts)])
    return _SpectralKernels(
        frequencies=freqs,
        lengths=torch.tensor(lengths, dtype=torch.float32),
        kernel_width=width,
        support_start=support_start,
        support=support,
        crow_indices=torch.from_numpy(crow.astype(np.int64)),
        col_indices=torch.from_numpy(col[order].astype(np.int64)),
        values=torch.from_numpy(np.concatenate(vals)[order].astype(np.complex64)),
    )


class MertCQT(nn.Module):
    """MERT's CQT "musical teacher" target, computed with sparse frequency-domain kernels.

    Equals ``nnAudio.features.cqt.CQT1992v2(sr, hop_length, fmin, n_bins=n_bins, bins_per_octave=...,
    filter_scale, norm, window, center=True, pad_mode="constant", output_format="Magnitude")`` called with the
    default ``normalization_type="librosa"`` (each bin scaled by sqrt(filter length)), up to the kernel
    truncation set by ``kernel_threshold`` (relative error ~1e-5 on music).

    Method (Brown & Puckette 1992, plus exact decimation): nnAudio evaluates
    ``y_k[m] = sum_n xpad[hop*m + n] * conj(kernel_k[n])``. A block of ``N = fft_frames * hop`` padded samples
    is FFT'd once; each kernel's N-point spectrum, computed once at construction, is nonzero only near its
    centre frequency, so only coefficients above ``kernel_threshold`` times its peak are kept. Sampling the
    correlation at multiples of ``hop`` equals folding its spectrum modulo ``fft_frames`` bins and taking an
    ``fft_frames``-point inverse FFT, so one sparse matrix maps the block spectrum to the folded spectra of
    all bins. Longer inputs are cut into overlapping blocks (overlap-save).

    Frame alignment: CQT frame ``k`` is centred at sample ``hop*k`` (``320k``), and there are
    ``floor(L / hop) + 1`` frames; the model's conv frame ``k`` spans ``[320k, 320k + 400)``, so the CQT
    frame sits ~200 samples (8 ms) before the conv frame centre. MERT keeps the first ``T`` CQT frames for
    ``T`` conv frames and accepts this offset; so does culturemert.

    Input ``[B, L]`` float waveform (any device; computed in fp32 on the input's device, no autograd);
    output ``[B, n_bins, floor(L / hop) + 1]`` linear magnitudes (``floor((L - kernel_width) / hop) + 1`` with
    ``center=False``). Move the module to the input's device once (``.to(device)``); otherwise the sparse
    kernel (~30 MB for MERT's parameters) is copied on every call.

    Args:
        sample_rate, hop_length, fmin, n_bins, bins_per_octave, filter_scale, norm, window, center: as in nnAudio.
        pad_mode: only ``"constant"`` (zero padding), MERT's choice.
        fft_frames: FFT block length in hops (``N = fft_frames * hop``); must exceed the longest kernel. The
            default 600 (N = 192 000) covers a 5 s crop (376 frames) in one block.
        kernel_threshold: spectral kernel coefficients below this fraction of each kernel's peak are dropped;
            1e-5 keeps ~1.7 M coefficients and a relative error ~2e-5 vs nnAudio.
        max_blocks_per_call: FFT blocks processed together, bounding peak memory for long inputs.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        hop_length: int = HOP_LENGTH,
        fmin: float = 32.7,
        n_bins: int = 336,
        bins_per_octave: int = 48,
        filter_scale: float = 1.0,
        norm: int | None = 1,
        window: str | tuple | float = "hann",
        center: bool = True,
        pad_mode: str = "constant",
        fft_frames: int = 600,
        kernel_threshold: float = 1e-5,
        max_blocks_per_call: int = 32,
    ) -> None:
        super().__init__()
        if pad_mode != "constant":
            raise ConfigError(f"MertCQT supports pad_mode='constant' only (MERT's setting), got {pad_mode!r}")
        if not 0.0 <= kernel_threshold < 1.0:
            raise ConfigError(f"kernel_threshold must be in [0, 1), got {kernel_threshold}")
        self.sample_rate = int(sample_rate)
        self.hop_length = int(hop_length)
        self.n_bins = int(n_bins)
        self.center = bool(center)
        self.fft_frames = int(fft_frames)
        self.max_blocks_per_call = int(max_blocks_per_call)

        kernels = _spectral_cqt_kernels(
            self.sample_rate,
            self.hop_length,
            float(fmin),
            self.n_bins,
            int(bins_per_octave),
            float(filter_scale),
            norm,
            window,
            self.fft_frames,
            float(kernel_threshold),
        )
        self.frequencies = kernels.frequencies
        self.kernel_width = kernels.kernel_width
        self._support_start = kernels.support_start
        self.fft_size = self.fft_frames * self.hop_length
        # frames whose kernel span fits in one block without circular wrap-around
        self.frames_per_block = (self.fft_size - kernels.support) // self.hop_length + 1
        self.register_buffer("lengths", kernels.lengths, persistent=False)
        # real and imaginary parts as two real CSR matrices: real CSR @ dense is the fastest sparse product on
        # CPU (MKL) and is supported by cuSPARSE, unlike some complex sparse kernels
        self.register_buffer("_kernel_crow", kernels.crow_indices, persistent=False)
        self.register_buffer("_kernel_col", kernels.col_indices, persistent=False)
        self.register_buffer("_kernel_real", kernels.values.real.contiguous(), persistent=False)
        self.register_buffer("_kernel_imag", kernels.values.imag.contiguous(), persistent=False)

    @property
    def num_kernel_coefficients(self) -> int:
        """Number of complex spectral-kernel coefficients kept (sparsity of the transform)."""
        return int(self._kernel_col.numel())

    def num_frames(self, num_samples: int) -> int:
        """Number of CQT frames for ``num_samples`` input samples."""
        if self.center:
            return num_samples // self.hop_length + 1
        return max(0, (num_samples - self.kernel_width) // self.hop_length + 1)

    def _kernel_matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of the spectral kernel as CSR matrices on ``device``."""
        parts = (self._kernel_crow, self._kernel_col, self._kernel_real, self._kernel_imag)
        crow, col, real, imag = (p if p.device == device else p.to(device) for p in parts)
        shape = (self.n_bins * self.fft_frames, 2 * (self.fft_size // 2 + 1))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta")
            return (
                torch.sparse_csr_tensor(crow, col, real, shape, check_invariants=False),
                torch.sparse_csr_tensor(crow, col, imag, shape, check_invariants=False),
            )

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """CQT magnitudes ``[B, n_bins, frames]`` of a ``[B, L]`` waveform batch."""
        if waveform.ndim != 2:
            raise ValueError(f"MertCQT expects a [batch, samples] waveform, got shape {tuple(waveform.shape)}")
        x = waveform.detach().to(torch.float32)
        batch, length = x.shape
        num_frames = self.num_frames(length)
        if num_frames < 1:
            return x.new_zeros(batch, self.n_bins, 0)
        per_block = self.frames_per_block
        num_blocks = -(-num_frames // per_block)
        # sample index (in x) where block 0 starts: centred frames look kernel_width // 2 samples back
        first = self._support_start - (self.kernel_width // 2 if self.center else 0)
        total = self.hop_length * per_block * (num_blocks - 1) + self.fft_size
        x = nn.functional.pad(x, (-first, total + first - length))
        blocks = x.unfold(-1, self.fft_size, self.hop_length * per_block).reshape(batch * num_blocks, -1)

        kernel_real, kernel_imag = self._kernel_matrices(x.device)
        outputs = []
        for chunk in blocks.split(self.max_blocks_per_call):
            n = chunk.shape[0]
            spectrum = torch.fft.rfft(chunk, dim=-1)
            both = torch.cat([spectrum, spectrum.conj()], dim=-1).transpose(0, 1)  # [2 * n_rfft, n]
            parts = torch.cat([both.real, both.imag], dim=1).contiguous()  # [2 * n_rfft, 2n]: re | im
            real_times = kernel_real @ parts
            imag_times = kernel_imag @ parts
            folded = torch.complex(
                real_times[:, :n] - imag_times[:, n:], real_times[:, n:] + imag_times[:, :n]
            )  # [n_bins * fft_frames, n]
            folded = folded.transpose(0, 1).reshape(n, self.n_bins, self.fft_frames)
            frames = torch.fft.ifft(folded, dim=-1)[..., :per_block]
            outputs.append(frames.abs())
        cqt = torch.cat(outputs).reshape(batch, num_blocks, self.n_bins, per_block)
        cqt = cqt.permute(0, 2, 1, 3).reshape(batch, self.n_bins, num_blocks * per_block)
        return cqt[..., :num_frames].contiguous()

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, hop_length={self.hop_length}, n_bins={self.n_bins}, "
            f"fft_frames={self.fft_frames}, coefficients={self.num_kernel_coefficients}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Discrete teachers
# ---------------------------------------------------------------------------------------------------------------


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


def _as_batch(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
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


class _BatchedTeacher:
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
            clips.append(_as_batch(wav)[0])
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


def _tensor_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class EncodecTeacher(_BatchedTeacher):
    """EnCodec 24 kHz residual-VQ codes, as MERT-v1 uses: 6 kbps -> 8 codebooks x 1024 entries at 75 Hz.

    ``model`` is a Hub id (default ``facebook/encodec_24khz``; offline it must already be in the Hugging Face
    cache), a local directory saved with ``save_pretrained``, or an ``EncodecModel`` instance. Each clip is
    encoded in one pass (no chunking), like MERT's ``prepare_codecs_from_manifest.py``. ``batch_size``
    (clips per forward pass) defaults to 1 on CPU, where batching was measured to be slower, and 16 on CUDA.
    """

    name = "encodec"
    # reflect padding at the start of each layer reads up to ~7 frames ahead at 75 Hz; with at least 16 frames
    # a clip's early codes cannot see batch padding
    min_batched_samples = 16 * HOP_LENGTH

    def __init__(
        self,
        model: str | os.PathLike | Any = DEFAULT_ENCODEC,
        bandwidth: float = 6.0,
        device: str | torch.device | None = "cpu",
        batch_size: int | None = None,
    ) -> None:
        self.model, self.source = _load_encodec(model)
        config = self.model.config
        hop = int(np.prod(config.upsampling_ratios))
        problems = []
        if config.sampling_rate != SAMPLE_RATE:
            problems.append(f"sampling_rate {config.sampling_rate} (need {SAMPLE_RATE})")
        if hop != HOP_LENGTH:
            problems.append(f"hop {hop} (need {HOP_LENGTH})")
        if config.audio_channels != 1:
            problems.append(f"audio_channels {config.audio_channels} (need 1)")
        if config.chunk_length_s is not None:
            problems.append(f"chunk_length_s {config.chunk_length_s} (need None: whole-clip encoding)")
        if problems:
            raise ConfigError(f"EnCodec model {self.source} does not fit the 75 Hz label grid: " + ", ".join(problems))
        if float(bandwidth) not in [float(b) for b in config.target_bandwidths]:
            raise ConfigError(
                f"teacher bandwidth {bandwidth} is not supported by {self.source}; choose one of "
                f"{list(config.target_bandwidths)}"
            )
        if config.codebook_size > np.iinfo(np.int16).max + 1:
            raise ConfigError(f"codebook_size {config.codebook_size} does not fit int16 codes")
        self.bandwidth = float(bandwidth)
        self.n_codebooks = min(
            self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth), config.num_quantizers
        )
        self.codebook_size = int(config.codebook_size)
        self.device = resolve_device(device)
        # measured (bench/teacher_tokenize.py): on CPU, batches make the 24 kHz convolutions cache-bound and
        # slower than one clip at a time; on a GPU batching is what keeps it busy
        if batch_size is None:
            batch_size = 16 if self.device.type == "cuda" else 1
        self.batch_size = int(batch_size)
        self.model.eval().to(self.device)
        self._fingerprint: str | None = None

    def encode(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[B, L]`` float32 audio at 24 kHz -> int16 codes ``[B, n_codebooks, ceil(L / 320)]``."""
        x = _as_batch(wav)
        expected = label_frames(x.shape[1])
        if expected == 0:
            return np.zeros((x.shape[0], self.n_codebooks, 0), dtype=np.int16)
        outputs = []
        with torch.inference_mode():
            for chunk in x.split(self.batch_size):
                encoded = self.model.encode(chunk[:, None, :].to(self.device), bandwidth=self.bandwidth)
                codes = encoded.audio_codes if hasattr(encoded, "audio_codes") else encoded[0]
                codes = codes[0]  # one chunk: the whole clip
                if codes.shape[1:] != (self.n_codebooks, expected):
                    raise RuntimeError(
                        f"EnCodec returned codes of shape {tuple(codes.shape)}, expected "
                        f"[{chunk.shape[0]}, {self.n_codebooks}, {expected}]"
                    )
                outputs.append(codes.to(torch.int16).cpu())
        return torch.cat(outputs).numpy()

    def state(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = _tensor_fingerprint(self.model.state_dict())
        return {
            "name": self.name,
            "model": self.source,
            "bandwidth": self.bandwidth,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "frame_rate": self.frame_rate,
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "weights_sha256": self._fingerprint,
        }


def _load_encodec(model: str | os.PathLike | Any) -> tuple[Any, str]:
    """Return (EncodecModel, description of its source); errors say how to obtain the weights."""
    from transformers import EncodecModel

    if isinstance(model, EncodecModel):
        return model, f"<in-memory EncodecModel {model.config.name_or_path or 'unnamed'}>"
    source = os.fspath(model)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a transformers EnCodec directory (no config.json)")
        try:
            return EncodecModel.from_pretrained(path), str(path.resolve())
        except Exception as exc:  # corrupt weights, wrong model type, ...
            raise CheckpointError(f"cannot load EnCodec from {path}: {exc}") from exc
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep in source.replace("/", "")
    if looks_like_path:
        raise CheckpointError(f"EnCodec model directory not found: {path}")
    try:
        return EncodecModel.from_pretrained(source), source
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"EnCodec weights {source!r} are needed for the encodec teacher but could not be loaded"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {type(exc).__name__}: {reason}. "
            f"On a machine with internet run `python -c \"from transformers import EncodecModel; "
            f"EncodecModel.from_pretrained('{source}').save_pretrained('encodec_24khz')\"`, copy the "
            f"encodec_24khz directory here and pass its path as the teacher model (or copy the Hugging Face cache "
            f"~/.cache/huggingface); the k-means teacher needs no downloaded weights."
        ) from exc


class KMeansTeacher(_BatchedTeacher):
    """Residual k-means codes of standardised log-mel frames on the 75 Hz label grid (needs no weights).

    Features: a Hann-windowed ``n_fft``-point power spectrum every 320 samples, ``n_mels`` HTK-mel bands,
    ``log(mel + log_floor)``. Frame ``i`` is centred at sample ``320 i + center_offset`` (default 200, the centre
    of conv frame ``i``, which spans ``[320 i, 320 i + 400)``); the signal is zero-padded at both ends, so a clip
    of ``L`` samples has ``ceil(L / 320)`` frames. Features are standardised with corpus mean/std, then codebook
    0 quantises them and codebook ``c`` quantises the residual left by codebooks ``0..c-1``.

    Persistence is pickle-free, one file: ``save(path)`` writes centroids, mean, std and a JSON description
    (feature settings, seed) as ``.npz`` or ``.safetensors``; ``load(path)`` rebuilds the teacher from it.
    """

    name = "kmeans"
    DEFAULT_FILE = "kmeans_teacher.npz"
    FORMAT = "culturemert.kmeans_teacher"
    VERSION = 1

    def __init__(
        self,
        n_codebooks: int = 1,
        codebook_size: int = 500,
        n_fft: int = 1024,
        n_mels: int = 64,
        f_min: float = 30.0,
        f_max: float | None = None,
        center_offset: int = 200,
        log_floor: float = 1e-6,
        seed: int = 0,
        device: str | torch.device | None = "cpu",
        batch_size: int = 16,
    ) -> None:
        if n_codebooks < 1:
            raise ConfigError(f"kmeans teacher: n_codebooks must be >= 1, got {n_codebooks}")
        if not 2 <= codebook_size <= np.iinfo(np.int16).max + 1:
            raise ConfigError(f"kmeans teacher: codebook_size must be in [2, 32768], got {codebook_size}")
        f_max = SAMPLE_RATE / 2 if f_max is None else float(f_max)
        if not 0 <= f_min < f_max <= SAMPLE_RATE / 2:
            raise ConfigError(f"kmeans teacher: need 0 <= f_min < f_max <= {SAMPLE_RATE / 2}, got {f_min}, {f_max}")
        self.n_codebooks = int(n_codebooks)
        self.codebook_size = int(codebook_size)
        self.n_fft = int(n_fft)
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = f_max
        self.center_offset = int(center_offset)
        self.log_floor = float(log_floor)
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.path: Path | None = None
        self.n_frames_fitted = 0
        self._mel = mel_filterbank(SAMPLE_RATE, self.n_fft, self.n_mels, self.f_min, self.f_max)
        self._window = torch.hann_window(self.n_fft, periodic=True)
        self.centroids: np.ndarray | None = None  # float32 [n_codebooks, codebook_size, n_mels]
        self.mean: np.ndarray | None = None  # float32 [n_mels]
        self.std: np.ndarray | None = None  # float32 [n_mels]

    # -- features -------------------------------------------------------------------------------------------

    def features(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-mel frames ``[B, ceil(L / 320), n_mels]`` (float32, on ``self.device``) of ``[B, L]`` audio."""
        x = _as_batch(wav).to(self.device)
        batch, length = x.shape
        frames = label_frames(length)
        if frames == 0:
            return x.new_zeros(batch, 0, self.n_mels)
        # frame i covers [320 i + center_offset - n_fft/2, ... + n_fft); negative pads crop
        left = self.n_fft // 2 - self.center_offset
        total = HOP_LENGTH * (frames - 1) + self.n_fft
        x = nn.functional.pad(x, (left, total - left - length))
        windows = x.unfold(-1, self.n_fft, HOP_LENGTH) * self._window.to(x.device)
        power = torch.fft.rfft(windows, dim=-1).abs().square()
        return torch.log(power @ self._mel.to(x.device) + self.log_floor)

    # -- fitting --------------------------------------------------------------------------------------------

    def fit(
        self,
        waveforms: Iterable[np.ndarray | torch.Tensor],
        n_frames_max: int = 100_000,
        seed: int | None = None,
    ) -> KMeansTeacher:
        """Fit standardisation and residual k-means on a uniform sample of at most ``n_frames_max`` frames.

        ``waveforms`` yields 1-D clips (or ``[B, L]`` batches) at 24 kHz; it is read once (reservoir sampling),
        so it may be a generator over a large corpus. The same clips and seed give the same codebooks.
        """
        from sklearn.cluster import MiniBatchKMeans

        if seed is not None:
            self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        reservoir = np.empty((n_frames_max, self.n_mels), dtype=np.float32)
        seen = 0
        for wav in waveforms:
            feats = self.features(wav).reshape(-1, self.n_mels).cpu().numpy()
            # fill the reservoir, then replace a uniformly random slot with probability n_frames_max / (t + 1)
            fill = min(len(feats), max(0, n_frames_max - seen))
            reservoir[seen : seen + fill] = feats[:fill]
            rest = feats[fill:]
            if len(rest):
                positions = np.arange(seen + fill, seen + len(feats))
                slots = rng.integers(0, positions + 1)
                chosen = np.flatnonzero(slots < n_frames_max)
                # when a slot is drawn twice, the later frame wins (sequential reservoir semantics)
                last_of_slot = {int(slots[i]): i for i in chosen}
                if last_of_slot:
                    reservoir[list(last_of_slot)] = rest[list(last_of_slot.values())]
            seen += len(feats)
        sample = reservoir[: min(seen, n_frames_max)]
        if len(sample) < self.codebook_size:
            raise DataError(
                f"kmeans teacher: {len(sample)} frames ({len(sample) / FRAME_RATE:.1f} s of audio) are too few to fit "
                f"{self.codebook_size} centroids; give it more audio or a smaller codebook_size"
            )
        mean = sample.mean(axis=0, dtype=np.float64)
        std = sample.std(axis=0, dtype=np.float64)
        std = np.maximum(std, 1e-5 * max(float(std.max()), 1e-12))
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        residual = (sample - self.mean) / self.std
        centroids = []
        for book in range(self.n_codebooks):
            kmeans = MiniBatchKMeans(
                n_clusters=self.codebook_size,
                random_state=self.seed + book,
                batch_size=min(4096, len(residual)),
                n_init=3,
                max_iter=100,
            )
            kmeans.fit(residual.astype(np.float64))
            book_centroids = kmeans.cluster_centers_.astype(np.float32)
            centroids.append(book_centroids)
            assignment = self._nearest(torch.from_numpy(residual), torch.from_numpy(book_centroids)).numpy()
            residual = residual - book_centroids[assignment]
        self.centroids = np.stack(centroids)
        self.n_frames_fitted = len(sample)
        self.path = None
        logger.info("kmeans teacher fitted on %d of %d frames", len(sample), seen)
        return self

    @staticmethod
    def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid (squared Euclidean) for each row of ``points``."""
        scores = points @ centroids.T * -2.0 + centroids.square().sum(dim=1)
        return scores.argmin(dim=1)

    # -- encoding -------------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        """Whether codebooks exist (after :meth:`fit` or :meth:`load`)."""
        return self.centroids is not None and self.mean is not None and self.std is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise UserError("kmeans teacher is not fitted: call fit(...) or load it with KMeansTeacher.load(path)")

    def encode(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[B, L]`` float32 audio at 24 kHz -> int16 codes ``[B, n_codebooks, ceil(L / 320)]``."""
        self._require_fitted()
        x = _as_batch(wav)
        mean = torch.from_numpy(self.mean).to(self.device)
        std = torch.from_numpy(self.std).to(self.device)
        centroids = torch.from_numpy(self.centroids).to(self.device)
        outputs = []
        for chunk in x.split(self.batch_size):
            feats = self.features(chunk)
            batch, frames, _ = feats.shape
            residual = ((feats - mean) / std).reshape(-1, self.n_mels)
            codes = []
            for book in range(self.n_codebooks):
                assignment = self._nearest(residual, centroids[book])
                residual = residual - centroids[book][assignment]
                codes.append(assignment)
            stacked = torch.stack(codes, dim=0).reshape(self.n_codebooks, batch, frames).permute(1, 0, 2)
            outputs.append(stacked.to(torch.int16).cpu())
        if not outputs:
            return np.zeros((0, self.n_codebooks, label_frames(x.shape[1])), dtype=np.int16)
        return torch.cat(outputs).numpy()

    # -- persistence ----------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "name": self.name,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "frame_rate": self.frame_rate,
            "features": {
                "kind": "log_mel",
                "n_fft": self.n_fft,
                "n_mels": self.n_mels,
                "f_min": self.f_min,
                "f_max": self.f_max,
                "center_offset": self.center_offset,
                "log_floor": self.log_floor,
            },
            "seed": self.seed,
            "n_frames_fitted": self.n_frames_fitted,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted teacher to one pickle-free file and return its path.

        ``*.safetensors`` gives a safetensors file (metadata JSON in its header); any other file name an
        ``.npz`` whose ``meta_json`` entry is a plain string array; a directory (existing, or a name without
        suffix) gets ``kmeans_teacher.npz`` inside. Arrays: ``centroids`` [n_codebooks, codebook_size, n_mels],
        ``mean`` and ``std`` [n_mels], float32. The write is atomic.
        """
        self._require_fitted()
        target = Path(path)
        if target.is_dir() or not target.suffix:
            target = target / self.DEFAULT_FILE
        arrays = {"centroids": self.centroids, "mean": self.mean, "std": self.std}
        meta_json = json.dumps(self._meta(), sort_keys=True)
        if target.suffix == ".safetensors":
            from safetensors.numpy import save as save_safetensors

            payload = save_safetensors(
                {k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={self.FORMAT: meta_json}
            )
        else:
            buffer = io.BytesIO()
            np.savez(buffer, meta_json=np.array(meta_json), **arrays)
            payload = buffer.getvalue()
        atomic_write_bytes(target, payload)
        self.path = target.resolve()
        return self.path

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device | None = "cpu", batch_size: int = 16
    ) -> KMeansTeacher:
        """Load a teacher written by :meth:`save` (its file, or the directory holding ``kmeans_teacher.npz``)."""
        source = Path(path)
        if source.is_dir():
            source = source / cls.DEFAULT_FILE
        try:
            raw = source.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"kmeans teacher not found or unreadable: {source}: {exc}") from exc
        try:
            if raw[:4] == b"PK\x03\x04":  # zip magic: npz
                with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                    meta = json.loads(str(archive["meta_json"][()]))
                    arrays = {key: archive[key] for key in ("centroids", "mean", "std")}
            else:
                from safetensors.numpy import load as load_safetensors

                header_size = int.from_bytes(raw[:8], "little")
                header = json.loads(raw[8 : 8 + header_size])
                meta = json.loads(header.get("__metadata__", {})[cls.FORMAT])
                arrays = load_safetensors(raw)
        except Exception as exc:  # truncated zip, bad CRC, foreign file, missing keys
            raise CheckpointError(
                f"{source}: not a readable culturemert kmeans teacher ({type(exc).__name__}: {exc})"
            ) from exc
        if meta.get("format") != cls.FORMAT or meta.get("version") != cls.VERSION:
            raise CheckpointError(
                f"{source}: not a culturemert kmeans teacher (format {meta.get('format')!r}, version "
                f"{meta.get('version')!r}; expected {cls.FORMAT!r} version {cls.VERSION})"
            )
        features = meta["features"]
        teacher = cls(
            n_codebooks=meta["n_codebooks"],
            codebook_size=meta["codebook_size"],
            n_fft=features["n_fft"],
            n_mels=features["n_mels"],
            f_min=features["f_min"],
            f_max=features["f_max"],
            center_offset=features["center_offset"],
            log_floor=features["log_floor"],
            seed=meta["seed"],
            device=device,
            batch_size=batch_size,
        )
        centroids, mean, std = arrays["centroids"], arrays["mean"], arrays["std"]
        expected = (teacher.n_codebooks, teacher.codebook_size, teacher.n_mels)
        if centroids.shape != expected or mean.shape != (teacher.n_mels,) or std.shape != (teacher.n_mels,):
            raise CheckpointError(
                f"{source}: array shapes {centroids.shape}, {mean.shape}, {std.shape} do not match its metadata "
                f"(centroids {expected})"
            )
        teacher.centroids = centroids.astype(np.float32)
        teacher.mean, teacher.std = mean.astype(np.float32), std.astype(np.float32)
        teacher.n_frames_fitted = int(meta.get("n_frames_fitted", 0))
        teacher.path = source.resolve()
        return teacher

    def state(self) -> dict[str, Any]:
        return self._meta() | {"path": str(self.path) if self.path is not None else None}


# ---------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------

TEACHERS = ("encodec", "kmeans")


def build_teacher(name: str, **options: Any) -> Teacher:
    """Create a teacher by name.

    ``"encodec"``: options of :class:`EncodecTeacher` (``model``, ``bandwidth``, ``device``, ``batch_size``).
    ``"kmeans"``: with ``path=...`` loads a saved teacher (other options: ``device``, ``batch_size``); without it
    returns an unfitted :class:`KMeansTeacher` built from the remaining options (call ``fit`` before encoding;
    ``n_clusters`` is accepted as another name for ``codebook_size``).
    """
    if name == "encodec":
        factory: Any = EncodecTeacher
    elif name == "kmeans":
        if "n_clusters" in options:  # sklearn's name for the same thing
            if "codebook_size" in options:
                raise ConfigError("kmeans teacher: give codebook_size or n_clusters, not both")
            options["codebook_size"] = options.pop("n_clusters")
        path = options.pop("path", None)
        factory = KMeansTeacher
        if path is not None:
            unexpected = set(options) - {"device", "batch_size"}
            if unexpected:
                raise ConfigError(
                    f"kmeans teacher loaded from {path}: options {sorted(unexpected)} come from the saved model "
                    f"and cannot be overridden"
                )
            return KMeansTeacher.load(path, **options)
    else:
        raise ConfigError(f"unknown teacher {name!r}; choose one of {list(TEACHERS)}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ConfigError(f"{name} teacher: invalid options {sorted(options)}: {exc}") from exc
    return factory(**options)
