"""Weight names and fingerprints shared by every checkpoint reader and writer.

Weight-norm parameter names (classic ``weight_g``/``weight_v`` and parametrized ``original0``/``original1``) are
canonicalised, a ``hubert.``/``model.`` prefix is stripped, and a backbone state dict is loaded strictly (every
missing or unexpected key is an error naming the key). A fingerprint is the sha256 over (canonical name, dtype,
shape, bytes) of every tensor, so the same weights give the same fingerprint whichever format they came from.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from transformers import HubertConfig

from culturemert.errors import CheckpointError
from culturemert.model.mert import MertPretrainModel

log = logging.getLogger(__name__)


WEIGHT_NORM_RENAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}

# MERT / Hubert config keys that HubertConfig does not know or that we must not inherit.
MERT_ONLY_CONFIG_KEYS = {
    "auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "feature_extractor_cqt",
    "feature_extractor_cqt_bins", "deepnorm", "attention_relax", "sample_rate", "torch_dtype", "dtype",
}


def canonical_key(key: str) -> str:
    for old, new in WEIGHT_NORM_RENAMES.items():
        if key.endswith("." + old):
            return key[: -len(old)] + new
    return key


def state_dict_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (canonical name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    canon = {canonical_key(k): v for k, v in state.items()}
    for name in sorted(canon):
        t = canon[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: MertPretrainModel | Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of the *backbone* weights (the heads do not change extracted features)."""
    state = model.backbone.state_dict() if isinstance(model, MertPretrainModel) else model
    return state_dict_fingerprint(state)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("mert_model.", "hubert.", "model.", "backbone."):
            if k.startswith(prefix) and not k.startswith("model.safetensors"):
                k = k[len(prefix):]
                break
        out[canonical_key(k)] = v
    return out


def load_backbone_state(model: MertPretrainModel, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load backbone tensors strictly; returns the (tolerated) missing keys, i.e. the mask embedding."""
    state = _strip_prefix(state)
    expected = model.backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    # masked_spec_embed is absent from checkpoints saved with mask probs of 0: keep our init then.
    tolerated = [k for k in missing if k == "masked_spec_embed"]
    missing = [k for k in missing if k != "masked_spec_embed"]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
    model.backbone.load_state_dict(state, strict=False)
    if tolerated:
        log.warning("%s: no mask embedding in checkpoint; a fresh one is initialised", source)
    return tolerated


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    st = directory / "model.safetensors"
    if st.is_file():
        return load_file(st)
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    if shards:
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(s))
        return out
    binf = directory / "pytorch_model.bin"
    if binf.is_file():
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{binf}: refused by weights_only loading ({exc})") from None
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")


def hubert_config_from_hf(config: Mapping[str, Any], source: str) -> HubertConfig:
    cfg = dict(config)
    model_type = cfg.get("model_type", "hubert")
    if model_type not in ("hubert", "mert_model", "music_hubert"):
        raise CheckpointError(f"{source}: config.json model_type {model_type!r} is not a MERT/HuBERT model")
    if cfg.get("feature_extractor_cqt"):
        raise CheckpointError(f"{source}: MERT with feature_extractor_cqt=True is not supported")
    if cfg.get("deepnorm"):
        raise CheckpointError(f"{source}: MERT with deepnorm=True is not supported")
    if float(cfg.get("attention_relax", -1.0) or -1.0) > 0:
        log.info("%s: attention_relax only guards fp16 overflow (softmax is shift-invariant); ignored", source)
    for key in MERT_ONLY_CONFIG_KEYS:
        cfg.pop(key, None)
    return HubertConfig(**cfg)
