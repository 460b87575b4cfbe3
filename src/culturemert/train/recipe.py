"""Recipes: the strict YAML schema of a (continual) pre-training run, dotted overrides, and loading.

A recipe names the base model, the teacher, the prepared data and a list of *stages*; each stage has its own
trainable parameter groups, steps, batch, optimizer, LR schedule and data mixture. See docs/pretraining.md.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from culturemert.label_grid import crop_samples
from culturemert.config import StrictModel, load_yaml, parse_config
from culturemert.errors import ConfigError
from culturemert.objective import ObjectiveConfig
from culturemert.train.mert_sizes import declared_size, warn_size_mismatches
from culturemert.train.param_groups import check_pattern
from culturemert.train.validation import ValidateSpec
from culturemert.data.loader import MixtureSpec

log = logging.getLogger(__name__)

#: The recipes shipped inside the package (``culturemert pretrain NAME`` finds them without a clone).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class BaseSpec(StrictModel):
    """Where the weights come from: ``source`` (HF dir, Hub id, fairseq .pt, export dir) or ``preset``."""

    source: str | None = None
    preset: str | None = None
    # auto: keep the base's heads when they match the teacher, create fresh ones when it has none (HF
    # checkpoints have none); reinit: always fresh heads; keep: the base must have matching heads.
    heads: Literal["auto", "reinit", "keep"] = "auto"
    final_dim: int | None = Field(None, ge=1)  # fresh heads only; default: the preset's / 64

    @model_validator(mode="after")
    def _one_source(self) -> "BaseSpec":
        if (self.source is None) == (self.preset is None):
            raise ValueError("give exactly one of base.source (checkpoint) or base.preset (from scratch)")
        return self


class TeacherSpec(StrictModel):
    """The discrete teacher is the one the prepared data was tokenised with; ``name`` is checked against it."""

    name: str | None = None
    cqt_fft_frames: int = Field(600, ge=220)  # MertCQT block size: speed/memory only, not the values


class DataSpec(StrictModel):
    """The prepared directories a run trains on (all made with the same teacher), the split read from them, and
    the default culture mixture; ``short_items``: clips shorter than a crop are skipped or padded with ``PAD_CODE``."""

    dirs: list[str] = Field(min_length=1)  # prepared directories (culturemert prepare)
    split: str | None = "train"
    short_items: Literal["skip", "pad"] = "skip"
    num_workers: int = Field(2, ge=0)  # DataLoader workers building whole batches ahead
    mixture: MixtureSpec | None = None  # default for stages without their own; None: proportional to hours


class BatchSpec(StrictModel):
    """Global batch per optimizer step, in clips or seconds of audio (``seconds / crop_seconds`` clips)."""

    clips: int | None = Field(None, ge=1)
    seconds: float | None = Field(None, gt=0)
    micro_batch_clips: int | None = Field(None, ge=1)  # per rank per forward; None: the rank's whole share

    @model_validator(mode="after")
    def _one(self) -> "BatchSpec":
        if (self.clips is None) == (self.seconds is None):
            raise ValueError("give exactly one of batch.clips or batch.seconds")
        return self


class OptimizerSpec(StrictModel):
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with fairseq MERT's betas and eps by default."""

    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    fused: bool | None = None  # None: fused on CUDA

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {v}")
        return v


class ScheduleSpec(StrictModel):
    """LR(step): linear (re-)warm-up from ``warmup_start`` to ``peak``, then the ``kind``'s shape.

    ``warmup_decay``: re-decay to ``floor`` with ``decay`` = cosine / linear / polynomial (``power``);
    ``constant``: stay at ``peak``; ``inverse_sqrt``: ``peak * sqrt(max(warmup, 1) / step)``, not below ``floor``.
    """

    kind: Literal["warmup_decay", "constant", "inverse_sqrt"] = "warmup_decay"
    peak: float = Field(gt=0)
    floor: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    warmup_start: float = Field(0.0, ge=0)
    decay: Literal["cosine", "linear", "polynomial"] = "cosine"
    power: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "ScheduleSpec":
        if self.floor > self.peak:
            raise ValueError(f"peak ({self.peak:g}) must be >= floor ({self.floor:g})")
        if self.warmup_start > self.peak:
            raise ValueError(f"warmup_start ({self.warmup_start:g}) must be <= peak ({self.peak:g})")
        return self


class FaultSpec(StrictModel):
    """What happens on a bad step: a non-finite loss or gradient, or a loss spike (z-score over the recent window),
    is skipped; ``max_bad_steps`` in a row roll back to the newest good checkpoint with the LR scaled down."""

    max_bad_steps: int = Field(5, ge=1)  # consecutive skipped steps before a rollback
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)
    max_rollbacks: int = Field(3, ge=0)  # then stop with an error
    spike_action: Literal["skip", "log", "off"] = "skip"
    spike_zscore: float = Field(6.0, gt=0)  # loss > mean + z * std of the recent window
    spike_window: int = Field(100, ge=2)
    spike_min_history: int = Field(20, ge=2)


class CheckpointSpec(StrictModel):
    """Training checkpoints every ``every_steps`` optimizer steps (and at stage ends); the newest ``keep_last`` kept."""

    every_steps: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)


