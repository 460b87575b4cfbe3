"""Probing protocols (MARBLE v1 and CultureMERT's), with every probe of a sweep trained at once as one batched model.

Protocol ``marble`` (MARBLE "constrained" track, v1 code; see docs/evaluation.md for all protocols):

* probe = Linear(D -> hidden) -> ReLU -> Dropout(p) -> Linear(hidden -> n_tags), BCE-with-logits, Adam (no
  weight decay), ReduceLROnPlateau(mode=max, factor 0.5, patience 3) and early stopping (patience 10) on
  validation macro ROC-AUC, best-validation checkpoint kept for testing;
* a training step takes ``batch_size`` (64) *tracks* with all their windows: MARBLE's feature dataset returns one
  track's windows each carrying the track's labels and its collate function stacks them, so the BCE is the
  mean over every window of the batch (``benchmark/tasks/MTT/MTT_dataset.py`` ``train_collate_fn``,
  ``benchmark/models/probers.py`` ``training_step``); an epoch is one pass over the tracks;
* input = one hidden state, or a learned softmax-weighted sum of hidden states (weights initialised randn);
* validation/test track logits = mean of its windows' logits (``scatter_mean``); metrics at track level;
* grid = layers x learning rates x seeds; every selection (layer, lr, epoch) uses validation only; test
  numbers are reported for the validation-selected configuration, mean and std over seeds.

``marble-windows`` is the same with a step of ``batch_size`` windows (an epoch = one pass over the windows);
``culturemert-paper`` follows the CultureMERT authors' cross-cultural tagging code: recordings are cut
(makam 150 s, Hindustani 780 s, Carnatic 330 s) and each epoch trains on one random window per recording.

Batching. The parameters of all P probes are stacked along a leading dimension and trained with ``bmm``;
Adam is elementwise, so one Adam over the stacked tensors *is* per-probe Adam once the learning rate is a
per-probe tensor. ReduceLROnPlateau, early stopping and checkpointing are per-probe state vectors; stopped
probes are removed from the stack at the end of the epoch. The backward pass of the two-layer MLP is written out
(:func:`_loss_gradients`, checked against autograd in the tests) so that gradients and step temporaries live in
reused buffers: autograd would allocate ~2 GB per step for a 390-probe MTAT sweep, and on CPU the page faults of
those fresh allocations cost as much as the arithmetic. Randomness is drawn per seed, not per probe: all
probes that share a seed share their initial MLP weights, their data order and their dropout masks (common
random numbers across layers and learning rates). Seeds differ in their data order, so under track batching
their batches hold different numbers of windows: a step pads every seed's batch to the longest and masks the
padding out of the loss. A probe trained alone with the same seed sees exactly the same numbers, which
:func:`train_probe_reference` (plain ``nn.Linear`` + ``torch.optim.Adam`` + ``ReduceLROnPlateau``) proves in
the tests for every protocol.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from culturemert.config import StrictModel, load_config
from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.features import (
    ProbeData,
    SplitFeatures,
    describe_duplicates,
    load_probe_data,
    truncate_windows,
)
from culturemert.runtime import derive_seed, resolve_device
from culturemert.evaluate.metrics import METRIC_NAMES, batched_macro_roc_auc, tagging_scores, valid_tag_mask

log = logging.getLogger(__name__)

__all__ = [
    "MARBLE_LRS",
    "PAPER_TRUNCATION",
    "PROTOCOLS",
    "Protocol",
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
    "truncation_seconds",
    "validation_monitor",
]

#: The MARBLE constrained-track learning-rate grid.
MARBLE_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
WEIGHTED = "weighted"

#: Seconds at which the CultureMERT authors' tagging code cut long recordings (``MAX_AUDIO_DURATION`` of the
#: ISMIR 2023 "From West to East" code, github pxaris/ccml); the other datasets were not cut.
PAPER_TRUNCATION: dict[str, float] = {"makam": 150.0, "hindustani": 780.0, "carnatic": 330.0}


@dataclass(frozen=True)
class Protocol:
    """A named probing protocol: how a training step is formed and which recordings are cut.

    ``batching``: ``track`` = a step takes ``batch_size`` tracks with all their windows (per-window BCE with the
    track's labels, mean over the windows of the step); ``window`` = a step takes ``batch_size`` windows;
    ``random-window`` = a step takes ``batch_size`` tracks, one window each, drawn anew every epoch.
    ``truncate_seconds``: dataset name -> seconds (windows ending later are dropped at probe time).
    """

    name: str
    batching: Literal["track", "window", "random-window"]
    truncate_seconds: dict[str, float]
    summary: str


PROTOCOLS: dict[str, Protocol] = {
    "marble": Protocol(
        "marble", "track", {},
        "MARBLE v1: a step = batch_size tracks with all their windows; no recording cut",
    ),
    "marble-windows": Protocol(
        "marble-windows", "window", {},
        "MARBLE settings, a step = batch_size windows (an epoch = one pass over the windows); no recording cut",
    ),
    "culturemert-paper": Protocol(
        "culturemert-paper", "random-window", dict(PAPER_TRUNCATION),
        "CultureMERT authors' code: recordings cut (makam 150 s, Hindustani 780 s, Carnatic 330 s), a step = "
        "batch_size tracks with one random window each per epoch",
    ),
}


class ProbeSettings(StrictModel):
    """Everything that defines a probe sweep (the training half of a probe config)."""

    #: named protocol (:data:`PROTOCOLS`, docs/evaluation.md): how a step is batched and which recordings are cut
    protocol: Literal["marble", "marble-windows", "culturemert-paper"] = "marble"
    #: dataset name -> seconds at which recordings are cut at probe time (null: not cut), on top of the
    #: protocol's own cuts (culturemert-paper: makam 150, hindustani 780, carnatic 330)
    truncate_seconds: dict[str, float | None] = Field(default_factory=dict)
    #: what to select on when no validation tag has both classes (validation ROC-AUC/AP undefined): "none"
    #: refuses with a DataError; "valid_loss" selects epochs, lrs and layers on the validation BCE loss instead
    validation_fallback: Literal["none", "valid_loss"] = "none"
    #: byte-identical audio in two splits (found by the audio sha256): "warn" (log and record) or "error" (refuse)
    duplicate_audio: Literal["warn", "error"] = "warn"
    layers: Literal["all"] | list[int] = "all"
    weighted_sum: bool = True
    #: hidden states entering the weighted sum: "transformer" = 1..L (MARBLE v1 drops the conv-feature state 0)
    weighted_sum_layers: Literal["transformer", "all"] | list[int] = "transformer"
    lrs: list[float] = Field(default_factory=lambda: list(MARBLE_LRS))
    seeds: int = Field(default=5, ge=1)
    seed: int = 1234  # MARBLE's seed; seed i of the sweep is seed + i
    batch_size: int = Field(default=64, ge=1)  # tracks per step (marble, culturemert-paper) or windows (marble-windows)
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
    #: bound on floats held by one [probes, windows, D] block of a training step: a step whose windows exceed it
    #: (long tracks under track batching) accumulates its gradient over row blocks (memory knob; results change
    #: only at float-rounding level)
    train_block_floats: int = Field(default=128_000_000, ge=1_000)

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, value: list[float]) -> list[float]:
        if not value or any(lr <= 0 for lr in value):
            raise ValueError("lrs must be a non-empty list of positive learning rates")
        return value

    @field_validator("truncate_seconds")
    @classmethod
    def _positive_cuts(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for name, seconds in value.items():
            if seconds is not None and not seconds > 0:
                raise ValueError(f"truncate_seconds.{name} must be positive seconds or null, got {seconds}")
        return value

    @property
    def batching(self) -> str:
        return PROTOCOLS[self.protocol].batching


def truncation_seconds(settings: ProbeSettings, dataset: str) -> float | None:
    """Seconds at which ``dataset``'s recordings are cut under ``settings`` (None: not cut)."""
    cuts: dict[str, float | None] = {**PROTOCOLS[settings.protocol].truncate_seconds, **settings.truncate_seconds}
    return cuts.get(dataset)


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

    def window_choice(self, counts: torch.Tensor) -> torch.Tensor:
        """One uniformly drawn window index per track (``counts`` [N] windows per track), from the order stream."""
        u = torch.rand(counts.shape[0], generator=self.order, dtype=torch.float64)
        return torch.minimum((u * counts).long(), counts - 1)


def _epoch_rows(batching: str, split: SplitFeatures, stream: _SeedStreams, batch_size: int) -> list[torch.Tensor]:
    """The window rows of every training step of one epoch for one seed (see :class:`Protocol`).

    Draws from ``stream`` in a fixed order (the track or window permutation, then the window choice), which the
    reference probe repeats with its own batch assembly.
    """
    if batching == "window":
        return list(stream.permutation(split.features.shape[0]).split(batch_size))
    starts = split.chunk_start
    counts = starts[1:] - starts[:-1]
    perm = stream.permutation(split.num_tracks)
    if batching == "random-window":
        picked = starts[:-1] + stream.window_choice(counts)
        return list(picked[perm].split(batch_size))
    if batching != "track":
        raise ConfigError(f"unknown batching {batching!r}")
    steps = []
    for tracks in perm.split(batch_size):
        lengths = counts[tracks]
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        steps.append(torch.repeat_interleave(starts[tracks], lengths) + offsets)
    return steps


# --------------------------------------------------------------------------------------------------------
# results of one probe


@dataclass
class ProbeOutcome:
    """One trained probe. ``best_valid_score`` is the monitored validation value at ``best_epoch`` (macro
    ROC-AUC, or the BCE loss under the ``valid_loss`` fallback); ``best_epoch`` is 0 and the score NaN when no
    epoch gave a finite value (a diverged probe, never selected). ``valid`` holds the four metrics and ``loss``."""

    spec: ProbeSpec
    best_epoch: int
    epochs_run: int
    best_valid_score: float
    final_lr: float
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] | None = None
    layer_weights: list[float] | None = None  # softmax weights of a weighted-sum probe (its best checkpoint)
    optimizer_steps: int = 0

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
    denominator: int | torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """Forward + backward of every probe's mean BCE, written out so each gradient lands in a reused buffer.

    ``inputs`` [P, B, D] are the probe inputs (rows n_single.. are the weighted sums of ``weighted_inputs``
    [P - n_single, B, Lw, D]); ``targets`` [P, B, K]. The loss of a probe is the sum of its per-element BCE over
    the rows where ``row_mask`` [P, B, 1] is 1 (all rows when None), divided by ``denominator`` (an int, or [P,
    1, 1]; default B * K, i.e. the mean). With ``accumulate`` the gradients are added to those already in the
    buffers (a step split into row blocks). The operations and their order are those autograd runs for
    :func:`_forward` + ``binary_cross_entropy_with_logits`` (mean), so the numbers agree with the reference
    probe to float rounding (tested); autograd itself would allocate every gradient afresh each step.
    """
    p, ws = stack.params, stack.workspace
    n_probes, batch, _ = inputs.shape
    hidden = p["w1"].shape[2]

    def grad_out(name: str) -> torch.Tensor:
        return ws(f"block.{name}", p[name].shape) if accumulate else stack.grad(name)

    pre = torch.baddbmm(p["b1"].unsqueeze(1), inputs, p["w1"], out=ws("pre", (n_probes, batch, hidden)))
    h = torch.clamp_min(pre, 0, out=ws("h", pre.shape))  # relu
    if dropout_masks is not None:
        h.mul_(dropout_masks)
    logits = torch.baddbmm(p["b2"].unsqueeze(1), h, p["w2"])
    dlogits = logits.sigmoid_().sub_(targets)
    if row_mask is not None:
        dlogits.mul_(row_mask)  # padding rows of a shorter batch contribute nothing
    dlogits.div_(denominator if denominator is not None else logits.shape[1] * logits.shape[2])
    names = ["b2", "w2", "b1", "w1"]
    torch.sum(dlogits, 1, out=grad_out("b2"))
    torch.bmm(h.transpose(1, 2), dlogits, out=grad_out("w2"))
    dh = torch.bmm(dlogits, p["w2"].transpose(1, 2), out=ws("dh", pre.shape))
    if dropout_masks is not None:
        dh.mul_(dropout_masks)
    dh.masked_fill_(torch.le(pre, 0, out=ws("relu_off", pre.shape, torch.bool)), 0.0)
    torch.sum(dh, 1, out=grad_out("b1"))
    torch.bmm(inputs.transpose(1, 2), dh, out=grad_out("w1"))
    if weighted_inputs is not None:
        d_inputs = torch.bmm(dh[n_single:], p["w1"][n_single:].transpose(1, 2))
        d_weights = torch.einsum("pbd,pbld->pl", d_inputs, weighted_inputs)
        weights = torch.softmax(p["layer_logits"][n_single:], dim=-1)
        grad_logits = grad_out("layer_logits")
        grad_logits[:n_single] = 0.0
        grad_logits[n_single:] = weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True))
        names.append("layer_logits")
    if accumulate:
        for name in names:
            stack.grad(name).add_(ws(f"block.{name}", p[name].shape))


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


