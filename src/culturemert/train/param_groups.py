"""Parameter groups: which parameters a stage trains, named by alias, ``layers[i:j]`` or a glob over names.

Aliases map to name prefixes of :class:`~culturemert.model.MertPretrainModel` (``feature_extractor`` = the conv
stack, ``positional_conv``, ``encoder_norm``, ``heads`` …); ``layers[i:j]`` is a Python slice over transformer
layers; anything else is an ``fnmatch`` glob over full parameter names.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from culturemert.errors import ConfigError

__all__ = ["PARAMETER_ALIASES", "check_pattern", "resolve_trainable"]

PARAMETER_ALIASES: dict[str, tuple[str, ...]] = {
    "all": ("",),
    "feature_extractor": ("backbone.feature_extractor.",),
    "feature_projection": ("backbone.feature_projection.",),
    "mask_embedding": ("backbone.masked_spec_embed",),
    "positional_conv": ("backbone.encoder.pos_conv_embed.",),
    "encoder_norm": ("backbone.encoder.layer_norm.",),
    "heads": ("heads.",),
}
LAYERS_RE = re.compile(r"^layers\[(-?\d*)(?::(-?\d*))?\]$")


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is a valid parameter-group pattern, else ``ValueError`` listing the accepted forms."""
    if pattern in PARAMETER_ALIASES or LAYERS_RE.match(pattern):
        return pattern
    if pattern.startswith(("backbone.", "heads.")) or any(ch in pattern for ch in "*?["):
        return pattern
    raise ValueError(
        f"unknown parameter group {pattern!r}: use {', '.join(PARAMETER_ALIASES)}, layers[i:j], "
        "or a glob over parameter names such as 'backbone.encoder.layers.*.attention.*'"
    )


def resolve_trainable(model: nn.Module, patterns: list[str], where: str = "trainable") -> set[str]:
    """Names of the parameters selected by ``patterns`` (aliases, ``layers[i:j]``, globs)."""
    names = [n for n, _ in model.named_parameters()]
    num_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in PARAMETER_ALIASES:
            prefixes = PARAMETER_ALIASES[pattern]
            hit = {n for n in names if any(n.startswith(p) for p in prefixes)}
        elif m := LAYERS_RE.match(pattern):
            lo_s, hi_s = m.group(1), m.group(2)
            if hi_s is None:  # layers[i]
                idx = int(lo_s)
                layer_ids = [idx % num_layers] if num_layers and -num_layers <= idx < num_layers else []
            else:
                layer_ids = list(range(num_layers))[slice(int(lo_s) if lo_s else None, int(hi_s) if hi_s else None)]
            prefixes = tuple(f"backbone.encoder.layers.{i}." for i in layer_ids)
            hit = {n for n in names if n.startswith(prefixes)} if prefixes else set()
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hit:
            raise ConfigError(f"{where}: {pattern!r} matches no parameter of this model ({num_layers} layers)")
        chosen |= hit
    return chosen
