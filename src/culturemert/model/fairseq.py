"""fairseq MERT checkpoints (``.pt``) read and written without fairseq.

The file is read through :mod:`culturemert.safe_pickle` (tensors, plain containers and inert stand-ins for
``fairseq.data.dictionary.Dictionary``, omegaconf containers and ``argparse.Namespace``; any other global is refused
before it can run). ``cfg`` may be a plain dict (fairseq >= 0.12 saves ``OmegaConf.to_container``), a pickled
omegaconf ``DictConfig`` (older fairseq) or absent in favour of ``args`` (pre-Hydra); whole-value interpolations
such as ``${task.sample_rate}`` are resolved against the saved config. The pre-training heads are kept, nnAudio's
recomputable CQT kernels are skipped, and label embeddings are re-ordered so that row ``n_special + c`` always
embeds code ``c`` whatever order the fairseq dictionary listed the codes in. Key mapping: see docs/checkpoints.md.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import HubertConfig

from culturemert.label_grid import SAMPLE_RATE
from culturemert.errors import CheckpointError
from culturemert.safe_pickle import restricted_torch_load, to_plain
from culturemert.model.mert import HeadsConfig, MertPretrainModel, default_preprocessor_config
from culturemert.model.weights import canonical_key, check_finite, load_backbone_state, load_heads_state

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# fairseq <-> culturemert key mapping (table in docs/checkpoints.md)
# ----------------------------------------------------------------------------------------------------
_FAIRSEQ_LAYER_RULES = [
    (r"self_attn\.(k_proj|v_proj|q_proj|out_proj)\.", r"attention.\1."),
    (r"self_attn_layer_norm\.", "layer_norm."),
    (r"fc1\.", "feed_forward.intermediate_dense."),
    (r"fc2\.", "feed_forward.output_dense."),
    (r"final_layer_norm\.", "final_layer_norm."),
]


def _fairseq_backbone_key(key: str, feat_extract_norm: str) -> str | None:
    """fairseq MERT name -> HubertModel name (None: not part of the backbone).

    fairseq's ``ConvFeatureExtractionModel`` block i is ``Sequential(conv, Dropout, norm, GELU)``: the conv is
    ``conv_layers.i.0``; in ``extractor_mode: default`` only block 0 has a norm, ``Fp32GroupNorm`` at
    ``conv_layers.0.2``; in ``extractor_mode: layer_norm`` every block's norm is
    ``Sequential(TransposeLast, Fp32LayerNorm, TransposeLast)``, so its LayerNorm is ``conv_layers.i.2.1``.
    transformers' HubertModel calls both ``conv_layers.i.layer_norm``.
    """
    if key == "mask_emb":
        return "masked_spec_embed"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m.group(1)}.conv.{m.group(2)}"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", key)
    if m and feat_extract_norm == "group":
        return f"feature_extractor.conv_layers.0.layer_norm.{m.group(1)}"
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", key)
    if m and feat_extract_norm == "layer":
        return f"feature_extractor.conv_layers.{m.group(1)}.layer_norm.{m.group(2)}"
    if key.startswith("feature_extractor."):
        return None
    if key.startswith("layer_norm."):
        return "feature_projection." + key
    if key.startswith("post_extract_proj."):
        return "feature_projection.projection." + key[len("post_extract_proj."):]
    if key.startswith("encoder.pos_conv.0."):
        return canonical_key("encoder.pos_conv_embed.conv." + key[len("encoder.pos_conv.0."):])
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
    """Inverse mapping: our model's weights under fairseq MERT names (either extractor mode).

    Raises:
        CheckpointError: a backbone tensor has no fairseq name.
    """
    mode = model.config.feat_extract_norm
    inverse: dict[str, str] = {}
    probe_keys = [
        "mask_emb", "layer_norm.weight", "layer_norm.bias", "post_extract_proj.weight", "post_extract_proj.bias",
        "encoder.pos_conv.0.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
        "encoder.layer_norm.weight", "encoder.layer_norm.bias",
        "feature_extractor.conv_layers.0.2.weight", "feature_extractor.conv_layers.0.2.bias",
    ]
    for i in range(len(model.config.conv_dim)):
        probe_keys += [f"feature_extractor.conv_layers.{i}.0.weight", f"feature_extractor.conv_layers.{i}.0.bias",
                       f"feature_extractor.conv_layers.{i}.2.1.weight", f"feature_extractor.conv_layers.{i}.2.1.bias"]
    for i in range(model.num_layers):
        for sub in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                    "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            for kind in ("weight", "bias"):
                probe_keys.append(f"encoder.layers.{i}.{sub}.{kind}")
    for fk in probe_keys:
        ck = _fairseq_backbone_key(fk, mode)
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
    extractor = str(cfg.get("extractor_mode", "default"))
    if extractor not in ("default", "layer_norm"):
        raise CheckpointError(f"fairseq extractor_mode {extractor!r} is not one of 'default', 'layer_norm'")
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


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _resolve_interpolations(cfg: Any, root: Any, depth: int = 0) -> Any:
    """Replace values that are exactly ``${a.b}`` by the value at that path of ``root`` (how omegaconf configs
    saved unresolved point one key at another); anything else, including unresolvable references, stays."""
    if isinstance(cfg, Mapping):
        return {k: _resolve_interpolations(v, root, depth) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_resolve_interpolations(v, root, depth) for v in cfg]
    if isinstance(cfg, str) and depth < 10:
        m = _INTERPOLATION.fullmatch(cfg.strip())
        if m:
            node: Any = root
            for part in m.group(1).split("."):
                if not isinstance(node, Mapping) or part not in node:
                    return cfg
                node = node[part]
            return _resolve_interpolations(node, root, depth + 1)
    return cfg


def _fairseq_preprocessing(task_cfg: Mapping[str, Any], path: Path) -> tuple[int, dict[str, Any], list[str]]:
    """Sample rate and preprocessor config from the fairseq task config (``sample_rate``, ``normalize``)."""
    notes = ["preprocessor_config.json derived from the fairseq task config (task.sample_rate, task.normalize)"]
    rate = task_cfg.get("sample_rate")
    if rate is None:
        rate = SAMPLE_RATE
        notes.append(f"the fairseq checkpoint declares no task.sample_rate; {rate} Hz (MERT-v1) assumed")
        log.warning("%s: no task.sample_rate in the checkpoint config; assuming %d Hz", path, rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or int(rate) != rate or rate <= 0:
        raise CheckpointError(f"{path}: task.sample_rate is {rate!r}, not a positive whole number of Hz")
    pre = default_preprocessor_config(int(rate))
    pre["do_normalize"] = bool(task_cfg.get("normalize", False))
    return int(rate), pre, notes


def load_fairseq_checkpoint(path: str | Path) -> MertPretrainModel:
    """Load ``MERT-v1-*_fairseq.pt`` (or any fairseq MERT checkpoint) with its pre-training heads.

    ``model.sample_rate`` is ``task.sample_rate`` of the saved config.

    Raises:
        CheckpointError: refused pickle globals, no model config, unsupported options, non-finite or
            mismatched tensors (named).
    """
    path = Path(path)
    ckpt = restricted_torch_load(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    cfg = to_plain(ckpt.get("cfg") or {})
    cfg = _resolve_interpolations(cfg, cfg)
    model_cfg = cfg.get("model") if isinstance(cfg, Mapping) else None
    task_cfg = cfg.get("task") if isinstance(cfg, Mapping) else None
    if not model_cfg and ckpt.get("args") is not None:
        model_cfg = to_plain(ckpt["args"])  # pre-Hydra fairseq: an argparse.Namespace (task options included)
        task_cfg = model_cfg
    if not isinstance(model_cfg, Mapping):
        raise CheckpointError(f"{path}: fairseq checkpoint has no model config (cfg['model'])")
    backbone_cfg = _hubert_config_from_fairseq(model_cfg)
    sample_rate, preprocessor, notes = _fairseq_preprocessing(task_cfg if isinstance(task_cfg, Mapping) else {}, path)
    state = ckpt["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'model' entry is not a state dict")
    check_finite({k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not _FAIRSEQ_SKIP.match(k)}, path)
    backbone_sd, heads_sd, unused = fairseq_to_culturemert_keys(state, backbone_cfg.feat_extract_norm)
    skipped = sorted(k for k in state if _FAIRSEQ_SKIP.match(k))
    if unused:
        log.warning("fairseq keys not used by culturemert: %s", ", ".join(sorted(unused)[:20]))

    heads_cfg = None
    if heads_sd:
        task_state = to_plain(ckpt.get("task_state") or {})
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
    model = MertPretrainModel(
        backbone_cfg, heads_cfg, sample_rate=sample_rate, preprocessor_config=preprocessor, preprocessor_notes=notes
    )
    load_backbone_state(model, backbone_sd, source=str(path))
    if heads_cfg is not None:
        load_heads_state(model, heads_sd, path, optional=("cqt_proj",))
    model.load_report = {
        "format": "fairseq",
        "unused_keys": sorted(unused),
        "skipped_recomputable": skipped,
        "missing_keys": [] if heads_cfg is None else [k for k in ("cqt_proj.weight", "cqt_proj.bias") if k not in heads_sd],
        "has_heads": heads_cfg is not None,
        "num_updates": _num_updates(ckpt),
        "sample_rate": sample_rate,
    }
    model.eval()
    return model


def _num_updates(ckpt: Mapping[str, Any]) -> int | None:
    history = ckpt.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        value = history[-1].get("num_updates")
        return int(value) if isinstance(value, int) else None
    return None
