"""Weight names and fingerprints shared by every checkpoint reader and writer.

Weight-norm parameter names (classic ``weight_g``/``weight_v`` and parametrized ``original0``/``original1``) are
canonicalised, a ``hubert.``/``model.`` prefix is stripped, and a backbone state dict is loaded strictly (every
missing or unexpected key is an error naming the key). A fingerprint is the sha256 over (canonical name, dtype,
shape, bytes) of every tensor, so the same weights give the same fingerprint whichever format they came from.

Every reader refuses what it cannot read unambiguously: a tensor holding NaN or inf (:func:`check_finite`, the
file and the tensor named), a directory whose weight files contradict each other (``model.safetensors`` next to a
``pytorch_model.bin`` with other values, shards their index does not list), and a sample rate that the config and
the preprocessor config disagree on (:func:`read_preprocessing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import HubertConfig

from culturemert.label_grid import SAMPLE_RATE
from culturemert.errors import CheckpointError
from culturemert.model.mert import HUBERT_SAMPLE_RATE, MertPretrainModel, default_preprocessor_config

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
    """sha256 over (canonical name, dtype, shape, raw bytes) of every tensor, in sorted name order.

    Tensors are fetched one at a time, so a lazy mapping (``LazySafetensors``) is fingerprinted in one tensor's memory.
    """
    h = hashlib.sha256()
    canon = {canonical_key(k): k for k in state}
    for name in sorted(canon):
        t = state[canon[name]].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim buffers
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


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or inf (e.g. the aftermath of an fp16 overflow in fine-tuning): such a model runs
    and gives normal-looking numbers downstream (a probe on partly-NaN features), so loading is where to stop it.

    Raises:
        CheckpointError: ``"<where>: tensor <name> holds <n> non-finite value(s) ..."`` for the first bad tensor.
    """
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(t).sum())
                n_bad = int((~finite).sum())
                raise CheckpointError(
                    f"{where}: tensor {name} holds {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} inf); "
                    "refusing corrupted weights"
                )


# (single file, shard name pattern, index file) per weight format, in transformers' order of preference
_WEIGHT_LAYOUTS = (
    ("model.safetensors", re.compile(r"model-(\d+)-of-(\d+)\.safetensors"), "model.safetensors.index.json"),
    ("pytorch_model.bin", re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin"), "pytorch_model.bin.index.json"),
)


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path}: refused by weights_only loading ({exc})") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable torch file ({exc})") from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
    check_finite(state, path)
    return dict(state)


