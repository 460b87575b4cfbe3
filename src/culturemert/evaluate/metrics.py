"""Multi-label tagging metrics: macro ROC-AUC, macro AP, micro-F1 and macro-F1 at a fixed threshold.

Everything is vectorised over a leading "probe" dimension so the batched prober can score hundreds of probes
per epoch in one call. The definitions equal scikit-learn's (tests check them against ``roc_auc_score``,
``average_precision_score`` and ``f1_score``):

* ROC-AUC of one tag is the Mann-Whitney statistic with tied scores counted as 1/2 (= sklearn's trapezoidal
  area under the ROC curve).
* AP of one tag is sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (= sklearn, ties grouped).
* F1 uses ``sigmoid(logit) > threshold`` (i.e. ``logit > 0`` at 0.5), as torchmetrics' multilabel F1 does.
  Macro-F1 is scikit-learn's ``f1_score(average="macro", zero_division=0)``: the plain mean over **every** tag
  of the vocabulary; a tag with no positive in the split scores 0 (its F1 is 0 whether or not it is predicted),
  exactly as scikit-learn and torchmetrics' multilabel ``F1Score(average="macro")`` count it.

Tags with no positive or no negative example in the evaluated split have no ROC-AUC/AP (scikit-learn refuses
to score them); they are excluded from the macro ROC-AUC and macro AP of that split and listed in
:class:`TaggingScores.excluded_tags`. F1 has no such exclusion: micro-F1 pools the counts of all tags and
macro-F1 averages all tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "METRIC_NAMES",
    "TaggingScores",
    "valid_tag_mask",
    "average_ranks",
    "roc_auc_per_tag",
    "average_precision_per_tag",
    "f1_scores",
    "tagging_scores",
    "batched_macro_roc_auc",
]

#: Metric keys used in results files and reports, in the paper's order.
METRIC_NAMES = ("roc_auc", "ap", "micro_f1", "macro_f1")


def _as_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def valid_tag_mask(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[..., N, K] binary labels -> [..., K] bool: tags with at least one positive and one negative."""
    y = _as_tensor(labels)
    pos = y.sum(dim=-2)
    return (pos > 0) & (pos < y.shape[-2])


