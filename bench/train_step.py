"""Training-step throughput: culturemert's step vs a plain HubertModel + heads with a naive loss, side by side.

Ours: ``MertObjective`` (FFT CQT target, vectorised cosine logits, one fused CE) + AdamW (fused on CUDA), bf16
autocast on CUDA. Baseline: a plain ``transformers.HubertModel`` with the same config + the same heads as plain
Linear/Parameter modules, fp32 eager, the loss written naively (per-codebook loop, ``torch.cosine_similarity``
broadcast over all classes, nnAudio's time-domain CQT1992v2 for the target), plain AdamW. Same batch, same mask.

    python bench/train_step.py                 # small preset on CPU (and 95M on CUDA when available)
    python bench/train_step.py --preset tiny --batch 4 --seconds 1 --steps 3

Prints clips/s of both, their ratio, MFU on CUDA (FLOPs per clip as docs/performance.md counts them, ~364 GFLOPs for 95M
at 5 s), and on CUDA the peak memory of a 95M step at 32 x 5 s with and without activation checkpointing.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import HubertModel

from culturemert.model import build_model
from culturemert.objective import MertObjective, ObjectiveConfig, compute_mask_indices
from culturemert.teachers import MertCQT
from culturemert.train import peak_flops, train_flops_per_clip


class NaiveBaseline(nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.backbone = HubertModel(ours.config)
        self.backbone.load_state_dict(ours.backbone.state_dict())
        hc = ours.heads.config
        self.hc = hc
        self.final_proj = nn.Linear(ours.hidden_size, hc.n_codebooks * hc.final_dim)
        self.label_embs = nn.Parameter(ours.heads.label_embs_concat.detach().clone())
        self.cqt_proj = nn.Linear(ours.hidden_size, hc.cqt_bins)
        from nnAudio.features.cqt import CQT

        self.cqt = CQT(sr=24000, hop_length=320, fmin=32.7, n_bins=336, bins_per_octave=48, pad_mode="constant", verbose=False)

    def loss(self, wav, codes, mask):
        with torch.no_grad():
            target_cqt = self.cqt(wav).transpose(1, 2)
        hidden = self.backbone(wav, mask_time_indices=mask).last_hidden_state
        T = hidden.shape[1]
        h = hidden[mask]
        proj = self.final_proj(h).chunk(self.hc.n_codebooks, dim=-1)
        embs = self.label_embs.chunk(self.hc.n_codebooks, dim=0)
        tgt = codes.transpose(1, 2)[:, :T][mask]
        total = 0.0
        for k in range(self.hc.n_codebooks):
            logits = torch.cosine_similarity(proj[k][:, None, :], embs[k][None, :, :], dim=-1) / 0.1
            total = total + F.cross_entropy(logits, tgt[:, k] + self.hc.n_special)
        mse = F.mse_loss(self.cqt_proj(h), target_cqt[:, :T][mask])
        return total + mse


def _time(fn, steps, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def bench(preset, batch, seconds, steps, device, bf16):
    torch.manual_seed(0)
    model = build_model(preset, seed=0).to(device).train()
    hc = model.heads.config
    L = int(seconds * 24000) // 320 * 320
    wav = torch.randn(batch, L, device=device) * 0.1
    codes = torch.randint(0, hc.codebook_size, (batch, hc.n_codebooks, L // 320), device=device)
    T = model.num_frames(L)
    mask = compute_mask_indices((batch, T), generator=torch.Generator().manual_seed(0)).to(device)
    objective = MertObjective(ObjectiveConfig(mixture_prob=1.0), MertCQT()).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=fused)

    def ours():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = objective(model, wav, wav, codes, mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base = NaiveBaseline(model).to(device).train()
    base_opt = torch.optim.AdamW(base.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    def baseline():
        loss = base.loss(wav, codes, mask)
        loss.backward()
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)

    t_ours = _time(ours, steps, device)
    t_base = _time(baseline, steps, device)
    flops = train_flops_per_clip(model, L)
    return batch / t_ours, batch / t_base, flops


def peak_memory(batch, seconds, checkpointing, device):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model("mert-v1-95m", seed=0).to(device).train()
    if checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    L = int(seconds * 24000)
    wav = torch.randn(batch, L, device=device) * 0.1
    codes = torch.randint(0, 1024, (batch, 8, math.ceil(L / 320)), device=device)
    objective = MertObjective(ObjectiveConfig(), MertCQT()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = objective.loss(model, wav, codes, torch.Generator().manual_seed(0))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, objective
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-cuda", action="store_true")
    args = ap.parse_args(argv)
    print("reproduce: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))
    cpu = torch.device("cpu")
    o, b, flops = bench(args.preset, args.batch, args.seconds, args.steps, cpu, bf16=False)
    print(
        f"CPU {args.preset} batch {args.batch} x {args.seconds:g}s ({torch.get_num_threads()} threads): "
        f"ours {o:.2f} clips/s | naive HubertModel+heads fp32 {b:.2f} clips/s | ratio {o / b:.2f}x"
    )
    if torch.cuda.is_available() and not args.no_cuda:
        dev = torch.device("cuda")
        o, b, flops = bench("mert-v1-95m", 32, 5.0, max(args.steps, 5), dev, bf16=True)
        peak = peak_flops(dev)
        mfu = f"MFU {o * flops / peak:.1%} (at {flops / 1e9:.0f} GFLOPs/clip)" if peak else "MFU n/a (unknown GPU peak)"
        print(
            f"CUDA {torch.cuda.get_device_name(dev)} 95M batch 32 x 5s: ours bf16 {o:.1f} clips/s, {mfu} | "
            f"naive fp32 {b:.1f} clips/s (MFU {b * flops / peak:.1%}) | ratio {o / b:.2f}x"
            if peak
            else f"CUDA 95M: ours {o:.1f} clips/s | naive {b:.1f} clips/s | ratio {o / b:.2f}x"
        )
        for ckpt in (False, True):
            print(f"CUDA 95M peak memory, 32 x 5 s, activation checkpointing {ckpt}: {peak_memory(32, 5.0, ckpt, dev):.1f} GiB")
    else:
        print("CUDA: not available (the 95M figures need a GPU)")


if __name__ == "__main__":
    main()
