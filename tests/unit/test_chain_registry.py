"""FederationRegistry on the embedded EVM: roles, sites, approvals, grants, access-decision events."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from medtwin.chain import AuthChain, ChainRevertError, ChainSession, Decision, Role, dev_account, open_session, site_key
from medtwin.chain.accounts import ChainAccount
from medtwin.core.config.chain import ChainConfig

FINGERPRINT = hashlib.sha256(b"ed25519 public key").hexdigest()
CONFIG_HASH, CODE_HASH = "c0" * 32, "de" * 32


@pytest.fixture(scope="module")
def session() -> Iterator[ChainSession]:
    yield open_session(ChainConfig(name="embedded"))


def acting_as(session: ChainSession, account: ChainAccount) -> AuthChain:
    """The same contract, but every admin/coordinator write signed by `account`."""
    session.auth.client.fund_from_node(account.address, wei=10**18)
    return AuthChain(session.auth.client, session.auth.contract, deploy_block=session.auth.deploy_block, admin=account, coordinator=account)


def registered_site(session: ChainSession, site_id: str) -> ChainAccount:
    account = session.site_account(site_id)
    session.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=FINGERPRINT)
    return account


def test_deployer_is_admin_and_coordinator_has_its_role(session: ChainSession) -> None:
    assert session.auth.has_role(session.deployment.admin, Role.ADMIN)
    assert session.auth.has_role(session.deployment.coordinator, Role.COORDINATOR)
    assert not session.auth.has_role(session.deployment.coordinator, Role.ADMIN)


def test_non_admin_cannot_grant_roles_or_register_sites(session: ChainSession) -> None:
    intruder = acting_as(session, dev_account("intruder"))
    with pytest.raises(ChainRevertError, match="lacks the admin role"):
        intruder.grant_role(dev_account("intruder").address, Role.AUDITOR)
    with pytest.raises(ChainRevertError, match="lacks the admin role"):
        intruder.register_site(site_id="evil", address=dev_account("evil").address, key_fingerprint=FINGERPRINT)
    assert not session.auth.has_role(dev_account("intruder").address, Role.AUDITOR)
    assert session.auth.site("evil") is None


def test_admin_grants_and_revokes_roles_but_not_its_own_admin(session: ChainSession) -> None:
    auditor = dev_account("auditor").address
    session.auth.grant_role(auditor, Role.AUDITOR)
    assert session.auth.has_role(auditor, Role.AUDITOR)
    session.auth.revoke_role(auditor, Role.AUDITOR)
    assert not session.auth.has_role(auditor, Role.AUDITOR)
    with pytest.raises(ChainRevertError, match="own admin role"):
        session.auth.revoke_role(session.deployment.admin, Role.ADMIN)


def test_is_admitted_requires_registered_unrevoked_and_approved(session: ChainSession) -> None:
    run = "run-admission"
    assert not session.auth.is_admitted(site_id="never-registered", run_id=run)
    site = registered_site(session, "hosp-admit")
    assert not session.auth.is_admitted(site_id="hosp-admit", run_id=run), "registered but not approved"
    session.auth.approve_run(site=site, run_id=run, config_hash=CONFIG_HASH, code_hash=CODE_HASH)
    assert session.auth.is_admitted(site_id="hosp-admit", run_id=run)
    assert not session.auth.is_admitted(site_id="hosp-admit", run_id="another-run"), "approval is per run"
    approval = session.auth.approval(site_id="hosp-admit", run_id=run)
    assert approval is not None and approval.config_hash == CONFIG_HASH and approval.code_hash == CODE_HASH
    session.auth.revoke_site(site_id="hosp-admit", reason="key_compromised")
    assert not session.auth.is_admitted(site_id="hosp-admit", run_id=run)
    record = session.auth.site("hosp-admit")
    assert record is not None and not record.active and record.revoked_at > 0
    with pytest.raises(ChainRevertError, match="revoked site"):
        session.auth.approve_run(site=site, run_id="run-later", config_hash=CONFIG_HASH, code_hash=CODE_HASH)


def test_withdrawn_consent_ends_admission(session: ChainSession) -> None:
    site = registered_site(session, "hosp-withdraw")
    session.auth.approve_run(site=site, run_id="run-w", config_hash=CONFIG_HASH, code_hash=CODE_HASH)
    session.auth.withdraw_approval(site=site, run_id="run-w")
    assert not session.auth.is_admitted(site_id="hosp-withdraw", run_id="run-w")


def test_only_a_registered_site_approves_and_only_for_itself(session: ChainSession) -> None:
    stranger = dev_account("site:stranger")
    session.auth.client.fund_from_node(stranger.address, wei=10**18)
    with pytest.raises(ChainRevertError, match="not a registered site"):
        session.auth.approve_run(site=stranger, run_id="run-x", config_hash=CONFIG_HASH, code_hash=CODE_HASH)
    registered_site(session, "hosp-own")
    # The stranger signing cannot create an approval for hosp-own: msg.sender is the approver.
    assert session.auth.approval(site_id="hosp-own", run_id="run-x") is None


def test_site_ids_and_addresses_register_once(session: ChainSession) -> None:
    site = registered_site(session, "hosp-once")
    with pytest.raises(ChainRevertError, match="already registered"):
        session.auth.register_site(site_id="hosp-once", address=dev_account("other").address, key_fingerprint=FINGERPRINT)
    with pytest.raises(ChainRevertError, match="already registered"):
        session.auth.register_site(site_id="hosp-twice", address=site.address, key_fingerprint=FINGERPRINT)
    record = session.auth.site("hosp-once")
    assert record is not None and record.key_fingerprint == FINGERPRINT and record.site_key == site_key("hosp-once").hex()


def test_grants_expire_and_can_be_revoked(session: ChainSession) -> None:
    tester = session.auth.client.w3.provider.ethereum_tester
    researcher = dev_account("researcher").address
    now = session.auth.client.block_timestamp(session.auth.client.block_number())
    session.auth.issue_grant(grantee=researcher, scope="export_model", expires_at=now + 3600)
    assert session.auth.has_grant(grantee=researcher, scope="export_model")
    assert not session.auth.has_grant(grantee=researcher, scope="read_metrics")
    tester.time_travel(now + 7200)
    tester.mine_blocks(1)
    assert not session.auth.has_grant(grantee=researcher, scope="export_model"), "expired grant still valid"
    later = session.auth.client.block_timestamp(session.auth.client.block_number())
    session.auth.issue_grant(grantee=researcher, scope="audit", expires_at=later + 3600)
    session.auth.revoke_grant(grantee=researcher, scope="audit")
    assert not session.auth.has_grant(grantee=researcher, scope="audit")
    with pytest.raises(ChainRevertError, match="already be expired"):
        session.auth.issue_grant(grantee=researcher, scope="late", expires_at=later - 1)


def test_one_round_of_decisions_is_one_transaction_with_exact_events(session: ChainSession) -> None:
    run = "run-decisions"
    sites = [f"hosp-d{index}" for index in range(16)]
    for site_id in sites[:4]:  # the other 12 stay unregistered: their actor is the zero address
        registered_site(session, site_id)
    update = hashlib.sha256(b"update of d0").hexdigest()
    decisions = [Decision("admit_update", True, "ok", site_id=site_id, subject=update) for site_id in sites]
    decisions.append(Decision("reject_update", False, "unknown_site", site_id="ghost"))
    receipt = session.auth.record_decisions(decisions, run_id=run, round_index=3)
    assert receipt.mined and receipt.gas_used > 0
    records = session.auth.decisions(run_id=run)
    assert len(records) == 17
    assert {record.tx_hash for record in records} == {receipt.tx_hash.removeprefix("0x")}, "one transaction per round"
    first = records[0]
    block_time = session.auth.client.block_timestamp(receipt.block_number)
    assert (first.site_id, first.action, first.granted, first.reason, first.round_index) == ("hosp-d0", "admit_update", True, "ok", 3)
    assert first.actor == session.auth.site_address("hosp-d0")
    assert first.subject == update and first.timestamp == block_time
    assert first.recorder == session.deployment.coordinator
    ghost = records[-1]
    assert (ghost.action, ghost.granted, ghost.reason, ghost.site_id) == ("reject_update", False, "unknown_site", "")
    assert int(ghost.actor, 16) == 0 and ghost.site_key == site_key("ghost").hex()
    assert [record.site_id for record in session.auth.decisions(site_id="ghost")] == [""]
    assert len(session.auth.decisions(site_id="hosp-d3", run_id=run)) == 1
    with pytest.raises(ChainRevertError, match="already recorded"):
        session.auth.record_decisions(decisions, run_id=run, round_index=3)


def test_only_the_coordinator_records_decisions(session: ChainSession) -> None:
    intruder = acting_as(session, dev_account("not-coordinator"))
    with pytest.raises(ChainRevertError, match="lacks the coordinator role"):
        intruder.record_decisions([Decision("admit_update", True, "ok", site_id="x")], run_id="r", round_index=1)
    admin_only = AuthChain(session.auth.client, session.auth.contract, admin=session.auth.admin, coordinator=session.auth.admin)
    with pytest.raises(ChainRevertError, match="lacks the coordinator role"):
        admin_only.record_decisions([Decision("export_model", True, "ok")], run_id="r", round_index=1)
