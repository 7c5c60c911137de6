"""The warm ClientApp wrapper never leaves an orphaned SuperNode behind (one would stay listed at the
SuperLink and take messages nothing runs), and refuses a command it cannot run warm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_sigkilled_wrapper_takes_its_supernode_with_it() -> None:
    stand_in = [sys.executable, "-c", "import time; time.sleep(120)", "--isolation", "process"]  # a SuperNode stand-in
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "medtwin.experiments.warm_clientapp", "--runtime-api-address", "127.0.0.1:9", "--", *stand_in],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    child = None
    try:
        deadline = time.monotonic() + 30
        while child is None and time.monotonic() < deadline:
            child = next((pid for pid in _children(wrapper.pid) if "time.sleep(120)" in _cmdline(pid)), None)
            time.sleep(0.1)
        assert child is not None, "the wrapper did not start its SuperNode"
        os.kill(wrapper.pid, signal.SIGKILL)
        wrapper.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the SuperNode outlived its wrapper"
    finally:
        for pid in [wrapper.pid, *([child] if child else [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wrapper.wait(timeout=10)


def test_a_supernode_that_exits_ends_the_wrapper_even_while_its_executor_warms_up() -> None:
    """A refused SuperNode exits at once; the wrapper must exit with its code then, not once the forkserver has
    preloaded torch & co. (on a busy machine that took longer than a site's start-up deadline)."""
    script = (
        "import sys, time\n"
        "from medtwin.experiments import warm_clientapp\n"
        "class NeverReady:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        time.sleep(600)\n"
        "warm_clientapp.WarmWorkerExecutor = NeverReady\n"
        "warm_clientapp.main(['--runtime-api-address', '127.0.0.1:9', '--', sys.executable, '-c', 'raise SystemExit(3)', '--isolation', 'process'])\n"
    )
    wrapper = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wrapper.wait(timeout=120) == 3  # the guard against a hang, not a timing goal
    finally:
        if wrapper.poll() is None:
            os.kill(wrapper.pid, signal.SIGKILL)
            wrapper.wait()


def test_a_command_without_process_isolation_is_refused() -> None:
    from medtwin.experiments.warm_clientapp import main

    with pytest.raises(SystemExit) as exit_:
        main(["--runtime-api-address", "127.0.0.1:9", "--", "flower-supernode", "--isolation", "subprocess"])
    assert exit_.value.code == 2


def test_each_fab_is_installed_once_per_site(tmp_path: Path) -> None:
    from medtwin.experiments.site_worker import install_each_fab_once

    installs: list[bytes] = []

    def flower_install(fab: bytes, install_dir=None, skip_prompt=False) -> Path:  # Flower's install_from_fab's contract
        installs.append(fab)
        path = tmp_path / "apps" / f"app-{len(installs)}"
        path.mkdir(parents=True)
        return path

    install = install_each_fab_once(flower_install, tmp_path / "marks")
    first = install(b"fab one", skip_prompt=True)
    assert install(b"fab one", skip_prompt=True) == first and installs == [b"fab one"]  # the second process skips the unzip
    assert install(b"fab two", skip_prompt=True) != first and installs == [b"fab one", b"fab two"]  # other bytes: installed
    first.rmdir()  # the installed app was removed: install again rather than trust the mark
    install(b"fab one", skip_prompt=True)
    assert installs == [b"fab one", b"fab two", b"fab one"]
