"""MERT's size-dependent pre-training values, and the warning when a recipe's values belong to another size.

MERT-v1-95M and MERT-v1-330M were trained with different objective, crop and clipping values (MERT's
``mert_fairseq/config/pretrain/MERT_RVQ-VAE_CQT_95M.yaml`` and ``..._330M.yaml``). ``ObjectiveConfig`` and
``StageSpec`` default to the 95M values, so a 330M recipe that does not set them inherits 95M values without a
word; :func:`size_mismatches` lists every such key and :func:`warn_size_mismatches` logs them in one line.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from culturemert.label_grid import SAMPLE_RATE

if TYPE_CHECKING:  # pragma: no cover
    from culturemert.train.recipe import Recipe

log = logging.getLogger(__name__)

#: Published values per size. Objective keys are ``ObjectiveConfig`` fields; ``crop_samples`` is MERT's
#: ``max_sample_size`` (95M: 120 000 = 5 s; 330M: 122 880 = 5.12 s = 384 frames) and ``clip_grad_norm`` its
#: ``clip_norm``. ``mask_group_clips`` is the per-GPU forward batch that ``max_tokens`` allows, rounded down to
#: fairseq's multiple of 8 (95M: 2 000 000 / 120 000 -> 16; 330M: 900 000 / 122 880 -> 7).
MERT_SIZE_VALUES: dict[str, dict[str, Any]] = {
    "mert-v1-95m": {
        "feature_grad_mult": 0.1,
        "mixture_length_range": (12000, 24000),
        "mask_group_clips": 16,
        "crop_samples": 120_000,
        "clip_grad_norm": 10.0,
    },
    "mert-v1-330m": {
        "feature_grad_mult": 1.0,
        "mixture_length_range": (12000, 36000),
        "mask_group_clips": 7,
        "crop_samples": 122_880,
        "clip_grad_norm": 1.0,
    },
}

#: (hidden size, transformer layers) of each size, to recognise a loaded checkpoint.
_SHAPES = {(768, 12): "mert-v1-95m", (1024, 24): "mert-v1-330m"}
_NAME = re.compile(r"mert-v1-(95|330)m", re.IGNORECASE)


def declared_size(recipe: "Recipe") -> str | None:
    """The MERT size a recipe names: its ``base.preset``, or ``MERT-v1-95M`` / ``MERT-v1-330M`` in ``base.source``."""
    if recipe.base.preset is not None:
        key = recipe.base.preset.lower()
        return key if key in MERT_SIZE_VALUES else None
    match = _NAME.search(recipe.base.source or "")
    return f"mert-v1-{match.group(1)}m" if match else None


def model_size(model: Any) -> str | None:
    """The MERT size of a built model, from its hidden size and layer count (None for other shapes)."""
    config = getattr(model, "config", None)
    shape = (getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None))
    return _SHAPES.get(shape)


def size_mismatches(recipe: "Recipe", size: str | None) -> list[str]:
    """``key=value (MERT: published)`` for every recipe value that differs from MERT's published value for
    ``size``; empty for an unknown size (small/tiny presets, other architectures)."""
    published = MERT_SIZE_VALUES.get(size or "")
    if published is None:
        return []
    found = []
    objective = recipe.objective
    for key in ("feature_grad_mult", "mixture_length_range", "mask_group_clips"):
        value, want = getattr(objective, key), published[key]
        if (list(value) if isinstance(value, tuple) else value) != (list(want) if isinstance(want, tuple) else want):
            found.append(f"objective.{key}={_show(value)} (MERT: {_show(want)})")
    for i, stage in enumerate(recipe.stages):
        if stage.crop_samples != published["crop_samples"]:
            found.append(
                f"stages.{i}.crop_seconds={stage.crop_seconds:g} (MERT: {published['crop_samples'] / SAMPLE_RATE:g})"
            )
        if stage.clip_grad_norm != published["clip_grad_norm"]:
            found.append(f"stages.{i}.clip_grad_norm={_show(stage.clip_grad_norm)} (MERT: {_show(published['clip_grad_norm'])})")
    return found


def warn_size_mismatches(recipe: "Recipe", size: str | None, where: str) -> list[str]:
    """Log one warning naming every key whose value is not MERT's for ``size``; returns the keys' texts."""
    found = size_mismatches(recipe, size)
    if found:
        log.warning(
            "recipe %r: %s is %s-sized, but %s differ from MERT's published values for that size; set them in "
            "the recipe unless the difference is intended",
            recipe.name,
            where,
            size.replace("mert-v1-", "MERT-v1-").upper().replace("MERT-V1", "MERT-v1"),  # type: ignore[union-attr]
            ", ".join(found),
        )
    return found


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
