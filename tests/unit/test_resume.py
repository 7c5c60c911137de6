"""Checkpoint and resume: a coordinator that dies after round 2 continues with round 3, and nothing twice.

The run goes through `run_federation` over a scripted Grid (honest sites with real keys, helpers of
test_hostile_site); the "crash" is an exception the Grid raises when a given phase starts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from test_hostile_site import MANIFEST, _order, _reply, honest

from medtwin.core.protocol import AGGREGATE, CERTIFICATE, ROUND_INPUTS, SITE, UPDATE, RoundCertificate, payload_sha256, unpack_payloads
from medtwin.server.app import CoordinatorSetup, run_federation
from medtwin.server.checkpoint import CheckpointError, checkpoint_path, load_latest_checkpoint, save_checkpoint

RUN_ID = "run-resume"
NODES = {1: "alpha", 2: "beta"}
NUM_ROUNDS = 4


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


class Crash(Exception):
    """The coordinator process dies."""


class SitesGrid:
    """Honest alpha and beta; beta replays its round-2 update in round `replay_in`; dies at `crash_at`."""

    def __init__(self, *, crash_at: tuple[str, int] | None = None, replay_in: int = 0, earlier: dict | None = None) -> None:
        self.crash_at, self.replay_in = crash_at, replay_in
        self.sent: list[Message] = []
        self.replies: dict[tuple[str, int, str], Message] = dict(earlier or {})

    def get_node_ids(self) -> list[int]:
        return sorted(NODES)

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        first = messages[0]
        if (first.metadata.message_type, _order(first)[1]) == self.crash_at:
            raise Crash(f"coordinator killed at {self.crash_at}")
        replies = []
        for message in messages:
            self.sent.append(message)
            site, phase, server_round = NODES[message.metadata.dst_node_id], message.metadata.message_type, _order(message)[1]
            if (phase, server_round, site) == ("train", self.replay_in, "beta"):
                earlier = self.replies[("train", 2, "beta")]
                replies.append(_reply(message, {UPDATE: earlier.content[UPDATE], SITE: earlier.content[SITE]}))
                continue
            (reply,) = honest(message, site)
            self.replies[(phase, server_round, site)] = reply
            replies.append(reply)
        return replies

    def sent_in(self, phase: str, server_round: int) -> list[Message]:
        return [m for m in self.sent if m.metadata.message_type == phase and _order(m)[1] == server_round]


class FakeChain:
    """A provenance recorder that refuses to anchor a round twice."""

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.anchors: dict[int, str] = {}
        self.override: tuple[int, str] | None = None

    def start_run(self, run: Any) -> None:
        if run.run_id not in self.registered:
            self.registered.append(run.run_id)

    def admission_problem(self, *, site_id: str, run_id: str) -> str | None:
        return None

    def close_round(self, *, server_round: int, aggregate_digest: str, **values: Any) -> dict[str, Any]:
        assert server_round not in self.anchors, f"round {server_round} anchored twice"
        self.anchors[server_round] = aggregate_digest
        return {"anchored_round": server_round}

    def finish_run(self, **values: Any) -> dict[str, Any]:
        return {"backend": "fake", "chain_ids": {}, "contracts": {}, "anchors_written": len(self.anchors)}

    def last_anchor(self, run_id: str) -> tuple[int, str] | None:
        if self.override is not None:
            return self.override
        return (max(self.anchors), self.anchors[max(self.anchors)]) if self.anchors else None


@pytest.fixture
def config(default_config, tmp_path: Path):
    return replace(
        default_config,
        run_id=RUN_ID,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
        task=replace(default_config.task, name="breast_cancer", num_sites=len(NODES)),
        federation=replace(default_config.federation, num_rounds=NUM_ROUNDS, min_sites=1, evaluate_every=1, round_timeout_s=1.0),
    )


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> CoordinatorSetup:
    """The test federation's manifest (it has no CA certificate, so it is handed over instead of read from a file)."""
    monkeypatch.setattr("medtwin.server.app.load_manifest", lambda path: MANIFEST)
    return CoordinatorSetup(manifest_path="federation.json")


def _crash(config, setup, *, at: tuple[str, int], provenance: FakeChain | None = None) -> SitesGrid:
    grid = SitesGrid(crash_at=at)
    with pytest.raises(Crash):
        run_federation(grid, config, setup, provenance)  # type: ignore[arg-type]
    return grid


def _metrics(run_path: Path) -> list[tuple[int, str]]:
    lines = (run_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(record["round"], record["phase"]) for record in map(json.loads, lines)]


