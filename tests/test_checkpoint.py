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
