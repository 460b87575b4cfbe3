"""Embedding throughput: batched windows vs one window per forward pass, and the cost of a cached re-run.

Synthesises N noise tracks, embeds them with a randomly initialised preset model (no weights needed) three
times in one run: batch 1 (cold cache), batch B (cold cache), batch B again (warm cache: no model call).

    python bench/embed.py                          # small preset, 24 tracks of 12 s, 5 s windows
    python bench/embed.py --preset mert-v1-95m --tracks 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def main(argv: list[str] | None = None) -> int:
    from culturemert.evaluate.embed import EmbedSettings, load_encoder, embed_tracks, tracks_from_paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tracks", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(args.tracks):
            sf.write(root / f"t{i:03d}.wav", (rng.normal(size=int(args.seconds * 24000)) * 0.1).astype(np.float32), 24000)
        tracks = tracks_from_paths([root])
        audio_s = args.tracks * args.seconds
        rows = []
        for label, batch, cache in (("batch 1, cold", 1, "c1"), (f"batch {args.batch}, cold", args.batch, "c2"),
                                    (f"batch {args.batch}, cached", args.batch, "c2")):
            settings = EmbedSettings(window=args.window, batch_size=batch, device=args.device, group_tracks=args.batch)
            extractor = load_encoder(f"preset:{args.preset}", settings)
            t0 = time.perf_counter()
            report = embed_tracks(extractor, tracks, root / cache, settings, progress=False)
            elapsed = time.perf_counter() - t0
            rows.append((label, elapsed, report.model_calls))
            print(f"{label:22s}: {elapsed:7.2f} s, {audio_s / elapsed:8.1f} x real time, {report.model_calls} model calls")
        print(f"batched vs one window at a time: {rows[0][1] / rows[1][1]:.2f}x; cached re-run: {rows[1][1] / rows[2][1]:.0f}x faster")
    print("reproduce: python bench/embed.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
