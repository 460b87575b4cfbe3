"""The streaming merge: for each tensor name, read that tensor from every input, combine it, store the result.

The working memory is the output plus one tensor per input (inputs may be lazy mappings, e.g. backed by
safetensors files). Arithmetic runs per tensor in float64, i.e. at least fp32; the extra precision costs a single
tensor and makes the endpoint identities exact (λ = 0 gives the base bit for bit, one model at λ = 1 gives that
model bit for bit). The result has the inputs' dtype (the promoted dtype if they differ).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from culturemert.errors import UserError
from culturemert.merge.methods import (
    MagnitudeBand,
    band_from_ranks,
    breadcrumbs_counts,
    breadcrumbs_mask,
    dare_drop,
    della_magprune,
    iso_c_merge,
    iso_cts_merge,
    ties_combine,
    ties_counts,
    trim_top_magnitude,
    tsv_merge,
)
from culturemert.merge.options import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    DISJOINT_METHODS,
    SUMMING_METHODS,
    TRIMMING_METHODS,
    MergeMethod,
    MergeOptions,
    TrimScope,
    _options_from,
)
from culturemert.merge.thresholds import GlobalMagnitudeRanks

log = logging.getLogger(__name__)

_COMPUTE_DTYPE = torch.float64


@dataclass
class MergeReport:
    """What a merge did, for the model card and logs."""

    merged: list[str] = field(default_factory=list)  # float tensors combined by the method
    kept_from_base: list[str] = field(default_factory=list)  # out of scope, or non-float buffers
    task_vector_ratios: list[float] = field(default_factory=list)  # ||τ_i|| / ||θ_base|| over merged tensors
    lambdas: list[float] | None = None
    weights: list[float] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the method's, defaults filled in
    # trim_scope global: per model, the kept magnitude band (lower, upper) over the whole model; None keeps all
    global_bands: list[tuple[float, float] | None] | None = None


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

    report = MergeReport(hyperparameters=opts.hyperparameters(n))
    hp = report.hyperparameters
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

    def check_base(name: str, ref: torch.Tensor) -> None:
        if base is not None and not torch.isfinite(ref).all():
            raise UserError(f"{base_label} has NaN/inf values in {name!r}")

    bands: list[MagnitudeBand | None] | None = None
    if hp.get("trim_scope") == "global":
        bands = _global_bands(opts, hp, names, reference, n, fetch, check_base)
        report.global_bands = [None if b is None else (b.lower, b.upper) for b in bands]

    def sparsify(i: int, name: str, delta: torch.Tensor) -> torch.Tensor:
        """τ_i after the method's per-model mask (identity for methods without one)."""
        method = opts.method
        if method in ("dare", "dare_ties"):
            return dare_drop(delta, hp["drop_rate"], hp["seed"], i, name)
        if method == "della":
            return della_magprune(delta, hp["drop_rate"], hp["epsilon"], hp["seed"], i, name)
        if method in TRIMMING_METHODS:
            if bands is not None:
                return delta if bands[i] is None else bands[i].apply(delta)
            if method == "ties":
                return trim_top_magnitude(delta, hp["density"])
            return breadcrumbs_mask(delta, hp["density"], hp["gamma"])
        return delta

    out_dtype = torch.float32  # per tensor: the inputs' promoted dtype, which the merged tensor takes

    def task_vectors(name: str, ref: torch.Tensor, base64: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(i, τ_i) of one tensor, reading one input at a time (and accounting its norm and dtype)."""
        nonlocal out_dtype
        for i in range(n):
            t = fetch(i, name, ref)
            out_dtype = torch.promote_types(out_dtype, t.dtype)
            delta = t.to(_COMPUTE_DTYPE) - base64  # out of place: a float64 input must not be modified
            del t
            task_sq_norms[i] += float(delta.square().sum())
            yield i, delta

    # Inputs are read one tensor at a time and, for the summing methods, TSV and Iso-C, one model at a time, so the
    # working set per tensor is a handful of float64 copies (the disjoint methods and Iso-CTS need all n task
    # vectors of a tensor at once).
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
        check_base(name, ref)
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

        if opts.method == "linear":
            result = torch.zeros_like(base64)
            for i in range(n):
                t = fetch(i, name, ref)
                out_dtype = torch.promote_types(out_dtype, t.dtype)
                value = t.to(_COMPUTE_DTYPE)
                del t
                if base is not None:  # only for the relatedness check
                    task_sq_norms[i] += float((value - base64).square().sum())
                result.add_(value, alpha=report.weights[i])
                del value
        elif opts.method in SUMMING_METHODS:
            result = base64.clone()
            for i, delta in task_vectors(name, ref, base64):
                result.add_(sparsify(i, name, delta), alpha=report.lambdas[i])
                del delta
        elif opts.method in DISJOINT_METHODS:
            kept = [sparsify(i, name, delta) for i, delta in task_vectors(name, ref, base64)]
            result = base64 + ties_combine(kept, report.lambdas)
            del kept
        else:  # SPECTRAL_METHODS: one α for every model (the options reject per-model lambdas)
            update = _spectral_update(opts.method, hp, ref.dim(), task_vectors(name, ref, base64), n)
            result = base64 + report.lambdas[0] * update
            del update
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


def _spectral_update(
    method: str, hp: Mapping[str, Any], ndim: int, task_vectors: Iterator[tuple[int, torch.Tensor]], n: int
) -> torch.Tensor:
    """The merged update of one tensor for TSV-Merge, Iso-C or Iso-CTS, before α.

    The SVD acts on 2-D weight matrices only. Every other tensor (biases, norms, the 3-D convolution kernels of the
    feature extractor and the positional convolution) takes the mean of the task vectors, as the reference code
    does for every tensor that is not 2-D: θ = θ_base + α · (1/T) Σ_t τ_t.
    """
    if ndim == 2 and method == "tsv":
        return tsv_merge((delta for _, delta in task_vectors), hp["rank_fraction"])
    if ndim == 2 and method == "iso_cts":
        return iso_cts_merge([delta for _, delta in task_vectors], hp["common_fraction"])
    total: torch.Tensor | None = None
    for _, delta in task_vectors:
        total = delta if total is None else total.add_(delta)
    assert total is not None
    if ndim == 2:  # iso_c
        return iso_c_merge(total)
    return total / n


def _global_bands(
    opts: MergeOptions,
    hp: Mapping[str, Any],
    names: Sequence[str],
    reference: Mapping[str, torch.Tensor],
    n: int,
    fetch: Callable[[int, str, torch.Tensor], torch.Tensor],
    check_base: Callable[[str, torch.Tensor], None],
) -> list[MagnitudeBand | None]:
    """Per model, the magnitude band of ``trim_scope: global``: magnitudes ranked over all in-scope float tensors
    of that model's task vector, as the TIES reference code does on the flattened model. Two extra passes over the
    inputs (count, collect; see :mod:`culturemert.merge.thresholds`) before the merge pass."""
    selectors = [GlobalMagnitudeRanks() for _ in range(n)]

    def each_task_vector_tensor() -> Iterator[tuple[int, torch.Tensor]]:
        for name in names:
            ref = reference[name]
            if not ref.is_floating_point() or not in_scope(name, opts.include, opts.exclude):
                continue
            check_base(name, ref)
            base64 = ref.to(_COMPUTE_DTYPE)
            for i in range(n):
                yield i, fetch(i, name, ref).to(_COMPUTE_DTYPE) - base64

    for i, delta in each_task_vector_tensor():
        selectors[i].count(delta)
    total = selectors[0].total
    if opts.method == "ties":
        n_top, n_keep = ties_counts(total, hp["density"])
    else:
        n_top, n_keep = breadcrumbs_counts(total, hp["density"], hp["gamma"])
    # the ranks band_from_ranks asks for: the last one removed from the top, and the last one kept
    ranks = ([n_top] if n_top >= 1 else []) + ([n_top + n_keep] if n_keep >= 1 and n_top + n_keep < total else [])
    if not ranks:
        return [band_from_ranks(total, n_top, n_keep, lambda k: math.nan) for _ in range(n)]
    for selector in selectors:
        selector.plan(ranks)
    for i, delta in each_task_vector_tensor():
        selectors[i].collect(delta)
    bands = []
    for selector in selectors:
        value_of = dict(zip(ranks, selector.values(), strict=True))
        bands.append(band_from_ranks(total, n_top, n_keep, value_of.__getitem__))
    return bands


def merge_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    models: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod = "task_arithmetic",
    lambdas: float | Sequence[float] | None = None,
    *,
    mean: bool = False,
    density: float | None = None,
    drop_rate: float | None = None,
    seed: int = 0,
    trim_scope: TrimScope | None = None,
    gamma: float | None = None,
    epsilon: float | None = None,
    rank_fraction: float | None = None,
    common_fraction: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weights: Sequence[float] | None = None,
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
    allow_unrelated: bool = False,
    model_labels: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge state dicts (``name -> tensor`` mappings, possibly lazy) tensor by tensor; see :mod:`culturemert.merge`.

    ``base`` may be None only for ``linear``. ``lambdas``: one value for all models or one per model (None: the
    method's default). Hyper-parameters left at None take the method's default (:class:`MergeOptions`). Names
    outside the include/exclude glob scope keep the base's values. Raises :class:`ConfigError` on bad options and
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
        trim_scope=trim_scope,
        gamma=gamma,
        epsilon=epsilon,
        rank_fraction=rank_fraction,
        common_fraction=common_fraction,
        include=list(include),
        exclude=list(exclude),
        weights=list(weights) if weights is not None else None,
        max_task_vector_ratio=max_task_vector_ratio,
        allow_unrelated=allow_unrelated,
    )
    merged, _ = merge_with_report(base, models, options, model_labels=model_labels, progress=progress)
    return merged
