"""Free loopback ports for the servers medtwin starts (anvil nodes, SuperLinks, SuperNodes, test servers)."""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port"]

_HANDED_OUT: set[int] = set()  # ports this process chose (on any address: 0.0.0.0 and 127.0.0.1 clash): not bound yet, maybe
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, never one this process handed out before: the kernel may offer a probed port
    again at once, and two servers started one after the other (two chains, several SuperNodes) would clash."""
    with _HANDED_OUT_LOCK:
        for _ in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
                port = int(probe.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise OSError(f"no free port on {host} that this process has not handed out already (64 tries)")
