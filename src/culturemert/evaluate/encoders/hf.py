"""Audio encoders from transformers: every model that returns hidden states, loaded with ``AutoModel``.

Families and what their hidden states are here (L = ``num_hidden_layers``):

* **wav2vec 2.0, HuBERT, WavLM, data2vec-audio, wav2vec2-conformer, UniSpeech(-SAT)** — raw waveform at the rate of
  ``preprocessor_config.json`` (16 kHz when absent), unpadded conv front end (``floor((L - k) / s) + 1`` frames
  per layer: 50 Hz at 16 kHz), ``L + 1`` hidden states as ``output_hidden_states`` returns them.
* **Whisper encoder** — log-mel features from ``WhisperFeatureExtractor`` padded to the encoder's fixed context
  (30 s for the released models); ``L + 1`` states of which the frames covering the real audio are kept:
  ``ceil(S / (2 hop))`` (50 Hz). A window may not exceed the context.
* **AST** — Kaldi fbank from ``ASTFeatureExtractor`` padded to ``max_length`` frames (10.24 s); the patch tokens
  (the two special tokens dropped) are averaged over frequency patches into a time sequence of
  ``sample_rate / (hop * time_stride)`` = 10 frames/s, of which the ``ceil(n_fbank / time_stride)`` covering real
  audio are kept; ``L + 1`` states.
* **CLAP audio (HTSAT)** — 48 kHz log-mel from ``ClapFeatureExtractor`` (repeat-padded to 10 s; a window may not
  exceed 10 s, so its random crop never applies); the patch embedding and the output of each Swin stage
  (``len(depths) + 1`` states), each averaged over its whole time-frequency grid; the stages differ in width and
  narrower ones are zero-padded to the widest (a probe of a zero-padded vector equals a probe of the vector).
  One vector per window: no frame rate.
* **remote code** (``remote:SOURCE`` or a checkpoint whose ``config.json`` names classes in ``auto_map``), e.g.
  MERT-v2 — only with ``trust_remote_code``; called as ``model(wav, output_hidden_states=True)`` on the
  raw waveform at the declared rate; ``L + 1`` states; frame rate from the conv strides when the config has
  them, else measured on the first batch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from culturemert.label_grid import SAMPLE_RATE
from culturemert.errors import CheckpointError, UserError
from culturemert.evaluate.encoders.base import Encoder, conv_num_frames, conv_receptive_field, fingerprint_of, weights_fingerprint

log = logging.getLogger(__name__)

__all__ = [
    "WAVEFORM_MODEL_TYPES",
    "TransformersWaveformEncoder",
    "WhisperEncoderAdapter",
    "ASTEncoder",
    "ClapAudioEncoder",
    "RemoteCodeEncoder",
    "load_transformers_encoder",
    "read_model_type",
]

#: model types with the wav2vec 2.0 conv front end on the raw waveform
WAVEFORM_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer", "unispeech", "unispeech-sat")
_ADAPTER_VERSION = 1


def _feature_extractor(cls: Any, source: str, **defaults: Any) -> Any:
    """The checkpoint's own preprocessor config when it has one, else the family's defaults (``defaults``)."""
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError):
        return cls(**defaults)


def _fe_settings(fe: Any) -> dict[str, Any]:
    # scalar settings only: the mel filter matrices are derived from them
    return {k: v for k, v in fe.to_dict().items() if isinstance(v, (int, float, str, bool)) or v is None}


def read_model_type(source: str, trust_remote_code: bool) -> tuple[str, bool]:
    """(``model_type``, whether the config maps to remote code) of a transformers checkpoint (dir or Hub id)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        import json

        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path / 'config.json'}: cannot read ({exc})") from None
        model_type = str(raw.get("model_type", ""))
        remote = bool(raw.get("auto_map")) and model_type not in CONFIG_MAPPING
        return model_type, remote
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # transformers asks for trust_remote_code on configs it does not know
        if "trust_remote_code" in str(exc):
            return "", True
        raise CheckpointError(f"{source}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read a transformers config ({str(exc).splitlines()[0]})") from None
    model_type = str(getattr(config, "model_type", ""))
    return model_type, model_type not in CONFIG_MAPPING


