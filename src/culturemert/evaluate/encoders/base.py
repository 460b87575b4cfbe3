"""The encoder interface shared by ``embed``, ``evaluate``, ``merge --sweep`` and ``report``.

An :class:`Encoder` declares what the rest of the pipeline needs to treat every model the same way:

* ``sample_rate`` (Hz): the rate its waveform input must have. ``embed`` decodes and resamples every file to this
  rate (soxr HQ), so a 16 kHz model is never fed 24 kHz audio;
* ``frame_rate`` (frames per second of its hidden states; ``None`` for clip-level encoders such as CLAP, which
  give one vector per window) and :meth:`Encoder.num_frames` (the exact count for a number of samples);
* ``num_hidden_states`` and ``dim``: the L and D of the ``[L, D]`` vector per window;
* ``fingerprint``: a sha256 of everything that changes its features (weights, preprocessing, adapter
  version). The feature cache is keyed by it and by the result-relevant embed settings.

:meth:`Encoder.hidden_states` maps a batch of equal-length waveforms ``[B, S]`` at ``sample_rate`` to the list of
its L hidden states, each ``[B, T, D_l]``; :meth:`Encoder.__call__` (what ``embed`` calls) pools them over time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any, Sequence

import torch

from culturemert.errors import CheckpointError, ConfigError, UserError
from culturemert.runtime import resolve_device

__all__ = ["Encoder", "PeakMemory", "fingerprint_of", "weights_fingerprint", "require_package", "conv_num_frames", "conv_receptive_field"]


def fingerprint_of(family: str, weights: str, **settings: Any) -> str:
    """sha256 over the family, a weights fingerprint and the JSON of any preprocessing settings."""
    material = json.dumps({"family": family, "weights": weights, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """:func:`culturemert.model.state_dict_fingerprint` of every parameter and buffer of ``module``."""
    from culturemert.model.weights import state_dict_fingerprint

    return state_dict_fingerprint(module.state_dict())


def conv_num_frames(num_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames of an unpadded conv stack: ``floor((L - k) / s) + 1`` per layer (wav2vec 2.0, HuBERT, MERT)."""
    length = int(num_samples)
    for k, s in zip(kernels, strides):
        length = (length - int(k)) // int(s) + 1
    return max(length, 0)


def conv_receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples one output frame of an unpadded conv stack sees (400 for the wav2vec 2.0 front end)."""
    field, jump = 1, 1
    for k, s in zip(kernels, strides):
        field += (int(k) - 1) * jump
        jump *= int(s)
    return field


def require_package(module: str, pip_name: str, extra: str) -> Any:
    """Import an optional third-party package or raise a one-line :class:`UserError` naming the pip command.

    A package that is installed but fails to import (muq, omar-rq and dasheng all import torchaudio, whose
    build must match the installed torch) is reported with the underlying error, also on one line.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == module or module.startswith(exc.name + ".")):
            raise UserError(
                f"the {pip_name} encoder needs the optional package {pip_name!r}: pip install 'culturemert[{extra}]'"
            ) from None
        raise UserError(
            f"{pip_name} is installed but cannot be imported: missing module {exc.name!r} "
            f"(see docs/evaluation.md, 'Encoders', for installing {pip_name} beside torch)"
        ) from None
    except (ImportError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{pip_name} is installed but cannot be imported ({type(exc).__name__}: {first}); it needs a torchaudio "
            "build matching the installed torch (docs/evaluation.md, 'Encoders')"
        ) from None