def test_a_run_resumes_after_its_last_checkpoint_with_its_aggregate_and_refuses_old_replays(config, setup) -> None:
    chain = FakeChain()
    first = _crash(config, setup, at=("train", 3), provenance=chain)
    run_path = Path(config.runs_dir) / RUN_ID
    assert not (run_path / "summary.json").exists()
    checkpoint = load_latest_checkpoint(run_path / "checkpoints")
    assert checkpoint is not None and (checkpoint.server_round, checkpoint.phase) == (2, "evaluate")
    assert checkpoint.aggregate_sha256 == chain.anchors[2]

    second = SitesGrid(replay_in=3, earlier=first.replies)  # a new coordinator process; beta replays round 2
    assert run_federation(second, config, setup, chain, resume=True) == run_path  # type: ignore[arg-type]

    assert second.sent_in("train", 1) == second.sent_in("train", 2) == []  # continues at round 3
    for message in second.sent_in("train", 3):
        assert payload_sha256(unpack_payloads(message.content, ROUND_INPUTS)[AGGREGATE]) == checkpoint.aggregate_sha256  # round 2's aggregate
        certificate = RoundCertificate.from_record(message.content[CERTIFICATE])
        assert certificate == checkpoint.certificate and certificate.server_round == 2
    assert _metrics(run_path) == [(r, phase) for r in range(1, NUM_ROUNDS + 1) for phase in ("train", "evaluate")]
    records = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    train_3 = next(r for r in records if (r["round"], r["phase"]) == (3, "train"))
    assert train_3["rejected"]["beta"].startswith("replay: ") and "round 2" in train_3["rejected"]["beta"]
    assert sorted(chain.anchors) == [1, 2, 3, 4] and chain.registered == [RUN_ID]
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["rounds_completed"] == NUM_ROUNDS and summary["resumed_after_round"] == 2
    assert [(r["round"], r["site"], r["code"]) for r in summary["rejections"]] == [(3, "beta", "replay")]
    assert summary["final_aggregate_sha256"] == chain.anchors[NUM_ROUNDS]
    with pytest.raises(CheckpointError, match="already finished"):
        run_federation(SitesGrid(), config, setup, chain, resume=True)  # type: ignore[arg-type]


def test_a_crash_during_evaluation_resumes_with_that_evaluation_and_drops_half_written_metrics(config, setup) -> None:
    _crash(config, setup, at=("evaluate", 2))
    run_path = Path(config.runs_dir) / RUN_ID
    checkpoint = load_latest_checkpoint(run_path / "checkpoints")
    assert checkpoint is not None and (checkpoint.server_round, checkpoint.phase, checkpoint.evaluation_pending) == (2, "train", True)
    with open(run_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"round": 3, "phase": "train"}\n{"round": 3, "pha')  # a record after the checkpoint, a torn line

    second = SitesGrid()
    run_federation(second, config, setup, resume=True)  # type: ignore[arg-type]
    assert second.sent_in("train", 2) == [] and len(second.sent_in("evaluate", 2)) == 2
    assert _metrics(run_path) == [(r, phase) for r in range(1, NUM_ROUNDS + 1) for phase in ("train", "evaluate")]
    assert json.loads((run_path / "summary.json").read_text())["rounds_completed"] == NUM_ROUNDS


def test_resume_refuses_another_config_and_a_checkpoint_of_another_config(config, setup) -> None:
    _crash(config, setup, at=("train", 3))
    longer = replace(config, federation=replace(config.federation, num_rounds=NUM_ROUNDS + 1))
    with pytest.raises(CheckpointError, match="with another config"):
        run_federation(SitesGrid(), longer, setup, resume=True)  # type: ignore[arg-type]

    folder = Path(config.runs_dir) / RUN_ID / "checkpoints"
    checkpoint = load_latest_checkpoint(folder)
    assert checkpoint is not None
    save_checkpoint(folder, replace(checkpoint, config_sha256="0" * 64))  # checksummed, but for another config
    with pytest.raises(CheckpointError, match="copied from another run"):
        run_federation(SitesGrid(), config, setup, resume=True)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="does not exist"):
        run_federation(SitesGrid(), replace(config, run_id="never-ran"), setup, resume=True)  # type: ignore[arg-type]


def test_resume_refuses_a_checkpoint_the_chain_contradicts(config, setup) -> None:
    chain = FakeChain()
    _crash(config, setup, at=("train", 3), provenance=chain)
    round_2 = chain.anchors[2]

    chain.override = (3, "ab" * 32)  # the chain anchored a round the checkpoint does not know
    with pytest.raises(CheckpointError, match="last anchor is round 3, the latest checkpoint is round 2"):
        run_federation(SitesGrid(), config, setup, chain, resume=True)  # type: ignore[arg-type]
    chain.override = (2, "cd" * 32)  # same round, another aggregate
    with pytest.raises(CheckpointError, match="does not describe the anchored run"):
        run_federation(SitesGrid(), config, setup, chain, resume=True)  # type: ignore[arg-type]
    chain.override = (2, "0x" + round_2.upper())  # the same digest, spelled as a chain spells it
    run_federation(SitesGrid(), config, setup, chain, resume=True)  # type: ignore[arg-type]
    assert sorted(chain.anchors) == [1, 2, 3, 4]