def _auto_model(source: str, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: cannot load with transformers AutoModel ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.eval().float()


class _TransformersBase(Encoder):
    def _finish(self, model: torch.nn.Module, *, source: str, name: str, device: Any, precision: str, family: str,
                sample_rate: int, frame_rate: float | None, num_hidden_states: int, dim: int, preprocessing: dict,
                min_samples: int = 1, max_window_s: float | None = None, trust_remote_code: bool = False) -> None:
        self.family = family
        fingerprint = fingerprint_of(family, weights_fingerprint(model), adapter=_ADAPTER_VERSION,
                                     sample_rate=sample_rate, preprocessing=preprocessing)
        self._declare(name=name, source=source, sample_rate=sample_rate, frame_rate=frame_rate,
                      num_hidden_states=num_hidden_states, dim=dim, fingerprint=fingerprint, device=device,
                      precision=precision, min_samples=min_samples, max_window_s=max_window_s,
                      trust_remote_code=trust_remote_code)
        self.model = model.to(self.device)


class TransformersWaveformEncoder(_TransformersBase):
    """wav2vec 2.0-style models on the raw waveform (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, source: str, *, name: str, device: Any = "auto", precision: str = "fp32",
                 sample_rate: int = 16_000):
        config = model.config
        self._kernels, self._strides = list(config.conv_kernel), list(config.conv_stride)
        self._finish(model, source=source, name=name, device=device, precision=precision, family=config.model_type,
                     sample_rate=sample_rate, frame_rate=sample_rate / math.prod(self._strides),
                     num_hidden_states=config.num_hidden_layers + 1, dim=config.hidden_size,
                     preprocessing={}, min_samples=conv_receptive_field(self._kernels, self._strides))

    def num_frames(self, num_samples: int) -> int:
        return conv_num_frames(num_samples, self._kernels, self._strides)

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(wav, output_hidden_states=True).hidden_states)


class WhisperEncoderAdapter(_TransformersBase):
    """The encoder half of Whisper (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, source: str, *, name: str, device: Any = "auto", precision: str = "fp32"):
        from transformers import WhisperFeatureExtractor

        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        config = encoder.config
        self.fe = _feature_extractor(WhisperFeatureExtractor, source, feature_size=config.num_mel_bins)
        self.hop = int(self.fe.hop_length)
        # the encoder's positional table fixes its input length: 2 mel frames per output position
        self.context_samples = 2 * int(config.max_source_positions) * self.hop
        rate = int(self.fe.sampling_rate)
        self._finish(encoder, source=source, name=name, device=device, precision=precision, family="whisper",
                     sample_rate=rate, frame_rate=rate / (2 * self.hop), num_hidden_states=config.encoder_layers + 1,
                     dim=config.d_model, preprocessing=_fe_settings(self.fe), min_samples=self.fe.n_fft,
                     max_window_s=self.context_samples / rate)

    def num_frames(self, num_samples: int) -> int:
        return min(-(-int(num_samples) // (2 * self.hop)), self.context_samples // (2 * self.hop))

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        batch = [w for w in wav.float().cpu().numpy()]
        feats = self.fe(batch, sampling_rate=self.sample_rate, return_tensors="pt", padding="max_length",
                        max_length=self.context_samples)["input_features"]
        out = self.model(feats.to(self.device), output_hidden_states=True)
        keep = self.num_frames(wav.shape[1])
        return [h[:, :keep] for h in out.hidden_states]


class ASTEncoder(_TransformersBase):
    """Audio Spectrogram Transformer (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, source: str, *, name: str, device: Any = "auto", precision: str = "fp32"):
        from transformers import ASTFeatureExtractor

        config = model.config
        self.fe = _feature_extractor(ASTFeatureExtractor, source, num_mel_bins=config.num_mel_bins,
                                     max_length=config.max_length)
        rate = int(self.fe.sampling_rate)
        # Kaldi fbank as ASTFeatureExtractor computes it: 25 ms windows, 10 ms shift, edges snipped
        self.win, self.shift = round(0.025 * rate), round(0.010 * rate)
        self.grid = model.embeddings.get_shape(config)  # (frequency patches, time patches)
        self.time_stride = int(config.time_stride)
        self._finish(model, source=source, name=name, device=device, precision=precision, family="ast",
                     sample_rate=rate, frame_rate=rate / (self.shift * self.time_stride),
                     num_hidden_states=config.num_hidden_layers + 1, dim=config.hidden_size,
                     preprocessing=_fe_settings(self.fe), min_samples=self.win,
                     max_window_s=(self.win + (config.max_length - 1) * self.shift) / rate)

    def num_frames(self, num_samples: int) -> int:
        n_fbank = 1 + (int(num_samples) - self.win) // self.shift if num_samples >= self.win else 0
        return max(1, min(self.grid[1], -(-n_fbank // self.time_stride)))

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        batch = [w for w in wav.float().cpu().numpy()]
        feats = self.fe(batch, sampling_rate=self.sample_rate, return_tensors="pt")["input_values"]
        out = self.model(feats.to(self.device), output_hidden_states=True)
        f, t = self.grid
        keep = self.num_frames(wav.shape[1])
        states = []
        for h in out.hidden_states:
            patches = h[:, 2:].reshape(h.shape[0], f, t, h.shape[-1])  # frequency-major patch order
            states.append(patches.mean(dim=1)[:, :keep])
        return states


class ClapAudioEncoder(_TransformersBase):
    """CLAP's HTSAT audio tower (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, source: str, *, name: str, device: Any = "auto", precision: str = "fp32"):
        from transformers import ClapFeatureExtractor

        audio = model.audio_model if hasattr(model, "audio_model") else model
        config = audio.config
        self.fe = _feature_extractor(ClapFeatureExtractor, source, feature_size=config.num_mel_bins,
                                     truncation="fusion" if config.enable_fusion else "rand_trunc")
        rate = int(self.fe.sampling_rate)
        widths = [int(config.patch_embeds_hidden_size * 2 ** i) for i in range(len(config.depths))]
        self._finish(audio, source=source, name=name, device=device, precision=precision, family="clap",
                     sample_rate=rate, frame_rate=None, num_hidden_states=len(config.depths) + 1, dim=max(widths),
                     preprocessing=_fe_settings(self.fe), min_samples=int(self.fe.fft_window_size),
                     max_window_s=float(self.fe.nb_max_samples) / rate)

    def num_frames(self, num_samples: int) -> None:
        return None

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        batch = [w for w in wav.float().cpu().numpy()]
        inputs = self.fe(batch, sampling_rate=self.sample_rate, return_tensors="pt")
        out = self.model(input_features=inputs["input_features"].to(self.device),
                         is_longer=inputs["is_longer"].to(self.device), output_hidden_states=True)
        # [B, C, H, W] image-like maps whose axes mix time and frequency: flatten to tokens
        return [h.flatten(2).transpose(1, 2) for h in out.hidden_states]


class RemoteCodeEncoder(_TransformersBase):
    """A model whose code comes with its checkpoint (only behind ``trust_remote_code``; see the module docstring)."""

    def __init__(self, model: torch.nn.Module, source: str, *, name: str, device: Any = "auto", precision: str = "fp32",
                 sample_rate: int):
        config = model.config
        strides = getattr(config, "conv_stride", None)
        self._kernels = list(getattr(config, "conv_kernel", []) or [])
        self._strides = list(strides or [])
        frame_rate = sample_rate / math.prod(self._strides) if self._strides else None
        self._measure = frame_rate is None
        self._finish(model, source=source, name=name, device=device, precision=precision,
                     family=f"remote:{getattr(config, 'model_type', 'unknown')}", sample_rate=sample_rate,
                     frame_rate=frame_rate, num_hidden_states=int(config.num_hidden_layers) + 1,
                     dim=int(config.hidden_size), preprocessing={},
                     min_samples=conv_receptive_field(self._kernels, self._strides) if self._strides else 1,
                     trust_remote_code=True)

    def num_frames(self, num_samples: int) -> int | None:
        if self._strides:
            return conv_num_frames(num_samples, self._kernels, self._strides)
        return None

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        states = list(self.model(wav, output_hidden_states=True).hidden_states)
        if self._measure and states:
            self.frame_rate = states[-1].shape[1] * self.sample_rate / wav.shape[1]
            self._measure = False
        return states


def _declared_rate(source: str, default: int) -> int:
    from transformers import AutoFeatureExtractor

    try:
        fe = AutoFeatureExtractor.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no preprocessor config: the family's standard rate
        return default
    return int(getattr(fe, "sampling_rate", default) or default)


def load_transformers_encoder(source: str, *, name: str, device: Any = "auto", precision: str = "fp32",
                              trust_remote_code: bool = False, force_remote: bool = False) -> Encoder:
    """Load ``source`` (a directory or Hub id) with transformers and wrap it in the adapter of its family.

    Raises:
        UserError: the checkpoint needs remote code and ``trust_remote_code`` is off, or its family returns no
            hidden states this adapter knows how to read.
        CheckpointError: transformers cannot read it.
    """
    model_type, remote = read_model_type(source, trust_remote_code)
    if (remote or force_remote) and not trust_remote_code:
        raise UserError(f"{source}: this model runs code shipped with its checkpoint; pass --trust-remote-code "
                        "to allow it (the report records that you did)")
    model = _auto_model(source, trust_remote_code=trust_remote_code and (remote or force_remote))
    kwargs = dict(name=name, device=device, precision=precision)
    if remote or force_remote:
        rate = _declared_rate(source, int(getattr(model.config, "sample_rate", 0) or SAMPLE_RATE))
        return RemoteCodeEncoder(model, source, sample_rate=rate, **kwargs)
    if model_type in WAVEFORM_MODEL_TYPES:
        return TransformersWaveformEncoder(model, source, sample_rate=_declared_rate(source, 16_000), **kwargs)
    if model_type == "whisper":
        return WhisperEncoderAdapter(model, source, **kwargs)
    if model_type == "audio-spectrogram-transformer":
        return ASTEncoder(model, source, **kwargs)
    if model_type in ("clap", "clap_audio_model"):
        return ClapAudioEncoder(model, source, **kwargs)
    raise UserError(f"{source}: transformers model type {model_type!r} is not a supported audio encoder "
                    f"(supported: {', '.join(WAVEFORM_MODEL_TYPES)}, whisper, audio-spectrogram-transformer, clap)")
