"""Training checkpoints: crash-safe directories (safetensors + JSON, sha256 manifest) holding weights, optimizer
state and :class:`TrainState`, so a resumed run continues bit-identically."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from culturemert.files import apply_default_modes, fsync_dir as _fsync_path, sha256_file as _sha256
from culturemert.errors import CheckpointError, UserError
from culturemert.model import MertPretrainModel

log = logging.getLogger(__name__)


#: Version of the checkpoint directory layout.
CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class TrainState:
    """Everything besides tensors needed to continue a run exactly."""

    stage_index: int = 0
    stage_step: int = 0  # next step of the stage to run (== stage.steps: the stage has finished)
    global_step: int = 0  # optimizer steps attempted so far, skipped ones included
    lr_scale: float = 1.0  # lowered by rollbacks
    rollbacks: int = 0
    bad_streak: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)
    base_fingerprint: str | None = None
    clips_seen: int = 0
    # validation decisions (newest point, per-stage forgetting references, best export): train/validation.py
    monitor: dict[str, Any] = dataclasses.field(default_factory=dict)


def _checkpoint_name(state: TrainState) -> str:
    return f"ckpt-g{state.global_step:09d}-s{state.stage_index:02d}-{state.stage_step:09d}"


_CKPT_RE = re.compile(r"^ckpt-g(\d{9})-s(\d{2})-(\d{9})$")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint directories, oldest first (by global step, then stage)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2)), int(m.group(3))), p))
    return [p for _, p in sorted(found)]


def optimizer_to_files(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors-storable tensors (``\"<param index>.<key>\"``) plus JSON metadata (param
    groups, scalar state, and ``names`` so a resume can check it trains the same parameters)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars, "param_names": names}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_to_files`: a ``state_dict`` for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: Path,
    model: MertPretrainModel,
    optimizer: torch.optim.Optimizer | None,
    param_names: list[str],
    state: TrainState,
    extra: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint directory atomically and prune to the newest ``keep_last``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _checkpoint_name(state)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        opt_meta: dict[str, Any] = {"param_groups": [], "scalars": {}, "param_names": param_names}
        opt_tensors: dict[str, torch.Tensor] = {}
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_to_files(optimizer, param_names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=1), encoding="utf-8")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        payload = {"format": CHECKPOINT_FORMAT, "state": dataclasses.asdict(state), **extra}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "files": files}, indent=1))
        apply_default_modes(tmp)  # safetensors writes 0600 files; a checkpoint gets the umask's modes
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_path(tmp)
        if final.exists():  # re-reached after a rollback: replace
            trash = directory / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclasses.dataclass
class LoadedCheckpoint:
    """A verified training checkpoint: model weights, optimizer tensors + JSON metadata, RNG states, the
    :class:`TrainState` and the trainer's extra fields (recipe hash, stage name)."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict
    rng: dict[str, torch.Tensor]
    state: TrainState
    extra: dict[str, Any]


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint after verifying the sha256 of every file; :class:`CheckpointError` if anything is off."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest.json ({exc})") from None
    required = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"}
    missing = required - set(files)
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {sorted(missing)}")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: checksum mismatch for {name} (corrupted)")
    try:
        payload = json.loads((path / "state.json").read_text(encoding="utf-8"))
        state = TrainState(**payload.pop("state"))
        payload.pop("format", None)
        return LoadedCheckpoint(
            path=path,
            model_state=load_file(str(path / "model.safetensors")),
            optimizer_tensors=load_file(str(path / "optimizer.safetensors")),
            optimizer_meta=json.loads((path / "optimizer.json").read_text(encoding="utf-8")),
            rng=load_file(str(path / "rng.safetensors")),
            state=state,
            extra=payload,
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from None
