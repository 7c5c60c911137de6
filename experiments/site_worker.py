"""A hospital's warm ClientApp worker: one persistent process per SuperNode that runs every ClientApp
task through Flower's own `flwr-clientapp` code path, one after another, in its main thread.

Why: a fresh process per message rebuilt the site (site file, kit, data, CKKS context), reopened its
chain reader and re-derived its DP calibration for every message, where a simulation's Ray worker keeps
them for the whole run. The worker keeps them the same way — the module-level caches (`client/site.py`
`_load_site`, the chain reader `shared_readonly`, the RDP memo) persist between the messages it serves.

What a message may leave behind, and why the next one does not trust it: every cache is keyed by what
decides its value (the site file's path and mtime, the stamps of the kit and data files it read, plus the
proposal text — at most `WORKER_SITES_KEPT` of them; the chain's deployment record; the noise multiplier
and sample rate) and holds no answer that can change — approvals, revocations,
anchors, the budget ledger, the reply store and the site's shared state are read from the chain or the
site's disk on every message, exactly as in simulation.

Flower's process-level machinery, per task, inside a process that stays:
- `flwr_exit` ends a ClientApp process (and starts a 5 s force-exit timer). In the worker the task's end
  runs the same exit handlers — push the task's final status, stop its heartbeat sender, close its
  Runtime API client — then returns to the worker loop (`end_task`). Handlers a task left registered
  (it failed before Flower's own exit) are run after it; the worker's signal handlers are put back.
- Signals keep Flower's meaning: SIGTERM/SIGINT during a task run Flower's graceful exit and end the
  worker; the executor starts another for the next task.
- No `--parent-pid` monitor per task (one thread each, never stopped): the worker dies with its
  parent (the executor's forkserver, which exits with the site's wrapper) through PR_SET_PDEATHSIG.
- Flower's app loader is replaced (`pinned_clientapp.py`): every task runs the site's own installed
  `medtwin.experiments.flower_apps:client_app`, already imported; a FAB declaring another app is refused,
  and the FAB's folder is never put on `sys.path`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import NoReturn

from medtwin.core.rundir import atomic_write_text

__all__ = [
    "PROFILE_DIR_ENV", "WORKER_SITES_KEPT", "SiteWorker", "TaskFunction", "clientapp_arguments", "die_with_owner", "die_with_parent", "end_task", "install_each_fab_once",
    "prepare_clientapp_process", "run_flwr_clientapp", "run_task", "saved_signal_handlers", "serve", "task_orders",
]  # fmt: skip

logger = logging.getLogger("medtwin.site_worker")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Sites the worker keeps (client/site.py caches one per site file and proposal text): a run has one proposal
# text, and each text the coordinator sends holds a Site (its data, kit and secret CKKS context) in memory.
WORKER_SITES_KEPT = 4
PROFILE_DIR_ENV = "MEDTWIN_WORKER_PROFILE_DIR"  # set: each task's cProfile is written there (task-<id>.prof)
_FLOWER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)  # what Flower's register_signal_handlers takes

TaskFunction = Callable[[list[str]], int]


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux's PR_SET_PDEATHSIG: this process gets `signum` when its parent dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_owner(owner_pid: int) -> None:
    """A worker forked for `owner_pid` (its executor) ends with it, also if it died before this ran."""
    die_with_parent()
    try:
        os.kill(owner_pid, 0)  # the executor died before the death signal was armed
    except ProcessLookupError:
        os._exit(1)


def install_each_fab_once(install: Callable[..., Path], marks: Path) -> Callable[..., Path]:
    """Flower's `install_from_fab`, run once per FAB: every ClientApp process unzips and re-hashes the
    whole FAB (~0.4 s) before finding it installed already. The first successful install of a FAB leaves
    a mark named by the SHA-256 of its full bytes; a later process with the same bytes skips the work."""

    def install_once(fab_file: bytes | Path, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        if not isinstance(fab_file, bytes):
            return install(fab_file, install_dir, skip_prompt)
        mark = marks / hashlib.sha256(fab_file).hexdigest()
        if mark.is_file() and Path(installed := mark.read_text(encoding="utf-8")).is_dir():
            return Path(installed)
        path = install(fab_file, install_dir, skip_prompt)
        marks.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mark, str(path))
        return path

    return install_once


class _TaskEnded(Exception):
    """Flower's `flwr_exit` at the end of a ClientApp task, in a worker that goes on."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def end_task(code: int, message: str | None = None, event_type: object = None, event_details: object = None, *, emit_telemetry: bool = True) -> NoReturn:
    """`flwr_exit` for a task inside the worker: the task's exit handlers run as in Flower's (its final status
    is pushed, its heartbeat stopped, its client closed); no force-exit timer, the process stays."""
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers

    if message:
        logger.info("ClientApp task ended (exit code %d): %s", code, message)
    trigger_exit_handlers(run_before_force_exit=True)
    trigger_exit_handlers(run_before_force_exit=False)
    raise _TaskEnded(code)


def prepare_clientapp_process(*, warm_worker: bool) -> None:
    """Set once in a process that runs ClientApp tasks: only the site's own ClientApp is loaded and no FAB's
    dependencies installed (`pin_site_client_app`), object pulls retried promptly, each FAB installed once
    per site and, in a warm worker, a task's end that keeps the process (`end_task`)."""
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp

    from .pinned_clientapp import pin_site_client_app
    from .prompt_flower import prompt_object_pulls

    pin_site_client_app(run_clientapp)
    prompt_object_pulls()
    run_clientapp.install_from_fab = install_each_fab_once(run_clientapp.install_from_fab, get_flwr_home() / "medtwin-installed-fabs")
    if warm_worker:
        from medtwin.client.site import keep_sites

        keep_sites(WORKER_SITES_KEPT)
        if not callable(getattr(run_clientapp, "flwr_exit", None)):
            raise RuntimeError("flwr.supernode.runtime.run_clientapp no longer ends a task with flwr_exit (flwr is pinned in pyproject)")
        run_clientapp.flwr_exit = end_task


