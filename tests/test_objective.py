"""The MERT objective, each piece against hand computations on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from culturemert.config import parse_config
from culturemert.errors import ConfigError, DataError
from culturemert.model import build_model
from culturemert.objective import (
    MertObjective,
    ObjectiveConfig,
    apply_inbatch_noise,
    compute_mask_indices,
    cosine_logits,
    masked_prediction_loss,
)


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a 1-D bool tensor."""
    runs, cur = [], 0
    for v in row.tolist():
        if v:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    if cur:
        runs.append(cur)
    return runs


# ---------------------------------------------------------------------------------------------- masking
def test_mask_fraction_for_five_second_clips_is_about_54_percent():
    g = torch.Generator().manual_seed(0)
    fracs = [compute_mask_indices((16, 374), generator=g).float().mean().item() for _ in range(20)]
    mean = sum(fracs) / len(fracs)
    # fairseq's algorithm with MERT's settings: 59-60 overlapping spans of 5 -> ~54 % (research simulation 0.539)
    assert 0.51 < mean < 0.57, mean


def test_mask_rows_have_equal_counts_and_frame_count_is_respected():
    g = torch.Generator().manual_seed(1)
    mask = compute_mask_indices((7, 123), generator=g)
    counts = mask.sum(1)
    assert mask.shape == (7, 123) and mask.dtype == torch.bool
    assert torch.all(counts == counts[0]) and counts[0] > 0
    loose = compute_mask_indices((32, 123), require_same_masks=False, generator=torch.Generator().manual_seed(1))
    assert len(set(loose.sum(1).tolist())) > 1  # without the equaliser rows differ


def test_mask_spans_are_static_length_and_starts_stay_below_T_minus_span():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        row = compute_mask_indices((1, 200), generator=g)[0]  # one row: nothing is subsampled
        runs = _runs(row)
        assert runs and min(runs) >= 5  # union of (possibly overlapping) 5-frame spans
        assert not row[-1]  # last start is T-6, so frame T-1 is never covered
    # 0.05 * 1000 / 5 = 10 spans exactly (floor(10 + U) = 10) -> at most 50 masked frames
    sparse = compute_mask_indices((4, 1000), mask_prob=0.05, require_same_masks=False, generator=g)
    for row in sparse:
        assert 10 <= int(row.sum()) <= 50 and min(_runs(row)) >= 5
    # min_masks: 0.01 * 20 / 5 < 1 -> two spans anyway
    few = compute_mask_indices((50, 20), mask_prob=0.01, require_same_masks=False, generator=g)
    assert int(few.sum(1).min()) >= 5 and int(few.sum(1).max()) <= 10


