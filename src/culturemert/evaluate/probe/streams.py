"""Per-seed randomness shared by the batched trainer and the reference probe: initial weights, data order
(which rows form each step under the protocol's batching) and dropout masks."""

from __future__ import annotations

import logging
import math

import torch

from culturemert.errors import ConfigError
from culturemert.evaluate.features import SplitFeatures
from culturemert.runtime import derive_seed

log = logging.getLogger(__name__)


def derived_seed(seed: int, purpose: str) -> int:
    """The seed of one purpose (``init``, ``order``, ``dropout`` ...) of one probe seed."""
    return derive_seed("culturemert-probe", seed, purpose, sep=":")


def initial_weights(seed: int, dim: int, hidden: int, num_tags: int, n_weighted: int) -> dict[str, torch.Tensor]:
    """nn.Linear's default init (U(+-1/sqrt(fan_in)) for weight and bias), drawn from the seed; randn layer logits."""
    g = torch.Generator().manual_seed(derived_seed(seed, "init"))
    b1, b2 = 1.0 / math.sqrt(dim), 1.0 / math.sqrt(hidden)
    w1 = (torch.rand(dim, hidden, generator=g, dtype=torch.float64) * 2 - 1) * b1
    bias1 = (torch.rand(hidden, generator=g, dtype=torch.float64) * 2 - 1) * b1
    w2 = (torch.rand(hidden, num_tags, generator=g, dtype=torch.float64) * 2 - 1) * b2
    bias2 = (torch.rand(num_tags, generator=g, dtype=torch.float64) * 2 - 1) * b2
    gw = torch.Generator().manual_seed(derived_seed(seed, "layer-weights"))
    layer_logits = torch.randn(max(n_weighted, 1), generator=gw, dtype=torch.float64)
    return {k: v.float() for k, v in dict(w1=w1, b1=bias1, w2=w2, b2=bias2, layer_logits=layer_logits).items()}


class SeedStreams:
    """Data order (CPU generator) and dropout masks (device generator) of one seed."""

    def __init__(self, seed: int, device: torch.device):
        self.order = torch.Generator().manual_seed(derived_seed(seed, "order"))
        self.dropout = torch.Generator(device=device).manual_seed(derived_seed(seed, "dropout"))
        self.device = device

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.order)

    def dropout_mask(self, rows: int, hidden: int, p: float) -> torch.Tensor | None:
        if p <= 0:
            return None
        keep = torch.rand(rows, hidden, generator=self.dropout, device=self.device) >= p
        return keep.float() / (1.0 - p)

    def window_choice(self, counts: torch.Tensor) -> torch.Tensor:
        """One uniformly drawn window index per track (``counts`` [N] windows per track), from the order stream."""
        u = torch.rand(counts.shape[0], generator=self.order, dtype=torch.float64)
        return torch.minimum((u * counts).long(), counts - 1)


def epoch_rows(batching: str, split: SplitFeatures, stream: SeedStreams, batch_size: int) -> list[torch.Tensor]:
    """The window rows of every training step of one epoch for one seed (see :class:`Protocol`).

    Draws from ``stream`` in a fixed order (the track or window permutation, then the window choice), which the
    reference probe repeats with its own batch assembly.
    """
    if batching == "window":
        return list(stream.permutation(split.features.shape[0]).split(batch_size))
    starts = split.chunk_start
    counts = starts[1:] - starts[:-1]
    perm = stream.permutation(split.num_tracks)
    if batching == "random-window":
        picked = starts[:-1] + stream.window_choice(counts)
        return list(picked[perm].split(batch_size))
    if batching != "track":
        raise ConfigError(f"unknown batching {batching!r}")
    steps = []
    for tracks in perm.split(batch_size):
        lengths = counts[tracks]
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        steps.append(torch.repeat_interleave(starts[tracks], lengths) + offsets)
    return steps


# --------------------------------------------------------------------------------------------------------
# results of one probe
