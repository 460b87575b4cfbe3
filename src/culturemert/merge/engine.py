"""Weight-space model merging: task arithmetic, TIES, DARE, DARE-TIES and linear averaging; λ sweeps.

Notation: θ_base is the model every input was continually pre-trained from, θ_i the inputs,
τ_i = θ_i − θ_base their task vectors, λ_i the per-model scaling factors.

* ``task_arithmetic`` (Ilharco et al. 2023): θ = θ_base + Σ_i λ_i τ_i; with ``mean=True`` λ_i is replaced by λ_i / n,
  so λ = 1 with ``mean=True`` is the plain average of the inputs.
* ``ties`` (Yadav et al. 2023, Algorithm 1): each τ_i is trimmed to the ``density`` fraction of its entries with
  the largest magnitude (per tensor); the sign of every entry is elected as sgn(Σ_i τ̂_i) (the sign with the larger
  total magnitude); the merged vector is the mean over the models whose trimmed entry is non-zero and agrees with
  the elected sign (zero where none agrees). **λ enters only after the disjoint mean**:
  θ = θ_base + (1/|A|) Σ_{i∈A} λ_i τ̂_i, so λ never changes which sign wins (mergekit applies its per-model
  ``weight`` before sign election, which deviates from the paper; arcee-ai/mergekit#474). On an exact tie the
  elected sign is 0 and the entry stays at θ_base.
* ``dare`` (Yu et al. 2024): every entry of τ_i is dropped with probability ``drop_rate`` p and the survivors are
  rescaled by 1/(1 − p), then combined as in task arithmetic. The mask is drawn from a generator seeded by
  (``seed``, model index, tensor name), so a merge is reproducible and independent of tensor order.
* ``dare_ties``: DARE's drop-and-rescale replaces TIES' magnitude trim; sign election and disjoint mean as TIES.
* ``linear``: θ = Σ_i w_i θ_i / Σ_i w_i; needs no base.

The merge streams over tensor names: for each name it reads one tensor from every input, merges it, and stores the
result, so the working memory is the output plus one tensor per input (inputs may be lazy mappings, e.g. backed by
safetensors files). Arithmetic runs per tensor in float64, i.e. at least fp32 as the issue asks; the extra
precision costs a single tensor and makes the endpoint identities exact (λ = 0 gives the base bit for bit, one
model at λ = 1 gives that model bit for bit). The result has the inputs' dtype (the promoted dtype if they differ).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from culturemert.files import atomic_write_bytes
from culturemert.config import StrictModel
from culturemert.errors import ConfigError, UserError

log = logging.getLogger(__name__)

MergeMethod = Literal["task_arithmetic", "ties", "dare", "dare_ties", "linear"]
MERGE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare", "dare_ties", "linear")
SUMMING_METHODS = ("task_arithmetic", "dare")
DISJOINT_METHODS = ("ties", "dare_ties")

# Our defaults (none of them published by CultureMERT except λ = 0.2 for task arithmetic over four models).
DEFAULT_LAMBDA = {"task_arithmetic": 0.2, "dare": 0.2, "ties": 1.0, "dare_ties": 1.0}
DEFAULT_DENSITY = 0.2  # TIES paper's top-20 %
DEFAULT_DROP_RATE = 0.9  # DARE paper's usual drop rate
# A model trained from a different initialisation has ||θ_i − θ_base|| ≈ √2 ||θ_base||; continual pre-training
# moves weights by a few percent. 1.0 separates the two with a wide margin.
DEFAULT_MAX_TASK_VECTOR_RATIO = 1.0

_COMPUTE_DTYPE = torch.float64

__all__ = [
    "MERGE_METHODS",
    "MergeOptions",
    "MergeReport",
    "SweepResult",
    "merge_state_dicts",
    "merge_with_report",
    "merge_models",
    "parse_lambda_range",
    "format_lambda",
    "run_sweep",
    "sweep_merge",
    "select_best_lambda",
]


class MergeOptions(StrictModel):
    """Everything that defines a merge besides its inputs; recorded verbatim in the output's model card."""

    method: MergeMethod = "task_arithmetic"
    # One float for every model, a list with one value per model, or None for the method's default.
    lambdas: float | list[float] | None = None
    mean: bool = False
    density: float = Field(DEFAULT_DENSITY, gt=0.0, le=1.0)
    drop_rate: float = Field(DEFAULT_DROP_RATE, ge=0.0, lt=1.0)
    seed: int = 0
    include: list[str] = Field(default_factory=list)  # empty: every parameter
    exclude: list[str] = Field(default_factory=list)
    weights: list[float] | None = None  # linear only; None: equal weights
    max_task_vector_ratio: float = Field(DEFAULT_MAX_TASK_VECTOR_RATIO, gt=0.0)
    allow_unrelated: bool = False

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if any(not math.isfinite(w) or w < 0 for w in value):
                raise ValueError("linear weights must be finite and non-negative")
            if sum(value) <= 0:
                raise ValueError("linear weights must not all be zero")
        return value

    @model_validator(mode="after")
    def _method_arguments(self) -> MergeOptions:
        if self.method == "linear" and self.lambdas is not None:
            raise ValueError("method 'linear' takes weights, not lambdas")
        if self.method != "linear" and self.weights is not None:
            raise ValueError(f"weights are for method 'linear'; method {self.method!r} takes lambdas")
        if self.mean and self.method not in SUMMING_METHODS:
            raise ValueError(
                f"mean applies to the summing methods {SUMMING_METHODS}; {self.method!r} already averages"
            )
        lambdas = [self.lambdas] if isinstance(self.lambdas, float | int) else (self.lambdas or [])
        if any(not math.isfinite(v) for v in lambdas):
            raise ValueError("lambdas must be finite")
        return self

    def lambdas_for(self, num_models: int) -> list[float]:
        """Per-model λ_i as used in the formulas (after the ``mean`` division)."""
        if self.method == "linear":
            raise ConfigError("method 'linear' has no lambdas")
        if self.lambdas is None:
            values = [DEFAULT_LAMBDA[self.method]] * num_models
        elif isinstance(self.lambdas, list):
            if len(self.lambdas) != num_models:
                raise ConfigError(f"got {len(self.lambdas)} lambdas for {num_models} models; give one per model")
            values = [float(v) for v in self.lambdas]
        else:
            values = [float(self.lambdas)] * num_models
        if self.mean:
            values = [v / num_models for v in values]
        return values

    def weights_for(self, num_models: int) -> list[float]:
        """Normalised linear weights."""
        raw = self.weights if self.weights is not None else [1.0] * num_models
        if len(raw) != num_models:
            raise ConfigError(f"got {len(raw)} weights for {num_models} models; give one per model")
        total = float(sum(raw))
        return [float(w) / total for w in raw]


