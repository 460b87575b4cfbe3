"""Strict, typed configuration files.

Every config section is a pydantic model that forbids unknown keys, so a typo in a recipe fails before any
compute, naming the offending key. YAML is read with a loader that also accepts floats written without a dot
(``5e-4``), which plain YAML 1.1 would silently turn into a string.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from culturemert.errors import ConfigError

__all__ = ["ConfigError", "StrictModel", "load_yaml", "load_config", "format_validation_error"]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class _Loader(yaml.SafeLoader):
    pass


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _no_duplicate_keys(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely (no object construction), rejecting duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = [f"{source}: {exc.error_count()} invalid value(s):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {loc}: {err['msg']}{got_s}")
    return "\n".join(lines)


T = TypeVar("T", bound=BaseModel)


def parse_config(data: Any, cls: type[T], source: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path, cls: type[T]) -> T:
    """Load and validate ``path`` as ``cls``; raises :class:`ConfigError` naming every bad key."""
    data = load_yaml(path)
    if data is None:
        data = {}
    return parse_config(data, cls, source=str(path))
