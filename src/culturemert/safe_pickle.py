"""The one policy for reading pickles: nothing in a file we did not write may run code.

fairseq checkpoints (``.pt``), ``pytorch_model.bin`` fallbacks and some dataset metadata (ccml's pickled
``metadata.npy``, MagnaTagATune's Python-2 ``*.cP`` lists) are pickles. ``pickle`` resolves every global a file
names, and a global can be any callable (``os.system``), so a plain ``torch.load(weights_only=False)`` or
``np.load(allow_pickle=True)`` runs whatever the file's author chose. Here every global goes through one
allow-list (:class:`RestrictedUnpickler`); classes whose *data* we need but whose code we must not run (fairseq's
``Dictionary``, omegaconf containers, ``argparse.Namespace``) become inert stand-ins that only record their state,
which :func:`to_plain` turns back into dicts and lists.

Pickles written with protocol 2 (``torch.save``'s default, so every fairseq checkpoint) name builtins the
Python-2 way (``__builtin__ dict``, ``__builtin__ long``, ``__builtin__ unicode``); those names are translated with
the standard library's own Python-2 table (``_compat_pickle``) *before* the allow-list is consulted, so the
translation can never admit anything the allow-list does not. An omegaconf 2.0 ``DictConfig`` (how older fairseq
saved ``cfg``) references, besides its own classes, ``__builtin__`` dict/list/long/unicode/float/bool,
``collections.defaultdict``, ``typing.Any``/``typing.List`` and ``_operator.getitem`` (``typing.List[str]`` is pickled
as ``getitem(List, str)``), plus the config dataclasses and enums of the model and task, all of which are data here.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch

from culturemert.errors import CheckpointError

__all__ = ["Policy", "RestrictedUnpickler", "restricted_torch_load", "to_plain"]

Policy = Literal["checkpoint", "data", "builtins"]


class _Inert:
    """Stand-in for a class we refuse to import: records constructor args and pickled state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_state"] = state
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str):
                    self.__dict__[k] = v

    def __setitem__(self, key: Any, value: Any) -> None:  # dict-like containers pickled via SETITEMS
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:  # list-like containers pickled via APPENDS
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__.setdefault("_list", []).extend(values)


def _make_inert(module: str, name: str) -> type:
    return type(name, (_Inert,), {"__module__": module, "_qualified": f"{module}.{name}"})


class _Subscripted(_Inert):
    """What ``typing.List[str]`` (pickled as ``operator.getitem(List, str)``) becomes: a record, no code run."""


def _inert_getitem(obj: Any, key: Any) -> Any:
    # Only subscripting of stand-ins is admitted: the real operator.getitem on a real object could run its
    # __getitem__, and nothing but typing-style annotations needs it in the pickles we read.
    if isinstance(obj, _Inert) or (isinstance(obj, type) and issubclass(obj, _Inert)):
        return _Subscripted(obj, key)
    raise pickle.UnpicklingError(f"refusing operator.getitem on {type(obj).__name__}: only inert stand-ins may be subscripted")


def _inert_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor (protocols 0/1) calls base.__new__(cls) and base.__init__(obj, state): admitted only
    # when it builds a stand-in from plain object, where neither call can run foreign code.
    if isinstance(cls, type) and issubclass(cls, _Inert) and base is object and state is None:
        return cls.__new__(cls)
    raise pickle.UnpicklingError("refusing copyreg._reconstructor outside inert stand-ins")


# Globals that are safe to resolve to the real object (they only rebuild data).
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("collections", "defaultdict"): __import__("collections").defaultdict,
    # builtin data types only: no eval/exec/getattr/__import__/open/type/compile or any other callable
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bool"): bool,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_operator", "getitem"): _inert_getitem,
    ("operator", "getitem"): _inert_getitem,
    ("copyreg", "_reconstructor"): _inert_reconstructor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
for _dt in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool"):
    _SAFE_GLOBALS[("torch", f"{_dt}Storage")] = getattr(torch, f"{_dt}Storage")
for _name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _SAFE_GLOBALS[("torch", _name)] = getattr(torch, _name)

