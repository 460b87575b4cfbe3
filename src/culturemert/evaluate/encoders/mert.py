"""MERT-family checkpoints (culturemert exports, HF MERT/HuBERT directories, Hub ids, fairseq ``.pt``, presets).

The model is loaded by :func:`culturemert.model.load_model` (no remote code) and runs at the rate the checkpoint
declares, ``model.sample_rate`` (see docs/checkpoints.md: MERT-v0 declares 16 kHz and 50 Hz frames, MERT-v1 24 kHz
and 75 Hz; declarations that disagree are an error; a checkpoint that declares nothing runs at its family's
standard rate, 24 kHz for ``mert_model``, 16 kHz for a plain ``hubert`` directory, which is logged).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from culturemert.label_grid import SAMPLE_RATE
from culturemert.evaluate.encoders.base import Encoder, conv_num_frames, conv_receptive_field

log = logging.getLogger(__name__)

__all__ = ["MertEncoder", "MERT_MODEL_TYPES"]

#: config.json model types that the native MERT loader reads
MERT_MODEL_TYPES = ("mert_model", "music_hubert", "hubert")


class MertEncoder(Encoder):
    """Every hidden state of a MERT model (``num_layers + 1``; index 0 = the projected conv features).

    ``model`` is a :class:`culturemert.model.MertPretrainModel` or a wrapper exposing ``backbone``,
    ``num_layers``, ``hidden_size`` and ``forward(wav, output_hidden_states=True)``. Frames: the conv stack's
    ``floor((L - k) / s) + 1`` per layer, i.e. ``sample_rate / 320`` per second (75 Hz at 24 kHz, 50 Hz at 16 kHz).
    The fingerprint is the backbone's weight fingerprint, as before the encoder interface existed, so caches
    written then stay valid (the rate is part of the cache key through the embed settings).
    """

    family = "mert"

    def __init__(
        self,
        model: Any,
        name: str,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        fingerprint: str | None = None,
        *,
        sample_rate: int = SAMPLE_RATE,
        source: str | None = None,
    ):
        if fingerprint is None:
            from culturemert.model import model_fingerprint
            from culturemert.model import MertPretrainModel

            # wrappers exposing ``.backbone`` are fingerprinted by their backbone weights, as models are
            fingerprint = model_fingerprint(model if isinstance(model, MertPretrainModel) else model.backbone.state_dict())
        config = model.backbone.config
        self._kernels, self._strides = list(config.conv_kernel), list(config.conv_stride)
        self._declare(
            name=name,
            source=source or name,
            sample_rate=sample_rate,
            frame_rate=sample_rate / math.prod(self._strides),
            num_hidden_states=int(model.num_layers) + 1,
            dim=int(model.hidden_size),
            fingerprint=fingerprint,
            device=device,
            precision=precision,
            min_samples=conv_receptive_field(self._kernels, self._strides),
        )
        self.model = model.eval().float().to(self.device)

    def num_frames(self, num_samples: int) -> int:
        return conv_num_frames(num_samples, self._kernels, self._strides)

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(wav, output_hidden_states=True).hidden_states)


def load_mert(source: str, *, name: str, device: str | torch.device, precision: str) -> MertEncoder:
    """A MERT-family checkpoint as an encoder, run at the sample rate it declares."""
    from culturemert.model import load_model

    model = load_model(source, with_heads=False)
    return MertEncoder(model, name, device, precision, sample_rate=model.sample_rate, source=source)
