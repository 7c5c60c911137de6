"""Two real anvil nodes: deploy, write, stop/restart with --state, outbox replay, audit in a fresh process.

Needs anvil from npm: run `npm install` at the repository root (the test fails, not skips, without it).
Nodes are always stopped by PID in the fixture finalizer, even when an assertion fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from medtwin.chain import (
    AnvilNotFoundError,
    ChainSession,
    Decision,
    RoundStatus,
    RunRegistration,
    build_round_anchor,
    chain_down,
    chain_status,
    chain_up,
    open_session,
)
from medtwin.chain.backends import find_anvil, free_port, read_node
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig

pytestmark = pytest.mark.slow

RUN = "run-anvil-1"
SITES = ("hosp0", "hosp1", "hosp2")
AUDIT_SCRIPT = """
import sys
from medtwin.chain import open_readonly, audit_verify
from medtwin.core.artifacts import ArtifactStore
report = audit_verify(open_readonly(sys.argv[1]), ArtifactStore(sys.argv[2]), sys.argv[3])
print(report.to_json())
sys.exit(0 if report.ok else 3)
"""


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def anvil_config() -> ChainConfig:
    try:
        find_anvil()
    except AnvilNotFoundError as error:
        pytest.fail(f"anvil is not installed — run `npm install` at the repository root.\n{error}")
    return ChainConfig(
        name="anvil", auth_chain_id=424201, data_chain_id=424202, auth_port=free_port(), data_port=free_port(), state_interval_s=1
    )


@pytest.fixture()
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "chain"
    yield directory
    chain_down(directory)  # by the PIDs recorded in nodes/*.pid, even after a failed assertion
    for role in ("auth", "data"):
        node = read_node(directory, role)
        if node is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(node.pid, 0)


def audit_in_fresh_process(state_dir: Path, artifacts: Path) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT, str(state_dir), str(artifacts), RUN], capture_output=True, text=True, timeout=120
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def run_round(session: ChainSession, store: ArtifactStore, round_index: int) -> str:
    digests = {site: store.put(f"{site} update {round_index}".encode(), kind="update") for site in SITES}
    aggregate = store.put(f"aggregate {round_index}".encode(), kind="aggregate")
    decisions = [Decision("admit_update", True, "ok", site_id=site, subject=digest) for site, digest in digests.items()]
    assert session.auth.record_decisions(decisions, run_id=RUN, round_index=round_index).status in {"mined", "queued"}
    anchor, _ = build_round_anchor(
        store, run_id=RUN, round_index=round_index, update_digests=digests, aggregate_digest=aggregate,
        epsilon_by_site={site: 0.3 * round_index for site in SITES}, he_error_bound=2e-8,
    )
    return session.data.anchor_round(anchor).status


def test_two_nodes_persist_state_replay_the_outbox_and_pass_an_external_audit(
    anvil_config: ChainConfig, state_dir: Path, tmp_path: Path
) -> None:
    status = chain_up(anvil_config, state_dir)
    assert status.healthy, status.to_json()
    assert {node.chain_id for node in status.nodes} == {424201, 424202}
    first_pids = {node.role: node.pid for node in status.nodes}

    session = open_session(anvil_config, state_dir=state_dir)
    store = ArtifactStore(tmp_path / "artifacts")
    for site_id in SITES:
        account = session.site_account(site_id)
        session.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=h(f"key {site_id}"))
        session.auth.approve_run(site=account, run_id=RUN, config_hash=h("config"), code_hash=h("code"))
    session.data.register_run(RunRegistration(RUN, "breast_cancer", h("config"), h("code"), h("dp"), h("he")))
    session.data.commit_datasets(run_id=RUN, manifests={site: h(f"data {site}") for site in SITES})
    assert [run_round(session, store, index) for index in (1, 2)] == ["mined", "mined"]

    stopped = chain_down(state_dir)
    assert len(stopped) == 2
    assert not chain_status(state_dir).healthy
    # While the nodes are down, round 3 is queued durably, not lost and not "finalized".
    assert run_round(session, store, 3) == "queued"
    assert session.data.round_status(RUN, 3) is RoundStatus.QUEUED
    assert chain_status(state_dir).nodes[1].pending_writes == 1

    status = chain_up(anvil_config, state_dir)
    assert status.healthy
    assert {node.role: node.pid for node in status.nodes} != first_pids, "nodes were restarted"
    assert all(session.auth.is_admitted(site_id=site, run_id=RUN) for site in SITES), "auth state lost on restart"
    assert session.data.anchor(RUN, 2) is not None, "data state lost on restart"
    assert len(session.auth.decisions(run_id=RUN)) == 2 * len(SITES)  # round 3's batch is still queued
    flushed = session.flush()
    assert flushed["data"].remaining == 0 and flushed["auth"].remaining == 0
    finalized = session.finalize(wait_s=10.0)  # mined is not enough: anvil must have dumped its state (every second)
    assert all(result.finalized == result.journaled > 0 for result in finalized.values()), finalized
    assert session.data.round_status(RUN, 3) is RoundStatus.FINALIZED
    assert len(session.auth.decisions(run_id=RUN)) == 3 * len(SITES)

    code, report = audit_in_fresh_process(state_dir, tmp_path / "artifacts")
    assert code == 0 and report["ok"] and report["rounds_checked"] == 3, report

    victim = store.path(next(digest for digest, kind in store.kinds().items() if kind == "update"))
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF  # alter one byte of one stored update
    victim.write_bytes(bytes(data))
    code, report = audit_in_fresh_process(state_dir, tmp_path / "artifacts")
    assert code == 3 and not report["ok"]
    assert {m["kind"] for m in report["mismatches"]} == {"update", "merkle_root"}
