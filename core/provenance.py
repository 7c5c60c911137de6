"""What the coordinator and sites need from the chains, as protocols: roles stay free of web3.

The wiring layer (experiments/) implements these with `medtwin.chain`; role code sees only this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class AccessDecision:
    site_id: str
    granted: bool
    code: str  # short label that goes on chain: "ok", "bad_signature", "replay", "not_admitted", ...
    subject_sha256: str = ""  # e.g. the update's artifact digest


@dataclass(frozen=True)
class RunDescription:
    run_id: str
    task: str
    config_yaml: str
    dp_parameters: Mapping[str, Any]
    he_parameters: Mapping[str, Any]


class ProvenanceRecorder(Protocol):
    """The coordinator's view of both chains."""

    def start_run(self, run: RunDescription) -> None:
        """Register the run on the data chain (config, code, DP and HE parameter hashes).

        A resumed run calls it again: a run registered already must be left as it is.
        """

    def admission_problem(self, *, site_id: str, run_id: str) -> str | None:
        """None if the auth chain admits `site_id` to `run_id` (registered, not revoked, approved)."""

    def admission_problems(self, *, site_ids: Sequence[str], run_id: str) -> Mapping[str, str | None]:
        """`admission_problem` of each site in `site_ids`, read together (a round's updates: one read, fresh
        every round). Optional: the coordinator looks it up with `getattr` and else asks per site."""

    def close_round(
        self,
        *,
        run_id: str,
        server_round: int,
        decisions: list[AccessDecision],
        update_digests: Mapping[str, str],
        aggregate_digest: str,
        dataset_manifests: Mapping[str, str],
        epsilon_by_site: Mapping[str, float],
        he_error_bound: float,
    ) -> dict[str, Any]:
        """Log the round's access decisions (1 auth tx) and anchor it (<= 2 data tx); returns receipts."""

    def finish_run(self, *, run_id: str, final_aggregate_digest: str, rounds_completed: int, final: bool = True) -> dict[str, Any]:
        """Flush anything queued, record the final model's lineage (not when `final` is False: the run stopped
        early and will be resumed); returns the summary's `chain` block."""

    def outage_problem(self) -> str | None:
        """Why the run must stop at the checkpoint just written — a chain unreachable for longer than
        chain.outage_timeout_s — or None. Optional, looked up with `getattr` like `last_anchor`."""

    def last_anchor(self, run_id: str) -> tuple[int, str] | None:
        """(round, aggregate sha256 hex) of the run's highest anchored round — mined or queued — or None.

        Optional: the coordinator looks it up with `getattr` and skips the check for recorders without it.
        Resuming compares it with the checkpoint, so that no round is anchored twice or forked.
        """


class RunApprovalCheck(Protocol):
    """A site's view of the auth and data chains: did *I* approve this run, is this aggregate anchored?"""

    def problem(self, *, site_id: str, run_id: str, config_hash: str, code_hash: str) -> str | None:
        """None if `site_id` approved exactly (run, config hash, code hash) and is still active, else why not."""

    def aggregate_problem(self, *, run_id: str, server_round: int, aggregate_sha256: str) -> str | None:
        """None if the data chain anchors `aggregate_sha256` as round `server_round` of `run_id`, else why not."""

    def erased_ledger_problem(self, *, site_id: str, ledger_path: str) -> str | None:
        """Asked only when the site's ledger holds no spend: None if the data chain shows no earlier DP run
        of `site_id`, else why the site must not train on that fresh ledger. Optional (`getattr`)."""
