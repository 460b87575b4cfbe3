"""Reading and writing MERT checkpoints without fairseq and without remote code.

Sources understood by :func:`load_model`:

* a culturemert **export** directory (``culturemert.json`` + ``model.safetensors`` [+ heads]);
* an **HF MERT directory** (``config.json`` with ``model_type: mert_model`` or ``hubert``; weights in
  ``model.safetensors`` (preferred) or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``;
  classic ``weight_g``/``weight_v`` and parametrized ``original0``/``original1`` weight-norm names both accepted);
* a **Hub id** such as ``m-a-p/MERT-v1-95M`` (only the needed files; from the local cache when offline);
  ``org/name::file.pt`` picks a file inside a Hub repo, e.g. ``m-a-p/MERT-v1-95M::MERT-v1-95M_fairseq.pt``;
* a **fairseq MERT checkpoint** (``.pt``) read with a *restricted unpickler*: only tensors, plain containers and
  inert stand-ins for ``fairseq.data.dictionary.Dictionary``, omegaconf containers and ``argparse.Namespace``
  are admitted; any other global in the pickle is refused before it can run. The pre-training heads are kept,
  nnAudio's recomputable CQT kernels are skipped, and label embeddings are re-ordered so that row
  ``n_special + c`` always embeds code ``c`` whatever order the fairseq dictionary listed the codes in.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file
from transformers import HubertConfig

from culturemert.errors import CheckpointError
from culturemert.files import atomic_write_bytes, atomic_write_text, fsync_dir as _fsync_dir, name_os_error, sha256_file
from culturemert.model import HeadsConfig, MertPretrainModel

log = logging.getLogger(__name__)

__all__ = [
    "load_model",
    "save_export",
    "model_fingerprint",
    "state_dict_fingerprint",
    "read_export_metadata",
    "is_export_dir",
    "LazySafetensors",
    "LazyExport",
    "can_open_lazily",
    "load_fairseq_checkpoint",
    "fairseq_to_culturemert_keys",
    "culturemert_to_fairseq_state_dict",
    "restricted_torch_load",
    "atomic_write_bytes",
    "atomic_write_text",
    "sha256_file",
]

EXPORT_META = "culturemert.json"
BACKBONE_FILE = "model.safetensors"
HEADS_FILE = "pretraining_heads.safetensors"
EXPORT_FORMAT = "culturemert-export"
EXPORT_VERSION = 1

WEIGHT_NORM_RENAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}

# MERT / Hubert config keys that HubertConfig does not know or that we must not inherit.
_MERT_ONLY_CONFIG_KEYS = {
    "auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "feature_extractor_cqt",
    "feature_extractor_cqt_bins", "deepnorm", "attention_relax", "sample_rate", "torch_dtype", "dtype",
}


# ----------------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------------
def _canonical_key(key: str) -> str:
    for old, new in WEIGHT_NORM_RENAMES.items():
        if key.endswith("." + old):
            return key[: -len(old)] + new
    return key


def state_dict_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (canonical name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    canon = {_canonical_key(k): v for k, v in state.items()}
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


# ----------------------------------------------------------------------------------------------------
# restricted unpickling (fairseq checkpoints, pytorch_model.bin fallbacks)
# ----------------------------------------------------------------------------------------------------
class _Inert:
    """Stand-in for a class we refuse to import: records constructor args and pickled state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_state"] = state
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str):
                    self.__dict__[k] = v

    def __setitem__(self, key: Any, value: Any) -> None:  # dict-like containers pickled via SETITEMS
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:  # list-like containers pickled via APPENDS
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__.setdefault("_list", []).extend(values)


def _make_inert(module: str, name: str) -> type:
    return type(name, (_Inert,), {"__module__": module, "_qualified": f"{module}.{name}"})


# Globals that are safe to resolve to the real object (they only rebuild data).
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("collections", "defaultdict"): __import__("collections").defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
for _dt in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool"):
    _SAFE_GLOBALS[("torch", f"{_dt}Storage")] = getattr(torch, f"{_dt}Storage")