def test_mask_is_deterministic_per_generator_seed():
    a = compute_mask_indices((4, 100), generator=torch.Generator().manual_seed(5))
    b = compute_mask_indices((4, 100), generator=torch.Generator().manual_seed(5))
    c = compute_mask_indices((4, 100), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _fairseq_row_count(rng: np.random.Generator, frames: int, mask_prob=0.8, span=5, min_masks=2) -> int:
    """Masked frames of one row before equalisation, by fairseq's ``compute_mask_indices`` (static spans, overlap
    allowed, num_mask = max(min_masks, int(p * T / span + U)), starts without replacement from [0, T - span))."""
    num = max(min_masks, int(mask_prob * frames / span + rng.random()))
    length = span if frames - span > num else frames - num - 1
    starts = rng.choice(frames - length, num, replace=False)
    idx = np.unique((starts[:, None] + np.arange(span)[None, :]).ravel())
    return int((idx < frames).sum())


def _fairseq_group_fraction(group: int, frames: int, n_groups: int) -> float:
    """E[masked fraction] of a batch of ``group`` rows under require_same_masks: every row is cut to the
    group's smallest count, so the fraction is E[min of ``group`` row counts] / T (Monte Carlo, numpy)."""
    rng = np.random.default_rng(0)
    mins = [min(_fairseq_row_count(rng, frames) for _ in range(group)) for _ in range(n_groups)]
    return float(np.mean(mins)) / frames


def test_mask_equalisation_is_per_group_of_mask_group_clips_like_mert_per_gpu():
    frames, batch = 374, 64
    by_group = {}
    for group in (16, 64):
        obj = MertObjective(ObjectiveConfig(mask_group_clips=group, mixture_prob=-1, cqt_weight=0))
        fractions, steps_with_unequal_groups = [], 0
        for step in range(20):
            _, mask, _ = obj.plan(torch.zeros(batch, 8), frames, frames, torch.Generator().manual_seed(step))
            counts = mask.sum(1).view(batch // group, group)
            assert torch.all(counts == counts[:, :1]), "rows of one group must have the same masked count"
            fractions += (counts[:, 0].float() / frames).tolist()
            steps_with_unequal_groups += len(set(counts[:, 0].tolist())) > 1
        by_group[group] = float(np.mean(fractions))
        if group == 16:
            assert steps_with_unequal_groups > 10  # each group is equalised on its own, not to the batch minimum
    ref16 = _fairseq_group_fraction(16, frames, 1000)
    ref64 = _fairseq_group_fraction(64, frames, 300)
    assert ref16 - ref64 > 0.01  # the scope matters: ~54 % per 16-clip GPU batch vs ~52.5 % over 64 clips
    assert by_group[16] == pytest.approx(ref16, abs=0.004), (by_group, ref16)
    assert by_group[64] == pytest.approx(ref64, abs=0.004), (by_group, ref64)
    assert 0.53 < ref16 < 0.55


def test_group_masks_are_fixed_slices_of_the_global_batch_whatever_the_world_size():
    frames, batch, group = 120, 24, 7  # a ragged last group of 3 clips, like 64 clips in groups of 7
    obj = MertObjective(ObjectiveConfig(mask_group_clips=group, mixture_prob=-1, cqt_weight=0))
    _, mask, _ = obj.plan(torch.zeros(batch, 8), frames, frames, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = torch.cat([compute_mask_indices((min(group, batch - s), frames), generator=g) for s in range(0, batch, group)])
    assert torch.equal(mask, expected)
    counts = mask.sum(1)
    for start in range(0, batch, group):
        assert len(set(counts[start : start + group].tolist())) == 1
    # the trainer plans once on the global batch and gives rank r rows [r B/W, (r+1) B/W): any world size
    # reassembles the same masks, and a group that straddles two ranks keeps its common count
    for world in (1, 2, 3, 4, 6, 8):
        per_rank = batch // world
        assert torch.equal(torch.cat([mask[r * per_rank : (r + 1) * per_rank] for r in range(world)]), mask)
    with pytest.raises(ConfigError, match="mask_group_clips"):
        parse_config({"mask_group_clips": 0}, ObjectiveConfig)


# ---------------------------------------------------------------------------------------------- mixture
def test_noise_mixture_probability_is_inverted_like_mert():
    wav = torch.randn(4, 500)
    never, applied = apply_inbatch_noise(wav, 1.0, (10, 20), (1, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(never, wav) and not applied.any()
    always, applied = apply_inbatch_noise(wav, 1e-9, (10, 20), (1, 3), generator=torch.Generator().manual_seed(0))
    assert applied.all() and not torch.equal(always, wav)
    single, applied = apply_inbatch_noise(wav[:1], 1e-9, (10, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(single, wav[:1]) and not applied.any()


def test_mixture_prob_zero_or_negative_switches_the_mixture_off_like_mert():
    # MERT: `if self.mixture_prob > 0:` gates the augmentation; inside, a clip is mixed when rand > mixture_prob.
    # A MERT config ported verbatim with mixture_prob 0 (or MERT's default -1) must therefore never mix.
    wav = torch.randn(8, 3000)
    for p in (0.0, -1.0):
        out, applied = apply_inbatch_noise(wav, p, (10, 20), (1, 3), generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, wav) and not applied.any()
        obj = MertObjective(parse_config({"mixture_prob": p, "cqt_weight": 0}, ObjectiveConfig))
        wav_in, _, mixed = obj.plan(wav, 9, 10, torch.Generator().manual_seed(0), train=True)
        assert torch.equal(wav_in, wav) and not mixed.any(), p
    # p > 0: each clip is mixed independently with probability 1 - p (Bernoulli, 4096 clips: sd 0.0068)
    for p, expected in ((0.25, 0.75), (0.5, 0.5), (0.9, 0.1)):
        obj = MertObjective(ObjectiveConfig(mixture_prob=p, cqt_weight=0, mixture_length_range=(10, 20)))
        _, _, mixed = obj.plan(torch.randn(4096, 100), 0, 0, torch.Generator().manual_seed(1), train=True)
        assert abs(mixed.float().mean().item() - expected) < 0.03, (p, mixed.float().mean().item())


def test_noise_mixture_adds_one_excerpt_of_the_other_clips():
    g = torch.Generator().manual_seed(3)
    wav = torch.randn(3, 100, dtype=torch.float64)
    mixed, applied = apply_inbatch_noise(wav, 1e-9, (10, 20), (1, 1), volume=0.5, generator=g)
    assert applied.all()
    for i in range(3):
        diff = mixed[i] - wav[i]
        nz = torch.nonzero(diff).flatten()
        start, stop = int(nz.min()), int(nz.max()) + 1
        seg_len = stop - start
        assert 10 <= seg_len <= 20
        pool = torch.cat([wav[j] for j in range(3) if j != i])
        windows = pool.unfold(0, seg_len, 1)  # every excerpt of that length, straddling clips included
        hits = torch.isclose(windows, 2 * diff[start:stop]).all(1)
        assert hits.any(), "the added signal is not an excerpt of the other clips at volume 0.5"


# ---------------------------------------------------------------------------------------------- logits / CE
def test_cosine_logits_equal_an_explicit_loop():
    torch.manual_seed(0)
    proj, emb = torch.randn(5, 3, 4), torch.randn(3, 7, 4)
    logits = cosine_logits(proj, emb, 0.1)
    assert logits.shape == (5, 3, 7)
    for n in range(5):
        for k in range(3):
            for c in range(7):
                expect = F.cosine_similarity(proj[n, k], emb[k, c], dim=0) / 0.1
                assert torch.isclose(logits[n, k, c], expect, atol=1e-5)


def test_masked_prediction_loss_equals_manual_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 2, 5), torch.randint(0, 5, (6, 2))
    ce, correct = masked_prediction_loss(logits, targets)
    for k in range(2):
        manual = 0.0
        hits = 0
        for n in range(6):
            row = logits[n, k]
            manual += -(float(row[targets[n, k]]) - math.log(sum(math.exp(v) for v in row.tolist())))
            hits += int(int(row.argmax()) == int(targets[n, k]))
        assert ce[k].item() == pytest.approx(manual, rel=1e-5)
        assert int(correct[k]) == hits


# ---------------------------------------------------------------------------------------------- full objective
class RecordingCQT(torch.nn.Module):
    """Fake CQT with MERT's frame count (floor(L/320)+1, frame k centred on 320k) that records its input."""

    bins = 336

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.override: torch.Tensor | None = None

    def forward(self, wav):
        self.seen.append(wav.clone())
        if self.override is not None:
            return self.override
        frames = wav.shape[1] // 320 + 1
        padded = F.pad(wav, (160, 160 + 320))
        chunks = padded.unfold(1, 320, 320)[:, :frames].abs().mean(-1)  # [B, F]
        return chunks[:, None, :] * torch.linspace(0.5, 1.5, self.bins)[None, :, None]


def _tiny_setup(seed=0, crop=320 * 24):
    model = build_model("tiny", seed=seed)
    model.eval()  # no dropout in tiny anyway; eval keeps HF from drawing its own mask
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(3, crop, generator=g) * 0.1
    hc = model.heads.config
    codes = torch.randint(0, hc.codebook_size, (3, hc.n_codebooks, math.ceil(crop / 320)), generator=g)
    return model, wav, codes


def test_total_loss_is_the_weighted_sum_of_hand_computed_parts():
    model, wav, codes = _tiny_setup()
    cqt = RecordingCQT()
    cfg = ObjectiveConfig(mixture_prob=1.0, cqt_weight=0.7, feature_penalty_weight=3.0, pred_masked_weight=2.0)
    obj = MertObjective(cfg, cqt)
    T = model.num_frames(wav.shape[1])
    assert T == (wav.shape[1] - 400) // 320 + 1
    wav_in, mask, _ = obj.plan(wav, T, codes.shape[2], torch.Generator().manual_seed(0), train=True)
    out = obj(model, wav, wav_in, codes, mask)

    with torch.no_grad():
        ref = model(wav, mask_time_indices=mask)
        h = ref.last_hidden_state[mask]
        heads = model.heads
        proj = heads.project(h)
        emb = heads.label_embeddings()
        tg = codes.transpose(1, 2)[:, :T][mask] + heads.config.n_special
        ce_total = 0.0
        for k in range(heads.config.n_codebooks):
            lg = torch.stack([F.cosine_similarity(proj[:, k, None], emb[k][None], dim=-1)]) [0] / 0.1
            ce_total += F.cross_entropy(lg, tg[:, k], reduction="sum").item()
        ce_total /= int(mask.sum())
        target = cqt(wav).transpose(1, 2)[:, :T][mask]
        mse = ((heads.cqt_proj(h) - target) ** 2).mean().item()
        pen = ref.features_pen.item()
    assert out.num_masked == int(mask.sum())
    assert out.parts["pred_loss"].item() == pytest.approx(ce_total, rel=1e-5)
    assert out.parts["cqt_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out.loss.item() == pytest.approx(2.0 * ce_total + 0.7 * mse + 3.0 * pen, rel=1e-5)


def test_cqt_mse_and_codes_only_count_masked_frames():
    model, wav, codes = _tiny_setup(seed=1)
    cqt = RecordingCQT()
    obj = MertObjective(ObjectiveConfig(mixture_prob=1.0), cqt)
    T = model.num_frames(wav.shape[1])
    wav_in, mask, _ = obj.plan(wav, T, codes.shape[2], torch.Generator().manual_seed(0))
    base_spec = RecordingCQT()(wav)
    cqt.override = base_spec
    with torch.no_grad():
        base = obj(model, wav, wav_in, codes, mask)
        # change targets and codes at an UNmasked frame and at frames past T: nothing changes
        b, t = map(int, torch.nonzero(~mask)[0])
        spec2 = base_spec.clone()
        spec2[b, :, t] += 100.0
        spec2[:, :, T:] += 100.0
        codes2 = codes.clone()
        codes2[b, :, t] = (codes2[b, :, t] + 1) % model.heads.config.codebook_size
        cqt.override = spec2
        same = obj(model, wav, wav_in, codes2, mask)
        # and at a masked frame: both terms move
        b, t = map(int, torch.nonzero(mask)[0])
        spec3 = base_spec.clone()
        spec3[b, :, t] += 100.0
        codes3 = codes.clone()
        codes3[b, :, t] = (codes3[b, :, t] + 1) % model.heads.config.codebook_size
        cqt.override = spec3
        moved = obj(model, wav, wav_in, codes3, mask)
    assert same.loss.item() == pytest.approx(base.loss.item(), rel=1e-6)
    assert moved.parts["cqt_mse"].item() > base.parts["cqt_mse"].item() + 1.0
    assert moved.parts["pred_loss"].item() != pytest.approx(base.parts["pred_loss"].item(), rel=1e-7)


def test_cqt_targets_come_from_the_clean_audio_and_eval_never_mixes():
    model, wav, codes = _tiny_setup(seed=2)
    cqt = RecordingCQT()
    obj = MertObjective(ObjectiveConfig(mixture_prob=1e-9, mixture_length_range=(500, 1000)), cqt)
    out = obj.loss(model, wav, codes, torch.Generator().manual_seed(0), train=True)
    assert torch.equal(cqt.seen[-1], wav)  # clean, although every sample was mixed
    wav_in, _, mixed = obj.plan(wav, model.num_frames(wav.shape[1]), codes.shape[2], torch.Generator().manual_seed(0))
    assert mixed.all() and not torch.equal(wav_in, wav)
    wav_eval, _, mixed_eval = obj.plan(
        wav, model.num_frames(wav.shape[1]), codes.shape[2], torch.Generator().manual_seed(0), train=False
    )
    assert torch.equal(wav_eval, wav) and not mixed_eval.any()
    assert math.isfinite(out.loss.item())


def _grads_for_mults(penalty_weight: float):
    model, wav, codes = _tiny_setup(seed=3)
    grads = {}
    for mult in (1.0, 0.1):
        cfg = ObjectiveConfig(mixture_prob=1.0, feature_grad_mult=mult, feature_penalty_weight=penalty_weight)
        obj = MertObjective(cfg, RecordingCQT())
        model.zero_grad(set_to_none=True)
        obj.loss(model, wav, codes, torch.Generator().manual_seed(0)).loss.backward()
        grads[mult] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    conv = [n for n in grads[1.0] if n.startswith("backbone.feature_extractor.")]
    other = [n for n in grads[1.0] if not n.startswith("backbone.feature_extractor.")]
    assert conv and other
    return grads, conv, other


def test_feature_grad_mult_scales_only_the_conv_encoder_gradients():
    grads, conv, other = _grads_for_mults(penalty_weight=0.0)
    for n in conv:
        torch.testing.assert_close(grads[0.1][n], 0.1 * grads[1.0][n], rtol=1e-4, atol=1e-9)
    for n in other:
        torch.testing.assert_close(grads[0.1][n], grads[1.0][n], rtol=1e-5, atol=1e-7)


def test_feature_grad_mult_also_scales_the_feature_penalty_gradient_like_fairseq():
    grads, conv, _ = _grads_for_mults(penalty_weight=10.0)
    for n in conv:
        scale = grads[1.0][n].abs().max()
        torch.testing.assert_close(grads[0.1][n], 0.1 * grads[1.0][n], rtol=1e-4, atol=1e-6 * float(scale))


def test_objective_rejects_bad_codes_and_bad_config():
    model, wav, codes = _tiny_setup(seed=4)
    obj = MertObjective(ObjectiveConfig(mixture_prob=1.0), RecordingCQT())
    bad = codes.clone()
    bad[0, 0, :] = model.heads.config.codebook_size
    with pytest.raises(DataError, match="outside"):
        obj.loss(model, wav, bad, torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="shape"):
        obj.loss(model, wav, codes[:, :1], torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="mixture_length_range"):
        parse_config({"mixture_length_range": [20, 10]}, ObjectiveConfig)
    with pytest.raises(ConfigError, match="mask_prob"):
        parse_config({"mask_prob": 1.5}, ObjectiveConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"mask_probability": 0.5}, ObjectiveConfig)
    with pytest.raises(ValueError, match="CQT module"):
        MertObjective(ObjectiveConfig(), None)
