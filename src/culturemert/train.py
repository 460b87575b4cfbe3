"""Continual pre-training: recipes, parameter groups, LR re-warming / re-decaying, and the resumable loop.

A *recipe* (YAML, :class:`Recipe`) names the base model, the teacher, the prepared data and a list of
*stages*; each stage has its own trainable parameter groups, steps, batch, optimizer, LR schedule and data
mixture. :class:`Trainer` runs the stages in one process or under ``torchrun`` (DDP) and is crash-safe:

* a training step is a pure function of (weights, optimizer state, seed, stage, step): batch ``k`` comes from
  the deterministic loader, the mask/mixture generator and the global torch RNG are re-seeded from
  ``(seed, stage, step)``, so a resumed run is bit-identical to an uninterrupted one on CPU;
* checkpoints are directories written to a temp name, fsynced, then renamed; ``manifest.json`` holds the
  sha256 of every file and is verified on load; only tensors (safetensors) and JSON are written;
* non-finite losses/gradients and loss spikes skip the step; ``faults.max_bad_steps`` bad steps in a row roll
  back to the newest good checkpoint with the LR scaled by ``faults.rollback_lr_factor``.

The global batch is the same whatever the world size and micro-batch: every rank draws the whole batch,
applies the (cheap) noise mixture and span masks to it, and then trains on its own disjoint rows, split into
micro-batches whose losses are weighted by their share of rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol

import numpy as np
import torch
import yaml
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from culturemert.label_grid import HOP_LENGTH, crop_samples
from culturemert.config import StrictModel, load_yaml, parse_config
from culturemert.files import atomic_write_text as _atomic_write_text, fsync_dir as _fsync_path, sha256_file as _sha256
from culturemert.errors import CheckpointError, ConfigError, UserError
from culturemert.model import HeadsConfig, MertPretrainModel, PretrainingHeads, build_model
from culturemert.objective import MertObjective, ObjectiveConfig
from culturemert.runtime import derive_seed, resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

__all__ = [
    "BaseSpec",
    "TeacherSpec",
    "DataSpec",
    "BatchSpec",
    "OptimizerSpec",
    "ScheduleSpec",
    "FaultSpec",
    "CheckpointSpec",
    "RuntimeSpec",
    "StageSpec",
    "Recipe",
    "load_recipe",
    "apply_overrides",
    "lr_at",
    "resolve_trainable",
    "train_flops_per_clip",
    "TrainState",
    "Trainer",
    "list_checkpoints",
    "load_checkpoint",
]


# ======================================================================================================
# recipe
# ======================================================================================================
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


class MixtureConfig(StrictModel):
    """Same fields as :class:`culturemert.data.MixtureSpec` (validated again by it)."""

    sources: dict[str, float]
    replay: dict[str, float] = {}
    weighting: Literal["explicit", "hours", "uniform", "temperature"] = "explicit"
    temperature: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _valid(self) -> "MixtureConfig":
        for name, w in {**self.sources, **self.replay}.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} must be finite and >= 0, got {w}")
        for name, w in self.replay.items():
            if w > 1:
                raise ValueError(f"replay fraction of {name!r} is {w:g}; must be <= 1")
        total = sum(self.replay.values())
        if total >= 1:
            raise ValueError(f"replay fractions sum to {total:g}; must be < 1")
        if not self.sources:
            raise ValueError("sources: at least one culture is required")
        return self


class DataSpec(StrictModel):
    dirs: list[str] = Field(min_length=1)  # prepared directories (culturemert prepare)
    split: str | None = "train"
    short_items: Literal["skip", "pad"] = "skip"
    num_workers: int = Field(2, ge=0)  # DataLoader workers building whole batches ahead
    mixture: MixtureConfig | None = None  # default for stages without their own; None: proportional to hours


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
    max_bad_steps: int = Field(5, ge=1)  # consecutive skipped steps before a rollback
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)
    max_rollbacks: int = Field(3, ge=0)  # then stop with an error
    spike_action: Literal["skip", "log", "off"] = "skip"
    spike_zscore: float = Field(6.0, gt=0)  # loss > mean + z * std of the recent window
    spike_window: int = Field(100, ge=2)
    spike_min_history: int = Field(20, ge=2)


class CheckpointSpec(StrictModel):
    every_steps: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)


class RuntimeSpec(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    gradient_checkpointing: bool = False
    compile: bool = False
    tensorboard: Literal["auto", "on", "off"] = "auto"
    log_every: int = Field(1, ge=1)
    progress: bool = True


_ALIAS_PREFIXES: dict[str, tuple[str, ...]] = {
    "all": ("",),
    "feature_extractor": ("backbone.feature_extractor.",),
    "feature_projection": ("backbone.feature_projection.",),
    "mask_embedding": ("backbone.masked_spec_embed",),
    "positional_conv": ("backbone.encoder.pos_conv_embed.",),
    "encoder_norm": ("backbone.encoder.layer_norm.",),
    "heads": ("heads.",),
}
_LAYERS_RE = re.compile(r"^layers\[(-?\d*)(?::(-?\d*))?\]$")


def _check_pattern(pattern: str) -> str:
    if pattern in _ALIAS_PREFIXES or _LAYERS_RE.match(pattern):
        return pattern
    if pattern.startswith(("backbone.", "heads.")) or any(ch in pattern for ch in "*?["):
        return pattern
    raise ValueError(
        f"unknown parameter group {pattern!r}: use {', '.join(_ALIAS_PREFIXES)}, layers[i:j], "
        "or a glob over parameter names such as 'backbone.encoder.layers.*.attention.*'"
    )


class StageSpec(StrictModel):
    name: str = Field(min_length=1)
    trainable: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    steps: int = Field(gt=0)
    batch: BatchSpec
    crop_seconds: float = Field(5.0, gt=0)
    optimizer: OptimizerSpec = OptimizerSpec()
    lr: ScheduleSpec
    clip_grad_norm: float | None = Field(10.0, gt=0)  # None: no clipping (the norm is still logged)
    mixture: MixtureConfig | None = None  # None: data.mixture

    @field_validator("trainable")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [_check_pattern(p) for p in v]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"stage name {v!r} may only hold letters, digits, '_', '.', '-' (used in paths)")
        return v

    @property
    def crop_samples(self) -> int:
        return crop_samples(self.crop_seconds)

    def global_clips(self) -> int:
        if self.batch.clips is not None:
            return self.batch.clips
        clips = self.batch.seconds / self.crop_seconds  # type: ignore[operator]
        if abs(clips - round(clips)) > 1e-6 or round(clips) < 1:
            raise ConfigError(
                f"stage {self.name!r}: batch.seconds ({self.batch.seconds:g}) is not a whole number of "
                f"{self.crop_seconds:g}-s crops"
            )
        return int(round(clips))


class Recipe(StrictModel):
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

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for s in self.stages:
            if s.crop_samples <= 400:
                raise ValueError(f"stage {s.name!r}: crop_seconds {s.crop_seconds:g} is shorter than one frame")
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
    """Read, override and validate a recipe; raises :class:`ConfigError` naming every bad key."""
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
    """Fail before any compute when a named path is missing."""
    for i, d in enumerate(recipe.data.dirs):
        if not (Path(d) / "index.json").is_file():
            raise ConfigError(f"data.dirs.{i}: {d} is not a prepared directory (no index.json); run `culturemert prepare`")
    src = recipe.base.source
    if src is not None and (src.startswith((".", "/", "~")) or Path(src).suffix in (".pt", ".ckpt")):
        if not Path(src).expanduser().exists():
            raise ConfigError(f"base.source: {src} does not exist")


# ======================================================================================================
# LR schedule, parameter groups, FLOPs
# ======================================================================================================
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


def resolve_trainable(model: nn.Module, patterns: list[str], where: str = "trainable") -> set[str]:
    """Names of the parameters selected by ``patterns`` (aliases, ``layers[i:j]``, globs)."""
    names = [n for n, _ in model.named_parameters()]
    num_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in _ALIAS_PREFIXES:
            prefixes = _ALIAS_PREFIXES[pattern]
            hit = {n for n in names if any(n.startswith(p) for p in prefixes)}
        elif m := _LAYERS_RE.match(pattern):
            lo_s, hi_s = m.group(1), m.group(2)
            if hi_s is None:  # layers[i]
                idx = int(lo_s)
                layer_ids = [idx % num_layers] if num_layers and -num_layers <= idx < num_layers else []
            else:
                layer_ids = list(range(num_layers))[slice(int(lo_s) if lo_s else None, int(hi_s) if hi_s else None)]
            prefixes = tuple(f"backbone.encoder.layers.{i}." for i in layer_ids)
            hit = {n for n in names if n.startswith(prefixes)} if prefixes else set()
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hit:
            raise ConfigError(f"{where}: {pattern!r} matches no parameter of this model ({num_layers} layers)")
        chosen |= hit
    return chosen


def train_flops_per_clip(model: MertPretrainModel, num_samples: int, cqt: bool = True) -> float:
    """Training FLOPs per clip (forward x 3 + CQT target), counted as in ``anchors.md`` §3.3."""
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
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


# ======================================================================================================
# data sources
# ======================================================================================================
class BatchSource(Protocol):
    """What the trainer needs from data: deterministic batches by index plus the teacher's shape."""

    n_codebooks: int
    codebook_size: int
    teacher_name: str | None

    def batch(self, step: int) -> Mapping[str, Any]: ...

    def hours(self) -> dict[str, float]: ...


