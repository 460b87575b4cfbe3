"""Checkpoint interop: HF MERT dirs, fairseq checkpoints (no fairseq, no code execution), exports."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from culturemert.model import (
    culturemert_to_fairseq_state_dict,
    load_model,
    model_fingerprint,
    read_export_metadata,
    save_export,
)
from culturemert.safe_pickle import restricted_torch_load
from culturemert.cli import main as cli_main
from culturemert.errors import CheckpointError
from culturemert.model import build_model


def _outputs(model, wav):
    model.eval()
    with torch.no_grad():
        return model(wav, output_hidden_states=True).hidden_states


def _assert_same_outputs(a, b, wav, atol=0.0):
    for ha, hb in zip(_outputs(a, wav), _outputs(b, wav), strict=True):
        torch.testing.assert_close(ha, hb, atol=atol, rtol=0 if atol == 0 else 1e-5)


@pytest.fixture()
def tiny():
    return build_model("tiny", seed=0).eval()


@pytest.fixture()
def wav():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 12000, generator=g) * 0.1


# --------------------------------------------------------------------------------- exports -----------
def test_export_roundtrip_and_plain_automodel(tmp_path, tiny, wav):
    out = save_export(tiny, tmp_path / "exp", card={"name": "t"})
    loaded = load_model(out)
    _assert_same_outputs(tiny, loaded, wav)
    for (k, a), (k2, b) in zip(tiny.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # A plain transformers user loads it with no remote code and gets identical hidden states.
    hf = AutoModel.from_pretrained(out).eval()
    assert type(hf).__name__ == "HubertModel"
    with torch.no_grad():
        hs = hf(wav, output_hidden_states=True).hidden_states
    for a, b in zip(hs, _outputs(tiny, wav), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    meta = read_export_metadata(out)
    assert meta["fingerprint"] == model_fingerprint(tiny)
    assert meta["num_hidden_states"] == tiny.num_layers + 1


def test_export_checksum_detects_corruption(tmp_path, tiny):
    out = save_export(tiny, tmp_path / "exp")
    blob = bytearray((out / "pretraining_heads.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "pretraining_heads.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum mismatch for pretraining_heads.safetensors"):
        load_model(out)


def test_export_in_half_precision_keeps_dtype(tmp_path, tiny):
    out = save_export(tiny, tmp_path / "exp16", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_fingerprint_changes_with_any_weight(tiny):
    before = model_fingerprint(tiny)
    with torch.no_grad():
        tiny.backbone.encoder.layers[-1].final_layer_norm.bias[0] += 1e-3
    assert model_fingerprint(tiny) != before


# --------------------------------------------------------------------------------- HF dirs -----------
def _write_hf_mert_dir(model, directory: Path, *, classic_weight_norm: bool, as_bin: bool) -> None:
    directory.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.update(
        model_type="mert_model",
        architectures=["MERTModel"],
        auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        feature_extractor_cqt=False,
        deepnorm=False,
        attention_relax=-1.0,
        sample_rate=24000,
    )
    (directory / "config.json").write_text(json.dumps(cfg, default=str))
    state = {}
    for k, v in model.backbone.state_dict().items():
        if classic_weight_norm:
            k = k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            )
        state[k] = v.clone().contiguous()
    if as_bin:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))


@pytest.mark.parametrize("classic,as_bin", [(True, True), (False, False), (True, False)])
def test_hf_mert_directory_loads_without_remote_code(tmp_path, tiny, wav, classic, as_bin):
    d = tmp_path / "mert"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=classic, as_bin=as_bin)
    loaded = load_model(d)
    assert loaded.heads is None  # HF MERT checkpoints carry no pre-training heads
    _assert_same_outputs(tiny, loaded, wav)


def test_hf_dir_with_wrong_shapes_is_rejected(tmp_path, tiny):
    d = tmp_path / "mert"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=False, as_bin=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"intermediate_dense\.(weight|bias) has shape"):
        load_model(d)


def test_hf_bin_with_code_is_refused(tmp_path, tiny):
    d = tmp_path / "evil"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=False, as_bin=True)
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(d)
    assert not marker.exists()


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hugging Face Hub.*HF_HUB_OFFLINE=1"):
        load_model("m-a-p/MERT-v1-95M-does-not-exist-locally")


# --------------------------------------------------------------------------------- fairseq -----------
class _Evil:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _install_fake_fairseq():
    """Modules named like fairseq's so the pickle references `fairseq.data.dictionary.Dictionary`."""
    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    mods = {n: types.ModuleType(n) for n in names}

    class Dictionary:  # the shape of fairseq's Dictionary: specials first, then symbols in file order
        def __init__(self, codes):
            self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
            self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(c) for c in codes]
            self.count = [1] * len(self.symbols)
            self.indices = {s: i for i, s in enumerate(self.symbols)}
            self.nspecial = 4

    Dictionary.__module__ = "fairseq.data.dictionary"
    Dictionary.__qualname__ = "Dictionary"
    mods["fairseq.data.dictionary"].Dictionary = Dictionary
    sys.modules.update(mods)
    return Dictionary, names