def _bce_per_probe(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over tracks and tags for each probe: labels [N, K], logits [P, N, K] -> [P] float64."""
    y = labels.to(device=logits.device, dtype=torch.float64)
    out = []
    block = max(1, 2_000_000 // max(1, y.numel()))
    for p0 in range(0, logits.shape[0], block):
        part = logits[p0 : p0 + block].double()
        loss = F.binary_cross_entropy_with_logits(part, y.unsqueeze(0).expand_as(part), reduction="none")
        out.append(loss.mean(dim=(1, 2)).cpu())
    return torch.cat(out)


def _metric_dicts(labels: torch.Tensor, logits: torch.Tensor, vocabulary: list[str], threshold: float):
    results, excluded = [], []
    y = labels.double().cpu()
    losses = _bce_per_probe(labels, logits)
    for p in range(logits.shape[0]):
        scores = tagging_scores(y, logits[p].double().cpu(), vocabulary, threshold)
        results.append({**scores.as_dict(), "loss": float(losses[p])})
        excluded = scores.excluded_tags
    return results, excluded


def _names(tags: Sequence[str], limit: int = 5) -> str:
    return ", ".join(tags[:limit]) + (f", ... ({len(tags)} in all)" if len(tags) > limit else "")


def validation_monitor(data: ProbeData, settings: ProbeSettings) -> str:
    """What epochs, learning rates and layers are selected on: ``"roc_auc"`` (MARBLE; with ``selection_metric``
    for the grid) or, only when the user set ``validation_fallback: valid_loss``, ``"valid_loss"``.

    Raises :class:`DataError` naming the split and its tags when no validation tag has both a positive and a
    negative example: validation ROC-AUC and AP are then undefined for every probe, and any "selection" would
    be the first grid entry presented as a validation choice.
    """
    labels = data.valid.labels
    if bool(valid_tag_mask(labels).any()):
        return "roc_auc"
    if settings.validation_fallback == "valid_loss":
        return "valid_loss"
    positives = labels.sum(0)
    everywhere = [t for t, n in zip(data.vocabulary, positives.tolist()) if n == labels.shape[0]]
    nowhere = [t for t, n in zip(data.vocabulary, positives.tolist()) if n == 0]
    detail = "; ".join(
        part for part in (f"positive on every track: {_names(everywhere)}" if everywhere else "",
                          f"no positive: {_names(nowhere)}" if nowhere else "") if part
    )
    raise DataError(
        f"{data.dataset or 'features'}: the valid split ({data.valid.num_tracks} tracks) has no tag with both a "
        f"positive and a negative example ({detail}), so validation ROC-AUC/AP are undefined and cannot choose "
        "the epoch, learning rate or layer; fix the split, or set validation_fallback: valid_loss to select on "
        "the validation BCE loss instead"
    )


def train_probes(
    data: ProbeData,
    specs: Sequence[ProbeSpec],
    settings: ProbeSettings,
    *,
    progress: bool = True,
    evaluate_test: bool = True,
) -> tuple[list[ProbeOutcome], dict[str, list[str]]]:
    """Train every probe of ``specs`` together; returns one outcome per spec (same order) and the tags
    excluded from macro ROC-AUC/AP per split. Raises :class:`DataError` when validation cannot rank the probes
    (see :func:`validation_monitor`)."""
    from tqdm.auto import tqdm

    monitor = validation_monitor(data, settings)
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
    # every monitored value is a score, higher = better (the loss enters negated), so one set of rules serves both
    plateau_best = torch.full((n_total,), -math.inf, dtype=torch.float64)
    plateau_bad = torch.zeros(n_total, dtype=torch.long)
    stop_best = torch.full((n_total,), -math.inf, dtype=torch.float64)
    stop_wait = torch.zeros(n_total, dtype=torch.long)
    best_score = torch.full((n_total,), -math.inf, dtype=torch.float64)
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
    step = 0
    steps_per_epoch = 0
    bar = tqdm(total=settings.max_epochs, desc=f"probe x{n_total}", unit="epoch", disable=not progress)
    for epoch in range(1, settings.max_epochs + 1):
        plans = [_epoch_rows(settings.batching, data.train, st, settings.batch_size) for st in streams]
        steps_per_epoch = len(plans[0])
        rows = seed_row[ids].to(device)
        n_active = int(ids.numel())
        n_single_active = int((ids < n_single).sum())
        active_layers = single_dev[ids[:n_single_active].to(device)]
        lr_dev = lr[ids].to(device=device, dtype=torch.float32)
        # layer logits train only while weighted-sum probes are active (autograd: zero rows for single-layer probes)
        trained = ["w1", "b1", "w2", "b2"] + (["layer_logits"] if n_single_active < n_active else [])
        floats_per_row = n_active * max(dim, settings.hidden) + (n_active - n_single_active) * len(ws_list) * dim
        block_rows = max(1, settings.train_block_floats // floats_per_row)
        for b in range(steps_per_epoch):
            seed_rows = [plan[b] for plan in plans]
            sizes = [int(r.numel()) for r in seed_rows]
            width = max(sizes)
            masks = None
            if settings.dropout > 0:
                masks = [st.dropout_mask(n, settings.hidden, settings.dropout) for st, n in zip(streams, sizes)]
            if min(sizes) == width:  # every seed's batch has the same size: no padding
                idx = torch.stack(seed_rows).to(device)
                valid_rows = None
                denominator: int | torch.Tensor = width * num_tags
                drop_all = torch.stack(masks) if masks is not None else None  # type: ignore[arg-type]
            else:
                # seeds visit tracks in different orders, so under track batching their batches hold different
                # numbers of windows: pad to the longest and mask the padding out of the loss
                idx = torch.zeros(len(seeds), width, dtype=torch.long)
                valid_seed = torch.zeros(len(seeds), width, 1)
                for s_i, r in enumerate(seed_rows):
                    idx[s_i, : r.numel()] = r
                    valid_seed[s_i, : r.numel()] = 1.0
                idx, valid_seed = idx.to(device), valid_seed.to(device)
                valid_rows = torch.index_select(valid_seed, 0, rows)
                counts = torch.tensor(sizes, dtype=torch.float32, device=device) * num_tags
                denominator = counts[rows].view(-1, 1, 1)
                drop_all = None
                if masks is not None:
                    drop_all = torch.zeros(len(seeds), width, settings.hidden, device=device)
                    for s_i, m in enumerate(masks):
                        drop_all[s_i, : m.shape[0]] = m  # type: ignore[union-attr]
            for r0 in range(0, width, block_rows):
                cols = idx[:, r0 : r0 + block_rows]  # [S, b]
                xb, yb = train_x[cols], train_y[cols]
                batch = cols.shape[1]
                drop = None
                if drop_all is not None:
                    drop = torch.index_select(drop_all[:, r0 : r0 + block_rows], 0, rows,
                                              out=workspace("dropout", (rows.shape[0], batch, settings.hidden)))
                inputs, weighted_inputs = _training_inputs(
                    xb, rows, active_layers, n_single_active, stack.params["layer_logits"], ws_layers, workspace
                )
                targets = torch.index_select(yb, 0, rows, out=workspace("targets", (rows.shape[0], batch, num_tags)))
                row_mask = None if valid_rows is None else valid_rows[:, r0 : r0 + block_rows]
                _loss_gradients(stack, inputs, weighted_inputs, drop, targets, n_single_active, denominator, row_mask,
                                accumulate=r0 > 0)
            step += 1
            bc1 = 1 - beta1**step
            _adam_step(stack, trained, lr_dev / bc1, math.sqrt(1 - beta2**step), settings.adam_betas,
                       settings.adam_eps)
        # ---- end of epoch: validation, checkpoint, plateau, early stopping
        score = _valid_scores(stack.params, data.valid, active_layers, n_single_active, ws_layers, device, settings,
                              monitor)
        finite = torch.isfinite(score)
        epochs_run[ids] = epoch
        improved = score > best_score[ids]  # NaN never improves (Lightning's ModelCheckpoint)
        if improved.any():
            sel = improved.nonzero().squeeze(1)
            for k in best_params:
                best_params[k][ids[sel].to(device)] = stack.params[k].detach()[sel.to(device)]
            best_score[ids[sel]] = score[sel]
            best_epoch[ids[sel]] = epoch
        # ReduceLROnPlateau (torch semantics, relative threshold, cooldown 0): mode max on the AUC beats
        # best * (1 + t); mode min on the loss beats loss_best * (1 - t), i.e. score > -(-best * (1 - t))
        if monitor == "roc_auc":
            bar_to_beat = plateau_best[ids] * (1.0 + settings.lr_threshold)
        else:
            bar_to_beat = -((-plateau_best[ids]) * (1.0 - settings.lr_threshold))
        better = score > bar_to_beat
        plateau_best[ids] = torch.where(better, score, plateau_best[ids])
        plateau_bad[ids] = torch.where(better, torch.zeros_like(plateau_bad[ids]), plateau_bad[ids] + 1)
        reduce = plateau_bad[ids] > settings.lr_patience
        if reduce.any():
            old = lr[ids]
            new = torch.clamp(old * settings.lr_factor, min=settings.min_lr)
            apply = reduce & (old - new > 1e-8)
            lr[ids] = torch.where(apply, new, old)
            plateau_bad[ids] = torch.where(reduce, torch.zeros_like(plateau_bad[ids]), plateau_bad[ids])
        final_lr[ids] = lr[ids]
        # EarlyStopping (Lightning semantics: strict improvement, stop when wait >= patience; a non-finite monitored
        # value stops the probe at once, as Lightning's check_finite does)
        es_improved = score > stop_best[ids]
        stop_best[ids] = torch.where(es_improved, score, stop_best[ids])
        stop_wait[ids] = torch.where(es_improved, torch.zeros_like(stop_wait[ids]), stop_wait[ids] + 1)
        keep = (stop_wait[ids] < settings.patience) & finite
        bar.update(1)
        bar.set_postfix(active=int(keep.sum()), best=f"{float(best_score.max()):.4f}")
        if not keep.all():
            ids = ids[keep]
            stack.select(keep.to(device))
        if ids.numel() == 0:
            break
    bar.close()

    # ---- evaluate every probe's best checkpoint
    valid_logits = _track_logits(best_params, data.valid, single_dev, n_single, ws_layers, device, settings.eval_block_floats)
    valid_metrics, valid_excluded = _metric_dicts(valid_labels, valid_logits, data.vocabulary, settings.threshold)
    excluded = {"valid": valid_excluded}
    test_metrics: list[dict[str, float] | None] = [None] * n_total
    if evaluate_test and data.test is not None:
        test_logits = _track_logits(best_params, data.test, single_dev, n_single, ws_layers, device, settings.eval_block_floats)
        tm, excluded["test"] = _metric_dicts(data.test.labels, test_logits, data.vocabulary, settings.threshold)
        test_metrics = list(tm)
    layer_weights = torch.softmax(best_params["layer_logits"].double(), dim=-1).cpu()
    reported = best_score if monitor == "roc_auc" else -best_score
    reported = torch.where(best_epoch > 0, reported, torch.full_like(reported, math.nan))
    outcomes_internal = []
    for i, spec in enumerate(internal):
        outcomes_internal.append(
            ProbeOutcome(
                spec=spec,
                best_epoch=int(best_epoch[i]),
                epochs_run=int(epochs_run[i]),
                best_valid_score=float(reported[i]),
                final_lr=float(final_lr[i]),
                valid=valid_metrics[i],
                test=test_metrics[i],
                layer_weights=layer_weights[i].tolist() if spec.layer == WEIGHTED else None,
                optimizer_steps=int(epochs_run[i]) * steps_per_epoch,
            )
        )
    outcomes: list[ProbeOutcome] = [None] * len(specs)  # type: ignore[list-item]
    for pos, original in enumerate(order):
        outcomes[original] = outcomes_internal[pos]
    return outcomes, excluded


def _valid_scores(params, split, single_layers, n_single, ws_layers, device, settings, monitor: str) -> torch.Tensor:
    """[P] float64 monitored validation score per active probe, higher = better: macro ROC-AUC, or the negated
    validation BCE loss under the valid_loss fallback. NaN where undefined (a diverged probe)."""
    logits = _track_logits(
        {k: v.detach() for k, v in params.items()}, split, single_layers, n_single, ws_layers, device,
        settings.eval_block_floats,
    )
    if monitor == "valid_loss":
        return -_bce_per_probe(split.labels, logits)
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

    Draws the same per-seed random numbers as :func:`train_probes`, so both must agree to float rounding. Its
    batches are assembled here, independently of the batched trainer, the way MARBLE's data loader does
    (``track``: the windows of ``batch_size`` shuffled tracks stacked, each with its track's labels), or one
    window per step slot (``window``) or one drawn window per track (``random-window``).
    """
    monitor = validation_monitor(data, settings)
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
        optimizer, mode="max" if monitor == "roc_auc" else "min", factor=settings.lr_factor,
        patience=settings.lr_patience, threshold=settings.lr_threshold, min_lr=settings.min_lr,
    )
    streams = _SeedStreams(spec.seed, device)
    train = data.train
    train_x = train.features.to(device)
    track_y = train.labels.to(device=device, dtype=torch.float32)
    window_y = track_y[train.chunk_track.to(device)]
    starts = train.chunk_start.tolist()
    counts = train.chunk_start[1:] - train.chunk_start[:-1]

    def batches():
        """(inputs, targets) of every step of one epoch."""
        if settings.batching == "window":
            perm = streams.permutation(train_x.shape[0]).to(device)
            for b0 in range(0, perm.shape[0], settings.batch_size):
                idx = perm[b0 : b0 + settings.batch_size]
                yield train_x[idx], window_y[idx]
            return
        perm = streams.permutation(train.num_tracks).tolist()
        pick = streams.window_choice(counts).tolist() if settings.batching == "random-window" else None
        for b0 in range(0, len(perm), settings.batch_size):
            tracks = perm[b0 : b0 + settings.batch_size]
            if pick is not None:
                x = torch.stack([train_x[starts[t] + pick[t]] for t in tracks])
                y = track_y[tracks]
            else:  # MARBLE: every window of the track, each with the track's labels, stacked
                x = torch.cat([train_x[starts[t] : starts[t + 1]] for t in tracks])
                y = torch.cat([track_y[t].expand(starts[t + 1] - starts[t], -1) for t in tracks])
            yield x, y

    def split_logits(split: SplitFeatures) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            chunk_logits = model(split.features.to(device))
            sums = torch.zeros(split.num_tracks, data.num_tags, device=device)
            sums.index_add_(0, split.chunk_track.to(device), chunk_logits)
            counts_ = torch.bincount(split.chunk_track.to(device), minlength=split.num_tracks).unsqueeze(1)
        model.train()
        return sums / counts_

    def monitored() -> float:
        logits = split_logits(data.valid)
        if monitor == "roc_auc":
            return float(batched_macro_roc_auc(data.valid.labels.to(device), logits.unsqueeze(0))[0])
        return float(F.binary_cross_entropy_with_logits(logits.double(), data.valid.labels.to(device).double()))

    sign = 1.0 if monitor == "roc_auc" else -1.0  # compare as "higher is better"
    best_value, best_epoch, best_state, stop_best, wait, epochs_run, steps = math.nan, 0, None, -math.inf, 0, 0, 0
    best_score = -math.inf
    for epoch in range(1, settings.max_epochs + 1):
        for x, y in batches():
            mask = streams.dropout_mask(x.shape[0], settings.hidden, settings.dropout)
            loss = F.binary_cross_entropy_with_logits(model(x, mask), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        epochs_run = epoch
        value = monitored()
        if sign * value > best_score:
            best_score, best_value, best_epoch = sign * value, value, epoch
            best_state = copy.deepcopy(model.state_dict())
        scheduler.step(value)
        if sign * value > stop_best:
            stop_best, wait = sign * value, 0
        else:
            wait += 1
        if wait >= settings.patience or not math.isfinite(value):
            break
    final_lr = optimizer.param_groups[0]["lr"]
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # no epoch had a finite validation value: the initial weights stand, and the probe is never selected
        with torch.no_grad():
            model.fc1.weight.copy_(init["w1"].T)
            model.fc1.bias.copy_(init["b1"])
            model.fc2.weight.copy_(init["w2"].T)
            model.fc2.bias.copy_(init["b2"])
            if spec.layer == WEIGHTED:
                model.layer_logits.copy_(init["layer_logits"])
    valid_logits = split_logits(data.valid).cpu()
    valid = tagging_scores(data.valid.labels, valid_logits, data.vocabulary, settings.threshold).as_dict()
    valid["loss"] = float(F.binary_cross_entropy_with_logits(valid_logits.double(), data.valid.labels.double()))
    test = None
    if evaluate_test and data.test is not None:
        test_logits = split_logits(data.test).cpu()
        test = tagging_scores(data.test.labels, test_logits, data.vocabulary, settings.threshold).as_dict()
        test["loss"] = float(F.binary_cross_entropy_with_logits(test_logits.double(), data.test.labels.double()))
    weights = torch.softmax(model.layer_logits.detach().double(), -1).cpu().tolist() if spec.layer == WEIGHTED else None
    return ProbeOutcome(spec, best_epoch, epochs_run, best_value, float(final_lr), valid, test, weights, steps)


# --------------------------------------------------------------------------------------------------------
# selection and summaries (validation only)


def _selection_value(outcome: ProbeOutcome, metric: str) -> float:
    """Higher = better; NaN for a probe whose validation never gave a finite value."""
    if outcome.best_epoch == 0:
        return math.nan
    metrics = outcome.valid
    if metric == "valid_loss":
        return -metrics["loss"]
    if metric == "roc_auc+ap":
        return 0.5 * (metrics["roc_auc"] + metrics["ap"])
    return metrics[metric]


def _mean_std(values: list[float], ddof: int) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=ddof)) if arr.size > ddof else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr]}


