"""Held-out validation per culture while a run trains: the fixed validation set, its evaluation, the per-culture
training loss, the forgetting alarm and the best export.

The question a continual pre-training run has to answer while it runs is "is the model learning the new
traditions, and is it forgetting the old one?". The answer is the masked-prediction loss (and accuracy, and the
CQT loss) on *held-out* crops of each culture, measured on the same crops with the same masks at every point:

* the **validation set** (:class:`ValidationSet`) is ``validate.crops_per_culture`` crops of ``crop_seconds`` per
  culture, spread evenly over the ``validate.split`` items of every prepared directory (replay data included), in
  fixed batches of ``validate.batch_clips``; each batch has its own mask, drawn from a generator seeded by (seed
  derived from the recipe's, culture, batch), and no noise mixture (``train=False``). Batch ``k`` of a culture is
  a pure function of the data and the seed, so every point, every resumed run and every world size sees the same
  crops and masks;
* :func:`evaluate_validation_set` runs the model (eval mode, no gradients) on those batches; under torchrun batch
  ``j`` goes to rank ``j mod world``, each rank sums masked-frame counts, per-codebook cross-entropy sums, correct
  counts and CQT squared errors, and one all-reduce gives every rank the same totals;
* :class:`Monitor` validates at the start of each stage (the forgetting alarm's reference), every
  ``validate.every_steps`` global steps and at each stage end; it logs the points, raises the forgetting alarm,
  keeps ``exports/best`` and (with ``action: stop``) ``exports/last-good``. Its state lives in the checkpoint's
  ``TrainState.monitor``, so a resumed run makes the same decisions.

The same :func:`evaluate_validation_set` gives the quickstart's held-out table (``culturemert.quickstart``).

Metrics per culture (nats per masked frame, as in training): ``pred_loss`` = cross-entropy summed over codebooks,
averaged over masked frames (MERT's masked-prediction term); ``ce_k`` / ``acc_k`` per codebook; ``acc`` = mean of
the ``acc_k``; ``cqt_mse`` (with a CQT term); ``loss`` = ``pred_masked_weight * pred_loss + cqt_weight * cqt_mse``,
the objective without the feature penalty (a regulariser on activations, not a measure of prediction).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from culturemert.config import StrictModel
from culturemert.errors import ConfigError
from culturemert.files import write_json_atomic
from culturemert.runtime import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from culturemert.objective import MertObjective
    from culturemert.train.distributed import DistInfo
    from culturemert.train.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = [
    "ForgettingSpec",
    "ValidateSpec",
    "HeldOutCulture",
    "ValidationSet",
    "ValidationPlan",
    "ForgettingStop",
    "Monitor",
    "validation_seed",
    "prepared_validation_set",
    "plan_validation",
    "evaluate_validation_set",
    "culture_train_losses",
    "validation_points",
]


# ======================================================================================================
# recipe keys
# ======================================================================================================
class ForgettingSpec(StrictModel):
    """The forgetting alarm: fires when a protected culture's validation loss rises above the stage's start.

    With ``relative`` the limit is ``start * (1 + tolerance)``, otherwise ``start + tolerance`` (nats).
    ``action: stop`` ends the run at the first alarm; the weights of the last validation point within tolerance
    are then in ``exports/last-good``.
    """

    cultures: list[str] = Field(min_length=1)
    tolerance: float = Field(0.05, ge=0.0)
    relative: bool = True
    action: Literal["warn", "stop"] = "warn"


class ValidateSpec(StrictModel):
    """``validate:`` recipe section (``validate: null`` turns validation off)."""

    every_steps: int | None = Field(500, ge=1)  # global steps; None: only at stage starts and ends
    split: str = "valid"
    crops_per_culture: int = Field(32, ge=1)
    batch_clips: int = Field(8, ge=1)  # crops per forward pass (and per mask draw)
    crop_seconds: float | None = Field(None, gt=0)  # None: the first stage's crop_seconds
    cultures: list[str] | None = None  # None: every culture with held-out crops
    new: list[str] | None = None  # cultures whose mean selects exports/best; None: see _new_cultures
    metric: Literal["loss", "pred_loss", "cqt_mse"] = "loss"
    best_export: bool = True
    # Estimated validation compute / training compute (forward-only crops count a third of a training crop);
    # a recipe over this fails before any compute.
    max_overhead: float = Field(0.05, gt=0.0)
    forgetting: ForgettingSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ValidateSpec":
        if self.cultures is not None:
            for key, names in (("forgetting.cultures", self.forgetting.cultures if self.forgetting else []),
                               ("new", self.new or [])):
                outside = sorted(set(names) - set(self.cultures))
                if outside:
                    raise ValueError(f"validate.{key}: {outside} not in validate.cultures {self.cultures}")
        return self


def format_duration(seconds: float) -> str:
    """``12.3 h`` from an hour up, ``4.5 min`` below (held-out audio of small corpora is minutes)."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def validation_seed(recipe_seed: int) -> int:
    """The seed of the validation crops and masks of a run with ``recipe_seed`` (the quickstart uses it too)."""
    return derive_seed(recipe_seed, "validate") % (2**31)


