"""Evaluation: tagging-dataset loaders (and, alongside, embedding extraction and MARBLE-protocol probes)."""

from culturemert.evaluate.datasets import (
    DEFAULT_TOP_N,
    SPLITS,
    DatasetConfig,
    Item,
    TaggingDataset,
    load_dataset,
    load_dataset_from_config,
    load_dunya,
    load_fma,
    load_generic_csv,
    load_lyra,
    load_magnatagatune,
    top_n_vocabulary,
)

__all__ = [
    "DEFAULT_TOP_N",
    "SPLITS",
    "DatasetConfig",
    "Item",
    "TaggingDataset",
    "load_dataset",
    "load_dataset_from_config",
    "load_dunya",
    "load_fma",
    "load_generic_csv",
    "load_lyra",
    "load_magnatagatune",
    "top_n_vocabulary",
]
