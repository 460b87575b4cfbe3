"""MERT's pre-training objective (MERT's ``mert_fairseq/models/mert/mert_model.py`` and fairseq's HuBERT
criterion; docs/pretraining.md), piece by piece.

Order of operations for one batch:

1. CQT targets are computed from the **clean** audio (before any mixing), in fp32, without gradients.
2. In-batch noise mixture (training only, and only when ``mixture_prob > 0``: MERT gates the whole
   augmentation on that test, its default -1 means "off"): a clip is augmented when a uniform draw is
   *greater* than ``mixture_prob`` (MERT's inverted test, so a clip is mixed with probability
   ``1 - mixture_prob``), by adding 1-3 excerpts of 12 000-24 000 samples taken from the other clips of its
   group (concatenated, so an excerpt may straddle two clips) at volume 1.0.
3. Span masking of conv frames (:func:`compute_mask_indices`, fairseq's algorithm with MERT's settings); the
   backbone replaces masked frames by the learned mask embedding after the feature projection.
4. On masked frames only: per-codebook cosine-similarity logits / ``logit_temp`` against that codebook's label
   embeddings (special symbols included, never targets), cross-entropy summed over codebooks and averaged
   over masked frames; CQT MSE of ``cqt_proj(last layer)`` against the clean CQT; plus the conv feature
   penalty. Conv-encoder gradients are scaled by ``feature_grad_mult``.

MERT runs steps 2-3 inside each GPU's forward pass, so the noise pool and fairseq's equalisation of the masked
count (``require_same_masks``) span one per-GPU batch, not the global batch. :meth:`MertObjective.plan` cuts the
global batch into consecutive groups of ``mask_group_clips`` clips (the last one may be smaller) and treats each
group like one such per-GPU batch, whatever the world size or micro-batch of this run.

Frame alignment: conv frame ``k`` covers samples ``[320k, 320k + 400)`` (centre ``320k + 200``); teacher code
``k`` covers ``[320k, 320k + 320)``; CQT frame ``k`` is centred on sample ``320k`` (nnAudio ``center=True``).
Like MERT we keep the first ``T`` code / CQT frames for ``T`` conv frames, i.e. the CQT target of a frame is
centred ~200 samples (8 ms at 24 kHz) earlier than the conv frame's centre; MERT-v1 was trained that way.

Randomness (mask, mixture) comes only from an explicit ``torch.Generator`` so a step is a pure function of
its inputs and the generator seed; that is what makes resumed runs bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from culturemert.config import StrictModel
from culturemert.errors import DataError

__all__ = [
    "ObjectiveConfig",
    "ObjectiveOutput",
    "MertObjective",
    "compute_mask_indices",
    "apply_inbatch_noise",
    "cosine_logits",
    "masked_prediction_loss",
]


class ObjectiveConfig(StrictModel):
    """Every knob of the objective; defaults are MERT-v1-95M's (``MERT_RVQ-VAE_CQT_95M.yaml``).

    ``mask_group_clips``: clips per equalisation / noise-pool group, MERT's per-GPU forward batch. The 95M yaml's
    ``max_tokens`` 2 000 000 over 120 000-sample crops gives 16 clips (fairseq keeps batches a multiple of its
    ``required_batch_size_multiple`` 8); the 330M yaml's 900 000 over 122 880 gives 7.
    ``mixture_prob``: <= 0 switches the in-batch noise mixture off (MERT: ``if mixture_prob > 0``); otherwise a
    clip is mixed when ``U[0, 1) > mixture_prob``.
    """

    mask_prob: float = Field(0.8, ge=0.0, le=1.0)
    mask_length: int = Field(5, ge=1)
    min_masks: int = Field(2, ge=0)
    require_same_masks: bool = True
    mask_group_clips: int = Field(16, ge=1)
    logit_temp: float = Field(0.1, gt=0.0)
    pred_masked_weight: float = Field(1.0, ge=0.0)  # criterion pred_masked_weight
    cqt_weight: float = Field(1.0, ge=0.0)  # loss_weights[1]
    feature_penalty_weight: float = Field(10.0, ge=0.0)  # loss_weights[0]
    feature_grad_mult: float = Field(0.1, ge=0.0)
    mixture_prob: float = Field(0.5, ge=-1.0, le=1.0)  # <= 0: off; else a clip is mixed when U[0,1) > mixture_prob
    mixture_length_range: tuple[int, int] = (12000, 24000)  # samples, inclusive
    mixture_count_range: tuple[int, int] = (1, 3)  # excerpts per mixed sample, inclusive
    mixture_volume: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _check_ranges(self) -> "ObjectiveConfig":
        for key in ("mixture_length_range", "mixture_count_range"):
            lo, hi = getattr(self, key)
            if lo < 1 or hi < lo:
                raise ValueError(f"{key} must be [low, high] with 1 <= low <= high, got [{lo}, {hi}]")
        return self


# ------------------------------------------------------------------------------------------------------
# masking
# ------------------------------------------------------------------------------------------------------
def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def compute_mask_indices(
    shape: tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 5,
    min_masks: int = 2,
    require_same_masks: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Span mask [B, T] (bool, CPU) following fairseq's ``compute_mask_indices`` for MERT's settings.

    Static span lengths, overlap allowed. Per row: ``n = max(min_masks, floor(mask_prob * T / mask_length + U))``
    span starts drawn without replacement from ``[0, T - mask_length)``; each span covers ``mask_length``
    frames (clipped at ``T``). With ``require_same_masks`` every row is then reduced to the smallest
    masked-frame count in the batch by subsampling its masked indices at random (which can break spans).
    """
    batch, frames = int(shape[0]), int(shape[1])
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    if batch == 0 or frames == 0 or mask_prob <= 0:
        return mask
    rows: list[torch.Tensor] = []
    for _ in range(batch):
        num_spans = max(min_masks, int(mask_prob * frames / float(mask_length) + _uniform(generator)))
        span = mask_length
        if frames - span <= num_spans:  # fairseq's guard for very short inputs
            span = frames - num_spans - 1
        population = max(frames - span, num_spans, 1)
        starts = torch.randperm(population, generator=generator)[:num_spans]
        idx = (starts[:, None] + torch.arange(mask_length)[None, :]).reshape(-1)
        idx = torch.unique(idx[idx < frames])
        rows.append(idx)
    target = min(len(r) for r in rows)
    for row, idx in enumerate(rows):
        if require_same_masks and len(idx) > target:
            idx = idx[torch.randperm(len(idx), generator=generator)[:target]]
        mask[row, idx] = True
    return mask


