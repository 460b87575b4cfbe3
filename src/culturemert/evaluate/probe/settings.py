"""Probing protocols and settings, the probe grid and the outcome of one probe."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from culturemert.config import StrictModel
from culturemert.errors import ConfigError

log = logging.getLogger(__name__)


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
    """The hidden-state indices the weighted-sum probe mixes (``all``, ``transformer`` = all but the conv
    features, or a list).

    Raises:
        ConfigError: an index outside 0..num_layers-1.
    """
    if settings.weighted_sum_layers == "all" or (settings.weighted_sum_layers == "transformer" and num_layers == 1):
        return list(range(num_layers))
    if settings.weighted_sum_layers == "transformer":
        return list(range(1, num_layers))
    for layer in settings.weighted_sum_layers:
        if not 0 <= layer < num_layers:
            raise ConfigError(f"weighted_sum_layers: {layer} out of range 0..{num_layers - 1}")
    return list(settings.weighted_sum_layers)


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
