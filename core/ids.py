"""Run ids and site ids become file names and chain keys: one rule, checked wherever they arrive."""

from __future__ import annotations

import re

from .errors import ConfigError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch: `$` would accept a final "\n"
ID_RULE = "1-128 ASCII letters, digits, '_', '.', '-', starting with a letter or digit, no '..'"


def check_id(value: object) -> str:
    """'' if `value` is a safe id, else what is wrong with it (never echoes more than 80 characters)."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not ID_PATTERN.fullmatch(value) or ".." in value:
        return f"{value[:80]!r} is not a valid id: use {ID_RULE}"
    return ""


def ensure_id(value: object, *, key: str) -> str:
    """Return `value` if it is a safe id, else raise `ConfigError` naming `key`."""
    problem = check_id(value)
    if problem:
        raise ConfigError(key, problem)
    return str(value)
