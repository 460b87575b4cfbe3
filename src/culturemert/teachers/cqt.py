"""MERT's CQT reconstruction target (:class:`MertCQT`).

Reproduces ``nnAudio.features.cqt.CQT`` (= ``CQT1992v2``) with MERT's parameters (24 kHz, hop 320, 32.7 Hz, 336 bins,
48 bins/octave, L1-normalised Hann kernels, centred with zero padding, librosa scaling, linear magnitude), but
through the FFT instead of 65 536-tap time-domain convolutions.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from culturemert.label_grid import HOP_LENGTH, SAMPLE_RATE
from culturemert.errors import ConfigError

logger = logging.getLogger(__name__)


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
