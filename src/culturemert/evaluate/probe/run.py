"""Selection on validation, summaries over seeds, and the entry points that write a results file."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from culturemert.config import load_config
from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.features import ProbeData, describe_duplicates, load_probe_data, truncate_windows
from culturemert.evaluate.metrics import METRIC_NAMES
from culturemert.evaluate.probe.batched import tag_list, train_probes, validation_monitor
from culturemert.evaluate.probe.settings import (
    PROTOCOLS,
    WEIGHTED,
    ProbeConfig,
    ProbeOutcome,
    ProbeSettings,
    make_specs,
    truncation_seconds,
)

log = logging.getLogger(__name__)


# selection and summaries (validation only)


def _selection_value(outcome: ProbeOutcome, metric: str) -> float:
    """Higher = better; NaN for a probe whose validation never gave a finite value."""
    if outcome.best_epoch == 0:
        return math.nan
    metrics = outcome.valid
    if metric == "valid_loss":
        return -metrics["loss"]
    if metric == "roc_auc+ap":
        return 0.5 * (metrics["roc_auc"] + metrics["ap"])
    return metrics[metric]


def _mean_std(values: list[float], ddof: int) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=ddof)) if arr.size > ddof else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr]}


def summarise(outcomes: Sequence[ProbeOutcome], settings: ProbeSettings, monitor: str = "roc_auc") -> dict[str, Any]:
    """Validation-only selection.

    For each layer choice the lr with the best seed-mean validation score is kept (the layer curve); the
    overall selection is the best (layer choice, lr) by the same criterion. The score is ``selection_metric``,
    or the negated validation loss when ``monitor`` is ``"valid_loss"`` (the fallback the user chose). A
    (layer, lr) with any seed whose validation value was never finite has no score and is never selected;
    when no configuration has a score, :class:`DataError` is raised. Test numbers of the selected
    configurations are reported, never used.
    """
    metric = settings.selection_metric if monitor == "roc_auc" else "valid_loss"
    groups: dict[tuple[str, float], list[ProbeOutcome]] = {}
    for o in outcomes:
        groups.setdefault((str(o.spec.layer), o.spec.lr), []).append(o)

    def describe(key: tuple[str, float], members: list[ProbeOutcome]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": key[0],
            "lr": key[1],
            "seeds": [o.spec.seed for o in members],
            "selection_score": float(np.mean([_selection_value(o, metric) for o in members])),
            "valid": {m: _mean_std([o.valid[m] for o in members], settings.std_ddof) for m in METRIC_NAMES},
            "valid_loss": _mean_std([o.valid.get("loss", math.nan) for o in members], settings.std_ddof),
            "best_epochs": [o.best_epoch for o in members],
        }
        if all(o.test is not None for o in members):
            out["test"] = {m: _mean_std([o.test[m] for o in members], settings.std_ddof) for m in METRIC_NAMES}  # type: ignore[index]
        if members[0].layer_weights is not None:
            out["layer_weights_mean"] = np.mean([o.layer_weights for o in members], axis=0).tolist()
        return out

    described = {key: describe(key, members) for key, members in groups.items()}
    unscorable = [f"layer {k[0]} lr {k[1]:g}" for k, info in described.items() if math.isnan(info["selection_score"])]
    per_layer: dict[str, dict[str, Any]] = {}
    for key, info in described.items():
        if math.isnan(info["selection_score"]):
            continue
        current = per_layer.get(key[0])
        if current is None or info["selection_score"] > current["selection_score"]:
            per_layer[key[0]] = info
    if not per_layer:
        raise DataError(
            f"no probe configuration has a finite validation {metric} (every one diverged or never scored: "
            f"{tag_list(unscorable)}); lower the learning rates or check the features"
        )
    selected = max(per_layer.values(), key=lambda info: info["selection_score"])
    singles = [v for k, v in per_layer.items() if k != WEIGHTED]
    return {
        "selection_metric": metric,
        "selected": selected,
        "best_single_layer": max(singles, key=lambda i: i["selection_score"]) if singles else None,
        "weighted_sum": per_layer.get(WEIGHTED),
        "layers": per_layer,
        "grid": list(described.values()),
        "unscorable": unscorable,
    }


# --------------------------------------------------------------------------------------------------------
# entry points


def _check_duplicates(data: ProbeData, settings: ProbeSettings) -> None:
    if not data.duplicates:
        return
    message = (
        f"{data.dataset or 'features'}: {len(data.duplicates)} recording(s) with identical audio bytes sit in two "
        f"splits, so test/validation audio is also trained on: {describe_duplicates(data.duplicates)}"
    )
    if settings.duplicate_audio == "error":
        raise DataError(message + " (remove the copies from the dataset, or set duplicate_audio: warn)")
    log.warning("%s", message)


def _protocol_record(settings: ProbeSettings, cut: float | None, dropped: dict[str, int] | None, monitor: str,
                     data: ProbeData) -> dict[str, Any]:
    protocol = PROTOCOLS[settings.protocol]
    unit = "windows" if protocol.batching == "window" else "tracks"
    record: dict[str, Any] = {
        "name": protocol.name,
        "batching": protocol.batching,
        "batch_size": settings.batch_size,
        "batch_unit": unit,
        "summary": protocol.summary,
        "truncate_seconds": cut,
        "windows_dropped": dropped or {},
        "window_seconds": data.window_seconds,
        "hop_seconds": data.hop_seconds,
        "monitor": monitor,
    }
    if monitor != "roc_auc":
        record["selection_fallback"] = (
            "validation ROC-AUC/AP undefined (no valid tag has both classes): epochs, lrs and layers selected on "
            "the validation BCE loss (validation_fallback: valid_loss)"
        )
    return record


def run_probe(
    data: ProbeData,
    settings: ProbeSettings,
    *,
    progress: bool = True,
    evaluate_test: bool = True,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply the protocol (cut recordings), train the whole grid, select on validation, return the
    JSON-serialisable results; ``results["protocol"]`` names the protocol and ``results["protocol_details"]``
    says how it ran (batching, cuts, what selection monitored).

    Raises :class:`DataError` when validation cannot rank the probes (:func:`validation_monitor`), when the
    same audio sits in two splits and ``duplicate_audio`` is ``error``, or when every probe diverged.
    """
    dataset = str((context or {}).get("dataset") or data.dataset)
    if dataset and not data.dataset:
        data = replace(data, dataset=dataset)
    _check_duplicates(data, settings)
    cut = truncation_seconds(settings, dataset)
    dropped = None
    if cut is not None:
        data, dropped = truncate_windows(data, cut)
    if protocol_needs_disjoint_windows(settings) and data.window_seconds is not None and data.hop_seconds is not None:
        if 0 < data.hop_seconds < data.window_seconds:
            raise ConfigError(
                f"protocol {settings.protocol}: trains and tests on non-overlapping windows, but {dataset or 'the features'} "
                f"were embedded with hop {data.hop_seconds:g} s < window {data.window_seconds:g} s; re-embed with hop = window"
            )
    monitor = validation_monitor(data, settings)
    specs = make_specs(settings, data.num_layers)
    t0 = time.perf_counter()
    outcomes, excluded = train_probes(data, specs, settings, progress=progress, evaluate_test=evaluate_test)
    elapsed = time.perf_counter() - t0
    summary = summarise(outcomes, settings, monitor)
    return {
        **(context or {}),
        "protocol": settings.protocol,
        "protocol_details": _protocol_record(settings, cut, dropped, monitor, data),
        "vocabulary": data.vocabulary,
        "num_tracks": {
            "train": data.train.num_tracks,
            "valid": data.valid.num_tracks,
            **({"test": data.test.num_tracks} if data.test is not None and evaluate_test else {}),
        },
        "num_layers": data.num_layers,
        "excluded_tags": excluded,
        "duplicate_audio": data.duplicates,
        "settings": settings.model_dump(mode="json"),
        "train_seconds": elapsed,
        "summary": summary,
        "probes": [o.as_dict() for o in outcomes],
    }