def _mask_seed(seed: int, culture: str, batch: int) -> int:
    return derive_seed(seed, "validate-mask", culture, batch)


# ======================================================================================================
# the validation set
# ======================================================================================================
@dataclass
class HeldOutCulture:
    """The fixed held-out crops of one culture: ``crops`` crops in batches of ``batch_clips`` (the last may be short).

    ``draw(k)`` returns batch ``k`` as ``{"wav": float32 [batch_clips, L], "codes": int64 [batch_clips, K, L/320]}``
    and must be a pure function of ``k``. ``heldout_seconds`` is the audio the crops are drawn from (None: unknown).
    """

    name: str
    crops: int
    batch_clips: int
    crop_samples: int
    draw: Callable[[int], Mapping[str, Any]]
    heldout_seconds: float | None = None

    @property
    def n_batches(self) -> int:
        return math.ceil(self.crops / self.batch_clips)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k``: (wav float32 [b, L], codes int64 [b, K, T]), cut to the crops that remain."""
        data = self.draw(k)
        rows = min(self.batch_clips, self.crops - k * self.batch_clips)
        wav = torch.as_tensor(np.asarray(data["wav"]) if not torch.is_tensor(data["wav"]) else data["wav"]).float()
        codes = torch.as_tensor(np.asarray(data["codes"]) if not torch.is_tensor(data["codes"]) else data["codes"]).long()
        return wav[:rows], codes[:rows]


@dataclass
class ValidationSet:
    """Held-out crops per culture, plus the cultures that have none (``missing``: culture -> why)."""

    cultures: dict[str, HeldOutCulture]
    split: str
    seed: int
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def crops(self) -> int:
        return sum(c.crops for c in self.cultures.values())

    def batches(self) -> list[tuple[str, int]]:
        """Every (culture, batch) in a fixed order: cultures sorted, batches ascending."""
        return [(name, k) for name in sorted(self.cultures) for k in range(self.cultures[name].n_batches)]


def _spread_crops(datasets: Sequence[Any], rows: list[tuple[int, int]], crops: int, crop_samples: int) -> list[tuple[int, int, int]]:
    """``crops`` crop positions spread evenly over the concatenated 320-sample grid positions of ``rows``
    ((dataset, item) pairs): crop ``j`` takes position ``floor((j + 0.5) * N / crops)`` of the ``N`` in total, so
    every item gets crops in proportion to its length and no position is taken twice while ``crops <= N``."""
    from culturemert.label_grid import HOP_LENGTH

    n_pos = np.array([max((int(datasets[d].length[i]) - crop_samples) // HOP_LENGTH + 1, 1) for d, i in rows])
    bounds = np.concatenate([[0], np.cumsum(n_pos)])
    total = int(bounds[-1])
    out = []
    for j in range(crops):
        g = min(int((j + 0.5) * total / crops), total - 1)
        r = int(np.searchsorted(bounds, g, side="right") - 1)
        out.append((rows[r][0], rows[r][1], (g - int(bounds[r])) * HOP_LENGTH))
    return out


def _crop_batch(datasets: Sequence[Any], crops: list[tuple[int, int, int]], crop_samples: int) -> dict[str, np.ndarray]:
    """The audio and codes of ``crops`` ((dataset, item, start sample)); short items are zero-padded with PAD_CODE labels."""
    from culturemert.audio import int16_to_float
    from culturemert.data.loader import PAD_CODE
    from culturemert.label_grid import HOP_LENGTH

    frames = crop_samples // HOP_LENGTH
    n_cb = datasets[crops[0][0]].n_codebooks
    wav = np.zeros((len(crops), crop_samples), np.float32)
    codes = np.full((len(crops), n_cb, frames), PAD_CODE, np.int64)
    for b, (d, i, start) in enumerate(crops):
        audio = datasets[d].audio(i)[start : start + crop_samples]
        int16_to_float(audio, out=wav[b, : audio.size])
        part = datasets[d].codes(i)[:, start // HOP_LENGTH : start // HOP_LENGTH + frames]
        codes[b, :, : part.shape[1]] = part
    return {"wav": wav, "codes": codes}


def prepared_validation_set(
    datasets: Sequence[Any],
    *,
    split: str,
    crops_per_culture: int,
    batch_clips: int,
    crop_samples: int,
    seed: int,
    short_items: Literal["skip", "pad"] = "skip",
    cultures: Sequence[str] | None = None,
) -> ValidationSet:
    """The validation set of prepared directories: per culture, ``crops_per_culture`` crops spread evenly over the
    ``split`` items of every directory (cultures pooled across directories, as in training; items in directory
    and index order, weight-0 items left out, items shorter than the crop only with ``short_items="pad"``).

    Evenly spread, not drawn at random: random crops of a few minutes of held-out audio move a culture's loss by
    tenths of a nat from one crop set to another; spread crops cover every held-out item in proportion to its
    length. ``seed`` only seeds the masks. ``datasets`` are :class:`culturemert.data.PreparedDataset` objects. A
    culture without usable held-out items goes to ``missing`` with the reason; ``cultures`` restricts the set
    (the others are ignored, not missing).
    """
    everywhere: set[str] = set()
    heldout: dict[str, float] = {}
    rows: dict[str, list[tuple[int, int]]] = {}
    for d_i, d in enumerate(datasets):
        everywhere.update(str(c) for c in d.culture)
        for i in np.flatnonzero((d.split == split) & (d.weight > 0)):
            c = str(d.culture[i])
            heldout[c] = heldout.get(c, 0.0) + float(d.length[i]) / d.sample_rate
            if short_items == "pad" or d.length[i] >= crop_samples:
                rows.setdefault(c, []).append((d_i, int(i)))
    wanted = sorted(everywhere) if cultures is None else list(cultures)
    out: dict[str, HeldOutCulture] = {}
    missing: dict[str, str] = {}
    for culture in wanted:
        if culture not in everywhere:
            missing[culture] = "not in the prepared data"
        elif culture not in heldout:
            missing[culture] = f"no items in split {split!r}"
        elif culture not in rows:
            missing[culture] = f"every {split!r} item is shorter than the {crop_samples / 24000:g}-s crop"
        else:
            spread = _spread_crops(datasets, rows[culture], crops_per_culture, crop_samples)

            def draw(k: int, spread=spread) -> dict[str, np.ndarray]:
                return _crop_batch(datasets, spread[k * batch_clips : (k + 1) * batch_clips], crop_samples)

            out[culture] = HeldOutCulture(culture, crops_per_culture, batch_clips, crop_samples, draw, heldout[culture])
    return ValidationSet(out, split, seed, missing)


# ======================================================================================================
# evaluation
# ======================================================================================================
def _metric_names(n_codebooks: int, cqt: bool) -> list[str]:
    return ["masked", *(f"ce_{k}" for k in range(n_codebooks)), *(f"correct_{k}" for k in range(n_codebooks)),
            *(["cqt_se"] if cqt else []), "crops"]


@torch.no_grad()
def evaluate_validation_set(
    model: torch.nn.Module,
    objective: "MertObjective",
    vset: ValidationSet,
    *,
    device: torch.device | None = None,
    dist_info: "DistInfo | None" = None,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-culture metrics of ``model`` on the validation set (see the module docstring for their definitions).

    The model is put in eval mode for the pass and given back in the mode it had. Under ``dist_info`` (torchrun)
    rank r evaluates batches r, r + world, ... of :meth:`ValidationSet.batches` and the sums are all-reduced, so
    every rank returns the same numbers (equal to one process up to float summation order).
    """
    import contextlib

    from culturemert.train.distributed import DistInfo, all_reduce_sum

    inner = getattr(model, "module", model)
    heads = inner.heads
    if heads is None:
        raise ConfigError("validation needs a model with pre-training heads")
    n_cb = heads.config.n_codebooks
    cfg = objective.config
    cqt = objective.cqt is not None
    dist_info = dist_info or DistInfo()
    device = device or next(inner.parameters()).device
    names = _metric_names(n_cb, cqt)
    cultures = sorted(vset.cultures)
    totals = torch.zeros(len(cultures), len(names), dtype=torch.float64, device=device)
    was_training = inner.training
    inner.eval()
    try:
        for j, (culture, k) in enumerate(vset.batches()):
            if j % dist_info.world_size != dist_info.rank:
                continue
            wav, codes = vset.cultures[culture].batch(k)
            gen = torch.Generator().manual_seed(_mask_seed(vset.seed, culture, k))
            wav_in, mask, _ = objective.plan(
                wav, inner.num_frames(wav.shape[1]), codes.shape[2], gen, train=False, label_valid=codes.ge(0).all(1)
            )
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                out = objective(inner, wav.to(device), wav_in.to(device), codes.to(device), mask.to(device))
            n = float(out.num_masked)
            row = [n, *(float(out.parts[f"ce_{i}"]) * n for i in range(n_cb)),
                   *(float(out.parts[f"acc_{i}"]) * n for i in range(n_cb))]
            if cqt:
                row.append(float(out.parts["cqt_mse"]) * n)
            row.append(float(wav.shape[0]))
            totals[cultures.index(culture)] += torch.tensor(row, dtype=torch.float64, device=device)
    finally:
        inner.train(was_training)
    if dist_info.enabled:
        # gloo and NCCL both reduce float64; one collective for every culture and metric
        totals = all_reduce_sum(totals, dist_info)
    results: dict[str, dict[str, float]] = {}
    for i, culture in enumerate(cultures):
        t = dict(zip(names, totals[i].tolist()))
        masked = max(t["masked"], 1.0)
        m: dict[str, float] = {}
        for k in range(n_cb):
            m[f"ce_{k}"] = t[f"ce_{k}"] / masked
            m[f"acc_{k}"] = t[f"correct_{k}"] / masked
        m["pred_loss"] = sum(m[f"ce_{k}"] for k in range(n_cb))
        m["acc"] = sum(m[f"acc_{k}"] for k in range(n_cb)) / n_cb
        m["loss"] = cfg.pred_masked_weight * m["pred_loss"]
        if cqt:
            m["cqt_mse"] = t["cqt_se"] / masked
            m["loss"] += cfg.cqt_weight * m["cqt_mse"]
        m["crops"] = t["crops"]
        m["masked_frames"] = t["masked"]
        results[culture] = m
    return results


