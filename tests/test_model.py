"""The MERT model: presets as published, frame geometry, mask injection, feature penalty, grad scaling."""

from __future__ import annotations

import math

import pytest
import torch

from culturemert.errors import ConfigError
from culturemert.model import build_model, num_frames_for, preset_config


def test_mert_95m_preset_matches_published_parameter_count():
    backbone, heads = preset_config("mert-v1-95m")
    # 94,371,712 backbone parameters (the published MERT-v1-95M checkpoint), heads in fairseq shapes
    from transformers import HubertModel

    assert sum(p.numel() for p in HubertModel(backbone).parameters()) == 94_371_712
    assert (heads.n_codebooks, heads.codebook_size, heads.final_dim, heads.cqt_bins) == (8, 1024, 64, 336)
    assert heads.n_codebooks * heads.classes_per_codebook == 8224  # label_embs_concat rows


def test_330m_preset_is_pre_ln_with_128_final_dim():
    backbone, heads = preset_config("mert-v1-330m")
    assert backbone.do_stable_layer_norm and backbone.hidden_size == 1024 and backbone.num_hidden_layers == 24
    assert heads.final_dim == 128


def test_unknown_preset_names_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'mert-xl'.*mert-v1-95m"):
        preset_config("mert-xl")


@pytest.mark.parametrize("samples", [400, 719, 720, 24_000, 72_000, 120_000])
def test_frame_count_formula_matches_conv_stack(samples):
    model = build_model("tiny", seed=0).eval()
    backbone, _ = preset_config("mert-v1-95m")
    assert num_frames_for(backbone, samples) == (samples - 400) // 320 + 1
    with torch.no_grad():
        out = model(torch.zeros(1, samples))
    assert out.last_hidden_state.shape[1] == model.num_frames(samples) == (samples - 400) // 320 + 1


def test_75_hz_and_five_seconds_give_374_frames():
    backbone, _ = preset_config("mert-v1-95m")
    assert num_frames_for(backbone, 120_000) == 374
    assert math.isclose(24_000 / math.prod(backbone.conv_stride), 75.0)


def test_hidden_states_and_mask_embedding_injection():
    model = build_model("tiny", seed=0).train()
    wav = torch.randn(2, 8000)
    T = model.num_frames(8000)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 2:7] = True
    captured = {}
    handle = model.backbone.encoder.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].clone()))
    out = model(wav, mask_time_indices=mask, output_hidden_states=True)
    handle.remove()
    assert len(out.hidden_states) == model.num_layers + 1
    x = captured["x"]
    torch.testing.assert_close(x[0, 2:7], model.backbone.masked_spec_embed.expand(5, -1))
    assert not torch.allclose(x[1, 2], model.backbone.masked_spec_embed)


def test_feature_penalty_is_mean_square_of_conv_features():
    model = build_model("tiny", seed=0).eval()
    wav = torch.randn(2, 4000)
    with torch.no_grad():
        feats = model.backbone.feature_extractor(wav)
        out = model(wav)
    torch.testing.assert_close(out.features_pen, feats.float().pow(2).mean())


def test_feature_grad_mult_scales_only_conv_gradients():
    grads = {}
    for mult in (1.0, 0.1):
        model = build_model("tiny", seed=0).train()
        wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
        out = model(wav, mask_time_indices=torch.zeros(2, model.num_frames(4000), dtype=torch.bool), feature_grad_mult=mult)
        out.last_hidden_state.pow(2).mean().backward()
        grads[mult] = (
            model.backbone.feature_extractor.conv_layers[0].conv.weight.grad.clone(),
            model.backbone.encoder.layers[0].attention.q_proj.weight.grad.clone(),
        )
    torch.testing.assert_close(grads[0.1][0], grads[1.0][0] * 0.1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[0.1][1], grads[1.0][1])
