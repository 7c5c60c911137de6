"""`free_port` never hands one port out twice in a process (the kernel may offer a just-probed port again)."""

from __future__ import annotations

import socket

import pytest

from medtwin.core import ports


class ReusingKernel:
    """A socket whose bind(port 0) is given the ports in `offers`, in order (what a kernel may do)."""

    offers: list[int] = []

    def __init__(self, *_: object) -> None:
        self.port = 0

    def __enter__(self) -> ReusingKernel:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self.port = ReusingKernel.offers.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_offered_again_is_not_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_HANDED_OUT", set())
    monkeypatch.setattr(ports.socket, "socket", ReusingKernel)
    ReusingKernel.offers = [40001, 40001, 40001, 40002]
    assert [ports.free_port(), ports.free_port()] == [40001, 40002]  # two chains started one after the other
    ReusingKernel.offers = [40001, 40003]
    assert ports.free_port("0.0.0.0") == 40003  # all addresses: the same port would clash with 127.0.0.1's


def test_it_gives_up_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_HANDED_OUT", {40001})
    monkeypatch.setattr(ports.socket, "socket", ReusingKernel)
    ReusingKernel.offers = [40001] * 64
    with pytest.raises(OSError, match="64 tries"):
        ports.free_port()


def test_real_ports_are_bindable_and_distinct() -> None:
    chosen = [ports.free_port() for _ in range(20)]
    assert len(set(chosen)) == 20
    with socket.socket() as server:
        server.bind(("127.0.0.1", chosen[-1]))  # free when chosen