def protocol_needs_disjoint_windows(settings: ProbeSettings) -> bool:
    """The CultureMERT authors' code averaged *non-overlapping* chunks at test time."""
    return settings.protocol == "culturemert-paper"


def run_probe_config(config: ProbeConfig | str | Path, *, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """``culturemert probe CONFIG``: load features, run the sweep, write ``results.json``; returns (results, path)."""
    from culturemert.files import write_json_atomic

    if not isinstance(config, ProbeConfig):
        config = load_config(config, ProbeConfig)
    data, meta = load_probe_data(config.features, require_test=True)
    settings = ProbeSettings.model_validate(config.model_dump(exclude={"features", "out", "model_name"}))
    context = {
        "model": config.model_name or meta.get("model", "unknown"),
        "model_fingerprint": meta.get("model_fingerprint"),
        "dataset": meta.get("dataset", Path(config.features).name),
        "features": str(config.features),
    }
    results = run_probe(data, settings, progress=progress, context=context)
    out_dir = Path(config.out) if config.out is not None else Path(config.features) / "probe"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    write_json_atomic(path, results)
    return results, path


def results_digest(results: dict[str, Any]) -> str:
    """Hash of the per-probe numbers (used to check determinism)."""
    return hashlib.sha256(json.dumps(results["probes"], sort_keys=True).encode()).hexdigest()
