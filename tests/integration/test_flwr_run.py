"""Flower's own `flwr run .` path: a private SuperLink, 4 simulated sites, 2 rounds, nothing left running."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from medtwin.experiments.flower_local import APP_DIR, LocalFlowerFederation, ProcessTree

pytestmark = pytest.mark.slow


LOOPBACK_HEX = {"00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # ::1, ::ffff:127.0.0.1


def _listening_sockets(pids: set[int]) -> set[tuple[str, int]]:
    """(hex address from /proc/net/tcp*, port) of every TCP socket in LISTEN state owned by `pids`."""
    inodes: set[int] = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes.update(int(link[8:-1]) for link in links if link.startswith("socket:["))
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A = LISTEN
                address, port = fields[1].split(":")
                found.add((address, int(port, 16)))
    return found


def _is_loopback(address_hex: str) -> bool:
    return (len(address_hex) == 8 and address_hex.endswith("7F")) or address_hex in LOOPBACK_HEX


def _port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_flwr_run_trains_two_rounds_on_four_sites_and_stops_everything(tmp_path: Path) -> None:
    pyproject = APP_DIR / "pyproject.toml"
    pyproject_before = pyproject.read_bytes()
    started = time.monotonic()
    listeners: set[tuple[str, int]] = set()
    with LocalFlowerFederation(flwr_home=tmp_path / "flwr-home") as federation:
        done = threading.Event()

        def sample_listeners() -> None:
            while not done.wait(1.0):
                listeners.update(_listening_sockets({process.pid for process in federation.started_processes}))

        sampler = threading.Thread(target=sample_listeners, daemon=True)
        sampler.start()
        run_dir = federation.run(
            ["federation=quick", "federation.num_rounds=2"],
            runs_dir=tmp_path / "runs",
            num_supernodes=4,
            timeout_s=240,
        )
        port = federation.port
        done.set()
        sampler.join()
    print(f"flwr run path: {time.monotonic() - started:.1f} s including start and stop")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["sites"] == ["cleveland", "hungarian", "switzerland", "va"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(line["participants"]) == 4 for line in lines if line["phase"] == "train")

    processes = federation.started_processes
    names = {process.name for process in processes}
    # the tracking saw the whole chain, so "none alive" below is not vacuous
    assert {"flower-superlin", "flower-superexe", "flwr-simulation", "raylet", "gcs_server"} <= names, names
    assert [process for process in processes if process.is_alive()] == []
    assert not _port_is_open(port)
    # SuperLink, Ray GCS/raylet/workers: every listener was on loopback
    assert len(listeners) >= 3 and any(listen_port == port for _, listen_port in listeners), listeners
    assert [item for item in listeners if not _is_loopback(item[0])] == []
    assert pyproject.read_bytes() == pyproject_before, "flwr run rewrote pyproject.toml"
    config_toml = (tmp_path / "flwr-home" / "config.toml").read_text()
    assert f'address = "127.0.0.1:{port}"' in config_toml and "insecure = true" in config_toml


def test_process_tree_stops_a_detached_grandchild(tmp_path: Path) -> None:
    """The SuperExec is started with start_new_session=True: killing the root's group alone would miss it."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    tree = ProcessTree(root, scan_interval_s=0.1)
    deadline = time.monotonic() + 10
    while len(tree.seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = tree.seen
    assert len(seen) == 2, seen
    grandchild = next(process for process in seen if process.pid != root.pid)
    assert grandchild.is_alive()
    assert tree.stop(grace_s=5.0) == []
    assert not grandchild.is_alive() and root.returncode is not None


def test_process_tree_names_a_process_by_what_it_execs(tmp_path: Path) -> None:
    """Ray forks and then execs raylet: a scan between the two sees the parent's name, a later one must not keep it."""
    root = subprocess.Popen(["bash", "-c", "sleep 0.5; exec sleep 120"], start_new_session=True)
    tree = ProcessTree(root, scan_interval_s=0.1)
    try:
        assert {process.name for process in tree.seen if process.pid == root.pid} == {"bash"}
        deadline = time.monotonic() + 10
        while {process.name for process in tree.seen if process.pid == root.pid} != {"sleep"}:
            assert time.monotonic() < deadline, tree.seen
            time.sleep(0.1)
    finally:
        assert tree.stop(grace_s=5.0) == []


def test_app_bundle_leaves_out_environments_and_run_outputs() -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(APP_DIR)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE // 4, f"FAB is {len(fab)} bytes"
    assert "server/app.py" in names and "client/app.py" in names
    excluded = {".venv", "node_modules", "runs", ".flwr", ".medtwin", "outputs"}
    offending = [name for name in names if name.split("/")[0] in excluded]
    assert offending == []
