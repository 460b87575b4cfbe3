"""Exact k-th largest magnitudes of a task vector seen one tensor at a time (for ``trim_scope: global``).

The TIES reference code trims the whole flattened task vector of each model at once (``topk_values_mask`` on the
concatenation of every parameter). Flattening a model is what the streaming merge avoids, so the global magnitude
threshold is found in two passes over the tensors with memory independent of the model size:

1. **Count**: a histogram of the magnitudes' float64 bit patterns cut to their top 20 bits (sign, 11 exponent
   bits, 8 mantissa bits). For non-negative IEEE-754 doubles the bit pattern orders like the value, so each bin is
   a magnitude interval less than 2⁻⁸ (0.4 %) wide in relative terms; 2¹⁹ bins, 4 MiB of counts per model.
2. **Collect**: the magnitudes falling into the one bin that holds the k-th largest (known from the cumulative
   counts) are kept; the k-th largest is then an exact selection among them.

The result is bit-identical to sorting the concatenated magnitudes. A bin typically holds a fraction of a percent
of the entries near the threshold (for a Gaussian-like task vector of 95M entries, about 10⁵ doubles).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_PREFIX_SHIFT = 44  # 64 − 20 bits kept
_NUM_BINS = 1 << 19  # the sign bit of a magnitude is 0, so prefixes are below 2^19


class GlobalMagnitudeRanks:
    """The k-th largest |τ| over all tensors fed to it, for a few ranks k, in a count pass and a collect pass.

    Usage: :meth:`count` every tensor, :meth:`plan` the ranks, :meth:`collect` every tensor again (the same
    values), then :meth:`values`. Tensors must be float64 and finite.
    """

    def __init__(self) -> None:
        self.histogram = torch.zeros(_NUM_BINS, dtype=torch.int64)
        self.total = 0
        self._targets: list[tuple[int, int]] = []  # (bin, rank within the bin counted from its top)
        self._candidates: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _magnitudes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if values.dtype != torch.float64:
            raise TypeError(f"GlobalMagnitudeRanks needs float64 values, got {values.dtype}")
        magnitude = values.detach().abs().reshape(-1).contiguous()
        return magnitude, magnitude.view(torch.int64) >> _PREFIX_SHIFT

    def count(self, values: torch.Tensor) -> None:
        """Pass 1: add the magnitudes of ``values`` to the histogram."""
        _, prefix = self._magnitudes(values)
        counts = torch.bincount(prefix)
        self.histogram[: counts.numel()] += counts
        self.total += prefix.numel()

    def plan(self, ranks: Sequence[int]) -> None:
        """Between the passes: the ranks (1 = largest, each in 1 … total) whose magnitudes :meth:`values` returns."""
        from_top = self.histogram.flip(0).cumsum(0)  # from_top[j]: entries in bins >= NUM_BINS - 1 - j
        self._targets = []
        for k in ranks:
            if not 1 <= k <= self.total:
                raise ValueError(f"rank {k} outside 1..{self.total}")
            j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
            bin_index = _NUM_BINS - 1 - j
            above = int(from_top[j]) - int(self.histogram[bin_index])
            self._targets.append((bin_index, k - above))
            self._candidates.setdefault(bin_index, [])

    def collect(self, values: torch.Tensor) -> None:
        """Pass 2: keep the magnitudes of ``values`` that fall into a planned bin."""
        magnitude, prefix = self._magnitudes(values)
        for bin_index, kept in self._candidates.items():
            kept.append(magnitude[prefix == bin_index].clone())

    def values(self) -> list[float]:
        """The k-th largest magnitude for each planned rank k, in :meth:`plan` order."""
        result = []
        for bin_index, rank_in_bin in self._targets:
            candidates = torch.cat(self._candidates[bin_index])
            result.append(float(torch.kthvalue(candidates, candidates.numel() - rank_in_bin + 1).values))
        return result
