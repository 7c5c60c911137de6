"""A hospital's SuperNode with a warm ClientApp worker: `flower-supernode --isolation process` plus
Flower's own SuperExec loop, whose ClientApp tasks run in one persistent worker process per site.

Flower's default (`--isolation subprocess`) starts a fresh `flwr-clientapp` interpreter for every
message; each spends ~8 s importing the stack and then rebuilds the site from its file. Here the
SuperExec is Flower's (`flwr.supercore.superexec.run_superexec`: it acquires tasks from the SuperNode's
Runtime API and hands each token to an executor); only the executor differs: it hands each ClientApp
token to the site's warm worker (`site_worker.py`), which runs Flower's `flwr-clientapp` code path in
its main thread and keeps the site, its chain reader and its DP calibration between messages, as a
simulation's Ray worker does. The worker forks from a multiprocessing *forkserver* that preloaded
torch, Opacus, TenSEAL and medtwin, so a replacement (after it died, or grew past `WORKER_MAX_RSS_MB`)
starts in milliseconds. A task that arrives while the worker is busy runs in a one-off fork of the same
forkserver (the pre-worker path): it never waits behind a slow or stuck task, as with Flower's own
executor, whose ClientApp processes run side by side.

    python -m medtwin.experiments.warm_clientapp --runtime-api-address 127.0.0.1:PORT -- flower-supernode …

The SuperNode is this process's child; when it exits this process exits with its code, so the site's
process tree has one root and `medtwin site stop` stops everything by PID.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from .site_worker import SiteWorker, TaskFunction, clientapp_arguments, die_with_parent, prepare_clientapp_process, run_flwr_clientapp

__all__ = ["PRELOAD", "WORKER_MAX_RSS_MB", "WarmWorkerExecutor", "main"]

logger = logging.getLogger("medtwin.site_worker")

# What every ClientApp process would import anyway; the forkserver imports it once (see warm_preload).
PRELOAD = ("medtwin.experiments.warm_preload",)
# A worker that grew past this (checked between tasks) is replaced by a fresh fork: its caches are
# bounded, but a leak in a dependency must not grow a site's memory without limit.
WORKER_MAX_RSS_MB = 2048


def _run_one_clientapp(task: TaskFunction, arguments: list[str]) -> None:
    """A one-off ClientApp process (the worker was busy): Flower's entry point, which exits the process."""
    prepare_clientapp_process(warm_worker=False)
    task(arguments)


