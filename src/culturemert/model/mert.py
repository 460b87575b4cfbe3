"""The MERT model: a transformers ``HubertModel`` backbone plus MERT's pre-training heads.

The backbone is *not* re-implemented: HF MERT checkpoints are HubertModel checkpoints in all but name (MERT's
``modeling_MERT.py`` subclasses ``HubertModel`` and, for the v1 models, changes nothing that runs), so we build
``transformers.HubertModel`` from a plain ``HubertConfig``. That also
sidesteps the remote-code breakage of transformers >= 4.48 (``MERTConfig`` lacks ``conv_pos_batch_norm``).

The heads follow fairseq's MERT layout so that the fairseq checkpoint's heads load 1:1:

* ``final_proj``: Linear(hidden -> n_codebooks * final_dim), untied: chunk i is codebook i's projection;
* ``label_embs_concat``: [n_codebooks * (n_special + codebook_size), final_dim], codebook-major; within a
  codebook, rows ``0..n_special-1`` are fairseq's special symbols (<s>, <pad>, </s>, <unk>) and row
  ``n_special + c`` embeds code ``c``;
* ``cqt_proj``: Linear(hidden -> cqt_bins), the CQT reconstruction head (fairseq ``encoder_cqt_model.fc``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from culturemert.label_grid import SAMPLE_RATE
from culturemert.config import StrictModel
from culturemert.errors import CheckpointError, ConfigError

__all__ = [
    "HeadsConfig",
    "PretrainingHeads",
    "MertPretrainModel",
    "MertOutput",
    "PRESETS",
    "preset_config",
    "build_model",
    "num_frames_for",
    "HUBERT_SAMPLE_RATE",
    "default_preprocessor_config",
    "check_sample_rate",
]

# MERT-v1 is trained on 24 kHz audio (75 Hz frames after the 320x conv stack); MERT-v0 ran at 16 kHz.
#: A plain HuBERT's rate (facebook/hubert-*, 16 kHz speech), the standard of a ``hubert`` config that declares none.
HUBERT_SAMPLE_RATE = 16_000


def default_preprocessor_config(sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """The ``preprocessor_config.json`` culturemert writes for a model whose source declared none (a preset, a
    fairseq checkpoint): transformers' ``Wav2Vec2FeatureExtractor`` fields with ``do_normalize`` false, the
    input MERT's pre-training saw (fairseq's ``task.normalize`` defaults to false)."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": True,
        "do_normalize": False,
        "sampling_rate": int(sample_rate),
    }


class HeadsConfig(StrictModel):
    """Shapes of the pre-training heads (fairseq MERT names in brackets)."""

    n_codebooks: int = 8  # len(task.labels)
    codebook_size: int = 1024  # entries per teacher codebook (EnCodec: 1024)
    n_special: int = 4  # fairseq Dictionary's <s>, <pad>, </s>, <unk> prepended to every codebook
    final_dim: int = 64  # [model.final_dim]
    cqt_bins: int = 336  # [model.audio_cqt_bins]

    @property
    def classes_per_codebook(self) -> int:
        return self.n_special + self.codebook_size


# Values exactly as published for MERT-v1 (HF config.json of m-a-p/MERT-v1-95M, fairseq 95M/330M yamls).
_MERT_CONV = dict(
    conv_dim=[512] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False,
    feat_extract_norm="group",
    feat_extract_activation="gelu",
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
)

def _compact_backbone(conv: int, hidden: int, layers: int, heads: int, ffn: int, pos: int, pos_groups: int) -> dict:
    """MERT-95M's layout scaled down (no dropout, no layerdrop) for CPU-sized models."""
    return dict(
        **{**_MERT_CONV, "conv_dim": [conv] * 7, "num_conv_pos_embeddings": pos, "num_conv_pos_embedding_groups": pos_groups},
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_act="gelu",
        do_stable_layer_norm=False,
        feat_proj_layer_norm=True,
        feat_proj_dropout=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        layer_norm_eps=1e-5,
        mask_time_prob=0.05,
        mask_time_length=10,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "mert-v1-95m": dict(
        backbone=dict(
            **_MERT_CONV,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_act="gelu",
            do_stable_layer_norm=False,
            feat_proj_layer_norm=True,
            feat_proj_dropout=0.1,
            hidden_dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.0,
            layerdrop=0.05,
            layer_norm_eps=1e-5,
            mask_time_prob=0.05,
            mask_time_length=10,
        ),
        heads=dict(n_codebooks=8, codebook_size=1024, final_dim=64, cqt_bins=336),
    ),
    "mert-v1-330m": dict(
        backbone=dict(
            **_MERT_CONV,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            hidden_act="gelu",
            do_stable_layer_norm=True,
            feat_proj_layer_norm=True,
            feat_proj_dropout=0.0,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            layer_norm_eps=1e-5,
            mask_time_prob=0.075,
            mask_time_length=10,
        ),
        heads=dict(n_codebooks=8, codebook_size=1024, final_dim=128, cqt_bins=336),
    ),
    # ~2 M parameters: the quickstart's model; same conv geometry (320x, 75 Hz at 24 kHz).
    "small": dict(
        backbone=_compact_backbone(conv=64, hidden=192, layers=4, heads=4, ffn=768, pos=64, pos_groups=16),
        heads=dict(n_codebooks=1, codebook_size=128, final_dim=32, cqt_bins=336),
    ),
    # For tests: tiny but with the real conv geometry so frame alignment is exercised.
    "tiny": dict(
        backbone=_compact_backbone(conv=16, hidden=32, layers=2, heads=2, ffn=64, pos=16, pos_groups=4),
        heads=dict(n_codebooks=2, codebook_size=16, final_dim=8, cqt_bins=336),
    ),
}


