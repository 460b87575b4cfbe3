"""The dataset registry: loaders by name, and :class:`DatasetConfig` (one entry of an evaluation config)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from culturemert.config import StrictModel
from culturemert.errors import ConfigError
from culturemert.evaluate.datasets.base import TaggingDataset
from culturemert.evaluate.datasets.dunya import load_dunya
from culturemert.evaluate.datasets.generic import load_generic_csv
from culturemert.evaluate.datasets.lyra import load_lyra
from culturemert.evaluate.datasets.marble import load_fma, load_magnatagatune

logger = logging.getLogger(__name__)


def _load_makam(**kw: Any) -> TaggingDataset:
    return load_dunya("makam", **kw)


def _load_hindustani(**kw: Any) -> TaggingDataset:
    return load_dunya("hindustani", **kw)


def _load_carnatic(**kw: Any) -> TaggingDataset:
    return load_dunya("carnatic", **kw)


DATASET_LOADERS: dict[str, Callable[..., TaggingDataset]] = {
    "lyra": load_lyra,
    "makam": _load_makam,
    "hindustani": _load_hindustani,
    "carnatic": _load_carnatic,
    "magnatagatune": load_magnatagatune,
    "fma": load_fma,
    "csv": load_generic_csv,
}

_SIGNATURE_OF = {"makam": load_dunya, "hindustani": load_dunya, "carnatic": load_dunya}


def _accepted_arguments(kind: str) -> list[str]:
    params = inspect.signature(_SIGNATURE_OF.get(kind, DATASET_LOADERS[kind])).parameters
    return [p for p in params if p != "tradition"]


def load_dataset(name: str, **arguments: Any) -> TaggingDataset:
    """Load a dataset by registry name (``lyra``, ``makam``, ``hindustani``, ``carnatic``,
    ``magnatagatune``, ``fma``, ``csv``) with the keyword arguments of its loader."""
    if name not in DATASET_LOADERS:
        raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(DATASET_LOADERS)})")
    accepted = _accepted_arguments(name)
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ConfigError(f"dataset {name!r}: unknown argument(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    return DATASET_LOADERS[name](**arguments)


class DatasetConfig(StrictModel):
    """One dataset of a probe/evaluate config.

    ``kind`` picks the loader, ``paths`` and ``options`` are its keyword arguments (paths are resolved
    against the config file's folder by :func:`load_dataset_from_config`), ``name`` labels the results.

    .. code-block:: yaml

        - kind: lyra
          paths: {raw_tsv: data/lyra/raw.tsv, split_dir: data/lyra/split, audio_root: audio/lyra}
          options: {seed: 10}
    """

    kind: Literal["lyra", "makam", "hindustani", "carnatic", "magnatagatune", "fma", "csv"]
    name: str | None = None
    paths: dict[str, str] = Field(default_factory=dict)
    top_n: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("paths")
    @classmethod
    def _paths_are_path_arguments(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in _PATH_ARGUMENTS:
                raise ValueError(f"{key!r} is not a path argument (known: {', '.join(sorted(_PATH_ARGUMENTS))})")
        return value


_PATH_ARGUMENTS = {
    "raw_tsv", "split_dir", "audio_root", "metadata", "annotations_csv", "genres_csv", "path", "vocabulary",
}


def load_dataset_from_config(config: DatasetConfig, base_dir: str | Path | None = None) -> TaggingDataset:
    """Load ``config``; relative paths are taken relative to ``base_dir`` (the config file's folder)."""
    base = Path(base_dir) if base_dir is not None else None
    arguments: dict[str, Any] = {}
    for key, value in config.paths.items():
        path = Path(value).expanduser()
        arguments[key] = base / path if base is not None and not path.is_absolute() else path
    overlap = set(arguments) & set(config.options)
    if overlap:
        raise ConfigError(f"dataset {config.kind!r}: {', '.join(sorted(overlap))} given in both paths and options")
    arguments.update(config.options)
    if config.top_n is not None:
        arguments["top_n"] = config.top_n
    dataset = load_dataset(config.kind, **arguments)
    if config.name:
        dataset.name = config.name
    return dataset
