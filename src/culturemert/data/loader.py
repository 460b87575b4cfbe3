"""The crop loader: aligned (audio crop, teacher codes) batches drawn from prepared directories by a culture
mixture with optional replay, stateless (batch = f(seed, step)) so a resumed run sees the same batches.
"""


from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from culturemert.label_grid import HOP_LENGTH, SAMPLE_RATE
from culturemert.audio import INT16_SCALE, int16_to_float
from culturemert.config import StrictModel
from culturemert.errors import ConfigError, DataError
from culturemert.data.prepare import INDEX_VERSION

log = logging.getLogger(__name__)

#: Default crop: 5 s at 24 kHz = 375 label frames.
DEFAULT_CROP_SAMPLES = 120_000
#: Label value for padded frames when ``short_items="pad"``; the objective must ignore it.
PAD_CODE = -1


class PreparedDataset:
    """A prepared directory, memory-mapped: items' audio and codes are views, nothing is decoded.

    Opening checks that ``index.json`` and the files agree, and raises a one-line :class:`DataError` naming the
    file and the disagreement otherwise (never reads past it): every shard file listed exists inside the
    directory with the shape and dtype the index gives (int16 audio ``[n_samples]``, int16 codes
    ``[n_codebooks, n_frames]``); every item lies inside its shard, owns ``ceil(length / 320)`` frames, and the
    items of a shard tile its audio and codes exactly; ``shards/`` holds no shard file the index does not list
    (e.g. files of another prepared directory copied in); the sample rate, hop and int16 scale are this
    version's. Shards are opened lazily (per process), so the object pickles cheaply into DataLoader workers.
    ``teacher`` is the index's teacher entry; ``teacher_fingerprint`` its ``fingerprint`` (None in directories
    prepared before fingerprints were recorded).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise DataError(f"{self.directory}: no index.json (not a prepared directory, or prepare did not finish)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{index_path}: unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or index.get("hop") != HOP_LENGTH:
            version = index.get("version") if isinstance(index, dict) else None
            raise DataError(f"{index_path}: unsupported index version {version}")
        try:
            self.sample_rate: int = index["sample_rate"]
            self.teacher: dict[str, Any] = index["teacher"]
            self.n_codebooks: int = int(self.teacher["n_codebooks"])
            self.codebook_size: int = int(self.teacher["codebook_size"])
            self.shards: list[dict[str, Any]] = index["shards"]
            self.items: list[dict[str, Any]] = index["items"]
            self.culture = np.array([it["culture"] for it in self.items], dtype=object)
            self.split = np.array([it["split"] for it in self.items], dtype=object)
            self.weight = np.array([it["weight"] for it in self.items], dtype=np.float64)
            self.shard = np.array([it["shard"] for it in self.items], dtype=np.int64)
            self.offset = np.array([it["offset"] for it in self.items], dtype=np.int64)
            self.length = np.array([it["length"] for it in self.items], dtype=np.int64)
            self.frame_offset = np.array([it["frame_offset"] for it in self.items], dtype=np.int64)
            self.n_frames = np.array([it["n_frames"] for it in self.items], dtype=np.int64)
            shard_samples = np.array([int(e["n_samples"]) for e in self.shards], dtype=np.int64)
            shard_frames = np.array([int(e["n_frames"]) for e in self.shards], dtype=np.int64)
            shard_files = [(str(e["audio"]), str(e["codes"])) for e in self.shards]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{index_path}: malformed ({type(exc).__name__}: {exc})") from None
        self.teacher_fingerprint: str | None = self.teacher.get("fingerprint")
        if self.sample_rate != SAMPLE_RATE or index.get("int16_scale", INT16_SCALE) != INT16_SCALE:
            raise DataError(
                f"{index_path}: sample_rate {self.sample_rate} / int16_scale {index.get('int16_scale')}, this version "
                f"reads {SAMPLE_RATE} / {INT16_SCALE}"
            )
        self._check_items(index_path, shard_samples, shard_frames)
        self._check_files(index_path, shard_samples, shard_frames, shard_files)
        self._audio: dict[int, np.ndarray] = {}
        self._codes: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def _check_items(self, index_path: Path, shard_samples: np.ndarray, shard_frames: np.ndarray) -> None:
        """Every item inside its shard, ``ceil(length / 320)`` frames, and the items tiling each shard."""
        n_shards = len(self.shards)

        def fail(mask: np.ndarray, what: str) -> None:
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                raise DataError(f"{index_path}: item {self.items[i].get('id', i)} ({self.items[i].get('path')}): {what}")

        fail((self.shard < 0) | (self.shard >= n_shards), f"shard outside the {n_shards} listed")
        fail(self.length <= 0, "length is not positive")
        fail(self.n_frames != -(-self.length // HOP_LENGTH), "n_frames is not ceil(length / 320)")
        shard = np.clip(self.shard, 0, max(n_shards - 1, 0))
        fail((self.offset < 0) | (self.offset + self.length > shard_samples[shard]), "audio outside its shard")
        fail(
            (self.frame_offset < 0) | (self.frame_offset + self.n_frames > shard_frames[shard]),
            "codes outside its shard",
        )
        used_samples = np.bincount(shard, weights=self.length, minlength=n_shards).astype(np.int64)
        used_frames = np.bincount(shard, weights=self.n_frames, minlength=n_shards).astype(np.int64)
        bad = np.flatnonzero((used_samples != shard_samples) | (used_frames != shard_frames))
        if bad.size:
            k = int(bad[0])
            raise DataError(
                f"{index_path}: shard {k} lists {shard_samples[k]} samples / {shard_frames[k]} frames but its items "
                f"cover {used_samples[k]} / {used_frames[k]}"
            )
        # with the sums equal, items tile their shard iff each starts where the previous one (in offset order) ends
        order = np.lexsort((self.offset, shard))
        first = np.ones(order.size, bool)
        first[1:] = shard[order][1:] != shard[order][:-1]
        want_offset = np.where(first, 0, np.concatenate([[0], (self.offset + self.length)[order][:-1]]))
        want_frame = np.where(first, 0, np.concatenate([[0], (self.frame_offset + self.n_frames)[order][:-1]]))
        wrong = (self.offset[order] != want_offset) | (self.frame_offset[order] != want_frame)
        if wrong.any():
            k = int(shard[order][np.flatnonzero(wrong)[0]])
            raise DataError(f"{index_path}: the items of shard {k} overlap or leave gaps")

    def _check_files(
        self, index_path: Path, shard_samples: np.ndarray, shard_frames: np.ndarray, shard_files: list[tuple[str, str]]
    ) -> None:
        """Shard files exist inside the directory with the index's shapes; no unlisted shard files."""
        root = self.directory.resolve()
        listed: set[str] = set()
        for k, (audio, codes) in enumerate(shard_files):
            for rel, shape in ((audio, (int(shard_samples[k]),)), (codes, (self.n_codebooks, int(shard_frames[k])))):
                path = (self.directory / rel).resolve()
                if Path(rel).is_absolute() or root not in path.parents:
                    raise DataError(f"{index_path}: shard {k} file {rel!r} is not inside {self.directory}")
                got_shape, got_dtype = _npy_header(path)
                if got_shape != shape or got_dtype != np.int16:
                    raise DataError(
                        f"{path}: {got_dtype} {got_shape}, but index.json lists int16 {shape} (modified, truncated, "
                        "or from another run?)"
                    )
                listed.add(path.relative_to(root).as_posix())
            listed.add(f"shards/items-{k:05d}.json")  # prepare's per-shard commit marker
        shard_dir = self.directory / "shards"
        extra = sorted(
            p.relative_to(self.directory).as_posix()
            for p in (shard_dir.iterdir() if shard_dir.is_dir() else [])
            if not p.name.startswith(".") and p.resolve().relative_to(root).as_posix() not in listed
        )
        if extra:
            more = f" and {len(extra) - 1} more file(s)" if len(extra) > 1 else ""
            raise DataError(
                f"{self.directory}: shards/ holds {extra[0]}{more}, which index.json does not list (files of another "
                "prepared directory?); remove them or re-run prepare"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_audio"], state["_codes"] = {}, {}
        return state

    def _maps(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():
            self._audio, self._codes, self._pid = {}, {}, os.getpid()
        if k not in self._audio:
            entry = self.shards[k]
            # plain ndarray views of the maps: np.memmap's per-slice bookkeeping costs more than the copy
            self._audio[k] = np.load(self.directory / entry["audio"], mmap_mode="r").view(np.ndarray)
            self._codes[k] = np.load(self.directory / entry["codes"], mmap_mode="r").view(np.ndarray)
            if self._audio[k].shape != (entry["n_samples"],) or self._codes[k].shape != (self.n_codebooks, entry["n_frames"]):
                raise DataError(f"{self.directory}: shard {k} does not match index.json (modified or truncated?)")
        return self._audio[k], self._codes[k]

    def audio(self, i: int) -> np.ndarray:
        """int16 view of item i's whole 24 kHz waveform."""
        a, _ = self._maps(int(self.shard[i]))
        return a[self.offset[i] : self.offset[i] + self.length[i]]

    def codes(self, i: int) -> np.ndarray:
        """int16 view [n_codebooks, n_frames] of item i's teacher codes."""
        _, c = self._maps(int(self.shard[i]))
        return c[:, self.frame_offset[i] : self.frame_offset[i] + self.n_frames[i]]

    def hours_per_culture(self, split: str | None = None) -> dict[str, float]:
        keep = np.ones(len(self), bool) if split is None else (self.split == split)
        hours: dict[str, float] = {}
        for culture, length in zip(self.culture[keep], self.length[keep]):
            hours[culture] = hours.get(culture, 0.0) + float(length) / self.sample_rate / 3600
        return hours


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a ``.npy`` file from its header only; :class:`DataError` if missing or not a .npy."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version}")
            offset = f.tell()
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: missing (listed in index.json)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size < expected:
        raise DataError(f"{path}: truncated ({size} bytes, the header announces {expected})")
    if fortran and len(shape) > 1:
        raise DataError(f"{path}: Fortran-ordered array; prepare writes C order")
    return tuple(int(n) for n in shape), np.dtype(dtype)


def teacher_identity(dataset: PreparedDataset) -> str:
    """``name n_codebooks x codebook_size, teacher fingerprint <first 12 hex>`` for messages."""
    fp = dataset.teacher_fingerprint
    return (
        f"{dataset.teacher.get('name')} {dataset.n_codebooks}x{dataset.codebook_size}, "
        f"teacher fingerprint {fp[:12] if fp else 'not recorded'}"
    )


def check_same_teacher(datasets: Sequence[PreparedDataset | str | os.PathLike]) -> list[PreparedDataset]:
    """Refuse prepared directories whose codes come from different teachers; returns the opened datasets.

    Codes are only comparable under one teacher: two k-means teachers fitted on different corpora (or an EnCodec
    with other weights) give code 7 different meanings, and training on both at once teaches contradictory
    targets. The teachers' fingerprints (``index.json``: ``teacher.fingerprint``, see
    :func:`culturemert.teachers.teacher_fingerprint`) must be equal; a directory without one (prepared by an
    older culturemert) cannot be checked and is refused too when combined with others.

    Raises:
        DataError: naming both directories and their teachers.
    """
    opened = [d if isinstance(d, PreparedDataset) else PreparedDataset(d) for d in datasets]
    if len(opened) < 2:
        return opened
    first = opened[0]
    for d in [first, *opened[1:]]:
        if d.teacher_fingerprint is None:
            raise DataError(
                f"{d.directory}: index.json records no teacher fingerprint (prepared by an older culturemert), so it "
                f"cannot be checked against the other directories; re-run the same `culturemert prepare` command on "
                f"it (finished shards are kept) to record one"
            )
    for d in opened[1:]:
        same = (d.teacher.get("name"), d.n_codebooks, d.codebook_size, d.teacher_fingerprint) == (
            first.teacher.get("name"), first.n_codebooks, first.codebook_size, first.teacher_fingerprint)
        if not same:
            hint = (
                f"; fit k-means once and prepare the others with `--teacher kmeans --teacher-model {first.directory}`"
                if first.teacher.get("name") == "kmeans" else ""
            )
            raise DataError(
                f"{d.directory} ({teacher_identity(d)}) and {first.directory} ({teacher_identity(first)}) were "
                f"tokenised by different teachers: a code means a different sound in each, so they cannot be trained "
                f"on together; tokenise every directory with one teacher{hint}"
            )
    return opened


def mixture_weights(
    hours: dict[str, float], scheme: Literal["hours", "uniform", "temperature"], temperature: float = 1.0
) -> dict[str, float]:
    """Culture weights (summing to 1): proportional to hours, uniform, or hours ** (1 / temperature)."""
    if not hours:
        raise ConfigError("mixture: no cultures to weight")
    if scheme == "uniform":
        raw = {c: 1.0 for c in hours}
    elif scheme == "hours":
        raw = dict(hours)
    elif scheme == "temperature":
        if temperature <= 0:
            raise ConfigError(f"mixture.temperature must be > 0, got {temperature}")
        raw = {c: h ** (1.0 / temperature) for c, h in hours.items()}
    else:
        raise ConfigError(f"mixture.weighting: unknown scheme {scheme!r}")
    total = sum(raw.values())
    if total <= 0:
        raise ConfigError("mixture: all culture weights are zero")
    return {c: w / total for c, w in raw.items()}


class MixtureSpec(StrictModel):
    """Which cultures a crop is drawn from and how often.

    ``replay`` values are absolute fractions of crops (their sum must be < 1); ``sources`` share the rest. With
    ``weighting="explicit"`` the ``sources`` values are relative weights; with ``hours``/``uniform``/
    ``temperature`` the values are ignored and the weights come from the prepared hours of those cultures.
    ``MixtureSpec(sources={"turkish": 0.4, "chinese": 0.4}, replay={"western": 0.2})``: 40/40/20 %.
    """

    sources: dict[str, float]
    replay: dict[str, float] = {}
    weighting: Literal["explicit", "hours", "uniform", "temperature"] = "explicit"
    temperature: float = Field(1.0, gt=0.0)

    @field_validator("sources", "replay")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for culture, w in value.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {culture!r} must be finite and >= 0, got {w}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MixtureSpec:
        if not self.sources:
            raise ValueError("sources: at least one culture is required")
        if self.weighting == "explicit" and sum(self.sources.values()) <= 0:
            raise ValueError("sources: weights sum to 0")
        total_replay = sum(self.replay.values())
        if total_replay >= 1:
            raise ValueError(f"replay: fractions sum to {total_replay:g}; must be < 1")
        both = set(self.sources) & set(self.replay)
        if both:
            raise ValueError(f"cultures in both sources and replay: {sorted(both)}")
        return self

    def probabilities(self, hours: dict[str, float]) -> dict[str, float]:
        """Per-culture crop probabilities given the available hours per culture."""
        missing = [c for c in (*self.sources, *self.replay) if c not in hours]
        if missing:
            raise ConfigError(
                f"mixture: culture(s) {missing} not in the prepared data (available: {sorted(hours)})"
            )
        empty = [c for c in (*self.sources, *self.replay) if hours[c] <= 0]
        if empty:
            raise ConfigError(f"mixture: culture(s) {empty} have no usable crops")
        if self.weighting == "explicit":
            total = sum(self.sources.values())
            src = {c: w / total for c, w in self.sources.items()}
        else:
            src = mixture_weights({c: hours[c] for c in self.sources}, self.weighting, self.temperature)  # type: ignore[arg-type]
        replay_total = sum(self.replay.values())
        probs = {c: p * (1 - replay_total) for c, p in src.items()}
        probs.update(self.replay)
        return probs


@dataclass
class CropPlan:
    """The crops of one batch: which dataset/item and where (sample start on the 320 grid)."""

    dataset: np.ndarray
    item: np.ndarray
    start: np.ndarray
    culture: list[str]


class MixtureLoader:
    """Fixed-length, label-aligned crops mixed across cultures; batch k is a pure function of (seed, rank, k).

    Returns ``{"wav": float32 [B, L], "codes": int64 [B, n_codebooks, L // 320], "culture": list[str],
    "length": int64 [B] (valid samples), "step": k}``. Crop starts are multiples of 320 so codes[:, :, j]
    belongs to wav[:, 320j : 320j + 320]. Within a culture, crops are uniform over all grid positions of all
    items (times the manifest weight), i.e. every second of audio is equally likely.

    ``short_items="skip"`` (default) never draws items shorter than the crop; ``"pad"`` also draws them, zero-pads
    the audio and fills missing label frames with ``PAD_CODE`` (-1). Under torch.distributed each rank passes its
    ``rank`` and gets its own stream; ``batch_size`` is per rank.
    """

    def __init__(
        self,
        datasets: Sequence[PreparedDataset | str | os.PathLike] | PreparedDataset | str | os.PathLike,
        mixture: MixtureSpec | None = None,
        *,
        batch_size: int = 8,
        crop_samples: int = DEFAULT_CROP_SAMPLES,
        seed: int = 0,
        rank: int = 0,
        split: str | None = "train",
        short_items: Literal["skip", "pad"] = "skip",
    ):
        if isinstance(datasets, (PreparedDataset, str, os.PathLike)):
            datasets = [datasets]
        self.datasets = [d if isinstance(d, PreparedDataset) else PreparedDataset(d) for d in datasets]
        if not self.datasets:
            raise ConfigError("MixtureLoader: no datasets")
        if crop_samples <= 0 or crop_samples % HOP_LENGTH:
            raise ConfigError(f"crop_samples must be a positive multiple of {HOP_LENGTH}, got {crop_samples}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if short_items not in ("skip", "pad"):
            raise ConfigError(f"short_items must be 'skip' or 'pad', got {short_items!r}")
        check_same_teacher(self.datasets)
        first = self.datasets[0]
        self.n_codebooks = first.n_codebooks
        self.crop_samples = crop_samples
        self.crop_frames = crop_samples // HOP_LENGTH
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = int(rank)
        self.short_items = short_items

        ds_idx, item_idx, cultures, positions, weights = [], [], [], [], []
        for d_i, d in enumerate(self.datasets):
            keep = np.ones(len(d), bool) if split is None else (d.split == split)
            keep &= d.weight > 0
            if short_items == "skip":
                keep &= d.length >= crop_samples
            idx = np.flatnonzero(keep)
            n_pos = np.maximum((d.length[idx] - crop_samples) // HOP_LENGTH + 1, 1)
            # a short (padded) item counts in proportion to its real audio so seconds stay equally likely
            frac = np.minimum(d.length[idx] / crop_samples, 1.0)
            ds_idx.append(np.full(idx.size, d_i))
            item_idx.append(idx)
            cultures.append(d.culture[idx])
            positions.append(n_pos)
            weights.append(d.weight[idx] * np.where(d.length[idx] >= crop_samples, n_pos, frac))
        culture_all = np.concatenate(cultures) if cultures else np.zeros(0, object)
        order = np.argsort(culture_all, kind="stable")  # group items by culture
        self._ds = np.concatenate(ds_idx)[order]
        self._item = np.concatenate(item_idx)[order]
        self._positions = np.concatenate(positions)[order]
        item_weights = np.concatenate(weights)[order]
        culture_sorted = culture_all[order]
        names, starts = np.unique(culture_sorted, return_index=True)
        self.culture_names: list[str] = [str(c) for c in names]
        bounds = np.append(starts, culture_sorted.size)
        self._cum = np.concatenate([[0.0], np.cumsum(item_weights)])
        self._lo = self._cum[bounds[:-1]]
        self._hi = self._cum[bounds[1:]]
        self._first = bounds[:-1]
        self._last = bounds[1:] - 1
        crop_hours = {
            c: float(item_weights[bounds[i] : bounds[i + 1]].sum()) for i, c in enumerate(self.culture_names)
        }
        if mixture is None:
            probs = mixture_weights(crop_hours, "hours")
        else:
            probs = mixture.probabilities(crop_hours)
        self.culture_probabilities = {c: float(p) for c, p in probs.items() if p > 0}
        self._active = np.array([self.culture_names.index(c) for c in self.culture_probabilities], dtype=np.int64)
        p = np.array(list(self.culture_probabilities.values()), dtype=np.float64)
        self._p = p / p.sum()
        if not self.culture_probabilities:
            raise DataError(f"no items of at least {crop_samples} samples in split {split!r}")

    def state_dict(self, step: int) -> dict[str, int]:
        """Everything needed to continue at ``step``: the loader has no other hidden state."""
        return {"seed": self.seed, "rank": self.rank, "step": int(step)}

    def plan(self, step: int) -> CropPlan:
        """Which crops batch ``step`` contains (vectorised draws from a generator seeded by (seed, rank, step))."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, int(step)]))
        which = self._active[rng.choice(self._active.size, size=self.batch_size, p=self._p)]
        u, v = rng.random(self.batch_size), rng.random(self.batch_size)
        target = self._lo[which] + u * (self._hi[which] - self._lo[which])
        row = np.searchsorted(self._cum, target, side="right") - 1
        row = np.clip(row, self._first[which], self._last[which])
        position = np.minimum((v * self._positions[row]).astype(np.int64), self._positions[row] - 1)
        return CropPlan(
            dataset=self._ds[row],
            item=self._item[row],
            start=position * HOP_LENGTH,
            culture=[self.culture_names[c] for c in which],
        )

    def batch(self, step: int) -> dict[str, Any]:
        """Batch number ``step`` as numpy arrays (see the class docstring)."""
        plan = self.plan(step)
        B, L, T = self.batch_size, self.crop_samples, self.crop_frames
        wav = np.empty((B, L), dtype=np.float32)  # every element is written below (copy or padding)
        codes = np.empty((B, self.n_codebooks, T), dtype=np.int64)
        length = np.empty(B, dtype=np.int64)
        for b in range(B):
            d = self.datasets[plan.dataset[b]]
            i = int(plan.item[b])
            start = int(plan.start[b])
            audio = d.audio(i)[start : start + L]
            int16_to_float(audio, out=wav[b, : audio.size])
            frames = d.codes(i)[:, start // HOP_LENGTH : start // HOP_LENGTH + T]
            codes[b, :, : frames.shape[1]] = frames
            if audio.size < L:  # only with short_items="pad"
                wav[b, audio.size :] = 0.0
                codes[b, :, frames.shape[1] :] = PAD_CODE
            length[b] = audio.size
        return {"wav": wav, "codes": codes, "culture": plan.culture, "length": length, "step": int(step)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iterate()

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, Any]]:
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


#: Alias: the crop sampler is the loader's ``plan``; kept for the name used in the design notes.


class _StepDataset:
    """Map-style torch dataset whose index is the step: DataLoader workers compute whole batches."""

    def __init__(self, loader: MixtureLoader):
        self.loader = loader

    def __getitem__(self, step: int) -> dict[str, Any]:
        import torch

        batch = self.loader.batch(step)
        return {
            "wav": torch.from_numpy(batch["wav"]),
            "codes": torch.from_numpy(batch["codes"]),
            "length": torch.from_numpy(batch["length"]),
            "culture": batch["culture"],
            "step": batch["step"],
        }


def torch_loader(
    loader: MixtureLoader,
    *,
    start_step: int = 0,
    num_steps: int | None = None,
    num_workers: int = 4,
    pin_memory: bool = True,
    prefetch_factor: int = 4,
) -> Iterable[dict[str, Any]]:
    """A torch DataLoader yielding batches ``start_step, start_step + 1, ...`` in order, built by workers.

    Resuming mid-epoch is ``torch_loader(loader, start_step=saved_step)``: the batches equal those an
    uninterrupted run would have seen.
    """
    import itertools

    import torch

    steps: Iterable[int] = itertools.count(start_step) if num_steps is None else range(start_step, start_step + num_steps)
    return torch.utils.data.DataLoader(
        _StepDataset(loader),  # type: ignore[arg-type]
        batch_size=None,
        sampler=steps,  # type: ignore[arg-type]
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
    )
