"""Flower's SuperNode and ClientApp with shorter waits: same code, same protocol, only their sleeps tuned.

Measured on loopback (deploy demo, cProfile in the ClientApp processes), three fixed waits in Flower
1.41 dominated a deployed round once imports were warm:

- a ClientApp starts pulling its message's objects while its SuperNode is still fetching them from the
  SuperLink; each object it asks for too early is retried after 1 s, then 2 s (`PULL_INITIAL_BACKOFF`):
  ~3.3 s lost on every message that carries an aggregate, i.e. every phase after round 1;
- an idle SuperNode asks the SuperLink for work every 3 s (`time.sleep(3)` in its loop): ~1.5 s added
  to every phase on average;
- a SuperNode waits for its ClientApp's reply in 0.5 s sleeps.

`prompt_object_pulls()` lowers the first backoff to `PULL_BACKOFF_S` (doubling up to `PULL_BACKOFF_CAP_S`)
in the process that calls it; `python -m medtwin.experiments.prompt_flower <flower-supernode arguments>`
runs Flower's own `flower-supernode` entry point with its idle poll at `--idle-poll-s` (default
`IDLE_POLL_S`) and its reply wait capped at `REPLY_POLL_S`. Each poll is one request to a local
service, so the extra load is a few small requests per second per site. flwr is pinned in
pyproject.toml; `tests/unit/test_prompt_flower.py` fails if a Flower upgrade moves these waits.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Sequence

__all__ = ["IDLE_POLL_S", "PULL_BACKOFF_CAP_S", "PULL_BACKOFF_S", "REPLY_POLL_S", "prompt_object_pulls", "prompt_supernode_loop"]

PULL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.5
IDLE_POLL_S = 0.25
REPLY_POLL_S = 0.05
_FLOWER_IDLE_SLEEP_S = 3.0  # flwr.supernode.start_client_internal: the SuperNode loop's sleep when no message came


def prompt_object_pulls(*, initial_backoff_s: float = PULL_BACKOFF_S, backoff_cap_s: float = PULL_BACKOFF_CAP_S) -> None:
    """Retry a not-yet-available object after `initial_backoff_s` (doubling, at most `backoff_cap_s`)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_and_inflate_object_from_tree, inflatable_utils.pull_objects):
        defaults = function.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"flwr's {function.__qualname__} no longer takes initial_backoff/backoff_cap")
        defaults.update(initial_backoff=initial_backoff_s, backoff_cap=backoff_cap_s)


def _shorter_sleeps(idle_poll_s: float, reply_poll_s: float) -> types.SimpleNamespace:
    """The `time` module as the SuperNode loop sees it: its 3 s idle sleep becomes `idle_poll_s`, every
    other sleep (the 0.5 s reply waits) at most `reply_poll_s`."""

    def sleep(seconds: float) -> None:
        time.sleep(idle_poll_s if seconds == _FLOWER_IDLE_SLEEP_S else min(seconds, reply_poll_s))

    return types.SimpleNamespace(**{**vars(time), "sleep": sleep})


def prompt_supernode_loop(*, idle_poll_s: float = IDLE_POLL_S, reply_poll_s: float = REPLY_POLL_S) -> None:
    """Shorten the SuperNode loop's sleeps in this process (before `flower_supernode()` runs)."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps through the time module")
    start_client_internal.time = _shorter_sleeps(idle_poll_s, reply_poll_s)  # type: ignore[assignment]
    prompt_object_pulls()
    logging.getLogger("flwr").info(
        "medtwin: SuperNode idle poll %.2f s, reply poll %.2f s, object pull retry from %.2f s", idle_poll_s, reply_poll_s, PULL_BACKOFF_S
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    idle_poll_s = IDLE_POLL_S
    if arguments[:1] == ["--idle-poll-s"] and len(arguments) > 1:
        idle_poll_s, arguments = float(arguments[1]), arguments[2:]
    prompt_supernode_loop(idle_poll_s=idle_poll_s)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *arguments]
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
