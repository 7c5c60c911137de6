"""Real parties on Flower's deployment engine: the coordinator's SuperLink and each hospital's SuperNode.

    CoordinatorProcess(admin_dir, state_dir)    flower-superlink with the admin's TLS kit, SuperNode
                                                authentication and a persistent database; registers
                                                every site's SuperNode key from the manifest
    SiteProcess(site_file, "host:port")         flower-supernode with the site kit's CA certificate
                                                and SuperNode key; node_config names only the site file
    submit_run(flwr_home, connection, ...)      `flwr run <app>` against the coordinator -> Flower run id
    wait_for_run(flwr_home, connection, id)     asks the Control API until the run finished

Each party writes a pidfile (`<state>/superlink.pid`, `<site state>/supernode.pid`) recording the
PID and its start time; `stop_recorded_process` stops that process and every descendant by PID
(Flower detaches its SuperExec into a session of its own, so a process group is not enough) —
from the process that started it or from a later `medtwin coordinator stop` / `medtwin site stop`.
Everything listens on 127.0.0.1 unless told otherwise; every misconfiguration found before start
(missing file, free port, unreachable SuperLink, invalid site file) is reported naming the file or
flag, and a SuperNode the SuperLink refuses exits within `max_wait_time_s`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import tomli_w
from cryptography.exceptions import InvalidSignature

from medtwin.core.errors import MedtwinError
from medtwin.core.identity import (
    IdentityError,
    load_coordinator_kit,
    load_manifest,
    load_supernode_auth_public_key,
    supernode_auth_key_path,
)
from medtwin.core.ports import free_port
from medtwin.core.rundir import atomic_write_text

from .flower_local import APP_DIR, OFFLINE_ENVIRONMENT, ProcessId, ProcessTree, _read_stat

__all__ = [
    "COORDINATOR_CONNECTION",
    "CoordinatorProcess",
    "DeploymentError",
    "RunOutcome",
    "SiteProcess",
    "list_supernodes",
    "stop_recorded_process",
    "submit_run",
    "wait_for_run",
]

logger = logging.getLogger("medtwin.deployment")

COORDINATOR_CONNECTION = "medtwin-coordinator"  # the named connection in the coordinator's FLWR_HOME
SUPERLINK_PIDFILE, SUPERNODE_PIDFILE = "superlink.pid", "supernode.pid"
SUPERLINK_LOG, SUPERNODE_LOG = "superlink.log", "supernode.log"
REGISTRY_FILE = "registered-supernodes.json"
COORDINATOR_RECORD = "coordinator.json"  # manifest path + address of a started coordinator
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
_NODE_CONNECTED = re.compile(r"SuperNode ID: (\d+)")
_KEY_IN_USE = "Public key already in use"


# Flower 1.41: a SuperNode heartbeats every 30 s, the SuperLink lists it online for 2 intervals after the last
# one, and refuses to activate a node it lists online — so a SuperNode restarted after a crash waits that out.
SUPERLINK_HEARTBEAT_PATIENCE_S = 60
ACTIVATION_RETRY_S = 5


class DeploymentError(MedtwinError):
    """A party could not be started, reached, registered or stopped; names the file, flag or log and the fix."""


class _ActivationRefused(DeploymentError):
    """The SuperLink refused to activate the SuperNode: an unregistered key, or a node it still lists online."""


# -- processes by PID ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PidRecord:
    """What a pidfile holds: the PID, its start time (so a reused PID is never signalled) and the log."""

    pid: int
    start_ticks: int
    log_path: str
    role: str

    @property
    def process(self) -> ProcessId:
        return ProcessId(self.pid, self.start_ticks, self.role)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.__dict__, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> PidRecord | None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(document["pid"]), int(document["start_ticks"]), str(document["log_path"]), str(document["role"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DeploymentError(f"pidfile {path} is unreadable ({error}); check the process by hand, then delete the file") from error


def _record_of(process: subprocess.Popen, *, log_path: Path, role: str) -> PidRecord:
    stat = _read_stat(process.pid)
    if stat is None:
        raise DeploymentError(f"{role} (pid {process.pid}) exited at once; see {log_path}")
    return PidRecord(process.pid, stat.start_ticks, str(log_path), role)


def _family(root: ProcessId) -> list[ProcessId]:
    """The root (if it is still that process) and every live descendant, by parent PID or process group."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _read_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    if root.pid not in stats or stats[root.pid].start_ticks != root.start_ticks:
        return []
    found = {root.pid: root}
    changed = True
    while changed:
        changed = False
        for pid, stat in stats.items():
            if pid not in found and (stat.ppid in found or stat.pgid in found) and stat.state not in ("Z", "X"):
                found[pid] = ProcessId(pid, stat.start_ticks, stat.name)
                changed = True
    return [process for process in found.values() if process.is_alive()]