def summarise(outcomes: Sequence[ProbeOutcome], settings: ProbeSettings, monitor: str = "roc_auc") -> dict[str, Any]:
    """Validation-only selection.

    For each layer choice the lr with the best seed-mean validation score is kept (the layer curve); the
    overall selection is the best (layer choice, lr) by the same criterion. The score is ``selection_metric``,
    or the negated validation loss when ``monitor`` is ``"valid_loss"`` (the fallback the user chose). A
    (layer, lr) with any seed whose validation value was never finite has no score and is never selected;
    when no configuration has a score, :class:`DataError` is raised. Test numbers of the selected
    configurations are reported, never used.
    """
    metric = settings.selection_metric if monitor == "roc_auc" else "valid_loss"
    groups: dict[tuple[str, float], list[ProbeOutcome]] = {}
    for o in outcomes:
        groups.setdefault((str(o.spec.layer), o.spec.lr), []).append(o)

    def describe(key: tuple[str, float], members: list[ProbeOutcome]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": key[0],
            "lr": key[1],
            "seeds": [o.spec.seed for o in members],
            "selection_score": float(np.mean([_selection_value(o, metric) for o in members])),
            "valid": {m: _mean_std([o.valid[m] for o in members], settings.std_ddof) for m in METRIC_NAMES},
            "valid_loss": _mean_std([o.valid.get("loss", math.nan) for o in members], settings.std_ddof),
            "best_epochs": [o.best_epoch for o in members],
        }
        if all(o.test is not None for o in members):
            out["test"] = {m: _mean_std([o.test[m] for o in members], settings.std_ddof) for m in METRIC_NAMES}  # type: ignore[index]
        if members[0].layer_weights is not None:
            out["layer_weights_mean"] = np.mean([o.layer_weights for o in members], axis=0).tolist()
        return out

    described = {key: describe(key, members) for key, members in groups.items()}
    unscorable = [f"layer {k[0]} lr {k[1]:g}" for k, info in described.items() if math.isnan(info["selection_score"])]
    per_layer: dict[str, dict[str, Any]] = {}
    for key, info in described.items():
        if math.isnan(info["selection_score"]):
            continue
        current = per_layer.get(key[0])
        if current is None or info["selection_score"] > current["selection_score"]:
            per_layer[key[0]] = info
    if not per_layer:
        raise DataError(
            f"no probe configuration has a finite validation {metric} (every one diverged or never scored: "
            f"{_names(unscorable)}); lower the learning rates or check the features"
        )
    selected = max(per_layer.values(), key=lambda info: info["selection_score"])
    singles = [v for k, v in per_layer.items() if k != WEIGHTED]
    return {
        "selection_metric": metric,
        "selected": selected,
        "best_single_layer": max(singles, key=lambda i: i["selection_score"]) if singles else None,
        "weighted_sum": per_layer.get(WEIGHTED),
        "layers": per_layer,
        "grid": list(described.values()),
        "unscorable": unscorable,
    }


