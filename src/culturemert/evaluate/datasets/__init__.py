"""Tagging datasets for evaluation, read in the form their authors publish them.

Every loader returns a :class:`TaggingDataset`: a list of :class:`Item` (id, audio path, split, tags) plus a
vocabulary, the ordered list of tags the probe predicts. Vocabularies follow the rule of the ISMIR 2023
"From West to East" code (github pxaris/ccml), which CultureMERT's evaluation reuses:

* count, for every tag, the number of items that carry it on the vocabulary splits (``train``; for Lyra
  the whole official training split, see :func:`load_lyra`);
* keep the ``top_n`` most frequent, ordered by count (descending), ties broken by the tag string in
  ascending code-point order (ccml sorts the tags with ``np.sort`` before a stable sort by count, so
  ``"Lyra" < "Oud"`` and ``"V" < "o"``). This reproduces ccml's published vocabularies exactly, including
  their order (tested against ``ccml/evaluation/*/*.txt``).

Tags are type-prefixed as in ccml (``makam--Hicaz``, ``usul--Aksak``, ``instrument--Ney``, ``raga--``,
``tala--``, ``form--``; Lyra ``instruments--``, ``genres--``, ``place--``); FMA genres and MagnaTagATune tags
carry no prefix, again as in ccml. Pickled metadata (ccml's ``metadata.npy``, MagnaTagATune's ``.cP`` split
lists) is read with a restricted unpickler that admits only builtin containers and numpy array
reconstruction; anything else is refused before it can run.
"""

from culturemert.evaluate.datasets.base import (
    AUDIO_EXTENSIONS,
    DEFAULT_TOP_N,
    SPLITS,
    Item,
    TaggingDataset,
    top_n_vocabulary,
)
from culturemert.evaluate.datasets.readers import read_legacy_pickle, read_pickled_npy
from culturemert.evaluate.datasets.lyra import load_lyra
from culturemert.evaluate.datasets.dunya import dunya_recording_tags, fetch_dunya_metadata, load_dunya
from culturemert.evaluate.datasets.marble import load_fma, load_magnatagatune
from culturemert.evaluate.datasets.generic import load_generic_csv
from culturemert.evaluate.datasets.registry import DATASET_LOADERS, DatasetConfig, load_dataset, load_dataset_from_config

__all__ = [
    "SPLITS",
    "DEFAULT_TOP_N",
    "AUDIO_EXTENSIONS",
    "Item",
    "TaggingDataset",
    "DatasetConfig",
    "top_n_vocabulary",
    "dunya_recording_tags",
    "load_lyra",
    "load_dunya",
    "load_magnatagatune",
    "load_fma",
    "load_generic_csv",
    "load_dataset",
    "load_dataset_from_config",
    "fetch_dunya_metadata",
    "read_pickled_npy",
    "read_legacy_pickle",
    "DATASET_LOADERS",
]