def _stop_tree(tree: ProcessTree | None) -> list[ProcessId]:
    """Stop a process tree this process started; returns every process seen in it."""
    if tree is None:
        return []
    stopped = list(tree.seen)
    survivors = tree.stop()
    if survivors:
        raise DeploymentError(f"processes still alive after SIGKILL: {survivors}; stop them by PID")
    return stopped


def stop_recorded_process(pidfile: Path, *, grace_s: float = 10.0) -> list[ProcessId]:
    """SIGTERM the pidfile's process and all its descendants (SIGKILL after grace_s); remove the pidfile.

    Returns the processes that were stopped. A stale pidfile (process gone or PID reused) is removed.
    """
    record = PidRecord.load(pidfile)
    if record is None:
        return []
    seen: dict[int, ProcessId] = {process.pid: process for process in _family(record.process)}
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        deadline, signalled = time.monotonic() + wait_s, set()
        while True:
            for process in _family(record.process):  # children started meanwhile join the list
                seen.setdefault(process.pid, process)
            alive = [process for process in seen.values() if process.is_alive()]
            if not alive or time.monotonic() > deadline:
                break
            for process in alive:
                if process.pid not in signalled:
                    signalled.add(process.pid)
                    try:
                        os.kill(process.pid, signum)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)
        if not alive:
            break
    survivors = [process for process in seen.values() if process.is_alive()]
    if survivors:
        raise DeploymentError(f"processes still alive after SIGKILL: {survivors}; stop them by PID")
    pidfile.unlink(missing_ok=True)
    return list(seen.values())


def _running(pidfile: Path) -> PidRecord | None:
    record = PidRecord.load(pidfile)
    if record is not None and record.process.is_alive():
        return record
    return None


# -- shared helpers ----------------------------------------------------------------------------------


def _bin_dir() -> Path:
    bin_dir = Path(sys.executable).parent
    missing = [name for name in ("flwr", "flower-superlink", "flower-supernode", "flower-superexec") if not (bin_dir / name).exists()]
    if missing:
        raise DeploymentError(f"{missing} not found beside {sys.executable}; install with `pip install 'flwr==1.41.0'`")
    return bin_dir


def _environment(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENVIRONMENT)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(_bin_dir()), env.get("PATH", "")])  # SuperExec, flwr-*app by name
    return env


def check_certificate(path: Path, *, what: str, fix: str, issuer: Path | None = None) -> None:
    """Before any process starts: `path` is a PEM certificate that is valid now (and, with `issuer`, signed
    by that CA). Flower would otherwise fail later with a TLS handshake error that names neither."""
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        raise DeploymentError(f"{what} {path} is not a readable PEM certificate ({error}); {fix}") from error
    now = datetime.now(timezone.utc)
    if now < certificate.not_valid_before_utc:
        raise DeploymentError(f"{what} {path} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock); {fix}")
    if now > certificate.not_valid_after_utc:
        raise DeploymentError(f"{what} {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {fix}")
    if issuer is not None:
        try:
            certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(issuer.read_bytes()))
        except (OSError, ValueError, TypeError, InvalidSignature) as error:
            raise DeploymentError(
                f"{what} {path} is not signed by the federation CA {issuer} ({type(error).__name__}); {fix}"
            ) from error


