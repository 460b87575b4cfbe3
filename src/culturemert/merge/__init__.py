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

Modules: :mod:`~culturemert.merge.options` (what defines a merge), :mod:`~culturemert.merge.methods` (per-tensor
kernels), :mod:`~culturemert.merge.engine` (the streaming merge over state dicts),
:mod:`~culturemert.merge.job` (opening model sources and writing the export with its card) and
:mod:`~culturemert.merge.sweep` (λ sweeps selected on validation).
"""

from culturemert.merge.engine import MergeReport, in_scope, merge_state_dicts, merge_with_report
from culturemert.merge.job import (
    HEADS_PREFIX,
    LoadedInputs,
    load_inputs,
    merge_loaded,
    merge_models,
    open_inputs_lazily,
)
from culturemert.merge.methods import dare_drop, ties_combine, trim_top_magnitude
from culturemert.merge.options import (
    DEFAULT_DENSITY,
    DEFAULT_DROP_RATE,
    DEFAULT_LAMBDA,
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    DISJOINT_METHODS,
    MERGE_METHODS,
    SUMMING_METHODS,
    MergeMethod,
    MergeOptions,
)
from culturemert.merge.sweep import (
    Evaluator,
    SweepResult,
    format_lambda,
    parse_lambda_range,
    run_sweep,
    select_best_lambda,
    sweep_merge,
)

__all__ = [
    "DEFAULT_DENSITY",
    "DEFAULT_DROP_RATE",
    "DEFAULT_LAMBDA",
    "DEFAULT_MAX_TASK_VECTOR_RATIO",
    "DISJOINT_METHODS",
    "HEADS_PREFIX",
    "MERGE_METHODS",
    "SUMMING_METHODS",
    "Evaluator",
    "LoadedInputs",
    "MergeMethod",
    "MergeOptions",
    "MergeReport",
    "SweepResult",
    "dare_drop",
    "format_lambda",
    "in_scope",
    "load_inputs",
    "merge_loaded",
    "merge_models",
    "merge_state_dicts",
    "merge_with_report",
    "open_inputs_lazily",
    "parse_lambda_range",
    "run_sweep",
    "select_best_lambda",
    "sweep_merge",
    "ties_combine",
    "trim_top_magnitude",
]