for _name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _SAFE_GLOBALS[("torch", _name)] = getattr(torch, _name)

# Classes replaced by inert stand-ins (module prefix match): their data is kept, their code never runs.
_INERT_PREFIXES = (
    "fairseq.",
    "omegaconf.",
    "argparse.Namespace",
    "enum.",
    "typing.",
    "numpy.",
)


def _resolve_numpy(module: str, name: str) -> Any | None:
    """numpy scalars/arrays appear in fairseq's extra_state (metrics); rebuild them with numpy's own reducers."""
    import numpy as np

    allowed = {
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
    }
    if (module, name) not in allowed:
        return None
    if name == "dtype":
        return np.dtype
    if name == "ndarray":
        return np.ndarray
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    return getattr(mod, name)


class _RestrictedUnpickler(pickle.Unpickler):
    refused: list[str]

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if module.startswith("numpy"):
            obj = _resolve_numpy(module, name)
            if obj is not None:
                return obj
        full = f"{module}.{name}"
        if any(full.startswith(p) for p in _INERT_PREFIXES):
            return _make_inert(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {full!r}: it is not a tensor or plain container, and unpickling it could "
            "run arbitrary code. culturemert only admits tensors, plain containers and inert stand-ins for "
            "fairseq/omegaconf metadata."
        )


class _RestrictedPickleModule:
    """Passed to ``torch.load(pickle_module=...)`` so torch's zip/storage handling uses our find_class."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()

    __name__ = "culturemert_restricted_pickle"


def restricted_torch_load(path: str | Path) -> Any:
    """``torch.load`` that can never execute code from the file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False, mmap=False
        )
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None


def _to_plain(obj: Any, depth: int = 0) -> Any:
    """Turn inert omegaconf/argparse stand-ins and containers into plain Python values."""
    if depth > 60:
        return None
    if isinstance(obj, _Inert):
        d = obj.__dict__
        if "_content" in d:  # omegaconf DictConfig / ListConfig / ValueNode
            return _to_plain(d["_content"], depth + 1)
        if "_val" in d:
            return _to_plain(d["_val"], depth + 1)
        if "_items" in d:
            return {k: _to_plain(v, depth + 1) for k, v in d["_items"].items()}
        if "_list" in d:
            return [_to_plain(v, depth + 1) for v in d["_list"]]
        return {k: _to_plain(v, depth + 1) for k, v in d.items() if not k.startswith("_")}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, depth + 1) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------
# fairseq <-> culturemert key mapping (mert-marble.md §B.4 / §B.5)
# ----------------------------------------------------------------------------------------------------
_FAIRSEQ_LAYER_RULES = [
    (r"self_attn\.(k_proj|v_proj|q_proj|out_proj)\.", r"attention.\1."),
    (r"self_attn_layer_norm\.", "layer_norm."),
    (r"fc1\.", "feed_forward.intermediate_dense."),
    (r"fc2\.", "feed_forward.output_dense."),
    (r"final_layer_norm\.", "final_layer_norm."),
]


def _fairseq_backbone_key(key: str, feat_extract_norm: str) -> str | None:
    """fairseq MERT name -> HubertModel name (None: not part of the backbone)."""
    if key == "mask_emb":
        return "masked_spec_embed"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(\d+)\.(weight|bias)", key)
    if m:
        block, sub, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        if sub == 0:
            return f"feature_extractor.conv_layers.{block}.conv.{kind}"
        if feat_extract_norm == "group" and block == 0 and sub == 2:
            return f"feature_extractor.conv_layers.0.layer_norm.{kind}"
        if feat_extract_norm == "layer" and sub == 1:
            # fairseq layer_norm mode: Sequential(conv, Sequential(TransposeLast, Fp32LayerNorm, TransposeLast), GELU)
            return None
        return None
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.1\.1\.(weight|bias)", key)
    if m and feat_extract_norm == "layer":
        return f"feature_extractor.conv_layers.{m.group(1)}.layer_norm.{m.group(2)}"
    if key.startswith("layer_norm."):
        return "feature_projection." + key
    if key.startswith("post_extract_proj."):
        return "feature_projection.projection." + key[len("post_extract_proj."):]
    if key.startswith("encoder.pos_conv.0."):
        return _canonical_key("encoder.pos_conv_embed.conv." + key[len("encoder.pos_conv.0."):])
    if key.startswith("encoder.layer_norm."):
        return key
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        rest = m.group(2)
        for pat, rep in _FAIRSEQ_LAYER_RULES:
            if re.match(pat, rest):
                return f"encoder.layers.{m.group(1)}." + re.sub(pat, rep, rest, count=1)
    return None


