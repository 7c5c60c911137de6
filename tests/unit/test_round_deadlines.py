"""Round deadlines over a Grid whose nodes go silent, die and come back.

`FlakyGrid` behaves like Flower's Grid where it matters here: it names every instruction it pushes
(the message id a reply points back to), `send_and_receive` returns when every node answered or
`timeout` passed, a dead SuperNode comes back as a NODE_UNAVAILABLE error reply written by the
SuperLink (source node = the SuperLink's), and `get_node_ids` lists only nodes currently connected.
Sites are honest and sign with real Ed25519 keys (helpers of test_hostile_site).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Error, Message
from flwr.supercore.task_identity import TaskIdentity
from test_hostile_site import MANIFEST, RUN_ID, _order, honest

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.errors import RoundFailedError
from medtwin.server.aggregation import PlainAggregator
from medtwin.core.protocol import RoundCertificate
from medtwin.server.checkpoint import CheckpointError, RoundCheckpoint, load_checkpoint, save_checkpoint
from medtwin.server.loop import RoundLoop

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the source of errors the SuperLink writes
NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE
NODES = {11: "alpha", 12: "beta", 13: "gamma"}
TIMEOUT_S = 0.3

Answer = Callable[[int, str, int], str]  # (node, phase, round) -> "reply" | "silent" | "dead"
Listed = Callable[[int, int], bool]  # (node, last train round sent) -> is the node listed?


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


class FlakyGrid:
    def __init__(self, *, nodes: dict[int, str], answer: Answer, listed: Listed) -> None:
        self.nodes, self.answer, self.listed = nodes, answer, listed
        self.sent: list[Message] = []
        self.last_train_round = 0
        self.waits: list[tuple[str, int, float]] = []  # (phase, round, seconds send_and_receive took)

    def get_node_ids(self) -> list[int]:
        return [node for node in self.nodes if self.listed(node, self.last_train_round)]

    def sent_to(self, phase: str, server_round: int) -> list[int]:
        return sorted(
            m.metadata.dst_node_id for m in self.sent if m.metadata.message_type == phase and _order(m)[1] == server_round
        )

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        started = time.monotonic()
        replies, silent = [], False
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what the real Grids do when pushing
            self.sent.append(message)
            node, phase = message.metadata.dst_node_id, message.metadata.message_type
            server_round = _order(message)[1]
            if phase == "train":
                self.last_train_round = server_round
            behaviour = self.answer(node, phase, server_round)
            if behaviour == "reply":
                replies += honest(message, self.nodes[node])
            elif behaviour == "dead":
                error = Message(Error(code=NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=message)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(error)
            else:
                silent = True
        if silent:
            time.sleep(timeout)  # a node that never answers: the phase lasts until the deadline
        self.waits.append((messages[0].metadata.message_type, _order(messages[0])[1], time.monotonic() - started))
        return replies


def _loop(default_config, tmp_path: Path, grid: FlakyGrid, *, rounds: int, min_sites: int, num_sites: int = 3, node_sites=None, resume_from=None):
    config = replace(
        default_config,
        task=replace(default_config.task, num_sites=num_sites),
        federation=replace(
            default_config.federation, num_rounds=rounds, min_sites=min_sites, evaluate_every=1, round_timeout_s=TIMEOUT_S
        ),
    )
    records: list[dict] = []
    loop = RoundLoop(
        grid=grid,  # type: ignore[arg-type]
        config=config,
        run_id=RUN_ID,
        aggregator=PlainAggregator(),
        manifest=MANIFEST,
        artifacts=ArtifactStore(tmp_path / "artifacts"),
        on_record=records.append,
        node_sites=node_sites,
        resume_from=resume_from,
    )
    return loop, records


def _record(records: list[dict], phase: str, server_round: int) -> dict:
    return next(r for r in records if r["phase"] == phase and r["round"] == server_round)


def test_a_silent_node_is_dropped_at_the_deadline_named_by_its_site_and_rejoins_when_listed_again(default_config, tmp_path: Path) -> None:
    nodes = NODES | {14: "alpha"}  # node 14 never answers and never proves who it is

    def answer(node: int, phase: str, server_round: int) -> str:
        if node == 14 or (node == 13 and server_round == 2):
            return "silent"
        return "reply"

    def listed(node: int, last_train_round: int) -> bool:
        if node == 14:
            return last_train_round < 1  # gone after it missed round 1
        if node == 13:
            return not 2 <= last_train_round < 3  # gone after missing round 2, back for round 4
        return True

    grid = FlakyGrid(nodes=nodes, answer=answer, listed=listed)
    loop, records = _loop(default_config, tmp_path, grid, rounds=4, min_sites=2, num_sites=4)
    result = loop.run()

    assert result.rounds_completed == 4
    assert _record(records, "train", 1)["missed"] == ["node-14"]  # no site proof yet: named by its node
    assert _record(records, "train", 1)["participants"] == ["alpha", "beta", "gamma"]
    assert 14 not in grid.sent_to("evaluate", 1) + grid.sent_to("train", 2)  # never waited for again
    train_2 = _record(records, "train", 2)
    assert train_2["missed"] == ["gamma"]  # it proved to be gamma in round 1
    assert train_2["participants"] == ["alpha", "beta"]
    phase_times = {(phase, server_round): seconds for phase, server_round, seconds in grid.waits}
    assert TIMEOUT_S <= phase_times[("train", 2)] < TIMEOUT_S + 2  # closed at the deadline, not before, not never
    assert phase_times[("train", 3)] < TIMEOUT_S  # nobody silent was asked: no wait
    assert 13 not in grid.sent_to("evaluate", 2) and 13 not in grid.sent_to("train", 3)
    assert _record(records, "train", 3)["missed"] == []
    assert grid.sent_to("train", 4) == [11, 12, 13]  # listed again: it rejoins
    assert _record(records, "train", 4)["participants"] == ["alpha", "beta", "gamma"]
    assert set(_record(records, "evaluate", 4)["sites"]) == {"alpha", "beta", "gamma"}
    assert result.rejections == []


def test_a_node_that_never_replied_is_named_by_the_site_whose_key_the_coordinator_registered(default_config, tmp_path: Path) -> None:
    """Deployment: `medtwin coordinator start` registered each site's SuperNode key and wrote which node id
    Flower gave it; a node that dies before its first reply is still named by its site, not `node-<id>`."""
    import json

    from medtwin.server.app import CoordinatorSetup

    registry = tmp_path / "registered-supernodes.json"
    registry.write_text(json.dumps({"delta": {"node_id": "14", "fingerprint": "x"}, "old": {"node_id": "registered-earlier"}}))
    node_sites = CoordinatorSetup(registry_path=str(registry)).node_sites()
    assert node_sites == {14: "delta"}
    grid = FlakyGrid(nodes=NODES | {14: "alpha"}, answer=lambda node, *_: "silent" if node == 14 else "reply", listed=lambda *_: True)
    loop, records = _loop(default_config, tmp_path, grid, rounds=1, min_sites=2, num_sites=4, node_sites=node_sites)
    loop.run()
    assert _record(records, "train", 1)["missed"] == ["delta"]


def test_an_unreadable_supernode_registry_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from medtwin.core.errors import ConfigError
    from medtwin.server.app import REGISTRY_KEY, CoordinatorSetup

    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(ConfigError, match=REGISTRY_KEY):
        CoordinatorSetup(registry_path=str(tmp_path / "registry.json")).node_sites()


def test_a_dead_node_reported_by_the_superlink_is_named_by_its_site_and_sits_out_the_round(default_config, tmp_path: Path) -> None:
    def answer(node: int, phase: str, server_round: int) -> str:
        return "dead" if (node == 13 and server_round == 2) else "reply"

    grid = FlakyGrid(nodes=dict(NODES), answer=answer, listed=lambda node, last: True)  # still listed (heartbeat lag)
    loop, records = _loop(default_config, tmp_path, grid, rounds=5, min_sites=2)
    loop.run()

    train_2 = _record(records, "train", 2)
    assert train_2["participants"] == ["alpha", "beta"]
    assert train_2["rejected"]["gamma"].startswith("site_error: ")  # the error came from the SuperLink, about node 13
    assert [(r.site_id, r.node_id, r.code) for r in loop.result.rejections] == [("gamma", 13, "site_error")]
    assert max(seconds for _, _, seconds in grid.waits) < TIMEOUT_S  # an error reply closes its wait
    assert grid.sent_to("evaluate", 2) == [11, 12]  # not asked again in the round it failed
    assert grid.sent_to("train", 3) == grid.sent_to("train", 4) == [11, 12]  # still listed: sits out SIT_OUT_ROUNDS
    assert grid.sent_to("train", 5) == [11, 12, 13]  # then asked again
    assert _record(records, "train", 5)["participants"] == ["alpha", "beta", "gamma"]


def test_a_dead_node_the_superlink_still_lists_costs_one_deadline_not_one_per_round(default_config, tmp_path: Path) -> None:
    """A SIGKILLed SuperNode stays listed until Flower's heartbeat patience runs out (~45-60 s): the round it
    died in closes at the deadline, the next rounds do not wait for it; below min_sites it is asked anyway."""
    grid = FlakyGrid(nodes=dict(NODES), answer=lambda node, *_: "silent" if node == 13 else "reply", listed=lambda *_: True)
    loop, records = _loop(default_config, tmp_path, grid, rounds=4, min_sites=2)
    loop.run()
    waits = {(phase, server_round): seconds for phase, server_round, seconds in grid.waits}
    assert waits[("train", 1)] >= TIMEOUT_S and _record(records, "train", 1)["missed"] == ["node-13"]
    assert waits[("train", 2)] < TIMEOUT_S and waits[("train", 3)] < TIMEOUT_S
    assert 13 not in grid.sent_to("train", 2) + grid.sent_to("train", 3)
    assert 13 in grid.sent_to("train", 4)  # probed again after its sit-out (it may only have been slow)

    # beta disconnects after round 1: without gamma, round 2 would start below min_sites, so gamma is asked
    listed = lambda node, last_train_round: node != 12 or last_train_round < 1  # noqa: E731
    grid = FlakyGrid(nodes=dict(NODES), answer=lambda node, *_: "silent" if node == 13 else "reply", listed=listed)
    loop, records = _loop(default_config, tmp_path / "b", grid, rounds=2, min_sites=2)
    with pytest.raises(RoundFailedError):
        loop.run()
    assert grid.sent_to("train", 2) == [11, 13]


def test_a_resumed_coordinator_remembers_the_dead_node_and_does_not_wait_for_it_again(default_config, tmp_path: Path) -> None:
    """The coordinator restarts (`--resume`) while a SIGKILLed SuperNode is still listed: its checkpoint keeps who
    missed a deadline, so the resumed rounds do not each start with a deadline lost on it."""
    silent_13 = lambda node, *_: "silent" if node == 13 else "reply"  # noqa: E731
    grid = FlakyGrid(nodes=dict(NODES), answer=silent_13, listed=lambda *_: True)
    first, _ = _loop(default_config, tmp_path, grid, rounds=1, min_sites=2)
    first.run()
    checkpoint = RoundCheckpoint.from_dict(json.loads(json.dumps(first.checkpoint(1, phase="evaluate").to_dict())))  # as on disk
    assert checkpoint.unresponsive == {13: 1}

    grid = FlakyGrid(nodes=dict(NODES), answer=silent_13, listed=lambda *_: True)
    resumed, records = _loop(default_config, tmp_path, grid, rounds=4, min_sites=2, resume_from=checkpoint)
    resumed.run()
    waits = {(phase, server_round): seconds for phase, server_round, seconds in grid.waits}
    for server_round in (2, 3):  # still sitting out
        assert 13 not in grid.sent_to("train", server_round) and waits[("train", server_round)] < TIMEOUT_S
        assert _record(records, "train", server_round)["participants"] == ["alpha", "beta"]
    assert 13 in grid.sent_to("train", 4)  # probed again after its sit-out, as without the restart


def test_a_node_dropped_before_the_restart_and_listed_again_rejoins_at_once_after_resume(default_config, tmp_path: Path) -> None:
    # round 1: gamma (13) misses; the SuperLink then stops listing it (dropped). Checkpoint after round 2.
    listed_1 = lambda node, last: node != 13 or last < 1  # noqa: E731
    grid = FlakyGrid(nodes=dict(NODES), answer=lambda node, *_: "silent" if node == 13 else "reply", listed=listed_1)
    first, _ = _loop(default_config, tmp_path, grid, rounds=2, min_sites=2)
    first.run()
    checkpoint = RoundCheckpoint.from_dict(json.loads(json.dumps(first.checkpoint(2, phase="evaluate").to_dict())))
    assert checkpoint.unresponsive == {13: 1} and checkpoint.dropped == (13,)

    # its SuperNode was restarted and is listed again, healthy: round 3 is still within 1 + SIT_OUT_ROUNDS, but a
    # node listed again after being dropped rejoins at once (module docstring) — also after a resume
    grid = FlakyGrid(nodes=dict(NODES), answer=lambda *_: "reply", listed=lambda *_: True)
    resumed, records = _loop(default_config, tmp_path, grid, rounds=3, min_sites=2, resume_from=checkpoint)
    resumed.run()
    assert grid.sent_to("train", 3) == [11, 12, 13]
    assert _record(records, "train", 3)["participants"] == ["alpha", "beta", "gamma"]


def test_unsigned_64_bit_node_ids_round_trip_exactly_through_a_checkpoint_file(tmp_path: Path) -> None:
    top, mid = 2**64 - 1, 2**63 + 12345
    checkpoint = RoundCheckpoint(
        run_id="run-1", config_sha256="0" * 64, server_round=2, phase="evaluate", aggregate_sha256="1" * 64,
        certificate=RoundCertificate(server_round=2, aggregate_sha256="1" * 64, claims=()), aggregate_digests=("1" * 64,) * 2,
        unresponsive={top: 2, mid: 1}, dropped=(mid,),
    )  # fmt: skip
    restored = load_checkpoint(save_checkpoint(tmp_path, checkpoint))
    assert restored.unresponsive == {top: 2, mid: 1} and restored.dropped == (mid,)


def test_the_deadline_memory_in_a_checkpoint_is_read_strictly_and_may_be_absent(default_config, tmp_path: Path) -> None:
    grid = FlakyGrid(nodes=dict(NODES), answer=lambda node, *_: "silent" if node == 13 else "reply", listed=lambda *_: True)
    loop, _ = _loop(default_config, tmp_path, grid, rounds=1, min_sites=2)
    loop.run()
    body = loop.checkpoint(1, phase="evaluate").to_dict()
    older = {key: value for key, value in body.items() if key not in ("unresponsive", "dropped")}  # written before they were kept
    assert RoundCheckpoint.from_dict(older).unresponsive == {}
    edits = (
        {"unresponsive": {"-3": 1}}, {"unresponsive": {"13": "1"}}, {"unresponsive": [13]}, {"unresponsive": {"13": 9}},
        {"unresponsive": {"013": 1}}, {"unresponsive": {"１３": 1}}, {"dropped": [2**64]}, {"dropped": "13"}, {"dropped": {"13": 1}},
        {"dropped": [12]},  # dropped, but never missed a deadline
    )  # fmt: skip
    for edit in edits:
        with pytest.raises(CheckpointError, match="round checkpoint|inconsistent"):
            RoundCheckpoint.from_dict(body | edit, source="round-00001.json")


def test_below_min_sites_the_run_stops_naming_who_replied_refused_and_missed(default_config, tmp_path: Path) -> None:
    def answer(node: int, phase: str, server_round: int) -> str:
        if server_round == 2 and node == 13:
            return "silent"
        if server_round == 2 and node == 12:
            return "dead"
        return "reply"

    grid = FlakyGrid(nodes=dict(NODES), answer=answer, listed=lambda node, last: True)
    loop, records = _loop(default_config, tmp_path, grid, rounds=3, min_sites=2)
    with pytest.raises(RoundFailedError) as failure:
        loop.run()
    message = str(failure.value)
    assert "round 2" in message and "min_sites is 2" in message
    assert "replied: alpha;" in message
    assert "refused: beta (site_error" in message
    assert "deadline: gamma" in message
    assert [r["round"] for r in records if r["phase"] == "train"] == [1]


def test_the_run_starts_without_a_missing_node_after_the_deadline_if_min_sites_are_there(default_config, tmp_path: Path) -> None:
    grid = FlakyGrid(nodes=dict(NODES), answer=lambda node, phase, r: "reply", listed=lambda node, last: node != 13)
    loop, records = _loop(default_config, tmp_path, grid, rounds=1, min_sites=2)
    started = time.monotonic()
    result = loop.run()
    assert time.monotonic() - started >= TIMEOUT_S  # waited for the third node, then went on
    assert result.rounds_completed == 1 and _record(records, "train", 1)["participants"] == ["alpha", "beta"]

    grid = FlakyGrid(nodes=dict(NODES), answer=lambda node, phase, r: "reply", listed=lambda node, last: node == 11)
    loop, _ = _loop(default_config, tmp_path, grid, rounds=1, min_sites=2)
    with pytest.raises(RoundFailedError, match=r"only 1 node\(s\) are connected \(node-11\), federation.min_sites is 2"):
        loop.run()
    assert grid.sent == []

