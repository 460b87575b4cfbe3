"""Exceptions that the CLI reports as clean one-line errors (exit code 2) instead of tracebacks."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a missing file, an incompatible checkpoint, an impossible value."""


class ConfigError(UserError, ValueError):
    """A configuration file or value is invalid. The message names the key or path at fault."""


class CheckpointError(UserError):
    """A checkpoint cannot be read, is unsafe, corrupted, or incompatible."""


class DataError(UserError):
    """Input data is missing, unreadable or inconsistent."""


__all__ = ["UserError", "ConfigError", "CheckpointError", "DataError"]
