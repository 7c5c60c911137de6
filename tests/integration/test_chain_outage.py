"""The data chain's node is killed in the middle of a run and comes back without its last writes:
nothing is lost.

A 3-round Fed-Heart-Disease run on two real anvil nodes. When round 1 is anchored the test keeps a
copy of the data node's state dump; right after round 2's anchor is mined the node is SIGKILLed and
its state file replaced by that copy — exactly a node whose last dump came before round 2's anchor
(anvil dumps every chain.state_interval_s) — and the auth node is stopped as well. Training goes on
(the coordinator admits sites from the registry state it last verified, each site trains on with its
own approval it saw on chain moments before, decisions are queued) — sites will not evaluate an aggregate
they cannot see anchored, and say so — later anchors and the final lineage wait in the outbox, and
the run still writes summary.json and report.md saying what is queued and that it is not finalized.
`medtwin chain up` brings the node back and reconciles: the writes the node lost are sent again from
the coordinator's journal, then the queue, in order; `medtwin chain flush` then has nothing left;
`medtwin audit verify`, in a fresh process, finds every round and its decisions. Then the same crash once more, with
round 2's anchor also removed from the journal: verify fails naming round 2. In between, the same
config and seed run again under a new run id (a reproducibility check): it gives the same model, and
that model's lineage names both runs. Both nodes are stopped
by PID in the finalizer, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from medtwin.chain import Outbox, audit_lineage, audit_verify, chain_down, chain_up, open_readonly, open_session, run_key
from medtwin.core.artifacts import ArtifactStore
from medtwin.chain.backends.anvil import node_is_running, read_node, stop_anvil
from medtwin.core.config import compose_config

pytestmark = pytest.mark.slow

ROUNDS = 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medtwin.experiments.cli", *args], capture_output=True, text=True, timeout=300)


def _train_rounds(metrics: Path) -> set[int]:
    if not metrics.is_file():
        return set()
    return {json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["phase"] == "train"}


def _keep_a_copy_of_the_state_dump(state_dir: Path, copy: Path) -> None:
    state = state_dir / "nodes" / "data-state.json"
    while True:  # anvil may be mid-dump: keep a copy that parses
        shutil.copyfile(state, copy)
        try:
            json.loads(copy.read_text())
            return
        except ValueError:
            time.sleep(0.05)


def _wait_until_on_chain(state_dir: Path, run_id: str, round_index: int, deadline: float) -> None:
    """Round `round_index`'s writes, sent by the coordinator's background senders, are on chain: its anchor is
    there and neither outbox holds anything."""
    while time.monotonic() < deadline:
        empty = all(not Outbox(state_dir / f"outbox-{role}.jsonl", chain=role).pending() for role in ("auth", "data"))
        if empty and open_readonly(state_dir).data.anchor(run_id, round_index) is not None:
            return
        time.sleep(0.01)


def _crash_back_to(state_dir: Path, copy: Path) -> None:
    """SIGKILL the data node (no final dump) and leave it the older dump: it lost what came after."""
    node = read_node(state_dir, "data")
    assert node is not None and node_is_running(node)
    os.kill(node.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_is_running(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not node_is_running(node)
    shutil.copyfile(copy, state_dir / "nodes" / "data-state.json")


def test_a_killed_data_node_loses_nothing_the_journal_and_the_outbox_resend(tmp_path: Path) -> None:
    from medtwin.experiments.simulate import simulate

    state_dir, runs_dir, run_id = tmp_path / "chain", tmp_path / "runs", "outage-run"
    config = compose_config(
        [
            "task=fed_heart_disease", f"federation.num_rounds={ROUNDS}", "baselines.enabled=false", "progress=false",
            f"runs_dir={runs_dir}", "chain=anvil", f"chain.state_dir={state_dir}", "chain.auth_port=0", "chain.data_port=0",
            f"run_id={run_id}",
        ]
    )  # fmt: skip
    metrics = runs_dir / run_id / "metrics.jsonl"
    older_state = tmp_path / "data-state-round-1.json"
    crashed = threading.Event()

    def crash_the_data_node_after_round_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and 1 not in _train_rounds(metrics):
            time.sleep(0.02)
        _wait_until_on_chain(state_dir, run_id, 1, deadline)
        _keep_a_copy_of_the_state_dump(state_dir, older_state)
        while time.monotonic() < deadline and 2 not in _train_rounds(metrics):
            time.sleep(0.02)
        _wait_until_on_chain(state_dir, run_id, 2, deadline)
        _crash_back_to(state_dir, older_state)
        auth = read_node(state_dir, "auth")
        assert auth is not None and stop_anvil(auth)  # and the auth chain goes down too (cleanly)
        crashed.set()

    watcher = threading.Thread(target=crash_the_data_node_after_round_2, daemon=True)
    try:
        watcher.start()
        run_path = simulate(config)
        watcher.join(timeout=10)
        assert crashed.is_set(), "the data node was never killed"

        summary = json.loads((run_path / "summary.json").read_text())
        assert summary["rounds_completed"] == ROUNDS  # training went on through the outage
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        anchor_status = {r["round"]: r["chain"]["anchor_tx"] for r in records if r["phase"] == "train"}
        # each round's writes were durable in the outbox when it closed and went out with the background senders:
        # "sending", or "queued" once a sender knows its chain is down; where they ended up is in the summary below
        assert anchor_status[1] == anchor_status[2] == "sending" and {anchor_status[r] for r in range(3, ROUNDS + 1)} <= {"sending", "queued"}
        # the auth chain was down too: sites were admitted from the registry state last verified, each site
        # trained on with its own approval seen on chain moments before, and the decisions were queued
        assert all(set(r["participants"]) == set(summary["sites"]) for r in records if r["phase"] == "train"), records
        assert {r["chain"]["auth_tx"] for r in records if r["phase"] == "train" and r["round"] >= 3} <= {"sending", "queued"}
        chain = summary["chain"]
        assert chain["lineage_tx"] == "queued" and chain["anchors_written"] is None and chain["finalized"] is False
        assert chain["queued"]["data"].count("anchor_round") == ROUNDS - 2 and "record_lineage" in chain["queued"]["data"]
        assert chain["queued"]["auth"] == ["record_decisions"] * (ROUNDS - 2)
        assert "queued, not yet on chain" in (run_path / "report.md").read_text()
        refused = [r for r in records if r["phase"] == "evaluate" and r["round"] >= 3]
        assert refused and all(not r.get("sites") for r in refused)  # no site evaluated an aggregate it could not see anchored

        up = _cli("chain", "up", f"chain.state_dir={state_dir}", "chain.auth_port=0", "chain.data_port=0")
        assert up.returncode == 0, up.stdout + up.stderr
        data_line = next(line for line in up.stdout.splitlines() if line.startswith("data chain:"))
        resent = data_line.split("lost and sent again (")[1].split(")")[0].split(", ")
        assert resent[-1] == "anchor_round" and "record_lineage" not in resent, data_line  # round 2's anchor (and what came before it)
        queued_sent = ", ".join(["anchor_round"] * (ROUNDS - 2) + ["record_lineage"])
        assert "0 still queued" in data_line and f"queued write(s) sent ({queued_sent})" in data_line, data_line
        flush = _cli("chain", "flush", f"chain.state_dir={state_dir}")
        assert flush.returncode == 0 and "0 lost and sent again" in flush.stdout and "0 still queued" in flush.stdout, flush.stdout + flush.stderr
        anchors = open_readonly(state_dir).data.anchors(run_id)
        assert [anchor.round_index for anchor in anchors] == list(range(1, ROUNDS + 1))
        assert anchors[-1].aggregate_hash.removeprefix("0x") == summary["final_aggregate_sha256"]
        audit = _cli("audit", "verify", run_id, "--state-dir", str(state_dir), "--runs-dir", str(runs_dir))
        assert audit.returncode == 0, audit.stdout + audit.stderr

        # A reproducibility check: the same config and seed under a new run id gives the same model; both
        # runs finish and the model's lineage names both.
        again = simulate(replace(config, run_id=f"{run_id}-again"))
        model = summary["final_aggregate_sha256"]
        assert json.loads((again / "summary.json").read_text())["final_aggregate_sha256"] == model
        assert (again / "report.md").is_file()
        lineage = audit_lineage(open_readonly(state_dir), ArtifactStore(again / "artifacts"), model)  # what `medtwin audit lineage` prints
        assert {run_id, f"{run_id}-again"} <= set(lineage.origins), lineage.origins

        # The same crash again, and round 2's anchor is gone from the journal too: nothing can restore it.
        _crash_back_to(state_dir, older_state)
        journal = state_dir / "journal-data.jsonl"
        lines = journal.read_text().splitlines()
        ours = {"b": run_key(run_id).hex()}
        entries = [json.loads(line) for line in lines]
        kept = [line for line, e in zip(lines, entries, strict=True) if not (e.get("method") == "anchor_round" and e["args"][:2] == [ours, 2])]
        assert len(kept) == len(lines) - 1
        journal.write_text("\n".join(kept) + "\n")
        chain_config = compose_config(["chain=anvil", f"chain.state_dir={state_dir}", "chain.auth_port=0", "chain.data_port=0"]).chain
        chain_up(chain_config, state_dir)  # in-process this time: the same reconcile `medtwin chain up` runs
        assert all(result.complete for result in open_session(chain_config).reconcile().values())
        report = audit_verify(open_readonly(state_dir), ArtifactStore(runs_dir / run_id / "artifacts"), run_id)
        missing = [m.round_index for m in report.mismatches if m.kind == "round"]
        assert not report.ok and missing == [2], report.mismatches  # the round nothing could restore, named
    finally:
        chain_down(state_dir)
