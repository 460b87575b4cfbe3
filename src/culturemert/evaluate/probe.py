"""MARBLE-protocol probing, with every probe of a sweep trained at once as one batched model.

Protocol (MARBLE "constrained" track, v1 code; see docs/evaluation.md):

* probe = Linear(D -> hidden) -> ReLU -> Dropout(p) -> Linear(hidden -> n_tags), BCE-with-logits, Adam (no
  weight decay), batch 64 chunks, ReduceLROnPlateau(mode=max, factor 0.5, patience 3) and early stopping
  (patience 10) on validation macro ROC-AUC, best-validation checkpoint kept for testing;
* input = one hidden state, or a learned softmax-weighted sum of hidden states (weights initialised randn);
* train on chunks (each chunk carries its track's tags); validation/test track logits = mean of its chunks'
  logits; metrics at track level;
* grid = layers x learning rates x seeds; every selection (layer, lr, epoch) uses validation only; test
  numbers are reported for the validation-selected configuration, mean and std over seeds.

Batching. The parameters of all P probes are stacked along a leading dimension and trained with ``bmm``;
Adam is elementwise, so one Adam over the stacked tensors *is* per-probe Adam once the learning rate is a
per-probe tensor. ReduceLROnPlateau, early stopping and checkpointing are per-probe state vectors; stopped
probes are removed from the stack at the end of the epoch. The backward pass of the two-layer MLP is written out
(:func:`_loss_gradients`, checked against autograd in the tests) so that gradients and step temporaries live in
reused buffers: autograd would allocate ~2 GB per step for a 390-probe MTAT sweep, and on CPU the page faults of
those fresh allocations cost as much as the arithmetic. Randomness is drawn per seed, not per probe: all
probes that share a seed share their initial MLP weights, their data order and their dropout masks (common
random numbers across layers and learning rates). Hence a probe trained alone with the same seed sees exactly
the same numbers, which :func:`train_probe_reference` (plain ``nn.Linear`` + ``torch.optim.Adam`` +
``ReduceLROnPlateau``) proves in the tests.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from culturemert.config import StrictModel, load_config
from culturemert.errors import ConfigError
from culturemert.evaluate.features import ProbeData, SplitFeatures, load_probe_data
from culturemert.runtime import derive_seed, resolve_device
from culturemert.evaluate.metrics import METRIC_NAMES, batched_macro_roc_auc, tagging_scores

log = logging.getLogger(__name__)

__all__ = [
    "MARBLE_LRS",
    "ProbeSettings",
    "ProbeConfig",
    "ProbeSpec",
    "ProbeOutcome",
    "make_specs",
    "train_probes",
    "train_probe_reference",
    "summarise",
    "run_probe",
    "run_probe_config",
]

#: The MARBLE constrained-track learning-rate grid.
MARBLE_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
WEIGHTED = "weighted"


class ProbeSettings(StrictModel):
    """Everything that defines a probe sweep (the training half of a probe config)."""

    layers: Literal["all"] | list[int] = "all"
    weighted_sum: bool = True
    #: hidden states entering the weighted sum: "transformer" = 1..L (MARBLE v1 drops the conv-feature state 0)
    weighted_sum_layers: Literal["transformer", "all"] | list[int] = "transformer"
    lrs: list[float] = Field(default_factory=lambda: list(MARBLE_LRS))
    seeds: int = Field(default=5, ge=1)
    seed: int = 1234  # MARBLE's seed; seed i of the sweep is seed + i
    batch_size: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)  # early stopping on validation ROC-AUC
    lr_patience: int = Field(default=3, ge=0)  # ReduceLROnPlateau
    lr_factor: float = Field(default=0.5, gt=0, lt=1)
    lr_threshold: float = Field(default=1e-4, ge=0)  # torch's default relative threshold
    min_lr: float = Field(default=0.0, ge=0)
    hidden: int = Field(default=512, ge=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    selection_metric: Literal["roc_auc", "ap", "roc_auc+ap"] = "roc_auc"
    threshold: float = Field(default=0.5, gt=0, lt=1)  # F1 decision threshold on sigmoid outputs
    std_ddof: int = Field(default=1, ge=0)  # sample std over seeds
    device: str = "auto"
    #: bound on floats held by one [probes, chunks, D] evaluation block (memory knob, no effect on results)
    eval_block_floats: int = Field(default=64_000_000, ge=1_000)

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, value: list[float]) -> list[float]:
        if not value or any(lr <= 0 for lr in value):
            raise ValueError("lrs must be a non-empty list of positive learning rates")
        return value


class ProbeConfig(ProbeSettings):
    """``culturemert probe CONFIG``: features produced by ``embed`` plus the sweep settings."""

    features: Path  # a consolidated features folder written by embed (contains meta.json)
    out: Path | None = None  # results folder; default: <features>/probe
    model_name: str | None = None  # label in reports; default: the model recorded by embed


# --------------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of the grid: ``layer`` is a hidden-state index or ``"weighted"``."""

    layer: int | str
    lr: float
    seed: int


