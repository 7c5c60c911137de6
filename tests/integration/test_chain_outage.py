"""The data chain's node goes down in the middle of a run and comes back: nothing is lost.

A 4-round Fed-Heart-Disease run on two real anvil nodes; once round 1 is anchored the data node is
stopped (by its PID). Training goes on — sites will not evaluate an aggregate they cannot see
anchored, and say so — every later anchor and the final lineage wait in the outbox, and the run still
writes summary.json and report.md saying what is queued. `medtwin chain up` brings the node back and
sends the queue in order; `medtwin chain flush` then has nothing left; `medtwin audit verify`, in a
fresh process, finds every round. Both nodes are stopped by PID in the finalizer, also on failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medtwin.chain import chain_down, open_readonly
from medtwin.chain.backends.anvil import read_node, stop_anvil
from medtwin.core.config import compose_config

pytestmark = pytest.mark.slow

ROUNDS = 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medtwin.experiments.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_data_chain_outage_queues_the_anchors_and_chain_up_lands_them(tmp_path: Path) -> None:
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
    stopped = threading.Event()

    def stop_the_data_node_after_round_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.is_file() and any(json.loads(line)["phase"] == "train" for line in metrics.read_text().splitlines()):
                node = read_node(state_dir, "data")
                assert node is not None and stop_anvil(node)
                stopped.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_the_data_node_after_round_1, daemon=True)
    try:
        watcher.start()
        run_path = simulate(config)
        watcher.join(timeout=10)
        assert stopped.is_set(), "the data node was never stopped"

        summary = json.loads((run_path / "summary.json").read_text())
        assert summary["rounds_completed"] == ROUNDS  # training went on through the outage
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        anchor_status = {r["round"]: r["chain"]["anchor_tx"] for r in records if r["phase"] == "train"}
        assert anchor_status[1] == "mined" and {anchor_status[r] for r in range(2, ROUNDS + 1)} == {"queued"}
        chain = summary["chain"]
        assert chain["lineage_tx"] == "queued" and chain["anchors_written"] is None
        assert chain["queued"]["data"].count("anchor_round") == ROUNDS - 1 and "record_lineage" in chain["queued"]["data"]
        assert "queued, not yet on chain" in (run_path / "report.md").read_text()
        refused = [r for r in records if r["phase"] == "evaluate" and r["round"] >= 2]
        assert refused and all(not r.get("sites") for r in refused)  # no site evaluated an aggregate it could not see anchored

        up = _cli("chain", "up", f"chain.state_dir={state_dir}", "chain.auth_port=0", "chain.data_port=0")
        assert up.returncode == 0, up.stdout + up.stderr
        # in order: anchors 2..4 and the final lineage (round 2's dataset commitment was a repeat: found on chain)
        assert "(anchor_round, anchor_round, anchor_round, record_lineage)" in up.stdout and "0 still queued" in up.stdout, up.stdout
        flush = _cli("chain", "flush", f"chain.state_dir={state_dir}")
        assert flush.returncode == 0 and "0 still queued" in flush.stdout, flush.stdout + flush.stderr
        anchors = open_readonly(state_dir).data.anchors(run_id)
        assert [anchor.round_index for anchor in anchors] == list(range(1, ROUNDS + 1))
        assert anchors[-1].aggregate_hash.removeprefix("0x") == summary["final_aggregate_sha256"]
        audit = _cli("audit", "verify", run_id, "--state-dir", str(state_dir), "--runs-dir", str(runs_dir))
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        chain_down(state_dir)
