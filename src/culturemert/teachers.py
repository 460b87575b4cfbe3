"""Pre-training targets: discrete 75 Hz teacher codes (EnCodec RVQ or k-means) and MERT's CQT target.

Label grid
    Every teacher emits one code per codebook per 320-sample hop of 24 kHz audio (75 Hz), and a clip of ``L``
    samples gets ``label_length(L) = ceil(L / 320)`` codes, exactly what EnCodec 24 kHz produces (it pads the
    last partial hop). The model's conv stack yields ``floor((L - 400) / 320) + 1`` frames; frame ``k`` spans
    samples ``[320k, 320k + 400)`` and is paired with code ``k``.

CQT target (:class:`MertCQT`)
    Reproduces ``nnAudio.features.cqt.CQT`` (= ``CQT1992v2``) with MERT's parameters (24 kHz, hop 320, 32.7 Hz,
    336 bins, 48 bins/octave, L1-normalised Hann kernels, centred with zero padding, librosa scaling, linear
    magnitude), but through the FFT instead of 65 536-tap time-domain convolutions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from culturemert.errors import CheckpointError, ConfigError, DataError, UserError

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_RATE",
    "HOP_LENGTH",
    "FRAME_RATE",
    "MertCQT",
    "Teacher",
    "EncodecTeacher",
    "KMeansTeacher",
    "build_teacher",
    "label_length",
    "check_label_alignment",
    "check_codebook_usage",
]

SAMPLE_RATE = 24_000
HOP_LENGTH = 320
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 75.0
DEFAULT_ENCODEC = "facebook/encodec_24khz"


# ---------------------------------------------------------------------------------------------------------------
# Label grid helpers and guards
# ---------------------------------------------------------------------------------------------------------------


def label_length(num_samples: int, hop: int = HOP_LENGTH) -> int:
    """Number of teacher codes for a clip of ``num_samples`` samples: ``ceil(num_samples / hop)``."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return -(-int(num_samples) // int(hop))


def check_label_alignment(num_samples: int, num_labels: int, hop: int = HOP_LENGTH, tolerance: int = 1) -> None:
    """Raise :class:`DataError` when a label sequence does not fit its audio on the 75 Hz grid.

    ``num_labels`` may differ from ``ceil(num_samples / hop)`` by at most ``tolerance`` frames (rounding of
    externally produced labels); anything more means the labels belong to another file or sample rate.
    """
    expected = label_length(num_samples, hop)
    if abs(int(num_labels) - expected) > tolerance:
        raise DataError(
            f"label length {num_labels} does not match audio of {num_samples} samples: expected "
            f"ceil({num_samples}/{hop}) = {expected} (+-{tolerance}); were the labels made from another file "
            f"or at another sample rate?"
        )


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
    output ``[B, n_bins, floor(L / hop) + 1]`` linear magnitudes.
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

        freqs, lengths, width, starts, kernels = _cqt_time_kernels(
            self.sample_rate, fmin, self.n_bins, bins_per_octave, filter_scale, norm, window
        )
        self.frequencies = freqs
        self.kernel_width = width
        # only the span covered by some kernel matters; it is shorter than the power-of-two kernel width
        self._support_start = min(starts)
        self._support = max(s + len(k) for s, k in zip(starts, kernels)) - self._support_start
        self.fft_size = self.fft_frames * self.hop_length
        self.frames_per_block = (self.fft_size - self._support) // self.hop_length + 1
        if self.frames_per_block < 1:
            raise ConfigError(
                f"fft_frames={fft_frames} is too small: the FFT block ({self.fft_size} samples) must exceed the "
                f"longest CQT kernel ({self._support} samples)"
            )
        self.register_buffer("lengths", torch.tensor(lengths, dtype=torch.float32), persistent=False)
        indices, values = self._sparse_spectral_kernels(lengths, starts, kernels, kernel_threshold)
        self.register_buffer("_kernel_indices", indices, persistent=False)
        self.register_buffer("_kernel_values", values, persistent=False)

    def _sparse_spectral_kernels(
        self, lengths: np.ndarray, starts: list[int], kernels: list[np.ndarray], threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """COO (row, col) indices and complex64 values of the [n_bins * fft_frames, 2 * (N/2 + 1)] matrix.

        Columns ``[0, N/2]`` act on the block's rfft ``X[j]``, columns ``N/2+1 + j`` on ``conj(X[j])``, which
        stands in for the negative frequency ``X[N - j]`` of a real signal.
        """
        n_fft, frames, hop = self.fft_size, self.fft_frames, self.hop_length
        half = n_fft // 2
        n_rfft = half + 1
        rows, cols, vals = [], [], []
        for bin_index, (start, kernel, length) in enumerate(zip(starts, kernels, lengths)):
            padded = np.zeros(n_fft, dtype=np.complex128)
            offset = start - self._support_start
            padded[offset : offset + len(kernel)] = kernel
            spectrum = np.fft.fft(padded)
            magnitude = np.abs(spectrum)
            keep = np.flatnonzero(magnitude >= threshold * magnitude.max())
            # librosa scaling sqrt(length) (rounded to fp32 like nnAudio's buffer) and the 1/hop of the
            # folded inverse DFT (ifft already divides by fft_frames; 1/N * fft_frames = 1/hop)
            scale = math.sqrt(float(np.float32(length))) / hop
            weights = np.conj(spectrum[keep]) * scale
            negative = keep > half
            rows.append(bin_index * frames + keep % frames)
            cols.append(np.where(negative, n_rfft + (n_fft - keep), keep))
            vals.append(weights)
        row = np.concatenate(rows)
        col = np.concatenate(cols)
        order = np.lexsort((col, row))  # row-major, as a coalesced COO tensor must be
        indices = torch.from_numpy(np.stack([row[order], col[order]]).astype(np.int64))
        values = torch.from_numpy(np.concatenate(vals)[order].astype(np.complex64))
        # fold collisions (same row and column) cannot occur: a column maps to one frequency, one fold slot
        return indices, values

    @property
    def num_kernel_coefficients(self) -> int:
        """Number of complex spectral-kernel coefficients kept (sparsity of the transform)."""
        return int(self._kernel_values.numel())

    def num_frames(self, num_samples: int) -> int:
        """Number of CQT frames for ``num_samples`` input samples."""
        if self.center:
            return num_samples // self.hop_length + 1
        return max(0, (num_samples - self.kernel_width) // self.hop_length + 1)

    def _kernel_matrix(self, device: torch.device) -> torch.Tensor:
        indices, values = self._kernel_indices, self._kernel_values
        if indices.device != device:
            indices, values = indices.to(device), values.to(device)
        shape = (self.n_bins * self.fft_frames, 2 * (self.fft_size // 2 + 1))
        return torch.sparse_coo_tensor(indices, values, shape, is_coalesced=True, check_invariants=False)

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

        kernel_matrix = self._kernel_matrix(x.device)
        outputs = []
        for chunk in blocks.split(self.max_blocks_per_call):
            spectrum = torch.fft.rfft(chunk, dim=-1)
            both = torch.cat([spectrum, spectrum.conj()], dim=-1)  # [n, 2 * n_rfft]
            folded = torch.sparse.mm(kernel_matrix, both.transpose(0, 1).contiguous())  # [bins * frames, n]
            folded = folded.transpose(0, 1).reshape(-1, self.n_bins, self.fft_frames)
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
