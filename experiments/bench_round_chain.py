"""The chain work of one federated round, for `bench_he_round --chain anvil`: the real calls, timed.

What a round asks of the chains (see server/loop.py, client/app.py, experiments/chain_wiring.py):

    site, train phase        its approval of (run, config, code) on the auth chain (`ChainApprovalCheck.problem`)
    coordinator, per round   the sites' admissions on the auth chain, in one batch (`ChainProvenance.admission_problems`)
    coordinator, close       one auth tx of the round's decisions, the dataset commitments when they change,
                             one data tx anchoring the round (`ChainProvenance.close_round`): made durable in
                             the journal and outbox, then sent by each chain's background sender, as the
                             coordinator does (`open_chains`)
    site, evaluate phase     its approval again, then (after decoding the aggregate, as client/app.py does)
                             the aggregate's anchor on the data chain, waiting for it to land

The critical path holds the checks and the coordinator's durable hand-off; the senders' time is measured
apart (`background_send_s`). `anvil_chains` starts two local anvil nodes in a scratch folder and always
stops them (and the senders) on the way out, the nodes by PID.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medtwin.chain import ChainSession, chain_down, chain_up, open_session
from medtwin.chain.backends import free_port
from medtwin.core.config.chain import ChainConfig
from medtwin.core.hashing import code_hash, config_hash
from medtwin.core.identity import FederationManifest
from medtwin.core.provenance import AccessDecision, RunDescription
from medtwin.experiments.chain_wiring import ChainApprovalCheck, ChainProvenance, enrol_federation


class ChainRefusal(RuntimeError):
    """A chain check said no: the benchmark's federation is wired wrong, and its figures would be too."""


@dataclass(frozen=True)
class Chains:
    session: ChainSession  # the coordinator's
    state_dir: Path  # where sites reconnect read-only from, as in a simulation


@contextmanager
def anvil_chains(scratch: Path) -> Iterator[Chains]:
    """Both anvil nodes in `scratch`, contracts deployed; stopped by PID on the way out, failure or not."""
    state_dir = scratch / "chain"
    config = ChainConfig(name="anvil", auth_port=free_port(), data_port=free_port())
    try:
        chain_up(config, state_dir)
        session = open_session(config, state_dir=state_dir)
        session.start_background_sending()  # as the coordinator's open_chains does
        try:
            yield Chains(session=session, state_dir=state_dir)
        finally:
            session.stop_background_sending(drain_s=config.tx_timeout_s)
    finally:
        chain_down(state_dir)


class RunChain:
    """One run's chain calls, each returning the seconds it took (and raising `ChainRefusal` on a no)."""

    def __init__(
        self,
        chains: Chains,
        *,
        run_id: str,
        task: str,
        manifest: FederationManifest,
        site_kits: Mapping[str, Path],
        site_state_dirs: Mapping[str, Path],
        artifacts_root: Path,
        he_parameters: Mapping[str, object],
    ) -> None:
        self.run_id = run_id
        self._session = chains.session
        proposal_text = f"benchmark run {run_id} of task {task}\n"
        self._binding = {"run_id": run_id, "config_hash": config_hash(proposal_text), "code_hash": code_hash()}
        enrol_federation(chains.session, manifest, run_id=run_id, proposal_text=proposal_text, site_kits=site_kits)
        self._provenance = ChainProvenance(session=chains.session, artifacts_root=artifacts_root, manifest=manifest)
        self._provenance.start_run(
            RunDescription(run_id=run_id, task=task, config_yaml=proposal_text, dp_parameters={}, he_parameters=dict(he_parameters))
        )
        self._site_checks = {
            site_id: ChainApprovalCheck(state_dir=str(chains.state_dir), site_state_dir=str(state_dir))
            for site_id, state_dir in site_state_dirs.items()
        }

    def site_train_checks_s(self, site_id: str) -> float:
        """A site's check before it trains: its approval of this run's config and code."""
        started = time.perf_counter()
        self._refuse_on(self._site_checks[site_id].problem(site_id=site_id, **self._binding))
        return time.perf_counter() - started

    def site_evaluate_checks_s(self, site_id: str) -> float:
        """A site's first check before it evaluates: its approval (client/app.py, before the phase)."""
        return self.site_train_checks_s(site_id)

    def anchor_wait_s(self, site_id: str, *, server_round: int, aggregate_sha256: str) -> float:
        """A site's read of the aggregate's anchor, waiting for it to land (after decoding, as in evaluate_phase)."""
        started = time.perf_counter()
        check = self._site_checks[site_id]
        self._refuse_on(check.aggregate_problem(run_id=self.run_id, server_round=server_round, aggregate_sha256=aggregate_sha256))
        return time.perf_counter() - started

    def background_send_s(self) -> float:
        """Seconds the coordinator's senders have spent putting writes on chain (summed over both chains)."""
        return sum(gateway.sender.send_s for gateway in (self._session.auth, self._session.data) if gateway.sender is not None)

    def drain(self) -> None:
        """Wait until the senders have put every queued write on chain (between timed rounds)."""
        for gateway in (self._session.auth, self._session.data):
            if gateway.sender is not None and gateway.sender.drain(timeout_s=60.0):
                raise ChainRefusal(f"{gateway.client.name} chain: writes still queued after 60 s: the node is not taking them")

    def admissions_s(self, site_ids: list[str]) -> float:
        """The coordinator's check of the round's sites on the auth chain, read together as the round loop
        does (`RoundLoop.round_admissions`: one JSON-RPC batch)."""
        started = time.perf_counter()
        problems = self._provenance.admission_problems(site_ids=site_ids, run_id=self.run_id)
        for site_id in site_ids:
            self._refuse_on(problems[site_id])
        return time.perf_counter() - started

    def close_round_s(
        self,
        *,
        server_round: int,
        update_digests: Mapping[str, str],
        aggregate_digest: str,
        dataset_manifests: Mapping[str, str],
        he_error_bound: float,
    ) -> float:
        """The coordinator's writes closing a round: decisions (auth), dataset commitments and anchor (data),
        until durable and handed to the background senders (what the round loop waits for)."""
        started = time.perf_counter()
        receipts = self._provenance.close_round(
            run_id=self.run_id,
            server_round=server_round,
            decisions=[AccessDecision(site_id, True, "ok", digest) for site_id, digest in update_digests.items()],
            update_digests=update_digests,
            aggregate_digest=aggregate_digest,
            dataset_manifests=dataset_manifests,
            epsilon_by_site={},
            he_error_bound=he_error_bound,
        )
        seconds = time.perf_counter() - started
        if receipts["auth_tx"] not in ("sending", "mined") or receipts["anchor_tx"] not in ("sending", "mined"):
            raise ChainRefusal(f"round {server_round} of {self.run_id} was not written to the chains: {receipts}")
        return seconds

    @staticmethod
    def _refuse_on(problem: str | None) -> None:
        if problem:
            raise ChainRefusal(problem)
