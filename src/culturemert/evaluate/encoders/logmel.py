"""The log-mel statistics baseline (``baseline:logmel``) as an encoder with one hidden state."""

from __future__ import annotations

import hashlib

import torch

from culturemert.audio import mel_filterbank
from culturemert.label_grid import SAMPLE_RATE
from culturemert.evaluate.encoders.base import Encoder

__all__ = ["LogMelEncoder", "LOGMEL_NAME"]

LOGMEL_NAME = "baseline:logmel"


class LogMelEncoder(Encoder):
    """128-bin HTK mel power spectrogram, ``log(x + 1e-6)``, n_fft 1024, hop 240 (10 ms at 24 kHz), centred frames.

    Its one hidden state is the log-mel frame sequence ``[B, T, 128]`` (100 frames/s); pooling gives the mean
    and the (population) std over time of every bin, 256 numbers per window.
    """

    family = "logmel"
    N_FFT, HOP, N_MELS, FMIN, LOG_FLOOR = 1024, 240, 128, 0.0, 1e-6

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        params = f"logmel-v1:sr={sample_rate}:nfft={self.N_FFT}:hop={self.HOP}:mels={self.N_MELS}:floor={self.LOG_FLOOR}"
        self._declare(
            name=LOGMEL_NAME,
            source=LOGMEL_NAME,
            sample_rate=sample_rate,
            frame_rate=sample_rate / self.HOP,
            num_hidden_states=1,
            dim=2 * self.N_MELS,
            fingerprint=hashlib.sha256(params.encode()).hexdigest(),
            device="cpu",
        )
        self.mel = mel_filterbank(sample_rate, self.N_FFT, self.N_MELS, self.FMIN, sample_rate / 2)
        self.window = torch.hann_window(self.N_FFT)

    def num_frames(self, num_samples: int) -> int:
        return max(int(num_samples), self.N_FFT) // self.HOP + 1

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        wav = wav.float().cpu()
        if wav.shape[1] < self.N_FFT:  # reflect padding needs at least n_fft/2 samples; zero-pad short clips
            wav = torch.nn.functional.pad(wav, (0, self.N_FFT - wav.shape[1]))
        spec = torch.stft(wav, self.N_FFT, self.HOP, window=self.window, center=True, return_complex=True)
        power = spec.abs().pow(2).transpose(1, 2)  # [B, T, F]
        return [torch.log(power @ self.mel + self.LOG_FLOOR)]  # [B, T, M]

    def pool(self, states: list[torch.Tensor]) -> torch.Tensor:
        logmel = states[0]
        return torch.cat([logmel.mean(1), logmel.std(1, unbiased=False)], dim=-1).unsqueeze(1)
