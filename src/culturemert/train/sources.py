"""Where a stage's batches come from: the :class:`BatchSource` protocol and the prepared-directory source."""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Protocol


from culturemert.runtime import derive_seed
from culturemert.train.recipe import Recipe, StageSpec

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the trainer needs from data: deterministic batches by index plus the teacher's shape."""

    n_codebooks: int
    codebook_size: int
    teacher_name: str | None

    def batch(self, step: int) -> Mapping[str, Any]: ...

    def hours(self) -> dict[str, float]: ...


class PreparedSource:
    """:class:`culturemert.data.MixtureLoader` over the recipe's prepared directories for one stage."""

    def __init__(self, recipe: Recipe, stage: StageSpec, stage_index: int, datasets: list[Any]):
        from culturemert.data import MixtureLoader

        spec = stage.mixture or recipe.data.mixture
        seed = derive_seed(recipe.seed, "data", stage_index)
        self.loader = MixtureLoader(
            datasets,
            spec,
            batch_size=stage.global_clips(),
            crop_samples=stage.crop_samples,
            seed=seed % (2**31),
            rank=0,  # every rank draws the same global batch and keeps its own rows
            split=recipe.data.split,
            short_items=recipe.data.short_items,
        )
        first = self.loader.datasets[0]
        self.n_codebooks = int(first.n_codebooks)
        self.codebook_size = int(first.codebook_size)
        self.teacher_name = str(first.teacher.get("name"))
        self.num_workers = recipe.data.num_workers
        self._datasets = self.loader.datasets

    def batch(self, step: int) -> Mapping[str, Any]:
        return self.loader.batch(step)

    def iterate(self, start: int, stop: int) -> Iterator[Mapping[str, Any]]:
        if self.num_workers > 0:
            from culturemert.data import torch_loader

            yield from torch_loader(
                self.loader, start_step=start, num_steps=stop - start, num_workers=self.num_workers
            )
        else:
            for k in range(start, stop):
                yield self.batch(k)

    def hours(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for d in self._datasets:
            for c, h in d.hours_per_culture(None).items():
                total[c] = total.get(c, 0.0) + h
        return {c: round(h, 3) for c, h in total.items()}


def iterate_source(source: Any, start: int, stop: int) -> Iterator[Mapping[str, Any]]:
    """Batches ``start .. stop - 1`` of a source: its own ``iterate`` (prefetching loaders) or ``batch(k)`` one by one."""
    if hasattr(source, "iterate"):
        yield from source.iterate(start, stop)
    else:
        for k in range(start, stop):
            yield source.batch(k)
