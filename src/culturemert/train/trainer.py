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
  back to the newest good checkpoint with the LR scaled by ``faults.rollback_lr_factor``;
* held-out validation per culture, the per-culture training loss, the forgetting alarm and ``exports/best``
  (:mod:`culturemert.train.validation`) hook in at each stage's start and after each step.

The global batch is the same whatever the world size and micro-batch: every rank draws the whole batch,
applies the (cheap) noise mixture and span masks to it, and then trains on its own disjoint rows, split into
micro-batches whose losses are weighted by their share of rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from culturemert.errors import CheckpointError, ConfigError, UserError
from culturemert.label_grid import SAMPLE_RATE
from culturemert.model import HeadsConfig, MertPretrainModel, PretrainingHeads, build_model, check_sample_rate, model_fingerprint
from culturemert.objective import MertObjective
from culturemert.runtime import derive_seed, resolve_device
from culturemert.train.checkpoints import LoadedCheckpoint, TrainState, list_checkpoints, load_checkpoint, optimizer_from_files, save_checkpoint
from culturemert.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from culturemert.train.param_groups import resolve_trainable
from culturemert.train.mert_sizes import declared_size, model_size, warn_size_mismatches
from culturemert.train.recipe import Recipe, StageSpec, check_recipe_paths
from culturemert.train.run_log import RunLog
from culturemert.train.schedule import lr_at, peak_flops, train_flops_per_clip
from culturemert.train.sources import PreparedSource, iterate_source
from culturemert.train.validation import ForgettingStop, Monitor, ValidationPlan, culture_train_losses, plan_validation

log = logging.getLogger(__name__)


class _TrainModule(nn.Module):
    def __init__(self, model: MertPretrainModel, objective: MertObjective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, clean, inp, codes, mask):  # type: ignore[override]
        out = self.objective(self.model, clean, inp, codes, mask)
        return out.loss, out.parts, out.rows


class StopTraining(Exception):
    """Raised internally when ``max_steps`` is reached (the run is resumable)."""


#: An optimizer state as stored in a training checkpoint: (tensors, JSON metadata).
OptimizerState = tuple[dict[str, torch.Tensor], dict[str, Any]]