class PreparedSource:
    """:class:`culturemert.data.MixtureLoader` over the recipe's prepared directories for one stage."""

    def __init__(self, recipe: Recipe, stage: StageSpec, stage_index: int, datasets: list[Any]):
        from culturemert.data import MixtureLoader, MixtureSpec

        mix = stage.mixture or recipe.data.mixture
        spec = MixtureSpec(**mix.model_dump()) if mix is not None else None
        seed = derive_seed(recipe.seed, "data", stage_index)
        self.loader = MixtureLoader(
            datasets,
            spec,
            batch_size=stage.global_clips(),
            crop_samples=stage.crop_samples,
            seed=seed % (2**31),
            rank=0,  # every rank draws the same global batch and keeps its own rows
            split=recipe.data.split,
            short_items=recipe.data.short_items,
        )
        first = self.loader.datasets[0]
        self.n_codebooks = int(first.n_codebooks)
        self.codebook_size = int(first.codebook_size)
        self.teacher_name = str(first.teacher.get("name"))
        self.num_workers = recipe.data.num_workers
        self._datasets = self.loader.datasets

    def batch(self, step: int) -> Mapping[str, Any]:
        return self.loader.batch(step)

    def iterate(self, start: int, stop: int) -> Iterator[Mapping[str, Any]]:
        if self.num_workers > 0:
            from culturemert.data import torch_loader

            yield from torch_loader(
                self.loader, start_step=start, num_steps=stop - start, num_workers=self.num_workers
            )
        else:
            for k in range(start, stop):
                yield self.batch(k)

    def hours(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for d in self._datasets:
            for c, h in d.hours_per_culture(None).items():
                total[c] = total.get(c, 0.0) + h
        return {c: round(h, 3) for c, h in total.items()}


def _iterate(source: Any, start: int, stop: int) -> Iterator[Mapping[str, Any]]:
    if hasattr(source, "iterate"):
        yield from source.iterate(start, stop)
    else:
        for k in range(start, stop):
            yield source.batch(k)


# ======================================================================================================
# small utilities
# ======================================================================================================
@dataclasses.dataclass
class TrainState:
    """Everything besides tensors needed to continue a run exactly."""

    stage_index: int = 0
    stage_step: int = 0  # next step of the stage to run (== stage.steps: the stage has finished)
    global_step: int = 0  # optimizer steps attempted so far, skipped ones included
    lr_scale: float = 1.0  # lowered by rollbacks
    rollbacks: int = 0
    bad_streak: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)
    base_fingerprint: str | None = None
    clips_seen: int = 0