class RuntimeSpec(StrictModel):
    """How the run executes (device, precision, activation checkpointing, torch.compile, logging); none of it
    changes what is computed beyond floating-point rounding."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    gradient_checkpointing: bool = False
    compile: bool = False
    tensorboard: Literal["auto", "on", "off"] = "auto"
    log_every: int = Field(1, ge=1)
    progress: bool = True


class StageSpec(StrictModel):
    """One training stage: which parameters train (:mod:`~culturemert.train.param_groups` patterns), for how many
    optimizer steps, on batches of ``batch`` clips of ``crop_seconds`` seconds drawn by ``mixture``, with its own
    optimizer and LR schedule (re-warmed at the stage start).

    Raises:
        ConfigError: (from :meth:`global_clips`) ``batch.seconds`` is not a whole number of crops.
    """

    name: str = Field(min_length=1)
    trainable: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    steps: int = Field(gt=0)
    batch: BatchSpec
    crop_seconds: float = Field(5.0, gt=0)
    optimizer: OptimizerSpec = OptimizerSpec()
    lr: ScheduleSpec
    clip_grad_norm: float | None = Field(10.0, gt=0)  # None: no clipping (the norm is still logged)
    mixture: MixtureSpec | None = None  # None: data.mixture

    @field_validator("trainable")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [check_pattern(p) for p in v]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"stage name {v!r} may only hold letters, digits, '_', '.', '-' (used in paths)")
        return v

    @property
    def crop_samples(self) -> int:
        """Crop length in samples, on the label grid."""
        return crop_samples(self.crop_seconds)

    def global_clips(self) -> int:
        """Clips per optimizer step over all ranks."""
        if self.batch.clips is not None:
            return self.batch.clips
        clips = self.batch.seconds / self.crop_seconds  # type: ignore[operator]
        if abs(clips - round(clips)) > 1e-6 or round(clips) < 1:
            raise ConfigError(
                f"stage {self.name!r}: batch.seconds ({self.batch.seconds:g}) is not a whole number of "
                f"{self.crop_seconds:g}-s crops"
            )
        return int(round(clips))


# The recipe key is ``validate`` (the word users read in docs and write in YAML). It shadows pydantic's deprecated
# ``BaseModel.validate`` classmethod, which nothing here calls; instance access returns the field.
warnings.filterwarnings("ignore", message='Field name "validate" in "Recipe" shadows', category=UserWarning)


class Recipe(StrictModel):
    """A whole (continual) pre-training run: base model, teacher, prepared data, objective, stages and runtime.

    Loaded from YAML by :func:`load_recipe` (unknown keys rejected, dotted overrides applied first); see
    docs/pretraining.md for every key and recipes/ for the shipped recipes.
    """

    name: str = "culturemert"
    seed: int = 1337
    base: BaseSpec
    teacher: TeacherSpec = TeacherSpec()
    data: DataSpec
    objective: ObjectiveConfig = ObjectiveConfig()
    stages: list[StageSpec] = Field(min_length=1)
    checkpoint: CheckpointSpec = CheckpointSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    faults: FaultSpec = FaultSpec()
    validate: ValidateSpec | None = ValidateSpec()  # held-out validation per culture; null: off

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for s in self.stages:
            if s.crop_samples <= 400:
                raise ValueError(f"stage {s.name!r}: crop_seconds {s.crop_seconds:g} is shorter than one frame")
        size = declared_size(self)  # the base's published MERT values, e.g. a 330M base with 95M defaults
        warn_size_mismatches(self, size, f"base {self.base.preset or self.base.source}")
        return self


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (value parsed as YAML; list items by index: ``stages.0.steps=10``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {exc}") from None
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"override {key}: {part!r} is not an index of a {len(node)}-item list")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (a YAML path or a shipped name, see :func:`resolve_recipe`);
    raises :class:`ConfigError` naming every bad key."""
    path = resolve_recipe(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    data = apply_overrides(data, list(overrides or []))
    recipe = parse_config(data, Recipe, source=str(path))
    for i, stage in enumerate(recipe.stages):
        try:
            stage.global_clips()
        except ConfigError as exc:
            raise ConfigError(f"{path}: stages.{i}.batch: {exc}") from None
    return recipe


def check_recipe_paths(recipe: Recipe) -> None:
    """Fail before any compute when a named path is missing or the data directories were tokenised by different
    teachers (:class:`ConfigError` / :class:`DataError`)."""
    for i, d in enumerate(recipe.data.dirs):
        if not (Path(d) / "index.json").is_file():
            raise ConfigError(f"data.dirs.{i}: {d} is not a prepared directory (no index.json); run `culturemert prepare`")
    if len(recipe.data.dirs) > 1:  # codes of two teachers mean different sounds: refuse before any compute
        from culturemert.data.loader import check_same_teacher

        check_same_teacher(recipe.data.dirs)
    src = recipe.base.source
    if src is not None and (src.startswith((".", "/", "~")) or Path(src).suffix in (".pt", ".ckpt")):
        if not Path(src).expanduser().exists():
            raise ConfigError(f"base.source: {src} does not exist")


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped with the package by name: ``culturemert-95m``, ``tiny-test``, ``quickstart/cpt``, ..."""
    if not RECIPES_DIR.is_dir():
        return {}
    return {p.relative_to(RECIPES_DIR).with_suffix("").as_posix(): p for p in sorted(RECIPES_DIR.rglob("*.yaml"))}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` itself when it is a file, else the shipped recipe of that name
    (``culturemert-95m``, ``quickstart/cpt``; a ``.yaml`` suffix is ignored).

    Raises:
        ConfigError: neither a file nor a shipped name (the message lists the shipped names).
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    shipped = shipped_recipes()
    for candidate in (name, name.removeprefix("recipes/")):
        if candidate in shipped:
            return shipped[candidate]
    raise ConfigError(
        f"recipe not found: {name_or_path} is not a file and not a shipped recipe "
        f"(shipped: {', '.join(shipped) or 'none - a broken install?'})"
    )
