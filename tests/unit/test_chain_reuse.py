"""What a session keeps between chain calls, and what it must read every time.

Kept: the node's chain id, a site's registration (address, key fingerprint: the registry never rewrites
them), the account's next nonce, a read-only session per chain state dir, the dataset commitments this
coordinator wrote. Read every time: revocations, approvals and withdrawals.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from medtwin.chain import RunRegistration, open_session, shared_readonly
from medtwin.chain.backends import free_port
from medtwin.chain.client import ChainClient
from medtwin.chain.deployment import ChainDeployment, Deployment, write_deployment
from medtwin.chain.encoding import run_key
from medtwin.core.config.chain import ChainConfig
from medtwin.experiments.chain_wiring import ChainProvenance

RUN = "run-reuse"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _count_calls(monkeypatch: pytest.MonkeyPatch, gateway: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    original = gateway.client.call  # type: ignore[attr-defined]

    def counted(function: object, *, what: str) -> object:
        counts[what] += 1
        return original(function, what=what)

    original_read = gateway.client.read  # type: ignore[attr-defined]

    def counted_read(calls: list, *, what: str) -> list:
        counts.update(call.what for call in calls)  # one count per eth_call, batched or not
        return original_read(calls, what=what)

    monkeypatch.setattr(gateway.client, "call", counted)  # type: ignore[attr-defined]
    monkeypatch.setattr(gateway.client, "read", counted_read)  # type: ignore[attr-defined]
    return counts


def test_admission_reads_the_registration_once_and_revocation_or_withdrawal_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = open_session(ChainConfig(name="embedded"))
    accounts = {site_id: session.site_account(site_id) for site_id in ("hosp0", "hosp1")}
    for site_id, account in accounts.items():
        session.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=h(site_id))
        session.auth.approve_run(site=account, run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    provenance = ChainProvenance(session=session, artifacts_root=tmp_path / "artifacts")
    counts = _count_calls(monkeypatch, session.auth)
    for _ in range(3):
        assert provenance.admission_problem(site_id="hosp0", run_id=RUN) is None
    assert counts == {"site_address": 1, "sites": 1, "is_admitted": 3}

    session.auth.revoke_site(site_id="hosp0", reason="compromised")
    assert "revoked or has not approved" in (provenance.admission_problem(site_id="hosp0", run_id=RUN) or "")
    assert provenance.admission_problem(site_id="hosp1", run_id=RUN) is None
    session.auth.withdraw_approval(site=accounts["hosp1"], run_id=RUN)
    assert "revoked or has not approved" in (provenance.admission_problem(site_id="hosp1", run_id=RUN) or "")
    assert "not registered" in (provenance.admission_problem(site_id="hosp9", run_id=RUN) or "")


def test_approval_and_admission_read_together_follow_a_withdrawal() -> None:
    session = open_session(ChainConfig(name="embedded"))
    account = session.site_account("hosp0")
    session.auth.register_site(site_id="hosp0", address=account.address, key_fingerprint=h("hosp0"))
    assert session.auth.approval_and_admission(site_id="hosp0", run_id=RUN) == (None, False)
    session.auth.approve_run(site=account, run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    approval, admitted = session.auth.approval_and_admission(site_id="hosp0", run_id=RUN)
    assert admitted and approval is not None and approval.config_hash == h("c") and approval.code_hash == h("k")
    session.auth.withdraw_approval(site=account, run_id=RUN)
    approval, admitted = session.auth.approval_and_admission(site_id="hosp0", run_id=RUN)
    assert not admitted and approval is not None and approval.withdrawn_at > 0
    assert session.auth.approval_and_admission(site_id="nobody", run_id=RUN) == (None, False)


def test_a_remembered_nonce_recovers_when_another_process_sent_from_the_same_account() -> None:
    session = open_session(ChainConfig(name="embedded"))
    session.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    assert session.data.client._nonces  # remembered after the first send
    other_process = ChainClient(session.data.client.w3, name="data", url="embedded://other", fixed_gas=session.data.client.fixed_gas)
    other_process.transact(
        session.data.coordinator,
        session.data.contract.functions.record_lineage(bytes.fromhex(h("model")), b"\0" * 32, run_key(RUN), 1),
        call="record_lineage",
    )
    receipt = session.data.register_run(RunRegistration("run-2", "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    assert receipt.mined and session.data.run("run-2") is not None and session.data.origin(h("model"), RUN) is not None


def test_dataset_commitments_are_not_read_again_once_this_session_wrote_them(monkeypatch: pytest.MonkeyPatch) -> None:
    session = open_session(ChainConfig(name="embedded"))
    session.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    assert session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0"), "hosp1": h("d1")}) is not None
    counts = _count_calls(monkeypatch, session.data)
    assert session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0"), "hosp1": h("d1")}) is None
    assert counts["datasets"] == 0
    changed = session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0"), "hosp1": h("d1-new")})
    assert changed is not None and changed.mined
    assert {c.site_key: c.manifest_hash for c in session.data.dataset_commitments(RUN)}.get(
        hashlib.sha256(b"medtwin.site:hosp1").hexdigest()
    ) == h("d1-new")


def _deployment_dir(tmp_path: Path, *, auth_address: str) -> Path:
    records = {
        role: ChainDeployment(role, f"http://127.0.0.1:{free_port()}", chain_id, contract, address, 0, "0" * 64, 0.0)
        for role, chain_id, contract, address in (
            ("auth", 31338, "FederationRegistry", auth_address),
            ("data", 31339, "ProvenanceLedger", "0x" + "22" * 20),
        )
    }
    write_deployment(tmp_path / "chain", Deployment("anvil", records["auth"], records["data"], "", ""))
    return tmp_path / "chain"


def test_one_readonly_session_per_state_dir_until_its_deployment_changes(tmp_path: Path) -> None:
    directory = _deployment_dir(tmp_path, auth_address="0x" + "11" * 20)
    first = shared_readonly(directory)
    assert shared_readonly(str(directory)) is first
    assert first.auth.client.w3.provider.cacheable_requests == {"eth_chainId"}  # nothing that can change is cached
    _deployment_dir(tmp_path, auth_address="0x" + "33" * 20)  # redeployed: a new record
    second = shared_readonly(directory)
    assert second is not first and second.auth.address.lower() == "0x" + "33" * 20
