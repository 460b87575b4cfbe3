"""Time and peak memory of merging four MERT-v1-95M-size models: streaming merge vs. naive task vectors.

Writes a base and four derived models (random weights with MERT-v1-95M's shapes, fp32 safetensors) to a temp dir,
then measures, each in a fresh subprocess so that every peak RSS is clean:

* ``naive``: load all five state dicts, materialise every task vector as a full state dict, sum them;
* ``streaming-eager``: load all five state dicts, then ``culturemert.merge.merge_state_dicts`` (tensor by tensor);
* ``streaming-lazy``: ``merge_state_dicts`` over ``culturemert.model.LazySafetensors`` mappings that read one
  tensor from disk on access, so only the output plus one tensor per input is resident. This is what
  ``culturemert merge`` does when every input is a culturemert export.

All three run task arithmetic at λ = 0.2 (CultureMERT-TA's setting) and print a checksum of the result, which
must agree. ``--exports`` adds the whole merge job (open, merge, write the export) on export directories, with
inputs loaded as models (``merge-exports-eager``) and read lazily (``merge-exports``, the default for exports).

``--method M ...`` benches other merge methods beside task arithmetic (each at its defaults, see docs/merging.md):
for every method but task arithmetic the two streaming approaches (and, with ``--exports``, the two whole jobs)
run, so their time and peak memory can be compared with task arithmetic's; ``--trim-scope global`` applies to
``ties`` and ``breadcrumbs``. ``--preset tiny`` uses the tiny test model's shapes instead of MERT-v1-95M's, to
check the script in seconds.
Reproduce with:  python bench/merge.py [--exports] [--method task_arithmetic ties tsv ...] [--preset tiny]
(add --threads N to change torch's thread count)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

NUM_MODELS = 4
LAMBDA = 0.2
REPRODUCE = "python bench/merge.py"
PRESETS = ("mert-v1-95m", "tiny")


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


def backbone_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the preset's backbone (MERT-v1-95M's HubertModel, or the tiny test model's)."""
    if preset == "mert-v1-95m":
        return mert_95m_shapes()
    from culturemert.model import build_model

    return {name: tuple(t.shape) for name, t in build_model(preset, with_heads=False, seed=0).backbone.state_dict().items()}


def write_inputs(directory: Path, preset: str) -> list[Path]:
    from safetensors.torch import save_file

    shapes = backbone_shapes(preset)
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


def write_exports(paths: list[Path], preset: str) -> list[Path]:
    """The same weights as culturemert export directories (what `culturemert merge` reads), heads-free."""
    from safetensors.torch import load_file

    from culturemert.model import model_fingerprint, save_export
    from culturemert.model import build_model

    model = build_model(preset, with_heads=False, seed=0)
    dirs, base_fp = [], None
    for path in paths:
        model.backbone.load_state_dict(load_file(str(path)), strict=True)
        out = path.with_suffix("")
        save_export(model, out, base_fingerprint=base_fp)
        base_fp = base_fp or model_fingerprint(model)
        dirs.append(out)
    return dirs


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


def _options(method: str, trim_scope: str | None):
    from culturemert.merge import TRIMMING_METHODS, MergeOptions

    return MergeOptions(
        method=method,
        lambdas=LAMBDA if method == "task_arithmetic" else None,  # the other methods at their default λ
        trim_scope=trim_scope if method in TRIMMING_METHODS else None,
    )


def worker(approach: str, paths: list[Path], threads: int, method: str, trim_scope: str | None) -> dict:
    from safetensors.torch import load_file

    from culturemert.model import LazySafetensors
    from culturemert.merge import merge_with_report

    options = _options(method, trim_scope)
    torch.set_num_threads(threads)
    _reset_peak_rss()
    baseline = _rss_mb()
    start = time.perf_counter()
    if approach == "streaming-lazy":
        base, *models = [LazySafetensors(p) for p in paths]
        merged, _ = merge_with_report(base, models, options, progress=False)
    elif approach == "streaming-eager":
        base, *models = [load_file(str(p)) for p in paths]
        merged, _ = merge_with_report(base, models, options, progress=False)
    elif approach == "naive":
        base, *models = [load_file(str(p)) for p in paths]
        task_vectors = [{name: m[name] - base[name] for name in base} for m in models]
        merged = {name: base[name] + LAMBDA * sum(tv[name] for tv in task_vectors) for name in base}
    elif approach in ("merge-exports", "merge-exports-eager"):
        # the whole `culturemert merge` job on export directories: open, merge, write + checksum the export
        from culturemert.merge import load_inputs, merge_loaded, open_inputs_lazily

        base_dir, *model_dirs = paths
        opener = open_inputs_lazily if approach == "merge-exports" else load_inputs
        inputs = opener(base_dir, model_dirs)
        out = base_dir.parent / f"out-{method}-{approach}"
        merge_loaded(inputs, out, options)
        del inputs
        merged = LazySafetensors(out / "model.safetensors", "backbone.")
    else:
        raise ValueError(approach)
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    return {
        "method": method,
        "approach": approach,
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline,
        "peak_above_baseline_mb": peak_mb - baseline,
        "checksum": _checksum(merged),
    }


