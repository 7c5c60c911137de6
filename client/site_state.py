"""A site's own durable decisions: which runs it approved, which aggregates it already evaluated.

Both are small JSON files in the site's state folder, changed only under an exclusive `flock` and
written atomically, so a restart, a crash or two concurrent ClientApp processes see one truth.

    approvals.json    {"<run id>": {"config_hash": "...", "code_hash": "...", "approved_utc": "..."}}
    evaluations.json  {"<run id>": {"<round>": {"aggregate_sha256": "...", "evaluated_utc": "..."}}}
    statistics.json   {"<run id>": {"statistics_sha256": "...", "pinned_utc": "..."}}
    chain-verified-approvals.json  {"<run id>": {"config_hash": "...", "code_hash": "...", "verified_at": <unix s>}}
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from medtwin.core.errors import MedtwinError
from medtwin.core.ids import check_id
from medtwin.core.rundir import atomic_write_bytes, exclusive_lock

__all__ = [
    "APPROVALS_FILE",
    "EVALUATIONS_FILE",
    "ChainVerifiedApprovals",
    "EvaluationRegister",
    "SiteApprovals",
    "SiteStateError",
    "StatisticsRegister",
]

APPROVALS_FILE = "approvals.json"
EVALUATIONS_FILE = "evaluations.json"
STATISTICS_FILE = "statistics.json"
CHAIN_VERIFIED_FILE = "chain-verified-approvals.json"
REVERIFY_WRITE_S = 30.0  # a fresh verification is written back at most this often


class SiteStateError(MedtwinError):
    """A state file is unreadable or an approval would be changed silently."""


class _JsonState:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SiteStateError(f"{self.path} is unreadable ({error}); restore it from backup — the site stops") from None
        if not isinstance(document, dict):
            raise SiteStateError(f"{self.path} is not a JSON object; restore it from backup — the site stops")
        return document

    def write(self, document: dict) -> None:
        atomic_write_bytes(self.path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)

    @contextmanager
    def locked(self) -> Iterator[dict]:
        """Read-modify-write under an exclusive lock; write back what the block leaves in the dict."""
        with exclusive_lock(self.path.with_name(self.path.name + ".lock")):
            document = self.read()
            before = json.dumps(document, sort_keys=True)
            yield document
            if json.dumps(document, sort_keys=True) != before:
                self.write(document)


class SiteApprovals:
    """Runs this site approved (run id + config hash + code hash), when no authorization chain is used."""

    def __init__(self, state_dir: str | Path) -> None:
        self._state = _JsonState(Path(state_dir) / APPROVALS_FILE)

    def approve(self, *, run_id: str, config_hash: str, code_hash: str) -> bool:
        """Record the approval; False if it was already there. Never re-points an approved run id."""
        problem = check_id(run_id)
        if problem:
            raise SiteStateError(f"run id {problem}")
        with self._state.locked() as approvals:
            existing = approvals.get(run_id)
            if existing is not None:
                if (existing["config_hash"], existing["code_hash"]) == (config_hash, code_hash):
                    return False
                raise SiteStateError(
                    f"run {run_id!r} is already approved for config {existing['config_hash'][:12]}… and code "
                    f"{existing['code_hash'][:12]}…; an approval is never changed — propose a new run id"
                )
            approvals[run_id] = {
                "config_hash": config_hash,
                "code_hash": code_hash,
                "approved_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        return True

    def problem(self, *, site_id: str, run_id: str, config_hash: str, code_hash: str) -> str | None:
        approval = self._state.read().get(run_id)
        if approval is None:
            return f"run {run_id} is not approved by {site_id} (`medtwin site approve` records an approval)"
        if approval.get("config_hash") != config_hash:
            return f"the config proposed for run {run_id} differs from the one {site_id} approved"
        if approval.get("code_hash") != code_hash:
            return f"the code installed at {site_id} differs from the code it approved for run {run_id}"
        return None


class ChainVerifiedApprovals:
    """When this site last saw its own approval of a run on the authorization chain — what it trusts,
    for a bounded time, while that chain is unreachable."""

    def __init__(self, state_dir: str | Path) -> None:
        self._state = _JsonState(Path(state_dir) / CHAIN_VERIFIED_FILE)

    def remember(self, *, run_id: str, config_hash: str, code_hash: str) -> None:
        now = time.time()
        earlier = self._state.read().get(run_id, {})
        if earlier.get("config_hash") == config_hash and earlier.get("code_hash") == code_hash and now - earlier.get("verified_at", 0) < REVERIFY_WRITE_S:
            return
        with self._state.locked() as verified:
            verified[run_id] = {"config_hash": config_hash, "code_hash": code_hash, "verified_at": now}

    def forget(self, *, run_id: str) -> None:
        if run_id in self._state.read():
            with self._state.locked() as verified:
                verified.pop(run_id, None)

    def age_s(self, *, run_id: str, config_hash: str, code_hash: str) -> float | None:
        """Seconds since this exact (run, config, code) approval was last seen on chain; None if never."""
        entry = self._state.read().get(run_id)
        if not isinstance(entry, dict) or (entry.get("config_hash"), entry.get("code_hash")) != (config_hash, code_hash):
            return None
        return max(0.0, time.time() - float(entry.get("verified_at", 0)))


class EvaluationRegister:
    """At most one evaluation per (run, round) at this site: the counting-query channel stays closed."""

    def __init__(self, state_dir: str | Path) -> None:
        self._state = _JsonState(Path(state_dir) / EVALUATIONS_FILE)

    def record_once(self, *, run_id: str, server_round: int, aggregate_sha256: str) -> str | None:
        """Record this evaluation; returns why not if the round was already evaluated (any aggregate)."""
        with self._state.locked() as evaluations:
            rounds = evaluations.setdefault(run_id, {})
            earlier = rounds.get(str(server_round))
            if earlier is not None:
                same = earlier.get("aggregate_sha256") == aggregate_sha256
                return (
                    f"round {server_round} of run {run_id} was already evaluated at this site "
                    f"({'the same' if same else 'a different'} aggregate); a site evaluates each round once"
                )
            rounds[str(server_round)] = {
                "aggregate_sha256": aggregate_sha256,
                "evaluated_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        return None


class StatisticsRegister:
    """One set of federated statistics per run at this site (task.normalization=federated): every
    certified subset of the sites' statistics verifies, so the first set the site used is the run's."""

    def __init__(self, state_dir: str | Path) -> None:
        self._state = _JsonState(Path(state_dir) / STATISTICS_FILE)

    def pin(self, *, run_id: str, statistics_sha256: str) -> str | None:
        """Record the run's statistics on first use; returns why not if the run already used others."""
        with self._state.locked() as runs:
            earlier = runs.get(run_id)
            if earlier is not None:
                if earlier.get("statistics_sha256") == statistics_sha256:
                    return None
                return (
                    f"run {run_id} already normalised at this site with other statistics "
                    f"({str(earlier.get('statistics_sha256', ''))[:16]}...): a site uses one set of federated statistics a run"
                )
            runs[run_id] = {"statistics_sha256": statistics_sha256, "pinned_utc": datetime.now(UTC).isoformat(timespec="seconds")}
        return None
