"""What defines a merge besides its inputs: the method, its λ or weights, its hyper-parameters and its scope.

:class:`MergeOptions` is recorded verbatim in the output's model card, so its fields are the merge's provenance.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from culturemert.config import StrictModel
from culturemert.errors import ConfigError

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
