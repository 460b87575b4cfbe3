"""evaluate = embed (cached) + probe for every model x dataset, then the report.

Output layout of ``evaluate(..., out_dir)``::

    out_dir/cache/                       shared feature cache (all models, all datasets)
    out_dir/features/<model>/<dataset>/  consolidated features (features.npy, chunk_track.npy, labels.npy, meta.json)
    out_dir/runs/<model>/<dataset>/results.json
    out_dir/report/                      report.md, CSV tables, PNG plots

``evaluate_on_validation`` (used by ``merge --sweep``) embeds only the train and valid splits and trains the
same probe grid, returning validation metrics of the validation-selected configuration; the test split is
neither embedded nor scored.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from culturemert.config import StrictModel, load_config
from culturemert.errors import ConfigError
from culturemert.evaluate.datasets import DatasetConfig
from culturemert.evaluate.embed import EmbedSettings, load_encoder, embed_dataset
from culturemert.evaluate.features import load_probe_data
from culturemert.evaluate.probe import ProbeSettings, run_probe
from culturemert.evaluate.report import load_runs, write_report
from culturemert.files import write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "evaluate", "evaluate_on_validation", "model_tag"]


class EvalConfig(StrictModel):
    """``--datasets CONFIG`` of ``culturemert evaluate`` (and the eval config of ``merge --sweep``)."""

    # typed, so that an error in an entry is reported at its place (datasets.1.kind), not as a bare key
    datasets: list[DatasetConfig] = Field(min_length=1)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    cache_dir: Path | None = None  # default: <out>/cache


def _load_eval_config(config: EvalConfig | str | Path) -> tuple[EvalConfig, Path | None]:
    """An evaluation YAML, or a generic dataset CSV (``path,split,tags``, the format ``embed`` reads) standing
    for ``{datasets: [{kind: csv, paths: {path: FILE}}]}`` with default embed and probe settings."""
    if isinstance(config, EvalConfig):
        return config, None
    path = Path(config)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise ConfigError(f"--datasets {path}: file not found")
        csv_config = EvalConfig(datasets=[{"kind": "csv", "name": path.stem, "paths": {"path": str(path.resolve())}}])
        return csv_config, path.resolve().parent
    return load_config(path, EvalConfig), path.resolve().parent


def model_tag(model: str) -> str:
    """A folder-safe label for a model source (``baseline:logmel`` -> ``baseline-logmel``)."""
    name = Path(model.rstrip("/")).name if not model.startswith(("baseline:", "preset:")) else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _load_datasets(config: EvalConfig, base_dir: Path | None) -> list[Any]:
    from culturemert.evaluate.datasets import load_dataset_from_config

    return [load_dataset_from_config(d, base_dir) for d in config.datasets]


def _probe_is_current(path: Path, meta: dict[str, Any], settings: ProbeSettings, with_test: bool) -> bool:
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (
        old.get("features_cache_key") == meta.get("cache_key")
        and old.get("features_created") == meta.get("created")
        and old.get("settings") == settings.model_dump(mode="json")
        and ("test" in old.get("num_tracks", {})) == with_test
    )


def _embedding_stats(features_dir: Path, report: Any) -> dict[str, Any]:
    """Time and memory of the run that computed these features: this run's when it computed any track, else
    the last such run's (kept in ``embed_stats.json`` beside the features), marked ``from_cache``."""
    path = features_dir / "embed_stats.json"
    stats = report.as_dict()
    stats.pop("errors", None)
    if report.computed > 0 or not path.is_file():
        write_json_atomic(path, stats)
        return {**stats, "from_cache": False}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {**stats, "from_cache": True}
    return {**previous, "from_cache": True, "rerun_seconds": stats["seconds"], "rerun_model_calls": stats["model_calls"]}


def _embed_only(models: Sequence[str], datasets: list[Any], config: EvalConfig, out_dir: Path, *,
                validation_only: bool, progress: bool, trust_remote_code: bool) -> None:
    """torchrun: every rank embeds its share of every model x dataset before rank 0 probes, so no rank waits
    on another's probes (rank 0 then finds every feature in the shared cache)."""
    cache = config.cache_dir or out_dir / "cache"
    splits = ("train", "valid") if validation_only else None
    sub = "features_valid" if validation_only else "features"
    for model in models:
        tag = model_tag(model)
        extractor = load_encoder(model, config.embed, name=model if model.startswith("baseline:") else tag,
                                    trust_remote_code=trust_remote_code)
        for dataset in datasets:
            embed_dataset(extractor, dataset, out_dir / sub / tag / dataset.name, config.embed, cache_root=cache,
                          splits=splits, progress=progress, distributed=True)


