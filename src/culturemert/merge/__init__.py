"""Weight-space model merging: task arithmetic, TIES, DARE, DARE-TIES, Model Breadcrumbs, DELLA, TSV-Merge,
Iso-C, Iso-CTS and linear averaging; λ sweeps.

Notation: θ_base is the model every input was continually pre-trained from, θ_i the inputs,
τ_i = θ_i − θ_base their task vectors, λ_i the per-model scaling factors.

* ``task_arithmetic`` (Ilharco et al. 2023): θ = θ_base + Σ_i λ_i τ_i; with ``mean=True`` λ_i is replaced by λ_i / n,
  so λ = 1 with ``mean=True`` is the plain average of the inputs.
* ``ties`` (Yadav et al. 2023, Algorithm 1): each τ_i is trimmed to the ``density`` fraction of its entries with
  the largest magnitude, ranked within each tensor (``trim_scope="per_tensor"``, the default, as mergekit) or over
  the whole model (``"global"``, as the paper's reference code); the sign of every entry is elected as
  sgn(Σ_i τ̂_i) (the sign with the larger total magnitude); the merged vector is the mean over the models whose
  trimmed entry is non-zero and agrees with the elected sign (zero where none agrees). **λ enters only after the
  disjoint mean**: θ = θ_base + (1/|A|) Σ_{i∈A} λ_i τ̂_i, so λ never changes which sign wins (mergekit applies its
  per-model ``weight`` before sign election, which deviates from the paper; arcee-ai/mergekit#474). On an exact
  tie the elected sign is 0 and the entry stays at θ_base.
* ``dare`` (Yu et al. 2024): every entry of τ_i is dropped with probability ``drop_rate`` p and the survivors are
  rescaled by 1/(1 − p), then combined as in task arithmetic. The mask is drawn from a generator seeded by
  (``seed``, model index, tensor name), so a merge is reproducible and independent of tensor order.
* ``dare_ties``: DARE's drop-and-rescale replaces TIES' magnitude trim; sign election and disjoint mean as TIES.
* ``breadcrumbs`` (Davari & Belilovsky 2024): τ_i loses its ``gamma`` fraction of largest-magnitude entries and its
  smallest ones, keeping ``density``; then task arithmetic. ``trim_scope`` as TIES.
* ``della`` (Deep et al. 2024): MagPrune drops each entry with a probability set by its magnitude rank in its row,
  within [p − ε, p + ε], and rescales survivors by 1/(1 − p_i); then sign election and disjoint mean as TIES.
* ``tsv`` (Gargiulo et al. 2025), ``iso_c`` and ``iso_cts`` (Marczak et al. 2025): SVD-based merges of each 2-D
  weight matrix (other tensors: the mean task vector), scaled by one α = λ.
* ``linear``: θ = Σ_i w_i θ_i / Σ_i w_i; needs no base.

Each kernel's docstring in :mod:`~culturemert.merge.methods` gives its formula, source and defaults;
docs/merging.md has the table.

Modules: :mod:`~culturemert.merge.options` (what defines a merge), :mod:`~culturemert.merge.methods` (per-tensor
kernels), :mod:`~culturemert.merge.engine` (the streaming merge over state dicts),
:mod:`~culturemert.merge.thresholds` (exact whole-model magnitude thresholds in bounded memory),
:mod:`~culturemert.merge.job` (opening model sources and writing the export with its card) and
:mod:`~culturemert.merge.sweep` (λ sweeps selected on validation), :mod:`~culturemert.merge.select` (method and λ
selected without labels by held-out masked-prediction loss; the merge-vs-mix report).
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
from culturemert.merge.methods import (
    breadcrumbs_mask,
    dare_drop,
    della_magprune,
    iso_c_merge,
    iso_cts_merge,
    polar_factor,
    ties_combine,
    trim_top_magnitude,
    tsv_merge,
)
from culturemert.merge.thresholds import GlobalMagnitudeRanks
from culturemert.merge.options import (
    DEFAULT_BREADCRUMBS_DENSITY,
    DEFAULT_BREADCRUMBS_GAMMA,
    DEFAULT_DELLA_DROP_RATE,
    DEFAULT_DELLA_EPSILON,
    DEFAULT_DENSITY,
    DEFAULT_DROP_RATE,
    DEFAULT_ISO_CTS_COMMON_FRACTION,
    DEFAULT_LAMBDA,
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    DEFAULT_TRIM_SCOPE,
    DISJOINT_METHODS,
    MERGE_METHODS,
    METHOD_HYPERPARAMETERS,
    SPECTRAL_METHODS,
    SUMMING_METHODS,
    TRIMMING_METHODS,
    MergeMethod,
    MergeOptions,
    TrimScope,
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
    "DEFAULT_BREADCRUMBS_DENSITY",
    "DEFAULT_BREADCRUMBS_GAMMA",
    "DEFAULT_DELLA_DROP_RATE",
    "DEFAULT_DELLA_EPSILON",
    "DEFAULT_DENSITY",
    "DEFAULT_DROP_RATE",
    "DEFAULT_ISO_CTS_COMMON_FRACTION",
    "DEFAULT_LAMBDA",
    "DEFAULT_MAX_TASK_VECTOR_RATIO",
    "DEFAULT_TRIM_SCOPE",
    "DISJOINT_METHODS",
    "HEADS_PREFIX",
    "MERGE_METHODS",
    "METHOD_HYPERPARAMETERS",
    "SPECTRAL_METHODS",
    "SUMMING_METHODS",
    "TRIMMING_METHODS",
    "Evaluator",
    "GlobalMagnitudeRanks",
    "LoadedInputs",
    "MergeMethod",
    "MergeOptions",
    "MergeReport",
    "SweepResult",
    "TrimScope",
    "breadcrumbs_mask",
    "dare_drop",
    "della_magprune",
    "format_lambda",
    "in_scope",
    "iso_c_merge",
    "iso_cts_merge",
    "load_inputs",
    "merge_loaded",
    "merge_models",
    "merge_state_dicts",
    "merge_with_report",
    "open_inputs_lazily",
    "parse_lambda_range",
    "polar_factor",
    "run_sweep",
    "select_best_lambda",
    "sweep_merge",
    "ties_combine",
    "trim_top_magnitude",
    "tsv_merge",
]