# ------------------------------------------------------------------------------------------------------
# in-batch noise mixture
# ------------------------------------------------------------------------------------------------------
def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def apply_inbatch_noise(
    wav: torch.Tensor,
    mixture_prob: float = 0.5,
    length_range: tuple[int, int] = (12000, 24000),
    count_range: tuple[int, int] = (1, 3),
    volume: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MERT's in-batch noise mixture (``MERTModel.inbatch_noise_augment``). Returns ``(mixed copy of wav,
    applied [B] bool)``.

    ``mixture_prob <= 0`` switches it off (MERT's ``if self.mixture_prob > 0`` gate), so nothing is drawn from
    ``generator``. Otherwise clip ``i`` is augmented when ``U[0,1) > mixture_prob`` (probability
    ``1 - mixture_prob``); the noise pool is the concatenation of the *clean* other clips of ``wav``; each of
    ``n ~ U{count_range}`` excerpts of length ``U{length_range}`` (clipped to the clip length) starts at a
    uniform offset in the pool and is added at a uniform position. A batch of one has no pool and is returned
    unchanged, as MERT's exception path does.
    """
    batch, length = wav.shape
    out = wav.clone()
    applied = torch.zeros(batch, dtype=torch.bool)
    if mixture_prob <= 0 or batch < 2 or length == 0:
        return out, applied
    draws = torch.rand(batch, generator=generator)
    for i in range(batch):
        if float(draws[i]) <= mixture_prob:
            continue
        pool = torch.cat([wav[j] for j in range(batch) if j != i])
        for _ in range(_randint(count_range[0], count_range[1], generator)):
            seg = min(_randint(length_range[0], length_range[1], generator), length, pool.numel())
            src = _randint(0, pool.numel() - seg, generator)
            dst = _randint(0, length - seg, generator)
            out[i, dst : dst + seg] += volume * pool[src : src + seg]
        applied[i] = True
    return out, applied


# ------------------------------------------------------------------------------------------------------
# logits and losses
# ------------------------------------------------------------------------------------------------------
def cosine_logits(proj: torch.Tensor, label_emb: torch.Tensor, logit_temp: float) -> torch.Tensor:
    """Cosine similarity of projections [N, K, F] with every label embedding [K, C, F], / temp -> [N, K, C].

    Computed in fp32 (under autocast too): with a temperature of 0.1 bf16 rounding would be amplified 10x.
    """
    p = F.normalize(proj.float(), dim=-1, eps=1e-8)
    e = F.normalize(label_emb.float(), dim=-1, eps=1e-8)
    return torch.einsum("nkf,kcf->nkc", p, e) / logit_temp


def masked_prediction_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per codebook, *summed* over frames: logits [N, K, C], targets [N, K] -> ([K], correct [K])."""
    n, k, c = logits.shape
    ce = F.cross_entropy(logits.reshape(n * k, c), targets.reshape(n * k), reduction="none").view(n, k)
    correct = (logits.argmax(-1) == targets).sum(0)
    return ce.sum(0), correct


@dataclass
class ObjectiveOutput:
    """``loss`` is the differentiable total; ``parts`` are detached scalars for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    num_masked: int = 0
    # Per batch row, detached: "masked" (masked frames), "pred_sum" (CE summed over codebooks and the row's masked
    # frames) and, with the CQT term, "cqt_sum" (per-frame MSE summed over the row's masked frames). Summed over
    # any group of rows and divided by its "masked", they give that group's pred_loss / cqt_mse (per culture).
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


class MertObjective(nn.Module):
    """The whole objective around a :class:`~culturemert.model.MertPretrainModel` with heads.

    ``cqt`` is a module mapping clean audio [B, L] to CQT magnitudes [B, bins, frames] (``teachers.MertCQT``);
    it is required when ``cqt_weight > 0``.
    """

    def __init__(self, config: ObjectiveConfig | None = None, cqt: nn.Module | Callable | None = None):
        super().__init__()
        self.config = config or ObjectiveConfig()
        if self.config.cqt_weight > 0 and cqt is None:
            raise ValueError("cqt_weight > 0 needs a CQT module (culturemert.teachers.MertCQT)")
        self.cqt = cqt if self.config.cqt_weight > 0 else None

    # -- randomness, done once per *global* batch so the data seen does not depend on how the batch is
    #    split over ranks and micro-batches --------------------------------------------------------------
    def plan(
        self,
        wav: torch.Tensor,
        num_conv_frames: int,
        num_label_frames: int,
        generator: torch.Generator | None,
        train: bool = True,
        label_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw the mixture and the mask for a batch. Returns ``(input_wav, mask [B, T] bool, mixed [B])``.

        ``wav`` is the *global* batch; it is cut into consecutive groups of ``mask_group_clips`` rows, each mixed
        and masked like one of MERT's per-GPU batches, so the result does not depend on the world size. The mask
        covers the first ``min(T_conv, T_labels)`` frames; frames without a label are never masked,
        nor are frames where ``label_valid`` [B, T_labels] is False (padding codes of short items).
        """
        cfg = self.config
        batch = wav.shape[0]
        wav_in = wav.float().cpu()
        mixed = torch.zeros(batch, dtype=torch.bool)
        groups = [slice(g, min(g + cfg.mask_group_clips, batch)) for g in range(0, batch, cfg.mask_group_clips)]
        if train and 0 < cfg.mixture_prob < 1.0:
            clean = wav_in
            wav_in = clean.clone()
            for rows in groups:  # MERT's noise pool is the other clips of the same per-GPU batch
                wav_in[rows], mixed[rows] = apply_inbatch_noise(
                    clean[rows],
                    cfg.mixture_prob,
                    tuple(cfg.mixture_length_range),
                    tuple(cfg.mixture_count_range),
                    cfg.mixture_volume,
                    generator,
                )
        usable = min(num_conv_frames, num_label_frames)
        mask = torch.zeros(batch, num_conv_frames, dtype=torch.bool)
        for rows in groups:  # fairseq equalises the masked count within one forward batch, not across GPUs
            mask[rows, :usable] = compute_mask_indices(
                (rows.stop - rows.start, usable),
                cfg.mask_prob,
                cfg.mask_length,
                cfg.min_masks,
                cfg.require_same_masks,
                generator,
            )
        if label_valid is not None and not bool(label_valid.all()):
            mask[:, :usable] &= label_valid[:, :usable].to(mask.device)
        return wav_in, mask, mixed

    def cqt_targets(self, clean_wav: torch.Tensor) -> torch.Tensor:
        """[B, L] clean audio -> [B, frames, bins] fp32 CQT magnitudes (no grad, autocast off)."""
        assert self.cqt is not None
        with torch.no_grad(), torch.autocast(device_type=clean_wav.device.type, enabled=False):
            spec = self.cqt(clean_wav.float())
        return spec.transpose(1, 2).float()

    def forward(  # type: ignore[override]
        self,
        model: nn.Module,
        clean_wav: torch.Tensor,
        input_wav: torch.Tensor,
        codes: torch.Tensor,
        mask: torch.Tensor,
    ) -> ObjectiveOutput:
        """Loss for one (micro-)batch given the planned ``input_wav`` and ``mask`` (all on the model's device).

        ``codes`` are int64 [B, n_codebooks, T_labels]. The total is per masked frame:
        ``w_pred * sum_k CE_k + w_cqt * MSE + w_pen * feature_penalty``.
        """
        cfg = self.config
        inner = getattr(model, "module", model)  # DDP
        heads = inner.heads
        if heads is None:
            raise ValueError("the model has no pre-training heads")
        hc = heads.config
        if codes.dim() != 3 or codes.shape[1] != hc.n_codebooks:
            raise DataError(
                f"teacher codes have shape {tuple(codes.shape)}, the heads expect [B, {hc.n_codebooks}, T]"
            )
        cqt = self.cqt_targets(clean_wav) if self.cqt is not None else None
        out = model(input_wav, mask_time_indices=mask, feature_grad_mult=cfg.feature_grad_mult)
        hidden = out.last_hidden_state
        frames = hidden.shape[1]
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match frames {tuple(hidden.shape[:2])}")
        num_masked = int(mask.sum())
        masked_hidden = hidden[mask]  # [N, D]
        targets = codes.transpose(1, 2)[:, :frames][mask[:, : codes.shape[2]]]  # [N, K]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= hc.codebook_size):
            raise DataError(
                f"teacher codes outside [0, {hc.codebook_size}): min {int(targets.min())}, max {int(targets.max())}"
            )
        parts: dict[str, torch.Tensor] = {}
        denom = max(num_masked, 1)
        logits = cosine_logits(heads.project(masked_hidden), heads.label_embeddings(), cfg.logit_temp)
        ce_sum, correct = masked_prediction_loss(logits, targets + hc.n_special)
        pred_loss = ce_sum.sum() / denom
        total = cfg.pred_masked_weight * pred_loss
        for k in range(hc.n_codebooks):
            parts[f"ce_{k}"] = (ce_sum[k] / denom).detach()
            parts[f"acc_{k}"] = (correct[k].float() / denom).detach()
        parts["pred_loss"] = pred_loss.detach()
        if cqt is not None:
            if cqt.shape[1] < frames:
                raise ValueError(f"CQT has {cqt.shape[1]} frames, fewer than the {frames} conv frames")
            cqt_pred = heads.cqt_proj(masked_hidden).float()
            cqt_target = cqt[:, :frames][mask]
            cqt_mse = F.mse_loss(cqt_pred, cqt_target) if num_masked else cqt_pred.sum() * 0.0
            total = total + cfg.cqt_weight * cqt_mse
            parts["cqt_mse"] = cqt_mse.detach()
        penalty = out.features_pen
        total = total + cfg.feature_penalty_weight * penalty
        parts["features_pen"] = penalty.detach()
        parts["masked_frac"] = torch.tensor(num_masked / max(mask.numel(), 1))
        parts["loss"] = total.detach()
        with torch.no_grad():
            row_of = mask.nonzero(as_tuple=True)[0]  # batch row of each masked frame, in hidden[mask] order
            n_rows = mask.shape[0]
            frame_ce = F.cross_entropy(
                logits.detach().reshape(-1, logits.shape[-1]), (targets + hc.n_special).reshape(-1), reduction="none"
            ).view(targets.shape).sum(1)
            rows = {
                "masked": torch.bincount(row_of, minlength=n_rows).float(),
                "pred_sum": torch.zeros(n_rows, device=frame_ce.device).index_add_(0, row_of, frame_ce),
            }
            if cqt is not None:
                frame_se = (cqt_pred.detach() - cqt_target).pow(2).mean(1)
                rows["cqt_sum"] = torch.zeros(n_rows, device=frame_se.device).index_add_(0, row_of, frame_se)
        return ObjectiveOutput(loss=total, parts=parts, num_masked=num_masked, rows=rows)

    def loss(
        self,
        model: nn.Module,
        wav: torch.Tensor,
        codes: torch.Tensor,
        generator: torch.Generator | None = None,
        train: bool = True,
    ) -> ObjectiveOutput:
        """Convenience: :meth:`plan` + :meth:`forward` on one batch (no splitting)."""
        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        wav_in, mask, _ = self.plan(wav, inner.num_frames(wav.shape[1]), codes.shape[2], generator, train)
        return self(model, wav.to(device), wav_in.to(device), codes.to(device), mask.to(device))
