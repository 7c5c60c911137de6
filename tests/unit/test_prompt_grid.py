"""The deployed ServerApp's Grid pulls replies every 0.1 s (Flower's deployment Grid sleeps 3 s between
pulls), returns as soon as every instruction is answered, and keeps the deadline."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medtwin.experiments.flower_apps import PromptGrid


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


class SlowGrid:
    """Node 1 answers after 0.3 s, node 2 after `late_s`; pull_messages returns what has arrived."""

    def __init__(self, late_s: float) -> None:
        self.late_s = late_s
        self.pushed_at = 0.0
        self.pulls = 0
        self.messages: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushed_at = time.monotonic()
        for index, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{index}"
            self.messages[f"m{index}"] = message
        return list(self.messages)

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        self.pulls += 1
        elapsed = time.monotonic() - self.pushed_at
        ready = {"m0": 0.3, "m1": self.late_s}
        return [Message(RecordDict(), reply_to=self.messages[i]) for i in sorted(message_ids) if elapsed >= ready[i]]


def _instructions() -> list[Message]:
    return [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (1, 2)]


def test_replies_are_returned_as_soon_as_all_arrived() -> None:
    grid = SlowGrid(late_s=0.5)
    started = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(_instructions(), timeout=10.0)
    took = time.monotonic() - started
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["m0", "m1"]
    assert 0.5 <= took < 1.5  # not Flower's 3 s pull interval, not the 10 s deadline


def test_the_deadline_closes_the_exchange_with_whoever_replied() -> None:
    grid = SlowGrid(late_s=60.0)
    started = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(_instructions(), timeout=0.8)
    assert 0.8 <= time.monotonic() - started < 1.5
    assert [reply.metadata.reply_to_message_id for reply in replies] == ["m0"]
    assert PromptGrid(grid).get_node_ids() == [1, 2]  # everything else is the wrapped Grid's
