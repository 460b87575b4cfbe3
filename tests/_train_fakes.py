"""Synthetic music with exact teacher codes, for trainer tests (no prepared data needed)."""

from __future__ import annotations

import numpy as np

SR = 24_000
HOP = 320


class SyntheticSource:
    """Batch k is a pure function of (seed, k): tone sequences whose codes are (pitch, loudness) per frame.

    Codebook 0 = pitch class of the current note (16 notes), codebook 1 = loudness level (16 levels); notes change
    every ``frames_per_note`` frames, so the codes are learnable from the audio.
    """

    n_codebooks = 2
    codebook_size = 16
    teacher_name = "synthetic"

    def __init__(
        self, clips: int, crop_samples: int, seed: int = 0, frames_per_note: int = 6, nan_steps=(), levels: int = 16
    ):
        self.clips, self.crop, self.seed = clips, crop_samples, seed
        self.frames_per_note = frames_per_note
        self.nan_steps = set(nan_steps)
        self.levels = levels
        self.calls: list[int] = []

    def hours(self):
        return {"synthetic": 1.0}

    def batch(self, step: int) -> dict:
        self.calls.append(step)
        rng = np.random.default_rng([self.seed, step])
        frames = self.crop // HOP
        wav = np.zeros((self.clips, self.crop), np.float32)
        codes = np.zeros((self.clips, 2, frames), np.int64)
        n = np.arange(self.frames_per_note * HOP)
        for b in range(self.clips):
            phase = 0.0
            for start in range(0, frames, self.frames_per_note):
                pitch, loud = rng.integers(0, self.levels, 2)
                f = 110.0 * 2 ** (pitch * 4 / self.levels)
                amp = 0.05 + 0.5 * loud / self.levels
                seg = amp * (np.sin(2 * np.pi * f * n / SR + phase) + 0.3 * np.sin(4 * np.pi * f * n / SR))
                phase += 2 * np.pi * f * n.size / SR
                s, e = start * HOP, min((start + self.frames_per_note) * HOP, self.crop)
                wav[b, s:e] = seg[: e - s]
                codes[b, 0, start : start + self.frames_per_note] = pitch
                codes[b, 1, start : start + self.frames_per_note] = loud
        if step in self.nan_steps:
            wav[0, 100:200] = np.nan
        return {"wav": wav, "codes": codes, "culture": ["synthetic"] * self.clips}


def factory(**kwargs):
    def make(recipe, stage, index):
        return SyntheticSource(stage.global_clips(), stage.crop_samples, seed=recipe.seed + index, **kwargs)

    return make


class LevelTeacher:
    """Duck-typed teacher for ``data.prepare``: per 320-sample frame, (RMS level, zero-crossing) buckets."""

    name = "level-zc"
    n_codebooks = 2
    codebook_size = 16
    frame_rate = 75.0
    sample_rate = SR

    def state(self):
        return {"kind": "level-zc"}

    def encode(self, batch: np.ndarray) -> np.ndarray:
        b, n = batch.shape
        frames = -(-n // HOP)
        padded = np.zeros((b, frames * HOP), np.float32)
        padded[:, :n] = batch
        x = padded.reshape(b, frames, HOP)
        rms = np.sqrt((x**2).mean(-1))
        level = np.clip((rms * 40).astype(np.int64), 0, 15)
        zc = np.clip((np.abs(np.diff(np.sign(x), axis=-1)) > 0).sum(-1) // 4, 0, 15)
        return np.stack([level, zc], axis=1)


def make_prepared_dir(root, cultures=("western", "makam"), files_per_culture=2, seconds=3.0, seed=0, valid_files=0):
    """Synthetic tone files -> manifest -> ``culturemert.data.prepare`` with :class:`LevelTeacher`.

    The last ``valid_files`` files of each culture go to the ``valid`` split (held-out crops for validation).
    """
    import soundfile as sf

    from culturemert.data import prepare

    root = __import__("pathlib").Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["path,culture,split"]
    for c_i, culture in enumerate(cultures):
        for f in range(files_per_culture):
            n = int(seconds * SR)
            t = np.arange(n) / SR
            notes = rng.integers(0, 12, size=int(seconds * 4) + 1)
            freq = 110 * 2 ** (notes[(t * 4).astype(int)] / 12 + c_i * 0.5)
            amp = 0.1 + 0.4 * rng.random(notes.size)[(t * 4).astype(int)]
            wav = (amp * np.sin(2 * np.pi * np.cumsum(freq) / SR)).astype(np.float32)
            path = root / "audio" / f"{culture}-{f}.wav"
            sf.write(path, wav, SR, subtype="PCM_16")
            split = "valid" if f >= files_per_culture - valid_files else "train"
            lines.append(f"{path},{culture},{split}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = root / "prepared"
    prepare(manifest, out, LevelTeacher(), progress=False)
    return out


class CultureSource(SyntheticSource):
    """:class:`SyntheticSource` with named cultures and a held-out split, for validation tests.

    Every culture has the same audio distribution; culture ``c``'s codes are the synthetic codes plus
    ``offsets[c]`` (mod 16), so a model trained on one culture's labelling predicts another's badly: training on
    one culture only makes the others' loss rise. ``mixture`` (culture -> probability) picks each clip's culture;
    held-out batches come from a disjoint seed range.
    """

    def __init__(self, clips, crop_samples, seed=0, *, mixture, offsets, levels=4, frames_per_note=25, **kw):
        super().__init__(clips, crop_samples, seed=seed, levels=levels, frames_per_note=frames_per_note, **kw)
        self.mixture = dict(mixture)
        self.offsets = dict(offsets)
        self.held_out_calls = 0

    def hours(self):
        return {c: 1.0 for c in self.offsets}

    def _labelled(self, step: int, cultures: list[str], stream: int) -> dict:
        base = SyntheticSource.batch(self, step + stream)
        codes = base["codes"].copy()
        for b, c in enumerate(cultures):
            codes[b] = (codes[b] + self.offsets[c]) % self.codebook_size
        return {"wav": base["wav"], "codes": codes, "culture": cultures}

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, 7])
        names = sorted(self.mixture)
        p = np.array([self.mixture[n] for n in names], float)
        cultures = [names[i] for i in rng.choice(len(names), size=self.clips, p=p / p.sum())]
        return self._labelled(step, cultures, 0)

    def held_out(self, spec, crop_samples, seed):
        from culturemert.train.validation import HeldOutCulture, ValidationSet

        self.held_out_calls += 1
        cultures = {}
        for c_i, culture in enumerate(sorted(self.offsets)):
            if spec.cultures is not None and culture not in spec.cultures:
                continue
            held = CultureSource(spec.batch_clips, crop_samples, seed=10_000 + seed % 1000 + c_i, mixture={culture: 1},
                                 offsets=self.offsets, levels=self.levels, frames_per_note=self.frames_per_note)
            cultures[culture] = HeldOutCulture(culture, spec.crops_per_culture, spec.batch_clips, crop_samples,
                                               lambda k, h=held, c=culture: h._labelled(k, [c] * h.clips, 1_000_000))
        return ValidationSet(cultures, spec.split, seed)


def culture_factory(mixtures, offsets, **kwargs):
    """Stage ``i`` draws its clips' cultures from ``mixtures[i]``."""

    def make(recipe, stage, index):
        return CultureSource(stage.global_clips(), stage.crop_samples, seed=recipe.seed + index,
                             mixture=mixtures[index], offsets=offsets, **kwargs)

    return make
