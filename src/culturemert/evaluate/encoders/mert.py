"""MERT-family checkpoints (culturemert exports, HF MERT/HuBERT directories, Hub ids, fairseq ``.pt``, presets).

The model is loaded by :func:`culturemert.model.load_model` (no remote code). Its input rate is the one the
checkpoint declares: ``sample_rate`` in ``config.json`` (MERT's remote-code config), ``sampling_rate`` in
``preprocessor_config.json``, ``sample_rate`` in ``culturemert.json``, or ``task.sample_rate`` of a fairseq
checkpoint. MERT-v0 declares 16 kHz (50 Hz frames), MERT-v1 24 kHz (75 Hz). Declarations that disagree are an
error; a checkpoint that declares nothing runs at its family's standard rate (24 kHz for ``mert_model``, 16 kHz
for a plain ``hubert`` directory), which is logged.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from culturemert.label_grid import SAMPLE_RATE
from culturemert.errors import CheckpointError
from culturemert.evaluate.encoders.base import Encoder, conv_num_frames, conv_receptive_field

log = logging.getLogger(__name__)

__all__ = ["MertEncoder", "declared_sample_rate", "MERT_SAMPLE_RATE", "MERT_MODEL_TYPES"]

#: MERT-v1's rate, and that of every culturemert export
MERT_SAMPLE_RATE = SAMPLE_RATE
#: config.json model types that the native MERT loader reads
MERT_MODEL_TYPES = ("mert_model", "music_hubert", "hubert")
_STANDARD_RATE = {"mert_model": SAMPLE_RATE, "music_hubert": SAMPLE_RATE, "hubert": 16_000}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    return data if isinstance(data, dict) else {}


def _hub_dir(source: str) -> Path | None:
    """The locally cached (or downloaded) config files of a Hub repo, None when they cannot be had."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["config.json", "preprocessor_config.json", "culturemert.json"]))
    except Exception:  # noqa: BLE001 - offline and not cached: load_model reports the failure in its own words
        return None


def _fairseq_sample_rate(path: Path) -> int | None:
    # memory-mapped so the tensors are not read just to find one number
    from culturemert.safe_pickle import restricted_torch_load, to_plain

    try:
        ckpt = restricted_torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - load_model gives the real error for an unreadable file
        return None
    cfg = to_plain(ckpt.get("cfg") or {}) if isinstance(ckpt, dict) else {}
    task = cfg.get("task") if isinstance(cfg, dict) else None
    rate = task.get("sample_rate") if isinstance(task, dict) else None
    return int(rate) if isinstance(rate, (int, float)) and rate > 0 else None


def declared_sample_rate(source: str | Path) -> int:
    """The input rate a MERT-family checkpoint declares (see the module docstring).

    Raises:
        CheckpointError: two files of the checkpoint declare different rates.
    """
    src = str(source)
    path = Path(src).expanduser()
    if path.is_file():
        rate = _fairseq_sample_rate(path)
        if rate is None:
            log.info("%s: no task.sample_rate in the checkpoint; using MERT's %d Hz", src, MERT_SAMPLE_RATE)
        return rate or MERT_SAMPLE_RATE
    directory = path if path.is_dir() else (_hub_dir(src.partition("::")[0]) if "::" not in src else None)
    if directory is None:
        return MERT_SAMPLE_RATE
    declared: dict[str, int] = {}
    model_type = "mert_model"
    config_file = directory / "config.json"
    if config_file.is_file():
        config = _read_json(config_file)
        model_type = str(config.get("model_type", model_type))
        if config.get("sample_rate"):
            declared["config.json sample_rate"] = int(config["sample_rate"])
    pre = directory / "preprocessor_config.json"
    if pre.is_file() and _read_json(pre).get("sampling_rate"):
        declared["preprocessor_config.json sampling_rate"] = int(_read_json(pre)["sampling_rate"])
    meta = directory / "culturemert.json"
    if meta.is_file() and _read_json(meta).get("sample_rate"):
        declared["culturemert.json sample_rate"] = int(_read_json(meta)["sample_rate"])
    rates = set(declared.values())
    if len(rates) > 1:
        listing = ", ".join(f"{k} = {v}" for k, v in declared.items())
        raise CheckpointError(f"{src}: the checkpoint declares different sample rates ({listing})")
    if rates:
        return rates.pop()
    standard = _STANDARD_RATE.get(model_type, MERT_SAMPLE_RATE)
    log.info("%s: declares no sample rate; using the %s standard of %d Hz", src, model_type, standard)
    return standard


class MertEncoder(Encoder):
    """Every hidden state of a MERT model (``num_layers + 1``; index 0 = the projected conv features).

    ``model`` is a :class:`culturemert.model.MertPretrainModel` or a wrapper exposing ``backbone``,
    ``num_layers``, ``hidden_size`` and ``forward(wav, output_hidden_states=True)``. Frames: the conv stack's
    ``floor((L - k) / s) + 1`` per layer, i.e. ``sample_rate / 320`` per second (75 Hz at 24 kHz, 50 Hz at 16 kHz).
    The fingerprint is the backbone's weight fingerprint, as before the encoder interface existed, so caches
    written then stay valid (the rate is part of the cache key through the embed settings).
    """

    family = "mert"

    def __init__(
        self,
        model: Any,
        name: str,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        fingerprint: str | None = None,
        *,
        sample_rate: int = MERT_SAMPLE_RATE,
        source: str | None = None,
    ):
        if fingerprint is None:
            from culturemert.model import model_fingerprint
            from culturemert.model import MertPretrainModel

            # wrappers exposing ``.backbone`` are fingerprinted by their backbone weights, as models are
            fingerprint = model_fingerprint(model if isinstance(model, MertPretrainModel) else model.backbone.state_dict())
        config = model.backbone.config
        self._kernels, self._strides = list(config.conv_kernel), list(config.conv_stride)
        self._declare(
            name=name,
            source=source or name,
            sample_rate=sample_rate,
            frame_rate=sample_rate / math.prod(self._strides),
            num_hidden_states=int(model.num_layers) + 1,
            dim=int(model.hidden_size),
            fingerprint=fingerprint,
            device=device,
            precision=precision,
            min_samples=conv_receptive_field(self._kernels, self._strides),
        )
        self.model = model.eval().float().to(self.device)

    def num_frames(self, num_samples: int) -> int:
        return conv_num_frames(num_samples, self._kernels, self._strides)

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(wav, output_hidden_states=True).hidden_states)


def load_mert(source: str, *, name: str, device: str | torch.device, precision: str) -> MertEncoder:
    """A MERT-family checkpoint as an encoder, run at the sample rate it declares."""
    from culturemert.model import load_model

    rate = declared_sample_rate(source)
    model = load_model(source, with_heads=False)
    return MertEncoder(model, name, device, precision, sample_rate=rate, source=source)
