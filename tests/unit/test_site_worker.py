"""The site's warm ClientApp worker (experiments/site_worker.py, experiments/warm_clientapp.py): one process
serves a run's messages with its caches kept, survives a failed task and Flower's end-of-task exit, is
replaced when it dies, hands a task that finds it busy to a one-off fork, and dies with its parent.

Real processes (a forkserver without the heavy preload); the tasks are small functions of this module
in place of Flower's `flwr-clientapp`, which needs a SuperNode's Runtime API."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from medtwin.experiments.site_worker import SiteWorker

TASK_TIMEOUT_S = 60.0  # the first task imports torch in the worker: seconds on a busy machine


def _context():
    return multiprocessing.get_context("forkserver")


def wait_idle(worker: SiteWorker, *, done: int) -> None:
    deadline = time.monotonic() + TASK_TIMEOUT_S
    while worker.tasks_done < done:
        worker.collect()
        assert worker.alive, f"the worker died (exit code {worker.process.exitcode})"
        assert time.monotonic() < deadline, "the worker did not finish its task"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- tasks the worker runs (module-level: the forkserver's children import them by name) ---


def load_site_task(arguments: list[str]) -> int:
    """A message's first step in the ClientApp: the site for (site file, proposal)."""
    from medtwin.client import site

    site_file, proposal_file, report = arguments
    loaded = site.load_site(site_file, Path(proposal_file).read_text(encoding="utf-8"))
    info = site._load_site.cache_info()
    with open(report, "a", encoding="utf-8") as out:
        out.write(json.dumps({"pid": os.getpid(), "site": loaded.site_id, "hits": info.hits, "misses": info.misses}) + "\n")
    return 0


def flower_task(arguments: list[str]) -> int:
    """What Flower's run_clientapp does around an app: its signal and exit handlers, a heartbeat sender, then
    either its own end (`flwr_exit`, which the worker turns into the end of the task) or an exception."""
    from flwr.supercore.exit import exit_handler, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.telemetry import EventType
    from flwr.supernode.runtime import run_clientapp

    how, report = arguments
    with open(report, "a", encoding="utf-8") as out:  # what the previous task left behind
        out.write(json.dumps({
            "pid": os.getpid(), "sigterm_is_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "exit_handlers": len(exit_handler.registered_exit_handlers),
        }) + "\n")  # fmt: skip
    heartbeat = HeartbeatSender(lambda: True)

    def on_exit() -> None:
        heartbeat.stop()
        with open(report, "a", encoding="utf-8") as out:
            out.write(json.dumps({"on_exit": how}) + "\n")

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_handlers=[on_exit])
    heartbeat.start()
    if how == "raise":
        raise RuntimeError("the app failed before Flower's own exit")
    run_clientapp.flwr_exit(code=0 if how == "ok" else 101)
    raise AssertionError("flwr_exit returned")


def record_task(arguments: list[str]) -> int:
    """Writes which process ran it to the file the token names (`<name>@<path>`); a task named slow takes a while."""
    token, report = arguments[arguments.index("--token") + 1].split("@", 1)
    if token == "slow":
        time.sleep(3.0)
    with open(report, "a", encoding="utf-8") as out:
        out.write(json.dumps({"pid": os.getpid(), "token": token}) + "\n")
    return 0


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


# --- tests ---


def test_the_second_message_of_a_run_reuses_the_site_the_first_built(tmp_path: Path) -> None:
    from medtwin.core.config.compose import compose_config
    from medtwin.experiments.simulate import prepare_parties
    from medtwin.server.app import make_run_id

    config = compose_config(["task=breast_cancer", "task.num_sites=2", f"runs_dir={tmp_path / 'runs'}"])
    config.run_id = make_run_id(config)
    parties = prepare_parties(config)
    proposal, report = tmp_path / "proposal.yaml", tmp_path / "report.jsonl"
    proposal.write_text(parties.proposal_text, encoding="utf-8")
    worker = SiteWorker(multiprocessing.get_context("fork"), task=load_site_task)  # this process imported torch already
    try:
        for done in (1, 2):
            assert worker.submit(done, [str(parties.site_files[0]), str(proposal), str(report)])
            wait_idle(worker, done=done)
        first, second = _records(report)
        assert first["pid"] == second["pid"] == worker.process.pid
        assert (first["misses"], second["misses"], second["hits"]) == (1, 1, first["hits"] + 1)  # built once, then kept
        Path(parties.site_files[0]).touch()  # the hospital edited its site file: the next message rebuilds
        assert worker.submit(3, [str(parties.site_files[0]), str(proposal), str(report)])
        wait_idle(worker, done=3)
        assert _records(report)[2]["misses"] == 2
    finally:
        worker.close()
    assert not worker.alive


