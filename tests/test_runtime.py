import hashlib

import pytest
import torch

from culturemert.errors import ConfigError
from culturemert.runtime import derive_seed, resolve_device


def test_derive_seed_is_sha256_of_joined_parts():
    digest = hashlib.sha256("culturemert-probe:3:init".encode()).digest()
    expected = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    assert derive_seed("culturemert-probe", 3, "init", sep=":") == expected
    full = int.from_bytes(hashlib.sha256("a\x1fb".encode()).digest()[:8], "little")
    assert derive_seed("a", "b", sep="\x1f", bits=64) == full
    assert derive_seed("a", "b") != derive_seed("a", "c")
    torch.Generator().manual_seed(derive_seed("x"))  # 63 bits: always a valid torch seed


def test_resolve_device_errors_name_the_key():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(ConfigError, match="runtime.device"):
        resolve_device("gpu0", where="runtime.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