def _write_fairseq_checkpoint(model, path: Path, *, permute_codes: bool) -> None:
    Dictionary, names = _install_fake_fairseq()
    try:
        hc = model.heads.config
        state = culturemert_to_fairseq_state_dict(model)
        g = torch.Generator().manual_seed(3)
        dicts, rows = [], []
        emb = model.heads.label_embeddings()
        for i in range(hc.n_codebooks):
            codes = torch.randperm(hc.codebook_size, generator=g).tolist() if permute_codes else list(range(hc.codebook_size))
            dicts.append(Dictionary(codes))
            # fairseq row j embeds symbol j of the dictionary
            rows.append(torch.cat([emb[i, : hc.n_special], emb[i, hc.n_special + torch.tensor(codes)]]))
        state["label_embs_concat"] = torch.cat(rows).clone()
        state["encoder_cqt_model.spec_layer.cqt_kernels_real"] = torch.zeros(hc.cqt_bins, 1, 8)
        cfg = model.config
        conv = " + ".join(f"[({d},{k},{s})]" for d, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride))
        ckpt = {
            "args": None,
            "cfg": {
                "model": {
                    "_name": "mert",
                    "conv_feature_layers": conv,
                    "extractor_mode": "default",
                    "encoder_layers": cfg.num_hidden_layers,
                    "encoder_embed_dim": cfg.hidden_size,
                    "encoder_ffn_embed_dim": cfg.intermediate_size,
                    "encoder_attention_heads": cfg.num_attention_heads,
                    "conv_pos": cfg.num_conv_pos_embeddings,
                    "conv_pos_groups": cfg.num_conv_pos_embedding_groups,
                    "final_dim": hc.final_dim,
                    "audio_cqt_bins": hc.cqt_bins,
                    "layer_norm_first": False,
                    "untie_final_proj": True,
                },
                "task": {"labels": [f"encodec_{i}" for i in range(hc.n_codebooks)], "sample_rate": 24000},
            },
            "model": state,
            "criterion": None,
            "optimizer_history": [{"num_updates": 123}],
            "task_state": {"dictionaries": dicts},
            "extra_state": {"epoch": 3},
        }
        torch.save(ckpt, path)
    finally:
        for n in names:
            sys.modules.pop(n, None)