def test_a_task_that_fails_or_ends_the_flower_way_leaves_the_worker_clean(tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    worker = SiteWorker(_context(), task=flower_task)
    try:
        for done, how in enumerate(("raise", "ok", "error", "ok"), start=1):
            assert worker.submit(done, [how, str(report)])
            wait_idle(worker, done=done)
            assert worker.last_exit_code == {"raise": 1, "ok": 0, "error": 101}[how]
        records = _records(report)
    finally:
        worker.close()
    starts = [record for record in records if "pid" in record]
    assert {record["pid"] for record in starts} == {worker.process.pid}  # one process served all four
    # every task started as the first did: no exit handler of an earlier task, the worker's own SIGTERM handling
    assert all(record["exit_handlers"] == 0 and record["sigterm_is_default"] for record in starts)
    assert [record["on_exit"] for record in records if "on_exit" in record] == ["raise", "ok", "error", "ok"]  # final status pushed


def _spec(task_id: int, token: str):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    return ExecutionSpec(
        task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9", token=token, insecure=True, root_certificates_path=None,
        runtime_dependency_install=False, parent_pid=os.getpid(), suppress_output=False, task_id=task_id,
    )  # fmt: skip


def _wait_records(path: Path, count: int) -> list[dict]:
    deadline = time.monotonic() + TASK_TIMEOUT_S
    while len(records := _records(path)) < count:
        assert time.monotonic() < deadline, f"{len(records)} of {count} tasks ran"
        time.sleep(0.05)
    return records


def test_a_dead_worker_is_replaced_and_a_busy_one_gets_help(tmp_path: Path) -> None:
    from flwr.supercore.superexec.executor.types import LaunchResultStatus

    from medtwin.experiments.warm_clientapp import WarmWorkerExecutor

    report = tmp_path / "report.jsonl"
    executor = WarmWorkerExecutor(preload=(), task=record_task)
    try:
        first = executor.worker.process.pid
        os.kill(first, signal.SIGKILL)
        executor.worker.process.join(timeout=10)
        assert executor.launch(_spec(1, f"after-kill@{report}")).status == LaunchResultStatus.ACCEPTED
        (record,) = _wait_records(report, 1)
        assert record == {"pid": executor.worker.process.pid, "token": "after-kill"} and record["pid"] != first  # not lost

        assert executor.launch(_spec(2, f"slow@{report}")).status == LaunchResultStatus.ACCEPTED
        assert executor.launch(_spec(3, f"meanwhile@{report}")).status == LaunchResultStatus.ACCEPTED  # the worker is busy
        records = _wait_records(report, 3)
        by_token = {record["token"]: record["pid"] for record in records}
        assert by_token["slow"] == executor.worker.process.pid and by_token["meanwhile"] != by_token["slow"]  # a one-off fork
        assert records[1]["token"] == "meanwhile"  # it did not wait behind the slow task

        executor.reconcile()
        executor.max_worker_rss_bytes = 1  # grown too large: replaced between tasks, not during one
        assert executor.launch(_spec(4, f"fresh@{report}")).status == LaunchResultStatus.ACCEPTED
        assert _wait_records(report, 4)[3]["pid"] not in (first, by_token["slow"])
    finally:
        executor.close()
    assert not executor.worker.alive


def test_the_worker_dies_with_the_site_process_that_started_it(tmp_path: Path) -> None:
    script = (
        "import multiprocessing, sys, time\n"
        "from medtwin.experiments.site_worker import SiteWorker\n"
        "if __name__ == '__main__':\n"
        "    worker = SiteWorker(multiprocessing.get_context('forkserver'), task=len)\n"
        "    worker.submit(1, ['serving'])\n"
        "    while worker.tasks_done < 1:\n"
        "        worker.collect()\n"
        "        time.sleep(0.05)\n"
        "    print(worker.process.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker_pid = None
    try:
        worker_pid = int(parent.stdout.readline())
        assert _alive(worker_pid)
        os.kill(parent.pid, signal.SIGKILL)  # the site's wrapper dies without cleaning up
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker_pid), "the warm worker outlived the process that started it"
    finally:
        for pid in [parent.pid, *([worker_pid] if worker_pid else [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait(timeout=10)