def make_specs(settings: ProbeSettings, num_layers: int) -> list[ProbeSpec]:
    """The grid (single layers, then the weighted sum) x lrs x seeds, in a fixed order."""
    layers = list(range(num_layers)) if settings.layers == "all" else list(settings.layers)
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layers: {layer} out of range, the features have hidden states 0..{num_layers - 1}")
    choices: list[int | str] = list(layers) + ([WEIGHTED] if settings.weighted_sum else [])
    if not choices:
        raise ConfigError("layers is empty and weighted_sum is false: nothing to probe")
    seeds = [settings.seed + i for i in range(settings.seeds)]
    return [ProbeSpec(layer, float(lr), seed) for layer in choices for lr in settings.lrs for seed in seeds]


def weighted_sum_layers(settings: ProbeSettings, num_layers: int) -> list[int]:
    if settings.weighted_sum_layers == "all" or (settings.weighted_sum_layers == "transformer" and num_layers == 1):
        return list(range(num_layers))
    if settings.weighted_sum_layers == "transformer":
        return list(range(1, num_layers))
    for layer in settings.weighted_sum_layers:
        if not 0 <= layer < num_layers:
            raise ConfigError(f"weighted_sum_layers: {layer} out of range 0..{num_layers - 1}")
    return list(settings.weighted_sum_layers)


# --------------------------------------------------------------------------------------------------------
# per-seed randomness shared by the batched trainer and the reference


def _derived_seed(seed: int, purpose: str) -> int:
    return derive_seed("culturemert-probe", seed, purpose, sep=":")


def _initial_weights(seed: int, dim: int, hidden: int, num_tags: int, n_weighted: int) -> dict[str, torch.Tensor]:
    """nn.Linear's default init (U(+-1/sqrt(fan_in)) for weight and bias), drawn from the seed; randn layer logits."""
    g = torch.Generator().manual_seed(_derived_seed(seed, "init"))
    b1, b2 = 1.0 / math.sqrt(dim), 1.0 / math.sqrt(hidden)
    w1 = (torch.rand(dim, hidden, generator=g, dtype=torch.float64) * 2 - 1) * b1
    bias1 = (torch.rand(hidden, generator=g, dtype=torch.float64) * 2 - 1) * b1
    w2 = (torch.rand(hidden, num_tags, generator=g, dtype=torch.float64) * 2 - 1) * b2
    bias2 = (torch.rand(num_tags, generator=g, dtype=torch.float64) * 2 - 1) * b2
    gw = torch.Generator().manual_seed(_derived_seed(seed, "layer-weights"))
    layer_logits = torch.randn(max(n_weighted, 1), generator=gw, dtype=torch.float64)
    return {k: v.float() for k, v in dict(w1=w1, b1=bias1, w2=w2, b2=bias2, layer_logits=layer_logits).items()}


class _SeedStreams:
    """Data order (CPU generator) and dropout masks (device generator) of one seed."""

    def __init__(self, seed: int, device: torch.device):
        self.order = torch.Generator().manual_seed(_derived_seed(seed, "order"))
        self.dropout = torch.Generator(device=device).manual_seed(_derived_seed(seed, "dropout"))
        self.device = device

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.order)

    def dropout_mask(self, rows: int, hidden: int, p: float) -> torch.Tensor | None:
        if p <= 0:
            return None
        keep = torch.rand(rows, hidden, generator=self.dropout, device=self.device) >= p
        return keep.float() / (1.0 - p)


# --------------------------------------------------------------------------------------------------------
# results of one probe


@dataclass
class ProbeOutcome:
    spec: ProbeSpec
    best_epoch: int
    epochs_run: int
    best_valid_auc: float
    final_lr: float
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] | None = None
    layer_weights: list[float] | None = None  # softmax weights of a weighted-sum probe (its best checkpoint)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spec"] = asdict(self.spec)
        return out