def main() -> None:
    from culturemert.merge import MERGE_METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker (default 1)")
    parser.add_argument("--exports", action="store_true",
                        help="also time the whole merge job on culturemert export directories, eager vs lazy inputs")
    parser.add_argument("--method", nargs="+", default=["task_arithmetic"], choices=[m for m in MERGE_METHODS if m != "linear"],
                        help="merge methods to bench (default: task_arithmetic); each runs at its defaults")
    parser.add_argument("--trim-scope", choices=("per_tensor", "global"), help="for ties and breadcrumbs")
    parser.add_argument("--preset", choices=PRESETS, default="mert-v1-95m",
                        help="model shapes (default mert-v1-95m; tiny checks the script in seconds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [Path(p) for p in args.paths], args.threads, args.method[0], args.trim_scope)))
        return

    methods = list(dict.fromkeys(args.method))
    with tempfile.TemporaryDirectory(prefix="culturemert-bench-merge-") as tmp:
        t0 = time.perf_counter()
        paths = write_inputs(Path(tmp), args.preset)
        params = sum(torch.Size(s).numel() for s in backbone_shapes(args.preset).values())
        size_mb = sum(p.stat().st_size for p in paths[1:2]) / 2**20
        print(f"inputs ({args.preset}): base + {NUM_MODELS} models, {params / 1e6:.1f}M parameters each, fp32 "
              f"({size_mb:.0f} MB per model; written in {time.perf_counter() - t0:.1f}s)")
        export_dirs = write_exports(paths, args.preset) if args.exports else []
        results = []
        for method in methods:
            approaches = (["naive"] if method == "task_arithmetic" else []) + ["streaming-eager", "streaming-lazy"]
            approaches += ["merge-exports-eager", "merge-exports"] if args.exports else []
            for approach in approaches:
                inputs = export_dirs if approach.startswith("merge-exports") else paths
                cmd = [sys.executable, __file__, "--worker", approach, "--threads", str(args.threads),
                       "--method", method, "--paths", *map(str, inputs)]
                if args.trim_scope:
                    cmd += ["--trim-scope", args.trim_scope]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    scope = f", trim scope {args.trim_scope}" if args.trim_scope else ""
    print(f"\n{NUM_MODELS} models ({args.preset}), task arithmetic at λ={LAMBDA}, other methods at their defaults"
          f"{scope}, torch threads={args.threads}")
    print(f"{'method':<16} {'approach':<20} {'time (s)':>9} {'peak RSS (MB)':>14} {'above baseline (MB)':>20} "
          f"{'checksum':>18}")
    for r in results:
        print(f"{r['method']:<16} {r['approach']:<20} {r['seconds']:>9.2f} {r['peak_rss_mb']:>14.0f} "
              f"{r['peak_above_baseline_mb']:>20.0f} {r['checksum']:>18.6f}")
    by_key = {(r["method"], r["approach"]): r for r in results}
    naive = by_key.get(("task_arithmetic", "naive"))
    if naive is not None:
        for r in results:
            if r["method"] == "task_arithmetic" and r["approach"] != "naive":
                print(f"naive / {r['approach']}: time x{naive['seconds'] / r['seconds']:.2f}, peak memory above "
                      f"baseline x{naive['peak_above_baseline_mb'] / max(r['peak_above_baseline_mb'], 1e-9):.2f}")
    for method in methods:
        if method != "task_arithmetic" and ("task_arithmetic", "streaming-lazy") in by_key:
            ta, r = by_key[("task_arithmetic", "streaming-lazy")], by_key[(method, "streaming-lazy")]
            print(f"{method} / task_arithmetic (streaming-lazy): time x{r['seconds'] / ta['seconds']:.2f}, peak "
                  f"memory above baseline x{r['peak_above_baseline_mb'] / max(ta['peak_above_baseline_mb'], 1e-9):.2f}")
    # Every approach of one method computes the same merge, except that the random masks (dare_ties, della) are
    # seeded by tensor name, and the raw state dicts name tensors without the exports' "backbone." prefix.
    for method in methods:
        for group, exports in (("state dicts", False), ("exports", True)):
            sums = [r["checksum"] for r in results
                    if r["method"] == method and r["approach"].startswith("merge-exports") == exports]
            if len(sums) > 1:
                print(f"{method}, {group}: checksums agree to {max(sums) - min(sums):.3g} (absolute, over {params:,} "
                      "summed values)")
    print(f"\nreproduce: {REPRODUCE}" + (f" --threads {args.threads}" if args.threads != 1 else "")
          + (" --exports" if args.exports else "")
          + (f" --method {' '.join(methods)}" if methods != ["task_arithmetic"] else "")
          + (f" --trim-scope {args.trim_scope}" if args.trim_scope else "")
          + (f" --preset {args.preset}" if args.preset != "mert-v1-95m" else ""))


if __name__ == "__main__":
    main()
