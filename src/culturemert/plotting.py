"""Figures written by culturemert: matplotlib without a display (Agg), saved atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed; safe in workers and on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save ``fig`` to ``path`` through a temporary file and a rename (never a half-written image), then close it."""
    from culturemert.files import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **savefig_kwargs))
    finally:
        pyplot().close(fig)
    return path