def preset_config(name: str, **heads_overrides: Any) -> tuple[HubertConfig, HeadsConfig]:
    """Backbone and heads config of a named preset (``mert-v1-95m``, ``mert-v1-330m``, ``small``, ``tiny``)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    spec = PRESETS[key]
    backbone = HubertConfig(**spec["backbone"])
    heads = HeadsConfig(**{**spec["heads"], **heads_overrides})
    return backbone, heads


def num_frames_for(config: HubertConfig, num_samples: int) -> int:
    """Frames the conv stack produces for ``num_samples`` samples (floor((L - k) / s) + 1 per layer)."""
    length = int(num_samples)
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
    return max(length, 0)


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled backward (fairseq's GradMultiply for ``feature_grad_mult``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class PretrainingHeads(nn.Module):
    """MERT's masked-prediction and CQT-reconstruction heads, in fairseq's shapes."""

    def __init__(self, hidden_size: int, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.final_proj = nn.Linear(hidden_size, config.n_codebooks * config.final_dim)
        self.label_embs_concat = nn.Parameter(
            torch.empty(config.n_codebooks * config.classes_per_codebook, config.final_dim)
        )
        self.cqt_proj = nn.Linear(hidden_size, config.cqt_bins)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq MERT: uniform [0, 1) label embeddings; linear layers keep torch's default init.
        nn.init.uniform_(self.label_embs_concat)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., n_codebooks, final_dim] (one untied projection per codebook)."""
        out = self.final_proj(hidden)
        return out.view(*hidden.shape[:-1], self.config.n_codebooks, self.config.final_dim)

    def label_embeddings(self) -> torch.Tensor:
        """[n_codebooks, n_special + codebook_size, final_dim]."""
        return self.label_embs_concat.view(
            self.config.n_codebooks, self.config.classes_per_codebook, self.config.final_dim
        )


@dataclass
class MertOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    features_pen: torch.Tensor
    num_frames: int