def run_flwr_clientapp(arguments: list[str]) -> int:
    """One ClientApp task, as the `flwr-clientapp` console script runs it; returns Flower's exit code."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = ["flwr-clientapp", *arguments]
    try:
        flwr_clientapp()
    except _TaskEnded as ended:
        return ended.code
    return 0


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clientapp_arguments(spec: object) -> list[str]:
    """`flwr-clientapp`'s arguments for a SuperExec task (flwr's ExecutionSpec): its Runtime API, token and TLS."""
    arguments = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]  # type: ignore[attr-defined]
    if spec.insecure:  # type: ignore[attr-defined]
        arguments.append("--insecure")
    elif spec.root_certificates_path is not None:  # type: ignore[attr-defined]
        arguments += ["--root-certificates", spec.root_certificates_path]  # type: ignore[attr-defined]
    return arguments


def saved_signal_handlers() -> dict:
    """The worker's own handlers of the signals Flower's tasks take over (`run_task` puts them back)."""
    return {signum: signal.getsignal(signum) for signum in _FLOWER_SIGNALS}


def task_orders(connection: Connection) -> Iterator[tuple[int, list[str]]]:
    """(task id, arguments) as the executor sends them, until it closes the pipe or sends None."""
    while True:
        try:
            order = connection.recv()
        except (EOFError, OSError):
            return
        if order is None:
            return
        task_id, arguments = order
        yield task_id, list(arguments)


def run_task(task: TaskFunction, task_id: int, arguments: list[str], signal_handlers: dict) -> int:
    """One task; whatever it does, the worker is left as before it: no exit handler, its own signal handlers,
    its own `sys.path` (the pinned loader adds nothing to it; whatever a task adds is gone for the next one)."""
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers

    profile_dir = os.environ.get(PROFILE_DIR_ENV, "")
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    argv, import_path = list(sys.argv), list(sys.path)
    try:
        return task(arguments)
    except _TaskEnded as ended:
        return ended.code
    except Exception:  # a failed task must not take the worker (and the site's warm caches) with it
        logger.exception("ClientApp task %d failed in the warm worker; the worker serves the next one", task_id)
        return 1
    finally:
        trigger_exit_handlers(run_before_force_exit=True)  # what a task that failed before Flower's exit left
        trigger_exit_handlers(run_before_force_exit=False)
        for signum, handler in signal_handlers.items():
            signal.signal(signum, handler)
        sys.argv = argv
        sys.path[:] = import_path
        if profiler is not None:
            profiler.disable()
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(Path(profile_dir) / f"task-{task_id}-pid{os.getpid()}.prof"))


def serve(connection: Connection, task: TaskFunction, owner_pid: int) -> None:
    """The worker's main loop: run each (task id, arguments) the executor sends, report (task id, exit code,
    resident bytes, seconds); end when the executor closes the pipe or sends None."""
    die_with_owner(owner_pid)
    prepare_clientapp_process(warm_worker=True)
    signal_handlers = saved_signal_handlers()
    for task_id, arguments in task_orders(connection):
        started = time.monotonic()
        code = run_task(task, task_id, arguments, signal_handlers)
        connection.send((task_id, code, _resident_bytes(), time.monotonic() - started))


class SiteWorker:
    """The executor's handle on one warm worker process (a child of `context`'s process tree)."""

    def __init__(self, context: BaseContext, *, task: TaskFunction = run_flwr_clientapp) -> None:
        self._connection, worker_end = context.Pipe()
        self.process = context.Process(target=serve, args=(worker_end, task, os.getpid()), daemon=True, name="medtwin-site-worker")
        self.process.start()
        worker_end.close()
        self.task_id: int | None = None  # the task it runs now
        self.tasks_done = 0
        self.resident_bytes = 0
        self.last_exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def busy(self) -> bool:
        self.collect()
        return self.task_id is not None

    def collect(self) -> None:
        """Take the worker's reports: a finished task frees it."""
        try:
            while self._connection.poll():
                task_id, code, self.resident_bytes, seconds = self._connection.recv()
                self.task_id, self.tasks_done, self.last_exit_code = None, self.tasks_done + 1, code
                logger.info(
                    "warm ClientApp worker %d: task %d ended with code %d in %.2f s (%d served, %.0f MB resident)",
                    self.process.pid, task_id, code, seconds, self.tasks_done, self.resident_bytes / 2**20,
                )  # fmt: skip
        except (EOFError, OSError):  # it died: `alive` says so
            pass

    def submit(self, task_id: int, arguments: Sequence[str]) -> bool:
        """Hand the worker a task; False if it is busy or gone (the task is then not taken)."""
        if self.busy or not self.alive:
            return False
        try:
            self._connection.send((task_id, list(arguments)))
        except (OSError, ValueError):
            return False
        self.task_id = task_id
        return True

    def close(self, *, timeout_s: float = 5.0) -> None:
        """Idle: it leaves at the closed pipe. Busy: Flower's SIGTERM handling ends its task, then SIGKILL."""
        busy = self.alive and self.busy
        try:
            self._connection.send(None)
        except (OSError, ValueError):
            pass
        self._connection.close()
        self.process.join(timeout=0.0 if busy else timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=timeout_s)
