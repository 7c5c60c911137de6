"""The deployed site's shorter Flower waits (experiments/prompt_flower.py) still reach the waits Flower has."""

from __future__ import annotations

import inspect
import time

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import start_client_internal

from medtwin.experiments import prompt_flower


@pytest.fixture
def flower_defaults():
    """prompt_object_pulls changes Flower's defaults process-wide: put them back after the test."""
    functions = (inflatable_utils.pull_and_inflate_object_from_tree, inflatable_utils.pull_objects)
    saved = [dict(function.__kwdefaults__) for function in functions]
    yield
    for function, defaults in zip(functions, saved, strict=True):
        function.__kwdefaults__.clear()
        function.__kwdefaults__.update(defaults)


def test_object_pulls_retry_after_the_short_backoff(flower_defaults, monkeypatch):
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] >= 1.0  # Flower's own: 1 s, then 2 s
    prompt_flower.prompt_object_pulls()
    for function in (inflatable_utils.pull_and_inflate_object_from_tree, inflatable_utils.pull_objects):
        assert function.__kwdefaults__["initial_backoff"] == prompt_flower.PULL_BACKOFF_S
        assert function.__kwdefaults__["backoff_cap"] == prompt_flower.PULL_BACKOFF_CAP_S

    waits: list[float] = []
    real_wait = inflatable_utils.threading.Event.wait

    def backoff_wait(self, timeout=None):  # the retry backoff is early_stop.wait(seconds): record it, do not sleep
        if timeout is None:
            return real_wait(self)
        waits.append(timeout)
        return real_wait(self, 0)

    monkeypatch.setattr(inflatable_utils.threading.Event, "wait", backoff_wait)
    attempts = {"count": 0}

    def pull(object_id: str) -> bytes:  # the SuperNode has the object only at the third ask
        attempts["count"] += 1
        if attempts["count"] < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert inflatable_utils.pull_objects(["object"], pull) == {"object": b"content"}
    assert len(waits) == 2 and all(wait <= 2 * prompt_flower.PULL_BACKOFF_S * 1.2 for wait in waits)


def test_the_supernode_loop_still_has_the_waits_this_shortens():
    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source  # a Flower upgrade moved them: revisit prompt_flower
    assert start_client_internal.time is time or isinstance(start_client_internal.time, type(time))


def test_shorter_sleeps_map_the_idle_poll_and_cap_the_rest(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    shim = prompt_flower._shorter_sleeps(idle_poll_s=0.25, reply_poll_s=0.05)
    shim.sleep(3)
    shim.sleep(0.5)
    shim.sleep(0.01)
    assert slept == [0.25, 0.05, 0.01]
    assert shim.monotonic is time.monotonic  # everything else is the time module's own