def _group_bounds(sorted_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For scores sorted along the last dim: index of the first and last element of each element's tie group."""
    n = sorted_scores.shape[-1]
    idx = torch.arange(n, device=sorted_scores.device).expand_as(sorted_scores)
    starts_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    starts_group[..., 1:] = sorted_scores[..., 1:] != sorted_scores[..., :-1]
    ends_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    ends_group[..., :-1] = starts_group[..., 1:]
    first = torch.where(starts_group, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    last_rev = torch.where(ends_group, idx, torch.full_like(idx, n - 1)).flip(-1).cummin(dim=-1).values
    return first, last_rev.flip(-1)


def average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim, ties receiving their average rank (scipy's rankdata 'average')."""
    sorted_scores, order = scores.sort(dim=-1, stable=True)
    first, last = _group_bounds(sorted_scores)
    avg_sorted = (first + last).to(torch.float64) / 2.0 + 1.0
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(-1, order, avg_sorted)
    return ranks


def roc_auc_per_tag(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[..., N, K] labels and scores -> [..., K] ROC-AUC (float64); NaN for tags without both classes."""
    y = _as_tensor(labels).transpose(-1, -2)  # [..., K, N]
    s = _as_tensor(scores).transpose(-1, -2)
    ranks = average_ranks(s)
    n_pos = y.sum(-1)
    n_neg = y.shape[-1] - n_pos
    rank_sum = (ranks * y).sum(-1)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))


def average_precision_per_tag(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> [..., K] average precision (float64); NaN for tags without both classes."""
    y = _as_tensor(labels).transpose(-1, -2)
    s = _as_tensor(scores).transpose(-1, -2)
    # Descending order; every positive contributes the precision measured at the end of its tie group.
    neg_sorted, order = (-s).sort(dim=-1, stable=True)
    y_sorted = y.gather(-1, order)
    _, last = _group_bounds(neg_sorted)
    tp_cum = y_sorted.cumsum(-1)
    precision_at = tp_cum / (torch.arange(y.shape[-1], device=y.device, dtype=torch.float64) + 1.0)
    precision_group_end = precision_at.gather(-1, last)
    n_pos = y.sum(-1)
    ap = (y_sorted * precision_group_end).sum(-1) / n_pos
    valid = (n_pos > 0) & (n_pos < y.shape[-1])
    return torch.where(valid, ap, torch.full_like(ap, float("nan")))


def f1_scores(
    labels: np.ndarray | torch.Tensor,
    logits: np.ndarray | torch.Tensor,
    tag_mask: torch.Tensor | None = None,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(micro-F1, macro-F1) for [..., N, K] labels and logits.

    A prediction is positive when ``sigmoid(logit) > threshold``. Per-tag F1 = 2TP / (2TP + FP + FN), 0 when
    the denominator is 0 (sklearn's ``zero_division=0``). Macro-F1 is the mean over all tags (scikit-learn
    ``f1_score(average="macro", zero_division=0)``) unless ``tag_mask`` restricts it; micro-F1 pools all tags.
    """
    y = _as_tensor(labels)
    prob = torch.sigmoid(_as_tensor(logits))
    pred = (prob > threshold).to(torch.float64)
    tp = (pred * y).sum(-2)
    fp = (pred * (1 - y)).sum(-2)
    fn = ((1 - pred) * y).sum(-2)
    denom = 2 * tp + fp + fn
    per_tag = torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-300), torch.zeros_like(denom))
    micro_denom = 2 * tp.sum(-1) + fp.sum(-1) + fn.sum(-1)
    micro = torch.where(micro_denom > 0, 2 * tp.sum(-1) / micro_denom.clamp_min(1e-300), torch.zeros_like(micro_denom))
    if tag_mask is None:
        tag_mask = torch.ones(per_tag.shape[-1], dtype=torch.bool, device=per_tag.device)
    macro = _masked_mean(per_tag, tag_mask)
    return micro, macro


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype).expand_as(values)
    count = m.sum(-1)
    total = torch.where(m > 0, values, torch.zeros_like(values)).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@dataclass
class TaggingScores:
    """The four paper metrics for one set of predictions, plus the tags left out of macro ROC-AUC and AP."""

    roc_auc: float
    ap: float
    micro_f1: float
    macro_f1: float
    n_items: int
    excluded_tags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in METRIC_NAMES}


def tagging_scores(
    labels: np.ndarray | torch.Tensor,
    logits: np.ndarray | torch.Tensor,
    vocabulary: list[str] | None = None,
    threshold: float = 0.5,
) -> TaggingScores:
    """All four metrics for track-level ``labels`` [N, K] and ``logits`` [N, K] (pre-sigmoid scores)."""
    y = _as_tensor(labels)
    s = _as_tensor(logits)
    if y.shape != s.shape or y.dim() != 2:
        raise ValueError(f"labels {tuple(y.shape)} and logits {tuple(s.shape)} must both be [items, tags]")
    mask = valid_tag_mask(y)
    # F1 is defined for every tag, so macro-F1 averages all of them (scikit-learn's definition); only the
    # rank metrics, undefined without both classes, use the mask
    micro, macro = f1_scores(y, s, None, threshold)
    vocabulary = vocabulary or [f"tag{k}" for k in range(y.shape[1])]
    return TaggingScores(
        roc_auc=float(_masked_mean(roc_auc_per_tag(y, s).nan_to_num(0.0), mask)),
        ap=float(_masked_mean(average_precision_per_tag(y, s).nan_to_num(0.0), mask)),
        micro_f1=float(micro),
        macro_f1=float(macro),
        n_items=int(y.shape[0]),
        excluded_tags=[vocabulary[k] for k in range(y.shape[1]) if not bool(mask[k])],
    )


def batched_macro_roc_auc(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Macro ROC-AUC for many probes at once: labels [N, K], logits [P, N, K] -> [P] (float64).

    Used every epoch for plateau scheduling, early stopping and checkpoint selection. NaN (undefined) for
    every probe when no tag has both classes in ``labels``, and for a probe whose logits hold a NaN (a diverged
    probe: a rank of NaN scores means nothing), so that no selection can pick an undefined value.
    """
    mask = valid_tag_mask(labels)
    y = labels.to(torch.float64).unsqueeze(0).expand(logits.shape[0], -1, -1)
    auc = _masked_mean(roc_auc_per_tag(y, logits.to(torch.float64)).nan_to_num(0.0), mask)
    diverged = torch.isnan(logits).flatten(1).any(1)
    return torch.where(diverged, torch.full_like(auc, float("nan")), auc)