def culture_train_losses(
    cultures: Sequence[str],
    rows: Mapping[str, torch.Tensor],
    rank_rows: slice,
    *,
    pred_weight: float,
    cqt_weight: float,
    dist_info: "DistInfo",
) -> dict[str, Any]:
    """Training loss per culture of one global batch: ``{"culture_loss": {c: loss}, "culture_clips": {c: n}}``.

    ``cultures`` names every clip of the global batch; ``rows`` are this rank's per-row sums
    (:attr:`culturemert.objective.ObjectiveOutput.rows`, concatenated over micro-batches) for the global rows
    ``rank_rows``. Loss = ``pred_weight * sum(pred_sum) / sum(masked) + cqt_weight * sum(cqt_sum) / sum(masked)``
    over the culture's rows (feature penalty excluded, as in validation); one all-reduce under torchrun.
    """
    from culturemert.train.distributed import all_reduce_sum

    names = sorted(set(cultures))
    mine = list(cultures)[rank_rows]
    keys = ["masked", "pred_sum", *(["cqt_sum"] if "cqt_sum" in rows else [])]
    device = rows["masked"].device
    index = torch.tensor([names.index(c) for c in mine], device=device, dtype=torch.long)
    sums = torch.zeros(len(names), len(keys), dtype=torch.float64, device=device)
    for j, key in enumerate(keys):
        sums[:, j].index_add_(0, index, rows[key].double())
    sums = all_reduce_sum(sums, dist_info).tolist()
    losses: dict[str, float] = {}
    for name, vals in zip(names, sums):
        t = dict(zip(keys, vals))
        if t["masked"] <= 0:
            continue
        loss = pred_weight * t["pred_sum"] / t["masked"]
        if "cqt_sum" in t:
            loss += cqt_weight * t["cqt_sum"] / t["masked"]
        losses[name] = loss
    counts = {name: sum(1 for c in cultures if c == name) for name in names}
    return {"culture_loss": losses, "culture_clips": counts}


