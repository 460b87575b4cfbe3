"""EnCodec 24 kHz RVQ codes as MERT-v1's teacher (transformers ``EncodecModel``, 8 codebooks at 6 kbps)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from culturemert.label_grid import HOP_LENGTH, SAMPLE_RATE, label_frames
from culturemert.errors import CheckpointError, ConfigError
from culturemert.runtime import resolve_device
from culturemert.model.weights import state_dict_fingerprint
from culturemert.teachers.base import BatchedTeacher, as_batch

logger = logging.getLogger(__name__)


DEFAULT_ENCODEC = "facebook/encodec_24khz"


class EncodecTeacher(BatchedTeacher):
    """EnCodec 24 kHz residual-VQ codes, as MERT-v1 uses: 6 kbps -> 8 codebooks x 1024 entries at 75 Hz.

    ``model`` is a Hub id (default ``facebook/encodec_24khz``; offline it must already be in the Hugging Face
    cache), a local directory saved with ``save_pretrained``, or an ``EncodecModel`` instance. Each clip is
    encoded in one pass (no chunking), like MERT's ``prepare_codecs_from_manifest.py``. ``batch_size``
    (clips per forward pass) defaults to 1 on CPU, where batching was measured to be slower, and 16 on CUDA.
    """

    name = "encodec"
    # reflect padding at the start of each layer reads up to ~7 frames ahead at 75 Hz; with at least 16 frames
    # a clip's early codes cannot see batch padding
    min_batched_samples = 16 * HOP_LENGTH

    def __init__(
        self,
        model: str | os.PathLike | Any = DEFAULT_ENCODEC,
        bandwidth: float = 6.0,
        device: str | torch.device | None = "cpu",
        batch_size: int | None = None,
    ) -> None:
        self.model, self.source = _load_encodec(model)
        config = self.model.config
        hop = int(np.prod(config.upsampling_ratios))
        problems = []
        if config.sampling_rate != SAMPLE_RATE:
            problems.append(f"sampling_rate {config.sampling_rate} (need {SAMPLE_RATE})")
        if hop != HOP_LENGTH:
            problems.append(f"hop {hop} (need {HOP_LENGTH})")
        if config.audio_channels != 1:
            problems.append(f"audio_channels {config.audio_channels} (need 1)")
        if config.chunk_length_s is not None:
            problems.append(f"chunk_length_s {config.chunk_length_s} (need None: whole-clip encoding)")
        if problems:
            raise ConfigError(f"EnCodec model {self.source} does not fit the 75 Hz label grid: " + ", ".join(problems))
        if float(bandwidth) not in [float(b) for b in config.target_bandwidths]:
            raise ConfigError(
                f"teacher bandwidth {bandwidth} is not supported by {self.source}; choose one of "
                f"{list(config.target_bandwidths)}"
            )
        if config.codebook_size > np.iinfo(np.int16).max + 1:
            raise ConfigError(f"codebook_size {config.codebook_size} does not fit int16 codes")
        self.bandwidth = float(bandwidth)
        self.n_codebooks = min(
            self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth), config.num_quantizers
        )
        self.codebook_size = int(config.codebook_size)
        self.device = resolve_device(device)
        # measured (bench/teacher_tokenize.py): on CPU, batches make the 24 kHz convolutions cache-bound and
        # slower than one clip at a time; on a GPU batching is what keeps it busy
        if batch_size is None:
            batch_size = 16 if self.device.type == "cuda" else 1
        self.batch_size = int(batch_size)
        self.model.eval().to(self.device)
        self._fingerprint: str | None = None

    def encode(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[B, L]`` float32 audio at 24 kHz -> int16 codes ``[B, n_codebooks, ceil(L / 320)]``."""
        x = as_batch(wav)
        expected = label_frames(x.shape[1])
        if expected == 0:
            return np.zeros((x.shape[0], self.n_codebooks, 0), dtype=np.int16)
        outputs = []
        with torch.inference_mode():
            for chunk in x.split(self.batch_size):
                encoded = self.model.encode(chunk[:, None, :].to(self.device), bandwidth=self.bandwidth)
                codes = encoded.audio_codes if hasattr(encoded, "audio_codes") else encoded[0]
                codes = codes[0]  # one chunk: the whole clip
                if codes.shape[1:] != (self.n_codebooks, expected):
                    raise RuntimeError(
                        f"EnCodec returned codes of shape {tuple(codes.shape)}, expected "
                        f"[{chunk.shape[0]}, {self.n_codebooks}, {expected}]"
                    )
                outputs.append(codes.to(torch.int16).cpu())
        return torch.cat(outputs).numpy()

    def _weights_sha256(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_dict_fingerprint(self.model.state_dict())
        return self._fingerprint

    def fingerprint(self) -> str:
        """sha256 of what decides the codes: the weights' digest, the bandwidth and the codebook sizes (not where
        the weights were loaded from, so the same EnCodec in two cache directories gives the same fingerprint)."""
        described = f"encodec:{self._weights_sha256()}:bandwidth={self.bandwidth:g}:{self.n_codebooks}x{self.codebook_size}"
        return hashlib.sha256(described.encode()).hexdigest()

    def state(self) -> dict[str, Any]:
        self._weights_sha256()
        return {
            "name": self.name,
            "model": self.source,
            "bandwidth": self.bandwidth,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "frame_rate": self.frame_rate,
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "weights_sha256": self._fingerprint,
        }


def _load_encodec(model: str | os.PathLike | Any) -> tuple[Any, str]:
    """Return (EncodecModel, description of its source); errors say how to obtain the weights."""
    from transformers import EncodecModel

    if isinstance(model, EncodecModel):
        return model, f"<in-memory EncodecModel {model.config.name_or_path or 'unnamed'}>"
    source = os.fspath(model)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a transformers EnCodec directory (no config.json)")
        try:
            return EncodecModel.from_pretrained(path), str(path.resolve())
        except Exception as exc:  # corrupt weights, wrong model type, ...
            raise CheckpointError(f"cannot load EnCodec from {path}: {exc}") from exc
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep in source.replace("/", "")
    if looks_like_path:
        raise CheckpointError(f"EnCodec model directory not found: {path}")
    try:
        return EncodecModel.from_pretrained(source), source
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"EnCodec weights {source!r} are needed for the encodec teacher but could not be loaded"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {type(exc).__name__}: {reason}. "
            f"On a machine with internet run `python -c \"from transformers import EncodecModel; "
            f"EncodecModel.from_pretrained('{source}').save_pretrained('encodec_24khz')\"`, copy the "
            f"encodec_24khz directory here and pass its path as the teacher model (or copy the Hugging Face cache "
            f"~/.cache/huggingface); the k-means teacher needs no downloaded weights."
        ) from exc