def _check_port_free(host: str, port: int, *, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as the servers bind: connections of a stopped server lingering in TIME_WAIT do not hold the port, a listener does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as error:
            raise DeploymentError(f"port {port} on {host} ({flag}) is not free ({error.strerror}); choose another {flag}") from error


def _split_address(address: str, *, flag: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"{flag} {address!r} is not host:port (e.g. 127.0.0.1:9092)")
    return host.strip("[]"), int(port)


def _tail(path: Path | str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _require_file(path: Path, *, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DeploymentError(f"{what} {path} is missing; {fix}")
    return path.resolve()


def _run_flwr(arguments: list[str], *, flwr_home: Path, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    command = [str(_bin_dir() / "flwr"), *arguments]
    try:
        return subprocess.run(
            command, cwd=cwd, env=_environment(flwr_home), capture_output=True, text=True, timeout=timeout_s,
            stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise DeploymentError(f"`flwr {' '.join(arguments[:2])}` did not answer within {timeout_s:.0f} s (FLWR_HOME {flwr_home})") from error


def _json_output(completed: subprocess.CompletedProcess, what: str) -> dict:
    start = completed.stdout.find("{")
    try:
        return json.loads(completed.stdout[start:]) if start >= 0 else {}
    except ValueError as error:
        raise DeploymentError(f"`{what}` printed no JSON (exit {completed.returncode}):\n{completed.stdout}{completed.stderr}") from error


# -- the coordinator -----------------------------------------------------------------------------------


class CoordinatorProcess:
    """The coordinator's `flower-superlink`: TLS from the admin's coordinator kit, SuperNode
    authentication, a persistent database in `state_dir`, and every site's SuperNode key registered.

    Flower 1.41 serves the Fleet, Control and Runtime APIs on ONE HTTPS port (`--host`/`--port`); the
    SuperNodes connect to it (`address`) and the FLWR_HOME written here (`flwr_home`, connection
    `COORDINATOR_CONNECTION`) points `flwr run`/`flwr supernode ...` at it, trusting the federation CA.
    """

    def __init__(
        self,
        admin_dir: Path | str,
        state_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 30.0,
        register_sites: bool = True,
    ) -> None:
        self.admin_dir = Path(admin_dir).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.register_sites = register_sites
        self.flwr_home = self.state_dir / "flwr-home"
        self.pidfile = self.state_dir / SUPERLINK_PIDFILE
        self.log_path = self.state_dir / SUPERLINK_LOG
        self.database_path = self.state_dir / "superlink.db"
        self.registered: dict[str, str] = {}  # site id -> Flower node id
        self._tree: ProcessTree | None = None
        self._record: PidRecord | None = None

    @property
    def kit_dir(self) -> Path:
        return self.admin_dir / "coordinator"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._record.pid if self._record else None

    @property
    def connection(self) -> str:
        return COORDINATOR_CONNECTION

    @property
    def manifest_path(self) -> Path:
        return self.kit_dir / "federation.json"

    def __enter__(self) -> CoordinatorProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> CoordinatorProcess:
        """Start the SuperLink, wait until it answers over TLS, write FLWR_HOME, register the sites' keys."""
        try:
            kit = load_coordinator_kit(self.kit_dir)
        except IdentityError as error:
            raise DeploymentError(
                f"--admin-dir {self.admin_dir}: {error}; pass the folder `medtwin provision --out` wrote"
            ) from error
        renew = "the federation admin issues a new coordinator certificate with the federation CA (`medtwin federation init`)"
        check_certificate(kit.ca_cert_path, what="the federation CA certificate", fix=renew)
        check_certificate(kit.tls_cert_path, what="the coordinator's TLS certificate", fix=renew, issuer=kit.ca_cert_path)
        if (running := _running(self.pidfile)) is not None:
            raise DeploymentError(
                f"a SuperLink is already running for --state-dir {self.state_dir} (pid {running.pid}, log {running.log_path}); "
                f"stop it first with `medtwin coordinator stop --state-dir {self.state_dir}`"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        _check_port_free(self.host, self.port, flag="--port")
        command = [
            str(_bin_dir() / "flower-superlink"),
            "--ssl-ca-certfile", str(kit.ca_cert_path.resolve()),
            "--ssl-certfile", str(kit.tls_cert_path.resolve()),
            "--ssl-keyfile", str(kit.tls_key_path.resolve()),
            "--enable-supernode-auth",
            "--database", str(self.database_path),
            "--disable-runtime-dependency-installation",
            "--isolation", "subprocess",
            "--host", self.host,
            "--port", str(self.port),
        ]  # fmt: skip
        started = time.monotonic()
        with self.log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command, cwd=self.state_dir, env=_environment(self.flwr_home), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._tree = ProcessTree(process)
        try:
            self._record = _record_of(process, log_path=self.log_path, role="flower-superlink")
            self._record.save(self.pidfile)
            self._wait_until_healthy(process, kit.ca_cert_path)
            self._write_flower_config(kit.ca_cert_path.resolve())
            # what `medtwin run --federation <state dir>` needs: the coordinator's public manifest and address
            atomic_write_text(
                self.state_dir / COORDINATOR_RECORD,
                json.dumps({"manifest": str(self.manifest_path.resolve()), "address": self.address}, indent=1) + "\n",
            )
            logger.info("SuperLink pid %d on https://%s (%.1f s), log %s", process.pid, self.address, time.monotonic() - started, self.log_path)
            if self.register_sites:
                self.registered = self.register_manifest_sites()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[ProcessId]:
        """Stop the SuperLink and everything it started (SuperExec, ServerApp processes), by PID."""
        stopped = _stop_tree(self._tree)
        self._tree = None
        return stopped + stop_recorded_process(self.pidfile)

    def _wait_until_healthy(self, process: subprocess.Popen, ca_cert: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca_cert))
        url = f"https://{self.address}/health"
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited with code {process.returncode} on {self.address}; see {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as error:
                last_error = str(error)
            time.sleep(0.2)
        raise DeploymentError(
            f"flower-superlink not healthy at {url} within {self.startup_timeout_s:.0f} s ({last_error}); see {self.log_path}"
        )

    def _write_flower_config(self, ca_cert: Path) -> None:
        config = {
            "superlink": {
                "default": COORDINATOR_CONNECTION,
                COORDINATOR_CONNECTION: {"address": self.address, "root-certificates": str(ca_cert)},
            }
        }
        atomic_write_text(self.flwr_home / "config.toml", tomli_w.dumps(config))

    def register_manifest_sites(self, *, timeout_s: float = 60.0) -> dict[str, str]:
        """`flwr supernode register` every manifest site's SuperNode key not yet registered; site id -> node id.

        Keys already registered (the database persists across restarts) are kept; a site without a
        SuperNode key in the manifest (from before SuperNode keys) is skipped with a warning.
        """
        manifest = load_manifest(self.manifest_path)
        registry_path = self.state_dir / REGISTRY_FILE
        registry: dict[str, dict[str, str]] = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
        keys_dir = self.state_dir / "supernode-keys"
        keys_dir.mkdir(exist_ok=True)
        pending = []
        for entry in manifest.sites:
            if entry.supernode_auth_public_key is None:
                logger.warning(
                    "site %r has no supernode_auth_public_key in %s: it cannot connect; ask it for a site-public.json "
                    "made by this medtwin and re-provision", entry.site_id, self.manifest_path,
                )
                continue
            if registry.get(entry.site_id, {}).get("fingerprint") == entry.supernode_auth_key_fingerprint:
                continue
            key_file = keys_dir / f"{entry.site_id}.pub"
            atomic_write_text(key_file, entry.supernode_auth_public_key + "\n")
            pending.append((entry, key_file))

        def register(item: tuple) -> tuple[str, str, str]:
            entry, key_file = item
            completed = _run_flwr(
                ["supernode", "register", str(key_file), COORDINATOR_CONNECTION, "--name", entry.site_id, "--format", "json"],
                flwr_home=self.flwr_home, cwd=self.state_dir, timeout_s=timeout_s,
            )
            answer = _json_output(completed, "flwr supernode register")
            if answer.get("success"):
                return entry.site_id, str(answer["node-id"]), entry.supernode_auth_key_fingerprint
            message = str(answer.get("error-message", completed.stdout + completed.stderr))
            if _KEY_IN_USE in message:  # registered before this registry existed: keep it
                return entry.site_id, "registered-earlier", entry.supernode_auth_key_fingerprint
            raise DeploymentError(f"registering site {entry.site_id!r}'s SuperNode key {key_file} failed: {message.strip()}")

        with ThreadPoolExecutor(max_workers=4) as pool:
            for site_id, node_id, key_fingerprint in pool.map(register, pending):
                registry[site_id] = {"node_id": node_id, "fingerprint": key_fingerprint}
                logger.info("registered site %s as SuperNode %s", site_id, node_id)
        atomic_write_text(registry_path, json.dumps(registry, indent=1, sort_keys=True) + "\n")
        return {site_id: record["node_id"] for site_id, record in registry.items()}


def stop_coordinator(state_dir: Path | str) -> list[ProcessId]:
    """`medtwin coordinator stop`: stop the SuperLink recorded in `state_dir` and its descendants."""
    return stop_recorded_process(Path(state_dir).resolve() / SUPERLINK_PIDFILE)


# -- a site --------------------------------------------------------------------------------------------


class SiteProcess:
    """A hospital's `flower-supernode`: TLS against the federation CA in its kit, its own SuperNode key,
    node_config naming only its site file (the ClientApp reads everything else from it), its own
    Runtime API port. `start()` returns once the SuperLink accepted the node (its log names the node id).
    """

    def __init__(
        self,
        site_file: Path | str,
        superlink_address: str,
        *,
        port: int | None = None,
        max_wait_time_s: float = 30.0,
        max_retries: int = 10,
        startup_timeout_s: float | None = None,
        activation_patience_s: float = SUPERLINK_HEARTBEAT_PATIENCE_S + 10,
    ) -> None:
        self.site_file = Path(site_file).resolve()
        self.activation_patience_s = activation_patience_s  # keep retrying a refused activation this long
        self.superlink_address = superlink_address
        self.port = port
        self.max_wait_time_s = max_wait_time_s
        self.max_retries = max_retries
        self.startup_timeout_s = startup_timeout_s if startup_timeout_s is not None else max_wait_time_s + 30.0
        self.node_id: str | None = None
        self.site_id = ""
        self.state_dir: Path | None = None
        self.kit_dir: Path | None = None
        self._tree: ProcessTree | None = None
        self._record: PidRecord | None = None

    @property
    def pid(self) -> int | None:
        return self._record.pid if self._record else None

    @property
    def pidfile(self) -> Path:
        return self._state_dir() / SUPERNODE_PIDFILE

    @property
    def log_path(self) -> Path:
        return self._state_dir() / SUPERNODE_LOG

    def _state_dir(self) -> Path:
        if self.state_dir is None:
            self._read_site_file()
        assert self.state_dir is not None
        return self.state_dir

    def _read_site_file(self) -> None:
        from medtwin.client.site_file import load_site_file  # the site's own file, read as the ClientApp reads it

        if not self.site_file.is_file():
            raise DeploymentError(f"--site-file {self.site_file} does not exist; write the hospital's site file (README: \"For a hospital: the site file decides\")")
        try:
            site = load_site_file(self.site_file)
        except MedtwinError as error:
            raise DeploymentError(f"--site-file: {error}") from error
        self.site_id, self.kit_dir, self.state_dir = site.site_id, Path(site.kit_dir).resolve(), Path(site.state_dir).resolve()
        if site.data_task == "vitals" and site.data_path is not None:  # the hospital's own streams, checked before start
            from medtwin.core.tasks.vitals.ingest import read_streams

            try:
                read_streams(site.data_path, site_id=site.site_id)
            except MedtwinError as error:
                raise DeploymentError(f"--site-file {self.site_file}, data.vitals.path: {error}") from error

    def __enter__(self) -> SiteProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def check(self) -> tuple[Path, Path]:
        """Everything that can be checked before starting: site file, kit files, SuperLink reachable, port free."""
        self._read_site_file()
        assert self.kit_dir is not None and self.state_dir is not None
        ca_cert = _require_file(
            self.kit_dir / "ca_cert.pem", what=f"the federation CA certificate of site {self.site_id!r}",
            fix=f"join the federation first: `medtwin site join --kit {self.kit_dir} --manifest federation.json`",
        )  # fmt: skip
        check_certificate(
            ca_cert, what=f"the federation CA certificate of site {self.site_id!r}",
            fix=f"install the current federation.json and CA: `medtwin site join --kit {self.kit_dir} --manifest federation.json`",
        )  # fmt: skip
        key_path = supernode_auth_key_path(self.kit_dir)
        try:
            public_key = load_supernode_auth_public_key(self.kit_dir)
        except IdentityError as error:
            raise DeploymentError(
                f"SuperNode key of site {self.site_id!r}: {error} (a kit made before SuperNode keys has none: make a new "
                "kit with `medtwin site init` and send its site-public.json to the admin)"
            ) from error
        try:
            listed = load_manifest(self.kit_dir).site(self.site_id).supernode_auth_public_key
        except IdentityError as error:
            raise DeploymentError(f"site kit {self.kit_dir}: {error}") from error
        if listed != public_key:
            logger.warning(
                "%s is not the SuperNode key the installed manifest lists for %r: the coordinator will refuse it "
                "unless it registered this key by hand", key_path, self.site_id,
            )
        host, port = _split_address(self.superlink_address, flag="--superlink")
        try:
            with socket.create_connection((host, port), timeout=3.0):
                pass
        except OSError as error:
            raise DeploymentError(
                f"cannot reach the SuperLink at --superlink {self.superlink_address} ({error}); is the coordinator "
                "running (`medtwin coordinator start`) and is this its address?"
            ) from error
        if (running := _running(self.pidfile)) is not None:
            raise DeploymentError(
                f"site {self.site_id!r} already runs a SuperNode (pid {running.pid}, log {running.log_path}); "
                f"stop it first with `medtwin site stop --site-file {self.site_file}`"
            )
        if self.port is None:
            self.port = free_port("127.0.0.1")
        _check_port_free("127.0.0.1", self.port, flag="--port")
        return ca_cert, key_path.resolve()

    def executor_command(self) -> list[str]:
        """What runs flower-supernode as its child, plus Flower's SuperExec with the site's warm executor, whose
        worker runs only the site's own ClientApp (warm_clientapp.py); the SuperNode's command follows `--`."""
        return [sys.executable, "-m", "medtwin.experiments.warm_clientapp", "--runtime-api-address", f"127.0.0.1:{self.port}"]

    def start(self) -> SiteProcess:
        ca_cert, key_path = self.check()
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        flwr_home = self.state_dir / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        command = [
            *self.executor_command(), "--",
            sys.executable, "-m", "medtwin.experiments.prompt_flower",  # Flower's flower-supernode, shorter sleeps
            "--root-certificates", str(ca_cert),
            "--superlink", self.superlink_address,
            "--auth-supernode-private-key", str(key_path),
            "--node-config", f'site-file="{self.site_file}"',
            "--isolation", "process",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-wait-time", f"{self.max_wait_time_s:g}",
            "--max-retries", str(self.max_retries),
        ]  # fmt: skip
        started = time.monotonic()
        while True:
            log_offset = self.log_path.stat().st_size if self.log_path.is_file() else 0
            with self.log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    command, cwd=self.state_dir, env=_environment(flwr_home), stdout=log_file, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            self._tree = ProcessTree(process)
            try:
                self._record = _record_of(process, log_path=self.log_path, role="flower-supernode")
                self._record.save(self.pidfile)
                self.node_id = self._wait_until_connected(process, log_offset)
                break
            except _ActivationRefused:
                self.stop()
                if time.monotonic() - started + ACTIVATION_RETRY_S > self.activation_patience_s:
                    raise
                # after an unclean stop the SuperLink lists this node online until its heartbeat expires
                logger.warning(
                    "site %s: the SuperLink refused to activate this SuperNode; if it stopped uncleanly, the SuperLink "
                    "still lists it online for up to %d s — retrying in %d s", self.site_id, SUPERLINK_HEARTBEAT_PATIENCE_S, ACTIVATION_RETRY_S,
                )  # fmt: skip
                time.sleep(ACTIVATION_RETRY_S)
            except BaseException:
                self.stop()
                raise
        logger.info("site %s: SuperNode %s (pid %d) connected in %.1f s", self.site_id, self.node_id, process.pid, time.monotonic() - started)
        return self

    def _wait_until_connected(self, process: subprocess.Popen, log_offset: int) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log_file:
                log_file.seek(log_offset)
                text = log_file.read().decode("utf-8", errors="replace")
            if (connected := _NODE_CONNECTED.search(text)) is not None:
                return connected.group(1)
            if process.poll() is not None:
                refused = "Failed to activate SuperNode" in text or "code: 2004" in text
                hint = (
                    f"the SuperLink refused this SuperNode's key ({supernode_auth_key_path(self.kit_dir or '.')}): the "
                    "coordinator must register it (`medtwin coordinator start` registers every key in the manifest; "
                    "by hand: `flwr supernode register <public key file> <connection>`), or, if this SuperNode stopped "
                    f"uncleanly less than {SUPERLINK_HEARTBEAT_PATIENCE_S} s ago, the SuperLink still lists it online: start it again then"
                    if refused
                    else f"it could not connect to --superlink {self.superlink_address} with --root-certificates "
                    f"{self.kit_dir}/ca_cert.pem (wrong CA, plaintext/TLS mismatch, or the SuperLink is down)"
                )
                raise (_ActivationRefused if refused else DeploymentError)(
                    f"flower-supernode of site {self.site_id!r} exited with code {process.returncode}: {hint}; "
                    f"see {self.log_path}:\n{_tail(self.log_path, 12)}"
                )
            time.sleep(0.2)
        raise DeploymentError(
            f"flower-supernode of site {self.site_id!r} not connected within {self.startup_timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self) -> list[ProcessId]:
        """Stop the SuperNode and everything it started (SuperExec, ClientApp processes), by PID."""
        stopped = _stop_tree(self._tree)
        self._tree = None
        if self.state_dir is not None or self.site_file.is_file():
            stopped += stop_recorded_process(self.pidfile)
        return stopped


def stop_site(site_file: Path | str) -> list[ProcessId]:
    """`medtwin site stop`: stop the SuperNode recorded in the site's state folder and its descendants."""
    return SiteProcess(site_file, "127.0.0.1:0").stop()


# -- runs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed"
    details: str
    elapsed_s: float

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def submit_run(
    flwr_home: Path | str,
    connection: str,
    run_config: Mapping[str, str],
    app_dir: Path | str = APP_DIR,
    *,
    timeout_s: float = 120.0,
) -> int:
    """`flwr run <app_dir> <connection> --run-config <file>`; returns the Flower run id (does not wait)."""
    flwr_home, app_dir = Path(flwr_home).resolve(), Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(f"no pyproject.toml in the app directory {app_dir}; pass the medtwin source checkout")
    bad = sorted(key for key, value in run_config.items() if not isinstance(value, str | int | float | bool))
    if bad:
        raise DeploymentError(f"run_config values must be scalars; {bad} are not")
    run_config_file = flwr_home / f"run-config-{time.time_ns()}.toml"
    atomic_write_text(run_config_file, tomli_w.dumps(dict(run_config)))
    pyproject_before = (app_dir / "pyproject.toml").read_bytes()
    completed = _run_flwr(
        ["run", str(app_dir), connection, "--run-config", str(run_config_file)], flwr_home=flwr_home, cwd=app_dir, timeout_s=timeout_s
    )
    if (app_dir / "pyproject.toml").read_bytes() != pyproject_before:
        raise DeploymentError(f"`flwr run` rewrote {app_dir / 'pyproject.toml'}; inspect it with `git diff pyproject.toml`")
    started = _STARTED_RUN.search(completed.stdout + completed.stderr)
    if started is None:
        raise DeploymentError(
            f"`flwr run` did not start a run (exit {completed.returncode}, FLWR_HOME {flwr_home}, connection {connection}):\n"
            f"{completed.stdout[-3000:]}{completed.stderr[-3000:]}"
        )
    return int(started.group(1))


class RunWatcher:
    """Run statuses from the coordinator's Control API, asked in this process through one client for
    `flwr_home`'s named connection. (`flwr ls` per poll started a Python that imported Flower: ~0.7 CPU
    seconds every 3 s on the machine the federation runs on.)"""

    def __init__(self, flwr_home: Path | str, connection: str) -> None:
        from click import ClickException
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        self.connection = connection
        previous = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(flwr_home)  # where Flower reads the connection and its certificates
        try:
            self._client = init_http_client_from_connection(read_superlink_connection(connection))
        except (ClickException, OSError, ValueError) as error:
            raise DeploymentError(f"no Flower connection {connection!r} in FLWR_HOME {flwr_home}: {error}") from error
        finally:
            if previous is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = previous

    def status(self, run_id: int) -> tuple[str, str]:
        """("finished:completed", details) — `flwr ls`'s status text for run `run_id`."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        try:
            runs = self._client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        except Exception as error:  # noqa: BLE001 - any transport or server error means "no status now"
            raise DeploymentError(f"the SuperLink of connection {self.connection!r} gave no status for run {run_id}: {error}") from error
        if run_id not in runs:
            raise DeploymentError(f"the SuperLink of connection {self.connection!r} has no Flower run {run_id}")
        status = run_from_proto(runs[run_id]).status
        return (f"{status.status}:{status.sub_status}" if status.sub_status else status.status), status.details

    def close(self) -> None:
        self._client.close()


def run_status(flwr_home: Path | str, connection: str, run_id: int) -> tuple[str, str]:
    watcher = RunWatcher(flwr_home, connection)
    try:
        return watcher.status(run_id)
    finally:
        watcher.close()


def wait_for_run(
    flwr_home: Path | str, connection: str, run_id: int, *, timeout_s: float, poll_s: float = 1.0
) -> RunOutcome:
    """Ask the Control API until run `run_id` has finished (any outcome); `DeploymentError` after timeout_s."""
    started = time.monotonic()
    status, details = "", ""
    watcher = RunWatcher(flwr_home, connection)
    try:
        while time.monotonic() - started < timeout_s:
            status, details = watcher.status(run_id)
            if status.startswith("finished"):
                return RunOutcome(run_id, status, details, time.monotonic() - started)
            time.sleep(poll_s)
    finally:
        watcher.close()
    raise DeploymentError(f"Flower run {run_id} still {status!r} after {timeout_s:.0f} s; stop it with `flwr stop {run_id} {connection}`")


def list_supernodes(flwr_home: Path | str, connection: str) -> list[dict[str, str]]:
    """`flwr supernode list --format json`: node id, status (registered/online/offline/...)."""
    completed = _run_flwr(["supernode", "list", connection, "--format", "json"], flwr_home=Path(flwr_home), cwd=Path(flwr_home), timeout_s=60.0)
    answer = _json_output(completed, "flwr supernode list")
    if not answer.get("success"):
        raise DeploymentError(f"`flwr supernode list` failed: {answer.get('error-message', completed.stdout + completed.stderr)}")
    return list(answer["nodes"])
