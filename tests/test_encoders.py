"""Encoder adapters on randomly initialised models of their real architectures (transformers classes built from
configs, culturemert's MERT), and on stand-ins for the third-party packages (tests/_encoder_standins.py says why).

Each family: the number of hidden states, the frame count for a known duration at the encoder's own rate, that
the waveform reached the model at that rate, and features equal to a direct forward pass on audio resampled to it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers as T

from culturemert.audio import load_audio
from culturemert.errors import CheckpointError, ConfigError, DataError, UserError
from culturemert.evaluate.embed import EmbedSettings, FeatureCache, TrackInput, load_encoder, embed_tracks, normalize_waveform
from culturemert.evaluate.encoders import FAMILIES, build_encoder, split_spec

sys.path.insert(0, str(Path(__file__).parent))
import _encoder_standins as standins  # noqa: E402

S = EmbedSettings(window=1.0, batch_size=2, group_tracks=4, device="cpu", decode_workers=0)
_CONV = dict(conv_dim=(8,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
_SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _write(path: Path, seconds: float, sr: int = 24_000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.normal(size=int(seconds * sr)) * 0.1).astype(np.float32), sr, subtype="FLOAT")
    return path


def _save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def _waveform_model(kind: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    if kind == "wav2vec2":
        model = T.Wav2Vec2Model(T.Wav2Vec2Config(**_SMALL, **_CONV))
    elif kind == "hubert":
        model = T.HubertModel(T.HubertConfig(**_SMALL, **_CONV))
    elif kind == "wavlm":
        model = T.WavLMModel(T.WavLMConfig(**_SMALL, **_CONV, num_buckets=8, max_bucket_distance=20))
    else:
        conv = {k: v for k, v in _CONV.items() if k != "num_conv_pos_embeddings"}
        model = T.Data2VecAudioModel(T.Data2VecAudioConfig(**_SMALL, **conv, conv_pos_kernel_size=5,
                                                           num_conv_pos_embeddings=5))
    return _save(model.eval(), directory)


def _input_lengths(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int((args or tuple(kwargs.values()))[0].shape[-1])),
                                     with_kwargs=True)
    return seen


# ---------------------------------------------------------------------------------------------------------
# transformers: the wav2vec 2.0 family


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm", "data2vec-audio"])
def test_waveform_family_runs_at_16k_with_50hz_frames_and_matches_a_direct_forward(tmp_path, kind):
    directory = _waveform_model(kind, tmp_path / kind)
    spec = f"hf:{directory}" if kind == "hubert" else str(directory)  # a plain hubert dir defaults to the MERT loader
    enc = build_encoder(spec, device="cpu")
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states, enc.dim) == (kind, 16_000, 50.0, 3, 16)
    assert enc.num_frames(16_000) == 49 and enc.min_samples == 400
    seen = _input_lengths(enc.model)
    audio = _write(tmp_path / "one second.wav", 1.0)  # written at 24 kHz: embed must resample to 16 kHz
    settings = S.model_copy(update={"frames": True})
    rep = embed_tracks(enc, [TrackInput("a", audio)], tmp_path / "cache", settings, progress=False)
    assert seen == [16_000]
    cache = FeatureCache(tmp_path / "cache", enc, settings)
    pooled = cache.load(rep.keys["a"])
    frames = np.load(cache.track_path(rep.keys["a"], frames=True))
    assert pooled.shape == (1, 3, 16) and frames.shape == (3, 49, 16)
    wav = normalize_waveform(load_audio(audio, 16_000))
    with torch.no_grad():
        ref = enc.model(torch.from_numpy(wav)[None], output_hidden_states=True).hidden_states
    np.testing.assert_allclose(pooled[0], torch.stack(ref, 1)[0].mean(1).numpy(), atol=1e-5)


def test_cached_features_are_reused_only_for_the_same_encoder_and_settings(tmp_path):
    a = _waveform_model("wav2vec2", tmp_path / "a", seed=0)
    b = _waveform_model("wav2vec2", tmp_path / "b", seed=1)
    audio = [TrackInput(f"t{i}", _write(tmp_path / f"t{i}.wav", 1.2, seed=i)) for i in range(3)]
    first = build_encoder(str(a), device="cpu")
    rep = embed_tracks(first, audio, tmp_path / "cache", S, progress=False)
    assert rep.computed == 3 and first.calls > 0
    again = build_encoder(str(a), device="cpu")  # a fresh load of the same weights: a pure cache hit
    rep2 = embed_tracks(again, audio, tmp_path / "cache", S, progress=False)
    assert (rep2.cached, rep2.computed, again.calls, rep2.model_calls) == (3, 0, 0, 0) and rep2.cache_key == rep.cache_key
    other = build_encoder(str(b), device="cpu")
    rep3 = embed_tracks(other, audio, tmp_path / "cache", S, progress=False)
    assert rep3.computed == 3 and rep3.cache_key != rep.cache_key
    rep4 = embed_tracks(again, audio, tmp_path / "cache", S.model_copy(update={"window": 0.5}), progress=False)
    assert rep4.computed == 3 and rep4.cache_key != rep.cache_key
    # an explicit rate that is not the encoder's is refused, never used
    with pytest.raises(ConfigError, match="16000 Hz"):
        embed_tracks(again, audio, tmp_path / "cache", S.model_copy(update={"sample_rate": 24_000}), progress=False)


# ---------------------------------------------------------------------------------------------------------
# transformers: Whisper, AST, CLAP


def _spy_feature_extractor(enc) -> list[int]:
    """Record the length of every waveform the adapter hands its feature extractor (and the rate it claims)."""
    seen: list[int] = []
    real = enc.fe

    class Spy:
        def __getattr__(self, key):
            return getattr(real, key)

        def __call__(self, batch, **kwargs):
            assert kwargs["sampling_rate"] == enc.sample_rate
            seen.extend(len(w) for w in batch)
            return real(batch, **kwargs)

    enc.fe = Spy()
    return seen


def test_whisper_encoder_keeps_the_frames_of_the_real_audio(tmp_path):
    torch.manual_seed(0)
    config = T.WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                             vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                             max_source_positions=1500, max_target_positions=8)
    directory = _save(T.WhisperModel(config).eval(), tmp_path / "whisper")
    enc = build_encoder(str(directory), device="cpu")
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states, enc.max_window_s) == ("whisper", 16_000, 50.0, 3, 30.0)
    assert enc.num_frames(16_000) == 50
    seen = _spy_feature_extractor(enc)
    settings = S.model_copy(update={"frames": True})
    rep = embed_tracks(enc, [TrackInput("w", _write(tmp_path / "w.wav", 1.0))], tmp_path / "cache", settings, progress=False)
    assert seen == [16_000]
    frames = np.load(FeatureCache(tmp_path / "cache", enc, settings).track_path(rep.keys["w"], frames=True))
    assert frames.shape == (3, 50, 16)
    with pytest.raises(ConfigError, match="at most 30 s"):
        embed_tracks(enc, [], tmp_path / "cache", S.model_copy(update={"window": 40.0}), progress=False)


def test_ast_time_patches_are_10_per_second(tmp_path):
    torch.manual_seed(0)
    config = T.ASTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    directory = _save(T.ASTModel(config).eval(), tmp_path / "ast")
    enc = build_encoder(str(directory), device="cpu")
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states) == ("ast", 16_000, 10.0, 3)
    assert enc.num_frames(16_000) == 10  # 98 fbank frames -> 10 time patches start inside the audio
    seen = _spy_feature_extractor(enc)
    settings = S.model_copy(update={"frames": True})
    rep = embed_tracks(enc, [TrackInput("a", _write(tmp_path / "a.wav", 1.0))], tmp_path / "cache", settings, progress=False)
    assert seen == [16_000]
    frames = np.load(FeatureCache(tmp_path / "cache", enc, settings).track_path(rep.keys["a"], frames=True))
    assert frames.shape == (3, 10, 16)


def test_clap_runs_at_48k_one_vector_per_window_zero_padded_stages(tmp_path):
    torch.manual_seed(0)
    audio_cfg = dict(patch_embeds_hidden_size=8, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                     hidden_size=64, projection_dim=8)
    config = T.ClapConfig(audio_config=audio_cfg, text_config=dict(hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, vocab_size=64), projection_dim=8)
    directory = _save(T.ClapModel(config).eval(), tmp_path / "clap")
    enc = build_encoder(str(directory), device="cpu")
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states, enc.dim) == ("clap", 48_000, None, 5, 64)
    seen = _spy_feature_extractor(enc)
    rep = embed_tracks(enc, [TrackInput("c", _write(tmp_path / "c.wav", 1.0))], tmp_path / "cache", S, progress=False)
    assert seen == [48_000]
    pooled = FeatureCache(tmp_path / "cache", enc, S).load(rep.keys["c"])
    widths = [8, 16, 32, 64, 64]  # patch embedding, then the four Swin stages
    for layer, width in enumerate(widths):
        assert np.all(pooled[0, layer, width:] == 0) and np.any(pooled[0, layer, :width] != 0)
    with pytest.raises(ConfigError, match="--frames"):
        embed_tracks(enc, [TrackInput("c", tmp_path / "c.wav")], tmp_path / "c2", S.model_copy(update={"frames": True}),
                     progress=False)
    with pytest.raises(ConfigError, match="at most 10 s"):
        embed_tracks(enc, [], tmp_path / "cache", S.model_copy(update={"window": 0.0}), progress=False)


# ---------------------------------------------------------------------------------------------------------
# remote code


_REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny-remote-audio"

    def __init__(self, hidden_size=8, num_hidden_layers=2, hop=441, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.num_hidden_layers, self.hop = hidden_size, num_hidden_layers, hop
'''
_REMOTE_MODEL = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteModel(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hop, config.hidden_size)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(config.hidden_size, config.hidden_size)
                                          for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_values, output_hidden_states=False):
        b, s = input_values.shape
        n = s // self.config.hop
        h = self.proj(input_values[:, : n * self.config.hop].reshape(b, n, self.config.hop))
        states = [h]
        for layer in self.layers:
            h = torch.tanh(layer(h))
            states.append(h)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states))
'''


def _remote_dir(root: Path) -> Path:
    directory = root / "remote"
    directory.mkdir()
    (directory / "configuration_tinyremote.py").write_text(_REMOTE_CONFIG)
    (directory / "modeling_tinyremote.py").write_text(_REMOTE_MODEL)
    pkg = root / "tinyremote_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_tinyremote.py").write_text(_REMOTE_CONFIG)
    (pkg / "modeling_tinyremote.py").write_text(_REMOTE_MODEL)
    spec = importlib.util.spec_from_file_location("tinyremote_pkg", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tinyremote_pkg"] = module
    spec.loader.exec_module(module)
    modeling = importlib.import_module("tinyremote_pkg.modeling_tinyremote")
    config = importlib.import_module("tinyremote_pkg.configuration_tinyremote").TinyRemoteConfig()
    config.auto_map = {"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                       "AutoModel": "modeling_tinyremote.TinyRemoteModel"}
    torch.manual_seed(0)
    modeling.TinyRemoteModel(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 22_050,
         "padding_value": 0.0, "do_normalize": False, "return_attention_mask": False}))
    return directory


def test_remote_code_needs_the_flag_runs_at_its_declared_rate_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    directory = _remote_dir(tmp_path)
    with pytest.raises(UserError, match="--trust-remote-code"):
        build_encoder(str(directory), device="cpu")
    with pytest.raises(UserError, match="--trust-remote-code"):
        build_encoder(f"remote:{directory}", device="cpu")
    enc = build_encoder(str(directory), device="cpu", trust_remote_code=True)
    assert enc.trust_remote_code and enc.describe()["trust_remote_code"] is True
    assert (enc.sample_rate, enc.num_hidden_states) == (22_050, 3)
    rep = embed_tracks(enc, [TrackInput("r", _write(tmp_path / "r.wav", 1.0))], tmp_path / "cache", S, progress=False)
    assert rep.computed == 1 and enc.frame_rate == pytest.approx(50.0)  # 22050 / 441, measured on the first batch


# ---------------------------------------------------------------------------------------------------------
# MERT: the declared rate (MERT-v0 style 16 kHz) and non-finite features


def _mert_dir(directory: Path, *, rate: int | None, model_type: str = "mert_model", overflow: bool = False,
              preprocessor_rate: int | None = None) -> Path:
    from culturemert.model import build_model

    model = build_model("tiny", with_heads=False, seed=0)
    if overflow:  # finite weights (loading refuses NaN/inf ones) whose activations overflow float32 to inf
        with torch.no_grad():
            model.backbone.encoder.layers[1].final_layer_norm.weight[3] = 3e38
    model.backbone.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = model_type
    if rate is not None:
        config["sample_rate"] = rate
    (directory / "config.json").write_text(json.dumps(config))
    if preprocessor_rate is not None or rate is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": preprocessor_rate or rate}))
    return directory


def test_mert_checkpoint_declaring_16k_runs_at_16k(tmp_path):
    v0 = build_encoder(str(_mert_dir(tmp_path / "v0", rate=16_000)), device="cpu")
    v1 = build_encoder(str(_mert_dir(tmp_path / "v1", rate=None)), device="cpu")
    assert (v0.family, v0.sample_rate, v0.frame_rate, v0.num_hidden_states) == ("mert", 16_000, 50.0, 3)
    assert (v1.sample_rate, v1.frame_rate) == (24_000, 75.0)
    assert v0.fingerprint == v1.fingerprint  # same weights ...
    seen = _input_lengths(v0.model)
    audio = _write(tmp_path / "x.wav", 1.0)
    r0 = embed_tracks(v0, [TrackInput("x", audio)], tmp_path / "cache", S, progress=False)
    r1 = embed_tracks(v1, [TrackInput("x", audio)], tmp_path / "cache", S, progress=False)
    assert seen == [16_000] and r0.cache_key != r1.cache_key  # ... but the rate keeps their caches apart
    pooled = FeatureCache(tmp_path / "cache", v0, S).load(r0.keys["x"])
    with torch.no_grad():
        ref = v0.model(torch.from_numpy(normalize_waveform(load_audio(audio, 16_000)))[None], output_hidden_states=True)
    np.testing.assert_allclose(pooled[0], torch.stack(ref.hidden_states, 1)[0].mean(1).numpy(), atol=1e-5)
    with pytest.raises(CheckpointError, match="sample_rate is 16000 but preprocessor_config.json sampling_rate is 24000"):
        build_encoder(str(_mert_dir(tmp_path / "bad", rate=16_000, preprocessor_rate=24_000)), device="cpu")
    # a plain HuBERT directory declaring nothing runs at HuBERT's 16 kHz, a MERT one at 24 kHz
    assert build_encoder(str(_mert_dir(tmp_path / "hub", rate=None, model_type="hubert")), device="cpu").sample_rate == 16_000


def test_nan_features_fail_naming_track_and_hidden_state_and_are_never_cached(tmp_path, capsys):
    from culturemert.cli import main

    directory = _mert_dir(tmp_path / "nan", rate=None, overflow=True)
    audio = tmp_path / "audio"
    audio.mkdir()
    _write(audio / "fine name.wav", 1.0)
    enc = build_encoder(str(directory), device="cpu")
    with pytest.raises(DataError, match=r"fine name\.wav.*hidden state 2"):
        embed_tracks(enc, [TrackInput("fine name.wav", audio / "fine name.wav")], tmp_path / "c", S, progress=False)
    assert not list((tmp_path / "c").rglob("*.npy"))
    capsys.readouterr()
    code = main(["embed", str(directory), str(audio), "--out", str(tmp_path / "out"), "--window", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fine name.wav" in err[0] and "hidden state 2" in err[0]
    assert not list((tmp_path / "out").rglob("*.npy"))


# ---------------------------------------------------------------------------------------------------------
# third-party packages (stand-ins)


def test_muq_adapter_24k_25hz(tmp_path, monkeypatch):
    record = standins.install(monkeypatch)
    enc = build_encoder("muq:OpenMuQ/MuQ-large-msd-iter", device="cpu")
    assert record.loads == ["OpenMuQ/MuQ-large-msd-iter"]
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states, enc.dim) == ("muq", 24_000, 25.0, 4, 16)
    settings = S.model_copy(update={"frames": True})
    rep = embed_tracks(enc, [TrackInput("m", _write(tmp_path / "m.wav", 1.0, sr=44_100))], tmp_path / "c", settings,
                       progress=False)
    assert record.lengths == [24_000] and enc.num_frames(24_000) == 25
    assert np.load(FeatureCache(tmp_path / "c", enc, settings).track_path(rep.keys["m"], frames=True)).shape == (4, 25, 16)


def test_omar_rq_adapter_uses_the_model_rate_and_every_block(tmp_path, monkeypatch):
    record = standins.install(monkeypatch)
    enc = build_encoder("omar-rq:mtg-upf/omar-rq-multicodebook", device="cpu")
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states) == ("omar-rq", 16_000, 15.625, 4)
    settings = S.model_copy(update={"frames": True})
    rep = embed_tracks(enc, [TrackInput("o", _write(tmp_path / "o.wav", 1.0))], tmp_path / "c", settings, progress=False)
    assert record.lengths == [16_000] and enc.num_frames(16_000) == 15
    assert np.load(FeatureCache(tmp_path / "c", enc, settings).track_path(rep.keys["o"], frames=True)).shape == (4, 15, 12)


@pytest.mark.parametrize("pooling", ["mean", "token"])
def test_dasheng_adapter_reads_every_block_across_pieces(tmp_path, monkeypatch, pooling):
    record = standins.install(monkeypatch)
    enc = build_encoder("dasheng:base", device="cpu")
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states) == ("dasheng", 16_000, 25.0, 4)
    enc.model.pooling, enc.has_cls = pooling, pooling == "token"
    if pooling == "token":
        enc.model.cls_token = torch.nn.Parameter(torch.randn(1, 1, 16))
    wav = torch.randn(2, 32_000)  # 2 s -> 50 patches, processed by the model in pieces of 12
    states = enc.hidden_states(wav)
    assert [tuple(s.shape) for s in states] == [(2, 50, 16)] * 4 and enc.num_frames(32_000) == 50
    with torch.no_grad():
        out = enc.model(wav)
    skip = 1 if pooling == "token" else 0
    expected = torch.cat([p[:, skip:] for p in out.split(12 + skip, dim=1)], dim=1)
    torch.testing.assert_close(states[-1], expected)  # the last state is the model's own (normalised) output
    assert record.lengths[-1] == 32_000
    with pytest.raises(UserError, match="base, 0.6B or 1.2B"):
        build_encoder("dasheng:huge", device="cpu")


@pytest.mark.parametrize(("spec", "module", "extra"), [("muq:x/y", "muq", "muq"), ("omar-rq:x/y", "omar_rq", "omar-rq"),
                                                       ("dasheng:base", "dasheng", "dasheng")])
def test_missing_third_party_package_is_one_line_naming_pip(tmp_path, monkeypatch, capsys, spec, module, extra):
    from culturemert.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # import of this name now fails as if it were not installed
    with pytest.raises(UserError, match=rf"pip install 'culturemert\[{extra}\]'"):
        build_encoder(spec, device="cpu")
    _write(tmp_path / "a.wav", 0.5)
    capsys.readouterr()
    assert main(["embed", spec, str(tmp_path / "a.wav"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"culturemert[{extra}]" in err[0]


# ---------------------------------------------------------------------------------------------------------
# specs and docs


def test_spec_strings(tmp_path):
    assert split_spec("hf:facebook/wav2vec2-base") == ("hf", "facebook/wav2vec2-base")
    assert split_spec("m-a-p/MERT-v1-95M::MERT-v1-95M_fairseq.pt") == ("", "m-a-p/MERT-v1-95M::MERT-v1-95M_fairseq.pt")
    assert split_spec("unknown:thing") == ("", "unknown:thing")
    odd = tmp_path / "hf:dir"
    odd.mkdir()
    assert split_spec(str(odd)) == ("", str(odd))  # an existing path wins over a prefix
    with pytest.raises(UserError, match="baseline"):
        build_encoder("baseline:nope")
    enc = load_encoder("preset:tiny:3", S)
    assert (enc.family, enc.sample_rate, enc.frame_rate, enc.num_hidden_states) == ("mert", 24_000, 75.0, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        build_encoder(str(empty))


def test_docs_table_lists_every_family():
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for row in FAMILIES:
        assert any(line.startswith(f"| {row['family']} |") for line in table), row["family"]


# ---------------------------------------------------------------------------------------------------------
# evaluate: several encoders side by side, and a re-run that needs no model


def test_evaluate_ranks_encoders_side_by_side_and_a_rerun_does_no_forward(tmp_path, capsys):
    from culturemert.cli import main

    w2v = _waveform_model("wav2vec2", tmp_path / "tiny-wav2vec2")
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = ["path,split,tags"]
    for i in range(12):
        split = ["train", "train", "valid", "valid", "test", "test"][i % 6]  # valid and test hold both classes
        sf.write(audio / f"c{i}.wav", (rng.normal(size=9000) * (0.3 if i % 2 else 0.05)).astype(np.float32), 24_000)
        lines.append(f"audio/c{i}.wav,{split},{'loud|any' if i % 2 else 'any|soft'}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("datasets:\n  - kind: csv\n    name: toy\n    paths: {path: data.csv}\n"
                   "embed: {window: 0.25, device: cpu, decode_workers: 0}\n"
                   "probe: {lrs: [1e-2], seeds: 2, hidden: 8, max_epochs: 2, device: cpu}\n")
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(w2v), "preset:tiny", "baseline:logmel", "--datasets", str(cfg), "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| **rank** | 1 | 2 | 3 |" in printed
    lb = (out / "report" / "leaderboard.md").read_text()
    assert all(name in lb for name in ("tiny-wav2vec2", "preset-tiny", "baseline:logmel"))
    meta = json.loads((out / "features" / "tiny-wav2vec2" / "toy" / "meta.json").read_text())
    assert meta["settings"]["sample_rate"] == 16_000 and meta["encoder"]["frame_rate"] == 50.0
    results = json.loads((out / "runs" / "tiny-wav2vec2" / "toy" / "results.json").read_text())
    assert results["encoder"]["family"] == "wav2vec2" and results["embedding"]["computed"] == 12
    assert (out / "report" / "layers_toy.png").is_file() and (out / "report" / "embedding.csv").is_file()
    # a second evaluate of already-embedded encoders runs no model forward at all
    for runs in (out / "runs").glob("*/toy/results.json"):
        runs.unlink()  # force the probes to run again, so the embedding path is exercised
    assert main(argv) == 0
    for tag in ("tiny-wav2vec2", "preset-tiny", "baseline-logmel"):
        emb = json.loads((out / "runs" / tag / "toy" / "results.json").read_text())["embedding"]
        assert emb["from_cache"] and emb["rerun_model_calls"] == 0 and emb["computed"] == 12, tag