# Classes replaced by inert stand-ins (module prefix match): their data is kept, their code never runs.
# ``mert_fairseq.`` is MERT's fairseq user directory (its model and task config dataclasses appear as omegaconf
# ``object_type``s in checkpoints that pickled the config).
_INERT_PREFIXES = (
    "fairseq.",
    "mert_fairseq.",
    "omegaconf.",
    "argparse.Namespace",
    "enum.",
    "typing.",
    "numpy.",
)


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 spelling of a global a protocol-0..2 pickle names the Python-2 way (``__builtin__ long`` ->
    ``builtins int``), from the standard library's own table; other names are returned unchanged."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve_numpy(module: str, name: str) -> Any | None:
    """numpy scalars/arrays appear in fairseq's extra_state (metrics); rebuild them with numpy's own reducers."""
    import numpy as np

    allowed = {
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
    }
    if (module, name) not in allowed:
        return None
    if name == "dtype":
        return np.dtype
    if name == "ndarray":
        return np.ndarray
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    return getattr(mod, name)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals; every other global is refused before it can run.

    ``policy`` chooses the allow-list: ``"checkpoint"`` admits tensors and their storages, numpy arrays and
    scalars, plain containers, and inert stand-ins for fairseq/omegaconf/argparse metadata; ``"data"`` admits
    numpy arrays and builtin data only; ``"builtins"`` admits no global at all.

    Raises:
        pickle.UnpicklingError: on the first refused global, naming it.
    """

    def __init__(self, file: Any, *args: Any, policy: Policy = "checkpoint", **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        self.policy = policy

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        module, name = _python3_name(module, name)
        key = (module, name)
        if self.policy == "checkpoint" and key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if self.policy != "builtins" and module.startswith("numpy"):
            obj = _resolve_numpy(module, name)
            if obj is not None:
                return obj
        full = f"{module}.{name}"
        if self.policy == "checkpoint" and any(full.startswith(p) for p in _INERT_PREFIXES):
            return _make_inert(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {full!r}: unpickling it could run arbitrary code; "
            + _ADMITTED[self.policy]
        )


_ADMITTED = {
    "checkpoint": "only tensors, plain containers and inert stand-ins for fairseq/omegaconf metadata are admitted",
    "data": "only numpy arrays and builtin data are admitted",
    "builtins": "only builtin data (no globals) is admitted",
}


class _CheckpointPickleModule:
    """Passed to ``torch.load(pickle_module=...)`` so torch's zip/storage handling uses our find_class."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, policy="checkpoint", **kwargs).load()

    __name__ = "culturemert_restricted_pickle"


def restricted_torch_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` on CPU that can never execute code from the file (the ``"checkpoint"`` policy).

    ``mmap=True`` maps the tensors instead of reading them (for reading only the metadata of a large file).

    Raises:
        CheckpointError: missing file, a refused global (named), or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_CheckpointPickleModule, weights_only=False, mmap=mmap
        )
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None


def to_plain(obj: Any, depth: int = 0) -> Any:
    """Turn inert omegaconf/argparse stand-ins and containers into plain Python values (dicts, lists, scalars)."""
    if depth > 60:
        return None
    if isinstance(obj, _Inert):
        d = obj.__dict__
        if "_content" in d:  # omegaconf DictConfig / ListConfig / ValueNode
            return to_plain(d["_content"], depth + 1)
        if "_val" in d:
            return to_plain(d["_val"], depth + 1)
        if "_state" not in d and len(d.get("_args", ())) == 1 and not d.get("_kwargs"):
            # an enum member (pickled as ``EnumClass(value)``), e.g. fairseq's extractor_mode: its value
            return to_plain(d["_args"][0], depth + 1)
        if "_items" in d:
            return {k: to_plain(v, depth + 1) for k, v in d["_items"].items()}
        if "_list" in d:
            return [to_plain(v, depth + 1) for v in d["_list"]]
        return {k: to_plain(v, depth + 1) for k, v in d.items() if not k.startswith("_")}
    if isinstance(obj, Mapping):
        return {k: to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, depth + 1) for v in obj]
    return obj
