"""The site's privacy-budget ledger: one checksummed JSON file, written atomically, vouched for by a mark.

Per run it keeps every trained round — steps, noise multiplier, sample rate, delta, and the run's
epsilon after that round — so the accountant history (and so epsilon) can be recomputed; beside
the runs it keeps every DP-noised metric release. The site's total is basic composition: the
runs' epsilons plus the releases' epsilons. A run's own total — what its per-run limit caps — is
likewise its training epsilon plus the epsilons of its metric releases.

Spending is check-and-record under ONE exclusive `flock`: `reserve_round` / `reserve_release`
re-read the file, refuse a replayed round or an over-budget spend, and fsync the spend before the
caller trains or releases anything. A spend is therefore counted even if training then crashes.

Every write bumps `sequence` and then rewrites a small mark file (normally inside the site's
identity kit, another folder than the ledger's). On every read the ledger must match its mark: a
deleted ledger (`LedgerMissingError`) or an older copy restored (`LedgerRolledBackError`) stops
the site instead of silently resetting its spend.

File layout (canonical JSON = sorted keys, no spaces; the checksum covers `ledger` exactly):

    {"checksum": "sha256:<hex of canonical JSON of ledger>",
     "ledger": {"format": 2, "site_id": "...", "sequence": 7,
                "runs": {"<run id>": {"accountant": "rdp", "delta": 1e-05, "epsilon": 0.41,
                                      "rounds": {"1": {...}, "2": {...}}}},
                "releases": {"<run id>": {"<round>": {"epsilon": 0.1, "recorded_at": "..."}}}}}

    mark: {"format": 1, "site_id": "...", "sequence": 7, "spends": 3, "total_epsilon": 0.51,
           "checksum": "<the ledger's checksum>"}

Format 1 (no sequence, no releases) is read as sequence 0 and written back as format 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medtwin.core.privacy_math import HistoryEntry
from medtwin.core.rundir import atomic_write_bytes, exclusive_lock

from .errors import (
    BudgetExceededError,
    LedgerConflictError,
    LedgerCorruptedError,
    LedgerMissingError,
    LedgerRolledBackError,
    ReleaseAlreadyMadeError,
    RoundAlreadyTrainedError,
)

__all__ = ["LEDGER_FORMAT", "BudgetLedger", "LedgerMark", "ReleaseSpend", "RoundSpend", "RunSpend"]

LEDGER_FORMAT = 2
MARK_FORMAT = 1
_ROUND_FIELDS = ("steps", "noise_multiplier", "sample_rate", "delta", "epsilon")
_FILE_MODE = 0o600
logger = logging.getLogger("medtwin.site.ledger")


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


@dataclass(frozen=True)
class ReleaseSpend:
    """A DP-noised metric release (pure epsilon, basic composition)."""

    run_id: str
    round: int
    epsilon: float


@dataclass(frozen=True)
class LedgerMark:
    """What the mark file vouches for: the latest ledger the site wrote."""

    site_id: str
    sequence: int
    spends: int  # trained rounds + metric releases
    total_epsilon: float
    checksum: str


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_run(run: object) -> bool:
    if not isinstance(run, dict) or not isinstance(run.get("accountant"), str):
        return False
    if not (_is_number(run.get("delta")) and _is_number(run.get("epsilon")) and isinstance(run.get("rounds"), dict)):
        return False
    return all(
        isinstance(spend, dict) and all(_is_number(spend.get(field)) for field in _ROUND_FIELDS)
        for spend in run["rounds"].values()
    )


def _is_release_table(releases: object) -> bool:
    return isinstance(releases, dict) and all(
        isinstance(spend, dict) and _is_number(spend.get("epsilon")) for spend in releases.values()
    )


def _canonical(payload: object) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _checksum(payload: object) -> str:
    return "sha256:" + hashlib.sha256(_canonical(payload)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _release_epsilons(ledger: dict) -> list[float]:
    return [spend["epsilon"] for table in ledger["releases"].values() for spend in table.values()]


def _run_release_epsilon(ledger: dict, run_id: str) -> tuple[float, int]:
    """(epsilon, count) of the metric releases already made for run `run_id`."""
    table = ledger["releases"].get(run_id, {})
    return sum(spend["epsilon"] for spend in table.values()), len(table)


def _total_epsilon(ledger: dict) -> float:
    return sum(run["epsilon"] for run in ledger["runs"].values()) + sum(_release_epsilons(ledger))


def _spend_count(ledger: dict) -> int:
    return sum(len(run["rounds"]) for run in ledger["runs"].values()) + len(_release_epsilons(ledger))


def _check_cap(max_total_epsilon: float, *, name: str = "max_total_epsilon") -> None:
    if not (_is_number(max_total_epsilon) and math.isfinite(max_total_epsilon) and max_total_epsilon >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {max_total_epsilon!r}")


class BudgetLedger:
    """Privacy spent by one site, per run and in total, persisted at `path`.

    Every query re-reads the file (and checks it against the mark), so two processes, or a
    restarted one, see the same spend; every write takes an exclusive `flock` on `<path>.lock`
    around read-check-write. `mark_path` (in the site's identity kit) enables detection of a
    deleted or rolled-back ledger; None keeps no mark (tests, throwaway simulations).
    """

    def __init__(self, path: str | os.PathLike[str], site_id: str, *, mark_path: Path | None = None) -> None:
        self.path = Path(path)
        self.site_id = site_id
        self.mark_path = None if mark_path is None else Path(mark_path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._load()  # fail fast: a corrupted, missing or rolled-back ledger is reported before anything trains

    # ------------------------------------------------------------------ queries

    def run(self, run_id: str) -> RunSpend | None:
        entry = self._load()["runs"].get(run_id)
        return None if entry is None else self._run_spend(run_id, entry)

    def spent(self, run_id: str) -> float:
        """Epsilon this run's training has spent so far at this site (0 before its first round)."""
        run = self.run(run_id)
        return 0.0 if run is None else run.epsilon

    def released(self, run_id: str) -> float:
        """Epsilon this run's DP metric releases have spent so far at this site (0 if none)."""
        return _run_release_epsilon(self._load(), run_id)[0]

    def history(self, run_id: str) -> list[HistoryEntry]:
        run = self.run(run_id)
        return [] if run is None else run.history

    def has_round(self, run_id: str, round: int) -> bool:  # noqa: A002 - Flower's word
        entry = self._load()["runs"].get(run_id)
        return entry is not None and str(int(round)) in entry["rounds"]

    def has_release(self, run_id: str, round: int) -> bool:  # noqa: A002 - Flower's word
        return str(int(round)) in self._load()["releases"].get(run_id, {})

    def runs(self) -> list[RunSpend]:
        return [self._run_spend(run_id, entry) for run_id, entry in sorted(self._load()["runs"].items())]

    def releases(self) -> list[ReleaseSpend]:
        return [
            ReleaseSpend(run_id=run_id, round=int(key), epsilon=spend["epsilon"])
            for run_id, table in sorted(self._load()["releases"].items())
            for key, spend in sorted(table.items(), key=lambda item: int(item[0]))
        ]

    def total_epsilon(self) -> float:
        """Epsilon over all runs and metric releases on this site's data, by basic composition (a sum)."""
        return _total_epsilon(self._load())

    def total_delta(self) -> float:
        return sum(run.delta for run in self.runs())

    def sequence(self) -> int:
        """How many writes the ledger has seen (0 for a fresh or just initialised site)."""
        return self._load()["sequence"]

    # ------------------------------------------------------------------ budget check (never stores)

    def budget_refusal(
        self,
        run_id: str,
        *,
        projected_epsilon: float,
        max_epsilon: float,
        max_total_epsilon: float,
        max_epsilon_name: str = "max_epsilon",
    ) -> str | None:
        """Why a round bringing run `run_id` to `projected_epsilon` must not train, or None if it may.

        `projected_epsilon` is the run's training epsilon; the per-run limit also counts the run's
        metric releases so far (training + releases <= `max_epsilon`).
        """
        return self._refusal(
            self._load(),
            run_id,
            projected_epsilon=projected_epsilon,
            max_epsilon=max_epsilon,
            max_total_epsilon=max_total_epsilon,
            max_epsilon_name=max_epsilon_name,
        )

    @staticmethod
    def _refusal(
        ledger: dict,
        run_id: str,
        *,
        projected_epsilon: float,
        max_epsilon: float,
        max_total_epsilon: float,
        max_epsilon_name: str,
    ) -> str | None:
        run = ledger["runs"].get(run_id)
        spent = 0.0 if run is None else run["epsilon"]
        released, release_count = _run_release_epsilon(ledger, run_id)
        run_total = projected_epsilon + released
        if run_total > max_epsilon:
            return (
                f"budget exceeded: per-run limit {max_epsilon_name} {max_epsilon:g} would be exceeded by "
                f"{run_total - max_epsilon:.4g} (run {run_id!r} has spent {spent:.4g} training + {released:.4g} "
                f"over {release_count} metric release(s); this round brings its training to {projected_epsilon:.4g}, "
                f"the run to {run_total:.4g})"
            )
        others = _total_epsilon(ledger) - spent
        lifetime = others + projected_epsilon
        if lifetime > max_total_epsilon:
            other_runs = len(ledger["runs"]) - (run is not None)
            releases = len(_release_epsilons(ledger))
            return (
                f"budget exceeded: lifetime limit max_total_epsilon {max_total_epsilon:g} would be exceeded by "
                f"{lifetime - max_total_epsilon:.4g} (spent {others:.4g} over {other_runs} other run(s) and "
                f"{releases} metric release(s) + this round brings run {run_id!r} to {projected_epsilon:.4g}); "
                "this site's data has used up its lifetime privacy budget"
            )
        return None

    # ------------------------------------------------------------------ writes

    def initialise(self) -> bool:
        """Write an empty ledger (sequence 0) and its mark for a new site; False if a ledger already exists.

        Never resets anything: an existing ledger is only checked (and its mark repaired), and a
        missing ledger whose mark records spends raises `LedgerMissingError`.
        """
        with self._exclusive():
            self._remove_stale_temporaries()
            existed = self.path.exists()
            ledger = self._load(locked=True)
            if existed:
                return False
            self._write(ledger, bump=False)
            return True

    def reserve_round(
        self,
        run_id: str,
        *,
        round: int,  # noqa: A002 - Flower's word
        steps: int,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        epsilon: float | Callable[[Sequence[HistoryEntry]], float],
        accountant: str = "rdp",
        max_epsilon: float,
        max_total_epsilon: float,
        max_epsilon_name: str = "max_epsilon",
    ) -> float:
        """Check the budget and record the round's spend, under one lock, BEFORE the round trains.

        `epsilon` is the run's epsilon once the round is trained, or a function of the run's recorded
        history that computes it (evaluated under the lock, so a round another process recorded since
        planning is counted). Returns that epsilon. Raises `RoundAlreadyTrainedError` (replay),
        `BudgetExceededError` (per-run or lifetime limit) or `LedgerConflictError`; nothing is
        recorded then. Once it returns, the spend is fsync'd: a crash while training still counts.
        """
        spend = self._validated_spend(run_id, round, steps, noise_multiplier, sample_rate, delta)
        _check_cap(max_total_epsilon)
        with self._exclusive():
            self._remove_stale_temporaries()
            ledger = self._load(locked=True)
            run = ledger["runs"].get(run_id)
            if run is not None and str(int(round)) in run["rounds"]:
                raise RoundAlreadyTrainedError(
                    f"round {round} of run {run_id!r} is already in this site's ledger; training it again would "
                    "spend privacy budget a second time (resend the update already produced instead)"
                )
            self._check_same_accounting(run, run_id, round, accountant=accountant, delta=spend["delta"])
            history = [] if run is None else self._run_spend(run_id, run).history
            projected = float(epsilon(history) if callable(epsilon) else epsilon)
            if not (math.isfinite(projected) and projected >= 0):
                raise ValueError(f"round {round} of run {run_id!r}: invalid epsilon {projected!r}")
            refusal = self._refusal(
                ledger,
                run_id,
                projected_epsilon=projected,
                max_epsilon=max_epsilon,
                max_total_epsilon=max_total_epsilon,
                max_epsilon_name=max_epsilon_name,
            )
            if refusal is not None:
                raise BudgetExceededError(refusal)
            self._add_round(ledger, run_id, round, {**spend, "epsilon": projected}, accountant=accountant)
            self._write(ledger)
            return projected

    def reserve_release(
        self,
        run_id: str,
        *,
        round: int,  # noqa: A002 - Flower's word
        epsilon: float,
        max_total_epsilon: float,
        max_epsilon: float | None = None,
        max_epsilon_name: str = "max_epsilon",
    ) -> None:
        """Check both budgets and record one DP-noised metric release, under one lock, before it leaves.

        Raises `ReleaseAlreadyMadeError` if (run, round) already released, `BudgetExceededError` if
        the run's total (its training epsilon + its releases so far + `epsilon`) would pass
        `max_epsilon` (the per-run limit; None checks only the lifetime limit), or if the site's
        total (runs + releases) would pass `max_total_epsilon`; nothing is recorded then.
        """
        if not (_is_number(epsilon) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"release of round {round} of run {run_id!r}: epsilon must be finite, > 0: {epsilon!r}")
        _check_cap(max_total_epsilon)
        if max_epsilon is not None:
            _check_cap(max_epsilon, name="max_epsilon")
        key = str(int(round))
        with self._exclusive():
            self._remove_stale_temporaries()
            ledger = self._load(locked=True)
            if key in ledger["releases"].get(run_id, {}):
                raise ReleaseAlreadyMadeError(
                    f"the metrics of round {round} of run {run_id!r} were already released from this site; "
                    "releasing them again would spend privacy budget a second time (resend the first release)"
                )
            if max_epsilon is not None:
                run = ledger["runs"].get(run_id)
                trained = 0.0 if run is None else run["epsilon"]
                released, release_count = _run_release_epsilon(ledger, run_id)
                run_total = trained + released + epsilon
                if run_total > max_epsilon:
                    raise BudgetExceededError(
                        f"budget exceeded: per-run limit {max_epsilon_name} {max_epsilon:g} would be exceeded by "
                        f"{run_total - max_epsilon:.4g} (run {run_id!r} has spent {trained:.4g} training + "
                        f"{released:.4g} over {release_count} metric release(s); this metric release of epsilon "
                        f"{epsilon:.4g} for round {round} brings it to {run_total:.4g}); the metrics stay at the site"
                    )
            total = _total_epsilon(ledger)
            if total + epsilon > max_total_epsilon:
                raise BudgetExceededError(
                    f"budget exceeded: lifetime limit max_total_epsilon {max_total_epsilon:g} would be exceeded by "
                    f"{total + epsilon - max_total_epsilon:.4g} (spent {total:.4g} over {len(ledger['runs'])} run(s) "
                    f"and {len(_release_epsilons(ledger))} metric release(s) + this metric release of epsilon "
                    f"{epsilon:.4g} for round {round} of run {run_id!r}); the metrics stay at the site"
                )
            ledger["releases"].setdefault(run_id, {})[key] = {"epsilon": float(epsilon), "recorded_at": _now()}
            self._write(ledger)

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
        """Record a round's spend durably WITHOUT a budget check (imports, tests); sites use `reserve_round`.

        Idempotent: recording the same (run, round) again with the same values is a no-op that
        returns False; different values raise `LedgerConflictError` (nothing is double counted).
        """
        spend = self._validated_spend(run_id, round, steps, noise_multiplier, sample_rate, delta)
        spend["epsilon"] = float(epsilon)
        if not (math.isfinite(spend["epsilon"]) and spend["epsilon"] >= 0):
            raise ValueError(f"round {round} of run {run_id!r}: invalid spend {spend}")
        with self._exclusive():
            self._remove_stale_temporaries()
            ledger = self._load(locked=True)
            run = ledger["runs"].get(run_id)
            self._check_same_accounting(run, run_id, round, accountant=accountant, delta=spend["delta"])
            previous = None if run is None else run["rounds"].get(str(int(round)))
            if previous is not None:
                if {field: previous[field] for field in _ROUND_FIELDS} == spend:
                    return False
                raise LedgerConflictError(
                    f"round {round} of run {run_id!r} is already in {self.path} as {previous}, now offered as "
                    f"{spend}; refusing to overwrite recorded privacy spend"
                )
            self._add_round(ledger, run_id, round, spend, accountant=accountant)
            self._write(ledger)
            return True

    @staticmethod
    def _validated_spend(
        run_id: str, round: int, steps: int, noise_multiplier: float, sample_rate: float, delta: float  # noqa: A002
    ) -> dict:
        spend = {
            "steps": int(steps),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "delta": float(delta),
        }
        if spend["steps"] < 0 or not all(math.isfinite(spend[key]) and spend[key] >= 0 for key in _ROUND_FIELDS[1:4]):
            raise ValueError(f"round {round} of run {run_id!r}: invalid spend {spend}")
        return spend

    def _check_same_accounting(
        self, run: dict | None, run_id: str, round: int, *, accountant: str, delta: float  # noqa: A002
    ) -> None:
        if run is not None and (run["accountant"] != accountant or run["delta"] != delta):
            raise LedgerConflictError(
                f"run {run_id!r} in {self.path} was accounted with accountant {run['accountant']!r} at delta "
                f"{run['delta']}; round {round} asks {accountant!r} at delta {delta} — a run must keep "
                "one accountant and delta (start a new run id to change them)"
            )

    @staticmethod
    def _add_round(ledger: dict, run_id: str, round: int, spend: dict, *, accountant: str) -> None:  # noqa: A002
        run = ledger["runs"].setdefault(
            run_id, {"accountant": accountant, "delta": spend["delta"], "epsilon": 0.0, "rounds": {}}
        )
        run["rounds"][str(int(round))] = {**spend, "recorded_at": _now()}
        run["epsilon"] = max(run["epsilon"], spend["epsilon"])

    # ------------------------------------------------------------------ storage

    def _exclusive(self) -> AbstractContextManager[None]:
        return exclusive_lock(self._lock_path)

    def _remove_stale_temporaries(self) -> None:
        """Temp files of writers killed before `os.replace` (we hold the lock: nobody else is writing)."""
        for target in (self.path, self.mark_path):
            if target is not None and target.parent.is_dir():
                for stale in target.parent.glob(f".{target.name}.*.tmp"):
                    stale.unlink(missing_ok=True)

    def _empty(self) -> dict:
        return {"format": LEDGER_FORMAT, "site_id": self.site_id, "sequence": 0, "runs": {}, "releases": {}}

    def _load(self, *, locked: bool = False) -> dict:
        """The ledger, checked against its mark; a missing or behind mark is re-created from the ledger."""
        stored = self._read_ledger()
        if self.mark_path is None:
            return self._empty() if stored is None else stored[0]
        mark = self._read_mark()
        if mark is not None and mark.site_id != self.site_id:
            raise LedgerConflictError(
                f"ledger mark {self.mark_path} belongs to site {mark.site_id!r}, not {self.site_id!r}; "
                "point this site at the mark inside its own kit"
            )
        if stored is None:
            if mark is None:
                return self._empty()  # a fresh site: no ledger, no mark, nothing spent
            raise LedgerMissingError(
                self.path,
                mark_path=self.mark_path,
                spends=mark.spends,
                total_epsilon=mark.total_epsilon,
                sequence=mark.sequence,
            )
        ledger, checksum = stored
        if mark is not None:
            self._check_against_mark(ledger, checksum, mark)
            if ledger["sequence"] == mark.sequence:
                return ledger
        if not locked:  # the mark is missing, or behind after a crash between the two writes
            with self._exclusive():
                return self._load(locked=True)
        if mark is None:
            logger.warning("privacy ledger mark %s is missing; re-creating it from %s", self.mark_path, self.path)
        self._write_mark(ledger, checksum)
        return ledger

    def _check_against_mark(self, ledger: dict, checksum: str, mark: LedgerMark) -> None:
        found = (
            f"the ledger is at sequence {ledger['sequence']} ({_spend_count(ledger)} spend(s), "
            f"epsilon {_total_epsilon(ledger):.4g})"
        )
        vouched = (
            f"the kit's mark records sequence {mark.sequence} ({mark.spends} spend(s), "
            f"epsilon {mark.total_epsilon:.4g})"
        )
        if ledger["sequence"] < mark.sequence:
            raise LedgerRolledBackError(self.path, mark_path=self.mark_path, problem=f"{found} but {vouched}")
        if ledger["sequence"] == mark.sequence and checksum != mark.checksum:
            raise LedgerRolledBackError(
                self.path,
                mark_path=self.mark_path,
                problem=f"{found} and {vouched}, but with another checksum ({checksum} != {mark.checksum})",
            )

    def _read_ledger(self) -> tuple[dict, str] | None:
        """(ledger, stored checksum), or None if there is no ledger file."""
        if not self.path.exists():
            return None
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
        if isinstance(ledger, dict) and ledger.get("format") == 1 and not {"sequence", "releases"} & set(ledger):
            ledger = {**ledger, "format": LEDGER_FORMAT, "sequence": 0, "releases": {}}  # migrate format 1
        self._check_structure(ledger)
        if ledger["site_id"] != self.site_id:
            raise LedgerConflictError(
                f"ledger {self.path} belongs to site {ledger['site_id']!r}, not {self.site_id!r}; "
                "point this site at its own ledger file"
            )
        return ledger, actual

    def _check_structure(self, ledger: object) -> None:
        problem = None
        if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT:
            found = ledger.get("format") if isinstance(ledger, dict) else None
            problem = f"unknown ledger format {found!r} (this medtwin reads formats 1 and {LEDGER_FORMAT})"
        elif not isinstance(ledger.get("site_id"), str) or not isinstance(ledger.get("runs"), dict):
            problem = "missing site_id or runs"
        elif not _is_count(ledger.get("sequence")):
            problem = f"sequence must be a whole number >= 0, got {ledger.get('sequence')!r}"
        elif not isinstance(ledger.get("releases"), dict):
            problem = "missing releases"
        else:
            bad_runs = [run_id for run_id, run in ledger["runs"].items() if not _is_run(run)]
            bad_releases = [run_id for run_id, table in ledger["releases"].items() if not _is_release_table(table)]
            if bad_runs:
                problem = f"run {bad_runs[0]!r} is malformed"
            elif bad_releases:
                problem = f"the releases of run {bad_releases[0]!r} are malformed"
        if problem is not None:
            raise LedgerCorruptedError(self.path, problem)

    def _read_mark(self) -> LedgerMark | None:
        assert self.mark_path is not None
        if not self.mark_path.exists():
            return None
        try:
            content = json.loads(self.mark_path.read_bytes())
        except (OSError, ValueError) as error:  # JSON and UTF-8 decode errors are ValueErrors
            raise self._damaged_mark(f"cannot read it ({error})") from None
        fields = LedgerMark.__dataclass_fields__
        if not isinstance(content, dict) or content.get("format") != MARK_FORMAT or not set(fields) <= set(content):
            raise self._damaged_mark(f"expected format {MARK_FORMAT} with keys {sorted(fields)}, got {content!r}")
        mark = LedgerMark(**{key: content[key] for key in fields})
        if not (
            isinstance(mark.site_id, str)
            and _is_count(mark.sequence)
            and _is_count(mark.spends)
            and _is_number(mark.total_epsilon)
            and isinstance(mark.checksum, str)
        ):
            raise self._damaged_mark(f"a value has the wrong type in {content!r}")
        return mark

    def _damaged_mark(self, problem: str) -> LedgerCorruptedError:
        return LedgerCorruptedError(
            self.path,
            f"its mark {self.mark_path} (in the site's kit) is damaged: {problem}",
            fix=(
                f"Refusing to train. If {self.path} is the latest ledger, delete the damaged mark and restart "
                "(the site re-creates it from the ledger); otherwise restore both from backup."
            ),
        )

    def _write(self, ledger: dict, *, bump: bool = True) -> None:
        """Write the ledger (sequence + 1) atomically and fsync'd, then its mark; the caller holds the lock."""
        if bump:
            ledger["sequence"] += 1
        ledger["format"] = LEDGER_FORMAT
        checksum = _checksum(ledger)
        document = {"checksum": checksum, "ledger": ledger}
        data = json.dumps(document, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"
        atomic_write_bytes(self.path, data, mode=_FILE_MODE)
        if self.mark_path is not None:
            self._write_mark(ledger, checksum)

    def _write_mark(self, ledger: dict, checksum: str) -> None:
        assert self.mark_path is not None
        mark = {
            "format": MARK_FORMAT,
            "site_id": self.site_id,
            "sequence": ledger["sequence"],
            "spends": _spend_count(ledger),
            "total_epsilon": _total_epsilon(ledger),
            "checksum": checksum,
        }
        data = json.dumps(mark, sort_keys=True, indent=1).encode() + b"\n"
        atomic_write_bytes(self.mark_path, data, mode=_FILE_MODE)

    @staticmethod
    def _run_spend(run_id: str, entry: dict) -> RunSpend:
        rounds = tuple(
            RoundSpend(round=int(key), **{field: spend[field] for field in _ROUND_FIELDS})
            for key, spend in sorted(entry["rounds"].items(), key=lambda item: int(item[0]))
        )
        return RunSpend(
            run_id=run_id, accountant=entry["accountant"], delta=entry["delta"], epsilon=entry["epsilon"], rounds=rounds
        )
