"""Embedding speed of two encoders with different input rates on the same audio, and the cost of a cached re-run.

Synthesises N noise tracks at 44.1 kHz (so both encoders resample), then embeds them with

* a randomly initialised MERT preset (24 kHz input, 75 Hz frames), and
* a randomly initialised wav2vec 2.0 of the same width and depth built from a transformers config and saved
  with ``save_pretrained`` (16 kHz input, 50 Hz frames),

each twice into one cache: cold (every track computed) and warm (every track a cache hit: no model forward).
Prints per encoder the real-time factor (embedding wall time per second of audio; lower is faster), the
speed in x real time, the forward-pass share, peak memory, and the warm re-run's time and model calls.

    python bench/encoders.py                          # 12 tracks of 10 s, small preset, 5 s windows
    python bench/encoders.py --preset mert-v1-95m --tracks 16 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers as T

    from culturemert.evaluate.embed import EmbedSettings, load_encoder, embed_tracks, tracks_from_paths
    from culturemert.model import preset_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="MERT preset; the wav2vec 2.0 copies its width and depth")
    ap.add_argument("--tracks", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=None, help="windows per forward (default: 1 on CPU, 16 on CUDA)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(args.tracks):
            sf.write(root / f"t{i:03d}.wav", (rng.normal(size=int(args.seconds * 44_100)) * 0.1).astype(np.float32), 44_100)
        tracks = tracks_from_paths(sorted(root.glob("*.wav")))
        backbone, _ = preset_config(args.preset)
        torch.manual_seed(0)
        w2v_config = T.Wav2Vec2Config(
            hidden_size=backbone.hidden_size, num_hidden_layers=backbone.num_hidden_layers,
            num_attention_heads=backbone.num_attention_heads, intermediate_size=backbone.intermediate_size,
            conv_dim=backbone.conv_dim, conv_kernel=backbone.conv_kernel, conv_stride=backbone.conv_stride,
            num_conv_pos_embeddings=backbone.num_conv_pos_embeddings,
            num_conv_pos_embedding_groups=backbone.num_conv_pos_embedding_groups,
        )
        T.Wav2Vec2Model(w2v_config).eval().save_pretrained(root / "wav2vec2")
        settings = EmbedSettings(window=args.window, batch_size=args.batch, device=args.device)
        print(f"{args.tracks} tracks x {args.seconds:g} s at 44.1 kHz, {args.window:g} s windows, device {args.device}")
        for spec in (f"preset:{args.preset}", str(root / "wav2vec2")):
            enc = load_encoder(spec, settings)
            cold = embed_tracks(enc, tracks, root / "cache", settings, progress=False)
            warm = embed_tracks(load_encoder(spec, settings), tracks, root / "cache", settings, progress=False)
            label = f"{enc.family} ({enc.sample_rate / 1000:g} kHz, {enc.frame_rate:g} Hz, {enc.num_hidden_states} states)"
            print(f"{label:38s} cold: RTF {cold.real_time_factor:.4f} ({1 / cold.real_time_factor:6.1f} x real time), "
                  f"forward {100 * cold.forward_seconds / cold.seconds:3.0f} % of {cold.seconds:.2f} s, "
                  f"peak {cold.peak_memory_bytes / 2**20:.0f} MiB ({cold.memory_kind}); "
                  f"re-run: {warm.seconds:.3f} s, {warm.cached}/{len(tracks)} cached, {warm.model_calls} model calls")
    print("reproduce: python bench/encoders.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
