"""culturemert export directories: a plain transformers ``HubertModel`` checkpoint plus the pre-training heads and
provenance (``culturemert.json``, sha256 of every file), readable eagerly or lazily (one tensor per access).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import HubertConfig

from culturemert.errors import CheckpointError
from culturemert.files import apply_default_modes, fsync_dir as _fsync_dir, make_temp_dir, name_os_error, sha256_file
from culturemert.model.mert import HeadsConfig, MertPretrainModel
from culturemert.model.weights import (
    check_finite,
    hubert_config_from_hf,
    load_backbone_state,
    load_heads_state,
    read_preprocessing,
    read_weights,
    state_dict_fingerprint,
)

log = logging.getLogger(__name__)


EXPORT_META = "culturemert.json"
BACKBONE_FILE = "model.safetensors"
HEADS_FILE = "pretraining_heads.safetensors"
EXPORT_FORMAT = "culturemert-export"
EXPORT_VERSION = 1


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / EXPORT_META).is_file()


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The ``culturemert.json`` of an export directory ({} for plain HF directories)."""
    meta_path = Path(path) / EXPORT_META
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object")
    return meta


# Unlisted files with these endings could be taken for the model's weights or configuration by some reader
# (transformers, culturemert, a person): an export that holds one is ambiguous and is refused.
_LOADABLE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".msgpack", ".h5", ".onnx", ".npz")


@dataclass
class _ExportHeader:
    meta: dict[str, Any]
    backbone_config: HubertConfig
    heads_config: HeadsConfig | None
    sample_rate: int
    preprocessor: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def model_kwargs(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "preprocessor_config": self.preprocessor, "preprocessor_notes": self.notes}


def _open_export(directory: Path, with_heads: bool, verify: bool) -> _ExportHeader:
    """An export's metadata, backbone and heads configs and preprocessing, with the directory audited against its
    record: every listed file present (and its sha256 checked when ``verify``), no unlisted weight/config file, the
    heads file present exactly when the record has heads, sample rates that agree.

    Raises:
        CheckpointError: the first disagreement, naming the file.
    """
    meta = read_export_metadata(directory)
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{directory}: {EXPORT_META} is not a culturemert export")
    files = meta.get("files")
    if not isinstance(files, dict) or BACKBONE_FILE not in files or "config.json" not in files:
        raise CheckpointError(f"{directory}: {EXPORT_META} lists no {BACKBONE_FILE} and config.json under 'files'")
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: file {name} listed in {EXPORT_META} is missing")
    for p in sorted(directory.iterdir()):
        unlisted = p.name not in files and p.name != EXPORT_META and not p.name.startswith(".")
        if unlisted and p.is_file() and p.name.endswith(_LOADABLE_SUFFIXES):
            raise CheckpointError(
                f"{directory}: {p.name} is not listed in {EXPORT_META}; it is not part of this export (remove it)"
            )
    if bool(meta.get("heads")) != (HEADS_FILE in files):
        raise CheckpointError(
            f"{directory}: {EXPORT_META} "
            + (f"records heads but lists no {HEADS_FILE}" if meta.get("heads") else f"records no heads but lists {HEADS_FILE}")
        )
    if verify:
        for name, digest in files.items():
            if sha256_file(directory / name) != digest:
                raise CheckpointError(f"{directory}: checksum mismatch for {name} (corrupted or modified)")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: cannot read config ({exc})") from None
    sample_rate, preprocessor, notes = read_preprocessing(directory, config, meta)
    backbone_cfg = hubert_config_from_hf(config, str(directory))
    heads_cfg = HeadsConfig(**meta["heads"]) if (with_heads and meta.get("heads")) else None
    return _ExportHeader(meta, backbone_cfg, heads_cfg, sample_rate, preprocessor, notes)