def _read_layout(directory: Path, single: str, shard_re: re.Pattern[str], index_name: str) -> dict[str, torch.Tensor] | None:
    """One format's weights (None if the directory has none), refusing a layout whose files contradict each other."""
    single_path = directory / single
    index_path = directory / index_name
    shards = sorted(p.name for p in directory.iterdir() if shard_re.fullmatch(p.name))
    present = [n for n in (single, index_name) if (directory / n).is_file()] + shards
    if not present:
        return None
    if single_path.is_file():
        if shards or index_path.is_file():
            raise CheckpointError(
                f"{directory}: holds both {single} and sharded weights ({', '.join(present[1:4])}); "
                "remove the one that is stale"
            )
        return _load_weight_file(single_path)
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a readable shard index ({exc})") from None
        listed = sorted(set(map(str, weight_map.values())))
        unlisted = [s for s in shards if s not in listed]
        if unlisted:
            raise CheckpointError(f"{directory}: shard {unlisted[0]} is not listed in {index_name}")
        missing = [s for s in listed if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: {index_name} lists {missing[0]}, which is missing")
        out: dict[str, torch.Tensor] = {}
        for shard in listed:
            for name, tensor in _load_weight_file(directory / shard).items():
                if weight_map.get(name) != shard:
                    where = weight_map.get(name)
                    raise CheckpointError(
                        f"{directory / shard}: holds tensor {name}, which {index_name} "
                        + (f"places in {where}" if where else "does not list")
                    )
                out[name] = tensor
        absent = [name for name in weight_map if name not in out]
        if absent:
            raise CheckpointError(f"{directory}: tensor {absent[0]} listed in {index_name} is in no shard")
        return out
    # shards without an index: accept only a complete, consistently numbered set
    numbers = [tuple(int(x) for x in shard_re.fullmatch(s).groups()) for s in shards]  # type: ignore[union-attr]
    totals = {total for _, total in numbers}
    if len(totals) != 1 or sorted(i for i, _ in numbers) != list(range(1, next(iter(totals)) + 1)):
        raise CheckpointError(
            f"{directory}: shards {', '.join(shards[:4])} do not form one complete set and there is no {index_name}"
        )
    out = {}
    for shard in shards:
        for name, tensor in _load_weight_file(directory / shard).items():
            if name in out:
                raise CheckpointError(f"{directory}: tensor {name} appears in more than one shard")
            out[name] = tensor
    return out


def load_heads_state(
    model: MertPretrainModel, state: Mapping[str, torch.Tensor], source: str | Path, optional: tuple[str, ...] = ()
) -> list[str]:
    """Load pre-training head tensors strictly; returns the missing ones among ``optional`` (name prefixes).

    Raises:
        CheckpointError: an unexpected or missing tensor, or a shape the heads config does not imply (named).
    """
    assert model.heads is not None
    expected = model.heads.state_dict()
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected head tensors {unexpected}")
    if [m for m in missing if not m.startswith(optional)]:
        raise CheckpointError(f"{source}: missing head tensors {missing}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: head tensor {k} has shape {tuple(v.shape)}, the heads config implies {tuple(expected[k].shape)}"
            )
    model.heads.load_state_dict(state, strict=False)
    return missing


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of an HF-style directory: ``model.safetensors``, ``pytorch_model.bin`` (``weights_only``), or
    either format sharded (``model-00001-of-00002.safetensors`` + ``model.safetensors.index.json``).

    When both formats are present (Hub repos often carry both) they must hold the same tensors: transformers
    would load the safetensors file without a word, so a stale ``.bin`` (or a stale ``.safetensors``) must not
    decide silently which weights run.

    Raises:
        CheckpointError: no weights; contradicting files (named); a non-finite tensor (file and tensor named).
    """
    found = [(layout[0], state) for layout in _WEIGHT_LAYOUTS if (state := _read_layout(directory, *layout)) is not None]
    if not found:
        raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")
    (first_name, first), rest = found[0], found[1:]
    for other_name, other in rest:
        a = {canonical_key(k): v for k, v in first.items()}
        b = {canonical_key(k): v for k, v in other.items()}
        if a.keys() != b.keys():
            diff = sorted(a.keys() ^ b.keys())
            raise CheckpointError(
                f"{directory}: {first_name} and {other_name} hold different tensors (e.g. {diff[0]}); "
                "remove the one that is stale"
            )
        for k in sorted(a):
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
                raise CheckpointError(
                    f"{directory}: {first_name} and {other_name} disagree on tensor {k}; remove the one that is stale"
                )
    return first


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def read_preprocessing(
    directory: Path, config: Mapping[str, Any], export_meta: Mapping[str, Any] | None = None
) -> tuple[int, dict[str, Any], list[str]]:
    """The sample rate (Hz), preprocessor config and notes of an HF-style directory or export.

    Rates can be declared in ``config.json`` (``sample_rate``, MERT's key), ``preprocessor_config.json``
    (``sampling_rate``) and, for exports, ``culturemert.json`` (``sample_rate``). Every declaration must agree;
    a source that declares none is taken at its family's standard rate (24 kHz for MERT's model types, 16 kHz for a
    plain ``hubert`` config) and a note says so, as it does when culturemert
    writes a default preprocessor config for a source that had none.

    Raises:
        CheckpointError: two declarations disagree (both files and values named), or a rate is not a positive int.
    """
    pre_path = directory / "preprocessor_config.json"
    pre = _read_json(pre_path)
    declared: list[tuple[str, Any]] = []
    if config.get("sample_rate") is not None:
        declared.append(("config.json sample_rate", config["sample_rate"]))
    if pre is not None and pre.get("sampling_rate") is not None:
        declared.append(("preprocessor_config.json sampling_rate", pre["sampling_rate"]))
    if export_meta is not None and export_meta.get("sample_rate") is not None:
        declared.append(("culturemert.json sample_rate", export_meta["sample_rate"]))
    rates: list[tuple[str, int]] = []
    for where, value in declared:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
            raise CheckpointError(f"{directory}: {where} is {value!r}, not a positive whole number of Hz")
        rates.append((where, int(value)))
    if len({r for _, r in rates}) > 1:
        (wa, ra), (wb, rb) = next((a, b) for a in rates for b in rates if a[1] != b[1])
        raise CheckpointError(f"{directory}: {wa} is {ra} but {wb} is {rb}; the checkpoint does not say which rate it runs at")
    notes = list(export_meta.get("preprocessor_notes") or []) if export_meta is not None else []
    if rates:
        rate = rates[0][1]
    else:
        # a plain HuBERT (facebook/hubert-*) is a 16 kHz speech model; MERT's own model types are 24 kHz (MERT-v1)
        model_type = str(config.get("model_type", "mert_model"))
        rate = HUBERT_SAMPLE_RATE if model_type == "hubert" else SAMPLE_RATE
        family = "a plain HuBERT" if model_type == "hubert" else "MERT-v1"
        notes.append(f"the source declared no sample rate; {rate} Hz ({family}) assumed")
        log.warning("%s: no sample rate declared in config.json or preprocessor_config.json; assuming %d Hz", directory, rate)
    if pre is None:
        pre = default_preprocessor_config(rate)
        notes.append("the source had no preprocessor_config.json; culturemert's default written (do_normalize false)")
    elif pre.get("sampling_rate") is None:
        pre = {**pre, "sampling_rate": rate}
        notes.append(f"the source's preprocessor_config.json declared no sampling_rate; {rate} added")
    return rate, dict(pre), notes


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
