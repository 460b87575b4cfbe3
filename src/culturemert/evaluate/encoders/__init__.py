"""Music encoders behind one interface (:class:`Encoder`), selected by a spec string.

Spec strings (``--model`` of ``embed`` and ``evaluate``; docs/evaluation.md has the table of families):

==========================  =============================================================================
``baseline:logmel``         log-mel statistics baseline
``preset:NAME[:SEED]``      a randomly initialised MERT preset (a "random features" control; tests)
``PATH`` / ``ORG/NAME``     auto: a culturemert export, a MERT/HuBERT dir or ``.pt`` -> MERT; any other
                            transformers checkpoint -> its transformers family; code in the checkpoint ->
                            refused unless ``trust_remote_code``
``mert:SOURCE``             force the native MERT loader
``hf:SOURCE``               force transformers ``AutoModel`` (e.g. ``hf:facebook/hubert-base-ls960``)
``remote:SOURCE``           a remote-code model (MERT-v2, ...); needs ``trust_remote_code``
``muq:REPO|DIR``            MuQ through the ``muq`` package (extra ``muq``)
``omar-rq:REPO|CONFIG.gin`` OMAR-RQ through the ``omar-rq`` package (extra ``omar-rq``)
``dasheng:base|0.6B|1.2B``  Dasheng through the ``dasheng`` package (extra ``dasheng``); ``SIZE=PATH`` for a
                            local checkpoint
==========================  =============================================================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from culturemert.errors import CheckpointError, UserError
from culturemert.evaluate.encoders.base import Encoder, PeakMemory, fingerprint_of, require_package
from culturemert.evaluate.encoders.logmel import LOGMEL_NAME, LogMelEncoder
from culturemert.evaluate.encoders.mert import MERT_MODEL_TYPES, MertEncoder

__all__ = [
    "Encoder",
    "PeakMemory",
    "MertEncoder",
    "LogMelEncoder",
    "LOGMEL_NAME",
    "PREFIXES",
    "FAMILIES",
    "build_encoder",
    "split_spec",
    "fingerprint_of",
    "require_package",
]

#: spec prefixes; anything else is a path or Hub id
PREFIXES = ("baseline", "preset", "mert", "hf", "remote", "muq", "omar-rq", "dasheng")

#: Supported encoder families (rendered as the table in docs/evaluation.md; a test keeps the two in sync).
#: ``tested``: how tests/test_encoders*.py exercise it offline.
FAMILIES: list[dict[str, str]] = [
    {"family": "MERT-v1 (95M / 330M), culturemert exports", "spec": "m-a-p/MERT-v1-95M, runs/x/export",
     "sample_rate": "24 kHz", "frame_rate": "75 Hz", "layers": "13 / 25", "extra": "-",
     "licence": "CC-BY-NC-4.0 (MERT-v1; earlier card revisions said MIT); exports: yours",
     "tested": "yes: culturemert's MERT model, random init"},
    {"family": "MERT-v0, MERT-v0-public", "spec": "m-a-p/MERT-v0-public", "sample_rate": "16 kHz (declared)",
     "frame_rate": "50 Hz", "layers": "13", "extra": "-", "licence": "CC-BY-NC-4.0",
     "tested": "yes: random MERT whose config declares 16 kHz"},
    {"family": "wav2vec 2.0", "spec": "facebook/wav2vec2-base", "sample_rate": "16 kHz", "frame_rate": "50 Hz",
     "layers": "13 / 25", "extra": "-", "licence": "Apache-2.0", "tested": "yes: Wav2Vec2Model from a config"},
    {"family": "HuBERT", "spec": "hf:facebook/hubert-base-ls960", "sample_rate": "16 kHz", "frame_rate": "50 Hz",
     "layers": "13 / 25", "extra": "-", "licence": "Apache-2.0", "tested": "yes: HubertModel from a config"},
    {"family": "WavLM", "spec": "microsoft/wavlm-base-plus", "sample_rate": "16 kHz", "frame_rate": "50 Hz",
     "layers": "13 / 25", "extra": "-", "licence": "MIT", "tested": "yes: WavLMModel from a config"},
    {"family": "data2vec-audio", "spec": "facebook/data2vec-audio-base", "sample_rate": "16 kHz",
     "frame_rate": "50 Hz", "layers": "13 / 25", "extra": "-", "licence": "Apache-2.0",
     "tested": "yes: Data2VecAudioModel from a config"},
    {"family": "Whisper encoder", "spec": "openai/whisper-base", "sample_rate": "16 kHz", "frame_rate": "50 Hz",
     "layers": "encoder layers + 1 (7 for base, 33 for large)", "extra": "-", "licence": "Apache-2.0",
     "tested": "yes: WhisperModel from a config"},
    {"family": "AST", "spec": "MIT/ast-finetuned-audioset-10-10-0.4593", "sample_rate": "16 kHz",
     "frame_rate": "10 Hz (time patches)", "layers": "13", "extra": "-", "licence": "BSD-3-Clause",
     "tested": "yes: ASTModel from a config"},
    {"family": "CLAP audio (HTSAT)", "spec": "laion/clap-htsat-unfused", "sample_rate": "48 kHz",
     "frame_rate": "one vector per window (<= 10 s)", "layers": "5", "extra": "-", "licence": "Apache-2.0",
     "tested": "yes: ClapModel from a config"},
    {"family": "MERT-v2 and other remote-code models", "spec": "remote:m-a-p/MERT-v2-30s + --trust-remote-code",
     "sample_rate": "declared (24 kHz for MERT-v2)", "frame_rate": "from the config or measured (25 Hz for MERT-v2)",
     "layers": "num_hidden_layers + 1 (25 for MERT-v2)", "extra": "-", "licence": "see the model card",
     "tested": "loader and refusal without the flag: a local dir with its own modelling code"},
    {"family": "MuQ", "spec": "muq:OpenMuQ/MuQ-large-msd-iter", "sample_rate": "24 kHz", "frame_rate": "25 Hz",
     "layers": "13", "extra": "muq (needs torchaudio)", "licence": "CC-BY-NC-4.0",
     "tested": "stand-in with MuQ's interface and geometry (the package imports torchaudio)"},
    {"family": "OMAR-RQ", "spec": "omar-rq:mtg-upf/omar-rq-multicodebook", "sample_rate": "16 kHz (mel) / 24 kHz",
     "frame_rate": "15.63 Hz (mel) / 18.75-25 Hz", "layers": "one per block", "extra": "omar-rq (torchaudio, transformers < 5)",
     "licence": "CC-BY-NC-SA-4.0", "tested": "stand-in with get_model's interface (the package imports torchaudio)"},
    {"family": "Dasheng", "spec": "dasheng:base (0.6B, 1.2B)", "sample_rate": "16 kHz", "frame_rate": "25 Hz",
     "layers": "13 / 33 / 41", "extra": "dasheng (needs torchaudio)", "licence": "Apache-2.0 (repository)",
     "tested": "stand-in with Dasheng's blocks/norm interface (the package imports torchaudio)"},
    {"family": "log-mel baseline", "spec": "baseline:logmel", "sample_rate": "24 kHz", "frame_rate": "100 Hz",
     "layers": "1 (mean and std, 256-d)", "extra": "-", "licence": "-", "tested": "yes"},
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def split_spec(spec: str) -> tuple[str, str]:
    """``(prefix, rest)`` for a spec with a known prefix, ``("", spec)`` for a path or Hub id."""
    if Path(spec).expanduser().exists():
        return "", spec
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES and not rest.startswith(":"):
        return prefix, rest
    return "", spec


def _auto_family(source: str, trust_remote_code: bool) -> str:
    """``mert`` or ``hf`` for an unprefixed source (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_file():
        return "mert"
    if path.is_dir():
        if (path / "culturemert.json").is_file():
            return "mert"
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: directory has neither culturemert.json nor config.json")
    elif "::" in source or not _HUB_ID.match(source):
        return "mert"  # a Hub file inside a repo, or not a source at all: load_model reports it
    from culturemert.evaluate.encoders.hf import read_model_type

    try:
        model_type, _ = read_model_type(source, trust_remote_code)
    except CheckpointError:
        if path.is_dir():
            raise
        return "mert"  # offline and uncached Hub id: load_model gives the download error
    return "mert" if model_type in MERT_MODEL_TYPES else "hf"


def build_encoder(
    spec: str | Any,
    *,
    device: str = "auto",
    precision: str = "fp32",
    trust_remote_code: bool = False,
    name: str | None = None,
) -> Encoder:
    """Build the encoder a spec string names (or wrap an already built MERT model object).

    Raises:
        UserError: unknown spec, remote code without ``trust_remote_code``, a missing optional package.
        CheckpointError: the checkpoint cannot be read or declares inconsistent rates.
    """
    if not isinstance(spec, str):
        return MertEncoder(spec, name or type(spec).__name__, device, precision)
    label = name or spec
    prefix, rest = split_spec(spec)
    if prefix == "baseline":
        if rest != "logmel":
            raise UserError(f"unknown baseline {spec!r}; the baseline is {LOGMEL_NAME}")
        return LogMelEncoder()
    if prefix == "preset":
        from culturemert.model import build_model

        parts = rest.split(":")
        seed = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        return MertEncoder(build_model(parts[0], with_heads=False, seed=seed), label, device, precision, source=spec)
    if prefix == "muq":
        from culturemert.evaluate.encoders.thirdparty import load_muq

        return load_muq(rest, name=label, device=device, precision=precision)
    if prefix == "omar-rq":
        from culturemert.evaluate.encoders.thirdparty import load_omar_rq

        return load_omar_rq(rest, name=label, device=device, precision=precision)
    if prefix == "dasheng":
        from culturemert.evaluate.encoders.thirdparty import load_dasheng

        return load_dasheng(rest, name=label, device=device, precision=precision)
    if prefix in ("hf", "remote"):
        from culturemert.evaluate.encoders.hf import load_transformers_encoder

        return load_transformers_encoder(rest, name=label, device=device, precision=precision,
                                         trust_remote_code=trust_remote_code, force_remote=prefix == "remote")
    family = "mert" if prefix == "mert" else _auto_family(rest, trust_remote_code)
    if family == "mert":
        from culturemert.evaluate.encoders.mert import load_mert

        return load_mert(rest, name=label, device=device, precision=precision)
    from culturemert.evaluate.encoders.hf import load_transformers_encoder

    return load_transformers_encoder(rest, name=label, device=device, precision=precision,
                                     trust_remote_code=trust_remote_code)