# --------------------------------------------------------------------------------------------------------
# the batched trainer


class _Workspace:
    """Step buffers reused across steps. On CPU a fresh multi-megabyte tensor per step costs page faults that rival
    the arithmetic itself (a 390-probe sweep allocates ~2 GB per step otherwise), so every large temporary of the
    training step lives here; a request returns a view of a flat buffer that only grows."""

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._flat[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(*shape)


class _ProbeStack:
    """Stacked parameters, gradients and Adam state of the active probes."""

    def __init__(self, params: dict[str, torch.Tensor], workspace: _Workspace):
        self.params = {k: v.clone() for k, v in params.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}
        self.workspace = workspace

    def grad(self, name: str) -> torch.Tensor:
        return self.workspace(f"grad.{name}", self.params[name].shape)

    def select(self, keep: torch.Tensor) -> None:
        for store in (self.params, self.exp_avg, self.exp_avg_sq):
            for k in store:
                store[k] = store[k][keep]


def _forward(
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    dropout_masks: torch.Tensor | None,
) -> torch.Tensor:
    """inputs [P, B, D] -> logits [P, B, K]."""
    h = torch.baddbmm(params["b1"].unsqueeze(1), inputs, params["w1"]).relu()
    if dropout_masks is not None:
        h = h * dropout_masks
    return torch.baddbmm(params["b2"].unsqueeze(1), h, params["w2"])


def _loss_gradients(
    stack: _ProbeStack,
    inputs: torch.Tensor,
    weighted_inputs: torch.Tensor | None,
    dropout_masks: torch.Tensor | None,
    targets: torch.Tensor,
    n_single: int,
) -> None:
    """Forward + backward of every probe's mean BCE, written out so each gradient lands in a reused buffer.

    ``inputs`` [P, B, D] are the probe inputs (rows n_single.. are the weighted sums of ``weighted_inputs``
    [P - n_single, B, Lw, D]); ``targets`` [P, B, K]. The operations and their order are those autograd runs for
    :func:`_forward` + ``binary_cross_entropy_with_logits`` (mean), so the numbers agree with the reference
    probe to float rounding (tested); autograd itself would allocate every gradient afresh each step.
    """
    p, ws = stack.params, stack.workspace
    n_probes, batch, _ = inputs.shape
    hidden = p["w1"].shape[2]
    pre = torch.baddbmm(p["b1"].unsqueeze(1), inputs, p["w1"], out=ws("pre", (n_probes, batch, hidden)))
    h = torch.clamp_min(pre, 0, out=ws("h", pre.shape))  # relu
    if dropout_masks is not None:
        h.mul_(dropout_masks)
    logits = torch.baddbmm(p["b2"].unsqueeze(1), h, p["w2"])
    dlogits = logits.sigmoid_().sub_(targets).div_(logits.shape[1] * logits.shape[2])
    torch.sum(dlogits, 1, out=stack.grad("b2"))
    torch.bmm(h.transpose(1, 2), dlogits, out=stack.grad("w2"))
    dh = torch.bmm(dlogits, p["w2"].transpose(1, 2), out=ws("dh", pre.shape))
    if dropout_masks is not None:
        dh.mul_(dropout_masks)
    dh.masked_fill_(torch.le(pre, 0, out=ws("relu_off", pre.shape, torch.bool)), 0.0)
    torch.sum(dh, 1, out=stack.grad("b1"))
    torch.bmm(inputs.transpose(1, 2), dh, out=stack.grad("w1"))
    if weighted_inputs is not None:
        d_inputs = torch.bmm(dh[n_single:], p["w1"][n_single:].transpose(1, 2))
        d_weights = torch.einsum("pbd,pbld->pl", d_inputs, weighted_inputs)
        weights = torch.softmax(p["layer_logits"][n_single:], dim=-1)
        grad_logits = stack.grad("layer_logits")
        grad_logits[:n_single] = 0.0
        grad_logits[n_single:] = weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True))


def _adam_step(stack: _ProbeStack, names: Sequence[str], lr_over_bc1: torch.Tensor, bc2_sqrt: float,
               betas: tuple[float, float], eps: float) -> None:
    """torch.optim.Adam's single-tensor update with a per-probe learning rate, in place; the gradient buffer
    doubles as the scratch space for the denominator (it is not needed once the moments are updated)."""
    beta1, beta2 = betas
    for name in names:
        param, grad = stack.params[name], stack.grad(name)
        m, v = stack.exp_avg[name], stack.exp_avg_sq[name]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = torch.sqrt(v, out=grad).div_(bc2_sqrt).add_(eps)
        update = torch.div(m, denom, out=denom)
        update.mul_(lr_over_bc1.view(-1, *([1] * (param.dim() - 1))))
        param.sub_(update)


