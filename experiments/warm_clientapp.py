"""A hospital's SuperNode with a warm ClientApp executor: `flower-supernode --isolation process` plus
Flower's own SuperExec loop, whose ClientApp processes fork from a process that has already imported
torch, Opacus, TenSEAL and medtwin.

Flower's default (`--isolation subprocess`) starts a fresh `flwr-clientapp` interpreter for every
message; each spends ~8 s importing the stack before it reads the site file. Here the SuperExec is
Flower's (`flwr.supercore.superexec.run_superexec`: it acquires tasks from the SuperNode's Runtime API
and hands each token to an executor); only the executor differs: it starts `flwr-clientapp`'s own
entry point in a child of a multiprocessing *forkserver* that preloaded those modules. Each message
still runs in its own process with a fresh site built from the site file — nothing of one message
survives into the next — so the isolation Flower gives is kept; only the imports are shared.

    python -m medtwin.experiments.warm_clientapp --runtime-api-address 127.0.0.1:PORT -- flower-supernode …

The SuperNode is this process's child; when it exits this process exits with its code, so the site's
process tree has one root and `medtwin site stop` stops everything by PID.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import hashlib
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

from medtwin.core.rundir import atomic_write_text

__all__ = ["PRELOAD", "ForkServerExecutor", "install_each_fab_once", "main"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# What every ClientApp process would import anyway; the forkserver imports it once (see warm_preload).
PRELOAD = ("medtwin.experiments.warm_preload",)


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


def _run_flwr_clientapp(arguments: list[str]) -> None:
    """The child: Flower's `flwr-clientapp` entry point, exactly as the console script runs it."""
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    from .prompt_flower import prompt_object_pulls

    prompt_object_pulls()
    run_clientapp.install_from_fab = install_each_fab_once(run_clientapp.install_from_fab, get_flwr_home() / "medtwin-installed-fabs")
    sys.argv = ["flwr-clientapp", *arguments]
    flwr_clientapp()


def _warm_up() -> None:
    """Started once so the forkserver exists (and has preloaded) before the first message arrives."""


class ForkServerExecutor:
    """A SuperExec executor (Flower's `Executor` protocol) that starts each ClientApp task in a fork of
    a warm forkserver instead of a new interpreter; other task types fall back to Flower's subprocess one."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))
        self._fallback = SubprocessExecutor()
        self._children: list[BaseProcess] = []
        self._lock = threading.Lock()
        warm = self._context.Process(target=_warm_up, daemon=True)
        warm.start()
        warm.join()

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
            return self._fallback.launch(spec)
        arguments = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            arguments.append("--insecure")
        elif spec.root_certificates_path is not None:
            arguments += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            arguments += ["--parent-pid", str(spec.parent_pid)]
        # daemonic: this process's exit terminates them (a ClientApp starts no processes of its own)
        child = self._context.Process(target=_run_flwr_clientapp, args=(arguments,), daemon=True, name=f"clientapp-{spec.task_id}")
        try:
            child.start()
        except OSError as error:
            return LaunchResult.failed(f"could not fork a ClientApp process: {error}")
        with self._lock:
            self._children.append(child)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished ClientApp processes."""
        with self._lock:
            self._children = [child for child in self._children if child.is_alive()]

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(timeout=5.0)
            if child.is_alive():
                child.kill()
        self._fallback.close()


def _exit_with(supernode: subprocess.Popen, executor: ForkServerExecutor) -> None:
    """When the SuperNode exits (refused, crashed, stopped), so does this process, with its code."""
    code = supernode.wait()
    executor.close()
    os._exit(code if code >= 0 else 128 - code)


def _terminate_with_parent() -> None:
    """In the SuperNode child before exec: Linux's PR_SET_PDEATHSIG, so no SuperNode outlives its wrapper
    (an orphan would stay listed at the SuperLink and take messages nothing runs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _stop(supernode: subprocess.Popen) -> None:
    if supernode.poll() is None:
        supernode.send_signal(signal.SIGTERM)
        try:
            supernode.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            supernode.kill()


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # Flower polls every 1 s by default
    parser = argparse.ArgumentParser(prog="python -m medtwin.experiments.warm_clientapp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    arguments = list(sys.argv[1:] if argv is None else argv)
    split = arguments.index("--") if "--" in arguments else len(arguments)
    args, command = parser.parse_args(arguments[:split]), arguments[split + 1 :]
    if "--isolation" not in command[:-1] or command[command.index("--isolation") + 1] != "process":
        parser.error("give the flower-supernode command after --, with --isolation process")
    # inherits stdout/stderr (one log for the site); gets SIGTERM if this process dies, even by SIGKILL
    supernode = subprocess.Popen(command, preexec_fn=_terminate_with_parent)
    atexit.register(_stop, supernode)
    executor = ForkServerExecutor()
    threading.Thread(target=_exit_with, args=(supernode, executor), name="supernode", daemon=True).start()
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    superexec.get_executor = lambda *_, **__: executor  # Flower's loop, our executor (flwr pinned in pyproject)
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True)


if __name__ == "__main__":
    main()