# ======================================================================================================
# checkpoints
# ======================================================================================================
def _checkpoint_name(state: TrainState) -> str:
    return f"ckpt-g{state.global_step:09d}-s{state.stage_index:02d}-{state.stage_step:09d}"


_CKPT_RE = re.compile(r"^ckpt-g(\d{9})-s(\d{2})-(\d{9})$")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint directories, oldest first (by global step, then stage)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2)), int(m.group(3))), p))
    return [p for _, p in sorted(found)]


def _optimizer_to_files(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars, "param_names": names}


def _optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: Path,
    model: MertPretrainModel,
    optimizer: torch.optim.Optimizer | None,
    param_names: list[str],
    state: TrainState,
    extra: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint directory atomically and prune to the newest ``keep_last``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _checkpoint_name(state)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        opt_meta: dict[str, Any] = {"param_groups": [], "scalars": {}, "param_names": param_names}
        opt_tensors: dict[str, torch.Tensor] = {}
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_to_files(optimizer, param_names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=1), encoding="utf-8")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        payload = {"format": CHECKPOINT_FORMAT, "state": dataclasses.asdict(state), **extra}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "files": files}, indent=1))
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_path(tmp)
        if final.exists():  # re-reached after a rollback: replace
            trash = directory / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclasses.dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict
    rng: dict[str, torch.Tensor]
    state: TrainState
    extra: dict[str, Any]


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint after verifying the sha256 of every file; :class:`CheckpointError` if anything is off."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest.json ({exc})") from None
    required = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"}
    missing = required - set(files)
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {sorted(missing)}")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: checksum mismatch for {name} (corrupted)")
    try:
        payload = json.loads((path / "state.json").read_text(encoding="utf-8"))
        state = TrainState(**payload.pop("state"))
        payload.pop("format", None)
        return LoadedCheckpoint(
            path=path,
            model_state=load_file(str(path / "model.safetensors")),
            optimizer_tensors=load_file(str(path / "optimizer.safetensors")),
            optimizer_meta=json.loads((path / "optimizer.json").read_text(encoding="utf-8")),
            rng=load_file(str(path / "rng.safetensors")),
            state=state,
            extra=payload,
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from None


# ======================================================================================================
# distributed helpers
# ======================================================================================================
@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(tensor: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


# ======================================================================================================
# the train module (one nn.Module so DDP sees every parameter use inside its forward)
# ======================================================================================================
class _TrainModule(nn.Module):
    def __init__(self, model: MertPretrainModel, objective: MertObjective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, clean, inp, codes, mask):  # type: ignore[override]
        out = self.objective(self.model, clean, inp, codes, mask)
        return out.loss, out.parts


class StopTraining(Exception):
    """Raised internally when ``max_steps`` is reached (the run is resumable)."""


# ======================================================================================================
# trainer
# ======================================================================================================
class Trainer:
    """Runs a :class:`Recipe` into ``out_dir`` (see the module docstring for the guarantees).

    ``source_factory(recipe, stage, stage_index)`` may replace the prepared-data loader (tests, custom data);
    ``base_model`` may replace the recipe's base (a model object, used as given).
    """

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | Path,
        *,
        resume: Literal["auto", "never"] = "auto",
        max_steps: int | None = None,
        only_stage: int | None = None,
        source_factory: Callable[[Recipe, StageSpec, int], Any] | None = None,
        cqt_module: nn.Module | None = None,
    ):
        self.recipe = recipe
        self.out = Path(out_dir)
        self.resume = resume
        self.max_steps = max_steps
        self.only_stage = only_stage
        self._source_factory = source_factory
        self._cqt_module = cqt_module
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._datasets: list[Any] | None = None
        self._tb = None
        self._steps_this_run = 0
        if only_stage is not None and not 1 <= only_stage <= len(recipe.stages):
            raise ConfigError(f"--stage {only_stage}: the recipe has stages 1..{len(recipe.stages)}")

    # -- setup -------------------------------------------------------------------------------------------
    def _source(self, stage: StageSpec, index: int) -> Any:
        if self._source_factory is not None:
            return self._source_factory(self.recipe, stage, index)
        if self._datasets is None:
            from culturemert.data import PreparedDataset

            self._datasets = [PreparedDataset(d) for d in self.recipe.data.dirs]
        return PreparedSource(self.recipe, stage, index, self._datasets)

    def _build_model(self, n_codebooks: int, codebook_size: int) -> MertPretrainModel:
        base = self.recipe.base
        want = dict(n_codebooks=n_codebooks, codebook_size=codebook_size)
        torch.manual_seed(derive_seed(self.recipe.seed, "init"))
        if base.preset is not None:
            overrides = dict(want)
            if base.final_dim:
                overrides["final_dim"] = base.final_dim
            return build_model(base.preset, seed=derive_seed(self.recipe.seed, "init") % (2**31), **overrides)
        from culturemert.model import load_model

        model = load_model(base.source)  # type: ignore[arg-type]
        heads = model.heads
        matches = heads is not None and (heads.config.n_codebooks, heads.config.codebook_size) == (
            n_codebooks,
            codebook_size,
        )
        if base.heads == "keep" and not matches:
            have = "none" if heads is None else f"{heads.config.n_codebooks}x{heads.config.codebook_size}"
            raise ConfigError(
                f"base.heads: keep, but {base.source} has heads {have} and the teacher needs "
                f"{n_codebooks}x{codebook_size}; use base.heads: reinit"
            )
        if base.heads == "auto" and heads is not None and not matches:
            raise ConfigError(
                f"base.heads: {base.source} has heads for {heads.config.n_codebooks}x{heads.config.codebook_size} "
                f"codes but the teacher has {n_codebooks}x{codebook_size}; set base.heads: reinit"
            )
        if base.heads == "reinit" or heads is None:
            cfg = HeadsConfig(**want, **({"final_dim": base.final_dim} if base.final_dim else {}))
            torch.manual_seed(derive_seed(self.recipe.seed, "heads"))
            model.heads = PretrainingHeads(model.hidden_size, cfg)
            log.info("fresh pre-training heads: %s", cfg.model_dump())
        return model

    def _make_optimizer(self, stage: StageSpec, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
        o = stage.optimizer
        fused = o.fused if o.fused is not None else device.type == "cuda"
        kwargs: dict[str, Any] = dict(lr=stage.lr.peak, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        if fused:
            kwargs["fused"] = True
        return torch.optim.AdamW(params, **kwargs)

    def _set_trainable(self, stage: StageSpec, index: int) -> list[str]:
        names = resolve_trainable(self.model, stage.trainable, where=f"stages.{index}.trainable")
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in names)
        fe = self.model.backbone.feature_extractor
        fe_trainable = any(p.requires_grad for p in fe.parameters())
        # HF sets requires_grad on the conv input when _requires_grad: wasted backward if the convs are frozen
        fe._requires_grad = fe_trainable
        return [n for n, _ in self.model.named_parameters() if n in names]

    def _recipe_hash(self) -> str:
        return hashlib.sha256(self.recipe.model_dump_json().encode()).hexdigest()[:16]

    # -- logging -----------------------------------------------------------------------------------------
    def _open_logs(self, resumed_step: int) -> None:
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():  # drop lines past the resumed step (and a torn last line)
            keep = []
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("global_step", -1) <= resumed_step or rec.get("event") == "resume":
                    keep.append(line)
            _atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        handler = logging.FileHandler(self.out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("culturemert").addHandler(handler)
        self._log_handler = handler
        tb = self.recipe.runtime.tensorboard
        if tb != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # tensorboard not installed
                if tb == "on":
                    raise ConfigError("runtime.tensorboard: on, but the tensorboard package is not installed") from None

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None and "loss" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("global_step",):
                    self._tb.add_scalar(f"train/{k}", v, record["global_step"])

    def _event(self, kind: str, message: str, **fields: Any) -> None:
        log.warning("%s", message) if kind != "info" else log.info("%s", message)
        self._write_metrics({"event": kind, "message": message, "global_step": self.state.global_step, **fields})

    def _close_logs(self) -> None:
        if not self.dist.is_main:
            return
        with contextlib.suppress(Exception):
            self._metrics.close()
        if getattr(self, "_log_handler", None) is not None:
            logging.getLogger("culturemert").removeHandler(self._log_handler)
            self._log_handler.close()
        if self._tb is not None:
            self._tb.close()

    def plot_losses(self) -> Path | None:
        """``loss_curve.png`` from ``metrics.jsonl`` (matplotlib Agg), stage boundaries marked."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, loss, pred, skipped = [], [], [], []
        boundaries: dict[str, int] = {}
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" not in rec:
                continue
            boundaries.setdefault(rec.get("stage", "?"), rec["global_step"])
            if rec.get("skipped"):
                skipped.append(rec["global_step"])
            if rec["loss"] is not None and math.isfinite(rec["loss"]):
                steps.append(rec["global_step"])
                loss.append(rec["loss"])
                pred.append(rec.get("pred_loss", float("nan")))
        if not steps:
            return None
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        ax.plot(steps, loss, lw=0.8, label="total loss")
        ax.plot(steps, pred, lw=0.8, label="masked prediction (sum over codebooks)")
        for name, s in boundaries.items():
            ax.axvline(s, color="grey", ls="--", lw=0.6)
            ax.text(s, ax.get_ylim()[1], f" {name}", va="top", fontsize=7, color="grey")
        if skipped:
            ax.plot(skipped, [min(loss)] * len(skipped), "rx", ms=4, label="skipped step")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per masked frame)")
        ax.set_title(self.recipe.name)
        ax.legend(fontsize=8)
        fig.tight_layout()
        target = self.out / "loss_curve.png"
        tmp = self.out / f".loss_curve.{os.getpid()}.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, target)
        return target

    # -- checkpoint plumbing -----------------------------------------------------------------------------
    def _save(self) -> None:
        if self.dist.is_main:
            extra = {"recipe_hash": self._recipe_hash(), "stage_name": self.recipe.stages[self.state.stage_index].name}
            path = save_checkpoint(
                self.ckpt_dir,
                self.model,
                self.optimizer,
                self.param_names,
                self.state,
                extra,
                self.recipe.checkpoint.keep_last,
            )
            log.info("checkpoint %s", path.name)
        _barrier(self.dist)

    def _newest_valid_checkpoint(self, good_only: bool = False) -> LoadedCheckpoint | None:
        """Newest checkpoint that verifies; with ``good_only`` also not taken during a run of bad steps."""
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path.name, exc)
                continue
            if good_only and ckpt.state.bad_streak > 0:
                continue
            return ckpt
        return None

    def _apply_checkpoint(self, ckpt: LoadedCheckpoint) -> None:
        missing, unexpected = self.model.load_state_dict(ckpt.model_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt.path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.state = ckpt.state
        if "torch_cpu" in ckpt.rng:
            torch.set_rng_state(ckpt.rng["torch_cpu"])
        self._pending_optimizer = (ckpt.optimizer_tensors, ckpt.optimizer_meta)
        if ckpt.extra.get("recipe_hash") != self._recipe_hash():
            log.warning("%s was written by a different recipe; continuing with the current one", ckpt.path.name)

    # -- the step ----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.recipe.runtime.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, batch: Mapping[str, Any], stage: StageSpec, step: int, lr: float) -> dict[str, Any]:
        """One optimizer step on the global batch; returns the logged record (``skipped`` set if skipped)."""
        recipe, dist_info = self.recipe, self.dist
        torch.manual_seed(derive_seed(recipe.seed, "torch", self.state.stage_index, step, dist_info.rank) % (2**63))
        generator = torch.Generator().manual_seed(
            derive_seed(recipe.seed, "objective", self.state.stage_index, step) % (2**63)
        )
        wav = torch.as_tensor(np.asarray(batch["wav"]) if not torch.is_tensor(batch["wav"]) else batch["wav"]).float()
        codes = torch.as_tensor(np.asarray(batch["codes"]) if not torch.is_tensor(batch["codes"]) else batch["codes"]).long()
        global_rows = wav.shape[0]
        if global_rows % dist_info.world_size:
            raise ConfigError(f"stage {stage.name!r}: batch of {global_rows} clips does not split over {dist_info.world_size} ranks")
        wav_in, mask, _ = self.objective.plan(
            wav, self.model.num_frames(wav.shape[1]), codes.shape[2], generator, train=True, label_valid=codes.ge(0).all(1)
        )
        per_rank = global_rows // dist_info.world_size
        lo = dist_info.rank * per_rank
        rows = slice(lo, lo + per_rank)
        clean_r, in_r, codes_r, mask_r = wav[rows], wav_in[rows], codes[rows], mask[rows]
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        while True:
            micro = min(self.micro_batch, per_rank)
            try:
                sums, n_micro = self._accumulate(clean_r, in_r, codes_r, mask_r, micro, per_rank)
                break
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if dist_info.enabled or micro <= 1:
                    raise UserError(
                        f"out of GPU memory at micro-batch {micro} clips of {stage.crop_seconds:g} s"
                        + (" under DDP" if dist_info.enabled else "")
                        + "; lower stages[].batch.micro_batch_clips or enable runtime.gradient_checkpointing"
                    ) from None
                self.micro_batch = max(1, micro // 2)
                self._event(
                    "oom",
                    f"CUDA out of memory: retrying step {self.state.global_step} with micro-batch {self.micro_batch} "
                    f"(accumulation x{math.ceil(per_rank / self.micro_batch)}, same effective batch)",
                )
        keys = list(sums)
        vec = torch.stack([sums[k].float().to(self.device) for k in keys])
        vec = _all_reduce_sum(vec, dist_info) / dist_info.world_size
        parts = {k: float(v) for k, v in zip(keys, vec.tolist())}
        max_norm = stage.clip_grad_norm if stage.clip_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm))
        loss = parts["loss"]
        record: dict[str, Any] = {**parts, "lr": lr, "grad_norm": grad_norm, "micro_batches": n_micro}
        skipped = None
        if not math.isfinite(loss):
            skipped = "non-finite loss"
        elif not math.isfinite(grad_norm):
            skipped = "non-finite gradient"
        else:
            spike = self._is_spike(loss)
            if spike is not None:
                record["spike_zscore"] = spike
                if self.recipe.faults.spike_action == "skip":
                    skipped = "loss spike"
                else:
                    self._event("spike", f"loss spike at step {self.state.global_step}: {loss:.4g} (z={spike:.1f}), kept")
        if skipped is None:
            self.optimizer.step()
            hist = self.state.loss_history
            hist.append(loss)
            del hist[: -self.recipe.faults.spike_window]
        self.optimizer.zero_grad(set_to_none=True)
        record["skipped"] = skipped
        return record

    def _accumulate(self, clean, inp, codes, mask, micro: int, per_rank: int) -> tuple[dict[str, torch.Tensor], int]:
        sums: dict[str, torch.Tensor] = {}
        starts = list(range(0, per_rank, micro))
        dev = self.device
        for i, s in enumerate(starts):
            e = min(s + micro, per_rank)
            weight = (e - s) / per_rank
            last = i == len(starts) - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.train_module.no_sync()
            with sync:
                with self._autocast():
                    loss, parts = self.train_module(
                        clean[s:e].to(dev, non_blocking=True),
                        inp[s:e].to(dev, non_blocking=True),
                        codes[s:e].to(dev, non_blocking=True),
                        mask[s:e].to(dev, non_blocking=True),
                    )
                (loss * weight).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * weight
        return sums, len(starts)

    def _is_spike(self, loss: float) -> float | None:
        f = self.recipe.faults
        hist = self.state.loss_history
        if f.spike_action == "off" or len(hist) < f.spike_min_history:
            return None
        mean = sum(hist) / len(hist)
        std = math.sqrt(sum((h - mean) ** 2 for h in hist) / (len(hist) - 1))
        z = (loss - mean) / max(std, 1e-8 * max(abs(mean), 1.0))
        return z if z > f.spike_zscore else None

    # -- stage / run ---------------------------------------------------------------------------------------
    def _enter_stage(self, index: int) -> None:
        stage = self.recipe.stages[index]
        self.param_names = self._set_trainable(stage, index)
        named = dict(self.model.named_parameters())
        self.trainable_params = [named[n] for n in self.param_names]
        self.optimizer = self._make_optimizer(stage, self.trainable_params, self.device)
        if self._pending_optimizer is not None:
            tensors, meta = self._pending_optimizer
            self._pending_optimizer = None
            if tensors or meta.get("param_groups"):
                if meta.get("param_names") != self.param_names:
                    raise CheckpointError("checkpoint optimizer state is for a different set of trainable parameters")
                self.optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
        module: nn.Module = _TrainModule(self.model, self.objective)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            find_unused = bool(self.model.config.layerdrop > 0 or self.recipe.objective.cqt_weight == 0)
            module = DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused,
                broadcast_buffers=False,
            )
        if self.recipe.runtime.compile:
            module = torch.compile(module)  # type: ignore[assignment]
        self.train_module = module
        clips = stage.global_clips()
        if clips % self.dist.world_size:
            raise ConfigError(
                f"stages.{index}.batch: {clips} clips do not split evenly over {self.dist.world_size} ranks"
            )
        per_rank = clips // self.dist.world_size
        self.micro_batch = stage.batch.micro_batch_clips or per_rank

    def _export(self, index: int, final: bool = False) -> Path:
        from culturemert.model import save_export

        stage = self.recipe.stages[index]
        name = "final" if final else f"stage-{index + 1}-{stage.name}"
        target = self.out / "exports" / name
        if self.dist.is_main:
            card = {
                "name": f"{self.recipe.name} ({name})",
                "recipe": self.recipe.model_dump(mode="json"),
                "stages": [
                    {"name": s.name, "steps": s.steps, "trainable": s.trainable, "clips": s.global_clips()}
                    for s in self.recipe.stages[: index + 1]
                ],
                "steps": self.state.global_step,
                "clips_seen": self.state.clips_seen,
                "data_hours": self.data_hours,
                "base": self.recipe.base.source or f"preset:{self.recipe.base.preset}",
                "base_fingerprint": self.state.base_fingerprint,
                "rollbacks": self.state.rollbacks,
            }
            save_export(self.model, target, card=card, base_fingerprint=self.state.base_fingerprint)
            log.info("export %s", target)
        _barrier(self.dist)
        return target

    def _export_is_current(self, index: int) -> bool:
        from culturemert.model import model_fingerprint

        meta = self.out / "exports" / f"stage-{index + 1}-{self.recipe.stages[index].name}" / "culturemert.json"
        try:
            return json.loads(meta.read_text())["fingerprint"] == model_fingerprint(self.model)
        except (OSError, ValueError, KeyError):
            return False

    def _rollback(self) -> None:
        f = self.recipe.faults
        if self.state.rollbacks >= f.max_rollbacks:
            raise UserError(
                f"{f.max_bad_steps} bad steps in a row after {self.state.rollbacks} rollback(s) at step "
                f"{self.state.global_step}; stopping (see {self.metrics_path})"
            )
        scale = self.state.lr_scale * f.rollback_lr_factor
        rollbacks = self.state.rollbacks + 1
        _barrier(self.dist)
        ckpt = self._newest_valid_checkpoint(good_only=True)
        if ckpt is not None:
            self._apply_checkpoint(ckpt)
            where = ckpt.path.name
        else:
            fingerprint = self.state.base_fingerprint
            fresh = self._build_model(self.n_codebooks, self.codebook_size)
            self.model.load_state_dict(fresh.state_dict())
            self.state = TrainState(base_fingerprint=fingerprint)
            self._pending_optimizer = None
            where = "the base model"
        self.state.lr_scale = scale
        self.state.rollbacks = rollbacks
        self.state.bad_streak = 0
        self._event(
            "rollback",
            f"{f.max_bad_steps} bad steps in a row: rolled back to {where} (global step {self.state.global_step}), "
            f"LR scale now {scale:g}",
            lr_scale=scale,
        )

    def run(self) -> Path | None:
        """Run (or continue) the recipe. Returns the final export dir, or None when stopped by ``max_steps``."""
        self.device = resolve_device(self.recipe.runtime.device, where="runtime.device")
        self.dist = init_distributed(self.device.type)
        recipe = self.recipe
        if self._source_factory is None:
            check_recipe_paths(recipe)
        sources = {}
        first_source = self._source(recipe.stages[0], 0)
        sources[0] = first_source
        self.n_codebooks, self.codebook_size = int(first_source.n_codebooks), int(first_source.codebook_size)
        tname = getattr(first_source, "teacher_name", None)
        if recipe.teacher.name is not None and tname is not None and recipe.teacher.name != tname:
            raise ConfigError(f"teacher.name is {recipe.teacher.name!r} but the prepared data was tokenised by {tname!r}")
        self.data_hours = first_source.hours() if hasattr(first_source, "hours") else {}

        existing = list_checkpoints(self.ckpt_dir)
        if self.resume == "never" and existing:
            raise UserError(
                f"{self.out} already holds checkpoints ({existing[-1].name}); pass --resume auto to continue "
                "or choose a new --out"
            )
        if self.dist.is_main and self.ckpt_dir.is_dir():
            for p in self.ckpt_dir.iterdir():  # temp dirs of a run killed while saving
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
        _barrier(self.dist)

        self.model = self._build_model(self.n_codebooks, self.codebook_size)
        from culturemert.model import model_fingerprint

        self.state = TrainState(base_fingerprint=model_fingerprint(self.model))
        self._pending_optimizer: tuple[dict, dict] | None = None
        ckpt = self._newest_valid_checkpoint() if self.resume == "auto" else None
        if ckpt is not None:
            self._apply_checkpoint(ckpt)
            log.info(
                "resuming from %s (stage %d %r, step %d)",
                ckpt.path.name,
                self.state.stage_index + 1,
                recipe.stages[min(self.state.stage_index, len(recipe.stages) - 1)].name,
                self.state.stage_step,
            )
        if self.only_stage is not None and self.state.stage_index < self.only_stage - 1:
            raise UserError(
                f"--stage {self.only_stage}: stage {self.state.stage_index + 1} has not finished in {self.out}; "
                "run the earlier stages first"
            )
        self.model.to(self.device)
        self.model.train()
        if recipe.runtime.gradient_checkpointing:
            self.model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cqt = self._cqt_module
        if cqt is None and recipe.objective.cqt_weight > 0:
            from culturemert.teachers import MertCQT

            cqt = MertCQT(fft_frames=recipe.teacher.cqt_fft_frames)
        self.objective = MertObjective(recipe.objective, cqt).to(self.device)
        self._open_logs(self.state.global_step)
        if ckpt is not None:
            self._write_metrics({"event": "resume", "checkpoint": ckpt.path.name, "global_step": self.state.global_step})
        try:
            return self._run_stages(sources)
        except StopTraining:
            return None
        finally:
            self.plot_losses()
            self._close_logs()

    def _run_stages(self, sources: dict[int, Any]) -> Path | None:
        recipe = self.recipe
        last_stage = (self.only_stage or len(recipe.stages)) - 1
        while self.state.stage_index <= last_stage:
            index = self.state.stage_index
            stage = recipe.stages[index]
            if self.state.stage_step >= stage.steps:  # finished before a crash: make sure it was exported
                if not self._export_is_current(index):
                    self._export(index)
                if index == len(recipe.stages) - 1 or index == last_stage:
                    break
                self.state.stage_index += 1
                self.state.stage_step = 0
                self.state.bad_streak = 0
                self._pending_optimizer = None
                continue
            source = sources.get(index) or self._source(stage, index)
            sources[index] = source
            self._enter_stage(index)
            rolled_back = self._run_stage(stage, index, source)
            if rolled_back:
                continue
            self._save()
            self._export(index)
            self.plot_losses()
        if self.only_stage is None or self.only_stage == len(recipe.stages):
            return self._export(len(recipe.stages) - 1, final=True)
        return self.out / "exports" / f"stage-{last_stage + 1}-{recipe.stages[last_stage].name}"

    def _run_stage(self, stage: StageSpec, index: int, source: Any) -> bool:
        """Train the stage from ``state.stage_step``; True if a rollback moved the state (re-enter the loop)."""
        recipe = self.recipe
        every = recipe.checkpoint.every_steps
        clips = stage.global_clips()
        flops_clip = train_flops_per_clip(self.model, stage.crop_samples, cqt=recipe.objective.cqt_weight > 0)
        peak = peak_flops(self.device)
        bar = None
        if self.dist.is_main and recipe.runtime.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stage.steps, initial=self.state.stage_step, desc=f"stage {index + 1} {stage.name}", dynamic_ncols=True)
        try:
            t_last = time.perf_counter()
            for batch in _iterate(source, self.state.stage_step, stage.steps):
                if self.max_steps is not None and self._steps_this_run >= self.max_steps:
                    self._save()
                    log.info("stopping after %d steps (--max-steps); resume with --resume auto", self._steps_this_run)
                    raise StopTraining
                step = self.state.stage_step
                lr = lr_at(step, stage.lr, stage.steps) * self.state.lr_scale
                record = self._train_step(batch, stage, step, lr)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                self.state.stage_step += 1
                self.state.global_step += 1
                self.state.clips_seen += clips
                self._steps_this_run += 1
                record.update(
                    global_step=self.state.global_step,
                    stage=stage.name,
                    stage_step=self.state.stage_step,
                    clips_per_s=clips / max(dt, 1e-9),
                    time=time.time(),
                )
                if peak:
                    record["mfu"] = flops_clip * record["clips_per_s"] / self.dist.world_size / peak
                if record["skipped"]:
                    self.state.bad_streak += 1
                    self._event("skip", f"step {self.state.global_step} skipped: {record['skipped']} (loss {record['loss']:.4g})")
                else:
                    self.state.bad_streak = 0
                if (self.state.global_step % recipe.runtime.log_every == 0) or record["skipped"]:
                    self._write_metrics(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", cps=f"{record['clips_per_s']:.1f}")
                if self.state.bad_streak >= recipe.faults.max_bad_steps:
                    self._rollback()
                    return True
                if self.state.stage_step < stage.steps and self.state.global_step % every == 0:
                    self._save()
        finally:
            if bar is not None:
                bar.close()
        return False