# --------------------------------------------------------------------------------------------------------
# entry points


def _check_duplicates(data: ProbeData, settings: ProbeSettings) -> None:
    if not data.duplicates:
        return
    message = (
        f"{data.dataset or 'features'}: {len(data.duplicates)} recording(s) with identical audio bytes sit in two "
        f"splits, so test/validation audio is also trained on: {describe_duplicates(data.duplicates)}"
    )
    if settings.duplicate_audio == "error":
        raise DataError(message + " (remove the copies from the dataset, or set duplicate_audio: warn)")
    log.warning("%s", message)


def _protocol_record(settings: ProbeSettings, cut: float | None, dropped: dict[str, int] | None, monitor: str,
                     data: ProbeData) -> dict[str, Any]:
    protocol = PROTOCOLS[settings.protocol]
    unit = "windows" if protocol.batching == "window" else "tracks"
    record: dict[str, Any] = {
        "name": protocol.name,
        "batching": protocol.batching,
        "batch_size": settings.batch_size,
        "batch_unit": unit,
        "summary": protocol.summary,
        "truncate_seconds": cut,
        "windows_dropped": dropped or {},
        "window_seconds": data.window_seconds,
        "hop_seconds": data.hop_seconds,
        "monitor": monitor,
    }
    if monitor != "roc_auc":
        record["selection_fallback"] = (
            "validation ROC-AUC/AP undefined (no valid tag has both classes): epochs, lrs and layers selected on "
            "the validation BCE loss (validation_fallback: valid_loss)"
        )
    return record


