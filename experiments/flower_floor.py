"""Flower's own round trip, without medtwin's work: a no-op app whose messages have medtwin's shapes.

`bench_flower_floor.py` runs it through the deploy demo's kind of parties (TLS SuperLink with SuperNode
authentication, four SuperNodes with medtwin's Flower tuning) to measure the deployment engine's floor:

- `server_app` sends every node one `train`, then one `evaluate` message a round, each with the Flower
  objects and about the bytes of medtwin's Fed-Heart-Disease DP+CKKS messages (medtwin's instruction
  record, then `INSTRUCTION_SHAPE`: the packed round inputs and the certificate, shared by a phase's
  messages, as `server/loop.py` sends them), through medtwin's `PromptGrid`, and writes when each phase
  was pushed and each reply arrived to the run config's `floor-timings` file;
- `client_app` replies at once with a reply of medtwin's shape (`REPLY_SHAPES`);
- `python -m medtwin.experiments.flower_floor --tasks-log FILE <warm_clientapp arguments>` is a
  SuperNode wrapper like a site's (`warm_clientapp.py`: Flower's SuperExec, one warm ClientApp worker
  running Flower's `flwr-clientapp` code path), whose worker serves only this module's `client_app` and
  appends when each task started, had pulled its message, pushed its reply and ended to FILE.

Nothing here runs at a site: a site's SuperNode is `warm_clientapp`'s, pinned to medtwin's ClientApp.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

from medtwin.core.protocol import INSTRUCTION, instruction
from medtwin.core.rundir import atomic_write_text

from .prompt_flower import prompt_object_pulls
from .site_worker import (
    clientapp_arguments,
    die_with_owner,
    end_task,
    install_each_fab_once,
    run_flwr_clientapp,
    run_task,
    saved_signal_handlers,
    task_orders,
)

__all__ = [
    "INSTRUCTION_SHAPE", "PHASES", "REPLY_SHAPES", "FloorExecutor", "RecordShape", "client_app", "instruction_content",
    "main", "reply_content", "server_app", "shape_of",
]  # fmt: skip


PHASES = ("train", "evaluate")
FLOOR_RUN_ID = "flower-floor"
NODE_WAIT_S = 60.0
PHASE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RecordShape:
    """A record's Flower type and its deflated bytes (summed over its objects: an ArrayRecord of one bytes
    array is 3 objects — ArrayRecord, Array, ArrayChunk; a config or metric record is 1)."""

    kind: str  # "config", "arrays" or "metrics"
    deflated_bytes: int


# medtwin's messages from round 2 on (Fed-Heart-Disease, DP ε=3 + CKKS, 4 sites), recorded at 43cd693 from
# every message a simulation's Grid pushed and pulled (3 rounds; every message of a kind within 30 bytes):
# an instruction is 7 Flower objects, 23.8 KB; a train reply 7 objects, 4.9 KB; an evaluate reply 5, 11.5 KB.
INSTRUCTION_SHAPE = {  # besides medtwin's own instruction ConfigRecord (`core.protocol.instruction`, 84 B)
    "medtwin.round_inputs": RecordShape("arrays", 20_640),  # the certified sum + the updates behind it, packed
    "medtwin.certificate": RecordShape("config", 2_484),
}
REPLY_SHAPES = {
    "train": {
        "medtwin.update": RecordShape("arrays", 3_635),
        "medtwin.site": RecordShape("config", 605),
        "medtwin.metrics": RecordShape("metrics", 48),
    },
    "evaluate": {
        "medtwin.site": RecordShape("config", 528),
        "medtwin.metrics": RecordShape("metrics", 245),
        "medtwin.score_histogram": RecordShape("metrics", 10_093),
    },
}


def shape_of(item: InflatableObject) -> tuple[int, int]:
    """(Flower objects, deflated bytes) of a message or record: what travels, object by object, on each hop."""
    objects = get_all_nested_objects(item)
    return len(objects), sum(len(obj.deflate()) for obj in objects.values())


def _filled(kind: str, filler_bytes: int, seed: str) -> ConfigRecord | ArrayRecord | MetricRecord:
    data = random.Random(seed).randbytes(max(0, filler_bytes))
    if kind == "config":
        return ConfigRecord({"filler": data})
    if kind == "arrays":
        return ArrayRecord({"filler": Array(dtype="bytes", shape=(len(data),), stype="medtwin.floor", data=data)})
    if kind == "metrics":
        return MetricRecord({"filler": [0.5] * (len(data) // 8)})
    raise ValueError(f"record kind {kind!r} is not one of 'config', 'arrays', 'metrics'")


@functools.cache
def _filler_bytes(kind: str, deflated_bytes: int) -> int:
    """The filler that gives a record of `kind` about `deflated_bytes` (the records' framing is a few bytes)."""
    filler = deflated_bytes
    for _ in range(3):
        filler += deflated_bytes - shape_of(_filled(kind, filler, "calibration"))[1]
    return max(0, filler)


def record_of_shape(shape: RecordShape, seed: str) -> ConfigRecord | ArrayRecord | MetricRecord:
    """A record of `shape`; its contents depend only on `seed` (the same seed: the same Flower objects)."""
    return _filled(shape.kind, _filler_bytes(shape.kind, shape.deflated_bytes), seed)


def _shared_records(server_round: int, phase: str) -> dict[str, RecordShape]:
    """The round inputs and certificate of a phase: the latest aggregate's (a train phase carries the last
    round's, the evaluate phase this round's), the same objects in every node's message."""
    aggregate_round = server_round - 1 if phase == "train" else server_round
    return {name: record_of_shape(shape, f"{name}/{aggregate_round}") for name, shape in INSTRUCTION_SHAPE.items()}


def instruction_content(server_round: int, phase: str, shared: dict | None = None) -> RecordDict:
    """One node's message content for a phase; pass `shared=_shared_records(...)` to build those once a phase."""
    order = instruction(run_id=FLOOR_RUN_ID, server_round=server_round, phase=phase)
    order["min_sites"] = 2
    return RecordDict({INSTRUCTION: order, **(shared if shared is not None else _shared_records(server_round, phase))})


def reply_content(phase: str, seed: str) -> RecordDict:
    return RecordDict({name: record_of_shape(shape, f"{name}/{seed}") for name, shape in REPLY_SHAPES[phase].items()})


# -- the no-op ClientApp ----------------------------------------------------------------------------------

client_app = ClientApp()


def _reply(message: Message, phase: str) -> Message:
    order = message.content.config_records[INSTRUCTION]
    return Message(reply_content(phase, f"{message.metadata.dst_node_id}/{order['round']}/{phase}"), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    return _reply(message, "train")


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return _reply(message, "evaluate")


# -- the ServerApp: rounds of two phases, timed ------------------------------------------------------------


class _TimedGrid:
    """A Grid that notes when its push returned and when each node's reply was first pulled (wall clock)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.pushed_at = 0.0
        self.replied_at: dict[int, float] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = list(self._grid.push_messages(messages))
        self.pushed_at = time.time()
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            self.replied_at.setdefault(reply.metadata.src_node_id, time.time())
        return replies


server_app = ServerApp()


@server_app.main()
def _round_trips(grid: Grid, context: Context) -> None:
    from medtwin.server.loop import wait_for_nodes

    from .flower_apps import PromptGrid

    prompt_object_pulls()  # as medtwin's ServerApp
    rounds, sites = int(context.run_config["floor-rounds"]), int(context.run_config["floor-sites"])
    out = Path(str(context.run_config["floor-timings"]))
    node_ids = wait_for_nodes(grid, expected=sites, timeout_s=NODE_WAIT_S)
    if len(node_ids) < sites:
        raise RuntimeError(f"{len(node_ids)} of floor-sites = {sites} SuperNodes connected within {NODE_WAIT_S:.0f} s")
    phases = []
    for server_round in range(1, rounds + 1):
        for phase in PHASES:
            timed = _TimedGrid(grid)
            started = time.time()
            shared = _shared_records(server_round, phase)
            messages = [
                Message(content=instruction_content(server_round, phase, shared), message_type=phase, dst_node_id=node_id)
                for node_id in node_ids
            ]
            replies = PromptGrid(timed).send_and_receive(messages, timeout=PHASE_TIMEOUT_S)
            phases.append({
                "round": server_round, "phase": phase, "started": started, "pushed": timed.pushed_at, "ended": time.time(),
                "replied": {str(node): at for node, at in timed.replied_at.items()},
                "errors": [reply.error.reason for reply in replies if reply.has_error()],
            })  # fmt: skip
    atomic_write_text(out, json.dumps({"nodes": node_ids, "phases": phases}, indent=1) + "\n")


# -- the SuperNode side: Flower's SuperExec, one warm worker serving `client_app` ---------------------------


def _stamped(function: Callable, stamps: dict[str, float], name: str) -> Callable:
    """`function`, noting in `stamps` when it was called (`<name>_from`) and when it returned (`<name>`)."""

    @functools.wraps(function)
    def stamped(*args: object, **kwargs: object) -> object:
        stamps[f"{name}_from"] = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            stamps[name] = time.time()

    return stamped


def serve_floor(connection: Connection, owner_pid: int, tasks_log: str) -> None:
    """The floor's warm worker: each (task id, arguments) runs Flower's `flwr-clientapp` code path in this
    process, its app this module's `client_app` (nothing is imported from the FAB), as a site's worker runs
    its own; one JSON line per task (wall-clock stamps) is appended to `tasks_log`."""
    die_with_owner(owner_pid)
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp

    prompt_object_pulls()
    run_clientapp.install_from_fab = install_each_fab_once(run_clientapp.install_from_fab, get_flwr_home() / "medtwin-installed-fabs")
    run_clientapp.flwr_exit = end_task
    run_clientapp.get_load_client_app_fn = lambda *_, **__: (lambda *_: client_app)
    stamps: dict[str, float] = {}
    run_clientapp.pull_task_input = _stamped(run_clientapp.pull_task_input, stamps, "pulled")
    run_clientapp.push_message = _stamped(run_clientapp.push_message, stamps, "pushed")
    signal_handlers = saved_signal_handlers()
    with open(tasks_log, "a", encoding="utf-8") as log:
        for task_id, arguments in task_orders(connection):
            stamps.clear()
            stamps["started"] = time.time()
            code = run_task(run_flwr_clientapp, task_id, arguments, signal_handlers)  # as a site's worker runs one
            stamps["ended"] = time.time()
            log.write(json.dumps({"task_id": task_id, "code": code, **stamps}) + "\n")
            log.flush()


class FloorExecutor:
    """A SuperExec executor (Flower's `Executor` protocol) handing every ClientApp task to one warm worker
    (`serve_floor`), forked from a forkserver that imported this module; tasks queue on its pipe."""

    def __init__(self, tasks_log: Path) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self._fallback = SubprocessExecutor()  # only to answer which task types this node takes
        self._connection, worker_end = context.Pipe()
        self._lock = threading.Lock()
        self.worker = context.Process(target=serve_floor, args=(worker_end, os.getpid(), str(tasks_log)), daemon=True, name="floor-worker")
        self.worker.start()
        worker_end.close()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):  # noqa: ANN001, ANN201
        return self._fallback.get_eligible_capacity(supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:  # noqa: ANN001
        return None

    def launch(self, spec):  # noqa: ANN001, ANN201 - flwr's ExecutionSpec -> LaunchResult
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"the floor's SuperNode runs only ClientApp tasks; task {spec.task_id} is a {spec.task_type} task")
        arguments = clientapp_arguments(spec)
        with self._lock:
            if not self.worker.is_alive():
                return LaunchResult.failed(f"the floor's worker exited with code {self.worker.exitcode}")
            self._connection.send((spec.task_id, arguments))
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            try:
                self._connection.send(None)
            except (OSError, ValueError):
                pass
            self._connection.close()
        self.worker.join(timeout=5.0)
        if self.worker.is_alive():
            self.worker.kill()
            self.worker.join(timeout=5.0)
        self._fallback.close()


def main(argv: Sequence[str] | None = None) -> None:
    """`--tasks-log FILE`, then `warm_clientapp`'s arguments (`--runtime-api-address … -- flower-supernode …`)."""
    from .warm_clientapp import main as run_supernode_wrapper

    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] != ["--tasks-log"] or len(arguments) < 2:
        raise SystemExit("usage: python -m medtwin.experiments.flower_floor --tasks-log FILE --runtime-api-address HOST:PORT -- flower-supernode …")
    tasks_log = Path(arguments[1])
    run_supernode_wrapper(arguments[2:], executor_factory=lambda: FloorExecutor(tasks_log))


if __name__ == "__main__":
    from medtwin.experiments.flower_floor import main as floor_main  # the worker's function pickles under this name

    floor_main()
