"""Per-tensor merge kernels: each acts on the task vectors τ_i = θ_i − θ_base of one tensor (float64, any shape
unless stated) and never sees a whole model. The engine (:mod:`culturemert.merge.engine`) streams tensors through
them; docs/merging.md has the methods table.

Sources: TIES (Yadav et al., NeurIPS 2023; reference code prateeky2806/ties-merging), DARE (Yu et al., ICML 2024),
Model Breadcrumbs (Davari & Belilovsky, ECCV 2024; parameterised as mergekit's ``magnitude_outliers``), DELLA
(Deep et al. 2024; reference code declare-lab/della, ``rank_magnitude``), TSV-Merge (Gargiulo et al., CVPR 2025;
reference code AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``), Iso-C and Iso-CTS
(Marczak et al. 2025, "No Task Left Behind"; reference code danielm1405/iso-merging, ``src/utils/iso.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from culturemert.runtime import derive_seed


def _tensor_seed(seed: int, model_index: int, name: str) -> int:
    return derive_seed(seed, model_index, name, sep="\x00")


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


# ---------------------------------------------------------------------------------------------------- magnitude masks


@dataclass(frozen=True)
class MagnitudeBand:
    """Keep the entries with ``lower <= |τ| < upper``, zero the rest.

    TIES' trim is the band [k-th largest, ∞); Model Breadcrumbs' mask is [(n_top + n_keep)-th largest, n_top-th
    largest). Thresholds rather than sorted indices make the mask independent of how a sort breaks ties: entries
    tied with the last kept magnitude are all kept, entries tied with the n_top-th largest are all removed.
    """

    lower: float = 0.0
    upper: float = math.inf

    def apply(self, task_vector: torch.Tensor) -> torch.Tensor:
        magnitude = task_vector.abs()
        keep = magnitude >= self.lower
        if self.upper != math.inf:
            keep &= magnitude < self.upper
        return torch.where(keep, task_vector, torch.zeros_like(task_vector))


def ties_counts(numel: int, density: float) -> tuple[int, int]:
    """(n_top, n_keep) of TIES' trim: remove nothing from the top, keep the k = ⌈density · numel⌉ largest."""
    return 0, math.ceil(density * numel)


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top, n_keep) of Model Breadcrumbs' mask, as mergekit's ``magnitude_outliers`` counts them.

    n_keep = ⌊density · numel⌋ entries are kept after removing the n_top = ⌊gamma · numel⌋ largest; the smallest
    numel − n_keep − n_top are removed too. When gamma > 1 − density, n_top shrinks to numel − n_keep (density is
    honoured, nothing is removed from the bottom).
    """
    n_keep = int(density * numel)
    n_top = int(gamma * numel)
    n_bottom = numel - n_keep - n_top
    if n_bottom < 0:
        n_top += n_bottom
    return n_top, n_keep


def band_from_ranks(numel: int, n_top: int, n_keep: int, kth_largest: Callable[[int], float]) -> MagnitudeBand | None:
    """The band keeping magnitude ranks n_top + 1 … n_top + n_keep (1 = largest) of ``numel`` entries; None keeps
    everything. ``kth_largest(k)`` is the k-th largest magnitude, over one tensor or over the whole model."""
    if n_top <= 0 and n_keep >= numel:
        return None
    upper = kth_largest(n_top) if n_top > 0 else math.inf
    if n_keep <= 0:
        return MagnitudeBand(lower=math.inf, upper=upper)  # keeps nothing
    lower = kth_largest(n_top + n_keep) if n_top + n_keep < numel else 0.0
    return MagnitudeBand(lower=lower, upper=upper)


def tensor_band(task_vector: torch.Tensor, n_top: int, n_keep: int) -> MagnitudeBand | None:
    """:func:`band_from_ranks` with ranks taken within this one tensor."""
    flat = task_vector.detach().abs().flatten()
    numel = flat.numel()

    def kth_largest(k: int) -> float:
        return float(torch.kthvalue(flat, numel - k + 1).values)

    return band_from_ranks(numel, n_top, n_keep, kth_largest)


def breadcrumbs_mask(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024) within one tensor: zero the ⌊gamma · numel⌋ largest-magnitude
    entries (outliers) and the smallest ones, keeping ⌊density · numel⌋ (see :func:`breadcrumbs_counts`).

    No rescaling (the paper and mergekit's ``breadcrumbs`` have none). density = 1 keeps everything (gamma is then
    moot, as in mergekit), so the merge is task arithmetic.
    """
    band = tensor_band(task_vector, *breadcrumbs_counts(task_vector.numel(), density, gamma))
    return task_vector if band is None else band.apply(task_vector)


# ---------------------------------------------------------------------------------------------------- DELLA


