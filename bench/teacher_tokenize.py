"""Benchmark: batched teacher encoding (``encode_many``) vs encoding one clip at a time.

Default teacher: a randomly initialised EnCodec with the full 24 kHz architecture (same compute as
facebook/encodec_24khz, no download), 6 kbps -> 8 codebooks. Clips have slightly different lengths (5 s minus up to
0.2 s), as real files do, so the batched path pads. Prints clips/s both ways, the ratio, and whether the codes agree
(all frames but each clip's last, which EnCodec may reflect-pad differently).

(Named teacher_tokenize.py, not tokenize.py: a bench/tokenize.py would shadow the standard library's ``tokenize``
module for every script run from bench/ and break ``import torch`` there.)

Reproduce:
    OMP_NUM_THREADS=2 python bench/teacher_tokenize.py --clips 16 --seconds 5 --batch-size 8 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from culturemert.teachers import EncodecTeacher, KMeansTeacher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=["encodec", "kmeans"], default="encodec")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    base = int(args.seconds * 24000)
    lengths = [base - int(rng.integers(0, 4800)) for _ in range(args.clips)]
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]

    if args.teacher == "encodec":
        from transformers import EncodecConfig, EncodecModel

        torch.manual_seed(0)
        teacher = EncodecTeacher(EncodecModel(EncodecConfig()), bandwidth=6.0, device=args.device,
                                 batch_size=args.batch_size)
    else:
        teacher = KMeansTeacher(codebook_size=64, device=args.device, batch_size=args.batch_size)
        teacher.fit(clips, n_frames_max=5000)

    teacher.encode(clips[0][None, :24000])  # warm-up
    # alternate the two ways and keep each one's best round: other processes' load hits both alike
    single_s = batched_s = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        singles = [teacher.encode(clip[None])[0] for clip in clips]
        single_s = min(single_s, time.perf_counter() - start)
        start = time.perf_counter()
        batched = teacher.encode_many(clips, batch_size=args.batch_size)
        batched_s = min(batched_s, time.perf_counter() - start)

    same = all(np.array_equal(a[:, :-1], b[:, :-1]) and a.shape == b.shape for a, b in zip(singles, batched))
    print(f"{args.teacher} teacher, {args.clips} clips x ~{args.seconds:g} s, batch {args.batch_size}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"one at a time: {args.clips / single_s:.2f} clips/s ({single_s:.2f} s)   "
          f"batched: {args.clips / batched_s:.2f} clips/s ({batched_s:.2f} s)   "
          f"ratio {single_s / batched_s:.2f}x   codes agree (all but last frame): {same}")
    print(f"reproduce: OMP_NUM_THREADS={torch.get_num_threads()} python bench/teacher_tokenize.py "
          f"--teacher {args.teacher} --clips {args.clips} --seconds {args.seconds:g} --batch-size {args.batch_size} "
          f"--device {args.device} --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
