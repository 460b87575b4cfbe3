"""``load_model``: one entry point for every checkpoint source (export, HF directory, Hub id, fairseq ``.pt``)."""

from __future__ import annotations

import logging
from pathlib import Path


from culturemert.errors import CheckpointError
from culturemert.model.mert import MertPretrainModel
from culturemert.model.export import EXPORT_META, is_export_dir, load_export
from culturemert.model.fairseq import load_fairseq_checkpoint
from culturemert.model.hf import HUB_ID, download_from_hub, load_hf_dir

log = logging.getLogger(__name__)


def load_model(source: str | Path, *, with_heads: bool = True, verify: bool = True) -> MertPretrainModel:
    """Load a MERT model from any supported source (see module docstring); returned in eval mode, on CPU."""
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        if is_export_dir(path):
            return load_export(path, with_heads, verify)
        if (path / "config.json").is_file():
            return load_hf_dir(path)
        raise CheckpointError(f"{path}: directory has neither {EXPORT_META} nor config.json")
    if path.is_file():
        if path.suffix in (".pt", ".ckpt", ".pth"):
            model = load_fairseq_checkpoint(path)
            if not with_heads:
                model.heads = None
            return model
        raise CheckpointError(f"{path}: unsupported checkpoint file (expected a directory or a fairseq .pt)")
    if HUB_ID.match(src) and not src.startswith((".", "/")):
        return load_model(download_from_hub(src), with_heads=with_heads, verify=verify)
    raise CheckpointError(f"checkpoint not found: {src}")
