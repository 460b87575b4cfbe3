"""The MERT model and every way in and out of it.

| file | owns |
|---|---|
| ``mert.py`` | presets, ``MertPretrainModel`` = transformers ``HubertModel`` backbone + MERT's pre-training heads |
| ``weights.py`` | weight-norm name canonicalisation, strict backbone loading, HF config translation, fingerprints |
| ``hf.py`` | HF MERT directories and Hub ids |
| ``fairseq.py`` | fairseq MERT ``.pt`` checkpoints (read and write, without fairseq) |
| ``export.py`` | culturemert export directories (write, read eagerly or lazily, model card) |
| ``load.py`` | ``load_model``: one entry point for all of the above |
"""

from culturemert.model.mert import (
    HUBERT_SAMPLE_RATE,
    PRESETS,
    HeadsConfig,
    MertOutput,
    MertPretrainModel,
    PretrainingHeads,
    build_model,
    check_sample_rate,
    default_preprocessor_config,
    num_frames_for,
    preset_config,
)
from culturemert.model.weights import check_finite, model_fingerprint, state_dict_fingerprint
from culturemert.model.export import (
    LazyExport,
    LazySafetensors,
    can_open_lazily,
    export_bytes_summary,
    is_export_dir,
    read_export_metadata,
    save_export,
)
from culturemert.model.fairseq import culturemert_to_fairseq_state_dict, fairseq_to_culturemert_keys, load_fairseq_checkpoint
from culturemert.model.load import load_model

__all__ = [
    "HUBERT_SAMPLE_RATE",
    "PRESETS",
    "HeadsConfig",
    "MertOutput",
    "MertPretrainModel",
    "PretrainingHeads",
    "build_model",
    "check_sample_rate",
    "default_preprocessor_config",
    "num_frames_for",
    "preset_config",
    "check_finite",
    "model_fingerprint",
    "state_dict_fingerprint",
    "LazyExport",
    "LazySafetensors",
    "can_open_lazily",
    "export_bytes_summary",
    "is_export_dir",
    "read_export_metadata",
    "save_export",
    "culturemert_to_fairseq_state_dict",
    "fairseq_to_culturemert_keys",
    "load_fairseq_checkpoint",
    "load_model",
]