# ======================================================================================================
# planning (what --check prints, what setup checks before any compute)
# ======================================================================================================
def validation_points(stage_steps: Sequence[int], every: int | None) -> list[int]:
    """Global steps at which a run validates: each stage's start and end, and every ``every`` steps."""
    points: set[int] = set()
    offset = 0
    for steps in stage_steps:
        points.update((offset, offset + steps))
        offset += steps
    if every:
        points.update(range(every, offset + 1, every))
    return sorted(points)


@dataclass
class ValidationPlan:
    """What a run will validate on, decided before any compute (``vset`` None: validation is off, ``reason`` says why)."""

    spec: ValidateSpec | None
    vset: ValidationSet | None
    reason: str = ""
    crop_seconds: float = 0.0
    points: list[int] = field(default_factory=list)
    overhead: float = 0.0
    new: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.vset is not None and bool(self.vset.cultures)

    def describe(self) -> list[str]:
        """Lines for ``pretrain --check`` and the log."""
        if not self.enabled:
            return [f"validation: off ({self.reason})"]
        spec, vset = self.spec, self.vset
        assert spec is not None and vset is not None
        when = f"every {spec.every_steps} steps + " if spec.every_steps else ""
        lines = [
            f"validation: split {vset.split!r}, {spec.crops_per_culture} crops x {self.crop_seconds:g} s per culture "
            f"({spec.crops_per_culture * self.crop_seconds:g} s), {when}stage starts/ends = {len(self.points)} points; "
            f"metric {spec.metric}"
        ]
        for name, c in sorted(vset.cultures.items()):
            held = f" from {format_duration(c.heldout_seconds)} of held-out audio" if c.heldout_seconds is not None else ""
            lines.append(f"  {name}: {c.crops} crops ({c.crops * self.crop_seconds:g} s){held}")
        for name, why in sorted(vset.missing.items()):
            lines.append(f"  not validated: {name} ({why})")
        lines.append(f"  best export: mean {spec.metric} over {', '.join(self.new)}" if spec.best_export and self.new
                     else "  best export: off")
        if spec.forgetting is not None:
            f = spec.forgetting
            tol = f"{100 * f.tolerance:g} % of" if f.relative else f"{f.tolerance:g} nats above"
            lines.append(f"  forgetting alarm: {', '.join(self.protected)}, tolerance {tol} the stage's starting "
                         f"value, action {f.action}")
        lines.append(f"  estimated cost: {100 * self.overhead:.2f} % of training compute "
                     f"(validate.max_overhead {100 * spec.max_overhead:g} %)")
        return lines


