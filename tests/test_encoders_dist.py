"""``embed`` under torchrun: two CPU processes (gloo) split the tracks and give the features of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_two_ranks_embed_disjoint_tracks_into_one_cache_with_single_process_features(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):  # two groups of tracks (16 + 4): one per rank
        sf.write(audio / f"t{i:02d}.wav", (rng.normal(size=int(24_000 * (0.4 + 0.05 * (i % 3)))) * 0.1).astype(np.float32),
                 24_000, subtype="FLOAT")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    args = ["embed", "preset:tiny", str(audio), "--window", "0.25", "--batch", "3", "--device", "cpu", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "culturemert.cli", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "culturemert.cli", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    for name in ("features.npy", "chunk_track.npy", "labels.npy"):
        a, b = np.load(tmp_path / "one" / "files" / name), np.load(tmp_path / "two" / "files" / name)
        assert a.shape == b.shape and np.array_equal(a, b), name  # bit-identical to one process
    index = [json.loads(line) for line in next((tmp_path / "two" / "cache").glob("*-*/index.jsonl")).read_text().splitlines()]
    by_rank = {r: {e["id"] for e in index if e["rank"] == r} for r in (0, 1)}
    assert len(by_rank[0]) == 16 and len(by_rank[1]) == 4 and not by_rank[0] & by_rank[1]  # disjoint, one model pass each
    report = json.loads((tmp_path / "two" / "files" / "embed_report.json").read_text())
    assert report["computed"] == 20 and report["world_size"] == 2
