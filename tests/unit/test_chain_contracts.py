"""The compiled-contract cache matches the Vyper sources, and is rebuilt when a source changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import vyper

from medtwin.chain import compiler
from medtwin.chain.compiler import CONTRACT_NAMES, build_path, compile_contract, load_contract, source_path


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_cache_matches_source_and_vyper_version(name: str) -> None:
    cached = json.loads(build_path(name).read_text())
    assert cached["source_sha256"] == hashlib.sha256(source_path(name).read_bytes()).hexdigest(), (
        f"{build_path(name)} is stale: run `python -c 'from medtwin.chain import load_contract; "
        f"load_contract(\"{name}\")'` to regenerate it"
    )
    assert cached["vyper_version"] == vyper.__version__
    fresh = compile_contract(name)
    assert cached["abi"] == fresh.abi
    assert cached["bytecode"] == fresh.bytecode


def test_abi_exposes_the_documented_interface() -> None:
    registry = {item.get("name") for item in load_contract("FederationRegistry").abi}
    ledger = {item.get("name") for item in load_contract("ProvenanceLedger").abi}
    assert {"grant_role", "register_site", "approve_run", "is_admitted", "issue_grant", "record_decisions", "AccessDecision"} <= registry
    assert {"register_run", "commit_datasets", "anchor_round", "record_lineage", "release_model", "RoundAnchored"} <= ledger


def test_changed_source_triggers_a_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contracts = tmp_path / "contracts"
    (contracts / "build").mkdir(parents=True)
    source = source_path("ProvenanceLedger").read_text()
    (contracts / "ProvenanceLedger.vy").write_text(source)
    monkeypatch.setattr(compiler, "CONTRACTS_DIR", contracts)
    monkeypatch.setattr(compiler, "BUILD_DIR", contracts / "build")
    load_contract.cache_clear()
    try:
        first = load_contract("ProvenanceLedger")
        assert (contracts / "build" / "ProvenanceLedger.json").is_file()
        (contracts / "ProvenanceLedger.vy").write_text(source + "\n# a comment changes the hash\n")
        load_contract.cache_clear()
        second = load_contract("ProvenanceLedger")
        assert second.source_sha256 != first.source_sha256
        assert json.loads((contracts / "build" / "ProvenanceLedger.json").read_text())["source_sha256"] == second.source_sha256
    finally:
        load_contract.cache_clear()
