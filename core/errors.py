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


class ConfigErrors(ConfigError):
    """Several config values are wrong together; each `ConfigError` names its own key and fix."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = list(errors)
        self.key = ", ".join(error.key for error in self.errors)
        lines = "\n".join(f"  - {error}" for error in self.errors)
        MedtwinError.__init__(self, f"{len(self.errors)} config problem(s), nothing was started:\n{lines}")


def raise_config_errors(errors: list[ConfigError]) -> None:
    """Raise the one error, or all of them together; nothing when the list is empty."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


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
