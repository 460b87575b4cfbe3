"""Batched probe sweep vs one probe at a time, on random features of MagnaTagATune's size.

Full MARBLE grid: 13 hidden states (12 single layers + state 0 ... all 13 single) x 6 lrs x 5 seeds = 390 single-layer
probes (+ optionally the weighted sum). Both paths run the same per-seed random streams, so their metrics must
agree. The sequential baseline (plain nn.Linear + torch.optim.Adam per probe, `train_probe_reference`) is timed
on a subset of probes and extrapolated linearly to the whole grid (every probe runs the same number of epochs
here: early stopping is disabled, so the cost per probe is constant); the script says so in its output.

    python bench/probe.py                      # MTT size, 2 epochs (GPU if available)
    python bench/probe.py --train 3000 --valid 300 --test 800 --epochs 1   # smaller, CPU-friendly
    python bench/probe.py --windows 6 --protocol marble-windows            # 6 windows per track (29-s clip, 5-s windows)

With ``--windows W`` every track has 1..W windows (uniform), so ``marble`` steps hold different numbers of windows
per seed (padded, masked) while ``marble-windows`` takes W/2 times more steps per epoch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from culturemert.evaluate.features import ProbeData, SplitFeatures
    from culturemert.evaluate.probe import ProbeSettings, make_specs, train_probe_reference, train_probes
    from culturemert.runtime import resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=15244)
    ap.add_argument("--valid", type=int, default=1529)
    ap.add_argument("--test", type=int, default=4332)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--tags", type=int, default=50)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--lrs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--weighted-sum", action="store_true", help="add the weighted-sum probes to the grid")
    ap.add_argument("--sequential-probes", type=int, default=26, help="probes timed one at a time (then extrapolated)")
    ap.add_argument("--windows", type=int, default=1, help="windows per track: 1..W, uniform")
    ap.add_argument("--protocol", default="marble", choices=["marble", "marble-windows", "culturemert-paper"])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> SplitFeatures:
        y = (torch.rand(n, args.tags, generator=g) < 0.06).float()
        owner = torch.repeat_interleave(torch.arange(n), torch.randint(1, args.windows + 1, (n,), generator=g))
        x = torch.randn(owner.numel(), args.layers, args.dim, generator=g)
        x[:, :, : args.tags] += 0.5 * torch.linspace(0, 1, args.layers).view(1, -1, 1) * (2 * y[owner].unsqueeze(1) - 1)
        return SplitFeatures(x, owner, y)

    data = ProbeData(split(args.train), split(args.valid), split(args.test), [f"t{i}" for i in range(args.tags)])
    lrs = [5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2][: args.lrs]
    settings = ProbeSettings(lrs=lrs, seeds=args.seeds, max_epochs=args.epochs, patience=args.epochs + 1,
                             weighted_sum=args.weighted_sum, device=str(device), protocol=args.protocol)
    specs = make_specs(settings, args.layers)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}); "
          f"{len(specs)} probes = {args.layers} layers{' + weighted' if args.weighted_sum else ''} x {len(lrs)} lrs x {args.seeds} seeds; "
          f"{args.train}/{args.valid}/{args.test} tracks ({data.train.features.shape[0]} train windows), {args.dim}-d, "
          f"{args.tags} tags, {args.epochs} epochs, protocol {args.protocol}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up (CUDA context, kernels) on a tiny slice so neither path pays it
    n_warm = min(256, args.train)
    warm = ProbeData(SplitFeatures(data.train.features[:n_warm], torch.arange(n_warm), data.train.labels[:n_warm]),
                     data.valid, None, data.vocabulary)
    n_metrics = 0
    train_probes(warm, specs[:2], settings.model_copy(update={"max_epochs": 1}), progress=False, evaluate_test=False)
    train_probe_reference(warm, specs[0], settings.model_copy(update={"max_epochs": 1}), evaluate_test=False)

    sync()
    t0 = time.perf_counter()
    outcomes, _ = train_probes(data, specs, settings, progress=False)
    sync()
    batched_s = time.perf_counter() - t0

    step = max(1, len(specs) // args.sequential_probes)
    subset = list(range(0, len(specs), step))[: args.sequential_probes]
    sync()
    t0 = time.perf_counter()
    sequential = [train_probe_reference(data, specs[i], settings) for i in subset]
    sync()
    seq_subset_s = time.perf_counter() - t0
    seq_total_s = seq_subset_s / len(subset) * len(specs)

    max_diff = 0.0
    same_epochs = True
    for i, ref in zip(subset, sequential):
        b = outcomes[i]
        same_epochs &= b.best_epoch == ref.best_epoch
        for split_name in ("valid", "test"):
            for m, v in getattr(ref, split_name).items():
                max_diff = max(max_diff, abs(getattr(b, split_name)[m] - v))
                n_metrics += split_name == "valid" and i == subset[0]
    print(f"steps     : {outcomes[0].optimizer_steps} optimizer steps for {outcomes[0].epochs_run} epoch(s)")
    print(f"batched   : {batched_s:9.2f} s for all {len(specs)} probes")
    print(f"sequential: {seq_subset_s:9.2f} s for {len(subset)} probes -> {seq_total_s:9.2f} s extrapolated to {len(specs)} (linear)")
    print(f"speed-up  : {seq_total_s / batched_s:9.1f}x")
    print(f"metrics   : max |batched - sequential| over {len(subset)} probes x 2 splits x {n_metrics} metrics = {max_diff:.2e}; "
          f"best epochs equal: {same_epochs}")
    print("reproduce : python bench/probe.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
