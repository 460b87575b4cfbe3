"""``culturemert merge --base B --models M1 M2 ... --out DIR``: weight-space merging, optionally with a λ sweep.

See docs/merging.md for the formulas, where λ enters each method, and every hyper-parameter's default.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from culturemert.config import parse_config
from culturemert.errors import ConfigError
from culturemert.merge import (
    DEFAULT_BREADCRUMBS_DENSITY,
    DEFAULT_BREADCRUMBS_GAMMA,
    DEFAULT_DELLA_DROP_RATE,
    DEFAULT_DELLA_EPSILON,
    DEFAULT_DENSITY,
    DEFAULT_DROP_RATE,
    DEFAULT_ISO_CTS_COMMON_FRACTION,
    DEFAULT_TRIM_SCOPE,
    DEFAULT_LAMBDA,
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    MERGE_METHODS,
    MergeOptions,
    format_lambda,
    merge_models,
    parse_lambda_range,
    sweep_merge,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="the model every input was trained from (any format load_model reads)")
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL", help="models to merge")
    parser.add_argument("--method", choices=MERGE_METHODS, default="task_arithmetic")
    lam = parser.add_mutually_exclusive_group()
    lam.add_argument(
        "--lambda",
        dest="lambda_",
        metavar="L",
        type=float,
        help="λ for every model (default: "
        + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LAMBDA.items())
        + ")",
    )
    lam.add_argument("--lambdas", nargs="+", type=float, metavar="L", help="one λ per model, in --models order")
    lam.add_argument("--sweep", metavar="START:STOP:STEP", help="merge at every λ (stop inclusive) and select one")
    parser.add_argument(
        "--mean", action="store_true", help="divide λ by the number of models (task_arithmetic, dare, breadcrumbs)"
    )
    parser.add_argument(
        "--density",
        type=float,
        help=f"ties: fraction of each task vector kept (default {DEFAULT_DENSITY:g}); breadcrumbs: fraction kept "
        f"after both masks (default {DEFAULT_BREADCRUMBS_DENSITY:g})",
    )
    parser.add_argument(
        "--drop-rate",
        type=float,
        help=f"dare, dare_ties: drop probability (default {DEFAULT_DROP_RATE:g}); della: mean drop probability "
        f"(default {DEFAULT_DELLA_DROP_RATE:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="dare, dare_ties, della: seed of the drop masks")
    parser.add_argument(
        "--trim-scope",
        choices=("per_tensor", "global"),
        help=f"ties, breadcrumbs: rank magnitudes within each tensor or over the whole model (default "
        f"{DEFAULT_TRIM_SCOPE}; global is the TIES paper's, see docs/merging.md)",
    )
    parser.add_argument(
        "--gamma",
        type=float,
        help=f"breadcrumbs: fraction of largest-magnitude entries removed (default {DEFAULT_BREADCRUMBS_GAMMA:g})",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        help=f"della: drop probabilities span drop-rate ± epsilon by magnitude rank (default {DEFAULT_DELLA_EPSILON:g})",
    )
    parser.add_argument(
        "--rank-fraction", type=float, help="tsv: fraction of each matrix's rank kept per task (default 1/number of models)"
    )
    parser.add_argument(
        "--common-fraction",
        type=float,
        help=f"iso_cts: fraction of the rank given to the common subspace (default {DEFAULT_ISO_CTS_COMMON_FRACTION:g})",
    )
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="linear: one weight per model")
    parser.add_argument(
        "--include", nargs="+", default=[], metavar="GLOB", help="merge only parameters matching one of these globs"
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="keep the base's values for these parameters, e.g. 'backbone.feature_extractor.*' 'heads.*'",
    )
    parser.add_argument(
        "--max-task-vector-ratio",
        type=float,
        default=DEFAULT_MAX_TASK_VECTOR_RATIO,
        help="reject inputs with ||θ_i − θ_base|| / ||θ_base|| above this (not derived from the base)",
    )
    parser.add_argument("--allow-unrelated", action="store_true", help="merge inputs that do not look derived from --base")
    parser.add_argument(
        "--select-on",
        metavar="EVAL_CONFIG|ssl-loss",
        help="with --sweep: an evaluation config (probes on validation splits), or ssl-loss: the held-out "
        "masked-prediction loss on the valid split of --prepared (no labels)",
    )
    parser.add_argument("--metric", default="roc_auc", help="with --sweep: probe metric to maximise (mean over datasets)")
    parser.add_argument(
        "--methods", nargs="+", choices=MERGE_METHODS, metavar="METHOD",
        help="with --sweep: sweep several methods and select the method too (replaces --method)",
    )
    parser.add_argument(
        "--prepared", nargs="+", metavar="DIR",
        help="with --sweep: prepared directories whose valid split gives the held-out loss (needed by ssl-loss)",
    )
    parser.add_argument("--protected", metavar="CULTURE", help="with --prepared: culture whose held-out loss is a constraint")
    parser.add_argument(
        "--max-protected-increase", type=float, default=None, metavar="NATS",
        help="the protected culture's held-out loss may exceed the base's by at most this (default 0.05)",
    )
    parser.add_argument("--heldout-crops", type=int, default=None, metavar="N", help="held-out crops per culture (default 32)")
    parser.add_argument("--crop-seconds", type=float, default=None, help="held-out crop length in seconds (default 5)")
    parser.add_argument(
        "--mix", metavar="MODEL",
        help="with --sweep: the multi-culture model trained on the inputs' data; writes merge_vs_mix.{md,csv,png}",
    )
    parser.add_argument("--out", required=True, help="output export directory (with --sweep: the sweep directory)")


def _option_data(args: argparse.Namespace) -> dict[str, Any]:
    lambdas = args.lambdas if args.lambdas is not None else args.lambda_
    return {
        "method": args.method,
        "lambdas": lambdas,
        "mean": args.mean,
        "density": args.density,
        "drop_rate": args.drop_rate,
        "seed": args.seed,
        "trim_scope": args.trim_scope,
        "gamma": args.gamma,
        "epsilon": args.epsilon,
        "rank_fraction": args.rank_fraction,
        "common_fraction": args.common_fraction,
        "include": args.include,
        "exclude": args.exclude,
        "weights": args.weights,
        "max_task_vector_ratio": args.max_task_vector_ratio,
        "allow_unrelated": args.allow_unrelated,
    }


def _options(args: argparse.Namespace) -> MergeOptions:
    return parse_config(_option_data(args), MergeOptions, source="culturemert merge arguments")


def evaluate_on_validation(model_dir: Path, eval_config: Any) -> dict[str, dict[str, float]]:
    """The sweep's evaluator: validation-split probes of ``model_dir`` (the evaluation stack loads only here)."""
    from culturemert.evaluate.pipeline import evaluate_on_validation as evaluate

    return evaluate(model_dir, eval_config)