def _options_from(options: MergeOptions | None, **kwargs: Any) -> MergeOptions:
    from culturemert.config import parse_config

    data = options.model_dump() if options is not None else {}
    if options is not None and not kwargs:
        return options
    data.update({k: v for k, v in kwargs.items() if v is not None})
    return parse_config(data, MergeOptions, source="merge options")


@dataclass
class MergeReport:
    """What a merge did, for the model card and logs."""

    merged: list[str] = field(default_factory=list)  # float tensors combined by the method
    kept_from_base: list[str] = field(default_factory=list)  # out of scope, or non-float buffers
    task_vector_ratios: list[float] = field(default_factory=list)  # ||τ_i|| / ||θ_base|| over merged tensors
    lambdas: list[float] | None = None
    weights: list[float] | None = None


# ---------------------------------------------------------------------------------------------------- scope


def in_scope(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether parameter ``name`` is merged: matches some include pattern (or there are none) and no exclude one."""
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _check_patterns_match(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> None:
    # A mistyped pattern would otherwise silently merge everything (or nothing); fail loudly instead.
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                example = ", ".join(list(names)[:3])
                raise UserError(f"--{kind} pattern {pattern!r} matches no parameter name (names look like: {example})")


# ---------------------------------------------------------------------------------------------------- kernels


def _tensor_seed(seed: int, model_index: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


# ---------------------------------------------------------------------------------------------------- core


def _describe(names: Sequence[str] | None, index: int) -> str:
    if names is not None and index < len(names):
        return f"model {index + 1} ({names[index]})"
    return f"model {index + 1}"


def _check_keys(base_keys: list[str], models: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str] | None, base_label: str) -> None:
    base_set = set(base_keys)
    for i, model in enumerate(models):
        keys = list(model.keys())
        key_set = set(keys)
        missing = [k for k in base_keys if k not in key_set]
        extra = [k for k in keys if k not in base_set]
        if missing or extra:
            detail = []
            if missing:
                detail.append(f"missing {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            if extra:
                detail.append(f"unexpected {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
            raise UserError(
                f"{_describe(labels, i)} does not have the same parameters as {base_label}: {'; '.join(detail)} "
                "(different architectures cannot be merged)"
            )


def merge_with_report(
    base: Mapping[str, torch.Tensor] | None,
    models: Sequence[Mapping[str, torch.Tensor]],
    options: MergeOptions | None = None,
    *,
    model_labels: Sequence[str] | None = None,
    base_label: str = "the base",
    progress: bool = True,
    **option_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """:func:`merge_state_dicts` that also returns a :class:`MergeReport`. ``model_labels`` name inputs in errors."""
    opts = _options_from(options, **option_kwargs)
    n = len(models)
    if n == 0:
        raise UserError("merge needs at least one model")
    if base is None and opts.method != "linear":
        raise UserError(f"method {opts.method!r} needs a base model (task vectors are θ_i − θ_base)")
    reference = base if base is not None else models[0]
    reference_label = base_label if base is not None else _describe(model_labels, 0)
    names = list(reference.keys())
    _check_keys(names, models if base is not None else models[1:], model_labels if base is not None else (model_labels or [])[1:] or None, reference_label)
    _check_patterns_match(names, opts.include, opts.exclude)
    restricted_scope = bool(opts.include or opts.exclude)
    if base is None and restricted_scope:
        raise UserError("a restricted scope (--include/--exclude) needs --base: out-of-scope tensors take its values")

    report = MergeReport()
    if opts.method == "linear":
        report.weights = opts.weights_for(n)
    else:
        report.lambdas = opts.lambdas_for(n)
    base_sq_norm = 0.0
    task_sq_norms = [0.0] * n
    merged: dict[str, torch.Tensor] = {}

    def fetch(i: int, name: str, ref: torch.Tensor) -> torch.Tensor:
        """Input i's tensor, validated against the reference (shape, floatness, finiteness)."""
        t = models[i][name]
        if t.shape != ref.shape:
            raise UserError(
                f"shape mismatch for {name!r}: {_describe(model_labels, i)} has {tuple(t.shape)}, "
                f"{reference_label} has {tuple(ref.shape)} (different architectures cannot be merged)"
            )
        if t.is_floating_point() != ref.is_floating_point():
            raise UserError(f"{name!r} is {t.dtype} in {_describe(model_labels, i)} but {ref.dtype} in {reference_label}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{_describe(model_labels, i)} has NaN/inf values in {name!r}")
        return t

    # Inputs are read one tensor at a time and, for the summing methods, one model at a time, so the working set
    # per tensor is a handful of float64 copies (TIES needs all n task vectors of a tensor at once for the vote).
    for name in tqdm(names, desc=f"merge ({opts.method})", unit="tensor", disable=not progress or None, leave=False):
        ref = reference[name]
        if not ref.is_floating_point():
            for i in range(n):
                t = fetch(i, name, ref)
                if t.dtype != ref.dtype or not torch.equal(t, ref):
                    raise UserError(
                        f"non-float tensor {name!r} differs between {_describe(model_labels, i)} and "
                        f"{reference_label}; integer buffers cannot be merged"
                    )
            merged[name] = ref.clone()
            report.kept_from_base.append(name)
            continue
        if base is not None and not torch.isfinite(ref).all():
            raise UserError(f"{base_label} has NaN/inf values in {name!r}")
        out_dtype = ref.dtype
        if not in_scope(name, opts.include, opts.exclude):
            for i in range(n):
                out_dtype = torch.promote_types(out_dtype, fetch(i, name, ref).dtype)
            merged[name] = ref.to(out_dtype, copy=True)
            report.kept_from_base.append(name)
            continue

        base64 = ref.to(_COMPUTE_DTYPE)
        if base is not None:
            base_sq_norm += float(base64.square().sum())
        if opts.method in DISJOINT_METHODS:
            deltas = []
            for i in range(n):
                t = fetch(i, name, ref)
                out_dtype = torch.promote_types(out_dtype, t.dtype)
                delta = t.to(_COMPUTE_DTYPE) - base64
                task_sq_norms[i] += float(delta.square().sum())
                if opts.method == "dare_ties":
                    delta = dare_drop(delta, opts.drop_rate, opts.seed, i, name)
                else:
                    delta = trim_top_magnitude(delta, opts.density)
                deltas.append(delta)
            result = base64 + ties_combine(deltas, report.lambdas)
            del deltas
        else:
            result = torch.zeros_like(base64) if opts.method == "linear" else base64.clone()
            for i in range(n):
                t = fetch(i, name, ref)
                out_dtype = torch.promote_types(out_dtype, t.dtype)
                value = t.to(_COMPUTE_DTYPE)
                del t
                if opts.method == "linear":
                    if base is not None:  # only for the relatedness check
                        task_sq_norms[i] += float((value - base64).square().sum())
                    result.add_(value, alpha=report.weights[i])
                else:
                    value.sub_(base64)  # τ_i
                    task_sq_norms[i] += float(value.square().sum())
                    if opts.method == "dare":
                        value = dare_drop(value, opts.drop_rate, opts.seed, i, name)
                    result.add_(value, alpha=report.lambdas[i])
                del value
        merged[name] = result.to(out_dtype)
        report.merged.append(name)
        del base64, result
    if base is not None and report.merged:
        base_norm = math.sqrt(base_sq_norm)
        report.task_vector_ratios = [math.sqrt(s) / base_norm if base_norm > 0 else math.inf for s in task_sq_norms]
        for i, ratio in enumerate(report.task_vector_ratios):
            if ratio > opts.max_task_vector_ratio:
                message = (
                    f"{_describe(model_labels, i)} does not look derived from {base_label}: its task vector norm is "
                    f"{ratio:.3f} x the base's norm over the merged tensors (limit {opts.max_task_vector_ratio:g}; "
                    "a model trained from a different initialisation gives about 1.41, continual pre-training a few "
                    "hundredths). Pass the model it was trained from as --base, or --allow-unrelated to merge anyway"
                )
                if not opts.allow_unrelated:
                    raise UserError(message)
                log.warning("%s", message)
    return merged, report


def merge_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    models: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod = "task_arithmetic",
    lambdas: float | Sequence[float] | None = None,
    *,
    mean: bool = False,
    density: float = DEFAULT_DENSITY,
    drop_rate: float = DEFAULT_DROP_RATE,
    seed: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weights: Sequence[float] | None = None,
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
    allow_unrelated: bool = False,
    model_labels: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge state dicts (``name -> tensor`` mappings, possibly lazy) tensor by tensor; see the module docstring.

    ``base`` may be None only for ``linear``. ``lambdas``: one value for all models or one per model (None: the
    method's default). Names outside the include/exclude glob scope keep the base's values. Raises
    :class:`UserError` on different parameter sets or shapes, NaN/inf, differing integer buffers, and on task
    vectors larger than ``max_task_vector_ratio`` × the base's norm unless ``allow_unrelated``.
    """
    options = _options_from(
        None,
        method=method,
        lambdas=list(lambdas) if isinstance(lambdas, Sequence) else lambdas,
        mean=mean,
        density=density,
        drop_rate=drop_rate,
        seed=seed,
        include=list(include),
        exclude=list(exclude),
        weights=list(weights) if weights is not None else None,
        max_task_vector_ratio=max_task_vector_ratio,
        allow_unrelated=allow_unrelated,
    )
    merged, _ = merge_with_report(base, models, options, model_labels=model_labels, progress=progress)
    return merged


# ---------------------------------------------------------------------------------------------------- files


def _atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------------- models

HEADS_PREFIX = "heads."


@dataclass
class LoadedInputs:
    """Base and input models, opened once (a sweep merges them many times).

    ``base_state``/``states`` are ``MertPretrainModel.state_dict()``-named mappings: real state dicts of loaded
    models, or lazy readers of export files (one tensor read per access) when every input is a culturemert
    export; ``make_output(with_heads)`` returns the skeleton the merged tensors are assigned into.
    """

    base_source: str | None  # None: linear averaging without a base (the first model is the template)
    base_state: Mapping[str, torch.Tensor] | None
    base_fingerprint: str | None
    sources: list[str]
    states: list[Mapping[str, torch.Tensor]]
    fingerprints: list[str]
    heads_merged: bool
    make_output: Callable[[bool], Any]
    lazy: bool = False


def _recorded_base_fingerprint(source: str) -> str | None:
    path = Path(source)
    if not path.is_dir():
        return None
    from culturemert.checkpoint import read_export_metadata

    meta = read_export_metadata(path)  # {} for a plain HF directory: nothing recorded
    value = meta.get("base_fingerprint") if isinstance(meta, Mapping) else None
    return str(value) if value else None


def _check_recorded_bases(base_source: Any, base_fp: str | None, model_sources: Sequence[Any], allow_unrelated: bool) -> None:
    for source in model_sources if base_source is not None else ():
        recorded = _recorded_base_fingerprint(str(source))
        if recorded is not None and recorded != base_fp:
            message = (
                f"{source} records that it was trained from a model with fingerprint {recorded[:16]}…, but the base "
                f"{base_source} has fingerprint {(base_fp or '?')[:16]}…; pass the model it was trained from as --base, "
                "or --allow-unrelated to merge anyway"
            )
            if not allow_unrelated:
                raise UserError(message)
            log.warning("%s", message)


def _heads_merged(base_has_heads: bool, inputs_have_heads: Sequence[bool]) -> bool:
    every_has_heads = base_has_heads and all(inputs_have_heads)
    if not every_has_heads and (base_has_heads or any(inputs_have_heads)):
        log.warning("not every input has pre-training heads: merging the backbone only; the output has no heads")
    return every_has_heads


def load_inputs(
    base_source: str | Path | None, model_sources: Sequence[str | Path], *, allow_unrelated: bool = False
) -> LoadedInputs:
    """Load base and inputs with ``culturemert.checkpoint.load_model`` and check recorded base fingerprints.

    ``base_source=None`` is for linear averaging only: the first model then serves as the output's template.
    """
    import copy

    from culturemert.checkpoint import load_model, model_fingerprint

    if not model_sources:
        raise UserError("merge needs at least one model (--models)")
    models, fingerprints = [], []
    for source in model_sources:
        model = load_model(str(source))
        models.append(model)
        fingerprints.append(model_fingerprint(model))
    base = load_model(str(base_source)) if base_source is not None else models[0]
    base_fp = model_fingerprint(base) if base_source is not None else None
    _check_recorded_bases(base_source, base_fp, model_sources, allow_unrelated)

    def make_output(with_heads: bool) -> Any:
        output = copy.deepcopy(base)
        if not with_heads:
            output.heads = None
        return output

    return LoadedInputs(
        base_source=str(base_source) if base_source is not None else None,
        base_state=base.state_dict() if base_source is not None else None,
        base_fingerprint=base_fp,
        sources=[str(s) for s in model_sources],
        states=[m.state_dict() for m in models],
        fingerprints=fingerprints,
        heads_merged=_heads_merged(base.heads is not None, [m.heads is not None for m in models]),
        make_output=make_output,
    )


def open_inputs_lazily(
    base_source: str | Path | None, model_sources: Sequence[str | Path], *, allow_unrelated: bool = False
) -> LoadedInputs:
    """Like :func:`load_inputs` for culturemert exports, without loading any weights: the merge then reads one
    tensor per input at a time, so its peak memory is about the output model instead of n + 2 models. Every
    file's sha256 is checked against the export record first (that is what makes the recorded fingerprints
    trustworthy)."""
    from culturemert.checkpoint import LazyExport

    if not model_sources:
        raise UserError("merge needs at least one model (--models)")
    exports = [LazyExport(source) for source in model_sources]
    base = LazyExport(base_source) if base_source is not None else exports[0]
    for export in ([base] if base_source is not None else []) + exports:
        if not export.fingerprint:
            raise UserError(f"{export.directory}: the export records no fingerprint; re-export it with culturemert")
    base_fp = base.fingerprint if base_source is not None else None
    _check_recorded_bases(base_source, base_fp, model_sources, allow_unrelated)
    return LoadedInputs(
        base_source=str(base_source) if base_source is not None else None,
        base_state=base.state if base_source is not None else None,
        base_fingerprint=base_fp,
        sources=[str(s) for s in model_sources],
        states=[e.state for e in exports],
        fingerprints=[str(e.fingerprint) for e in exports],
        heads_merged=_heads_merged(base.has_heads, [e.has_heads for e in exports]),
        make_output=base.empty_model,
        lazy=True,
    )


class _WithoutHeads(Mapping[str, torch.Tensor]):
    """A state mapping minus the pre-training heads (a view: lazy mappings stay lazy)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state
        self._names = [k for k in state if not k.startswith(HEADS_PREFIX)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name.startswith(HEADS_PREFIX):
            raise KeyError(name)
        return self._state[name]

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return isinstance(name, str) and not name.startswith(HEADS_PREFIX) and name in self._state

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _state_for_merge(state: Mapping[str, torch.Tensor], with_heads: bool) -> Mapping[str, torch.Tensor]:
    return state if with_heads else _WithoutHeads(state)


def merge_loaded(
    inputs: LoadedInputs,
    out_dir: str | Path,
    options: MergeOptions,
    *,
    card_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge opened inputs and write an export to ``out_dir``; returns the merge record of the card."""
    from culturemert.checkpoint import model_fingerprint, save_export

    with_heads = inputs.heads_merged
    merged, report = merge_with_report(
        _state_for_merge(inputs.base_state, with_heads) if inputs.base_state is not None else None,
        [_state_for_merge(state, with_heads) for state in inputs.states],
        options,
        model_labels=inputs.sources,
        base_label=f"the base ({inputs.base_source})",
    )
    output = inputs.make_output(with_heads)
    # assign=True adopts the merged tensors (and their dtype) instead of copying them into the template.
    output.load_state_dict(merged, strict=True, assign=True)
    del merged
    heads_in_scope = with_heads and any(
        in_scope(name, options.include, options.exclude) for name in report.merged if name.startswith(HEADS_PREFIX)
    )
    record: dict[str, Any] = {
        "method": options.method,
        "lambdas": report.lambdas,
        "lambda_placement": (
            "after the disjoint mean (not in sign election; see arcee-ai/mergekit#474)"
            if options.method in DISJOINT_METHODS
            else ("per-model weights, normalised" if options.method == "linear" else "theta_base + sum_i lambda_i tau_i")
        ),
        "weights": report.weights,
        "options": options.model_dump(),
        "scope": {
            "include": list(options.include),
            "exclude": list(options.exclude),
            "heads_merged": heads_in_scope,
            "num_merged_tensors": len(report.merged),
            "num_kept_from_base": len(report.kept_from_base),
        },
        "seed": options.seed if options.method in ("dare", "dare_ties") else None,
        "base": (
            {"source": inputs.base_source, "fingerprint": inputs.base_fingerprint} if inputs.base_source else None
        ),
        "inputs": [
            {"source": s, "fingerprint": fp, "task_vector_ratio": r}
            for s, fp, r in zip(
                inputs.sources,
                inputs.fingerprints,
                report.task_vector_ratios or [None] * len(inputs.sources),
                strict=True,
            )
        ],
        "fingerprint": model_fingerprint(output),
    }
    card: dict[str, Any] = {"merge": record}
    if card_extra:
        card.update(card_extra)
    # The merge derives from the base like its inputs did, so a merged model can itself be merged on that base.
    base_fingerprint = inputs.base_fingerprint
    if inputs.base_source is None:
        # Linear averaging without --base: inherit the inputs' recorded base when they all agree on one.
        recorded = {_recorded_base_fingerprint(source) for source in inputs.sources}
        base_fingerprint = recorded.pop() if len(recorded) == 1 else None
    save_export(output, str(out_dir), card=card, base_fingerprint=base_fingerprint)
    log.info("merged %d models (%s) into %s", len(inputs.states), options.method, out_dir)
    return record


def merge_models(
    base_source: str | Path | None,
    model_sources: Sequence[str | Path],
    out_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    card_extra: Mapping[str, Any] | None = None,
    **option_kwargs: Any,
) -> dict[str, Any]:
    """Load ``base_source`` and ``model_sources`` (any format ``load_model`` reads), merge, write an export.

    ``base_source`` may be None for ``linear`` only. The backbone is always merged; the pre-training heads are merged when every input and the base have them (and
    the scope includes them), otherwise the output has no heads. Returns the merge record stored in the card.
    """
    from culturemert.checkpoint import can_open_lazily

    opts = _options_from(options, **option_kwargs)
    sources = ([base_source] if base_source is not None else []) + list(model_sources)
    if model_sources and all(can_open_lazily(s) for s in sources):
        inputs = open_inputs_lazily(base_source, model_sources, allow_unrelated=opts.allow_unrelated)
    else:
        inputs = load_inputs(base_source, model_sources, allow_unrelated=opts.allow_unrelated)
    return merge_loaded(inputs, out_dir, opts, card_extra=card_extra)


# ---------------------------------------------------------------------------------------------------- sweeps

Evaluator = Callable[[Path, Any], Mapping[str, Mapping[str, float]]]


def parse_lambda_range(spec: str) -> list[float]:
    """``"start:stop:step"`` (stop inclusive) or a comma list ``"0.1,0.2"`` -> sorted distinct λ values."""
    text = spec.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ConfigError(f"--sweep {spec!r}: need start <= stop and step > 0")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--sweep {spec!r}: expected start:stop:step (e.g. 0.1:1.0:0.1) or a comma list") from None
    if not values or any(not math.isfinite(v) for v in values):
        raise ConfigError(f"--sweep {spec!r}: no finite λ values")
    return sorted(set(values))


def format_lambda(value: float) -> str:
    """Stable short text for a λ: 0.2 -> '0.2', 1.0 -> '1'."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def select_best_lambda(
    results: Mapping[float, Mapping[str, Mapping[str, float]]], metric: str
) -> tuple[float, dict[float, float]]:
    """Best λ by the mean of ``metric`` over datasets (ties: the smallest λ, i.e. closest to the base)."""
    means: dict[float, float] = {}
    for lam, per_dataset in results.items():
        if not per_dataset:
            raise UserError(f"the evaluator returned no datasets for λ={format_lambda(lam)}")
        values = []
        for dataset, metrics in per_dataset.items():
            if metric not in metrics:
                raise UserError(
                    f"metric {metric!r} missing for dataset {dataset!r} at λ={format_lambda(lam)} "
                    f"(available: {', '.join(sorted(metrics))})"
                )
            value = float(metrics[metric])
            if not math.isfinite(value):
                raise UserError(f"metric {metric!r} is {value} for dataset {dataset!r} at λ={format_lambda(lam)}")
            values.append(value)
        means[lam] = sum(values) / len(values)
    best = min(means, key=lambda lam: (-means[lam], lam))
    return best, means


@dataclass
class SweepResult:
    selected_lambda: float
    mean_metric: dict[float, float]
    results: dict[float, dict[str, dict[str, float]]]
    out_dir: Path


def _write_sweep_csv(path: Path, results: Mapping[float, Mapping[str, Mapping[str, float]]], means: Mapping[float, float], metric: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["lambda", "dataset", "metric", "value"])
    for lam in sorted(results):
        for dataset in sorted(results[lam]):
            for name in sorted(results[lam][dataset]):
                writer.writerow([format_lambda(lam), dataset, name, repr(float(results[lam][dataset][name]))])
        writer.writerow([format_lambda(lam), "mean", metric, repr(means[lam])])
    atomic_write_bytes(path, buffer.getvalue().encode())


def _write_sweep_plot(path: Path, results: Mapping[float, Mapping[str, Mapping[str, float]]], means: Mapping[float, float], metric: str, selected: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lambdas = sorted(results)
    datasets = sorted({d for per in results.values() for d in per})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for dataset in datasets:
        points = [(lam, results[lam][dataset][metric]) for lam in lambdas if dataset in results[lam]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=dataset)
    ax.plot(lambdas, [means[lam] for lam in lambdas], color="black", linestyle="--", linewidth=2, marker="s", label="mean")
    ax.axvline(selected, color="grey", linestyle=":", label=f"selected λ={format_lambda(selected)}")
    ax.set_xlabel("λ")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"merge sweep: {metric} vs λ (validation splits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _copy_tree_atomically(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging, symlinks=False)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def run_sweep(
    lambdas: Sequence[float],
    out_dir: str | Path,
    merge_to_dir: Callable[[float, Path], Any],
    evaluate: Callable[[Path], Mapping[str, Mapping[str, float]]],
    metric: str = "roc_auc",
    *,
    record: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Merge at every λ into ``out_dir/lambda_<λ>/``, evaluate each on validation, select, and write the report.

    Writes ``sweep.csv`` (λ × dataset × metric, plus the per-λ mean of ``metric``), ``sweep.png`` and
    ``selection.json``, and copies the chosen export to ``out_dir/selected/``. ``evaluate`` must use validation
    splits only: the selected λ is a hyper-parameter, and choosing it on test data would leak.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not lambdas:
        raise ConfigError("the sweep has no λ values")
    results: dict[float, dict[str, dict[str, float]]] = {}
    for lam in lambdas:
        lam_dir = out / f"lambda_{format_lambda(lam)}"
        log.info("sweep: merging at λ=%s -> %s", format_lambda(lam), lam_dir)
        merge_to_dir(lam, lam_dir)
        scores = evaluate(lam_dir)
        results[lam] = {str(d): {str(m): float(v) for m, v in per.items()} for d, per in scores.items()}
        log.info("sweep: λ=%s %s", format_lambda(lam), {d: per.get(metric) for d, per in results[lam].items()})
    selected, means = select_best_lambda(results, metric)
    _write_sweep_csv(out / "sweep.csv", results, means, metric)
    _write_sweep_plot(out / "sweep.png", results, means, metric, selected)
    selected_dir = out / f"lambda_{format_lambda(selected)}"
    _copy_tree_atomically(selected_dir, out / "selected")
    selection = {
        "selected_lambda": selected,
        "selected_dir": "selected",
        "copied_from": selected_dir.name,
        "metric": metric,
        "rule": f"argmax over λ of the mean {metric} across datasets; ties go to the smallest λ",
        "split": "validation",
        "note": "λ was selected on validation splits only; test splits were not used for the selection",
        "mean_metric": {format_lambda(lam): means[lam] for lam in sorted(means)},
        "per_dataset": {d: v.get(metric) for d, v in results[selected].items()},
        "lambdas": [format_lambda(lam) for lam in sorted(results)],
        **(dict(record) if record else {}),
    }
    _atomic_write_json(out / "selection.json", selection)
    log.info("sweep: selected λ=%s (mean %s=%.4f)", format_lambda(selected), metric, means[selected])
    return SweepResult(selected_lambda=selected, mean_metric=means, results=results, out_dir=out)


def _default_evaluator() -> Evaluator:
    """``culturemert.evaluate.evaluate_on_validation``, imported only when a sweep runs (heavy imports)."""
    import importlib

    package = importlib.import_module("culturemert.evaluate")
    evaluator = getattr(package, "evaluate_on_validation", None)
    if evaluator is None:  # defined in the pipeline module; the package may not re-export it
        evaluator = importlib.import_module("culturemert.evaluate.pipeline").evaluate_on_validation
    return evaluator


def sweep_merge(
    base_source: str | Path,
    model_sources: Sequence[str | Path],
    lambdas: Sequence[float],
    out_dir: str | Path,
    eval_config: Any,
    options: MergeOptions | None = None,
    *,
    metric: str = "roc_auc",
    evaluator: Evaluator | None = None,
    card_extra: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Load the inputs once, merge at every λ, evaluate on validation with ``evaluator`` and select (see run_sweep).

    ``evaluator(model_dir, eval_config) -> {dataset: {metric: value}}`` defaults to
    ``culturemert.evaluate.evaluate_on_validation``.
    """
    opts = options or MergeOptions()
    if opts.method == "linear":
        raise ConfigError("a λ sweep needs a task-vector method; 'linear' has weights, not λ")
    if isinstance(opts.lambdas, list):
        raise ConfigError("a λ sweep scans one λ shared by all models; drop the per-model lambdas")
    if evaluator is None:
        evaluator = _default_evaluator()
    inputs = load_inputs(base_source, model_sources, allow_unrelated=opts.allow_unrelated)

    def merge_to_dir(lam: float, target: Path) -> None:
        merge_loaded(inputs, target, opts.model_copy(update={"lambdas": float(lam)}), card_extra=card_extra)

    record = {
        "method": opts.method,
        "options": opts.model_dump(exclude={"lambdas"}),
        "base": {"source": inputs.base_source, "fingerprint": inputs.base_fingerprint},
        "inputs": [{"source": s, "fingerprint": f} for s, f in zip(inputs.sources, inputs.fingerprints, strict=True)],
        "eval_config": str(eval_config),
    }
    return run_sweep(lambdas, out_dir, merge_to_dir, lambda d: evaluator(d, eval_config), metric, record=record)