def _new_cultures(recipe: Any, spec: ValidateSpec, validated: Sequence[str], protected: Sequence[str]) -> list[str]:
    """The new traditions: ``validate.new``, else the cultures some stage draws as a source (not replay only)."""
    if spec.new is not None:
        return list(spec.new)
    mixtures = [s.mixture or recipe.data.mixture for s in recipe.stages]
    if any(m is None for m in mixtures):  # a stage mixing everything by hours: every culture is trained on
        sourced = set(validated)
    else:
        sourced = {c for m in mixtures for c, w in m.sources.items() if w > 0}
    new = [c for c in validated if c in sourced and c not in protected]
    return new or [c for c in validated if c not in protected] or list(validated)


def plan_validation(recipe: Any, *, datasets: Sequence[Any] | None = None, source: Any = None) -> ValidationPlan:
    """Build the run's validation set and check it against the recipe, before any model is built.

    The set comes from the prepared ``datasets``, or from ``source.held_out(spec, crop_samples, seed)`` for a
    custom batch source; a source without ``held_out`` means validation is off (said in the log and by --check).

    Raises:
        ConfigError: ``validate.cultures`` / ``validate.new`` / ``validate.forgetting.cultures`` name a culture
            without held-out crops, or the estimated cost exceeds ``validate.max_overhead``.
    """
    from culturemert.label_grid import crop_samples as to_samples

    spec: ValidateSpec | None = recipe.validate
    if spec is None:
        return ValidationPlan(None, None, "validate: null in the recipe")
    crop_seconds = spec.crop_seconds or recipe.stages[0].crop_seconds
    samples = to_samples(crop_seconds)
    seed = validation_seed(recipe.seed)
    if datasets is not None:
        vset = prepared_validation_set(
            datasets, split=spec.split, crops_per_culture=spec.crops_per_culture, batch_clips=spec.batch_clips,
            crop_samples=samples, seed=seed, short_items=recipe.data.short_items, cultures=spec.cultures,
        )
    elif source is not None and callable(getattr(source, "held_out", None)):
        vset = source.held_out(spec, samples, seed)
    else:
        return ValidationPlan(spec, None, "the batch source provides no held-out data")
    if vset is None:
        return ValidationPlan(spec, None, "the batch source provides no held-out data")
    wanted = [*(spec.cultures or []), *(spec.new or []), *(spec.forgetting.cultures if spec.forgetting else [])]
    for culture in wanted:
        if culture not in vset.cultures:
            why = vset.missing.get(culture, f"not in the data (validated: {sorted(vset.cultures)})")
            key = ("validate.forgetting.cultures" if spec.forgetting and culture in spec.forgetting.cultures
                   else "validate.new" if culture in (spec.new or []) else "validate.cultures")
            raise ConfigError(f"{key}: {culture!r} has no held-out crops ({why}); prepare a {spec.split!r} split for it "
                              "or remove it")
    if not vset.cultures:
        reasons = "; ".join(f"{c}: {why}" for c, why in sorted(vset.missing.items())) or "no cultures"
        return ValidationPlan(spec, None, f"no held-out crops in split {spec.split!r} ({reasons})")
    points = validation_points([s.steps for s in recipe.stages], spec.every_steps)
    train_clips = sum(s.steps * s.global_clips() for s in recipe.stages)
    overhead = len(points) * vset.crops / (3.0 * max(train_clips, 1))
    if overhead > spec.max_overhead:
        raise ConfigError(
            f"validate: {vset.crops} held-out crops at {len(points)} points cost about {100 * overhead:.1f} % of the "
            f"training compute (> validate.max_overhead {100 * spec.max_overhead:g} %); raise validate.every_steps, "
            "lower validate.crops_per_culture, or raise validate.max_overhead"
        )
    protected = list(spec.forgetting.cultures) if spec.forgetting else []
    new = _new_cultures(recipe, spec, sorted(vset.cultures), protected)
    return ValidationPlan(spec, vset, "", crop_seconds, points, overhead, new, protected)