@pytest.mark.parametrize("permute", [False, True])
def test_fairseq_checkpoint_loads_with_heads_without_fairseq(tmp_path, tiny, wav, permute):
    path = tmp_path / "MERT-tiny_fairseq.pt"
    _write_fairseq_checkpoint(tiny, path, permute_codes=permute)
    assert "fairseq" not in sys.modules
    loaded = load_model(path)
    assert "fairseq" not in sys.modules  # nothing was imported to read it
    _assert_same_outputs(tiny, loaded, wav)
    # heads identical, label embeddings back in code order even when the dictionary was permuted
    for (k, a), (_, b) in zip(tiny.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.heads.config == tiny.heads.config


def test_fairseq_checkpoint_with_malicious_payload_is_refused(tmp_path):
    marker = tmp_path / "created-by-payload"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": {}}, "extra_state": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load global 'posix.system'|refusing to load global 'os.system'"):
        load_model(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        restricted_torch_load(path)


def test_truncated_fairseq_checkpoint_reports_cleanly(tmp_path, tiny):
    path = tmp_path / "t.pt"
    _write_fairseq_checkpoint(tiny, path, permute_codes=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(path)


def test_plain_pickle_loads_are_not_used_anywhere():
    """Guard: no module calls pickle.load / torch.load without weights_only or the restricted unpickler."""
    root = Path(__file__).resolve().parents[1] / "src" / "culturemert"
    offenders = []
    for f in root.rglob("*.py"):
        text = f.read_text()
        for line_no, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s.startswith("#"):
                continue
            if "pickle.load(" in s or "pickle.loads(" in s:
                offenders.append(f"{f.name}:{line_no}")
            if "torch.load(" in s and "weights_only" not in s and "pickle_module" not in s:
                # multi-line calls: look at the next lines too
                window = " ".join(text.splitlines()[line_no - 1 : line_no + 3])
                if "weights_only" not in window:
                    offenders.append(f"{f.name}:{line_no}")
    assert not offenders, f"unsafe loads: {offenders}"


# --------------------------------------------------------------------------------- CLI ---------------
def test_convert_cli_fairseq_to_export(tmp_path, tiny, wav, capsys):
    path = tmp_path / "m.pt"
    _write_fairseq_checkpoint(tiny, path, permute_codes=True)
    rc = cli_main(["convert", str(path), "--out", str(tmp_path / "exp")])
    assert rc == 0
    assert "with pre-training heads" in capsys.readouterr().out
    _assert_same_outputs(tiny, load_model(tmp_path / "exp"), wav)


def test_convert_cli_missing_source_is_one_line_error(tmp_path, capsys):
    rc = cli_main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "Traceback" not in err


def test_thirteen_hidden_states_equal_plain_hubert_from_published_layout(tmp_path):
    """Issue 2 (a): a 12-layer MERT-config model in the published HF layout == transformers.HubertModel."""
    from transformers import HubertConfig, HubertModel

    model = build_model("tiny", seed=5).eval()
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = 12
    twelve = build_model("tiny", seed=5)
    twelve.backbone = HubertModel(HubertConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")})).eval()
    d = tmp_path / "mert12"
    _write_hf_mert_dir(twelve, d, classic_weight_norm=True, as_bin=True)
    loaded = load_model(d)
    reference = HubertModel(twelve.backbone.config).eval()
    reference.load_state_dict(twelve.backbone.state_dict())
    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(wav, output_hidden_states=True).hidden_states
    got = _outputs(loaded, wav)
    assert len(got) == len(ref) == 13
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fairseq_and_hf_paths_agree_and_unused_keys_are_reported(tmp_path, tiny, wav, capsys):
    fs = tmp_path / "m.pt"
    _write_fairseq_checkpoint(tiny, fs, permute_codes=False)
    hf = tmp_path / "hf"
    _write_hf_mert_dir(tiny, hf, classic_weight_norm=True, as_bin=False)
    a, b = load_model(fs), load_model(hf)
    _assert_same_outputs(a, b, wav, atol=1e-6)
    assert a.load_report["skipped_recomputable"] == ["encoder_cqt_model.spec_layer.cqt_kernels_real"]
    assert a.heads.label_embs_concat.shape == (2 * (16 + 4), 8)
    assert cli_main(["convert", str(fs), "--out", str(tmp_path / "e")]) == 0
    assert "skipped recomputable buffers: encoder_cqt_model.spec_layer.cqt_kernels_real" in capsys.readouterr().out
    card = (tmp_path / "e" / "README.md").read_text()
    assert "AutoModel.from_pretrained" in card and "license:" in card and "2 transformer layers" in card


# ============================================================================ fidelity: fairseq layer_norm mode ==
class _TransposeLast(torch.nn.Module):
    def forward(self, x):
        return x.transpose(-2, -1)


def _fairseq_conv_extractor(cfg) -> torch.nn.Module:
    """fairseq's ConvFeatureExtractionModel in ``mode="layer_norm"``, written out from its layout: block i is
    Sequential(Conv1d, Dropout, Sequential(TransposeLast, LayerNorm(dim), TransposeLast), GELU), so block i's
    LayerNorm is named ``conv_layers.i.2.1``."""

    class Extractor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_layers = torch.nn.ModuleList()
            in_d = 1
            for dim, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
                self.conv_layers.append(torch.nn.Sequential(
                    torch.nn.Conv1d(in_d, dim, k, stride=s, bias=cfg.conv_bias),
                    torch.nn.Dropout(0.0),
                    torch.nn.Sequential(_TransposeLast(), torch.nn.LayerNorm(dim), _TransposeLast()),
                    torch.nn.GELU(),
                ))
                in_d = dim

        def forward(self, wav):
            x = wav.unsqueeze(1)
            for block in self.conv_layers:
                x = block(x)
            return x

    torch.manual_seed(11)
    ext = Extractor().eval()
    with torch.no_grad():
        for p in ext.parameters():  # LayerNorm affine away from (1, 0), so a dropped or misplaced one shows
            p.add_(0.3 * torch.randn_like(p))
    return ext


def _layer_norm_mode_model():
    """HuBERT-large-style tiny backbone: extractor_mode layer_norm, conv bias, pre-LN encoder."""
    from transformers import HubertConfig

    from culturemert.model import MertPretrainModel

    cfg = build_model("tiny").config.to_dict()
    cfg.update(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
    torch.manual_seed(12)
    return MertPretrainModel(HubertConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})).eval()


def _fairseq_cfg(cfg, extractor_mode: str, layer_norm_first: bool, sample_rate: int = 24000, normalize: bool = False):
    conv = " + ".join(f"[({d},{k},{s})]" for d, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride))
    return {
        "model": {"_name": "hubert", "conv_feature_layers": conv, "extractor_mode": extractor_mode,
                  "encoder_layers": cfg.num_hidden_layers, "encoder_embed_dim": cfg.hidden_size,
                  "encoder_ffn_embed_dim": cfg.intermediate_size, "encoder_attention_heads": cfg.num_attention_heads,
                  "conv_pos": cfg.num_conv_pos_embeddings, "conv_pos_groups": cfg.num_conv_pos_embedding_groups,
                  "layer_norm_first": layer_norm_first, "conv_bias": cfg.conv_bias, "final_dim": 8},
        "task": {"_name": "hubert_pretraining", "sample_rate": sample_rate, "normalize": normalize, "label_rate": 50.0},
    }


def test_fairseq_layer_norm_extractor_maps_each_blocks_layernorm(tmp_path, wav):
    """fairseq puts block i's LayerNorm at conv_layers.i.2.1 (after the Dropout at .1); the mapping expected .1.1."""
    from transformers import HubertModel

    model = _layer_norm_mode_model()
    fs_conv = _fairseq_conv_extractor(model.config)
    state = {k: v for k, v in culturemert_to_fairseq_state_dict(model).items() if not k.startswith("feature_extractor.")}
    state.update({f"feature_extractor.{k}": v.clone() for k, v in fs_conv.state_dict().items()})
    assert "feature_extractor.conv_layers.3.2.1.weight" in state and "feature_extractor.conv_layers.3.0.bias" in state
    path = tmp_path / "hubert_large_style.pt"
    torch.save({"args": None, "cfg": _fairseq_cfg(model.config, "layer_norm", True), "model": state}, path)

    loaded = load_model(path)
    assert loaded.config.feat_extract_norm == "layer" and loaded.config.do_stable_layer_norm
    assert loaded.load_report["unused_keys"] == []
    with torch.no_grad():  # the conv front end computes what fairseq's does with these weights
        torch.testing.assert_close(loaded.backbone.feature_extractor(wav), fs_conv(wav), atol=1e-6, rtol=1e-5)
    # the rest of the backbone is the source model's
    ref = model.backbone.state_dict()
    for k, v in loaded.backbone.state_dict().items():
        if not k.startswith("feature_extractor."):
            assert torch.equal(v, ref[k]), k
    # a plain transformers HubertModel with the same weights gives the same hidden states
    hf = HubertModel(loaded.config).eval()
    hf.load_state_dict(loaded.backbone.state_dict())
    with torch.no_grad():
        hs = hf(wav, output_hidden_states=True)
        ours = loaded(wav, output_hidden_states=True).hidden_states
    for a, b in zip(ours[:-1], hs.hidden_states[:-1], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(ours[-1], hs.last_hidden_state, atol=0, rtol=0)
    # and the inverse mapping writes the fairseq names back
    back = culturemert_to_fairseq_state_dict(loaded)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


# ============================================================================ non-finite weights ===============
def _poison(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


def test_nan_in_hf_safetensors_is_refused_naming_file_and_tensor(tmp_path, tiny):
    d = tmp_path / "mert"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=False, as_bin=False)
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    sd["encoder.layers.1.attention.q_proj.weight"] = _poison(sd["encoder.layers.1.attention.q_proj.weight"])
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor encoder\.layers\.1\.attention\.q_proj\.weight holds 1 non-finite value\(s\) \(1 NaN, 0 inf\)"):
        load_model(d)


def test_inf_in_hf_bin_is_refused(tmp_path, tiny):
    d = tmp_path / "mert"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=True, as_bin=True)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["feature_projection.projection.bias"] = _poison(sd["feature_projection.projection.bias"], float("-inf"))
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: tensor feature_projection\.projection\.bias holds 1 non-finite.*1 inf"):
        load_model(d)


def test_nan_in_fairseq_checkpoint_is_refused(tmp_path, tiny):
    path = tmp_path / "m.pt"
    _write_fairseq_checkpoint(tiny, path, permute_codes=False)
    _install_fake_fairseq()
    try:
        ckpt = torch.load(path, weights_only=False)
        ckpt["model"]["final_proj.weight"] = _poison(ckpt["model"]["final_proj.weight"])
        torch.save(ckpt, path)
    finally:
        for n in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
            sys.modules.pop(n, None)
    with pytest.raises(CheckpointError, match=r"m\.pt: tensor final_proj\.weight holds 1 non-finite"):
        load_model(path)


def test_nan_in_export_backbone_or_heads_is_refused(tmp_path, tiny):
    bad = build_model("tiny", seed=0)
    with torch.no_grad():
        bad.backbone.encoder.layers[0].feed_forward.output_dense.weight[0, 0] = float("nan")
    out = save_export(bad, tmp_path / "exp")  # writing is allowed (merge refuses its own NaN); loading is not
    with pytest.raises(CheckpointError, match=r"exp/model\.safetensors: tensor encoder\.layers\.0\.feed_forward\.output_dense\.weight holds"):
        load_model(out)
    bad_heads = build_model("tiny", seed=0)
    with torch.no_grad():
        bad_heads.heads.label_embs_concat[3, 1] = float("inf")
    out = save_export(bad_heads, tmp_path / "exp2")
    with pytest.raises(CheckpointError, match=r"pretraining_heads\.safetensors: tensor label_embs_concat holds 1 non-finite"):
        load_model(out)
    assert load_model(out, with_heads=False).heads is None  # the backbone alone is fine


def test_nan_through_a_hub_id_is_refused(tmp_path, tiny, monkeypatch):
    import culturemert.model.load as load_mod

    d = tmp_path / "snapshot"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=False, as_bin=False)
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    sd["masked_spec_embed"] = _poison(sd["masked_spec_embed"])
    save_file(sd, str(d / "model.safetensors"))
    monkeypatch.setattr(load_mod, "download_from_hub", lambda source: d)
    with pytest.raises(CheckpointError, match="tensor masked_spec_embed holds 1 non-finite"):
        load_model("some-org/some-mert")


