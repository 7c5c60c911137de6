"""Backend selection and configuration: anvil lookup, config validation, embedded session basics."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from medtwin.chain import AnvilNotFoundError, ChainSetupError, Role, chain_status, chain_up, open_session
from medtwin.chain.backends import anvil as anvil_backend
from medtwin.chain.backends import find_anvil
from medtwin.core.config import compose_config
from medtwin.core.config.chain import ChainConfig, validate_chain_config
from medtwin.core.errors import ConfigError


def test_missing_anvil_says_to_run_npm_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anvil_backend, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MEDTWIN_ANVIL", raising=False)
    with pytest.raises(AnvilNotFoundError, match="npm install") as caught:
        find_anvil()
    assert any("node_modules" in place for place in caught.value.searched)


def test_medtwin_anvil_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "my-anvil"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("MEDTWIN_ANVIL", str(fake))
    assert find_anvil() == fake
    assert find_anvil(str(fake)) == fake


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"name": "ganache"}, "chain.name"),
        ({"name": "anvil", "data_chain_id": 31338}, "chain.data_chain_id"),
        ({"name": "anvil", "auth_port": 9000, "data_port": 9000}, "chain.data_port"),
        ({"name": "rpc", "auth_rpc_url": "localhost:8545"}, "chain.auth_rpc_url"),
        ({"name": "anvil", "tx_timeout_s": 0}, "chain.tx_timeout_s"),
    ],
)
def test_invalid_chain_configs_name_their_key(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_chain_config(ChainConfig(**changes))
    assert caught.value.key == key


@pytest.mark.parametrize("option", ["none", "embedded", "anvil", "rpc"])
def test_every_chain_option_composes_and_validates(option: str) -> None:
    config = compose_config([f"chain={option}"])
    assert config.chain.name == option
    validate_chain_config(config.chain)
    if option != "none":
        assert config.chain.auth_chain_id != config.chain.data_chain_id


def test_chain_up_refuses_embedded_and_none(tmp_path: Path) -> None:
    for name in ("embedded", "none"):
        with pytest.raises(ChainSetupError, match="chain up"):
            chain_up(ChainConfig(name=name), tmp_path)
    with pytest.raises(ChainSetupError, match="no chain"):
        open_session(ChainConfig(name="none"))


def test_status_of_an_empty_state_dir_is_unhealthy_and_creates_nothing(tmp_path: Path) -> None:
    status = chain_status(tmp_path / "absent")
    assert not status.healthy and [node.reachable for node in status.nodes] == [False, False]
    assert not (tmp_path / "absent").exists()


def test_embedded_session_summary_names_both_contracts(tmp_path: Path) -> None:
    session = open_session(ChainConfig(name="embedded"), state_dir=tmp_path)
    summary = session.summary()
    assert summary["backend"] == "embedded"
    assert summary["auth"]["contract"] == session.auth.address and summary["data"]["contract"] == session.data.address
    receipt = session.auth.grant_role(session.deployment.coordinator, Role.AUDITOR)
    assert receipt.mined and receipt.gas_used > 0
    assert session.auth.has_role(session.deployment.coordinator, Role.AUDITOR)


def test_contracts_deployed_from_another_source_version_are_not_reused(tmp_path) -> None:
    """A chain state folder kept from an older medtwin holds contracts with another ABI (e.g. without per-run
    lineage): reusing them would fail later, mid-run; it is refused up front, naming the folder and the fix."""
    from dataclasses import replace as replaced

    import pytest

    from medtwin.chain import ChainSetupError
    from medtwin.chain.accounts import dev_account
    from medtwin.chain.compiler import load_contract
    from medtwin.chain.deployment import CONTRACT_OF, ChainDeployment, Deployment, write_deployment
    from medtwin.chain.session import ensure_deployed

    class LiveNode:  # stands in for a node that still has code at the recorded address
        url = "http://127.0.0.1:1"
        chain_id = 31339

        def has_code(self, address: str) -> bool:
            return True

    def record(role: str) -> ChainDeployment:
        source = load_contract(CONTRACT_OF[role]).source_sha256
        return ChainDeployment(role, LiveNode.url, LiveNode.chain_id, CONTRACT_OF[role], "0x" + "11" * 20, 1, source, 0.0)

    admin, coordinator = dev_account("admin"), dev_account("coordinator")
    current = Deployment("anvil", record("auth"), record("data"), admin.address, coordinator.address)
    write_deployment(tmp_path, current)
    clients = {"auth": LiveNode(), "data": LiveNode()}
    reused = ensure_deployed("anvil", clients, admin=admin, coordinator=coordinator, fund_from_node=False, state_dir=tmp_path)
    assert reused.data.address == current.data.address  # same source: reused as before
    write_deployment(tmp_path, replaced(current, data=replaced(current.data, source_sha256="ab" * 32)))
    with pytest.raises(ChainSetupError, match="deployed from another version of ProvenanceLedger.vy"):
        ensure_deployed("anvil", clients, admin=admin, coordinator=coordinator, fund_from_node=False, state_dir=tmp_path)