_FAIRSEQ_HEAD_KEYS = {
    "final_proj.weight": "final_proj.weight",
    "final_proj.bias": "final_proj.bias",
    "label_embs_concat": "label_embs_concat",
    "encoder_cqt_model.fc.weight": "cqt_proj.weight",
    "encoder_cqt_model.fc.bias": "cqt_proj.bias",
}
# Recomputable nnAudio buffers (44 M floats) that we never load.
_FAIRSEQ_SKIP = re.compile(r"^encoder_cqt_model\.spec_layer\.")


def fairseq_to_culturemert_keys(
    fairseq_state: Mapping[str, torch.Tensor], feat_extract_norm: str = "group"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split a fairseq MERT state dict into (backbone, heads, unused keys)."""
    backbone: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in fairseq_state.items():
        if _FAIRSEQ_SKIP.match(key):
            continue
        if key in _FAIRSEQ_HEAD_KEYS:
            heads[_FAIRSEQ_HEAD_KEYS[key]] = value
            continue
        new = _fairseq_backbone_key(key, feat_extract_norm)
        if new is None:
            unused.append(key)
        else:
            backbone[new] = value
    return backbone, heads, unused


def culturemert_to_fairseq_state_dict(model: MertPretrainModel) -> dict[str, torch.Tensor]:
    """Inverse mapping (group-norm extractor): our model's weights under fairseq MERT names."""
    inverse: dict[str, str] = {}
    probe_keys = [
        "mask_emb", "layer_norm.weight", "layer_norm.bias", "post_extract_proj.weight", "post_extract_proj.bias",
        "encoder.pos_conv.0.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
        "encoder.layer_norm.weight", "encoder.layer_norm.bias",
        "feature_extractor.conv_layers.0.2.weight", "feature_extractor.conv_layers.0.2.bias",
    ]
    for i in range(len(model.config.conv_dim)):
        probe_keys += [f"feature_extractor.conv_layers.{i}.0.weight", f"feature_extractor.conv_layers.{i}.0.bias"]
    for i in range(model.num_layers):
        for sub in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                    "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            for kind in ("weight", "bias"):
                probe_keys.append(f"encoder.layers.{i}.{sub}.{kind}")
    for fk in probe_keys:
        ck = _fairseq_backbone_key(fk, "group")
        if ck is not None:
            inverse[ck] = fk
    out: dict[str, torch.Tensor] = {}
    for k, v in model.backbone.state_dict().items():
        if k not in inverse:
            raise CheckpointError(f"no fairseq name for backbone tensor {k!r}")
        out[inverse[k]] = v.clone()
    if model.heads is not None:
        rev = {v: k for k, v in _FAIRSEQ_HEAD_KEYS.items()}
        for k, v in model.heads.state_dict().items():
            out[rev[k]] = v.clone()
    return out


def _parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` string ('[(512,10,5)] + [(512,3,2)] * 4 ...') safely."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            vals = [ev(e) for e in node.elts]
            return vals if isinstance(node, ast.List) else tuple(vals)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return ev(node.left) + ev(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return ev(node.left) * ev(node.right)
        raise CheckpointError(f"unsupported conv_feature_layers expression: {spec!r}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
    except SyntaxError as exc:
        raise CheckpointError(f"cannot parse conv_feature_layers {spec!r}: {exc}") from None
    return [tuple(int(x) for x in layer) for layer in layers]  # type: ignore[misc]


def _hubert_config_from_fairseq(cfg: Mapping[str, Any]) -> HubertConfig:
    conv = _parse_conv_layers(str(cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")))
    extractor = cfg.get("extractor_mode", "default")
    if cfg.get("deepnorm"):
        raise CheckpointError("fairseq checkpoint uses deepnorm=True, which transformers' HubertModel cannot express")
    if cfg.get("feature_extractor_cqt"):
        raise CheckpointError("fairseq checkpoint uses a CQT feature extractor branch, which is not supported")
    dropout = float(cfg.get("dropout", 0.1))
    return HubertConfig(
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(cfg.get("conv_bias", False)),
        feat_extract_norm="layer" if extractor == "layer_norm" else "group",
        feat_extract_activation="gelu",
        num_conv_pos_embeddings=int(cfg.get("conv_pos", 128)),
        num_conv_pos_embedding_groups=int(cfg.get("conv_pos_groups", 16)),
        hidden_size=int(cfg.get("encoder_embed_dim", 768)),
        num_hidden_layers=int(cfg.get("encoder_layers", 12)),
        num_attention_heads=int(cfg.get("encoder_attention_heads", 12)),
        intermediate_size=int(cfg.get("encoder_ffn_embed_dim", 3072)),
        hidden_act=str(cfg.get("activation_fn", "gelu")),
        do_stable_layer_norm=bool(cfg.get("layer_norm_first", False)),
        feat_proj_layer_norm=True,
        feat_proj_dropout=float(cfg.get("dropout_input", 0.1)),
        hidden_dropout=dropout,
        attention_dropout=float(cfg.get("attention_dropout", 0.1)),
        activation_dropout=float(cfg.get("activation_dropout", 0.0)),
        layerdrop=float(cfg.get("encoder_layerdrop", 0.05)),
        layer_norm_eps=1e-5,
        mask_time_prob=0.05,
        mask_time_length=10,
    )


def _dictionary_symbols(d: Any) -> list[str]:
    symbols = getattr(d, "symbols", None)
    if symbols is None and isinstance(d, Mapping):
        symbols = d.get("symbols")
    if not isinstance(symbols, list):
        raise CheckpointError("fairseq task_state dictionary has no 'symbols' list")
    return [str(s) for s in symbols]


def load_fairseq_checkpoint(path: str | Path) -> MertPretrainModel:
    """Load ``MERT-v1-*_fairseq.pt`` (or any fairseq MERT checkpoint) with its pre-training heads."""
    path = Path(path)
    ckpt = restricted_torch_load(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    cfg = _to_plain(ckpt.get("cfg") or {})
    model_cfg = cfg.get("model") if isinstance(cfg, Mapping) else None
    if not model_cfg and ckpt.get("args") is not None:
        model_cfg = _to_plain(ckpt["args"])  # pre-Hydra fairseq: an argparse.Namespace
    if not isinstance(model_cfg, Mapping):
        raise CheckpointError(f"{path}: fairseq checkpoint has no model config (cfg['model'])")
    backbone_cfg = _hubert_config_from_fairseq(model_cfg)
    state = ckpt["model"]
    backbone_sd, heads_sd, unused = fairseq_to_culturemert_keys(state, backbone_cfg.feat_extract_norm)
    skipped = sorted(k for k in state if _FAIRSEQ_SKIP.match(k))
    if unused:
        log.warning("fairseq keys not used by culturemert: %s", ", ".join(sorted(unused)[:20]))

    heads_cfg = None
    if heads_sd:
        task_state = _to_plain(ckpt.get("task_state") or {})
        dicts = ckpt.get("task_state", {}).get("dictionaries") if isinstance(ckpt.get("task_state"), Mapping) else None
        if dicts is None and isinstance(task_state, Mapping):
            dicts = task_state.get("dictionaries")
        final_dim = int(model_cfg.get("final_dim", 64) or backbone_cfg.hidden_size)
        embs = heads_sd["label_embs_concat"]
        if dicts:
            symbol_lists = [_dictionary_symbols(d) for d in dicts]
        else:
            raise CheckpointError(f"{path}: heads present but task_state['dictionaries'] missing")
        n_cb = len(symbol_lists)
        sizes = {len(s) for s in symbol_lists}
        if len(sizes) != 1:
            raise CheckpointError(f"{path}: codebook dictionaries differ in size: {sorted(sizes)}")
        n_total = sizes.pop()
        n_special = 4
        codebook_size = n_total - n_special
        if embs.shape[0] != n_cb * n_total:
            raise CheckpointError(
                f"{path}: label_embs_concat has {embs.shape[0]} rows, dictionaries imply {n_cb} x {n_total}"
            )
        # Re-order each codebook's rows so that row n_special + c embeds code c (fairseq: dict order).
        reordered = []
        for i, symbols in enumerate(symbol_lists):
            index = {s: j for j, s in enumerate(symbols)}
            try:
                rows = list(range(n_special)) + [index[str(c)] for c in range(codebook_size)]
            except KeyError as exc:
                raise CheckpointError(
                    f"{path}: dictionary {i} lacks code {exc.args[0]!r}; expected symbols '0'..'{codebook_size - 1}'"
                ) from None
            block = embs[i * n_total : (i + 1) * n_total]
            reordered.append(block[rows])
        heads_sd["label_embs_concat"] = torch.cat(reordered, 0)
        cqt_bins = int(heads_sd["cqt_proj.weight"].shape[0]) if "cqt_proj.weight" in heads_sd else int(
            model_cfg.get("audio_cqt_bins", 336)
        )
        heads_cfg = HeadsConfig(
            n_codebooks=n_cb, codebook_size=codebook_size, n_special=n_special, final_dim=final_dim, cqt_bins=cqt_bins
        )
        if "cqt_proj.weight" not in heads_sd:
            log.warning("%s: no CQT head in checkpoint; it will be freshly initialised", path)
    model = MertPretrainModel(backbone_cfg, heads_cfg)
    _load_backbone_state(model, backbone_sd, source=str(path))
    if heads_cfg is not None:
        missing, unexpected = model.heads.load_state_dict(heads_sd, strict=False)
        if unexpected:
            raise CheckpointError(f"{path}: unexpected head tensors {unexpected}")
        if [m for m in missing if not m.startswith("cqt_proj")]:
            raise CheckpointError(f"{path}: missing head tensors {missing}")
    model.load_report = {
        "format": "fairseq",
        "unused_keys": sorted(unused),
        "skipped_recomputable": skipped,
        "missing_keys": [] if heads_cfg is None else [k for k in ("cqt_proj.weight", "cqt_proj.bias") if k not in heads_sd],
        "has_heads": heads_cfg is not None,
        "num_updates": _num_updates(ckpt),
    }
    model.eval()
    return model


def _num_updates(ckpt: Mapping[str, Any]) -> int | None:
    history = ckpt.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        value = history[-1].get("num_updates")
        return int(value) if isinstance(value, int) else None
    return None


# ----------------------------------------------------------------------------------------------------
# HF directories, Hub ids, exports
# ----------------------------------------------------------------------------------------------------
def _hubert_config_from_hf(config: Mapping[str, Any], source: str) -> HubertConfig:
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
    for key in _MERT_ONLY_CONFIG_KEYS:
        cfg.pop(key, None)
    return HubertConfig(**cfg)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("mert_model.", "hubert.", "model.", "backbone."):
            if k.startswith(prefix) and not k.startswith("model.safetensors"):
                k = k[len(prefix):]
                break
        out[_canonical_key(k)] = v
    return out


def _load_backbone_state(model: MertPretrainModel, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
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


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
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


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / EXPORT_META).is_file()


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The ``culturemert.json`` of an export directory ({} for plain HF directories)."""
    meta_path = Path(path) / EXPORT_META
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: invalid JSON ({exc})") from None


def _open_export(
    directory: Path, with_heads: bool, verify: bool
) -> tuple[dict[str, Any], HubertConfig, HeadsConfig | None]:
    """An export's metadata (files sha256-checked when ``verify``), backbone config and heads config."""
    meta = read_export_metadata(directory)
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{directory}: {EXPORT_META} is not a culturemert export")
    if verify:
        for name, digest in meta.get("files", {}).items():
            f = directory / name
            if not f.is_file():
                raise CheckpointError(f"{directory}: file {name} listed in {EXPORT_META} is missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{directory}: checksum mismatch for {name} (corrupted or modified)")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    backbone_cfg = _hubert_config_from_hf(config, str(directory))
    heads_cfg = HeadsConfig(**meta["heads"]) if (with_heads and meta.get("heads")) else None
    return meta, backbone_cfg, heads_cfg


def _load_export(directory: Path, with_heads: bool, verify: bool) -> MertPretrainModel:
    _, backbone_cfg, heads_cfg = _open_export(directory, with_heads, verify)
    model = MertPretrainModel(backbone_cfg, heads_cfg)
    _load_backbone_state(model, _read_weights(directory), str(directory))
    if heads_cfg is not None:
        heads_sd = load_file(directory / HEADS_FILE)
        model.heads.load_state_dict(heads_sd, strict=True)
    model.load_report = {"format": "culturemert-export", "unused_keys": [], "missing_keys": [],
                         "has_heads": heads_cfg is not None}
    model.eval()
    return model


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazySafetensors(Mapping[str, torch.Tensor]):
    """A safetensors file as a ``name -> tensor`` mapping that reads one tensor per access.

    Plain positioned reads straight into the tensor's memory, no mmap: what is resident is what the caller holds,
    which is what lets a merge of n models peak near one model. ``prefix`` is prepended to every name.
    """

    def __init__(self, path: str | Path, prefix: str = ""):
        self.path = Path(path)
        try:
            with self.path.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if not 2 <= header_len <= 100_000_000:
                    raise ValueError(f"implausible header length {header_len}")
                header = json.loads(fh.read(header_len))
            file_size = self.path.stat().st_size
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        data_len = file_size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        # Every entry is checked here, before anything is allocated or read: a hostile or damaged header must not
        # make __getitem__ allocate a huge tensor or read outside the data section.
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                start, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: malformed header entry for {name!r} ({exc!r})") from None
            if any(d < 0 for d in shape) or not 0 <= start <= end:
                raise CheckpointError(f"{self.path}: tensor {name} has an invalid shape or offsets")
            if end > data_len:
                raise CheckpointError(f"{self.path}: tensor {name} lies beyond the end of the file (truncated?)")
            if math.prod(shape) * dtype.itemsize != end - start:
                raise CheckpointError(f"{self.path}: tensor {name} spans {end - start} bytes, which its shape does not")
            self._entries[prefix + name] = (dtype, shape, start, end)

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with self.path.open("rb") as fh:
            fh.seek(self._data_start + start)
            if fh.readinto(target) != end - start:
                raise CheckpointError(f"{self.path}: truncated while reading {name}")
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def dtypes(self) -> set[torch.dtype]:
        return {entry[0] for entry in self._entries.values()}


class _ChainedMapping(Mapping[str, torch.Tensor]):
    """Several mappings as one, iterated in ``order`` (names missing from ``order`` follow in their own order)."""

    def __init__(self, *parts: Mapping[str, torch.Tensor], order: Iterable[str] = ()):
        owner = {name: part for part in parts for name in part}
        self._owner = {name: owner[name] for name in order if name in owner}
        self._owner.update((name, part) for name, part in owner.items() if name not in self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._owner[name][name]

    def __iter__(self):
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


class LazyExport:
    """A culturemert export opened without loading its weights (for merges that read one tensor at a time).

    ``state`` has the names of ``MertPretrainModel.state_dict()`` (``backbone.*``, ``heads.*``); ``fingerprint``
    is the backbone fingerprint recorded at export time, trustworthy once ``verify`` has checked every file's
    sha256 against the export's record.
    """

    def __init__(self, directory: str | Path, *, with_heads: bool = True, verify: bool = True):
        self.directory = Path(str(directory)).expanduser()
        self.meta, self.backbone_config, self.heads_config = _open_export(self.directory, with_heads, verify)
        self.fingerprint: str | None = self.meta.get("fingerprint")
        self.parts = [LazySafetensors(self.directory / BACKBONE_FILE, "backbone.")]
        if self.heads_config is not None:
            self.parts.append(LazySafetensors(self.directory / HEADS_FILE, "heads."))
        # module order, as a loaded model's state_dict(): merges accumulate norms name by name, and the same order
        # keeps their float sums (and so the merge record) bit-identical to a merge of loaded models
        order = self.empty_model(self.heads_config is not None).state_dict().keys()
        self.state: Mapping[str, torch.Tensor] = _ChainedMapping(*self.parts, order=order)

    @property
    def has_heads(self) -> bool:
        return self.heads_config is not None

    def empty_model(self, with_heads: bool) -> MertPretrainModel:
        """The export's architecture with weights on the meta device (no memory), to be filled with
        ``load_state_dict(..., assign=True)``."""
        with torch.device("meta"):
            model = MertPretrainModel(self.backbone_config, self.heads_config if with_heads else None)
        return model


def can_open_lazily(source: str | Path) -> bool:
    """True when :class:`LazyExport` gives exactly what :func:`load_model` would: an export directory with a
    single-file float32 backbone whose metadata records its fingerprint and the checksum of that file (a
    float16/bfloat16 export loads into a float32 model, whose fingerprint differs from the recorded one)."""
    path = Path(str(source)).expanduser()
    if not (path.is_dir() and is_export_dir(path) and (path / BACKBONE_FILE).is_file()):
        return False
    meta = read_export_metadata(path)
    if not meta.get("fingerprint") or BACKBONE_FILE not in meta.get("files", {}):
        return False
    files = [path / BACKBONE_FILE] + ([path / HEADS_FILE] if meta.get("heads") else [])
    try:
        return all(LazySafetensors(f).dtypes() <= {torch.float32} for f in files)
    except CheckpointError:
        return False  # let the eager loader report the damage in its own words


def _load_hf_dir(directory: Path) -> MertPretrainModel:
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read config ({exc})") from None
    model = MertPretrainModel(_hubert_config_from_hf(config, str(directory)), None)
    missing = _load_backbone_state(model, _read_weights(directory), str(directory))
    model.load_report = {"format": f"hf:{config.get('model_type', 'hubert')}", "unused_keys": [],
                         "missing_keys": missing, "has_heads": False}
    model.eval()
    return model


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(::[\w./-]+)?$")


def _download_from_hub(source: str) -> Path:
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
                allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin", "preprocessor_config.json",
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


def load_model(source: str | Path, *, with_heads: bool = True, verify: bool = True) -> MertPretrainModel:
    """Load a MERT model from any supported source (see module docstring); returned in eval mode, on CPU."""
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        if is_export_dir(path):
            return _load_export(path, with_heads, verify)
        if (path / "config.json").is_file():
            return _load_hf_dir(path)
        raise CheckpointError(f"{path}: directory has neither {EXPORT_META} nor config.json")
    if path.is_file():
        if path.suffix in (".pt", ".ckpt", ".pth"):
            model = load_fairseq_checkpoint(path)
            if not with_heads:
                model.heads = None
            return model
        raise CheckpointError(f"{path}: unsupported checkpoint file (expected a directory or a fairseq .pt)")
    if _HUB_ID.match(src) and not src.startswith((".", "/")):
        return load_model(_download_from_hub(src), with_heads=with_heads, verify=verify)
    raise CheckpointError(f"checkpoint not found: {src}")


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def _model_card(meta: Mapping[str, Any]) -> str:
    card = meta.get("card", {}) or {}
    lines = [
        "---",
        "library_name: transformers",
        f"license: {card.get('license', 'other')}",
        "tags: [audio, music, mert, culturemert]",
        *([f"base_model: {card['base_model']}"] if card.get("base_model") else []),
        "---",
        "",
        f"# {card.get('name', 'culturemert export')}",
        "",
        "A MERT-architecture music model exported by culturemert. It is a plain `HubertModel` checkpoint:",
        "",
        "```python",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained(PATH)  # no trust_remote_code needed",
        "```",
        "",
        "Inputs: mono waveform at 24 kHz; 75 frames/s; `output_hidden_states=True` gives "
        f"{meta.get('num_hidden_states', '?')} hidden states.",
        "",
        f"- backbone fingerprint: `{meta.get('fingerprint')}`",
    ]
    if meta.get("base_fingerprint"):
        lines.append(f"- base fingerprint: `{meta['base_fingerprint']}`")
    lines += [
        "",
        "## Architecture",
        "",
        f"- {meta.get('architecture', 'MERT (HuBERT-style)')}",
    ]
    if card.get("data"):
        lines += ["", "## Training data", "", *(f"- {k}: {v}" for k, v in dict(card["data"]).items())]
    if card.get("evaluation"):
        lines += ["", "## Evaluation", "", str(card["evaluation"])]
    if card:
        lines += ["", "## Provenance", "", "```json", json.dumps(card, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def save_export(
    model: MertPretrainModel,
    out_dir: str | Path,
    *,
    card: Mapping[str, Any] | None = None,
    base_fingerprint: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an export directory atomically (a temp dir renamed into place).

    Layout: ``config.json`` + ``model.safetensors`` (plain HubertModel: ``AutoModel`` loads it),
    ``preprocessor_config.json`` (24 kHz, no normalisation, as MERT was pre-trained),
    ``pretraining_heads.safetensors`` (if the model has heads), ``culturemert.json`` (heads config,
    fingerprints, provenance card, sha256 of every file) and a ``README.md`` model card.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        backbone_sd = {k: v.detach().to("cpu") for k, v in model.backbone.state_dict().items()}
        if dtype is not None:
            backbone_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in backbone_sd.items()}
        backbone_sd = {k: v.contiguous() for k, v in backbone_sd.items()}
        save_file(backbone_sd, str(tmp / BACKBONE_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["architectures"] = ["HubertModel"]
        config["model_type"] = "hubert"
        if dtype is not None:
            config["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                    "feature_size": 1,
                    "padding_side": "right",
                    "padding_value": 0.0,
                    "return_attention_mask": True,
                    "do_normalize": False,
                    "sampling_rate": 24000,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        if model.heads is not None:
            heads_sd = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
            if dtype is not None:
                heads_sd = {k: v.to(dtype) for k, v in heads_sd.items()}
            save_file(heads_sd, str(tmp / HEADS_FILE), metadata={"format": "pt"})
        meta: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "fingerprint": state_dict_fingerprint(backbone_sd),
            "base_fingerprint": base_fingerprint,
            "heads": model.heads.config.model_dump() if model.heads is not None else None,
            "num_hidden_states": model.num_layers + 1,
            "architecture": (
                f"{model.num_layers} transformer layers x {model.hidden_size} ({'pre' if model.config.do_stable_layer_norm else 'post'}-LN), "
                f"{len(model.config.conv_dim)}-layer conv front end (stride {int(torch.tensor(model.config.conv_stride).prod())}, "
                f"75 Hz at 24 kHz), {sum(p.numel() for p in model.backbone.parameters()):,} backbone parameters"
            ),
            "sample_rate": 24000,
            "card": dict(card or {}),
        }
        (tmp / "README.md").write_text(_model_card(meta), encoding="utf-8")
        meta["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        name_os_error(exc, out)
        raise
    return out


def export_bytes_summary(directory: str | Path) -> dict[str, int]:
    """Sizes of the files in an export (for logs and the 25 MB budget check of shipped models)."""
    return {p.name: p.stat().st_size for p in Path(directory).iterdir() if p.is_file()}
