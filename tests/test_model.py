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


# ---------------------------------------------------------------- hidden states: MERT's reference on any transformers
def _small(preset: str):
    """A small-width model in ``preset``'s layout (same norm placement, conv norm mode and conv bias)."""
    from transformers import HubertConfig

    from culturemert.model import MertPretrainModel

    backbone, _ = preset_config(preset)
    cfg = backbone.to_dict()
    cfg.update(conv_dim=[16] * 7, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    model = MertPretrainModel(HubertConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}))
    with torch.no_grad():  # a final LayerNorm far from identity, so leaving it out cannot go unnoticed
        model.backbone.encoder.layer_norm.weight.copy_(1.0 + 0.5 * torch.randn(32))
        model.backbone.encoder.layer_norm.bias.copy_(0.5 * torch.randn(32))
    return model.eval()


def _reference_hidden_states(model, wav):
    """MERT's hidden states, written out from its modelling code (transformers 4.x HubertEncoder /
    HubertEncoderStableLayerNorm, which MERT's modeling_MERT.py uses): entry 0 is the encoder input after the
    positional convolution (and, post-LN only, the encoder LayerNorm); entry i the output of layer i; for pre-LN
    the last entry is the final encoder LayerNorm of the last layer's output (= last_hidden_state)."""
    bb = model.backbone
    x = bb.feature_projection(bb.feature_extractor(wav).transpose(1, 2))
    x = x[0] if isinstance(x, tuple) else x
    h = x + bb.encoder.pos_conv_embed(x)
    pre_ln = model.config.do_stable_layer_norm
    if not pre_ln:
        h = bb.encoder.layer_norm(h)
    states = [h]
    for layer in bb.encoder.layers:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
        states.append(h)
    if pre_ln:
        states[-1] = bb.encoder.layer_norm(h)
    return states


@pytest.mark.parametrize("preset", ["mert-v1-330m", "mert-v1-95m"])
def test_hidden_states_equal_merts_reference_for_pre_and_post_ln(preset):
    """Pre-LN (330M layout): transformers 5.x's hidden_states[-1] lacks the final encoder LayerNorm that MERT and
    transformers 4.x include; the model's output must be MERT's on either. Post-LN (95M) is unaffected."""
    model = _small(preset)
    assert model.config.do_stable_layer_norm == (preset == "mert-v1-330m")
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(wav, output_hidden_states=True)
        ref = _reference_hidden_states(model, wav)
    assert len(out.hidden_states) == len(ref) == model.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"hidden state {i}")
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)


def test_sample_rate_check_names_both_rates():
    from culturemert.errors import CheckpointError
    from culturemert.model import MertPretrainModel, check_sample_rate

    backbone, _ = preset_config("tiny")
    model = MertPretrainModel(backbone, sample_rate=16000)
    assert model.sample_rate == 16000 and model.frame_rate == 50.0
    assert model.preprocessor_config["sampling_rate"] == 16000
    with pytest.raises(CheckpointError, match=r"base\.pt declares sample rate 16000 Hz, but pre-training runs at 24000 Hz"):
        check_sample_rate(model, 24000, "pre-training", "base.pt")
    check_sample_rate(build_model("tiny", seed=0), 24000, "pre-training")  # 24 kHz presets pass
    assert build_model("tiny", seed=0).frame_rate == 75.0
