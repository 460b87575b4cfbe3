"""Per-step learning rate (warm-up + decay, re-warmed per stage), trainable-parameter selection, and FLOP accounting
for MFU."""

from __future__ import annotations

import logging
import math

import torch

from culturemert.label_grid import HOP_LENGTH
from culturemert.model import MertPretrainModel
from culturemert.train.recipe import ScheduleSpec

log = logging.getLogger(__name__)


def lr_at(step: int, spec: ScheduleSpec, total_steps: int) -> float:
    """Learning rate of 0-based ``step`` of a stage of ``total_steps`` steps (a pure function)."""
    warm = spec.warmup_steps
    if step < warm:
        return spec.warmup_start + (spec.peak - spec.warmup_start) * (step + 1) / warm
    if spec.kind == "constant":
        return spec.peak
    if spec.kind == "inverse_sqrt":
        ref = max(warm, 1)
        return max(spec.floor, spec.peak * math.sqrt(ref / max(step, ref)))
    progress = min(max(step - warm, 0) / max(total_steps - warm, 1), 1.0)
    span = spec.peak - spec.floor
    if spec.decay == "cosine":
        return spec.floor + span * 0.5 * (1.0 + math.cos(math.pi * progress))
    if spec.decay == "linear":
        return spec.floor + span * (1.0 - progress)
    return spec.floor + span * (1.0 - progress) ** spec.power


def train_flops_per_clip(model: MertPretrainModel, num_samples: int, cqt: bool = True) -> float:
    """Training FLOPs per clip of ``num_samples`` samples: 2 FLOPs per multiply-add of the forward pass (conv stack,
    projection, positional conv, per layer ``4 T d^2 + 2 T d ffn + 2 T^2 d``, heads), x 3 for forward + backward,
    plus the CQT target as nnAudio's direct convolution would cost it (336 bins x real/imag x 65 536 taps per hop);
    docs/performance.md, "FLOPs per clip", lists every term (≈ 364 GFLOPs for MERT-v1-95M on 5 s)."""
    cfg = model.config
    macs = 0.0
    length, c_in = num_samples, 1
    for dim, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        length = (length - k) // s + 1
        macs += length * k * c_in * dim
        c_in = dim
    frames, d = length, cfg.hidden_size
    macs += frames * c_in * d  # feature projection
    macs += frames * d * (d // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
    per_layer = 4 * frames * d * d + 2 * frames * d * cfg.intermediate_size + 2 * frames * frames * d
    macs += cfg.num_hidden_layers * per_layer
    if model.heads is not None:
        hc = model.heads.config
        macs += frames * d * hc.n_codebooks * hc.final_dim
        macs += frames * hc.n_codebooks * hc.classes_per_codebook * hc.final_dim
        macs += frames * d * hc.cqt_bins
    flops = 3 * 2 * macs
    if cqt and model.heads is not None:
        # direct-convolution count of nnAudio's CQT1992v2 (336 bins x real/imag x 2^16 taps per hop)
        flops += 2 * model.heads.config.cqt_bins * 2 * 65536 * (num_samples // HOP_LENGTH + 1)
    return float(flops)


_PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "a10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known CUDA device (vendor data sheets), for MFU; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None
