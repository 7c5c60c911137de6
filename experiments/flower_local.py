"""Run medtwin through Flower's own `flwr run .` on a local simulated federation, offline.

`flwr run .` against the built-in `:local:` connection auto-starts a detached SuperLink that
installs app dependencies with `uv sync` (network, GBs of CUDA wheels) and keeps running. Here
medtwin starts its own simulation SuperLink instead — 127.0.0.1, a free port, runtime dependency
installation disabled — points a project-local FLWR_HOME at it, submits the app with the
composed config as the run proposal in `run_config` (after standing in for the admin, key steward
and hospitals: identities, site files, approvals — as `medtwin run` does), waits for the run to finish, and stops every process the
SuperLink spawned (SuperExec, flwr-simulation, Ray) by PID.

    python -m medtwin.experiments.flower_local federation=quick task=breast_cancer
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import tomli_w

from medtwin.core.config import compose_config
from medtwin.core.errors import MedtwinError
from medtwin.core.rundir import atomic_write_text
from medtwin.client.app import SITES_DIR_ENV
from medtwin.core.runconfig import CONFIG_YAML_KEY
from medtwin.server.app import MANIFEST_KEY, PUBLIC_CONTEXT_KEY, make_run_id

__all__ = ["FlowerRunError", "LocalFlowerFederation", "ProcessId", "ProcessTree", "main", "run_with_flwr"]

logger = logging.getLogger("medtwin.flower_local")

CONNECTION_NAME = "medtwin-local"
APP_DIR = Path(__file__).resolve().parents[1]  # the source checkout holding pyproject.toml
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_DEDUP_LOGS": "0",
    # Ray's GCS, raylet and workers otherwise listen on every interface; with this off Ray takes
    # 127.0.0.1 as the node address and binds there (a single-node simulation needs nothing else)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")


class FlowerRunError(MedtwinError):
    """The `flwr run` path failed: SuperLink start, submission, the run itself, or cleanup."""


@dataclass(frozen=True)
class ProcessId:
    """A process as seen once: the PID plus its start time (clock ticks), so a reused PID is never mistaken for it."""

    pid: int
    start_ticks: int
    name: str

    def is_alive(self) -> bool:
        stat = _read_stat(self.pid)
        return stat is not None and stat.start_ticks == self.start_ticks and stat.state not in ("Z", "X")


@dataclass(frozen=True)
class _Stat:
    name: str
    state: str
    ppid: int
    pgid: int
    start_ticks: int


def _read_stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    return _Stat(name=name, state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]), start_ticks=int(fields[19]))


class ProcessTree:
    """Everything descended from one Popen (started with start_new_session=True), tracked by PID.

    Flower detaches the SuperExec into its own session and Ray hangs off flwr-simulation, so the
    Popen's process group alone is not enough: a background thread records every descendant (and
    every member of a process group led by one) while it is alive, and `stop()` signals each
    recorded PID whose start time still matches.
    """

    def __init__(self, root: subprocess.Popen, *, scan_interval_s: float = 0.5) -> None:
        self.root = root
        self._seen: dict[int, ProcessId] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._signalled: set[int] = set()
        self.scan()
        self._watcher = threading.Thread(
            target=self._watch, args=(scan_interval_s,), name=f"pids-{root.pid}", daemon=True
        )
        self._watcher.start()

    @property
    def seen(self) -> tuple[ProcessId, ...]:
        with self._lock:
            return tuple(self._seen.values())

    def scan(self) -> None:
        stats: dict[int, _Stat] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _read_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = stat
        with self._lock:
            if self.root.pid in stats and self.root.pid not in self._seen:
                root = stats[self.root.pid]
                self._seen[self.root.pid] = ProcessId(self.root.pid, root.start_ticks, root.name)
            # only live recorded processes can adopt: a dead one's PID may belong to a stranger now
            owners = {
                pid for pid, known in self._seen.items() if pid in stats and stats[pid].start_ticks == known.start_ticks
            }
            for pid in owners:  # seen between fork and exec it bore its parent's name: keep the one it runs as
                if stats[pid].name != self._seen[pid].name:
                    self._seen[pid] = ProcessId(pid, stats[pid].start_ticks, stats[pid].name)
            changed = True
            while changed:
                changed = False
                for pid, stat in stats.items():
                    if pid not in self._seen and (stat.ppid in owners or stat.pgid in owners):
                        self._seen[pid] = ProcessId(pid, stat.start_ticks, stat.name)
                        owners.add(pid)
                        changed = True

    def _watch(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            self.scan()

    def stop(self, *, grace_s: float = 10.0) -> list[ProcessId]:
        """SIGTERM the root's group and every recorded live process, SIGKILL after grace_s; return survivors."""
        self.scan()
        self._stopped.set()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._alive():
            time.sleep(0.1)
            self.scan()
            self._signal_all(signal.SIGTERM, only_new=True)
        if self._alive():
            self._signal_all(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self._alive():
                time.sleep(0.1)
        try:
            self.root.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        return self._alive()

    def _alive(self) -> list[ProcessId]:
        return [process for process in self.seen if process.is_alive()]

    def _signal_all(self, signum: signal.Signals, *, only_new: bool = False) -> None:
        targets = [process for process in self._alive() if not (only_new and process.pid in self._signalled)]
        if not targets:
            return
        if self.root.poll() is None:  # alive, so its group (pgid == pid, start_new_session=True) is still ours
            os.killpg(self.root.pid, signum)
        for process in targets:
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass
        self._signalled.update(process.pid for process in targets)


class LocalFlowerFederation:
    """A private simulation SuperLink on 127.0.0.1 plus a FLWR_HOME whose default connection points at it.

    Use as a context manager; leaving it stops the SuperLink and everything it spawned, by PID.
    """

    def __init__(
        self,
        *,
        flwr_home: Path,
        app_dir: Path = APP_DIR,
        startup_timeout_s: float = 30.0,
        echo: bool = False,
    ) -> None:
        self.flwr_home = Path(flwr_home).resolve()
        self.sites_dir = self.flwr_home / "sites"
        self.app_dir = Path(app_dir).resolve()
        self.startup_timeout_s = startup_timeout_s
        self.echo = echo
        self.bin_dir = _venv_bin_dir()
        self.port = 0
        self._superlink: ProcessTree | None = None
        self._cli_trees: list[ProcessTree] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalFlowerFederation:
        if not (self.app_dir / "pyproject.toml").is_file():
            raise FlowerRunError(
                f"no pyproject.toml in the app directory {self.app_dir}; `flwr run .` needs the medtwin source "
                "checkout (pass app_dir=<repo root>)"
            )
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = _free_local_port()
        log_file = (self.flwr_home / "superlink.log").open("ab")
        command = [
            str(self.bin_dir / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--isolation", "subprocess",
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # no --database: state in memory, one fresh SuperLink per federation
        process = subprocess.Popen(
            command, cwd=self.flwr_home, env=self.environment(), stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log_file.close()
        self._superlink = ProcessTree(process)
        try:
            self._wait_until_healthy(process)
            self._write_flower_config()
        except BaseException:
            self.close()
            raise
        logger.info("SuperLink pid %d on 127.0.0.1:%d, FLWR_HOME %s", process.pid, self.port, self.flwr_home)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process this federation started (CLI calls, SuperLink and its descendants)."""
        started = time.monotonic()
        survivors: list[ProcessId] = []
        for tree in [*self._cli_trees, *([self._superlink] if self._superlink else [])]:
            survivors += tree.stop()
        logger.info("stopped %d processes in %.1f s", len(self.started_processes), time.monotonic() - started)
        if survivors:
            raise FlowerRunError(f"processes still alive after SIGKILL: {survivors}; stop them by PID")

    @property
    def started_processes(self) -> tuple[ProcessId, ...]:
        """Every process seen under this federation (SuperLink, SuperExec, flwr-simulation, Ray, CLI)."""
        trees = [*self._cli_trees, *([self._superlink] if self._superlink else [])]
        return tuple(process for tree in trees for process in tree.seen)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OFFLINE_ENVIRONMENT)
        env["FLWR_HOME"] = str(self.flwr_home)
        env[SITES_DIR_ENV] = str(self.sites_dir)  # Flower's simulated nodes know only their partition id
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])  # superexec/flwr-simulation by name
        return env

    # -- one run -----------------------------------------------------------------------------

    def run(
        self,
        overrides: Sequence[str],
        *,
        runs_dir: Path,
        num_supernodes: int,
        timeout_s: float,
        ray_num_cpus: int = 2,
        client_num_cpus: int = 1,
    ) -> Path:
        """Submit the app with `flwr run . --stream`, wait for it, and return the run directory."""
        if self._superlink is None:
            raise FlowerRunError("LocalFlowerFederation.run() called outside `with LocalFlowerFederation(...)`")
        runs_dir = Path(runs_dir).resolve()
        overrides = _complete_overrides(list(overrides), runs_dir=runs_dir)
        run_dir = runs_dir / _override_value(overrides, "run_id")
        run_config_file = self.flwr_home / f"run-config-{run_dir.name}.toml"
        atomic_write_text(run_config_file, tomli_w.dumps(self.prepare_run(overrides)))
        federation_config = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={client_num_cpus} "
            f"client-resources-num-gpus=0.0 init-args-num-cpus={ray_num_cpus} init-args-num-gpus=0"
        )
        command = [
            str(self.bin_dir / "flwr"), "run", ".", CONNECTION_NAME,
            "--run-config", str(run_config_file),
            "--federation-config", federation_config,
            "--stream",
        ]
        pyproject = self.app_dir / "pyproject.toml"
        pyproject_before = pyproject.read_bytes()
        log_path = self.flwr_home / f"flwr-run-{run_dir.name}.log"
        logger.info("flwr run . %s (%d sites) -> %s", " ".join(overrides), num_supernodes, run_dir)
        output = self._call_cli(command, log_path=log_path, timeout_s=timeout_s)
        if pyproject.read_bytes() != pyproject_before:
            raise FlowerRunError(
                f"`flwr run` rewrote {pyproject} (legacy [tool.flwr.federations] migration?); "
                "inspect it with `git diff pyproject.toml` and restore it — medtwin keeps connections in FLWR_HOME"
            )
        started = _STARTED_RUN.search(output)
        if started is None:
            raise FlowerRunError(f"`flwr run` did not start a run; its output ({log_path}):\n{_tail(output)}")
        status, details = self._run_status(int(started.group(1)))
        if status != "finished:completed":
            raise FlowerRunError(
                f"Flower run {started.group(1)} ended with status {status!r} ({details}); "
                f"run log {log_path}, SuperLink log {self.flwr_home / 'superlink.log'}:\n{_tail(output)}"
            )
        if not (run_dir / "summary.json").is_file():
            raise FlowerRunError(f"run completed but {run_dir / 'summary.json'} is missing; see {log_path}")
        return run_dir

    def prepare_run(self, overrides: list[str]) -> dict[str, str]:
        """Stand in for admin, key steward and hospitals (site files under FLWR_HOME/sites, approvals);
        returns the run_config: the proposal every site parses, and the coordinator's public files."""
        from .simulate import connect_chains, prepare_parties

        config = compose_config(overrides)
        parties = prepare_parties(config, site_files_folder=self.sites_dir)
        connect_chains(config, parties)  # chain=anvil|rpc: admin registers the sites, each approves the run
        coordinator = parties.federation.coordinator
        return {
            CONFIG_YAML_KEY: parties.proposal_text,
            MANIFEST_KEY: coordinator.manifest_path,
            PUBLIC_CONTEXT_KEY: coordinator.public_context_path,
        }

    # -- helpers -----------------------------------------------------------------------------

    def _call_cli(self, command: list[str], *, log_path: Path, timeout_s: float) -> str:
        process = subprocess.Popen(
            command, cwd=self.app_dir, env=self.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
        )
        tree = ProcessTree(process)
        self._cli_trees.append(tree)
        lines: list[str] = []

        def pump() -> None:
            assert process.stdout is not None
            with log_path.open("a") as log_file:
                for line in process.stdout:
                    lines.append(line)
                    log_file.write(line)
                    if self.echo:
                        sys.stdout.write(line)

        reader = threading.Thread(target=pump, name="flwr-cli-output", daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            tree.stop()
            raise FlowerRunError(
                f"`{' '.join(command[1:3])}` did not finish within timeout_s={timeout_s:.0f}; "
                f"raise timeout_s or see {log_path}:\n{_tail(''.join(lines))}"
            ) from error
        finally:
            reader.join(timeout=5.0)
        tree.stop()
        return "".join(lines)

    def _run_status(self, run_id: int) -> tuple[str, str]:
        command = [str(self.bin_dir / "flwr"), "ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"]
        completed = subprocess.run(
            command, cwd=self.flwr_home, env=self.environment(), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, check=False,
        )
        try:
            payload = json.loads(completed.stdout)
            run = payload["runs"][0]
            return str(run["status"]), str(run.get("status-details", ""))
        except (ValueError, KeyError, IndexError) as error:
            raise FlowerRunError(
                f"`flwr ls --run-id {run_id}` gave no status (exit {completed.returncode}):\n"
                f"{_tail(completed.stdout + completed.stderr)}"
            ) from error

    def _wait_until_healthy(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FlowerRunError(
                    f"flower-superlink exited with code {process.returncode} on port {self.port}; "
                    f"see {self.flwr_home / 'superlink.log'}"
                )
            try:
                with urllib.request.urlopen(url, timeout=0.5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise FlowerRunError(
            f"flower-superlink not healthy at {url} within startup_timeout_s={self.startup_timeout_s:.0f}; "
            f"see {self.flwr_home / 'superlink.log'}"
        )

    def _write_flower_config(self) -> None:
        config = {
            "superlink": {
                "default": CONNECTION_NAME,
                CONNECTION_NAME: {"address": f"127.0.0.1:{self.port}", "insecure": True},
            }
        }
        path = self.flwr_home / "config.toml"
        atomic_write_text(path, tomli_w.dumps(config))


def run_with_flwr(
    overrides: list[str],
    *,
    runs_dir: Path,
    flwr_home: Path,
    num_supernodes: int,
    timeout_s: float,
    echo: bool = False,
) -> Path:
    """One `flwr run .` on a fresh private SuperLink; returns the run directory. Everything started is stopped."""
    with LocalFlowerFederation(flwr_home=flwr_home, echo=echo) as federation:
        return federation.run(overrides, runs_dir=runs_dir, num_supernodes=num_supernodes, timeout_s=timeout_s)


def _complete_overrides(overrides: list[str], *, runs_dir: Path) -> list[str]:
    """Pin what the ServerApp must not decide alone: where to write, which run id, no live display."""
    keys = {_override_key(item) for item in overrides}
    if "runs_dir" in keys:
        raise FlowerRunError("pass the runs directory as runs_dir=..., not as a `runs_dir=` override")
    extra = [f"runs_dir={runs_dir}"]
    if "progress" not in keys:
        extra.append("progress=false")
    if "baselines.enabled" not in keys:
        extra.append("baselines.enabled=false")  # the ServerApp path computes no baselines
    completed = overrides + extra
    config = compose_config(completed)  # fail here, with Hydra's message, rather than inside the SuperLink
    if "run_id" not in keys:
        completed.append(f"run_id={make_run_id(config)}")
    return completed


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _override_value(overrides: list[str], key: str) -> str:
    return next(item.split("=", 1)[1] for item in reversed(overrides) if _override_key(item) == key)


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _venv_bin_dir() -> Path:
    bin_dir = Path(sys.executable).parent  # not resolved: the venv's bin, not the base interpreter's
    commands = ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation")
    missing = [name for name in commands if not (bin_dir / name).exists()]
    if missing:
        raise FlowerRunError(
            f"{missing} not found beside {sys.executable}; install with `pip install 'flwr[simulation]==1.41.0'`"
        )
    return bin_dir


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation=quick task=breast_cancer")
    parser.add_argument("--flwr-home", type=Path, default=APP_DIR / ".flwr", help="FLWR_HOME (default: <repo>/.flwr)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = [item for item in args.overrides if _override_key(item) != "runs_dir"]
    config = compose_config(args.overrides)
    try:
        run_dir = run_with_flwr(
            overrides,
            runs_dir=Path(config.runs_dir),
            flwr_home=args.flwr_home,
            num_supernodes=config.task.num_sites,
            timeout_s=args.timeout_s,
            echo=True,
        )
    except MedtwinError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