class WarmWorkerExecutor:
    """A SuperExec executor (Flower's `Executor` protocol): ClientApp tasks go to the site's warm worker,
    or to a one-off fork when it is busy. Other task types are refused: Flower would run them with its stock
    loader, which imports the app the coordinator's FAB names (a FAB declaring an `agentapp` makes the
    SuperNode's tasks of that type)."""

    def __init__(
        self, preload: Sequence[str] = PRELOAD, *, max_worker_rss_mb: float = WORKER_MAX_RSS_MB, task: TaskFunction = run_flwr_clientapp
    ) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))
        self._fallback = SubprocessExecutor()
        self._children: list[BaseProcess] = []
        self._lock = threading.Lock()
        self.max_worker_rss_bytes = int(max_worker_rss_mb * 2**20)
        self._task = task  # one ClientApp task; Flower's flwr-clientapp code path but in tests
        self.worker = SiteWorker(self._context, task=task)  # starts the forkserver, which preloads, then forks the worker

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):  # noqa: ANN001, ANN201
        return self._fallback.get_eligible_capacity(
            supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path
        )

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:  # noqa: ANN001
        return None

    def launch(self, spec):  # noqa: ANN001, ANN201 - flwr's ExecutionSpec -> LaunchResult
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"this hospital runs only medtwin's own ClientApp; task {spec.task_id} is a {spec.task_type} task, "
                "whose app would be loaded from the coordinator's FAB"
            )
        arguments = clientapp_arguments(spec)
        with self._lock:
            try:
                if self._ready_worker().submit(spec.task_id, arguments):
                    return LaunchResult.accepted()
                if not self.worker.alive and self._replace_worker("it exited as the task was handed over").submit(spec.task_id, arguments):
                    return LaunchResult.accepted()
            except OSError as error:
                logger.warning("could not start a warm ClientApp worker (%s); task %d runs in a one-off process", error, spec.task_id)
        if spec.parent_pid is not None:
            arguments += ["--parent-pid", str(spec.parent_pid)]
        # daemonic: this process's exit terminates them (a ClientApp starts no processes of its own)
        child = self._context.Process(target=_run_one_clientapp, args=(self._task, arguments), daemon=True, name=f"clientapp-{spec.task_id}")
        try:
            child.start()
        except OSError as error:
            return LaunchResult.failed(f"could not fork a ClientApp process: {error}")
        with self._lock:
            self._children.append(child)
        return LaunchResult.accepted()

    def _ready_worker(self) -> SiteWorker:
        """The worker for the next task: replaced first if it died, or grew too large while idle."""
        if not self.worker.alive:
            return self._replace_worker(f"it exited with code {self.worker.process.exitcode}")
        if not self.worker.busy and self.worker.resident_bytes > self.max_worker_rss_bytes:
            return self._replace_worker(f"it holds {self.worker.resident_bytes / 2**20:.0f} MB, more than {self.max_worker_rss_bytes / 2**20:.0f} MB")
        return self.worker

    def _replace_worker(self, reason: str) -> SiteWorker:
        logger.warning("warm ClientApp worker %s replaced: %s", self.worker.process.pid, reason)
        self.worker.close()
        self.worker = SiteWorker(self._context, task=self._task)
        return self.worker

    def reconcile(self) -> None:
        """Take the worker's reports; reap finished one-off ClientApp processes."""
        with self._lock:
            self.worker.collect()
            self._children = [child for child in self._children if child.is_alive()]

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
            self.worker.close()
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(timeout=5.0)
            if child.is_alive():
                child.kill()
        self._fallback.close()


def _exit_with(supernode: subprocess.Popen, executors: list[WarmWorkerExecutor]) -> None:
    """When the SuperNode exits (refused, crashed, stopped), so does this process, with its code — also while
    the executor is still being built (its forkserver preloads torch & co., which can take a minute on a busy
    machine: a refused SuperNode must be reported at once, not after the warm-up)."""
    code = supernode.wait()
    for executor in executors:
        executor.close()
    os._exit(code if code >= 0 else 128 - code)


def _stop(supernode: subprocess.Popen) -> None:
    if supernode.poll() is None:
        supernode.send_signal(signal.SIGTERM)
        try:
            supernode.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            supernode.kill()


def main(argv: Sequence[str] | None = None, *, executor_factory: Callable[[], WarmWorkerExecutor] | None = None) -> None:
    """The site's wrapper; `executor_factory` (default `WarmWorkerExecutor`, the site's pinned worker) is for the
    Flower floor bench (experiments/flower_floor.py), whose own SuperNodes run a no-op app, never a site's."""
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # Flower polls every 1 s by default
    parser = argparse.ArgumentParser(prog="python -m medtwin.experiments.warm_clientapp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    arguments = list(sys.argv[1:] if argv is None else argv)
    split = arguments.index("--") if "--" in arguments else len(arguments)
    args, command = parser.parse_args(arguments[:split]), arguments[split + 1 :]
    if "--isolation" not in command[:-1] or command[command.index("--isolation") + 1] != "process":
        parser.error("give the flower-supernode command after --, with --isolation process")
    # inherits stdout/stderr (one log for the site); gets SIGTERM if this process dies, even by SIGKILL
    supernode = subprocess.Popen(command, preexec_fn=die_with_parent)  # no orphaned SuperNode stays listed at the SuperLink
    atexit.register(_stop, supernode)
    executors: list[WarmWorkerExecutor] = []  # filled once built; the watcher runs from the start
    threading.Thread(target=_exit_with, args=(supernode, executors), name="supernode", daemon=True).start()
    executor = (executor_factory or WarmWorkerExecutor)()
    executors.append(executor)
    handler = logging.StreamHandler()  # the worker's per-task report, in the site's log
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    superexec.get_executor = lambda *_, **__: executor  # Flower's loop, our executor (flwr pinned in pyproject)
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True)


if __name__ == "__main__":
    main()
