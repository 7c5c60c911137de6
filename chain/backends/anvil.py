"""Local anvil nodes: find the binary, start one per chain with persistent --state, stop by PID.

Each node keeps, under ``<state_dir>/nodes/``: ``<role>.pid`` (the PID), ``<role>.json`` (port,
chain id, files), ``<role>-state.json`` (anvil's own state dump, reloaded on restart) and
``<role>.log``. The native binary from the npm package is preferred over the node.js wrapper in
node_modules/.bin so that the PID we record is the node itself.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from medtwin.core.ports import free_port

from ..errors import AnvilNotFoundError, ChainSetupError

__all__ = [
    "AnvilNode",
    "find_anvil",
    "free_port",
    "node_is_running",
    "read_node",
    "start_anvil",
    "stop_anvil",
    "wait_for_rpc",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class AnvilNode:
    role: str  # "auth" | "data"
    pid: int
    host: str
    port: int
    chain_id: int
    state_file: str
    log_file: str
    binary: str
    started_at: float

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _npm_platform_package() -> str:
    system = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}.get(platform.system(), platform.system().lower())
    machine = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
    return f"anvil-{system}-{machine}"


def find_anvil(configured: str = "") -> Path:
    """chain.anvil_binary, then $MEDTWIN_ANVIL, then node_modules (repo root, cwd), then PATH."""
    candidates: list[Path] = []
    for explicit in (configured, os.environ.get("MEDTWIN_ANVIL", "")):
        if explicit:
            candidates.append(Path(explicit).expanduser())
    for base in dict.fromkeys((REPO_ROOT, Path.cwd())):
        modules = base / "node_modules"
        candidates.append(modules / "@foundry-rs" / _npm_platform_package() / "bin" / "anvil")
        candidates.append(modules / ".bin" / "anvil")
    on_path = shutil.which("anvil")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise AnvilNotFoundError([str(candidate) for candidate in candidates] + ["PATH"])


def _nodes_dir(state_dir: Path) -> Path:
    path = Path(state_dir) / "nodes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def read_node(state_dir: Path, role: str) -> AnvilNode | None:
    path = Path(state_dir) / "nodes" / f"{role}.json"
    if not path.is_file():
        return None
    try:
        return AnvilNode(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise ChainSetupError(f"{path} is not a valid node record ({error}); delete it and run `medtwin chain up`") from error


def _rpc_chain_id(url: str, *, timeout_s: float) -> int | None:
    try:
        reply = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=timeout_s)
        return int(reply.json()["result"], 16)
    except (requests.exceptions.RequestException, ValueError, KeyError):
        return None


def wait_for_rpc(url: str, *, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> int:
    """Poll eth_chainId until it answers; returns the chain id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chain_id = _rpc_chain_id(url, timeout_s=1.0)
        if chain_id is not None:
            return chain_id
        if process is not None and process.poll() is not None:
            raise ChainSetupError(f"anvil for {url} exited with code {process.returncode} before answering")
        time.sleep(0.05)
    raise ChainSetupError(f"no JSON-RPC answer from {url} within {timeout_s} s (chain.startup_timeout_s)")


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None


def node_is_running(node: AnvilNode) -> bool:
    """The recorded PID is alive and (where /proc exists) is still our anvil on our port."""
    child = _CHILDREN.get(node.pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(node.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = _proc_cmdline(node.pid)
    if cmdline is None:
        return not Path("/proc").is_dir()  # no /proc (macOS): trust the PID; with /proc it just exited
    return any("anvil" in part for part in cmdline[:2]) and str(node.port) in cmdline


def start_anvil(
    *,
    role: str,
    binary: Path,
    host: str,
    port: int,
    chain_id: int,
    state_dir: Path,
    state_interval_s: int = 1,
    startup_timeout_s: float = 30.0,
) -> AnvilNode:
    """Start anvil with --state (reloaded if present), wait until it answers, record its PID."""
    nodes = _nodes_dir(state_dir)
    state_file = nodes / f"{role}-state.json"
    log_file = nodes / f"{role}.log"
    command = [
        str(binary), "--host", host, "--port", str(port), "--chain-id", str(chain_id),
        "--state", str(state_file), "--state-interval", str(state_interval_s),
    ]  # fmt: skip
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _CHILDREN[process.pid] = process
    node = AnvilNode(role, process.pid, host, port, chain_id, str(state_file), str(log_file), str(binary), time.time())
    _atomic_write(nodes / f"{role}.pid", f"{process.pid}\n")
    _atomic_write(nodes / f"{role}.json", json.dumps(asdict(node), indent=1) + "\n")
    try:
        answered = wait_for_rpc(node.url, timeout_s=startup_timeout_s, process=process)
    except ChainSetupError as error:
        stop_anvil(node)
        tail = log_file.read_text(errors="replace")[-2000:]
        raise ChainSetupError(f"{role} chain node failed to start: {error}\nlast log lines ({log_file}):\n{tail}") from error
    if answered != chain_id:
        stop_anvil(node)
        raise ChainSetupError(f"{node.url} answered with chain id {answered}, expected {chain_id} — is another node on port {port}?")
    return node


def _wait_gone(pid: int, timeout_s: float) -> bool:
    child = _CHILDREN.get(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return True
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.05)
    return False


def stop_anvil(node: AnvilNode, *, timeout_s: float = 15.0) -> bool:
    """SIGTERM (anvil writes its state), SIGKILL after `timeout_s`; only if the PID is still ours."""
    stopped = False
    if node_is_running(node):
        os.kill(node.pid, signal.SIGTERM)
        if not _wait_gone(node.pid, timeout_s):
            os.kill(node.pid, signal.SIGKILL)
            _wait_gone(node.pid, 5.0)
        stopped = True
    _CHILDREN.pop(node.pid, None)
    pidfile = Path(node.state_file).parent / f"{node.role}.pid"
    pidfile.unlink(missing_ok=True)
    return stopped
