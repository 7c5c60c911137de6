"""The site's privacy-budget ledger: one checksummed JSON file, written atomically.

Per run it keeps every trained round — steps, noise multiplier, sample rate, delta, and the run's
epsilon after that round — so the accountant history (and so epsilon) can be recomputed, and a
total across runs (basic composition: epsilons and deltas add up). A process restart reads the
same spend back; a damaged file is never mistaken for a fresh one.

File layout (canonical JSON = sorted keys, no spaces; the checksum covers `ledger` exactly):

    {"checksum": "sha256:<hex of canonical JSON of ledger>",
     "ledger": {"format": 1, "site_id": "...", "runs": {"<run id>": {"accountant": "rdp",
                "delta": 1e-05, "epsilon": 0.41, "rounds": {"1": {...}, "2": {...}}}}}}
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medtwin.core.privacy_math import HistoryEntry

from .errors import BudgetExceededError, LedgerConflictError, LedgerCorruptedError

__all__ = ["LEDGER_FORMAT", "BudgetLedger", "RoundSpend", "RunSpend"]

LEDGER_FORMAT = 1
_ROUND_FIELDS = ("steps", "noise_multiplier", "sample_rate", "delta", "epsilon")


@dataclass(frozen=True)
class RoundSpend:
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    epsilon: float  # the run's cumulative epsilon once this round was trained


@dataclass(frozen=True)
class RunSpend:
    run_id: str
    accountant: str
    delta: float
    epsilon: float
    rounds: tuple[RoundSpend, ...]  # sorted by round

    @property
    def rounds_done(self) -> int:
        return len(self.rounds)

    @property
    def steps(self) -> int:
        return sum(spend.steps for spend in self.rounds)

    @property
    def history(self) -> list[HistoryEntry]:
        return [(spend.noise_multiplier, spend.sample_rate, spend.steps) for spend in self.rounds]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_run(run: object) -> bool:
    if not isinstance(run, dict) or not isinstance(run.get("accountant"), str):
        return False
    if not (_is_number(run.get("delta")) and _is_number(run.get("epsilon")) and isinstance(run.get("rounds"), dict)):
        return False
    return all(
        isinstance(spend, dict) and all(_is_number(spend.get(field)) for field in _ROUND_FIELDS)
        for spend in run["rounds"].values()
    )


def _canonical(payload: object) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _checksum(payload: object) -> str:
    return "sha256:" + hashlib.sha256(_canonical(payload)).hexdigest()


class BudgetLedger:
    """Privacy spent by one site, per run and in total, persisted at `path`.

    Every query re-reads the file, so two processes (or a restarted one) see the same spend;
    writes take an exclusive `flock` on `<path>.lock` around read-modify-write.
    """

    def __init__(self, path: str | os.PathLike[str], site_id: str) -> None:
        self.path = Path(path)
        self.site_id = site_id
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._load()  # fail fast: a corrupted ledger is reported before anything trains

    # ------------------------------------------------------------------ queries

    def run(self, run_id: str) -> RunSpend | None:
        entry = self._load()["runs"].get(run_id)
        return None if entry is None else self._run_spend(run_id, entry)

    def spent(self, run_id: str) -> float:
        """Epsilon this run has spent so far at this site (0 before its first round)."""
        run = self.run(run_id)
        return 0.0 if run is None else run.epsilon

    def history(self, run_id: str) -> list[HistoryEntry]:
        run = self.run(run_id)
        return [] if run is None else run.history

    def has_round(self, run_id: str, round: int) -> bool:  # noqa: A002 - Flower's word
        entry = self._load()["runs"].get(run_id)
        return entry is not None and str(int(round)) in entry["rounds"]

    def runs(self) -> list[RunSpend]:
        return [self._run_spend(run_id, entry) for run_id, entry in sorted(self._load()["runs"].items())]

    def total_epsilon(self) -> float:
        """Epsilon over all runs on this site's data, by basic composition (a sum: an upper bound)."""
        return sum(run.epsilon for run in self.runs())

    def total_delta(self) -> float:
        return sum(run.delta for run in self.runs())

    # ------------------------------------------------------------------ budget checks

    def budget_refusal(
        self, run_id: str, *, projected_epsilon: float, max_epsilon: float, max_total_epsilon: float | None = None
    ) -> str | None:
        """Why a round bringing run `run_id` to `projected_epsilon` must not train, or None if it may."""
        spent = self.spent(run_id)
        if projected_epsilon > max_epsilon:
            return (
                f"budget exceeded: this round would bring run {run_id!r} to epsilon {projected_epsilon:.4f} "
                f"(spent so far {spent:.4f}), above this site's max_epsilon {max_epsilon:g}"
            )
        if max_total_epsilon is not None:
            lifetime = self.total_epsilon() - spent + projected_epsilon
            if lifetime > max_total_epsilon:
                return (
                    f"budget exceeded: this round would bring the site's total over all runs to epsilon "
                    f"{lifetime:.4f}, above this site's max_total_epsilon {max_total_epsilon:g}"
                )
        return None

    def can_afford(
        self, run_id: str, projected_epsilon: float, max_epsilon: float, *, max_total_epsilon: float | None = None
    ) -> bool:
        refusal = self.budget_refusal(
            run_id, projected_epsilon=projected_epsilon, max_epsilon=max_epsilon, max_total_epsilon=max_total_epsilon
        )
        return refusal is None

    def ensure_affordable(
        self, run_id: str, *, projected_epsilon: float, max_epsilon: float, max_total_epsilon: float | None = None
    ) -> None:
        """Raise `BudgetExceededError` (before training) if the projected spend is over budget."""
        refusal = self.budget_refusal(
            run_id, projected_epsilon=projected_epsilon, max_epsilon=max_epsilon, max_total_epsilon=max_total_epsilon
        )
        if refusal is not None:
            raise BudgetExceededError(refusal)

    # ------------------------------------------------------------------ writes

    def record_round(
        self,
        run_id: str,
        *,
        round: int,  # noqa: A002 - Flower's word
        steps: int,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        epsilon: float,
        accountant: str = "rdp",
    ) -> bool:
        """Record a trained round durably (fsync) before its update leaves the site.

        Idempotent: recording the same (run, round) again with the same values is a no-op that
        returns False; different values raise `LedgerConflictError` (nothing is double counted).
        """
        spend = {
            "steps": int(steps),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "delta": float(delta),
            "epsilon": float(epsilon),
        }
        if spend["steps"] < 0 or not all(math.isfinite(spend[key]) and spend[key] >= 0 for key in _ROUND_FIELDS[1:]):
            raise ValueError(f"round {round} of run {run_id!r}: invalid spend {spend}")
        with self._exclusive():
            self._remove_stale_temporaries()
            ledger = self._load()
            run = ledger["runs"].setdefault(
                run_id, {"accountant": accountant, "delta": spend["delta"], "epsilon": 0.0, "rounds": {}}
            )
            if run["accountant"] != accountant or run["delta"] != spend["delta"]:
                raise LedgerConflictError(
                    f"run {run_id!r} in {self.path} was accounted with accountant {run['accountant']!r} at delta "
                    f"{run['delta']}; round {round} asks {accountant!r} at delta {spend['delta']} — a run must keep "
                    "one accountant and delta (start a new run id to change them)"
                )
            key = str(int(round))
            previous = run["rounds"].get(key)
            if previous is not None:
                if {field: previous[field] for field in _ROUND_FIELDS} == spend:
                    return False
                raise LedgerConflictError(
                    f"round {round} of run {run_id!r} is already in {self.path} as {previous}, now offered as "
                    f"{spend}; refusing to overwrite recorded privacy spend"
                )
            run["rounds"][key] = {**spend, "recorded_at": datetime.now(UTC).isoformat(timespec="seconds")}
            run["epsilon"] = max(run["epsilon"], spend["epsilon"])
            self._write(ledger)
            return True

    # ------------------------------------------------------------------ storage

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)

    def _remove_stale_temporaries(self) -> None:
        """Temp files of writers killed before `os.replace` (we hold the lock: nobody else is writing)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def _empty(self) -> dict:
        return {"format": LEDGER_FORMAT, "site_id": self.site_id, "runs": {}}

    def _load(self) -> dict:
        if not self.path.exists():
            return self._empty()
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            raise LedgerCorruptedError(self.path, f"cannot read it ({error})") from error
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerCorruptedError(self.path, f"not valid JSON ({len(raw)} bytes; {error})") from None
        if not isinstance(document, dict) or set(document) != {"checksum", "ledger"}:
            raise LedgerCorruptedError(self.path, "expected exactly the keys 'checksum' and 'ledger'")
        ledger = document["ledger"]
        try:
            actual = _checksum(ledger)
        except ValueError as error:
            raise LedgerCorruptedError(self.path, f"ledger content is not canonical JSON ({error})") from None
        if actual != document["checksum"]:
            stored = document["checksum"]
            raise LedgerCorruptedError(self.path, f"checksum mismatch (stored {stored}, computed {actual})")
        self._check_structure(ledger)
        if ledger["site_id"] != self.site_id:
            raise LedgerConflictError(
                f"ledger {self.path} belongs to site {ledger['site_id']!r}, not {self.site_id!r}; "
                "point this site at its own ledger file"
            )
        return ledger

    def _check_structure(self, ledger: object) -> None:
        problem = None
        if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT:
            problem = f"unknown ledger format (expected format {LEDGER_FORMAT})"
        elif not isinstance(ledger.get("site_id"), str) or not isinstance(ledger.get("runs"), dict):
            problem = "missing site_id or runs"
        else:
            for run_id, run in ledger["runs"].items():
                if not _is_run(run):
                    problem = f"run {run_id!r} is malformed"
                    break
        if problem is not None:
            raise LedgerCorruptedError(self.path, problem)

    def _write(self, ledger: dict) -> None:
        document = {"checksum": _checksum(ledger), "ledger": ledger}
        data = json.dumps(document, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:  # mkstemp creates it 0600
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    @staticmethod
    def _run_spend(run_id: str, entry: dict) -> RunSpend:
        rounds = tuple(
            RoundSpend(round=int(key), **{field: spend[field] for field in _ROUND_FIELDS})
            for key, spend in sorted(entry["rounds"].items(), key=lambda item: int(item[0]))
        )
        return RunSpend(
            run_id=run_id, accountant=entry["accountant"], delta=entry["delta"], epsilon=entry["epsilon"], rounds=rounds
        )