def della_magprune(
    task_vector: torch.Tensor, drop_rate: float, epsilon: float, seed: int, model_index: int, name: str
) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024): magnitude-ranked drop probabilities, then rescaling of the survivors.

    Within each row (dim 0 indexes rows; a kernel of shape (out, ...) has one row per output channel, a 1-D
    tensor is one row) the n entries are ranked by magnitude, r = 0 for the smallest to n − 1 for the largest, and
    entry i is kept with probability q_i = (1 − p − ε) + 2ε · r_i / (n − 1), i.e. dropped with probability
    p_i = 1 − q_i ∈ [p − ε, p + ε], smaller magnitudes dropped more often. Survivors are rescaled by
    1/(1 − p_i) = 1/q_i, so E[result] = τ. A one-entry row is kept with probability 1 − p. Ties in magnitude are
    ranked by position (stable sort). As the authors' code (declare-lab/della, ``rank_magnitude`` with
    ``rescale``); mergekit's ``della`` instead rescales each tensor to its original L1 norm.

    ``drop_rate`` p (default 0.3) and ``epsilon`` ε (default 0.07, half the authors' window 0.14) need
    ε ≤ p and p + ε < 1. The mask is drawn from a generator seeded by (seed, model index, tensor name), like
    DARE's. p = ε = 0 returns ``task_vector`` unchanged.
    """
    if drop_rate == 0.0 and epsilon == 0.0:
        return task_vector
    rows = task_vector.reshape(task_vector.shape[0], -1) if task_vector.dim() >= 2 else task_vector.reshape(1, -1)
    n = rows.shape[1]
    if n > 1:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
        position = ranks.to(torch.float64) / (n - 1)
    else:
        position = torch.full(rows.shape, 0.5, dtype=torch.float64)
    keep_probability = (1.0 - drop_rate - epsilon) + 2.0 * epsilon * position
    generator = torch.Generator().manual_seed(_tensor_seed(seed, model_index, name))
    draw = torch.rand(rows.shape, generator=generator, dtype=torch.float64)
    kept = torch.where(draw < keep_probability, rows / keep_probability, torch.zeros_like(rows))
    return kept.reshape(task_vector.shape)


# ---------------------------------------------------------------------------------------------------- SVD methods


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of ``matrix`` = P Σ Qᵀ (thin SVD): the nearest matrix with orthonormal
    columns (or rows, if it is wide) in Frobenius norm. TSV-Merge and Iso-CTS use it to decorrelate the
    singular vectors stacked from several tasks."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_rank(rank: int, rank_fraction: float) -> int:
    """Singular directions kept per task: ⌊rank · rank_fraction⌋, as the reference computes it (for the default
    fraction 1/T this is ⌊rank / T⌋)."""
    return int(rank * rank_fraction)


def tsv_merge(task_matrices: Iterable[torch.Tensor], rank_fraction: float) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al., CVPR 2025) of one 2-D weight matrix, before scaling by α.

    Each task matrix τ_t (shape (m, n), rank r = min(m, n)) is reduced to its k = ⌊r · rank_fraction⌋ leading
    singular triplets U_t,k Σ_t,k V_t,kᵀ (default fraction 1/T, so the T tasks fill the rank). With
    U = [U_1,k … U_T,k], Σ = diag(Σ_1,k … Σ_T,k), V = [V_1,k … V_T,k], the merged update is
    polar(U) Σ polar(Vᵀ), where polar(A) = P Qᵀ for A = P S Qᵀ (the reference's U_orth = P Qᵀ). When the tasks'
    directions are already orthonormal across tasks this is Σ_t U_t,k Σ_t,k V_t,kᵀ, i.e. task arithmetic of the
    truncated task matrices. ``task_matrices`` is consumed one at a time, so only the truncated factors of the
    tasks seen so far are held. If k = 0 (rank < 1 / rank_fraction) the update is zero, as in the reference.
    """
    us, ss, vhs = [], [], []
    shape = None
    for tau in task_matrices:
        shape = tau.shape
        k = tsv_rank(min(tau.shape), rank_fraction)
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
        del u, s, vh
    if shape is None:
        raise ValueError("tsv_merge needs at least one task matrix")
    u_all, s_all, vh_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    if s_all.numel() == 0:
        return torch.zeros(shape, dtype=u_all.dtype)
    return polar_factor(u_all) @ torch.diag(s_all) @ polar_factor(vh_all)


def iso_c_merge(summed: torch.Tensor) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025) of one 2-D weight matrix, before scaling by α.

    With Σ_t τ_t = U S Vᵀ (thin SVD, r = min(m, n) singular values), the update is mean(S) · U Vᵀ: the task
    arithmetic directions with a flat (isotropic) spectrum. The mean runs over all r singular values.
    """
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common, per_task) subspace sizes of Iso-CTS, as the reference computes them: common = ⌊rank · fraction⌋,
    then the remainder is rounded (Python's round, half to even) to a multiple of T and common takes the rest,
    so common + T · per_task = rank."""
    common = int(rank * common_fraction)
    per_task = round((rank - common) / num_tasks)
    if per_task * num_tasks > rank:  # can only happen with a tiny common fraction; keep the sizes within the rank
        per_task = rank // num_tasks
    return rank - per_task * num_tasks, per_task


def iso_cts_merge(task_matrices: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025) of one 2-D weight matrix, before scaling by α.

    1. Common subspace: the ``common`` leading singular triplets U_c, S_c, V_c of Σ_t τ_t (sizes from
       :func:`iso_cts_sizes`; default common_fraction 0.8).
    2. Task-specific subspaces: for each task, the ``per_task`` leading singular triplets of
       τ_t − U_c U_cᵀ τ_t (its part outside the common left subspace).
    3. Stack U = [U_1 … U_T, U_c], V likewise, and S; orthogonalise U and Vᵀ with the polar factor as TSV-Merge
       does, and replace every singular value by mean(S) (over all rank = common + T · per_task values).

    Update: mean(S) · polar(U) polar(Vᵀ). Holds all T task matrices of the tensor, as TIES does.
    """
    num_tasks = len(task_matrices)
    common, per_task = iso_cts_sizes(min(task_matrices[0].shape), num_tasks, common_fraction)
    summed = torch.stack(list(task_matrices)).sum(dim=0)
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common]
    del u, s, vh, summed
    us, ss, vhs = [], [], []
    for tau in task_matrices:
        specific = tau - u_common @ (u_common.T @ tau)
        u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    u_all = torch.cat([*us, u_common], dim=1)
    s_all = torch.cat([*ss, s_common])
    vh_all = torch.cat([*vhs, vh_common], dim=0)
    return s_all.mean() * (polar_factor(u_all) @ polar_factor(vh_all))
