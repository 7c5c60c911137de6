"""Through a chain outage the run trains on, within limits each party sets for itself.

The coordinator admits sites from the registry state it last verified on the authorization chain
(never a site it has not verified) and stops once a chain has been down past chain.outage_timeout_s.
A site goes on with its own approval of exactly this config and code, seen on the chain within
APPROVAL_OUTAGE_GRACE_S; otherwise it refuses.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_chain_outbox import unreachable  # tests/unit is on sys.path (rootdir-relative imports)

from medtwin.chain import RunRegistration, open_session
from medtwin.chain.backends import free_port
from medtwin.chain.deployment import ChainDeployment, Deployment, write_deployment
from medtwin.client.site_state import ChainVerifiedApprovals
from medtwin.core.config.chain import ChainConfig
from medtwin.experiments import chain_wiring
from medtwin.experiments.chain_wiring import APPROVAL_OUTAGE_GRACE_S, ChainApprovalCheck, ChainProvenance

RUN = "run-outage"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def provenance(tmp_path: Path) -> ChainProvenance:
    session = open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")
    for site_id in ("hosp0", "hosp1"):
        account = session.site_account(site_id)
        session.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=h(site_id))
    session.auth.approve_run(site=session.site_account("hosp0"), run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    session.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    return ChainProvenance(session=session, artifacts_root=tmp_path / "artifacts", outage_timeout_s=0.3)


def test_the_coordinator_admits_from_the_last_verified_registry_state_and_stops_after_the_timeout(provenance: ChainProvenance) -> None:
    assert provenance.admission_problem(site_id="hosp0", run_id=RUN) is None
    refused = provenance.admission_problem(site_id="hosp1", run_id=RUN)
    assert refused is not None and "has not approved" in refused
    with unreachable(provenance.session, "auth"):
        assert provenance.admission_problem(site_id="hosp0", run_id=RUN) is None  # as last verified
        assert provenance.admission_problem(site_id="hosp1", run_id=RUN) == refused  # still refused
        never = provenance.admission_problem(site_id="hosp9", run_id=RUN)
        assert never is not None and "was not verified" in never  # an unknown site is not admitted on trust
        assert provenance.outage_problem() is None  # nothing queued yet
        provenance.outage_timeout_s = 30.0  # "within the timeout" must not depend on how fast a loaded machine gets here
        assert provenance.session.auth.revoke_site(site_id="hosp0", reason="stolen key").status == "queued"
        revoked = provenance.admission_problem(site_id="hosp0", run_id=RUN)
        assert revoked is not None and "revocation of hosp0 waits" in revoked  # the admin's queued word counts
        assert provenance.outage_problem() is None  # within chain.outage_timeout_s: train on
        provenance.outage_timeout_s = 0.3
        time.sleep(0.35)
        stop = provenance.outage_problem()
        assert stop is not None and "the auth chain has taken no write" in stop and "chain.outage_timeout_s=0.3" in stop
    provenance.session.flush()  # the chain is back: the queue goes out
    assert provenance.outage_problem() is None
    assert provenance.admission_problem(site_id="hosp0", run_id=RUN) is not None  # revoked now, on chain


def test_the_outage_boundary_is_the_configured_timeout(provenance: ChainProvenance, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a controlled wall clock: train on up to chain.outage_timeout_s after the oldest queued write, stop after."""
    provenance.outage_timeout_s = 30.0
    with unreachable(provenance.session, "auth"):
        assert provenance.session.auth.revoke_site(site_id="hosp0", reason="stolen key").status == "queued"
        queued = time.time()
        for elapsed, stops in ((0.0, False), (29.0, False), (31.0, True)):
            clock = SimpleNamespace(time=lambda elapsed=elapsed: queued + elapsed, monotonic=time.monotonic)
            monkeypatch.setattr(chain_wiring, "time", clock)
            assert (provenance.outage_problem() is not None) == stops, elapsed


def test_the_outage_clock_survives_a_coordinator_restart(provenance: ChainProvenance, tmp_path: Path) -> None:
    with unreachable(provenance.session, "data"):
        assert provenance.session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d")}).status == "queued"
    time.sleep(0.35)
    restarted = ChainProvenance(
        session=open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain"), artifacts_root=tmp_path / "artifacts",
        outage_timeout_s=0.3,
    )  # fmt: skip
    stop = restarted.outage_problem()
    assert stop is not None and "the data chain" in stop  # the queue on disk, not the process, keeps the time