class MertPretrainModel(nn.Module):
    """``transformers.HubertModel`` backbone + optional :class:`PretrainingHeads`.

    ``forward`` runs the HF model unchanged; a forward hook on its conv feature encoder applies
    ``feature_grad_mult`` and records MERT's feature penalty, so hidden-state capture, SDPA attention,
    gradient checkpointing and layerdrop all stay transformers' own.

    ``sample_rate`` (Hz) is the rate the model's source declared (MERT-v1: 24000, MERT-v0: 16000); callers feed
    audio at that rate. ``preprocessor_config`` is the source's ``preprocessor_config.json`` (or what culturemert
    derived for a source without one, see ``preprocessor_notes``); exports write both back unchanged.
    """

    def __init__(
        self,
        backbone_config: HubertConfig,
        heads_config: HeadsConfig | None = None,
        *,
        sample_rate: int = SAMPLE_RATE,
        preprocessor_config: Mapping[str, Any] | None = None,
        preprocessor_notes: list[str] | None = None,
    ):
        super().__init__()
        self.sample_rate = int(sample_rate)
        self.preprocessor_config = dict(preprocessor_config) if preprocessor_config else default_preprocessor_config(sample_rate)
        if int(self.preprocessor_config.get("sampling_rate", self.sample_rate)) != self.sample_rate:
            raise CheckpointError(
                f"preprocessor config declares sampling_rate {self.preprocessor_config['sampling_rate']}, "
                f"the model {self.sample_rate} Hz"
            )
        self.preprocessor_config["sampling_rate"] = self.sample_rate
        self.preprocessor_notes = list(preprocessor_notes or [])
        if backbone_config.mask_time_prob <= 0 and backbone_config.mask_feature_prob <= 0:
            # HubertModel only creates `masked_spec_embed` (MERT's mask embedding) when a mask prob is > 0.
            backbone_config.mask_time_prob = 0.05
        backbone_config.apply_spec_augment = True  # needed for HF to honour our mask_time_indices
        self.backbone = HubertModel(backbone_config)
        self.heads = PretrainingHeads(backbone_config.hidden_size, heads_config) if heads_config else None
        self._feature_grad_mult = 1.0
        self._features_pen: torch.Tensor | None = None
        self.backbone.feature_extractor.register_forward_hook(self._on_conv_features)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def config(self) -> HubertConfig:
        return self.backbone.config

    @property
    def heads_config(self) -> HeadsConfig | None:
        return self.heads.config if self.heads is not None else None

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def num_frames(self, num_samples: int) -> int:
        return num_frames_for(self.config, num_samples)

    @property
    def frame_rate(self) -> float:
        """Frames per second: ``sample_rate`` / product of the conv strides (75.0 for MERT-v1 at 24 kHz)."""
        return self.sample_rate / math.prod(int(s) for s in self.config.conv_stride)

    # -- forward ------------------------------------------------------------------------------------
    def _on_conv_features(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # fairseq scales the gradient first and computes the penalty on the scaled tensor, so the
        # penalty's gradient into the conv stack is scaled by feature_grad_mult too.
        if self._feature_grad_mult != 1.0 and torch.is_grad_enabled():
            output = _GradMultiply.apply(output, self._feature_grad_mult)
        self._features_pen = output.float().pow(2).mean()
        return output

    def forward(
        self,
        input_values: torch.Tensor,
        mask_time_indices: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        feature_grad_mult: float = 1.0,
    ) -> MertOutput:
        """Run the backbone on ``input_values`` [B, L] (24 kHz, unpadded, equal lengths).

        ``mask_time_indices`` [B, T] bool replaces those frames by the learned mask embedding after the
        feature projection, as MERT does. With ``None`` in train mode HF's own SpecAugment would apply, so
        the objective always passes an explicit mask; in eval mode nothing is masked.
        """
        if input_values.dim() != 2:
            raise ValueError(f"input_values must be [batch, samples], got shape {tuple(input_values.shape)}")
        self._feature_grad_mult = float(feature_grad_mult)
        try:
            out = self.backbone(
                input_values,
                mask_time_indices=mask_time_indices,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        finally:
            self._feature_grad_mult = 1.0
        pen = self._features_pen
        self._features_pen = None
        assert pen is not None
        hidden = tuple(out.hidden_states) if output_hidden_states else None
        if hidden is not None and self.config.do_stable_layer_norm and hidden[-1] is not out.last_hidden_state:
            # Pre-LN encoders apply a final LayerNorm after the last layer. MERT's own modelling code and transformers
            # 4.x return that LayerNorm'd tensor as the last hidden state (it *is* last_hidden_state); transformers
            # 5.x records layer outputs with hooks and so returns the last layer's output before the LayerNorm.
            # Checking the object rather than the version keeps MERT's reference on either.
            hidden = hidden[:-1] + (out.last_hidden_state,)
        return MertOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=hidden,
            features_pen=pen,
            num_frames=out.last_hidden_state.shape[1],
        )


def check_sample_rate(model: MertPretrainModel, expected_hz: int, purpose: str, source: str = "the model") -> None:
    """Refuse to use ``model`` for ``purpose`` at ``expected_hz`` when it declares another rate.

    Pre-training feeds 24 kHz audio against 75 Hz teacher labels; a 16 kHz model (MERT-v0) would see audio at the
    wrong rate and produce 50 Hz frames, misaligned with every label, without any error further down.

    Raises:
        CheckpointError: naming both rates, the source and the purpose.
    """
    declared = int(getattr(model, "sample_rate", SAMPLE_RATE))
    if declared != int(expected_hz):
        raise CheckpointError(
            f"{source} declares sample rate {declared} Hz, but {purpose} runs at {int(expected_hz)} Hz; "
            f"use a {int(expected_hz) // 1000} kHz model"
        )


def build_model(preset: str, with_heads: bool = True, seed: int | None = None, **heads_overrides: Any) -> MertPretrainModel:
    """A freshly initialised model from a preset (for pre-training from scratch and tests)."""
    backbone_cfg, heads_cfg = preset_config(preset, **heads_overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return MertPretrainModel(backbone_cfg, heads_cfg if with_heads else None)
