"""Benchmark: culturemert's FFT-based MertCQT vs nnAudio CQT1992v2 with MERT's CQT parameters.

Both transforms run side by side on the same batch (default 8 clips x 5 s of music-like audio at 24 kHz: harmonic
tones with vibrato plus noise), on CPU and, when available, CUDA. Prints the median time of each, the speed ratio,
and the relative error ||ours - nnAudio|| / ||nnAudio|| (overall, and the worst bin among bins holding >= 1 % of
the largest bin's energy).

Reproduce:
    OMP_NUM_THREADS=2 python bench/cqt.py --batch 8 --seconds 5 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from culturemert.teachers import MertCQT

MERT_CQT = {
    "sr": 24000,
    "hop_length": 320,
    "fmin": 32.7,
    "n_bins": 336,
    "bins_per_octave": 48,
    "filter_scale": 1,
    "norm": 1,
    "window": "hann",
    "center": True,
    "pad_mode": "constant",
    "trainable": False,
    "output_format": "Magnitude",
}


def music_like(batch: int, num_samples: int, seed: int = 0, sample_rate: int = 24000) -> torch.Tensor:
    """Sums of three harmonic tones (7 partials, 1/h amplitudes, 5 Hz vibrato) plus white noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    clips = []
    for _ in range(batch):
        clip = torch.zeros(num_samples, dtype=torch.float64)
        for _ in range(3):
            f0 = 55.0 * 2 ** (5 * torch.rand(1, generator=gen).item())
            depth = 0.005 + 0.01 * torch.rand(1, generator=gen).item()
            inst_freq = f0 * (1 + depth * torch.sin(2 * math.pi * 5.0 * t))
            phase = 2 * math.pi * torch.cumsum(inst_freq, 0) / sample_rate
            for harmonic in range(1, 8):
                if f0 * harmonic < sample_rate / 2 - 500:
                    clip += torch.sin(harmonic * phase) / harmonic
        clip += 0.05 * torch.randn(num_samples, generator=gen, dtype=torch.float64)
        clips.append(clip)
    return (0.1 * torch.stack(clips)).float()


def time_call(fn, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(x)  # warm-up (allocations, cuFFT plans)
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args()

    try:
        from nnAudio.features.cqt import CQT1992v2
    except ImportError:
        print("nnAudio is not installed: pip install nnAudio", file=sys.stderr)
        return 1

    devices = ["cpu"] if args.device == "cpu" else (["cuda"] if args.device == "cuda" else ["cpu"])
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 1

    num_samples = int(args.seconds * 24000)
    wav = music_like(args.batch, num_samples)
    start = time.perf_counter()
    ours = MertCQT()
    build_s = time.perf_counter() - start
    reference = CQT1992v2(**MERT_CQT, verbose=False)
    print(f"batch {args.batch} x {args.seconds:g} s @ 24 kHz, torch threads {torch.get_num_threads()}, "
          f"MertCQT kernel build {build_s:.2f} s (once, cached), {ours.num_kernel_coefficients} coefficients")
    for device in devices:
        x = wav.to(device)
        ours_d, ref_d = ours.to(device), reference.to(device)
        t_ref, y_ref = time_call(ref_d, x, args.repeats)
        t_ours, y_ours = time_call(ours_d, x, args.repeats)
        rel = ((y_ours - y_ref).norm() / y_ref.norm()).item()
        bin_norm = y_ref.norm(dim=-1)
        energetic = bin_norm >= 0.01 * bin_norm.max()
        per_bin = ((y_ours - y_ref).norm(dim=-1) / bin_norm.clamp_min(1e-30))[energetic].max().item()
        print(f"[{device}] nnAudio CQT1992v2: {t_ref * 1000:.1f} ms   MertCQT: {t_ours * 1000:.1f} ms   "
              f"speed-up {t_ref / t_ours:.1f}x   rel. error {rel:.2e} (worst energetic bin {per_bin:.2e})   "
              f"shape {tuple(y_ours.shape)}")
    print(f"reproduce: OMP_NUM_THREADS={torch.get_num_threads()} python bench/cqt.py --batch {args.batch} "
          f"--seconds {args.seconds:g} --repeats {args.repeats} --device {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