def _unreachable_chain_dir(tmp_path: Path) -> Path:
    """A deployment record whose nodes do not answer (closed loopback ports)."""
    directory = tmp_path / "site-chain"
    records = {
        role: ChainDeployment(role, f"http://127.0.0.1:{free_port()}", chain_id, contract, "0x" + "11" * 20, 0, "0" * 64, 0.0)
        for role, chain_id, contract in (("auth", 31338, "FederationRegistry"), ("data", 31339, "ProvenanceLedger"))
    }
    write_deployment(directory, Deployment("anvil", records["auth"], records["data"], "", ""))
    return directory


def test_a_site_goes_on_only_with_its_own_approval_recently_seen_on_chain(tmp_path: Path) -> None:
    site_state = tmp_path / "site-state"
    site_state.mkdir()
    check = ChainApprovalCheck(state_dir=str(_unreachable_chain_dir(tmp_path)), site_state_dir=str(site_state))
    binding = dict(site_id="hosp0", run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    never_seen = check.problem(**binding)
    assert never_seen is not None and "cannot read the authorization chain" in never_seen

    verified = ChainVerifiedApprovals(site_state)
    verified.remember(run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    assert check.problem(**binding) is None  # seen on chain moments ago: the site trains on
    other_config = check.problem(**{**binding, "config_hash": h("another config")})
    assert other_config is not None  # not the config it saw approved

    stored = json.loads((site_state / "chain-verified-approvals.json").read_text())
    stored[RUN]["verified_at"] -= APPROVAL_OUTAGE_GRACE_S + 1
    (site_state / "chain-verified-approvals.json").write_text(json.dumps(stored))
    assert check.problem(**binding) is not None  # seen too long ago: refused


def test_a_site_forgets_an_approval_the_chain_no_longer_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Withdrawn on chain, then the chain goes away: the old answer must not come back."""
    session = open_session(ChainConfig(name="embedded"))
    account = session.site_account("hosp0")
    session.auth.register_site(site_id="hosp0", address=account.address, key_fingerprint=h("hosp0"))
    session.auth.approve_run(site=account, run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    monkeypatch.setattr("medtwin.experiments.chain_wiring.shared_readonly", lambda state_dir: session)  # an embedded chain to read
    site_state = tmp_path / "site-state"
    site_state.mkdir()
    check = ChainApprovalCheck(state_dir="unused", site_state_dir=str(site_state))
    binding = dict(site_id="hosp0", run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    assert check.problem(**binding) is None
    assert ChainVerifiedApprovals(site_state).age_s(run_id=RUN, config_hash=h("c"), code_hash=h("k")) is not None
    session.auth.withdraw_approval(site=account, run_id=RUN)
    assert check.problem(**binding) is not None
    assert ChainVerifiedApprovals(site_state).age_s(run_id=RUN, config_hash=h("c"), code_hash=h("k")) is None
    with unreachable(session, "auth"):
        assert check.problem(**binding) is not None  # no remembered approval to fall back on


def test_a_site_reads_its_dp_history_from_the_data_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medtwin.chain import build_round_anchor
    from medtwin.core.artifacts import ArtifactStore

    session = open_session(ChainConfig(name="embedded"))
    session.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("data")})
    store = ArtifactStore(tmp_path / "artifacts")
    built, _ = build_round_anchor(
        store, run_id=RUN, round_index=1, update_digests={"hosp0": store.put(b"u", kind="update")},
        aggregate_digest=store.put(b"a", kind="aggregate"), epsilon_by_site={"hosp0": 0.7}, he_error_bound=0.0,
    )  # fmt: skip
    session.data.anchor_round(built)
    monkeypatch.setattr("medtwin.experiments.chain_wiring.shared_readonly", lambda state_dir: session)
    check = ChainApprovalCheck(state_dir="unused")
    erased = check.erased_ledger_problem(site_id="hosp0", ledger_path="/srv/state/privacy-ledger.json")
    assert erased is not None and RUN in erased and "Restore both from backup" in erased
    assert check.erased_ledger_problem(site_id="hosp1", ledger_path="x") is None  # a new site starts fresh
    with unreachable(session, "data"):
        cannot = check.erased_ledger_problem(site_id="hosp1", ledger_path="x")
        assert cannot is not None and "cannot be read now" in cannot