def _embed_and_probe(
    model: str, datasets: list[Any], config: EvalConfig, out_dir: Path, *, validation_only: bool, progress: bool,
    trust_remote_code: bool = False,
) -> list[tuple[Path, dict[str, Any]]]:
    tag = model_tag(model)
    cache = config.cache_dir or out_dir / "cache"
    extractor = load_encoder(model, config.embed, name=model if model.startswith("baseline:") else tag,
                                trust_remote_code=trust_remote_code)
    splits = ("train", "valid") if validation_only else None
    sub = "features_valid" if validation_only else "features"
    results = []
    for dataset in datasets:
        features_dir = out_dir / sub / tag / dataset.name
        _, report = embed_dataset(extractor, dataset, features_dir, config.embed, cache_root=cache, splits=splits,
                                  progress=progress, distributed=False)
        log.info("%s / %s: %d tracks embedded (%d computed, %d cached, %d errors)", tag, dataset.name,
                 len(report.keys), report.computed, report.cached, len(report.errors))
        embedding = _embedding_stats(features_dir, report)
        data, meta = load_probe_data(features_dir, require_test=not validation_only,
                                     splits=("train", "valid") if validation_only else ("train", "valid", "test"))
        run_dir = out_dir / ("runs_valid" if validation_only else "runs") / tag / dataset.name
        path = run_dir / "results.json"
        if _probe_is_current(path, meta, config.probe, not validation_only):
            results.append((path, json.loads(path.read_text(encoding="utf-8"))))
            continue
        context = {
            "model": tag if not model.startswith("baseline:") else model,
            "model_source": model,
            "model_fingerprint": extractor.fingerprint,
            "dataset": dataset.name,
            "features": str(features_dir),
            "features_cache_key": meta.get("cache_key"),
            "features_created": meta.get("created"),
            "embed_errors": report.errors,
            "encoder": extractor.describe(),
            "embedding": embedding,
        }
        res = run_probe(data, config.probe, progress=progress, evaluate_test=not validation_only, context=context)
        write_json_atomic(path, res)
        results.append((path, res))
    return results


def evaluate(
    models: Sequence[str],
    eval_config: EvalConfig | str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    probe_overrides: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Embed + probe every model on every dataset, then write the report; returns the report's files.

    Under torchrun every rank embeds a disjoint share of the tracks (:func:`embed_dataset`); rank 0 then probes
    and writes the report, the other ranks return ``{}``. ``trust_remote_code`` allows models that ship their
    own code (recorded per encoder in the results and the report). ``probe_overrides`` replace probe settings
    of the config (e.g. ``{"protocol": "culturemert-paper"}``).
    """
    from culturemert.evaluate.embed import dist_context

    config, base_dir = _load_eval_config(eval_config)
    if probe_overrides:
        probe = ProbeSettings.model_validate({**config.probe.model_dump(), **probe_overrides})
        config = config.model_copy(update={"probe": probe})
    out = Path(out_dir)
    datasets = _load_datasets(config, base_dir)
    if dist_context()[1] > 1:
        _embed_only(models, datasets, config, out, validation_only=False, progress=progress,
                    trust_remote_code=trust_remote_code)
        if dist_context()[0] != 0:
            return {}
    paths = []
    for model in models:
        paths += [p for p, _ in _embed_and_probe(model, datasets, config, out, validation_only=False, progress=progress,
                                                 trust_remote_code=trust_remote_code)]
    runs = load_runs(paths)
    base_name = None
    if base is not None:
        base_name = base if base.startswith("baseline:") else model_tag(base)
    return write_report(runs, out / "report", base=base_name)


def evaluate_on_validation(
    model_dir: str | Path,
    eval_config: EvalConfig | str | Path,
    *,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Validation metrics (seed means, validation-selected layer/lr) per dataset: ``{dataset: {metric: value}}``.

    Only the train and valid splits are embedded and scored. ``out_dir`` holds the cache and results
    (default: ``<model_dir>.eval_valid`` beside the model, never inside it), so repeated sweeps reuse the cached features.
    """
    config, base_dir = _load_eval_config(eval_config)
    model_path = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_path.parent / f"{model_tag(str(model_dir))}.eval_valid"
    datasets = _load_datasets(config, base_dir)
    results = _embed_and_probe(str(model_dir), datasets, config, out, validation_only=True, progress=progress)
    return {
        res["dataset"]: {m: float(v["mean"]) for m, v in res["summary"]["selected"]["valid"].items()}
        for _, res in results
    }