@dataclass
class _RolledBack:
    """A stage ended early by a rollback; training resumes with this optimizer state (None: a fresh optimizer)."""

    optimizer_state: OptimizerState | None


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
        if only_stage is not None and not 1 <= only_stage <= len(recipe.stages):
            raise ConfigError(f"--stage {only_stage}: the recipe has stages 1..{len(recipe.stages)}")
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
        self._steps_this_run = 0
        # Created by setup(): the run's state. Declared here so the class's attributes are all in one place.
        self.device: torch.device
        self.dist: DistInfo
        self.run_log: RunLog
        self.sources: dict[int, Any] = {}
        self.n_codebooks = 0
        self.codebook_size = 0
        self.data_hours: dict[str, float] = {}
        self.model: MertPretrainModel
        self.state: TrainState
        self.objective: MertObjective
        self.resumed_from: LoadedCheckpoint | None = None
        self.validation_plan: ValidationPlan
        self.monitor: Monitor
        self.stopped: ForgettingStop | None = None  # set when the forgetting alarm ended the run
        self._rows: list[dict[str, torch.Tensor]] = []  # per-row loss sums of the current step (per-culture loss)
        # Created per stage by _enter_stage().
        self.param_names: list[str] = []
        self.trainable_params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer
        self.train_module: nn.Module
        self.micro_batch = 0

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
        check_sample_rate(model, SAMPLE_RATE, "pre-training on the 75 Hz label grid", str(base.source))
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
    def _write_metrics(self, record: dict[str, Any]) -> None:
        self.run_log.write(record)

    def _event(self, kind: str, message: str, **fields: Any) -> None:
        self.run_log.event(kind, message, self.state.global_step, **fields)

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
        barrier(self.dist)

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

    def _apply_checkpoint(self, ckpt: LoadedCheckpoint) -> OptimizerState:
        """Load the checkpoint's weights, state and RNG; return its optimizer state for the next ``_enter_stage``."""
        missing, unexpected = self.model.load_state_dict(ckpt.model_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt.path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.state = ckpt.state
        if "torch_cpu" in ckpt.rng:
            torch.set_rng_state(ckpt.rng["torch_cpu"])
        if ckpt.extra.get("recipe_hash") != self._recipe_hash():
            log.warning("%s was written by a different recipe; continuing with the current one", ckpt.path.name)
        return ckpt.optimizer_tensors, ckpt.optimizer_meta

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
        vec = all_reduce_sum(vec, dist_info) / dist_info.world_size
        parts = {k: float(v) for k, v in zip(keys, vec.tolist())}
        max_norm = stage.clip_grad_norm if stage.clip_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm))
        loss = parts["loss"]
        record: dict[str, Any] = {**parts, "lr": lr, "grad_norm": grad_norm, "micro_batches": n_micro}
        record.update(self._culture_losses(batch, rows))
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
        self._rows = []
        starts = list(range(0, per_rank, micro))
        dev = self.device
        for i, s in enumerate(starts):
            e = min(s + micro, per_rank)
            weight = (e - s) / per_rank
            last = i == len(starts) - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.train_module.no_sync()
            with sync:
                with self._autocast():
                    loss, parts, rows = self.train_module(
                        clean[s:e].to(dev, non_blocking=True),
                        inp[s:e].to(dev, non_blocking=True),
                        codes[s:e].to(dev, non_blocking=True),
                        mask[s:e].to(dev, non_blocking=True),
                    )
                (loss * weight).backward()
            self._rows.append(rows)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * weight
        return sums, len(starts)

    def _culture_losses(self, batch: Mapping[str, Any], rows: slice) -> dict[str, Any]:
        """``culture_loss`` / ``culture_clips`` of this step (empty when the batch does not name its cultures)."""
        cultures = batch.get("culture")
        if not cultures or not self._rows:
            return {}
        merged = {k: torch.cat([r[k] for r in self._rows]) for k in self._rows[0]}
        cfg = self.recipe.objective
        return culture_train_losses(list(cultures), merged, rows, pred_weight=cfg.pred_masked_weight,
                                    cqt_weight=cfg.cqt_weight, dist_info=self.dist)

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
    def _enter_stage(self, index: int, optimizer_state: OptimizerState | None) -> None:
        """Set the stage's trainable parameters and a fresh optimizer (with ``optimizer_state`` when resuming)."""
        stage = self.recipe.stages[index]
        self.param_names = self._set_trainable(stage, index)
        named = dict(self.model.named_parameters())
        self.trainable_params = [named[n] for n in self.param_names]
        self.optimizer = self._make_optimizer(stage, self.trainable_params, self.device)
        if optimizer_state is not None:
            tensors, meta = optimizer_state
            if tensors or meta.get("param_groups"):
                if meta.get("param_names") != self.param_names:
                    raise CheckpointError("checkpoint optimizer state is for a different set of trainable parameters")
                self.optimizer.load_state_dict(optimizer_from_files(tensors, meta))
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

    def _export(self, index: int, final: bool = False, name: str | None = None) -> Path:
        """Write ``exports/<name>`` (default: ``final`` or ``stage-<i>-<stage name>``) from the current weights."""
        from culturemert.model import save_export

        stage = self.recipe.stages[index]
        name = name or ("final" if final else f"stage-{index + 1}-{stage.name}")
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
            card.update(self.monitor.card_fields(name))
            save_export(self.model, target, card=card, base_fingerprint=self.state.base_fingerprint)
            log.info("export %s", target)
        barrier(self.dist)
        return target

    def _export_is_current(self, index: int) -> bool:
        from culturemert.model import model_fingerprint

        meta = self.out / "exports" / f"stage-{index + 1}-{self.recipe.stages[index].name}" / "culturemert.json"
        try:
            return json.loads(meta.read_text())["fingerprint"] == model_fingerprint(self.model)
        except (OSError, ValueError, KeyError):
            return False

    def _rollback(self) -> OptimizerState | None:
        """Go back to the newest good checkpoint (or the base) with a lower LR; return that checkpoint's optimizer state."""
        f = self.recipe.faults
        if self.state.rollbacks >= f.max_rollbacks:
            raise UserError(
                f"{f.max_bad_steps} bad steps in a row after {self.state.rollbacks} rollback(s) at step "
                f"{self.state.global_step}; stopping (see {self.metrics_path})"
            )
        scale = self.state.lr_scale * f.rollback_lr_factor
        rollbacks = self.state.rollbacks + 1
        barrier(self.dist)
        ckpt = self._newest_valid_checkpoint(good_only=True)
        optimizer_state = None
        if ckpt is not None:
            optimizer_state = self._apply_checkpoint(ckpt)
            where = ckpt.path.name
        else:
            fingerprint = self.state.base_fingerprint
            fresh = self._build_model(self.n_codebooks, self.codebook_size)
            self.model.load_state_dict(fresh.state_dict())
            self.state = TrainState(base_fingerprint=fingerprint)
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
        return optimizer_state

    def setup(self) -> OptimizerState | None:
        """Create the run's state: device, process group, data sources, model (resumed if a checkpoint verifies),
        objective and logs. Returns the resumed checkpoint's optimizer state (None on a fresh start).

        Raises:
            ConfigError: a recipe that does not fit the data (teacher, stage index).
            UserError: checkpoints in ``out_dir`` with ``resume="never"``; ``only_stage`` before its predecessors.
        """
        recipe = self.recipe
        self.device = resolve_device(recipe.runtime.device, where="runtime.device")
        self.dist = init_distributed(self.device.type)
        if self._source_factory is None:
            check_recipe_paths(recipe)
        first_source = self._source(recipe.stages[0], 0)
        self.sources = {0: first_source}
        self.n_codebooks, self.codebook_size = int(first_source.n_codebooks), int(first_source.codebook_size)
        tname = getattr(first_source, "teacher_name", None)
        if recipe.teacher.name is not None and tname is not None and recipe.teacher.name != tname:
            raise ConfigError(f"teacher.name is {recipe.teacher.name!r} but the prepared data was tokenised by {tname!r}")
        self.data_hours = first_source.hours()
        self.validation_plan = plan_validation(recipe, datasets=self._datasets, source=first_source)

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
        barrier(self.dist)

        self.model = self._build_model(self.n_codebooks, self.codebook_size)
        if model_size(self.model) != declared_size(recipe):  # a base whose name hides its size: check its shape
            warn_size_mismatches(recipe, model_size(self.model), f"base {recipe.base.source or recipe.base.preset}")
        self.state = TrainState(base_fingerprint=model_fingerprint(self.model))
        optimizer_state = None
        ckpt = self._newest_valid_checkpoint() if self.resume == "auto" else None
        if ckpt is not None:
            optimizer_state = self._apply_checkpoint(ckpt)
            log.info(
                "resuming from %s (stage %d %r, step %d)",
                ckpt.path.name,
                self.state.stage_index + 1,
                recipe.stages[min(self.state.stage_index, len(recipe.stages) - 1)].name,
                self.state.stage_step,
            )
        self.resumed_from = ckpt
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
        self.run_log = RunLog(self.out, is_main=self.dist.is_main, tensorboard=recipe.runtime.tensorboard, title=recipe.name)
        self.monitor = Monitor(self, self.validation_plan)
        return optimizer_state

    def run(self) -> Path | None:
        """Run (or continue) the recipe. Returns the final export dir, None when stopped by ``max_steps``, or
        ``exports/last-good`` when the forgetting alarm stopped the run (then :attr:`stopped` says why)."""
        optimizer_state = self.setup()
        self.run_log.open(self.state.global_step if self.resumed_from is not None else -1)
        if self.resumed_from is not None:
            self._write_metrics({"event": "resume", "checkpoint": self.resumed_from.path.name, "global_step": self.state.global_step})
        try:
            return self._run_stages(optimizer_state)
        except StopTraining:
            return None
        except ForgettingStop as stop:
            self.stopped = stop
            return Path(stop.export)
        finally:
            self.run_log.plot()
            self.run_log.close()

    def _run_stages(self, optimizer_state: OptimizerState | None) -> Path | None:
        recipe, sources = self.recipe, self.sources
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
                optimizer_state = None
                continue
            source = sources.get(index) or self._source(stage, index)
            sources[index] = source
            self._enter_stage(index, optimizer_state)
            optimizer_state = None
            self.monitor.stage_start(index)
            rollback = self._run_stage(stage, index, source)
            if rollback is not None:
                optimizer_state = rollback.optimizer_state
                continue
            self._save()
            self._export(index)
            self.run_log.plot()
        if self.only_stage is None or self.only_stage == len(recipe.stages):
            return self._export(len(recipe.stages) - 1, final=True)
        return self.out / "exports" / f"stage-{last_stage + 1}-{recipe.stages[last_stage].name}"

    def _run_stage(self, stage: StageSpec, index: int, source: Any) -> _RolledBack | None:
        """Train the stage from ``state.stage_step``; a :class:`_RolledBack` if a rollback moved the state."""
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
            for batch in iterate_source(source, self.state.stage_step, stage.steps):
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
                    return _RolledBack(self._rollback())
                self.monitor.after_step(index)
                if self.state.stage_step < stage.steps and self.state.global_step % every == 0:
                    self._save()
        finally:
            if bar is not None:
                bar.close()
        return None
