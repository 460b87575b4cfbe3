"""Loader throughput: prepared int16 shards (MixtureLoader) vs. decoding the original files per clip.

Makes a synthetic corpus of 44.1 kHz stereo FLAC and MP3 files, prepares it once (not timed), then measures
5-s clips/s, side by side in one run, for:
  * prepared:     MixtureLoader.batch (mmap + grid-aligned crop + int16->float32, codes gathered too), in steady
                  state after --warmup-batches untimed batches (the cold figure is printed as well)
  * decode-seek:  per clip, open the original file, seek to a random 5-s window, read it, downmix, soxr to 24 kHz
  * decode-whole: per clip, decode the whole original file, downmix, resample, crop (MERT's dataset does this)

Reproduce:  OMP_NUM_THREADS=1 python bench/loader.py [--files 12 --file-seconds 30 --batches 50 --batch-size 64]
Add --torch-workers N to also time torch_loader (N worker processes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from culturemert.label_grid import HOP_LENGTH, SAMPLE_RATE
from culturemert.data import MixtureLoader, prepare, torch_loader

CROP = 120_000


class FrameSumTeacher:
    """Cheap stand-in for EnCodec (prepare is not what is timed): codes from per-frame sample sums."""

    name = "bench-frame-sum"
    n_codebooks = 8
    codebook_size = 1024
    frame_rate = 75.0
    sample_rate = SAMPLE_RATE

    def encode(self, wav):
        wav = np.asarray(wav, dtype=np.float32)
        B, L = wav.shape
        T = -(-L // HOP_LENGTH)
        padded = np.zeros((B, T * HOP_LENGTH), np.int64)
        padded[:, :L] = np.rint(wav * 32768)
        sums = padded.reshape(B, T, HOP_LENGTH).sum(axis=2)
        return np.stack([(sums // (3 + k)) % 1024 for k in range(8)], axis=1).astype(np.int16)

    def state(self):
        return {}


def make_corpus(root: Path, n_files: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    sr = 44100
    lines = ["path,culture"]
    for k in range(n_files):
        t = np.arange(int(seconds * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * (110 + 37 * k) * t) + 0.03 * rng.standard_normal(t.size)
        stereo = np.stack([x, 0.8 * x], axis=1).astype(np.float32)
        name = f"f{k:03d}.flac" if k % 2 == 0 else f"f{k:03d}.mp3"
        sf.write(root / name, stereo, sr, format="FLAC" if k % 2 == 0 else "MP3")
        lines.append(f"{name},{'a' if k % 3 else 'b'}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def decode_seek(path: Path, rng: np.random.Generator) -> np.ndarray:
    with sf.SoundFile(str(path)) as f:
        need = int(np.ceil(CROP * f.samplerate / SAMPLE_RATE))
        start = int(rng.integers(0, max(1, f.frames - need)))
        f.seek(start)
        x = f.read(need, dtype="float32", always_2d=True).mean(axis=1)
        sr = f.samplerate
    return soxr.resample(x, sr, SAMPLE_RATE, quality="HQ")[:CROP]


def decode_whole(path: Path, rng: np.random.Generator) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    y = soxr.resample(x.mean(axis=1), sr, SAMPLE_RATE, quality="HQ")
    start = int(rng.integers(0, max(1, y.size - CROP)))
    return y[start : start + CROP]


def clips_per_second(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--file-seconds", type=float, default=30.0)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-clips", type=int, default=60)
    parser.add_argument("--warmup-batches", type=int, default=40, help="untimed batches before the steady state")
    parser.add_argument("--torch-workers", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the corpus here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        manifest = make_corpus(root, args.files, args.file_seconds)
        prepare(manifest, root / "prepared", FrameSumTeacher(), shard_seconds=120, workers=2, progress=False)
        loader = MixtureLoader(root / "prepared", batch_size=args.batch_size, crop_samples=CROP, seed=0)
        files = sorted(p for p in root.iterdir() if p.suffix in (".flac", ".mp3"))
        rng = np.random.default_rng(0)

        # Cold: the first batches of a fresh process pay page faults (mmap first touch, the allocator growing its
        # heap); on some VMs a fault costs tens of microseconds, so this is reported apart from the steady state
        # that a training run (millions of batches) lives in.
        cold = clips_per_second(
            lambda n: [loader.batch(s) for s in range(n // args.batch_size)], args.warmup_batches * args.batch_size
        )
        start = args.warmup_batches
        prepared = clips_per_second(
            lambda n: [loader.batch(s) for s in range(start, start + n // args.batch_size)], args.batches * args.batch_size
        )
        for i in range(3):  # same courtesy for the decoders: codec and resampler set-up is not timed
            decode_seek(files[i % len(files)], rng)
            decode_whole(files[i % len(files)], rng)
        seek = clips_per_second(lambda n: [decode_seek(files[i % len(files)], rng) for i in range(n)], args.decode_clips)
        whole = clips_per_second(
            lambda n: [decode_whole(files[i % len(files)], rng) for i in range(n)], max(4, args.decode_clips // 10)
        )
        print(f"corpus: {args.files} files x {args.file_seconds:g} s, 44.1 kHz stereo, half FLAC half MP3")
        print(f"prepared loader (1 process, batch {args.batch_size}), steady state: {prepared:10.0f} clips/s")
        print(f"prepared loader, first {args.warmup_batches} batches of a fresh process: {cold:10.0f} clips/s")
        print(f"per-clip decode, seek + 5 s read + resample:   {seek:10.1f} clips/s")
        print(f"per-clip decode, whole file + resample + crop: {whole:10.1f} clips/s")
        print(f"ratio prepared / decode-seek:  {prepared / seek:8.1f}x")
        print(f"ratio prepared / decode-whole: {prepared / whole:8.1f}x")
        print(f"cold-start ratios: {cold / seek:.1f}x decode-seek, {cold / whole:.1f}x decode-whole")
        if args.torch_workers:
            n_steps = args.batches
            dl = torch_loader(loader, start_step=1, num_steps=n_steps, num_workers=args.torch_workers)
            t0 = time.perf_counter()
            for _ in dl:
                pass
            rate = n_steps * args.batch_size / (time.perf_counter() - t0)
            print(f"torch_loader ({args.torch_workers} workers, incl. start-up): {rate:10.0f} clips/s")
        print("reproduce: OMP_NUM_THREADS=1 python bench/loader.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
