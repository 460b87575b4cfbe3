"""Pre-training targets: discrete 75 Hz teacher codes (EnCodec RVQ or k-means) and MERT's CQT target.

| file | owns |
|---|---|
| ``base.py`` | the ``Teacher`` protocol, padded batching on the label grid, the codebook-usage guard |
| ``encodec.py`` | ``EncodecTeacher`` (EnCodec 24 kHz RVQ, MERT-v1's teacher) |
| ``kmeans.py`` | ``KMeansTeacher`` (k-means on log-mel frames, MERT-v0 style) |
| ``cqt.py`` | ``MertCQT``, the CQT reconstruction target computed online by the objective |

Every teacher emits codes on the grid of :mod:`culturemert.label_grid` (one code per codebook per 320-sample hop of
24 kHz audio, ``ceil(L / 320)`` codes for ``L`` samples, code ``k`` paired with model frame ``k``).
"""

from __future__ import annotations

import inspect
from typing import Any

from culturemert.errors import ConfigError
from culturemert.teachers.base import Teacher, check_codebook_usage, teacher_fingerprint
from culturemert.teachers.cqt import MertCQT
from culturemert.teachers.encodec import DEFAULT_ENCODEC, EncodecTeacher
from culturemert.teachers.kmeans import KMeansTeacher

__all__ = [
    "DEFAULT_ENCODEC",
    "TEACHERS",
    "EncodecTeacher",
    "KMeansTeacher",
    "MertCQT",
    "Teacher",
    "build_teacher",
    "check_codebook_usage",
    "teacher_fingerprint",
]

TEACHERS = ("encodec", "kmeans")


def build_teacher(name: str, **options: Any) -> Teacher:
    """Create a teacher by name.

    ``"encodec"``: options of :class:`EncodecTeacher` (``model``, ``bandwidth``, ``device``, ``batch_size``).
    ``"kmeans"``: with ``path=...`` loads a saved teacher (other options: ``device``, ``batch_size``); without it
    returns an unfitted :class:`KMeansTeacher` built from the remaining options (call ``fit`` before encoding;
    ``n_clusters`` is accepted as another name for ``codebook_size``).
    """
    if name == "encodec":
        factory: Any = EncodecTeacher
    elif name == "kmeans":
        if "n_clusters" in options:  # sklearn's name for the same thing
            if "codebook_size" in options:
                raise ConfigError("kmeans teacher: give codebook_size or n_clusters, not both")
            options["codebook_size"] = options.pop("n_clusters")
        path = options.pop("path", None)
        factory = KMeansTeacher
        if path is not None:
            unexpected = set(options) - {"device", "batch_size"}
            if unexpected:
                raise ConfigError(
                    f"kmeans teacher loaded from {path}: options {sorted(unexpected)} come from the saved model "
                    f"and cannot be overridden"
                )
            return KMeansTeacher.load(path, **options)
    else:
        raise ConfigError(f"unknown teacher {name!r}; choose one of {list(TEACHERS)}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ConfigError(f"{name} teacher: invalid options {sorted(options)}: {exc}") from exc
    return factory(**options)
