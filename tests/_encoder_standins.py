"""Stand-ins for the third-party encoder packages (muq, omar_rq, dasheng).

The real packages import torchaudio at import time, and no torchaudio build for this project's torch can be
installed here, so their model classes cannot be built in the test environment. These modules reproduce the
*interface* the adapters use (names, call signatures, output types) and each model's *geometry* as read from
the packages' source (input rate, hop, patching, number of hidden states), with tiny random layers. They record
the length of every waveform they receive, so tests can check the rate the audio reached the model at.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn


class _Recorder:
    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.loads: list[str] = []


RECORD = _Recorder()


# ------------------------------------------------------------------------------------------------ muq 0.1.0
@dataclass
class MuQConfig:
    label_rate: int = 25
    hop_length: int = 240
    n_mels: int = 128
    conv_dim: int = 8
    encoder_dim: int = 16
    encoder_depth: int = 3
    features: list = field(default_factory=lambda: ["melspec_2048"])


class _Output:
    def __init__(self, last_hidden_state: torch.Tensor, hidden_states: tuple) -> None:
        self.last_hidden_state = last_hidden_state
        self.hidden_states = hidden_states


class MuQ(nn.Module):
    """24 kHz waveform -> frames every hop samples (last dropped) -> two ceil-halving stride-2 steps -> depth layers."""

    def __init__(self, config: MuQConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.hop_length, config.encoder_dim)
        self.layers = nn.ModuleList(nn.Linear(config.encoder_dim, config.encoder_dim) for _ in range(config.encoder_depth))

    @classmethod
    def from_pretrained(cls, repo: str) -> "MuQ":
        RECORD.loads.append(repo)
        torch.manual_seed(0)
        return cls(MuQConfig())

    def forward(self, x: torch.Tensor, attention_mask=None, output_hidden_states: bool = True) -> _Output:
        RECORD.lengths.append(int(x.shape[1]))
        hop = self.config.hop_length
        n = x.shape[1] // hop
        frames = x[:, : n * hop].reshape(x.shape[0], n, hop)
        for _ in range(2):  # Conv2dSubsampling: kernel 3, padding 1, stride 2 in time
            if frames.shape[1] % 2:
                frames = torch.cat([frames, frames[:, -1:]], dim=1)
            frames = 0.5 * (frames[:, 0::2] + frames[:, 1::2])
        h = self.proj(frames)
        states = [h]
        for layer in self.layers:
            h = torch.tanh(layer(h))
            states.append(h)
        return _Output(h, tuple(states))


# --------------------------------------------------------------------------------------------- omar-rq 0.2.1
class _OmarNet(nn.Module):
    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.embed_dim = dim
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))


class _MelRep:
    """The mel input representation: 16 kHz, hop 256, patches of 4 frames (omar-rq-base / multicodebook)."""

    sr, hop_len, n_mel, patch_size = 16_000, 256, 96, (96, 4)


class _OmarModule(nn.Module):
    def __init__(self, dim: int = 12, depth: int = 4):
        super().__init__()
        self.input_rep = _MelRep()
        self.sr, self.hop_length, self.patch_size = 16_000, 256, (96, 4)
        self.embedding_layer = nn.Linear(self.hop_length * 4, dim)
        self.net = _OmarNet(dim, depth)
        self.eps = self.sr / (self.hop_length * self.patch_size[1])

    def extract_embeddings(self, audio: torch.Tensor, layers=None) -> torch.Tensor:
        RECORD.lengths.append(int(audio.shape[1]))
        layers = set(layers) if layers is not None else {len(self.net.layers) - 1}
        n_frames = audio.shape[1] // self.hop_length + 1  # centred STFT frames
        n_patches = n_frames // self.patch_size[1]
        padded = torch.nn.functional.pad(audio, (0, n_patches * self.hop_length * 4))
        x = self.embedding_layer(padded[:, : n_patches * self.hop_length * 4].reshape(audio.shape[0], n_patches, -1))
        out = []
        for i, layer in enumerate(self.net.layers):
            x = torch.tanh(layer(x))
            if i in layers:
                out.append(x)
        return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out, dim=0)


def get_model(model_id=None, config_file=None, device="cpu", quantization_targets=False, load_weights=True):
    RECORD.loads.append(str(model_id or config_file))
    torch.manual_seed(0)
    return _OmarModule().eval()


# --------------------------------------------------------------------------------------------- dasheng 0.0.9
class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class _KwargsSequential(nn.Sequential):
    def forward(self, x, **kwargs):
        for module in self:
            x = module(x, **kwargs)
        return x


class Dasheng(nn.Module):
    """16 kHz, centred 10 ms frames, 4-frame time patches, processed in pieces of ``target_length`` frames."""

    def __init__(self, embed_dim: int = 16, depth: int = 3, target_length: int = 48, pooling: str = "mean"):
        super().__init__()
        self.embed_dim, self.hop_size, self.patch_stride = embed_dim, 160, (64, 4)
        self.target_length, self.pooling = target_length, pooling
        self.patch = nn.Linear(160 * 4, embed_dim)
        self.blocks = _KwargsSequential(*[_Block(embed_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        if pooling == "token":
            self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        RECORD.lengths.append(int(x.shape[1]))
        n_frames = x.shape[1] // self.hop_size + 1
        t = (n_frames - 4) // 4 + 1
        padded = torch.nn.functional.pad(x, (0, 4 * self.hop_size))
        tokens = self.patch(padded[:, : t * 4 * self.hop_size].reshape(x.shape[0], t, -1))
        outputs = []
        for piece in tokens.split(self.target_length // 4, dim=1):
            if self.pooling == "token":
                piece = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), piece], dim=1)
            outputs.append(self.norm(self.blocks(piece, mask=None)))
        return torch.cat(outputs, dim=1)


def _factory(depth: int):
    def build(path=None, **kwargs):
        RECORD.loads.append(str(path))
        torch.manual_seed(0)
        return Dasheng(depth=depth, **kwargs)

    return build


def install(monkeypatch) -> _Recorder:
    """Put the three stand-in packages into ``sys.modules`` for one test; returns the shared recorder."""
    import sys

    RECORD.lengths.clear()
    RECORD.loads.clear()
    muq = types.ModuleType("muq")
    muq.MuQ, muq.MuQConfig = MuQ, MuQConfig
    omar = types.ModuleType("omar_rq")
    omar.get_model = get_model
    dasheng = types.ModuleType("dasheng")
    dasheng.dasheng_base, dasheng.dasheng_06B, dasheng.dasheng_12B = _factory(3), _factory(4), _factory(5)
    for name, module in (("muq", muq), ("omar_rq", omar), ("dasheng", dasheng)):
        monkeypatch.setitem(sys.modules, name, module)
    return RECORD