def run_probe(
    data: ProbeData,
    settings: ProbeSettings,
    *,
    progress: bool = True,
    evaluate_test: bool = True,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply the protocol (cut recordings), train the whole grid, select on validation, return the
    JSON-serialisable results; ``results["protocol"]`` names the protocol and ``results["protocol_details"]``
    says how it ran (batching, cuts, what selection monitored).

    Raises :class:`DataError` when validation cannot rank the probes (:func:`validation_monitor`), when the
    same audio sits in two splits and ``duplicate_audio`` is ``error``, or when every probe diverged.
    """
    dataset = str((context or {}).get("dataset") or data.dataset)
    if dataset and not data.dataset:
        data = replace(data, dataset=dataset)
    _check_duplicates(data, settings)
    cut = truncation_seconds(settings, dataset)
    dropped = None
    if cut is not None:
        data, dropped = truncate_windows(data, cut)
    if protocol_needs_disjoint_windows(settings) and data.window_seconds is not None and data.hop_seconds is not None:
        if 0 < data.hop_seconds < data.window_seconds:
            raise ConfigError(
                f"protocol {settings.protocol}: trains and tests on non-overlapping windows, but {dataset or 'the features'} "
                f"were embedded with hop {data.hop_seconds:g} s < window {data.window_seconds:g} s; re-embed with hop = window"
            )
    monitor = validation_monitor(data, settings)
    specs = make_specs(settings, data.num_layers)
    t0 = time.perf_counter()
    outcomes, excluded = train_probes(data, specs, settings, progress=progress, evaluate_test=evaluate_test)
    elapsed = time.perf_counter() - t0
    summary = summarise(outcomes, settings, monitor)
    return {
        **(context or {}),
        "protocol": settings.protocol,
        "protocol_details": _protocol_record(settings, cut, dropped, monitor, data),
        "vocabulary": data.vocabulary,
        "num_tracks": {
            "train": data.train.num_tracks,
            "valid": data.valid.num_tracks,
            **({"test": data.test.num_tracks} if data.test is not None and evaluate_test else {}),
        },
        "num_layers": data.num_layers,
        "excluded_tags": excluded,
        "duplicate_audio": data.duplicates,
        "settings": settings.model_dump(mode="json"),
        "train_seconds": elapsed,
        "summary": summary,
        "probes": [o.as_dict() for o in outcomes],
    }


def protocol_needs_disjoint_windows(settings: ProbeSettings) -> bool:
    """The CultureMERT authors' code averaged *non-overlapping* chunks at test time."""
    return settings.protocol == "culturemert-paper"


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
