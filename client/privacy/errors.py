"""Errors of the site's privacy layer; each message says what, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path

from medtwin.core.errors import MedtwinError

__all__ = [
    "BudgetExceededError",
    "IncompatibleModelError",
    "LedgerConflictError",
    "LedgerCorruptedError",
    "LedgerMissingError",
    "LedgerRolledBackError",
    "PolicyRefusedError",
    "PrivacyError",
    "ReleaseAlreadyMadeError",
    "RoundAlreadyTrainedError",
    "RoundRefusedError",
    "SitePolicyError",
]


class PrivacyError(MedtwinError):
    """Base class of the site privacy layer's errors."""


class IncompatibleModelError(PrivacyError):
    """The model cannot be trained with DP-SGD (Opacus validation failed)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"model is not compatible with DP-SGD ({len(self.problems)} problem(s)):\n{lines}\n"
            "Fix: per-example gradients need layers that do not mix examples — replace BatchNorm with "
            "GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix(model) does it), and keep the "
            "model in training mode."
        )


class SitePolicyError(PrivacyError):
    """The site's own privacy policy (node_config or policy file) is missing or invalid."""

    def __init__(self, key: str, problem: str, *, source: str, fix: str = "") -> None:
        self.key = key
        message = f"site privacy policy `{key}` ({source}): {problem}"
        if fix:
            message += f" — {fix}"
        super().__init__(message)


class LedgerCorruptedError(PrivacyError):
    """The budget ledger on disk is unreadable, truncated or fails its checksum."""

    DEFAULT_FIX = (
        "Refusing to train; restore the ledger from backup (a fresh ledger would forget the "
        "privacy budget already spent)."
    )

    def __init__(self, path: Path, problem: str, *, fix: str = DEFAULT_FIX) -> None:
        self.path = Path(path)
        super().__init__(f"privacy budget ledger {self.path} is corrupted: {problem}. {fix}")


class LedgerMissingError(LedgerCorruptedError):
    """The ledger file is gone although the site's mark (in its identity kit) records spends."""

    def __init__(self, path: Path, *, mark_path: Path, spends: int, total_epsilon: float, sequence: int) -> None:
        self.path = Path(path)
        self.mark_path = Path(mark_path)
        PrivacyError.__init__(
            self,
            f"privacy budget ledger {self.path} is gone although the site's kit records {spends} spend(s) "
            f"totalling epsilon={total_epsilon:.4g} (ledger sequence {sequence}, mark {self.mark_path}). "
            "The site will not train: restore the ledger from backup — starting a fresh one would forget "
            "the privacy budget already spent.",
        )


class LedgerRolledBackError(LedgerCorruptedError):
    """The ledger on disk is older than (or differs from) the copy the site's mark vouches for."""

    def __init__(self, path: Path, *, mark_path: Path, problem: str) -> None:
        self.path = Path(path)
        self.mark_path = Path(mark_path)
        PrivacyError.__init__(
            self,
            f"privacy budget ledger {self.path} was rolled back or replaced: {problem} (mark {self.mark_path}). "
            "The site will not train: restore the latest ledger from backup — an older copy would forget "
            "privacy budget already spent.",
        )


class LedgerConflictError(PrivacyError):
    """A ledger write contradicts what is already recorded (other site, other values)."""


class RoundRefusedError(PrivacyError):
    """This site refuses to train the round; the message is the human-readable reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PolicyRefusedError(RoundRefusedError):
    """The coordinator's request breaks this site's privacy policy."""


class BudgetExceededError(RoundRefusedError):
    """Training the round would take the site past its privacy budget."""


class RoundAlreadyTrainedError(RoundRefusedError):
    """The round is already in the ledger; training it again would spend budget twice."""


class ReleaseAlreadyMadeError(RoundRefusedError):
    """A DP metric release for this (run, round) is already recorded; releasing again would spend twice."""
