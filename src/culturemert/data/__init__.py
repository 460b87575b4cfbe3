"""Training data: manifests, ``prepare`` (24 kHz int16 shards + aligned teacher codes), and the crop loader.

| file | owns |
|---|---|
| ``manifest.py`` | reading manifests (CSV/TSV/JSONL rows: path, culture, split) |
| ``prepare.py`` | ``prepare``: decoding, sharding, teacher fitting and encoding, verification, the index |
| ``loader.py`` | ``PreparedDataset``, ``MixtureSpec``, the crop loader with culture mixture and replay |

On-disk layout of a prepared directory (see docs/data.md)::

    plan.json                 manifest rows, settings fingerprint, shard assignment (written first)
    shards/audio-00000.npy    int16 [n_samples]: the shard's items' 24 kHz mono audio, concatenated
    shards/items-00000.json   per-item offsets/lengths + per-file skips and warnings (commit marker of the audio)
    shards/codes-00000.npy    int16 [n_codebooks, n_frames]: teacher codes, items concatenated in the same order
    teacher/                  the fitted k-means teacher (kmeans only)
    index.json, index.csv     the item table the loader reads (written last, only after the checks pass)
    prepare.json              settings, teacher state, hours per culture, skipped files with reasons

Alignment convention: item i owns ``n_frames = ceil(length / 320)`` code frames, frame k <-> samples
[320k, 320k + 320) of the item. Crops start on the 320-sample grid, so a crop starting at sample 320j takes
frames j .. j + L/320 - 1 (the grid itself is defined in :mod:`culturemert.label_grid`).
"""

from culturemert.data.manifest import ManifestRow, read_manifest
from culturemert.data.prepare import PrepareSummary, prepare
from culturemert.data.loader import (
    DEFAULT_CROP_SAMPLES,
    PAD_CODE,
    CropPlan,
    MixtureLoader,
    MixtureSpec,
    PreparedDataset,
    mixture_weights,
    torch_loader,
)

__all__ = [
    "DEFAULT_CROP_SAMPLES",
    "PAD_CODE",
    "ManifestRow",
    "read_manifest",
    "prepare",
    "PrepareSummary",
    "PreparedDataset",
    "MixtureSpec",
    "mixture_weights",
    "MixtureLoader",
    "CropPlan",
    "torch_loader",
]