def _check_recorded_fingerprint(directory: Path, meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    recorded = meta.get("fingerprint")
    if recorded and state_dict_fingerprint(state) != recorded:
        raise CheckpointError(
            f"{directory}: {BACKBONE_FILE} does not have the fingerprint {EXPORT_META} records "
            "(weights replaced or record edited)"
        )


def load_export(directory: Path, with_heads: bool, verify: bool) -> MertPretrainModel:
    header = _open_export(directory, with_heads, verify)
    model = MertPretrainModel(header.backbone_config, header.heads_config, **header.model_kwargs())
    weights = read_weights(directory)
    _check_recorded_fingerprint(directory, header.meta, weights)
    load_backbone_state(model, weights, str(directory))
    if header.heads_config is not None:
        heads_path = directory / HEADS_FILE
        try:
            heads_sd = load_file(heads_path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{heads_path}: not a readable safetensors file ({exc})") from None
        check_finite(heads_sd, heads_path)
        load_heads_state(model, heads_sd, heads_path)
    model.load_report = {"format": "culturemert-export", "unused_keys": [], "missing_keys": [],
                         "has_heads": header.heads_config is not None, "sample_rate": header.sample_rate}
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
        self._header = _open_export(self.directory, with_heads, verify)
        self.meta, self.backbone_config, self.heads_config = self._header.meta, self._header.backbone_config, self._header.heads_config
        self.sample_rate = self._header.sample_rate
        self.fingerprint: str | None = self.meta.get("fingerprint")
        if verify:
            # the sha256 check proves the files are the ones recorded, not that the recorded fingerprint describes
            # them; one streamed pass (one tensor in memory at a time) does
            _check_recorded_fingerprint(self.directory, self.meta, LazySafetensors(self.directory / BACKBONE_FILE))
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
            model = MertPretrainModel(
                self.backbone_config, self.heads_config if with_heads else None, **self._header.model_kwargs()
            )
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
        f"Inputs: mono waveform at {meta.get('sample_rate', '?')} Hz; {meta.get('frame_rate', '?'):g} frames/s; "
        f"`output_hidden_states=True` gives {meta.get('num_hidden_states', '?')} hidden states.",
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

    Layout: ``config.json`` + ``model.safetensors`` (plain HubertModel: ``AutoModel`` loads it; ``sample_rate``
    recorded as MERT's own configs do), ``preprocessor_config.json`` (the model's ``preprocessor_config``: the
    source's values unchanged, or culturemert's defaults for a source without one, listed in
    ``preprocessor_notes``), ``pretraining_heads.safetensors`` (if the model has heads), ``culturemert.json``
    (heads config, sample rate, fingerprints, provenance card, sha256 of every file) and a ``README.md`` card.
    Files and directory get the umask's default permissions.

    Raises:
        CheckpointError: ``out_dir`` exists and ``overwrite`` is false, or ``model.sample_rate`` contradicts its
            ``preprocessor_config``; OSError (named) on write failures.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    sample_rate = int(getattr(model, "sample_rate"))
    preprocessor = dict(getattr(model, "preprocessor_config"))
    if preprocessor.get("sampling_rate") not in (None, sample_rate):
        raise CheckpointError(
            f"{out}: the model runs at {sample_rate} Hz but its preprocessor_config says sampling_rate "
            f"{preprocessor['sampling_rate']}; set both before exporting (an export must not contradict itself)"
        )
    frame_rate = sample_rate / math.prod(int(s) for s in model.config.conv_stride)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.")
    try:
        backbone_sd = {k: v.detach().to("cpu") for k, v in model.backbone.state_dict().items()}
        if dtype is not None:
            backbone_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in backbone_sd.items()}
        backbone_sd = {k: v.contiguous() for k, v in backbone_sd.items()}
        save_file(backbone_sd, str(tmp / BACKBONE_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["architectures"] = ["HubertModel"]
        config["model_type"] = "hubert"
        config["sample_rate"] = sample_rate
        if dtype is not None:
            config["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
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
                f"{frame_rate:g} Hz at {sample_rate / 1000:g} kHz), {sum(p.numel() for p in model.backbone.parameters()):,} backbone parameters"
            ),
            "sample_rate": sample_rate,
            "frame_rate": frame_rate,
            "preprocessor_notes": list(getattr(model, "preprocessor_notes", [])),
            "card": dict(card or {}),
        }
        (tmp / "README.md").write_text(_model_card(meta), encoding="utf-8")
        meta["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        apply_default_modes(tmp)  # mkdtemp made it 0700 and save_file writes 0600 files
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
