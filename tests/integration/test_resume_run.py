"""A coordinator that dies after round 2 resumes at round 3: no round trained, spent or anchored twice.

Real Flower simulation (Ray), real Opacus DP at every site, CKKS aggregation, two real anvil chains.
The "crash" is an exception raised by the coordinator's loop as round 3 starts (after round 2's
checkpoint); `simulate(..., resume=True)` — what `medtwin run --resume <run-id>` calls — continues.
Nodes are stopped by PID in the finalizer, also when a test fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from medtwin.core.config import MedtwinConfig, compose_config

pytestmark = pytest.mark.slow

SITES = ["cleveland", "hungarian", "switzerland", "va"]
RUN = "resume-run"


def resume_config(tmp: Path) -> MedtwinConfig:
    return compose_config(
        [
            "task=fed_heart_disease", "federation.num_rounds=3", "baselines.enabled=false", "progress=false",
            f"runs_dir={tmp / 'runs'}", "privacy=dp", "privacy.target_epsilon=3.0", "crypto=ckks",
            "chain=anvil", f"chain.state_dir={tmp / 'chain'}", "chain.auth_port=0", "chain.data_port=0",
            "strategy=fedavg_tuned", f"run_id={RUN}",
        ]
    )  # fmt: skip


class CoordinatorCrash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MedtwinConfig, Path, dict]]:
    from medtwin.chain import chain_down
    from medtwin.experiments.simulate import simulate
    from medtwin.server.loop import RoundLoop

    tmp = tmp_path_factory.mktemp("resume")
    config = resume_config(tmp)
    original = RoundLoop.train_round

    def crash_at_round_3(self, server_round, node_ids):  # noqa: ANN001
        if server_round == 3:
            raise CoordinatorCrash("the coordinator died before round 3")
        return original(self, server_round, node_ids)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RoundLoop, "train_round", crash_at_round_3)
            with pytest.raises(Exception):  # the run ends without a summary
                simulate(config)
        run_dir = Path(config.runs_dir) / RUN
        before = {
            "summary": (run_dir / "summary.json").exists(),
            "checkpoints": sorted(path.name for path in (run_dir / "checkpoints").glob("*.json")),
            "ledgers": _ledger_rounds(config),
        }
        path = simulate(resume_config(tmp), resume=True)
        yield config, path, before
    finally:
        chain_down(tmp / "chain")


def _ledger_rounds(config: MedtwinConfig) -> dict[str, list[int]]:
    from medtwin.experiments.federation_setup import site_state_dir

    rounds = {}
    for site in SITES:
        ledger = json.loads((site_state_dir(config, site) / "privacy-ledger.json").read_text())["ledger"]
        rounds[site] = sorted(int(key) for key in ledger["runs"].get(RUN, {}).get("rounds", {}))
    return rounds


def test_the_crash_left_checkpoints_and_no_summary(resumed) -> None:
    _, _, before = resumed
    assert before["summary"] is False
    assert before["checkpoints"] and all(name.startswith("round-") for name in before["checkpoints"])
    assert before["ledgers"] == {site: [1, 2] for site in SITES}


def test_the_resumed_run_finishes_every_round_once(resumed) -> None:
    config, path, _ = resumed
    summary = json.loads((path / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["resumed_after_round"] == 2
    assert summary["rejections"] == []
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    keys = [(record["round"], record["phase"]) for record in records]
    assert sorted(keys) == sorted(set(keys)) and {round_ for round_, _ in keys} == {1, 2, 3}
    assert _ledger_rounds(config) == {site: [1, 2, 3] for site in SITES}  # no round trained (spent) twice


def test_every_round_is_anchored_once_and_the_audit_passes(resumed) -> None:
    import subprocess
    import sys

    from medtwin.chain import open_readonly

    config, path, _ = resumed
    anchors = open_readonly(config.chain.state_dir).data.anchors(RUN)
    assert [anchor.round_index for anchor in anchors] == [1, 2, 3]
    audit = subprocess.run(
        [sys.executable, "-m", "medtwin.experiments.cli", "audit", "verify", RUN, "--state-dir", config.chain.state_dir,
         "--runs-dir", str(path.parent)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
