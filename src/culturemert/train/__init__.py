"""Continual pre-training: recipes, parameter groups, LR re-warming / re-decaying, and the resumable loop.

| file | owns |
|---|---|
| ``recipe.py`` | the recipe schema (``Recipe``, ``StageSpec`` and their sections), overrides, ``load_recipe``, shipped recipes |
| ``param_groups.py`` | which parameters a stage trains (aliases, ``layers[i:j]``, globs) |
| ``schedule.py`` | ``lr_at`` (warm-up and decay per stage), FLOPs per clip and peak FLOP/s (MFU) |
| ``sources.py`` | batch sources (prepared directories through the crop loader) |
| ``checkpoints.py`` | training checkpoints and resume state (``TrainState``) |
| ``distributed.py`` | torchrun / DDP set-up and collectives |
| ``validation.py`` | held-out validation per culture, per-culture training loss, forgetting alarm, best export |
| ``curves.py`` | ``loss_curve.png``: training loss per culture (EMA), validation per culture, learning rate |
| ``trainer.py`` | ``Trainer``: stages, the step, faults and rollback, logs, exports |
"""

from culturemert.train.recipe import (
    BaseSpec,
    BatchSpec,
    CheckpointSpec,
    DataSpec,
    FaultSpec,
    OptimizerSpec,
    Recipe,
    RuntimeSpec,
    ScheduleSpec,
    StageSpec,
    TeacherSpec,
    apply_overrides,
    check_recipe_paths,
    load_recipe,
    resolve_recipe,
    shipped_recipes,
)
from culturemert.train.validation import ForgettingSpec, ValidateSpec, ValidationPlan, plan_validation
from culturemert.train.param_groups import resolve_trainable
from culturemert.train.schedule import lr_at, peak_flops, train_flops_per_clip
from culturemert.train.checkpoints import TrainState, list_checkpoints, load_checkpoint
from culturemert.train.trainer import Trainer

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
    "check_recipe_paths",
    "resolve_recipe",
    "shipped_recipes",
    "ValidateSpec",
    "ForgettingSpec",
    "ValidationPlan",
    "plan_validation",
    "lr_at",
    "resolve_trainable",
    "train_flops_per_clip",
    "peak_flops",
    "TrainState",
    "Trainer",
    "list_checkpoints",
    "load_checkpoint",
]
