"""Time and peak memory of merging four MERT-v1-95M-size models: streaming merge vs. naive task vectors.

Writes a base and four derived models (random weights with MERT-v1-95M's shapes, fp32 safetensors) to a temp dir,
then measures, each in a fresh subprocess so that every peak RSS is clean:

* ``naive``: load all five state dicts, materialise every task vector as a full state dict, sum them;
* ``streaming-eager``: load all five state dicts, then ``culturemert.merge.merge_state_dicts`` (tensor by tensor);
* ``streaming-lazy``: ``merge_state_dicts`` over lazy mappings that read one tensor from disk on access, so only
  the output plus one tensor per input is resident.

All three run task arithmetic at λ = 0.2 (CultureMERT-TA's setting) and print a checksum of the result, which
must agree. Reproduce with:  python bench/merge.py   (add --threads N to change torch's thread count)
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

NUM_MODELS = 4
LAMBDA = 0.2
REPRODUCE = "python bench/merge.py"


def mert_95m_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of MERT-v1-95M's backbone (HubertModel), built on the meta device."""
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(
        conv_dim=[512] * 7,
        conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_bias=False,
        feat_extract_norm="group",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
    )
    with torch.device("meta"):
        model = HubertModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_inputs(directory: Path) -> list[Path]:
    from safetensors.torch import save_file

    shapes = mert_95m_shapes()
    generator = torch.Generator().manual_seed(0)
    base = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    paths = [directory / "base.safetensors"]
    save_file(base, str(paths[0]))
    for i in range(NUM_MODELS):
        # A continually pre-trained model sits close to its base.
        model = {name: t + 1e-3 * torch.randn(t.shape, generator=generator) for name, t in base.items()}
        path = directory / f"model{i}.safetensors"
        save_file(model, str(path))
        paths.append(path)
        del model
    return paths


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


class LazySafetensors(Mapping[str, torch.Tensor]):
    """Reads one tensor per access with plain file reads (no mmap, so resident memory is only what is held)."""

    def __init__(self, path: Path):
        self.path = path
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.header = header

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        # Read straight into the tensor's memory: no intermediate buffer whose lifetime we would not control.
        target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        assert target.nbytes == end - start, info
        with self.path.open("rb") as fh:
            fh.seek(self.data_start + start)
            fh.readinto(target)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process's address space, which exec() creates afresh. (getrusage's ru_maxrss would not
    # do: Linux carries the parent's high-water mark across fork+exec, so every worker would report the parent's.)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak excludes import spikes.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _checksum(state: Mapping[str, torch.Tensor]) -> float:
    return float(sum(t.double().sum() for t in state.values()))


def worker(approach: str, paths: list[Path], threads: int) -> dict:
    from safetensors.torch import load_file

    from culturemert.merge import merge_state_dicts

    torch.set_num_threads(threads)
    _reset_peak_rss()
    baseline = _rss_mb()
    start = time.perf_counter()
    if approach == "streaming-lazy":
        base, *models = [LazySafetensors(p) for p in paths]
        merged = merge_state_dicts(base, models, "task_arithmetic", LAMBDA)
    elif approach == "streaming-eager":
        base, *models = [load_file(str(p)) for p in paths]
        merged = merge_state_dicts(base, models, "task_arithmetic", LAMBDA)
    elif approach == "naive":
        base, *models = [load_file(str(p)) for p in paths]
        task_vectors = [{name: m[name] - base[name] for name in base} for m in models]
        merged = {name: base[name] + LAMBDA * sum(tv[name] for tv in task_vectors) for name in base}
    else:
        raise ValueError(approach)
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    return {
        "approach": approach,
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline,
        "peak_above_baseline_mb": peak_mb - baseline,
        "checksum": _checksum(merged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker (default 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [Path(p) for p in args.paths], args.threads)))
        return

    with tempfile.TemporaryDirectory(prefix="culturemert-bench-merge-") as tmp:
        t0 = time.perf_counter()
        paths = write_inputs(Path(tmp))
        params = sum(torch.Size(s).numel() for s in mert_95m_shapes().values())
        size_mb = sum(p.stat().st_size for p in paths[1:2]) / 2**20
        print(f"inputs: base + {NUM_MODELS} models, {params / 1e6:.1f}M parameters each, fp32 "
              f"({size_mb:.0f} MB per model; written in {time.perf_counter() - t0:.1f}s)")
        results = {}
        for approach in ("naive", "streaming-eager", "streaming-lazy"):
            cmd = [sys.executable, __file__, "--worker", approach, "--threads", str(args.threads),
                   "--paths", *map(str, paths)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[approach] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\ntask arithmetic, λ={LAMBDA}, {NUM_MODELS} models, torch threads={args.threads}")
    print(f"{'approach':<16} {'time (s)':>9} {'peak RSS (MB)':>14} {'above baseline (MB)':>20} {'checksum':>16}")
    for r in results.values():
        print(f"{r['approach']:<16} {r['seconds']:>9.2f} {r['peak_rss_mb']:>14.0f} "
              f"{r['peak_above_baseline_mb']:>20.0f} {r['checksum']:>16.6f}")
    naive = results["naive"]
    for name in ("streaming-eager", "streaming-lazy"):
        r = results[name]
        print(f"naive / {name}: time x{naive['seconds'] / r['seconds']:.2f}, "
              f"peak memory above baseline x{naive['peak_above_baseline_mb'] / r['peak_above_baseline_mb']:.2f}")
    sums = [r["checksum"] for r in results.values()]
    spread = max(sums) - min(sums)
    print(f"checksums agree to {spread:.3g} (absolute, over {params / 1e6:.0f}M summed values)")
    print(f"\nreproduce: {REPRODUCE}" + (f" --threads {args.threads}" if args.threads != 1 else ""))


if __name__ == "__main__":
    main()
