"""Reading HF MERT directories (``config.json`` + ``model.safetensors``/``pytorch_model.bin``) and Hub ids."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path


from culturemert.errors import CheckpointError
from culturemert.model.mert import MertPretrainModel
from culturemert.model.export import EXPORT_META
from culturemert.model.weights import hubert_config_from_hf, load_backbone_state, read_preprocessing, read_weights

log = logging.getLogger(__name__)


def load_hf_dir(directory: Path) -> MertPretrainModel:
    """An HF MERT/HuBERT directory: ``config.json`` + weights (see :func:`~culturemert.model.weights.read_weights`)
    and, if present, ``preprocessor_config.json`` (its sample rate becomes ``model.sample_rate``).

    Raises:
        CheckpointError: unreadable config, contradicting files or rates, non-finite or mismatched weights.
    """
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read config ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    sample_rate, preprocessor, notes = read_preprocessing(directory, config)
    model = MertPretrainModel(
        hubert_config_from_hf(config, str(directory)), None,
        sample_rate=sample_rate, preprocessor_config=preprocessor, preprocessor_notes=notes,
    )
    missing = load_backbone_state(model, read_weights(directory), str(directory))
    model.load_report = {"format": f"hf:{config.get('model_type', 'hubert')}", "unused_keys": [],
                         "missing_keys": missing, "has_heads": False, "sample_rate": sample_rate}
    model.eval()
    return model


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(::[\w./-]+)?$")


def download_from_hub(source: str) -> Path:
    repo_id, _, filename = source.partition("::")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as exc:  # pragma: no cover - dependency of transformers
        raise CheckpointError(f"huggingface_hub is required to fetch {source!r}") from exc
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["config.json", "*.safetensors", "pytorch_model*.bin", "*.index.json", "preprocessor_config.json",
                                EXPORT_META, "README.md"],
            )
        )
    except Exception as exc:  # offline mode, missing repo, network errors: all surface the same way
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 and it is not in the local cache)" if offline else ""
        raise CheckpointError(
            f"cannot fetch {source!r} from the Hugging Face Hub{hint}: {type(exc).__name__}: {exc}. "
            "Download it on a connected machine (huggingface-cli download) and pass the local directory."
        ) from None