def _probe_inputs(
    x: torch.Tensor,
    single_layer: torch.Tensor,
    n_single: int,
    layer_logits: torch.Tensor,
    ws_layers: torch.Tensor,
) -> torch.Tensor:
    """Input vectors [P, B, D] of every probe for evaluation chunks ``x`` [B, L, D] shared by all probes.

    Probes 0..n_single-1 read one layer; the rest a softmax-weighted sum over ``ws_layers``. (Training batches,
    which differ per seed, go through :func:`_training_inputs`.)
    """
    parts = []
    if n_single:
        parts.append(x[:, single_layer, :].transpose(0, 1))
    if layer_logits.shape[0] > n_single:
        weights = torch.softmax(layer_logits[n_single:], dim=-1)
        parts.append(torch.einsum("pl,bld->pbd", weights, x[:, ws_layers, :]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _training_inputs(
    xb: torch.Tensor,
    row_of_probe: torch.Tensor,
    single_layer: torch.Tensor,
    n_single: int,
    layer_logits: torch.Tensor,
    ws_layers: torch.Tensor,
    workspace: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [P, B, D] inputs of one training batch (``xb`` [S, B, L, D] holds each seed's batch) gathered into a
    reused buffer, and the [P_w, B, L_w, D] layers the weighted-sum probes mix (None when there are none)."""
    seeds, batch, num_layers, dim = xb.shape
    n_probes = row_of_probe.shape[0]
    inputs = workspace("inputs", (n_probes, batch, dim))
    if n_single:
        by_seed_layer = xb.transpose(1, 2).reshape(seeds * num_layers, batch, dim)
        torch.index_select(by_seed_layer, 0, row_of_probe[:n_single] * num_layers + single_layer, out=inputs[:n_single])
    if n_single == n_probes:
        return inputs, None
    weighted_inputs = xb[:, :, ws_layers, :][row_of_probe[n_single:]]
    weights = torch.softmax(layer_logits[n_single:], dim=-1)
    inputs[n_single:] = torch.einsum("pl,pbld->pbd", weights, weighted_inputs)
    return inputs, weighted_inputs


@torch.no_grad()
def _track_logits(
    params: dict[str, torch.Tensor],
    split: SplitFeatures,
    single_layer: torch.Tensor,
    n_single: int,
    ws_layers: torch.Tensor,
    device: torch.device,
    block_floats: int,
) -> torch.Tensor:
    """[P, N, K] track logits = mean of chunk logits (dropout off), computed block of tracks by block."""
    n_probes = params["w1"].shape[0]
    dim = split.features.shape[2]
    max_chunks = max(1, block_floats // max(1, n_probes * dim))
    out = torch.empty(n_probes, split.num_tracks, params["b2"].shape[1], device=device)
    starts = split.chunk_start.tolist()
    t0 = 0
    while t0 < split.num_tracks:
        t1 = t0 + 1
        while t1 < split.num_tracks and starts[t1 + 1] - starts[t0] <= max_chunks:
            t1 += 1
        c0, c1 = starts[t0], starts[t1]
        x = split.features[c0:c1].to(device, non_blocking=True)
        logits = _forward(params, _probe_inputs(x, single_layer, n_single, params["layer_logits"], ws_layers), None)
        # Averaging matrix instead of index_add: deterministic on GPU as well.
        owner = split.chunk_track[c0:c1].to(device) - t0
        avg = torch.zeros(t1 - t0, c1 - c0, device=device)
        avg[owner, torch.arange(c1 - c0, device=device)] = 1.0
        avg = avg / avg.sum(1, keepdim=True)
        out[:, t0:t1] = torch.matmul(avg, logits)
        t0 = t1
    return out


def _metric_dicts(labels: torch.Tensor, logits: torch.Tensor, vocabulary: list[str], threshold: float):
    results, excluded = [], []
    y = labels.double().cpu()
    for p in range(logits.shape[0]):
        scores = tagging_scores(y, logits[p].double().cpu(), vocabulary, threshold)
        results.append(scores.as_dict())
        excluded = scores.excluded_tags
    return results, excluded


def train_probes(
    data: ProbeData,
    specs: Sequence[ProbeSpec],
    settings: ProbeSettings,
    *,
    progress: bool = True,
    evaluate_test: bool = True,
) -> tuple[list[ProbeOutcome], dict[str, list[str]]]:
    """Train every probe of ``specs`` together; returns one outcome per spec (same order) and the tags
    excluded from macro averages per split."""
    from tqdm.auto import tqdm

    device = resolve_device(settings.device)
    num_layers, dim, num_tags = data.num_layers, data.dim, data.num_tags
    ws_list = weighted_sum_layers(settings, num_layers)
    # internal order: single-layer probes first, then weighted ones
    order = sorted(range(len(specs)), key=lambda i: specs[i].layer == WEIGHTED)
    internal = [specs[i] for i in order]
    n_single = sum(1 for s in internal if s.layer != WEIGHTED)
    seeds = sorted({s.seed for s in internal})
    seed_row = torch.tensor([seeds.index(s.seed) for s in internal], dtype=torch.long)
    single_layer = torch.tensor([int(s.layer) for s in internal[:n_single]], dtype=torch.long)
    for layer in single_layer.tolist():
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layer {layer} out of range 0..{num_layers - 1}")
    init = {s: _initial_weights(s, dim, settings.hidden, num_tags, len(ws_list)) for s in seeds}
    params = {k: torch.stack([init[s.seed][k] for s in internal]).to(device) for k in init[seeds[0]]}
    workspace = _Workspace(device)
    stack = _ProbeStack(params, workspace)
    n_total = len(internal)
    ids = torch.arange(n_total)  # original (internal) index of each active probe
    lr = torch.tensor([s.lr for s in internal], dtype=torch.float64)
    plateau_best = torch.full((n_total,), -math.inf, dtype=torch.float64)
    plateau_bad = torch.zeros(n_total, dtype=torch.long)
    stop_best = torch.full((n_total,), -math.inf, dtype=torch.float64)
    stop_wait = torch.zeros(n_total, dtype=torch.long)
    best_auc = torch.full((n_total,), -math.inf, dtype=torch.float64)
    best_epoch = torch.zeros(n_total, dtype=torch.long)
    epochs_run = torch.zeros(n_total, dtype=torch.long)
    final_lr = lr.clone()
    best_params = {k: v.detach().clone() for k, v in stack.params.items()}
    streams = [_SeedStreams(s, device) for s in seeds]

    train_x = data.train.features.to(device)
    train_y = data.train.labels.to(device=device, dtype=torch.float32)[data.train.chunk_track.to(device)]
    valid_labels = data.valid.labels
    ws_layers = torch.tensor(ws_list, dtype=torch.long, device=device)
    single_dev = single_layer.to(device)
    beta1, beta2 = settings.adam_betas
    n_chunks = train_x.shape[0]
    step = 0
    bar = tqdm(total=settings.max_epochs, desc=f"probe x{n_total}", unit="epoch", disable=not progress)
    for epoch in range(1, settings.max_epochs + 1):
        perms = torch.stack([st.permutation(n_chunks) for st in streams]).to(device)
        rows = seed_row[ids].to(device)
        n_single_active = int((ids < n_single).sum())
        active_layers = single_dev[ids[:n_single_active].to(device)]
        lr_dev = lr[ids].to(device=device, dtype=torch.float32)
        # layer logits train only while weighted-sum probes are active (autograd: zero rows for single-layer probes)
        trained = ["w1", "b1", "w2", "b2"] + (["layer_logits"] if n_single_active < ids.numel() else [])
        for start in range(0, n_chunks, settings.batch_size):
            idx = perms[:, start : start + settings.batch_size]  # [S, B]
            xb, yb = train_x[idx], train_y[idx]
            batch = idx.shape[1]
            drop = None
            if settings.dropout > 0:
                masks = torch.stack([st.dropout_mask(batch, settings.hidden, settings.dropout) for st in streams])
                drop = torch.index_select(masks, 0, rows, out=workspace("dropout", (rows.shape[0], batch, settings.hidden)))
            inputs, weighted_inputs = _training_inputs(
                xb, rows, active_layers, n_single_active, stack.params["layer_logits"], ws_layers, workspace
            )
            targets = torch.index_select(yb, 0, rows, out=workspace("targets", (rows.shape[0], batch, num_tags)))
            _loss_gradients(stack, inputs, weighted_inputs, drop, targets, n_single_active)
            step += 1
            bc1 = 1 - beta1**step
            _adam_step(stack, trained, lr_dev / bc1, math.sqrt(1 - beta2**step), settings.adam_betas,
                       settings.adam_eps)
        # ---- end of epoch: validation, checkpoint, plateau, early stopping
        auc = _valid_auc(stack.params, data.valid, active_layers, n_single_active, ws_layers, device, settings)
        epochs_run[ids] = epoch
        improved = auc > best_auc[ids]
        if improved.any():
            sel = improved.nonzero().squeeze(1)
            for k in best_params:
                best_params[k][ids[sel].to(device)] = stack.params[k].detach()[sel.to(device)]
            best_auc[ids[sel]] = auc[sel]
            best_epoch[ids[sel]] = epoch
        # ReduceLROnPlateau (torch semantics: mode max, relative threshold, cooldown 0)
        better = auc > plateau_best[ids] * (1 + settings.lr_threshold)
        better |= torch.isinf(plateau_best[ids])
        plateau_best[ids] = torch.where(better, auc, plateau_best[ids])
        plateau_bad[ids] = torch.where(better, torch.zeros_like(plateau_bad[ids]), plateau_bad[ids] + 1)
        reduce = plateau_bad[ids] > settings.lr_patience
        if reduce.any():
            old = lr[ids]
            new = torch.clamp(old * settings.lr_factor, min=settings.min_lr)
            apply = reduce & (old - new > 1e-8)
            lr[ids] = torch.where(apply, new, old)
            plateau_bad[ids] = torch.where(reduce, torch.zeros_like(plateau_bad[ids]), plateau_bad[ids])
        final_lr[ids] = lr[ids]
        # EarlyStopping (Lightning semantics: strict improvement, stop when wait >= patience)
        es_improved = auc > stop_best[ids]
        stop_best[ids] = torch.where(es_improved, auc, stop_best[ids])
        stop_wait[ids] = torch.where(es_improved, torch.zeros_like(stop_wait[ids]), stop_wait[ids] + 1)
        keep = stop_wait[ids] < settings.patience
        bar.update(1)
        bar.set_postfix(active=int(keep.sum()), best_auc=f"{float(best_auc.max()):.4f}")
        if not keep.all():
            ids = ids[keep]
            stack.select(keep.to(device))
        if ids.numel() == 0:
            break
    bar.close()

    # ---- evaluate every probe's best checkpoint
    best_params = {k: v for k, v in best_params.items()}
    valid_logits = _track_logits(best_params, data.valid, single_dev, n_single, ws_layers, device, settings.eval_block_floats)
    valid_metrics, valid_excluded = _metric_dicts(valid_labels, valid_logits, data.vocabulary, settings.threshold)
    excluded = {"valid": valid_excluded}
    test_metrics: list[dict[str, float] | None] = [None] * n_total
    if evaluate_test and data.test is not None:
        test_logits = _track_logits(best_params, data.test, single_dev, n_single, ws_layers, device, settings.eval_block_floats)
        tm, excluded["test"] = _metric_dicts(data.test.labels, test_logits, data.vocabulary, settings.threshold)
        test_metrics = list(tm)
    layer_weights = torch.softmax(best_params["layer_logits"].double(), dim=-1).cpu()
    outcomes_internal = []
    for i, spec in enumerate(internal):
        outcomes_internal.append(
            ProbeOutcome(
                spec=spec,
                best_epoch=int(best_epoch[i]),
                epochs_run=int(epochs_run[i]),
                best_valid_auc=float(best_auc[i]),
                final_lr=float(final_lr[i]),
                valid=valid_metrics[i],
                test=test_metrics[i],
                layer_weights=layer_weights[i].tolist() if spec.layer == WEIGHTED else None,
            )
        )
    outcomes: list[ProbeOutcome] = [None] * len(specs)  # type: ignore[list-item]
    for pos, original in enumerate(order):
        outcomes[original] = outcomes_internal[pos]
    return outcomes, excluded


def _valid_auc(params, split, single_layers, n_single, ws_layers, device, settings) -> torch.Tensor:
    logits = _track_logits(
        {k: v.detach() for k, v in params.items()}, split, single_layers, n_single, ws_layers, device,
        settings.eval_block_floats,
    )
    labels = split.labels.to(device)
    chunks = []
    block = max(1, 2_000_000 // max(1, labels.numel()))
    for p0 in range(0, logits.shape[0], block):
        chunks.append(batched_macro_roc_auc(labels, logits[p0 : p0 + block]).cpu())
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------------------------
# the plain one-probe reference (tests, and the sequential baseline of bench/probe.py)


class _ReferenceProbe(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, num_tags: int, layer: int | str, ws_layers: list[int]):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, num_tags)
        self.layer = layer
        self.ws_layers = ws_layers
        if layer == WEIGHTED:
            self.layer_logits = torch.nn.Parameter(torch.zeros(len(ws_layers)))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == WEIGHTED:
            return torch.einsum("l,bld->bd", torch.softmax(self.layer_logits, -1), x[:, self.ws_layers, :])
        return x[:, int(self.layer), :]

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.fc1(self.inputs(x)))
        if dropout_mask is not None:
            h = h * dropout_mask
        return self.fc2(h)


def train_probe_reference(
    data: ProbeData, spec: ProbeSpec, settings: ProbeSettings, *, evaluate_test: bool = True
) -> ProbeOutcome:
    """Train one probe the ordinary way (nn.Linear, torch.optim.Adam, ReduceLROnPlateau, a best-state copy).

    Draws the same per-seed random numbers as :func:`train_probes`, so both must agree to float rounding.
    """
    device = resolve_device(settings.device)
    ws_list = weighted_sum_layers(settings, data.num_layers)
    init = _initial_weights(spec.seed, data.dim, settings.hidden, data.num_tags, len(ws_list))
    model = _ReferenceProbe(data.dim, settings.hidden, data.num_tags, spec.layer, ws_list)
    with torch.no_grad():
        model.fc1.weight.copy_(init["w1"].T)
        model.fc1.bias.copy_(init["b1"])
        model.fc2.weight.copy_(init["w2"].T)
        model.fc2.bias.copy_(init["b2"])
        if spec.layer == WEIGHTED:
            model.layer_logits.copy_(init["layer_logits"])
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=settings.adam_betas, eps=settings.adam_eps)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=settings.lr_factor, patience=settings.lr_patience,
        threshold=settings.lr_threshold, min_lr=settings.min_lr,
    )
    streams = _SeedStreams(spec.seed, device)
    train_x = data.train.features.to(device)
    train_y = data.train.labels.to(device=device, dtype=torch.float32)[data.train.chunk_track.to(device)]
    n = train_x.shape[0]
    best_auc, best_epoch, best_state, stop_best, wait, epochs_run = -math.inf, 0, None, -math.inf, 0, 0

    def split_logits(split: SplitFeatures) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            chunk_logits = model(split.features.to(device))
            sums = torch.zeros(split.num_tracks, data.num_tags, device=device)
            sums.index_add_(0, split.chunk_track.to(device), chunk_logits)
            counts = torch.bincount(split.chunk_track.to(device), minlength=split.num_tracks).unsqueeze(1)
        model.train()
        return sums / counts

    for epoch in range(1, settings.max_epochs + 1):
        perm = streams.permutation(n).to(device)
        for start in range(0, n, settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            mask = streams.dropout_mask(idx.shape[0], settings.hidden, settings.dropout)
            loss = F.binary_cross_entropy_with_logits(model(train_x[idx], mask), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epochs_run = epoch
        auc = float(batched_macro_roc_auc(data.valid.labels.to(device), split_logits(data.valid).unsqueeze(0))[0])
        if auc > best_auc:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(model.state_dict())
        scheduler.step(auc)
        if auc > stop_best:
            stop_best, wait = auc, 0
        else:
            wait += 1
        if wait >= settings.patience:
            break
    final_lr = optimizer.param_groups[0]["lr"]
    assert best_state is not None
    model.load_state_dict(best_state)
    valid = tagging_scores(data.valid.labels, split_logits(data.valid).cpu(), data.vocabulary, settings.threshold)
    test = None
    if evaluate_test and data.test is not None:
        test = tagging_scores(data.test.labels, split_logits(data.test).cpu(), data.vocabulary, settings.threshold).as_dict()
    weights = torch.softmax(model.layer_logits.detach().double(), -1).cpu().tolist() if spec.layer == WEIGHTED else None
    return ProbeOutcome(spec, best_epoch, epochs_run, best_auc, float(final_lr), valid.as_dict(), test, weights)


# --------------------------------------------------------------------------------------------------------
# selection and summaries (validation only)


def _selection_value(metrics: dict[str, float], metric: str) -> float:
    if metric == "roc_auc+ap":
        return 0.5 * (metrics["roc_auc"] + metrics["ap"])
    return metrics[metric]


def _mean_std(values: list[float], ddof: int) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=ddof)) if arr.size > ddof else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr]}


def summarise(outcomes: Sequence[ProbeOutcome], settings: ProbeSettings) -> dict[str, Any]:
    """Validation-only selection.

    For each layer choice the lr with the best seed-mean validation score is kept (the layer curve); the
    overall selection is the best (layer choice, lr) by the same criterion. Test numbers of the selected
    configurations are reported, never used.
    """
    groups: dict[tuple[str, float], list[ProbeOutcome]] = {}
    for o in outcomes:
        groups.setdefault((str(o.spec.layer), o.spec.lr), []).append(o)

    def describe(key: tuple[str, float], members: list[ProbeOutcome]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": key[0],
            "lr": key[1],
            "seeds": [o.spec.seed for o in members],
            "selection_score": float(np.mean([_selection_value(o.valid, settings.selection_metric) for o in members])),
            "valid": {m: _mean_std([o.valid[m] for o in members], settings.std_ddof) for m in METRIC_NAMES},
            "best_epochs": [o.best_epoch for o in members],
        }
        if all(o.test is not None for o in members):
            out["test"] = {m: _mean_std([o.test[m] for o in members], settings.std_ddof) for m in METRIC_NAMES}  # type: ignore[index]
        if members[0].layer_weights is not None:
            out["layer_weights_mean"] = np.mean([o.layer_weights for o in members], axis=0).tolist()
        return out

    described = {key: describe(key, members) for key, members in groups.items()}
    per_layer: dict[str, dict[str, Any]] = {}
    for key, info in described.items():
        current = per_layer.get(key[0])
        if current is None or info["selection_score"] > current["selection_score"]:
            per_layer[key[0]] = info
    selected = max(per_layer.values(), key=lambda info: info["selection_score"])
    singles = [v for k, v in per_layer.items() if k != WEIGHTED]
    return {
        "selection_metric": settings.selection_metric,
        "selected": selected,
        "best_single_layer": max(singles, key=lambda i: i["selection_score"]) if singles else None,
        "weighted_sum": per_layer.get(WEIGHTED),
        "layers": per_layer,
        "grid": list(described.values()),
    }


# --------------------------------------------------------------------------------------------------------
# entry points


def run_probe(
    data: ProbeData,
    settings: ProbeSettings,
    *,
    progress: bool = True,
    evaluate_test: bool = True,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the whole grid, select on validation, return the JSON-serialisable results."""
    specs = make_specs(settings, data.num_layers)
    t0 = time.perf_counter()
    outcomes, excluded = train_probes(data, specs, settings, progress=progress, evaluate_test=evaluate_test)
    elapsed = time.perf_counter() - t0
    summary = summarise(outcomes, settings)
    return {
        **(context or {}),
        "vocabulary": data.vocabulary,
        "num_tracks": {
            "train": data.train.num_tracks,
            "valid": data.valid.num_tracks,
            **({"test": data.test.num_tracks} if data.test is not None and evaluate_test else {}),
        },
        "num_layers": data.num_layers,
        "excluded_tags": excluded,
        "settings": settings.model_dump(mode="json"),
        "train_seconds": elapsed,
        "summary": summary,
        "probes": [o.as_dict() for o in outcomes],
    }


def run_probe_config(config: ProbeConfig | str | Path, *, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """``culturemert probe CONFIG``: load features, run the sweep, write ``results.json``; returns (results, path)."""
    from culturemert.files import write_json_atomic

    if not isinstance(config, ProbeConfig):
        config = load_config(config, ProbeConfig)
    data, meta = load_probe_data(config.features, require_test=True)
    settings = ProbeSettings.model_validate(config.model_dump(exclude={"features", "out", "model_name"}))
    context = {
        "model": config.model_name or meta.get("model", "unknown"),
        "model_fingerprint": meta.get("model_fingerprint"),
        "dataset": meta.get("dataset", Path(config.features).name),
        "features": str(config.features),
    }
    results = run_probe(data, settings, progress=progress, context=context)
    out_dir = Path(config.out) if config.out is not None else Path(config.features) / "probe"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    write_json_atomic(path, results)
    return results, path


def results_digest(results: dict[str, Any]) -> str:
    """Hash of the per-probe numbers (used to check determinism)."""
    return hashlib.sha256(json.dumps(results["probes"], sort_keys=True).encode()).hexdigest()
