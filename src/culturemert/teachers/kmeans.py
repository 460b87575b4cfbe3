"""A k-means teacher on log-mel frames (MERT-v0 style): fitted per corpus, saved as safetensors + JSON."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from culturemert.label_grid import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, label_frames
from culturemert.audio import mel_filterbank
from culturemert.files import atomic_write_bytes
from culturemert.errors import CheckpointError, ConfigError, DataError, UserError
from culturemert.runtime import resolve_device
from culturemert.teachers.base import BatchedTeacher, array_fingerprint, as_batch

logger = logging.getLogger(__name__)


class KMeansTeacher(BatchedTeacher):
    """Residual k-means codes of standardised log-mel frames on the 75 Hz label grid (needs no weights).

    Features: a Hann-windowed ``n_fft``-point power spectrum every 320 samples, ``n_mels`` HTK-mel bands,
    ``log(mel + log_floor)``. Frame ``i`` is centred at sample ``320 i + center_offset`` (default 200, the centre
    of conv frame ``i``, which spans ``[320 i, 320 i + 400)``); the signal is zero-padded at both ends, so a clip
    of ``L`` samples has ``ceil(L / 320)`` frames. Features are standardised with corpus mean/std, then codebook
    0 quantises them and codebook ``c`` quantises the residual left by codebooks ``0..c-1``.

    Persistence is pickle-free, one file: ``save(path)`` writes centroids, mean, std and a JSON description
    (feature settings, seed) as ``.npz`` or ``.safetensors``; ``load(path)`` rebuilds the teacher from it.
    """

    name = "kmeans"
    DEFAULT_FILE = "kmeans_teacher.npz"
    FORMAT = "culturemert.kmeans_teacher"
    VERSION = 1

    def __init__(
        self,
        n_codebooks: int = 1,
        codebook_size: int = 500,
        n_fft: int = 1024,
        n_mels: int = 64,
        f_min: float = 30.0,
        f_max: float | None = None,
        center_offset: int = 200,
        log_floor: float = 1e-6,
        seed: int = 0,
        device: str | torch.device | None = "cpu",
        batch_size: int = 16,
    ) -> None:
        if n_codebooks < 1:
            raise ConfigError(f"kmeans teacher: n_codebooks must be >= 1, got {n_codebooks}")
        if not 2 <= codebook_size <= np.iinfo(np.int16).max + 1:
            raise ConfigError(f"kmeans teacher: codebook_size must be in [2, 32768], got {codebook_size}")
        f_max = SAMPLE_RATE / 2 if f_max is None else float(f_max)
        if not 0 <= f_min < f_max <= SAMPLE_RATE / 2:
            raise ConfigError(f"kmeans teacher: need 0 <= f_min < f_max <= {SAMPLE_RATE / 2}, got {f_min}, {f_max}")
        self.n_codebooks = int(n_codebooks)
        self.codebook_size = int(codebook_size)
        self.n_fft = int(n_fft)
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = f_max
        self.center_offset = int(center_offset)
        self.log_floor = float(log_floor)
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.path: Path | None = None
        self.n_frames_fitted = 0
        self._mel = mel_filterbank(SAMPLE_RATE, self.n_fft, self.n_mels, self.f_min, self.f_max)
        self._window = torch.hann_window(self.n_fft, periodic=True)
        self.centroids: np.ndarray | None = None  # float32 [n_codebooks, codebook_size, n_mels]
        self.mean: np.ndarray | None = None  # float32 [n_mels]
        self.std: np.ndarray | None = None  # float32 [n_mels]

    # -- features -------------------------------------------------------------------------------------------

    def features(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-mel frames ``[B, ceil(L / 320), n_mels]`` (float32, on ``self.device``) of ``[B, L]`` audio."""
        x = as_batch(wav).to(self.device)
        batch, length = x.shape
        frames = label_frames(length)
        if frames == 0:
            return x.new_zeros(batch, 0, self.n_mels)
        # frame i covers [320 i + center_offset - n_fft/2, ... + n_fft); negative pads crop
        left = self.n_fft // 2 - self.center_offset
        total = HOP_LENGTH * (frames - 1) + self.n_fft
        x = nn.functional.pad(x, (left, total - left - length))
        windows = x.unfold(-1, self.n_fft, HOP_LENGTH) * self._window.to(x.device)
        power = torch.fft.rfft(windows, dim=-1).abs().square()
        return torch.log(power @ self._mel.to(x.device) + self.log_floor)

    # -- fitting --------------------------------------------------------------------------------------------

    def fit(
        self,
        waveforms: Iterable[np.ndarray | torch.Tensor],
        n_frames_max: int = 100_000,
        seed: int | None = None,
    ) -> KMeansTeacher:
        """Fit standardisation and residual k-means on a uniform sample of at most ``n_frames_max`` frames.

        ``waveforms`` yields 1-D clips (or ``[B, L]`` batches) at 24 kHz; it is read once (reservoir sampling),
        so it may be a generator over a large corpus. The same clips and seed give the same codebooks.
        """
        from sklearn.cluster import MiniBatchKMeans

        if seed is not None:
            self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        reservoir = np.empty((n_frames_max, self.n_mels), dtype=np.float32)
        seen = 0
        for wav in waveforms:
            feats = self.features(wav).reshape(-1, self.n_mels).cpu().numpy()
            # fill the reservoir, then replace a uniformly random slot with probability n_frames_max / (t + 1)
            fill = min(len(feats), max(0, n_frames_max - seen))
            reservoir[seen : seen + fill] = feats[:fill]
            rest = feats[fill:]
            if len(rest):
                positions = np.arange(seen + fill, seen + len(feats))
                slots = rng.integers(0, positions + 1)
                chosen = np.flatnonzero(slots < n_frames_max)
                # when a slot is drawn twice, the later frame wins (sequential reservoir semantics)
                last_of_slot = {int(slots[i]): i for i in chosen}
                if last_of_slot:
                    reservoir[list(last_of_slot)] = rest[list(last_of_slot.values())]
            seen += len(feats)
        sample = reservoir[: min(seen, n_frames_max)]
        if len(sample) < self.codebook_size:
            raise DataError(
                f"kmeans teacher: {len(sample)} frames ({len(sample) / FRAME_RATE:.1f} s of audio) are too few to fit "
                f"{self.codebook_size} centroids; give it more audio or a smaller codebook_size"
            )
        mean = sample.mean(axis=0, dtype=np.float64)
        std = sample.std(axis=0, dtype=np.float64)
        std = np.maximum(std, 1e-5 * max(float(std.max()), 1e-12))
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        residual = (sample - self.mean) / self.std
        centroids = []
        for book in range(self.n_codebooks):
            kmeans = MiniBatchKMeans(
                n_clusters=self.codebook_size,
                random_state=self.seed + book,
                batch_size=min(4096, len(residual)),
                n_init=3,
                max_iter=100,
            )
            kmeans.fit(residual.astype(np.float64))
            book_centroids = kmeans.cluster_centers_.astype(np.float32)
            centroids.append(book_centroids)
            assignment = self._nearest(torch.from_numpy(residual), torch.from_numpy(book_centroids)).numpy()
            residual = residual - book_centroids[assignment]
        self.centroids = np.stack(centroids)
        self.n_frames_fitted = len(sample)
        self.path = None
        logger.info("kmeans teacher fitted on %d of %d frames", len(sample), seen)
        return self

    @staticmethod
    def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid (squared Euclidean) for each row of ``points``."""
        scores = points @ centroids.T * -2.0 + centroids.square().sum(dim=1)
        return scores.argmin(dim=1)

    # -- encoding -------------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        """Whether codebooks exist (after :meth:`fit` or :meth:`load`)."""
        return self.centroids is not None and self.mean is not None and self.std is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise UserError("kmeans teacher is not fitted: call fit(...) or load it with KMeansTeacher.load(path)")

    def encode(self, wav: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[B, L]`` float32 audio at 24 kHz -> int16 codes ``[B, n_codebooks, ceil(L / 320)]``."""
        self._require_fitted()
        x = as_batch(wav)
        mean = torch.from_numpy(self.mean).to(self.device)
        std = torch.from_numpy(self.std).to(self.device)
        centroids = torch.from_numpy(self.centroids).to(self.device)
        outputs = []
        for chunk in x.split(self.batch_size):
            feats = self.features(chunk)
            batch, frames, _ = feats.shape
            residual = ((feats - mean) / std).reshape(-1, self.n_mels)
            codes = []
            for book in range(self.n_codebooks):
                assignment = self._nearest(residual, centroids[book])
                residual = residual - centroids[book][assignment]
                codes.append(assignment)
            stacked = torch.stack(codes, dim=0).reshape(self.n_codebooks, batch, frames).permute(1, 0, 2)
            outputs.append(stacked.to(torch.int16).cpu())
        if not outputs:
            return np.zeros((0, self.n_codebooks, label_frames(x.shape[1])), dtype=np.int16)
        return torch.cat(outputs).numpy()

    def fingerprint(self) -> str:
        """sha256 of what decides the codes: feature settings, sizes, and the fitted centroids, mean and std
        (float32). The seed, the frame count of the fit and the file path are left out: a teacher saved and
        reloaded anywhere keeps its fingerprint; a teacher fitted on other audio gets another one.

        Raises:
            UserError: the teacher is not fitted.
        """
        self._require_fitted()
        meta = self._meta()
        identity = {k: meta[k] for k in ("name", "n_codebooks", "codebook_size", "sample_rate", "hop_length", "features")}
        arrays = {
            "centroids": np.asarray(self.centroids, np.float32),
            "mean": np.asarray(self.mean, np.float32),
            "std": np.asarray(self.std, np.float32),
        }
        return array_fingerprint(identity, arrays)

    # -- persistence ----------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "name": self.name,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "frame_rate": self.frame_rate,
            "features": {
                "kind": "log_mel",
                "n_fft": self.n_fft,
                "n_mels": self.n_mels,
                "f_min": self.f_min,
                "f_max": self.f_max,
                "center_offset": self.center_offset,
                "log_floor": self.log_floor,
            },
            "seed": self.seed,
            "n_frames_fitted": self.n_frames_fitted,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted teacher to one pickle-free file and return its path.

        ``*.safetensors`` gives a safetensors file (metadata JSON in its header); any other file name an
        ``.npz`` whose ``meta_json`` entry is a plain string array; a directory (existing, or a name without
        suffix) gets ``kmeans_teacher.npz`` inside. Arrays: ``centroids`` [n_codebooks, codebook_size, n_mels],
        ``mean`` and ``std`` [n_mels], float32. The write is atomic.
        """
        self._require_fitted()
        target = Path(path)
        if target.is_dir() or not target.suffix:
            target = target / self.DEFAULT_FILE
        arrays = {"centroids": self.centroids, "mean": self.mean, "std": self.std}
        meta_json = json.dumps(self._meta(), sort_keys=True)
        if target.suffix == ".safetensors":
            from safetensors.numpy import save as save_safetensors

            payload = save_safetensors(
                {k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={self.FORMAT: meta_json}
            )
        else:
            buffer = io.BytesIO()
            np.savez(buffer, meta_json=np.array(meta_json), **arrays)
            payload = buffer.getvalue()
        atomic_write_bytes(target, payload)
        self.path = target.resolve()
        return self.path

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device | None = "cpu", batch_size: int = 16
    ) -> KMeansTeacher:
        """Load a teacher written by :meth:`save`: its file, or a directory holding exactly one of
        ``kmeans_teacher.npz`` / ``kmeans.safetensors`` (the name ``prepare`` uses in ``DIR/teacher/``).

        The file must describe itself completely and agree with its arrays: ``centroids`` [n_codebooks,
        codebook_size, n_mels], ``mean`` / ``std`` [n_mels], finite, ``std > 0``, no other arrays, and the 24 kHz /
        320-sample / log-mel settings this version computes.

        Raises:
            CheckpointError: a missing, unreadable or inconsistent file, one line naming it and the disagreement.
        """
        source = Path(path)
        if source.is_dir():
            candidates = [source / name for name in (cls.DEFAULT_FILE, "kmeans.safetensors") if (source / name).is_file()]
            if len(candidates) > 1:
                raise CheckpointError(
                    f"{source}: holds both {candidates[0].name} and {candidates[1].name}; pass the teacher file itself"
                )
            source = candidates[0] if candidates else source / cls.DEFAULT_FILE
        try:
            raw = source.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"kmeans teacher not found or unreadable: {source}: {exc}") from exc
        try:
            if raw[:4] == b"PK\x03\x04":  # zip magic: npz
                with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                    meta = json.loads(str(archive["meta_json"][()]))
                    arrays = {key: archive[key] for key in archive.files if key != "meta_json"}
            else:
                from safetensors.numpy import load as load_safetensors

                header_size = int.from_bytes(raw[:8], "little")
                header = json.loads(raw[8 : 8 + header_size])
                meta = json.loads(header.get("__metadata__", {})[cls.FORMAT])
                arrays = load_safetensors(raw)
        except Exception as exc:  # truncated zip, bad CRC, foreign file, missing keys
            raise CheckpointError(
                f"{source}: not a readable culturemert kmeans teacher ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(meta, dict) or meta.get("format") != cls.FORMAT or meta.get("version") != cls.VERSION:
            found = meta if isinstance(meta, dict) else {}
            raise CheckpointError(
                f"{source}: not a culturemert kmeans teacher (format {found.get('format')!r}, version "
                f"{found.get('version')!r}; expected {cls.FORMAT!r} version {cls.VERSION})"
            )
        try:
            features = meta["features"]
            grid = (meta["name"], meta["sample_rate"], meta["hop_length"], float(meta["frame_rate"]), features["kind"])
            teacher = cls(
                n_codebooks=meta["n_codebooks"],
                codebook_size=meta["codebook_size"],
                n_fft=features["n_fft"],
                n_mels=features["n_mels"],
                f_min=features["f_min"],
                f_max=features["f_max"],
                center_offset=features["center_offset"],
                log_floor=features["log_floor"],
                seed=meta["seed"],
                device=device,
                batch_size=batch_size,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: kmeans teacher metadata incomplete ({type(exc).__name__}: {exc})") from None
        except ConfigError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        if grid != (cls.name, SAMPLE_RATE, HOP_LENGTH, float(FRAME_RATE), "log_mel"):
            raise CheckpointError(
                f"{source}: teacher {grid[0]!r} at {grid[1]} Hz / hop {grid[2]} / {grid[3]} Hz / features {grid[4]!r}; "
                f"this version computes {cls.name!r} at {SAMPLE_RATE} Hz / hop {HOP_LENGTH} / {FRAME_RATE} Hz / 'log_mel'"
            )
        extra = sorted(set(arrays) - {"centroids", "mean", "std"})
        missing = sorted({"centroids", "mean", "std"} - set(arrays))
        if extra or missing:
            raise CheckpointError(
                f"{source}: arrays {sorted(arrays)} do not match a kmeans teacher (missing {missing}, "
                f"not described by its metadata {extra})"
            )
        centroids, mean, std = arrays["centroids"], arrays["mean"], arrays["std"]
        expected = (teacher.n_codebooks, teacher.codebook_size, teacher.n_mels)
        if centroids.shape != expected or mean.shape != (teacher.n_mels,) or std.shape != (teacher.n_mels,):
            raise CheckpointError(
                f"{source}: array shapes {centroids.shape}, {mean.shape}, {std.shape} do not match its metadata "
                f"(centroids {expected})"
            )
        if not all(np.isfinite(a).all() for a in (centroids, mean, std)) or not (std > 0).all():
            raise CheckpointError(f"{source}: centroids, mean or std hold NaN/inf values or a std <= 0")
        teacher.centroids = centroids.astype(np.float32)
        teacher.mean, teacher.std = mean.astype(np.float32), std.astype(np.float32)
        teacher.n_frames_fitted = int(meta.get("n_frames_fitted", 0))
        teacher.path = source.resolve()
        return teacher

    def state(self) -> dict[str, Any]:
        return self._meta() | {"path": str(self.path) if self.path is not None else None}