def test_convert_cli_refuses_nan_in_one_line(tmp_path, tiny, capsys):
    d = tmp_path / "mert"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=False, as_bin=False)
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    sd["encoder.layers.1.attention.q_proj.weight"] = _poison(sd["encoder.layers.1.attention.q_proj.weight"])
    save_file(sd, str(d / "model.safetensors"))
    assert cli_main(["convert", str(d), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "q_proj.weight" in err and "Traceback" not in err
    assert not (tmp_path / "exp").exists()


# ============================================================================ sample rate and preprocessing ====
_MERT_V0_PREPROCESSOR = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": 16000,
                         "do_normalize": True, "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                         "return_attention_mask": True}


def _write_16k_dir(model, d: Path, preprocessor: dict | None = _MERT_V0_PREPROCESSOR, config_rate: int | None = 16000) -> None:
    _write_hf_mert_dir(model, d, classic_weight_norm=True, as_bin=False)
    cfg = json.loads((d / "config.json").read_text())
    if config_rate is None:
        cfg.pop("sample_rate")
    else:
        cfg["sample_rate"] = config_rate
    (d / "config.json").write_text(json.dumps(cfg))
    if preprocessor is not None:
        (d / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def test_16khz_source_keeps_its_rate_and_preprocessing_through_convert(tmp_path, tiny, capsys):
    """A MERT-v0-style 16 kHz directory used to be exported as 24 kHz with do_normalize rewritten to false."""
    d = tmp_path / "mert16k"
    _write_16k_dir(tiny, d)
    model = load_model(d)
    assert model.sample_rate == 16000 and model.frame_rate == 50.0
    assert model.preprocessor_config == _MERT_V0_PREPROCESSOR
    assert cli_main(["convert", str(d), "--out", str(tmp_path / "exp")]) == 0
    assert "16000 Hz input, 50 frames/s" in capsys.readouterr().out
    exp = tmp_path / "exp"
    assert json.loads((exp / "preprocessor_config.json").read_text()) == _MERT_V0_PREPROCESSOR
    assert json.loads((exp / "config.json").read_text())["sample_rate"] == 16000
    meta = read_export_metadata(exp)
    assert meta["sample_rate"] == 16000 and meta["frame_rate"] == 50.0 and meta["preprocessor_notes"] == []
    assert "16000 Hz; 50 frames/s" in (exp / "README.md").read_text()
    again = load_model(exp)
    assert again.sample_rate == 16000 and again.preprocessor_config == _MERT_V0_PREPROCESSOR
    # and a plain transformers user reads the same rate
    from transformers import AutoFeatureExtractor

    assert AutoFeatureExtractor.from_pretrained(exp).sampling_rate == 16000


def test_pretraining_check_refuses_a_16khz_base(tmp_path, tiny):
    from culturemert.model import check_sample_rate

    d = tmp_path / "mert16k"
    _write_16k_dir(tiny, d)
    with pytest.raises(CheckpointError, match="declares sample rate 16000 Hz, but pre-training runs at 24000 Hz"):
        check_sample_rate(load_model(d), 24000, "pre-training", str(d))


def test_rates_that_disagree_are_refused_naming_both(tmp_path, tiny):
    d = tmp_path / "mixed"
    _write_16k_dir(tiny, d, preprocessor={**_MERT_V0_PREPROCESSOR, "sampling_rate": 24000})
    with pytest.raises(CheckpointError, match="config.json sample_rate is 16000 but preprocessor_config.json sampling_rate is 24000"):
        load_model(d)
    out = save_export(build_model("tiny", seed=0), tmp_path / "exp")
    meta = json.loads((out / "culturemert.json").read_text())
    meta["sample_rate"] = 16000
    (out / "culturemert.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="but culturemert.json sample_rate is 16000"):
        load_model(out)


def test_source_without_preprocessor_gets_defaults_and_says_so(tmp_path, tiny, capsys):
    d = tmp_path / "bare"
    _write_16k_dir(tiny, d, preprocessor=None, config_rate=None)
    assert cli_main(["convert", str(d), "--out", str(tmp_path / "conv")]) == 0
    assert "note: the source declared no sample rate; 24000 Hz (MERT-v1) assumed" in capsys.readouterr().out
    model = load_model(d)
    assert model.sample_rate == 24000 and model.preprocessor_config["do_normalize"] is False
    out = save_export(model, tmp_path / "exp")
    notes = read_export_metadata(out)["preprocessor_notes"]
    assert any("no sample rate" in n for n in notes) and any("no preprocessor_config.json" in n for n in notes)
    assert json.loads((out / "preprocessor_config.json").read_text())["sampling_rate"] == 24000


def test_fairseq_task_sample_rate_and_normalize_are_kept(tmp_path):
    model = _layer_norm_mode_model()
    path = tmp_path / "m16.pt"
    torch.save({"cfg": _fairseq_cfg(model.config, "layer_norm", True, sample_rate=16000, normalize=True),
                "model": culturemert_to_fairseq_state_dict(model)}, path)
    loaded = load_model(path)
    assert loaded.sample_rate == 16000 and loaded.preprocessor_config["do_normalize"] is True
    out = save_export(loaded, tmp_path / "exp")
    assert json.loads((out / "preprocessor_config.json").read_text())["sampling_rate"] == 16000
    assert any("fairseq task config" in n for n in read_export_metadata(out)["preprocessor_notes"])


# ============================================================================ omegaconf DictConfig cfg =========
_OMEGACONF_MODULES = ("omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.dictconfig", "omegaconf.listconfig",
                      "fairseq", "fairseq.dataclass", "fairseq.dataclass.constants")


def _omegaconf_standins():
    """Classes with omegaconf 2.0's module/class names and pickled state (``__getstate__`` = the instance dict,
    NEWOBJ + BUILD), as fairseq 0.10/1.0 pickled ``cfg``. Checked against a real omegaconf 2.0.6 pickle of a
    structured fairseq-style config: it references omegaconf.{base.Metadata, base.ContainerMetadata,
    dictconfig.DictConfig, listconfig.ListConfig, nodes.*Node}, __builtin__ dict/list/long/unicode/float/bool,
    collections.defaultdict, typing.Any/List, _operator.getitem and the config's enum and dataclass types."""
    import collections
    import enum
    import typing

    mods = {n: types.ModuleType(n) for n in _OMEGACONF_MODULES}

    class Choices(str, enum.Enum):  # fairseq's EXTRACTOR_MODE_CHOICES
        default = "default"
        layer_norm = "layer_norm"

    class Metadata:
        def __init__(self, ref_type, object_type, optional, key):
            self.ref_type, self.object_type, self.optional, self.key = ref_type, object_type, optional, key
            self.flags = {}
            self.resolver_cache = collections.defaultdict(dict)

    class ContainerMetadata(Metadata):
        def __init__(self, key, ref_type=typing.Any, object_type=dict, element_type=None):
            super().__init__(ref_type, object_type, True, key)
            self.key_type, self.element_type = typing.Any, element_type

    def node_class(name, ref_type):
        def init(self, value, key, parent):
            self._metadata = Metadata(ref_type, None, True, key)
            self._parent, self._val = parent, value
        return type(name, (), {"__init__": init})

    nodes = {t: node_class(n, t) for n, t in (("StringNode", str), ("IntegerNode", int), ("FloatNode", float),
                                              ("BooleanNode", bool), ("AnyNode", typing.Any))}
    EnumNode = node_class("EnumNode", Choices)

    class ListConfig:
        def __init__(self, items, key, parent):
            self._metadata = ContainerMetadata(key, ref_type=typing.List[str], object_type=list, element_type=str)
            self._parent = parent
            self._content = [nodes[type(v)](v, i, self) for i, v in enumerate(items)]

    class DictConfig:
        def __init__(self, content, key=None, parent=None):
            self._metadata = ContainerMetadata(key)
            self._parent = parent
            self._content = {}
            for k, v in content.items():
                if isinstance(v, dict):
                    self._content[k] = DictConfig(v, k, self)
                elif isinstance(v, list):
                    self._content[k] = ListConfig(v, k, self)
                elif isinstance(v, Choices):
                    self._content[k] = EnumNode(v, k, self)
                else:
                    self._content[k] = nodes.get(type(v), nodes[typing.Any])(v, k, self)

    placed = [(Metadata, "omegaconf.base"), (ContainerMetadata, "omegaconf.base"), (ListConfig, "omegaconf.listconfig"),
              (DictConfig, "omegaconf.dictconfig"), (EnumNode, "omegaconf.nodes"), (Choices, "fairseq.dataclass.constants"),
              *((cls, "omegaconf.nodes") for cls in nodes.values())]
    for cls, mod in placed:
        cls.__module__ = mod
        cls.__qualname__ = cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    sys.modules.update(mods)
    return DictConfig, Choices


def test_fairseq_checkpoint_with_pickled_omegaconf_cfg_loads(tmp_path, wav):
    """Older fairseq pickled cfg as an omegaconf DictConfig (protocol 2: builtins as __builtin__ dict/long/unicode);
    it was refused as 'arbitrary code'. Also exercises interpolations and an enum extractor_mode."""
    import pickletools

    model = _layer_norm_mode_model()
    DictConfig, Choices = _omegaconf_standins()
    try:
        plain = _fairseq_cfg(model.config, "layer_norm", True, sample_rate=16000)
        plain["model"]["extractor_mode"] = Choices.layer_norm
        plain["model"]["label_rate"] = "${task.label_rate}"
        plain["task"]["labels"] = ["km"]
        path = tmp_path / "hubert_omegaconf.pt"
        torch.save({"args": None, "cfg": DictConfig(plain), "model": culturemert_to_fairseq_state_dict(model),
                    "optimizer_history": [{"num_updates": 7}]}, path)
    finally:
        for n in _OMEGACONF_MODULES:
            sys.modules.pop(n, None)
    import zipfile

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert {"__builtin__ dict", "__builtin__ long", "__builtin__ unicode", "_operator getitem", "typing List",
            "omegaconf.dictconfig DictConfig", "omegaconf.nodes EnumNode"} <= names
    loaded = load_model(path)
    assert "omegaconf" not in sys.modules and "fairseq" not in sys.modules
    assert loaded.config.feat_extract_norm == "layer" and loaded.sample_rate == 16000
    assert loaded.load_report["num_updates"] == 7
    _assert_same_outputs(model, loaded, wav)


@pytest.mark.parametrize("module,name", [
    ("__builtin__", "eval"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("__builtin__", "__import__"), ("builtins", "compile"), ("builtins", "open"),
    ("builtins", "type"), ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("operator", "attrgetter"),
    ("functools", "partial"), ("__builtin__", "reduce"), ("copy_reg", "__newobj__"), ("runpy", "run_path"),
])
def test_executable_globals_stay_refused(module, name):
    """The Python-2 name translation and the builtin data types must not open a door to any callable."""
    import io
    import pickle

    from culturemert.safe_pickle import RestrictedUnpickler

    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x03\x00\x00\x00abc\x85R."
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(payload), policy="checkpoint").load()


def test_subscripting_real_objects_is_refused():
    """operator.getitem is admitted for typing.List[str]-style stand-ins only."""
    import io
    import pickle

    from culturemert.safe_pickle import RestrictedUnpickler

    # getitem(("a", "b"), 0)
    payload = b"\x80\x02c_operator\ngetitem\nX\x01\x00\x00\x00aX\x01\x00\x00\x00b\x86K\x00\x86R."
    with pytest.raises(pickle.UnpicklingError, match="only inert stand-ins may be subscripted"):
        RestrictedUnpickler(io.BytesIO(payload), policy="checkpoint").load()


# ============================================================================ files that contradict each other ==
def test_safetensors_and_bin_must_agree(tmp_path, tiny, wav):
    d = tmp_path / "both"
    _write_hf_mert_dir(tiny, d, classic_weight_norm=False, as_bin=False)
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    torch.save(sd, d / "pytorch_model.bin")
    _assert_same_outputs(tiny, load_model(d), wav)  # identical copies: fine
    sd["encoder.layer_norm.bias"] = sd["encoder.layer_norm.bias"] + 1.0
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors and pytorch_model.bin disagree on tensor encoder.layer_norm.bias"):
        load_model(d)


def _shard(tiny, d: Path, with_index: bool = True) -> dict[str, str]:
    d.mkdir(parents=True)
    _write_hf_mert_dir(tiny, d / "_src", classic_weight_norm=False, as_bin=False)
    (d / "config.json").write_text((d / "_src" / "config.json").read_text())
    from safetensors.torch import load_file

    sd = load_file(d / "_src" / "model.safetensors")
    import shutil

    shutil.rmtree(d / "_src")
    names = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in parts.items():
        save_file({k: sd[k] for k in keys}, str(d / shard))
        weight_map.update({k: shard for k in keys})
    if with_index:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_weights_load_only_as_their_index_says(tmp_path, tiny, wav):
    d = tmp_path / "sharded"
    weight_map = _shard(tiny, d)
    _assert_same_outputs(tiny, load_model(d), wav)
    index = d / "model.safetensors.index.json"
    # a shard on disk that the index does not list
    save_file({"x": torch.zeros(1)}, str(d / "model-00003-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="shard model-00003-of-00003.safetensors is not listed in model.safetensors.index.json"):
        load_model(d)
    (d / "model-00003-of-00003.safetensors").unlink()
    # the index places a tensor in the other shard
    k = next(iter(weight_map))
    moved = {**weight_map, k: "model-00002-of-00002.safetensors" if weight_map[k].startswith("model-00001") else "model-00001-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(CheckpointError, match=f"holds tensor {k}, which model.safetensors.index.json places in"):
        load_model(d)
    index.write_text(json.dumps({"weight_map": weight_map}))
    # a single-file checkpoint next to the shards
    from safetensors.torch import load_file

    save_file(load_file(d / "model-00001-of-00002.safetensors"), str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="holds both model.safetensors and sharded weights"):
        load_model(d)


def test_shards_without_index_must_be_one_complete_set(tmp_path, tiny, wav):
    d = tmp_path / "noindex"
    _shard(tiny, d, with_index=False)
    _assert_same_outputs(tiny, load_model(d), wav)
    (d / "model-00002-of-00002.safetensors").rename(d / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="do not form one complete set"):
        load_model(d)


def test_export_with_an_unlisted_weight_file_is_refused(tmp_path, tiny):
    out = save_export(tiny, tmp_path / "exp")
    (out / "notes.txt").write_text("harmless")
    load_model(out)
    torch.save(tiny.backbone.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not listed in culturemert.json"):
        load_model(out)


def test_export_whose_recorded_fingerprint_does_not_match_is_refused(tmp_path, tiny):
    from culturemert.model import LazyExport

    out = save_export(tiny, tmp_path / "exp")
    meta = json.loads((out / "culturemert.json").read_text())
    meta["fingerprint"] = "0" * 64
    (out / "culturemert.json").write_text(json.dumps(meta))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="does not have the fingerprint culturemert.json records"):
            load_model(out, verify=verify)
    with pytest.raises(CheckpointError, match="does not have the fingerprint"):
        LazyExport(out)


def test_export_heads_record_must_match_the_heads_file(tmp_path, tiny):
    out = save_export(tiny, tmp_path / "exp")
    meta = json.loads((out / "culturemert.json").read_text())
    meta["heads"]["final_dim"] = 4
    (out / "culturemert.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"pretraining_heads.safetensors: head tensor .* has shape .*the heads config implies"):
        load_model(out)
    meta["heads"] = None
    (out / "culturemert.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="records no heads but lists pretraining_heads.safetensors"):
        load_model(out)


def test_fairseq_final_dim_that_disagrees_with_the_head_tensors_is_refused(tmp_path, tiny):
    path = tmp_path / "m.pt"
    _write_fairseq_checkpoint(tiny, path, permute_codes=False)
    _install_fake_fairseq()
    try:
        ckpt = torch.load(path, weights_only=False)
        ckpt["cfg"]["model"]["final_dim"] = 4  # the tensors are for final_dim 8
        torch.save(ckpt, path)
    finally:
        for n in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
            sys.modules.pop(n, None)
    with pytest.raises(CheckpointError, match=r"m\.pt: head tensor (final_proj\.weight|label_embs_concat) has shape \((16, 32|40, 8)\), the heads config implies"):
        load_model(path)
