"""λ sweeps: merge at every λ, evaluate each merge on validation splits, select one, write the report.

The evaluator is always given by the caller (``culturemert merge --sweep`` passes one that probes on validation
splits), so merging never imports the evaluation stack.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from culturemert.files import write_json_atomic
from culturemert.plotting import pyplot, save_figure
from culturemert.errors import ConfigError, UserError
from culturemert.files import atomic_write_bytes
from culturemert.merge.job import load_inputs, merge_loaded
from culturemert.merge.options import MergeOptions

log = logging.getLogger(__name__)

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
    plt = pyplot()
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
    save_figure(fig, path, dpi=120)


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
    write_json_atomic(out / "selection.json", selection)
    log.info("sweep: selected λ=%s (mean %s=%.4f)", format_lambda(selected), metric, means[selected])
    return SweepResult(selected_lambda=selected, mean_metric=means, results=results, out_dir=out)


def sweep_merge(
    base_source: str | Path,
    model_sources: Sequence[str | Path],
    lambdas: Sequence[float],
    out_dir: str | Path,
    eval_config: Any,
    options: MergeOptions | None = None,
    *,
    evaluator: Evaluator,
    metric: str = "roc_auc",
    card_extra: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Load the inputs once, merge at every λ, evaluate on validation with ``evaluator`` and select (see run_sweep).

    ``evaluator(model_dir, eval_config) -> {dataset: {metric: value}}`` must score validation splits only (the
    CLI passes one that calls ``culturemert.evaluate.pipeline.evaluate_on_validation``).
    """
    opts = options or MergeOptions()
    if opts.method == "linear":
        raise ConfigError("a λ sweep needs a task-vector method; 'linear' has weights, not λ")
    if isinstance(opts.lambdas, list):
        raise ConfigError("a λ sweep scans one λ shared by all models; drop the per-model lambdas")
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
