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

__all__ = ["ConfigError", "StrictModel", "load_yaml", "load_config", "format_validation_error", "short_repr"]


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


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages name a bad value, they never echo an input file."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 15] + f"... ({len(text):,} chars)"
    return text


def _describe(value: Any) -> str:
    if isinstance(value, str):
        first = value.splitlines()[0] if value.strip() else ""
        return f"plain text ({len(value):,} characters, first line {short_repr(first, 50)})"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely (no object construction), rejecting duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a YAML file") from None
    except yaml.YAMLError as exc:
        # PyYAML's own message spans several lines with a snippet of the input; keep the problem and its place
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problem = problem if len(problem) <= 120 else problem[:105] + "..."
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line: the source, then ``key: what was expected (got value)`` per invalid value, the values cut short."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {short_repr(got)})"
            parts.append(f"{loc}: {err['msg']}{got_s}")
    return f"{source}: {exc.error_count()} invalid value(s): " + "; ".join(parts)


T = TypeVar("T", bound=BaseModel)


def parse_config(data: Any, cls: type[T], source: str = "config") -> T:
    """Validate ``data`` (a mapping, e.g. parsed YAML) as ``cls``.

    Raises:
        ConfigError: one line naming ``source`` and every invalid or unknown key.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path, cls: type[T]) -> T:
    """Load and validate ``path`` as ``cls``; raises :class:`ConfigError` naming every bad key, or, for a file that
    is not a YAML mapping (e.g. a CSV or a list), saying so in one line without echoing the content."""
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of {cls.__name__} settings (key: value lines), got {_describe(data)}"
        )
    return parse_config(data, cls, source=str(path))