# ======================================================================================================
# the monitor inside the trainer
# ======================================================================================================
class ForgettingStop(Exception):
    """Raised by :class:`Monitor` when the forgetting alarm fires with ``action: stop``."""

    def __init__(self, message: str, export: Any):
        super().__init__(message)
        self.export = export


class Monitor:
    """Validation points, forgetting alarm and best / last-good exports of one :class:`Trainer` run.

    Persistent decisions live in ``trainer.state.monitor`` (saved in every checkpoint):
    ``last`` (global step, stage and per-culture metrics of the newest point), ``reference`` (per stage index: the
    protected cultures' values at the stage start), ``best`` (global step and mean over the new traditions).
    """

    def __init__(self, trainer: "Trainer", plan: ValidationPlan):
        self.trainer = trainer
        self.plan = plan
        self._seconds = 0.0
        self._announced = False
        trainer.run_log.protected = list(plan.protected)
        trainer.run_log.new = list(plan.new)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def _mstate(self) -> dict[str, Any]:
        return self.trainer.state.monitor

    @property
    def enabled(self) -> bool:
        return self.plan.enabled

    # -- hooks called by the trainer -----------------------------------------------------------------------
    def _announce(self) -> None:
        """Say once per process what will be validated (after the run log is open, so train.log has it too)."""
        if self._announced:
            return
        self._announced = True
        if not self.enabled:
            log.warning("%s", self.plan.describe()[0])
        else:
            for line in self.plan.describe():
                log.info("%s", line)

    def stage_start(self, index: int) -> None:
        """At a stage's first step: validate (unless this global step already was) and take the alarm's reference."""
        self._announce()
        if not self.enabled or self.trainer.state.stage_step != 0:
            return
        if str(index) not in self._mstate.setdefault("reference", {}):
            self._validate(index, reference=True)

    def after_step(self, index: int) -> None:
        """After an optimizer step: validate when ``every_steps`` divides the global step or the stage ends."""
        if not self.enabled:
            return
        st = self.trainer.state
        every = self.plan.spec.every_steps  # type: ignore[union-attr]
        stage = self.trainer.recipe.stages[index]
        if (every and st.global_step % every == 0) or st.stage_step >= stage.steps:
            self._validate(index)

    def card_fields(self, export_name: str) -> dict[str, Any]:
        """Model-card fields saying what this export is and what validation says about it."""
        if not self.enabled:
            return {"validation": f"none ({self.plan.reason})"}
        spec = self.plan.spec
        assert spec is not None
        last = self._mstate.get("last")
        best = self._mstate.get("best")
        what = f"mean validation {spec.metric} over {', '.join(self.plan.new)}"
        fields: dict[str, Any] = {}
        if export_name == "best":
            fields["selection"] = (f"best: the lowest {what} of all validation points "
                                   f"(global step {best['global_step']}); the run's last weights are exports/final")
            point = best
        elif export_name == "last-good":
            fields["selection"] = ("last good: the newest validation point at which every protected culture was "
                                   "within the forgetting tolerance")
            point = last
        elif export_name == "final":
            where = (f"exports/best (global step {best['global_step']}, {best['value']:.4f})" if best
                     else "none")
            fields["selection"] = f"final: the weights after the last step; lowest {what}: {where}"
            point = last
        else:
            fields["selection"] = f"stage end ({export_name})"
            point = last
        if point:
            fields["validation"] = {"global_step": point["global_step"], "metric": spec.metric,
                                    "new_mean": point.get("value"), "cultures": point.get("cultures", {})}
            rows = [f"| {c} | {m['loss']:.4f} | {m['pred_loss']:.4f} | {100 * m['acc']:.1f} % |"
                    for c, m in sorted(point.get("cultures", {}).items())]
            fields["evaluation"] = "\n".join([
                fields["selection"], "",
                f"Held-out validation at global step {point['global_step']} ({spec.crops_per_culture} crops per "
                f"culture from split {spec.split!r}; nats per masked frame):", "",
                "| culture | loss | masked prediction | accuracy |", "|---|---|---|---|", *rows,
            ])
        return fields

    # -- the validation point --------------------------------------------------------------------------------
    def _validate(self, index: int, reference: bool = False) -> None:
        tr = self.trainer
        st = tr.state
        spec, plan = self.plan.spec, self.plan
        assert spec is not None and plan.vset is not None
        last = self._mstate.get("last")
        stage = tr.recipe.stages[index]
        refs = self._mstate.setdefault("reference", {})
        if last is not None and last["global_step"] == st.global_step:
            # same weights as the previous point (a stage end is the next stage's start): nothing to recompute
            results = last["cultures"]
            if reference or str(index) not in refs:
                refs[str(index)] = {c: results[c][spec.metric] for c in plan.protected}
        else:
            t0 = time.perf_counter()
            results = evaluate_validation_set(tr.model, tr.objective, plan.vset, device=tr.device, dist_info=tr.dist,
                                              autocast=tr._autocast)
            seconds = time.perf_counter() - t0
            self._seconds += seconds
            if reference or str(index) not in refs:
                # the stage's start (or, resumed from an older checkpoint without one, its first point)
                refs[str(index)] = {c: results[c][spec.metric] for c in plan.protected}
            value = self._new_mean(results)
            self._mstate["last"] = {"global_step": st.global_step, "stage": stage.name, "value": value,
                                    "cultures": results}
            tr.run_log.write({
                "kind": "validation", "global_step": st.global_step, "stage": stage.name,
                "stage_step": st.stage_step, "cultures": results, "new_mean": value, "metric": spec.metric,
                "limits": self._limits(index), "seconds": seconds,
            })
            self._track_best(index, value, results)
        if reference:
            self._keep_last_good(index)
        else:
            self._alarm(index, results)
        self._write_summary()

    def _limits(self, index: int) -> dict[str, float]:
        """Per protected culture, the highest value within tolerance in stage ``index``."""
        f = self.plan.spec.forgetting  # type: ignore[union-attr]
        ref = self._mstate.get("reference", {}).get(str(index))
        if f is None or ref is None:
            return {}
        return {c: (v * (1.0 + f.tolerance) if f.relative else v + f.tolerance) for c, v in ref.items()}

    def _new_mean(self, results: Mapping[str, Mapping[str, float]]) -> float:
        metric = self.plan.spec.metric  # type: ignore[union-attr]
        values = [results[c][metric] for c in self.plan.new if c in results]
        return float(sum(values) / len(values)) if values else float("nan")

    def _track_best(self, index: int, value: float, results: Mapping[str, Any]) -> None:
        spec = self.plan.spec
        assert spec is not None
        if not spec.best_export or not math.isfinite(value):
            return
        best = self._mstate.get("best")
        if best is not None and value >= best["value"]:
            return
        self._mstate["best"] = {"global_step": self.trainer.state.global_step, "value": value,
                                "stage": self.trainer.recipe.stages[index].name, "cultures": dict(results)}
        self.trainer._export(index, name="best")

    def _keep_last_good(self, index: int) -> None:
        f = self.plan.spec.forgetting  # type: ignore[union-attr]
        if f is not None and f.action == "stop":
            self._mstate["last_good"] = {"global_step": self.trainer.state.global_step}
            self.trainer._export(index, name="last-good")

    def _alarm(self, index: int, results: Mapping[str, Mapping[str, float]]) -> None:
        spec = self.plan.spec
        assert spec is not None
        f = spec.forgetting
        if f is None:
            return
        ref = self._mstate["reference"][str(index)]
        limits = self._limits(index)
        tr = self.trainer
        stage = tr.recipe.stages[index]
        fired = []
        for culture in self.plan.protected:
            start, now, limit = ref[culture], results[culture][spec.metric], limits[culture]
            if not now <= limit:  # NaN counts as a rise
                rise = f"{100 * (now / start - 1):+.1f} %" if f.relative and start else f"{now - start:+.4f} nats"
                fired.append(culture)
                tr.run_log.event(
                    "forgetting",
                    f"forgetting alarm: {culture} validation {spec.metric} {now:.4f} at global step "
                    f"{tr.state.global_step} is {rise} from the start of stage {index + 1} {stage.name!r} "
                    f"({start:.4f}; limit {limit:.4f})",
                    tr.state.global_step,
                    culture=culture, value=now, reference=start, limit=limit, stage=stage.name,
                )
        if not fired:
            self._keep_last_good(index)
            return
        if f.action == "stop":
            good = self._mstate.get("last_good", {}).get("global_step")
            export = tr.out / "exports" / "last-good"
            message = (f"stopped by the forgetting alarm at global step {tr.state.global_step} ({', '.join(fired)}); "
                       f"the last weights within tolerance (global step {good}) are in {export}")
            tr.run_log.event("stop", message, tr.state.global_step)
            raise ForgettingStop(message, export)

    def _write_summary(self) -> None:
        tr = self.trainer
        if not tr.dist.is_main:
            return
        plan, spec = self.plan, self.plan.spec
        assert spec is not None and plan.vset is not None
        write_json_atomic(tr.out / "validation.json", {
            "split": plan.vset.split,
            "metric": spec.metric,
            "crops_per_culture": spec.crops_per_culture,
            "crop_seconds": plan.crop_seconds,
            "cultures": sorted(plan.vset.cultures),
            "not_validated": plan.vset.missing,
            "new": plan.new,
            "protected": plan.protected,
            "points": plan.points,
            "estimated_overhead": plan.overhead,
            "measured_seconds_this_process": self._seconds,
            **{k: self._mstate.get(k) for k in ("best", "last", "reference", "last_good")},
        })
