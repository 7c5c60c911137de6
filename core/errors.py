"""The medtwin error hierarchy: every message says what was wrong, where, and how to fix it."""

from __future__ import annotations


class MedtwinError(Exception):
    """Base class of every error medtwin raises on purpose."""


class ConfigError(MedtwinError):
    """A config value is invalid; the message names the config key."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        message = f"config key `{key}`: {problem}"
        if fix:
            message += f" — {fix}"
        super().__init__(message)


class DataValidationError(MedtwinError):
    """Site data failed validation; carries every problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} data problem(s), nothing was trained:\n{lines}")


class UnknownTaskError(ConfigError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__("task.name", f"unknown task {name!r}", f"choose one of {sorted(known)}")


class RoundFailedError(MedtwinError):
    """A round could not close (too few sites replied before the deadline)."""
