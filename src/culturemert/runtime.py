"""Where computation runs and how its random streams are seeded: one device resolver, one seed derivation.

Every stage that draws random numbers (training data order and masks, probe initialisation, DARE masks, corpus
rendering) derives its seeds from a user seed plus a description of the purpose, hashed with sha256, so a stream
does not depend on the order in which other streams were created, nor on the Python process (``hash()`` is salted).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from culturemert.errors import ConfigError

__all__ = ["derive_seed", "resolve_device"]


def derive_seed(*parts: Any, sep: str = "/", bits: int = 63) -> int:
    """A seed from the first 8 bytes (little-endian) of sha256 over ``sep.join(str(p) for p in parts)``.

    ``bits`` = 63 keeps the value a valid ``torch.Generator.manual_seed`` argument; 64 is for numpy generators.
    Each caller's separator is part of its seeds' identity: changing it changes every stream derived with it.

    Raises:
        ValueError: ``bits`` outside 1..64.
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    digest = hashlib.sha256(sep.join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def resolve_device(device: str | torch.device | None, *, where: str = "device") -> torch.device:
    """``"auto"``/``None`` → CUDA if available, else CPU; any other name is checked before use.

    Under torchrun, ``"auto"`` and ``"cuda"`` pick the GPU of this process's ``LOCAL_RANK`` (and make it current), so
    each rank uses its own device.

    Raises:
        ConfigError: the name is not a torch device, or names CUDA on a machine without it (``where`` is the
            config key named in the message).
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = "auto" if device is None else device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {name!r} requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev
