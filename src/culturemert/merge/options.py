"""What defines a merge besides its inputs: the method, its λ or weights, its hyper-parameters and its scope.

:class:`MergeOptions` is recorded verbatim in the output's model card, so its fields are the merge's provenance.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from culturemert.config import StrictModel
from culturemert.errors import ConfigError

MergeMethod = Literal[
    "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "della", "tsv", "iso_c", "iso_cts", "linear"
]
MERGE_METHODS: tuple[str, ...] = (
    "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "della", "tsv", "iso_c", "iso_cts", "linear"
)
# θ_base + Σ_i λ_i τ̃_i, where τ̃_i is τ_i or a masked/rescaled copy of it: ``mean`` (λ_i / n) applies.
SUMMING_METHODS = ("task_arithmetic", "dare", "breadcrumbs")
# Sign election and disjoint mean of the (sparsified) task vectors, λ after the vote.
DISJOINT_METHODS = ("ties", "dare_ties", "della")
# SVD of each 2-D matrix; one α (the λ) scales the merged update of every tensor.
SPECTRAL_METHODS = ("tsv", "iso_c", "iso_cts")
# Magnitude masks, which can rank entries within each tensor or over the whole model (``trim_scope``).
TRIMMING_METHODS = ("ties", "breadcrumbs")
TrimScope = Literal["per_tensor", "global"]

# Our defaults (none of them published by CultureMERT except λ = 0.2 for task arithmetic over four models).
DEFAULT_LAMBDA = {
    "task_arithmetic": 0.2, "dare": 0.2, "breadcrumbs": 0.2,
    "ties": 1.0, "dare_ties": 1.0, "della": 1.0,
    "tsv": 1.0, "iso_c": 1.0, "iso_cts": 1.0,
}
DEFAULT_DENSITY = 0.2  # TIES paper's top-20 %
DEFAULT_DROP_RATE = 0.9  # DARE paper's usual drop rate
# mergekit's documented breadcrumbs example (its code default density, 1.0, would disable the mask) and its gamma.
DEFAULT_BREADCRUMBS_DENSITY = 0.9
DEFAULT_BREADCRUMBS_GAMMA = 0.01
# The DELLA authors' example command (declare-lab/della README): drop rate 0.3, window 0.14, i.e. ε = 0.07.
DEFAULT_DELLA_DROP_RATE = 0.3
DEFAULT_DELLA_EPSILON = 0.07
# The Iso-CTS reference configuration (danielm1405/iso-merging, config/method/iso_cts.yaml).
DEFAULT_ISO_CTS_COMMON_FRACTION = 0.8
DEFAULT_TRIM_SCOPE = "per_tensor"  # see docs/merging.md, "TIES trimming scope"
# A model trained from a different initialisation has ||θ_i − θ_base|| ≈ √2 ||θ_base||; continual pre-training
# moves weights by a few percent. 1.0 separates the two with a wide margin.
DEFAULT_MAX_TASK_VECTOR_RATIO = 1.0

# The hyper-parameters each method uses, in the order the model card lists them.
METHOD_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "task_arithmetic": (),
    "ties": ("density", "trim_scope"),
    "dare": ("drop_rate", "seed"),
    "dare_ties": ("drop_rate", "seed"),
    "breadcrumbs": ("density", "gamma", "trim_scope"),
    "della": ("drop_rate", "epsilon", "seed"),
    "tsv": ("rank_fraction",),
    "iso_c": (),
    "iso_cts": ("common_fraction",),
    "linear": (),
}
# Fields added with the methods beyond task arithmetic: giving one to a method that does not use it is an error.
# (density, drop_rate and seed predate them and stay ignored by methods that do not use them.)
_STRICT_HYPERPARAMETERS = ("trim_scope", "gamma", "epsilon", "rank_fraction", "common_fraction")


class MergeOptions(StrictModel):
    """Everything that defines a merge besides its inputs; recorded verbatim in the output's model card.

    Hyper-parameters left at None take the method's default (:meth:`hyperparameters` resolves them; the card
    records the resolved values). Ranges: ``density`` in (0, 1], ``drop_rate``, ``gamma`` and ``epsilon`` in
    [0, 1), ``rank_fraction`` and ``common_fraction`` in (0, 1]. Raises ``ValueError`` (a ``ConfigError`` through
    :func:`culturemert.config.parse_config`) on a value out of range or a hyper-parameter the method does not use.
    """

    method: MergeMethod = "task_arithmetic"
    # One float for every model, a list with one value per model, or None for the method's default.
    lambdas: float | list[float] | None = None
    mean: bool = False
    # ties: fraction of each task vector kept (default 0.2); breadcrumbs: fraction kept after both masks (0.9).
    density: float | None = Field(None, gt=0.0, le=1.0)
    # dare, dare_ties: drop probability (default 0.9); della: mean drop probability p (0.3).
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0)
    seed: int = 0  # dare, dare_ties, della: seed of the random masks
    trim_scope: TrimScope | None = None  # ties, breadcrumbs: rank magnitudes per tensor or over the whole model
    gamma: float | None = Field(None, ge=0.0, lt=1.0)  # breadcrumbs: fraction of largest entries removed (0.01)
    epsilon: float | None = Field(None, ge=0.0, lt=1.0)  # della: half-width of the drop-probability window (0.07)
    rank_fraction: float | None = Field(None, gt=0.0, le=1.0)  # tsv: fraction of rank kept per task (1/T)
    common_fraction: float | None = Field(None, gt=0.0, le=1.0)  # iso_cts: common-subspace fraction of rank (0.8)
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
        if self.method in SPECTRAL_METHODS and isinstance(self.lambdas, list):
            raise ValueError(
                f"method {self.method!r} scales the merged update by one α; give one lambda, not one per model"
            )
        used = METHOD_HYPERPARAMETERS[self.method]
        for name in _STRICT_HYPERPARAMETERS:
            if getattr(self, name) is not None and name not in used:
                users = [m for m, names in METHOD_HYPERPARAMETERS.items() if name in names]
                raise ValueError(f"{name} applies to method {' and '.join(map(repr, users))}, not {self.method!r}")
        if self.method == "della":
            p, eps = self._resolved("drop_rate"), self._resolved("epsilon")
            if eps > p or p + eps >= 1.0:
                raise ValueError(
                    f"della needs epsilon <= drop_rate and drop_rate + epsilon < 1 (got drop_rate {p:g}, epsilon "
                    f"{eps:g}): every drop probability must lie in [0, 1)"
                )
        return self

    def _resolved(self, name: str) -> Any:
        value = getattr(self, name)
        if value is not None:
            return value
        defaults: dict[str, Any] = {
            "density": DEFAULT_BREADCRUMBS_DENSITY if self.method == "breadcrumbs" else DEFAULT_DENSITY,
            "drop_rate": DEFAULT_DELLA_DROP_RATE if self.method == "della" else DEFAULT_DROP_RATE,
            "trim_scope": DEFAULT_TRIM_SCOPE,
            "gamma": DEFAULT_BREADCRUMBS_GAMMA,
            "epsilon": DEFAULT_DELLA_EPSILON,
            "common_fraction": DEFAULT_ISO_CTS_COMMON_FRACTION,
        }
        return defaults[name]

    def hyperparameters(self, num_models: int) -> dict[str, Any]:
        """The method's hyper-parameters with defaults filled in, as the merge uses them (for the model card).

        ``rank_fraction`` defaults to 1/T for T = ``num_models`` (TSV-Merge's choice); T · rank_fraction must not
        exceed 1, since the T tasks' singular directions share one matrix's rank. Raises :class:`ConfigError`.
        """
        values: dict[str, Any] = {}
        for name in METHOD_HYPERPARAMETERS[self.method]:
            if name == "rank_fraction":
                fraction = self.rank_fraction if self.rank_fraction is not None else 1.0 / num_models
                if fraction * num_models > 1.0 + 1e-9:
                    raise ConfigError(
                        f"rank_fraction {fraction:g} x {num_models} models exceeds 1: the tasks' singular "
                        f"directions must fit in one matrix's rank (at most {1 / num_models:g})"
                    )
                values[name] = fraction
            else:
                values[name] = self._resolved(name)
        return values

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