def _label_free(args: argparse.Namespace) -> bool:
    """The multi-method / held-out-loss sweep (culturemert.merge.select) rather than the single-method probe sweep."""
    return args.select_on == "ssl-loss" or bool(args.methods) or bool(args.prepared) or args.mix is not None


def _run_selection(args: argparse.Namespace) -> int:
    from culturemert.merge.select import HeldOutLoss, LabelFreeSelection, sweep_methods

    if args.select_on is None:
        raise ConfigError("--sweep needs --select-on ssl-loss (with --prepared) or --select-on EVAL_CONFIG")
    if args.select_on == "ssl-loss" and not args.prepared:
        raise ConfigError("--select-on ssl-loss needs --prepared DIR [DIR ...] (prepared with a valid split)")
    if args.max_protected_increase is not None and args.protected is None:
        raise ConfigError("--max-protected-increase needs --protected CULTURE (the culture it limits)")
    if args.protected is not None and not args.prepared:
        raise ConfigError("--protected needs --prepared DIR [DIR ...]: the constraint is on held-out loss")
    given = {"protected": args.protected, "max_protected_increase": args.max_protected_increase,
             "crops_per_culture": args.heldout_crops, "crop_seconds": args.crop_seconds}
    settings = parse_config({k: v for k, v in given.items() if v is not None}, LabelFreeSelection,
                            source="culturemert merge arguments")
    ssl = None
    if args.prepared:
        ssl = HeldOutLoss(args.prepared, split=settings.split, crops_per_culture=settings.crops_per_culture,
                          batch_clips=settings.batch_clips, crop_seconds=settings.crop_seconds, seed=settings.seed)
        if settings.protected is not None and settings.protected not in ssl.cultures:
            raise ConfigError(f"--protected {settings.protected}: no held-out crops for it in --prepared "
                              f"(validated: {', '.join(ssl.cultures)})")
    eval_config = args.select_on

    def probe_on_validation(model_dir: Path) -> dict[str, dict[str, float]]:
        return evaluate_on_validation(model_dir, eval_config)

    probe = probe_on_validation if args.select_on != "ssl-loss" else None

    result = sweep_methods(
        args.base, args.models, args.methods or [args.method], parse_lambda_range(args.sweep), args.out,
        _option_data(args), select_on="ssl-loss" if args.select_on == "ssl-loss" else "probe", ssl=ssl, probe=probe,
        probe_metric=args.metric, protected=settings.protected,
        max_protected_increase=settings.max_protected_increase, mix_source=args.mix,
    )
    for cand in result.candidates:
        marker = "  <- selected" if cand is result.selected else ("" if cand.admissible else "  (not admissible)")
        rise = "" if cand.protected_increase is None else f"  {settings.protected} {cand.protected_increase:+.4f}"
        print(f"{cand.method:>16} λ={format_lambda(cand.lam):>6}  objective = {cand.objective:.4f}{rise}{marker}")
    print(f"selected {result.selected.method} λ={format_lambda(result.selected.lam)} (validation; {result.rule}); "
          f"export written to {args.out}/selected")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.sweep is not None and _label_free(args):
        if args.base is None:
            raise ConfigError("--base is required for a sweep (task vectors are θ_i − θ_base)")
        return _run_selection(args)
    for flag, value in (("--methods", args.methods), ("--prepared", args.prepared), ("--mix", args.mix),
                        ("--protected", args.protected)):
        if value:
            raise ConfigError(f"{flag} only applies with --sweep")
    options = _options(args)
    if args.base is None and args.method != "linear":
        raise ConfigError(f"--base is required for method {args.method!r} (task vectors are θ_i − θ_base)")
    if args.sweep is None:
        if args.select_on is not None:
            raise ConfigError("--select-on only applies with --sweep")
        models = args.models
        record = merge_models(args.base, models, args.out, options)
        lambdas = record["lambdas"] if record["lambdas"] is not None else record["weights"]
        print(
            f"wrote {args.out}: {record['method']} of {len(models)} models "
            f"({'λ' if record['lambdas'] is not None else 'weights'} = {', '.join(format_lambda(v) for v in lambdas)}; "
            f"{record['scope']['num_merged_tensors']} tensors merged, {record['scope']['num_kept_from_base']} kept from base"
            + "".join(f"; {k} = {v:g}" if isinstance(v, float) else f"; {k} = {v}" for k, v in record["hyperparameters"].items())
            + ")"
        )
        return 0

    if args.select_on is None:
        raise ConfigError("--sweep needs --select-on EVAL_CONFIG (an evaluation config using validation splits)")
    result = sweep_merge(
        args.base, args.models, parse_lambda_range(args.sweep), args.out, args.select_on, options,
        evaluator=evaluate_on_validation, metric=args.metric,
    )
    for lam in sorted(result.mean_metric):
        marker = "  <- selected" if lam == result.selected_lambda else ""
        print(f"λ={format_lambda(lam):>6}  mean {args.metric} = {result.mean_metric[lam]:.4f}{marker}")
    print(f"selected λ={format_lambda(result.selected_lambda)} (validation); export copied to {args.out}/selected")
    return 0
