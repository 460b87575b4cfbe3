"""Per-tensor merge kernels: each acts on the task vectors of one tensor (float64) and never sees a whole model.

Formulas and sources are in the package docstring (:mod:`culturemert.merge`) and docs/merging.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch


def _tensor_seed(seed: int, model_index: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(task_vector: torch.Tensor, drop_rate: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """Drop entries with probability ``drop_rate`` and rescale survivors by 1/(1 − drop_rate); seeded per tensor."""
    if drop_rate == 0.0:
        return task_vector
    generator = torch.Generator().manual_seed(_tensor_seed(seed, model_index, name))
    keep = torch.rand(task_vector.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return task_vector * keep / (1.0 - drop_rate)


def trim_top_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries whose magnitude is at least the k-th largest, k = ceil(density · numel).

    A threshold (rather than ``topk`` indices) keeps every entry tied with the k-th largest, so the result does not
    depend on how a sort breaks ties.
    """
    numel = task_vector.numel()
    k = math.ceil(density * numel)
    if k >= numel or numel == 0:
        return task_vector
    magnitude = task_vector.abs()
    threshold = torch.kthvalue(magnitude.flatten(), numel - k + 1).values
    return torch.where(magnitude >= threshold, task_vector, torch.zeros_like(task_vector))


def ties_combine(trimmed: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """Sign election by total magnitude + λ-weighted disjoint mean (λ after election; see module docstring)."""
    stacked = torch.stack(list(trimmed))
    elected = torch.sign(stacked.sum(dim=0))  # 0 on an exact tie: nobody agrees, entry stays at base
    agrees = (torch.sign(stacked) == elected) & (elected != 0)
    scale = torch.tensor(list(lambdas), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    summed = (stacked * scale * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp_min(1)
    return summed / count
