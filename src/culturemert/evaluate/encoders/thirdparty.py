"""Encoders distributed as their own PyPI packages: MuQ (``muq``), OMAR-RQ (``omar-rq``), Dasheng (``dasheng``).

None of them is needed by the core install. Each is imported only when its spec is used; a missing package is
a one-line error naming ``pip install 'culturemert[<extra>]'``. All three import ``torchaudio`` when imported
(MuQ and Dasheng for their mel front end, OMAR-RQ for its input representations), and OMAR-RQ also pins
``transformers < 5``: docs/evaluation.md ("Encoders") says how to install them beside the project's torch.

What each adapter reads (geometry from the packages' source, version noted):

* **MuQ** (muq 0.1.0): ``MuQ.from_pretrained(repo or dir)``; raw waveform at 24 kHz (its mel front end is fixed
  to 24 kHz, hop 240); two stride-2 conv blocks, so ``ceil(ceil(n_mel / 2) / 2)`` frames = 25 Hz;
  ``output_hidden_states=True`` gives ``encoder_depth + 1`` states (conformer input + every layer).
* **OMAR-RQ** (omar-rq 0.2.1): ``get_model(model_id=... | config_file=...)``; the rate is the model's ``sr``
  (16 kHz for the mel models, 24 kHz for the multi-feature ones) and the frame rate its ``eps``;
  ``extract_embeddings(audio, layers=...)`` gives the output of each of its ``depth`` blocks (it exposes no
  pre-block state), so ``depth`` states.
* **Dasheng** (dasheng 0.0.9): ``dasheng_base / dasheng_06B / dasheng_12B(path)``; 16 kHz, 64-bin mel with a
  10 ms hop (centred frames), 4-frame time patches: 25 Hz. The model returns only its output, so the hidden
  states are read with forward hooks: the input of the first block, then every block's output with the last
  one replaced by the model's own output (after its final LayerNorm, as transformers does for pre-LN models);
  ``depth + 1`` states. Long inputs are processed by the model in 10.08 s pieces; the hooks concatenate them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from culturemert.errors import CheckpointError, UserError
from culturemert.evaluate.encoders.base import Encoder, fingerprint_of, require_package, weights_fingerprint

__all__ = ["MuQEncoder", "OmarRQEncoder", "DashengEncoder", "load_muq", "load_omar_rq", "load_dasheng"]

_ADAPTER_VERSION = 1


def _load_error(package: str, source: str, exc: BaseException) -> CheckpointError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(f"{package}: cannot load {source!r} ({type(exc).__name__}: {first}); weights are fetched "
                           "by the package itself, so download them on a connected machine and pass the local path")


class MuQEncoder(Encoder):
    """MuQ (see the module docstring). ``model`` is a ``muq.MuQ`` instance."""

    family = "muq"

    def __init__(self, model: Any, source: str, *, name: str, device: Any = "auto", precision: str = "fp32"):
        config = model.config
        self.hop = int(getattr(config, "hop_length", 240))
        label_rate = int(getattr(config, "label_rate", 25))
        self.fold = 100 // label_rate  # mel frames per output frame (MuQModel.n_fold)
        rate = 24_000
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
        self._declare(name=name, source=source, sample_rate=rate, frame_rate=rate / (self.hop * self.fold),
                      num_hidden_states=int(config.encoder_depth) + 1, dim=int(config.encoder_dim),
                      fingerprint=fingerprint_of(self.family, weights_fingerprint(model), adapter=_ADAPTER_VERSION, config=cfg),
                      device=device, precision=precision, min_samples=self.hop * self.fold)
        self.model = model.eval().float().to(self.device)

    def num_frames(self, num_samples: int) -> int:
        frames = int(num_samples) // self.hop  # centred STFT frames, the last one dropped by MuQ
        for stride in ((2, 2) if self.fold == 4 else (2, 1)):
            frames = -(-frames // stride)
        return frames

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(wav, output_hidden_states=True).hidden_states)


class OmarRQEncoder(Encoder):
    """OMAR-RQ (see the module docstring). ``module`` is what ``omar_rq.get_model`` returns."""

    family = "omar-rq"

    def __init__(self, module: Any, source: str, *, name: str, device: Any = "auto", precision: str = "fp32"):
        self.depth = len(module.net.layers)
        rep = getattr(module, "input_rep", None)
        self.hop = int(getattr(module, "hop_length", getattr(rep, "hop_len", 0)) or 0)
        self.patch_t = int(module.patch_size[1])
        self.mel_input = rep is not None and hasattr(rep, "n_mel")
        rate = int(module.sr)
        self._declare(name=name, source=source, sample_rate=rate, frame_rate=float(module.eps),
                      num_hidden_states=self.depth, dim=int(module.net.embed_dim),
                      fingerprint=fingerprint_of(self.family, weights_fingerprint(module), adapter=_ADAPTER_VERSION, source=source),
                      device=device, precision=precision, min_samples=max(self.hop * self.patch_t, 1),
                      max_window_s=30.0)  # the package documents inputs "up to 30s"
        self.model = module.eval().float().to(self.device)

    def num_frames(self, num_samples: int) -> int | None:
        if not self.mel_input:
            return None  # waveform / codec inputs: the count depends on the representation
        return (int(num_samples) // self.hop + 1) // self.patch_t  # centred STFT frames, whole patches

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        out = self.model.extract_embeddings(wav, layers=set(range(self.depth)))  # [L, B, T, C]
        if out.dim() == 3:
            out = out.unsqueeze(0)
        return list(out.unbind(0))


class DashengEncoder(Encoder):
    """Dasheng (see the module docstring). ``model`` is a ``dasheng`` ``Dasheng`` module."""

    family = "dasheng"

    def __init__(self, model: Any, source: str, *, name: str, device: Any = "auto", precision: str = "fp32"):
        self.hop = int(model.hop_size)
        self.patch_t = int(model.patch_stride[-1])
        self.has_cls = getattr(model, "pooling", "mean") == "token"
        self.depth = len(model.blocks)
        rate = 16_000
        self._declare(name=name, source=source, sample_rate=rate, frame_rate=rate / (self.hop * self.patch_t),
                      num_hidden_states=self.depth + 1, dim=int(model.embed_dim),
                      fingerprint=fingerprint_of(self.family, weights_fingerprint(model), adapter=_ADAPTER_VERSION),
                      device=device, precision=precision, min_samples=self.hop * self.patch_t)
        self.model = model.eval().float().to(self.device)
        self._pieces: list[list[torch.Tensor]] | None = None
        self.model.blocks[0].register_forward_pre_hook(self._on_input)
        for block in self.model.blocks:
            block.register_forward_hook(self._on_block)

    def _on_input(self, module: Any, args: tuple) -> None:
        if self._pieces is not None:
            self._pieces.append([args[0]])

    def _on_block(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        if self._pieces is not None:
            self._pieces[-1].append(output)

    def num_frames(self, num_samples: int) -> int:
        mel_frames = int(num_samples) // self.hop + 1  # centred frames
        return max((mel_frames - self.patch_t) // self.patch_t + 1, 0)

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        self._pieces = []
        try:
            self.model(wav)
            pieces = self._pieces
        finally:
            self._pieces = None
        skip = 1 if self.has_cls else 0  # a class token leads every piece
        states = [torch.cat([p[i][:, skip:] for p in pieces], dim=1) for i in range(self.depth + 1)]
        # the model's output is its final LayerNorm of the last block, a per-token map: norm(cat) = cat(norm)
        states[-1] = self.model.norm(states[-1])
        return states


def load_muq(source: str, *, name: str, device: Any, precision: str) -> MuQEncoder:
    """A MuQ model from the ``muq`` package.

    Raises:
        ConfigError: the package is missing (the message names the pip command) or the model cannot be loaded.
    """
    muq = require_package("muq", "muq", "muq")
    try:
        model = muq.MuQ.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - network, cache and format errors all reported on one line
        raise _load_error("muq", source, exc) from None
    return MuQEncoder(model, source, name=name, device=device, precision=precision)


def load_omar_rq(source: str, *, name: str, device: Any, precision: str) -> OmarRQEncoder:
    """An OMAR-RQ model from the ``omar-rq`` package (a ``.gin`` config path or a Hub id).

    Raises:
        ConfigError: the package is missing (the message names the pip command) or the model cannot be loaded.
    """
    omar = require_package("omar_rq", "omar-rq", "omar-rq")
    path = Path(source).expanduser()
    try:
        if path.suffix == ".gin" and path.is_file():
            module = omar.get_model(config_file=str(path), device="cpu")
        else:
            module = omar.get_model(model_id=source, device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise _load_error("omar-rq", source, exc) from None
    return OmarRQEncoder(module, source, name=name, device=device, precision=precision)


_DASHENG_SIZES = {"base": "dasheng_base", "0.6b": "dasheng_06B", "06b": "dasheng_06B", "1.2b": "dasheng_12B",
                  "12b": "dasheng_12B"}


def load_dasheng(source: str, *, name: str, device: Any, precision: str) -> DashengEncoder:
    """``source``: ``base``, ``0.6B`` or ``1.2B`` (weights fetched by the package), or ``SIZE=PATH`` for a local
    checkpoint file of that size (``base=/models/dasheng_base.pt``)."""
    dasheng = require_package("dasheng", "dasheng", "dasheng")
    size, _, path = source.partition("=")
    factory = _DASHENG_SIZES.get(size.strip().lower())
    if factory is None:
        raise UserError(f"dasheng:{source}: choose base, 0.6B or 1.2B (optionally SIZE=PATH to a local checkpoint)")
    try:
        model = getattr(dasheng, factory)(path or None)
    except Exception as exc:  # noqa: BLE001
        raise _load_error("dasheng", source, exc) from None
    return DashengEncoder(model, source, name=name, device=device, precision=precision)
