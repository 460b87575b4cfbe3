"""Peak memory of one MERT training step, with and without activation checkpointing, side by side.

Each configuration runs in a fresh child process so that one run's allocator cache cannot hide the other's peak.
On CUDA the figure is ``torch.cuda.max_memory_allocated`` (bf16 autocast, fused AdamW: the trainer's CUDA path);
on CPU it is the child's peak resident set size (fp32: the trainer's CPU path), which also counts the Python
interpreter, torch itself and the model + AdamW state, so it is an upper bound on what the step adds.

    python bench/memory.py                                  # 95M, 32 x 5 s, on CUDA when available, else CPU
    python bench/memory.py --device cpu --batch 4 --seconds 5
    python bench/memory.py --preset small --batch 8 --seconds 4

Prints the peak of both configurations, their ratio and the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import subprocess
import sys
import time


def _peak_rss_gib() -> float:
    # VmHWM of this process (exec starts a fresh address space); ru_maxrss would carry over the parent's peak.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one_step_peak(preset: str, batch: int, seconds: float, checkpointing: bool, device_name: str, steps: int) -> dict:
    """Run ``steps`` optimiser steps in this process and return its peak memory (GiB) and seconds per step."""
    import torch

    from culturemert.model import build_model
    from culturemert.objective import MertObjective, ObjectiveConfig
    from culturemert.teachers import MertCQT

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    model = build_model(preset, seed=0).to(device).train()
    if checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hc = model.heads.config
    samples = int(seconds * 24000)
    generator = torch.Generator().manual_seed(0)
    wav = torch.randn(batch, samples, generator=generator) * 0.1
    codes = torch.randint(0, hc.codebook_size, (batch, hc.n_codebooks, math.ceil(samples / 320)), generator=generator)
    objective = MertObjective(ObjectiveConfig(), MertCQT()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # step 1 allocates the AdamW state, so the reported peak covers a steady-state step as well.
    started = time.perf_counter()
    for _ in range(steps):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        with ctx:
            out = objective.loss(model, wav, codes, torch.Generator().manual_seed(0))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = _peak_rss_gib()
    return {"peak_gib": peak, "seconds_per_step": (time.perf_counter() - started) / steps, "loss": float(out.loss)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mert-v1-95m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=2, help="optimiser steps per configuration (>= 2 covers AdamW state)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--modes", nargs="+", choices=["plain", "checkpointing"], default=["plain", "checkpointing"],
                    help="configurations to run (plain 95M at 32 x 5 s needs ~28 GiB of host RAM in fp32 on CPU)")
    ap.add_argument("--child", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        result = one_step_peak(args.preset, args.batch, args.seconds, args.child == "checkpointing", args.device, args.steps)
        print(json.dumps(result))
        return

    print("reproduce: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    results = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--seconds", str(args.seconds),
               "--steps", str(args.steps), "--device", args.device, "--child", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            print(f"{mode}: failed (exit {proc.returncode}): {' | '.join(tail)}")
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{args.device} {args.preset} {args.batch} x {args.seconds:g} s, activation checkpointing "
              f"{'on ' if mode == 'checkpointing' else 'off'}: peak {r['peak_gib']:.2f} GiB, "
              f"{r['seconds_per_step']:.1f} s/step, loss {r['loss']:.4f}")
    if len(results) == 2:
        plain, ckpt = results["plain"], results["checkpointing"]
        print(f"activation checkpointing cuts peak memory {plain['peak_gib'] / ckpt['peak_gib']:.2f}x "
              f"at {ckpt['seconds_per_step'] / plain['seconds_per_step']:.2f}x the step time "
              f"(losses equal: {math.isclose(plain['loss'], ckpt['loss'], rel_tol=1e-4)})")


if __name__ == "__main__":
    main()