class PeakMemory:
    """Peak memory while a block runs: CUDA ``max_memory_allocated`` on a GPU, else the process's peak resident
    set size sampled every 20 ms from ``/proc/self/statm`` (``ru_maxrss`` where /proc is missing, which is the
    process's lifetime peak, not this block's). ``peak_bytes`` and ``kind`` are set on exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-memory")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())


class Encoder:
    """Base class of every adapter (see the module docstring for the contract).

    Subclasses set the declared attributes in ``__init__`` (through :meth:`_declare`) and implement
    :meth:`hidden_states`; :meth:`num_frames` must return the exact T of those hidden states for S samples
    (``None`` for clip-level encoders).
    """

    family = "encoder"

    name: str
    source: str
    sample_rate: int
    frame_rate: float | None
    num_hidden_states: int
    dim: int
    min_samples: int
    max_window_s: float | None
    fingerprint: str
    trust_remote_code: bool
    device: torch.device
    precision: str

    def _declare(
        self,
        *,
        name: str,
        source: str,
        sample_rate: int,
        frame_rate: float | None,
        num_hidden_states: int,
        dim: int,
        fingerprint: str,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        min_samples: int = 1,
        max_window_s: float | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if int(sample_rate) <= 0:
            raise CheckpointError(f"{source}: declared sample rate {sample_rate} is not a positive number of Hz")
        self.name = name
        self.source = source
        self.sample_rate = int(sample_rate)
        self.frame_rate = None if frame_rate is None else float(frame_rate)
        self.num_hidden_states = int(num_hidden_states)
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.device = resolve_device(device)
        if precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("precision bf16 needs a CUDA device (use fp32 on CPU)")
        self.precision = precision
        self.min_samples = int(min_samples)
        self.max_window_s = max_window_s
        self.trust_remote_code = bool(trust_remote_code)
        self.calls = 0
        self.forward_seconds = 0.0

    # the attribute names ``embed`` and the features folder have always used
    @property
    def num_layers(self) -> int:
        return self.num_hidden_states

    def describe(self) -> dict[str, Any]:
        """What the report records about this encoder (JSON-serialisable)."""
        model = getattr(self, "model", None)
        return {
            "family": self.family,
            "source": self.source,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "num_hidden_states": self.num_hidden_states,
            "dim": self.dim,
            "trust_remote_code": self.trust_remote_code,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "precision": self.precision,
            "num_parameters": sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else None,
        }

    def num_frames(self, num_samples: int) -> int | None:
        raise NotImplementedError

    def hidden_states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """``wav`` [B, S] float32 at ``sample_rate`` on ``device`` -> L tensors ``[B, T, D_l]``."""
        raise NotImplementedError

    def pool(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Mean over time of every hidden state -> ``[B, L, dim]``; narrower states are zero-padded to ``dim``
        (only CLAP's Swin stages differ in width)."""
        pooled = []
        for h in states:
            p = h.float().mean(dim=1)
            if p.shape[-1] < self.dim:
                p = torch.nn.functional.pad(p, (0, self.dim - p.shape[-1]))
            pooled.append(p)
        return torch.stack(pooled, dim=1)

    def check_window(self, window: float | None, max_seconds: float | None) -> None:
        """Refuse settings whose windows this encoder cannot take in one forward pass."""
        if self.max_window_s is None:
            return
        longest = window if window is not None and window > 0 else max_seconds
        if longest is None or longest > self.max_window_s + 1e-9:
            raise ConfigError(
                f"{self.name}: {self.family} takes at most {self.max_window_s:g} s per forward pass; "
                f"set the window (--window) to at most {self.max_window_s:g} s"
            )

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, with_frames: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, S] waveform -> (pooled [B, L, dim] float32, frames [B, L, T, D] float32 or None), both on CPU."""
        if with_frames and self.frame_rate is None:
            raise ConfigError(f"{self.name}: {self.family} gives one vector per window, so --frames is not available")
        self.calls += 1
        t0 = time.perf_counter()
        wav = wav.to(self.device, torch.float32)
        if self.precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                states = self.hidden_states(wav)
        else:
            states = self.hidden_states(wav)
        if len(states) != self.num_hidden_states:
            raise CheckpointError(
                f"{self.name}: returned {len(states)} hidden states, declared {self.num_hidden_states}"
            )
        states = [s.float() for s in states]
        pooled = self.pool(states).cpu()
        frames = None
        if with_frames:
            widths = {s.shape[-1] for s in states}
            if len(widths) != 1:
                raise ConfigError(f"{self.name}: hidden states of different widths cannot be stored as --frames")
            frames = torch.stack(states, dim=1).cpu()
        self.forward_seconds += time.perf_counter() - t0
        return pooled, frames