def test_a_corrupted_checkpoint_is_detected(config, setup) -> None:
    _crash(config, setup, at=("train", 3))
    path = checkpoint_path(Path(config.runs_dir) / RUN_ID / "checkpoints", 2)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"update_bytes": ', '"update_bytes": 1', 1), encoding="utf-8")
    with pytest.raises(CheckpointError, match="is corrupted"):
        load_latest_checkpoint(path.parent)
    with pytest.raises(CheckpointError, match="is corrupted"):
        run_federation(SitesGrid(), config, setup, resume=True)  # type: ignore[arg-type]
    path.write_text(text[: len(text) // 2], encoding="utf-8")  # torn
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_latest_checkpoint(path.parent)


def test_a_failure_recording_the_end_of_the_run_still_writes_the_summary_and_report_with_the_error(config, setup) -> None:
    class LineageRefused(FakeChain):
        def finish_run(self, **values: Any) -> dict[str, Any]:
            raise RuntimeError("data chain refused record_lineage: model lineage already recorded")

    with pytest.raises(RuntimeError, match="record_lineage"):
        run_federation(SitesGrid(), config, setup, LineageRefused())  # type: ignore[arg-type]
    run_path = Path(config.runs_dir) / RUN_ID
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["rounds_completed"] == NUM_ROUNDS and "record_lineage" in summary["chain"]["error"]
    assert "Recording the end of the run on the chains failed" in (run_path / "report.md").read_text()


def test_a_run_id_is_used_once_nothing_in_an_existing_run_is_appended_or_replaced(config, setup) -> None:
    from medtwin.core.errors import ConfigError

    chain = FakeChain()
    run_path = run_federation(SitesGrid(), config, setup, chain)  # type: ignore[arg-type]
    before = {path: path.read_bytes() for path in run_path.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match=r"already exists .*\(finished\)") as refused:
        run_federation(SitesGrid(), config, setup, FakeChain())  # type: ignore[arg-type]
    assert refused.value.key == "run_id" and "pick another run_id" in str(refused.value)
    assert {path: path.read_bytes() for path in run_path.rglob("*") if path.is_file()} == before
    _crash(replace(config, run_id="stopped-run"), setup, at=("train", 2), provenance=FakeChain())
    with pytest.raises(ConfigError, match="--resume stopped-run"):
        run_federation(SitesGrid(), replace(config, run_id="stopped-run"), setup, FakeChain())  # type: ignore[arg-type]


class DownChain(FakeChain):
    """A recorder whose chain goes down after round `down_after` and stays down past chain.outage_timeout_s."""

    def __init__(self, down_after: int) -> None:
        super().__init__()
        self.down_after = down_after
        self.lineage_final: list[bool] = []

    def outage_problem(self) -> str | None:
        if self.anchors and max(self.anchors) >= self.down_after:
            return "a chain has been unreachable for 700 s, more than chain.outage_timeout_s=600"
        return None

    def finish_run(self, **values: Any) -> dict[str, Any]:
        self.lineage_final.append(values["final"])
        return super().finish_run(**values)


def test_a_chain_outage_past_its_timeout_stops_the_run_at_a_checkpoint_and_resume_finishes_it(config, setup) -> None:
    chain = DownChain(down_after=2)
    run_path = run_federation(SitesGrid(), config, setup, chain)  # type: ignore[arg-type]
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and "stopped after round 2 of 4" in summary["stopped"]
    assert "chain.outage_timeout_s" in summary["stopped"] and chain.lineage_final == [False]  # no final model yet
    report = (run_path / "report.md").read_text()
    assert "The run stopped early" in report and f"--resume {RUN_ID}" in report
    checkpoint = load_latest_checkpoint(run_path / "checkpoints")
    assert checkpoint is not None and checkpoint.server_round == 2

    chain.down_after = NUM_ROUNDS + 1  # the chain is back
    assert run_federation(SitesGrid(), config, setup, chain, resume=True) == run_path  # type: ignore[arg-type]
    finished = json.loads((run_path / "summary.json").read_text())
    assert finished["rounds_completed"] == NUM_ROUNDS and finished["stopped"] is None and chain.lineage_final == [False, True]
    kept = json.loads((run_path / "summary.stopped-after-round-2.json").read_text())  # the stopped summary is kept
    assert kept["stopped"] and (run_path / "report.stopped-after-round-2.md").is_file()
    assert sorted(chain.anchors) == [1, 2, 3, 4]
