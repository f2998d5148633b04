"""Shared unit-test fixtures: the userspace engine in-process, with a fake host edge.

Why here: the engine's command handler (:class:`bsd_ovpn.engine.commands.Engine`)
reaches the OS only through its :class:`~bsd_ovpn.engine.commands.Host`, so
tests swap in :class:`FakeHost` (no tun devices, no steering program, no
routing table; sockets are still inspected for real) and need no root.
Several test files drive it (the command handler, the daemon and its
transport, the low-level CLI); one copy keeps them testing the same thing.

Fixtures
--------
``engine_clock``   a settable clock (``.t``, starts at 1000.0) for Engine and data planes
``fake_host``      a :class:`FakeHost` whose data planes use ``engine_clock``
``engine_daemon``  an :class:`~bsd_ovpn.engine.daemon.EngineDaemon` serving an Engine on
                   a FakeHost (real clock) from a thread, on a UNIX socket in a short
                   temporary directory; an :class:`InProcessEngine` (``.path``,
                   ``.host``, ``.daemon``).  Teardown stops it and checks the socket
                   file is gone.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from bsd_ovpn.engine.commands import Engine, SocketInfo, inspect_socket
from bsd_ovpn.engine.daemon import EngineDaemon
from bsd_ovpn.engine.dataplane import PythonDataPlane

#: What ``FakeHost.select_source`` answers unless ``source_error`` is set.
FAKE_SOURCE6 = bytes.fromhex("20010db8000000000000000000000063")     # 2001:db8::63


class FakeClock:
    """``time.monotonic`` stand-in; tests move ``t``."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeHost:
    """The engine's host edge without tun devices, steering or routes.

    Records what the engine asks of the OS: ``links``, ``up``, ``hooked``
    (name -> the fd given to hook_socket), ``hooked_ident`` (name -> the
    socket's (st_dev, st_ino), read during the call: the daemon closes
    received descriptors after each request), ``hook_log``, ``steering``.
    ``source_error`` / ``hook_error`` make select_source / hook_socket fail
    with that errno; ``routes`` (name -> list) is what gateway_routes returns.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock
        self.links: set[str] = set()
        self.up: set[str] = set()
        self.hooked: dict[str, int] = {}
        self.hooked_ident: dict[str, tuple[int, int]] = {}
        self.hook_log: list[tuple[str, str]] = []
        self.steering: dict[str, list[int]] = {}
        self.routes: dict[str, list] = {}
        self.source = FAKE_SOURCE6
        self.source_error: int | None = None
        self.hook_error: int | None = None

    def inspect_socket(self, fd: int) -> SocketInfo:
        return inspect_socket(fd)

    def select_source(self, remote: tuple) -> bytes:
        if self.source_error:
            raise OSError(self.source_error, "no route")
        return self.source

    def create_link(self, name: str) -> str:
        self.links.add(name)
        return name

    def destroy_link(self, name: str) -> None:
        self.links.discard(name)

    def rename_link(self, name: str, new: str) -> None:
        self.links.discard(name)
        self.links.add(new)

    def set_link_up(self, name: str) -> None:
        self.up.add(name)

    def link_is_up(self, name: str) -> bool:
        return name in self.up

    def link_exists(self, name: str) -> bool:
        return name in self.links

    def make_dataplane(self, name: str) -> PythonDataPlane:
        return PythonDataPlane(clock=self.clock) if self.clock else PythonDataPlane()

    def hook_socket(self, name: str, fd: int, dp: object) -> None:
        if self.hook_error:
            raise OSError(self.hook_error, "hook failed")
        self.hooked[name] = fd
        self.hooked_ident[name] = inspect_socket(fd).ident
        self.hook_log.append(("hook", name))

    def unhook_socket(self, name: str, dp: object) -> None:
        self.hooked.pop(name, None)
        self.hooked_ident.pop(name, None)
        self.hook_log.append(("unhook", name))

    def set_steering(self, name: str, ids: list[int]) -> None:
        self.steering[name] = list(ids)

    def gateway_routes(self, name: str) -> list:
        return list(self.routes.get(name, []))


class PairHost(FakeHost):
    """FakeHost whose interfaces carry packets: a socketpair per link stands in for the tun.

    The data plane (``kind`` "python" or "fast") attaches to the real UDP socket
    and to ``tuns[name][0]``; a test writes IP packets into ``tuns[name][1]``
    as the tun's reader would, and reads what the peer's traffic decrypts to.
    """

    def __init__(self, kind: str = "python", clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.kind = kind
        self.tuns: dict[str, tuple[socket.socket, socket.socket]] = {}
        self.dataplanes: list = []

    def create_link(self, name: str) -> str:
        self.tuns[name] = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return super().create_link(name)

    def destroy_link(self, name: str) -> None:
        for s in self.tuns.pop(name, ()):
            s.close()
        super().destroy_link(name)

    def rename_link(self, name: str, new: str) -> None:
        self.tuns[new] = self.tuns.pop(name)
        super().rename_link(name, new)

    def make_dataplane(self, name: str):
        if self.kind == "fast":
            from bsd_ovpn.engine.fastpath import FastDataPlane
            dp = FastDataPlane()
        else:
            dp = super().make_dataplane(name)
        self.dataplanes.append(dp)
        return dp

    def hook_socket(self, name: str, fd: int, dp) -> None:
        super().hook_socket(name, fd, dp)
        dp.attach(fd, self.tuns[name][0].fileno())

    def unhook_socket(self, name: str, dp) -> None:
        dp.detach()
        super().unhook_socket(name, dp)

    def close(self) -> None:
        for dp in self.dataplanes:
            dp.detach()
            close = getattr(dp, "close", None)
            if close is not None:
                close()
        for name in list(self.tuns):
            for s in self.tuns.pop(name):
                s.close()


@dataclass
class InProcessEngine:
    daemon: EngineDaemon
    host: FakeHost
    path: str


@pytest.fixture
def engine_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_host(engine_clock: FakeClock) -> FakeHost:
    return FakeHost(engine_clock)


@pytest.fixture
def engine_daemon() -> Iterator[InProcessEngine]:
    # AF_UNIX paths are limited to ~108 bytes: a short directory, not tmp_path
    workdir = tempfile.mkdtemp(prefix="eng")
    path = os.path.join(workdir, "engine.sock")
    host = FakeHost()
    daemon = EngineDaemon(path, engine=Engine(host))
    thread = threading.Thread(target=daemon.serve_forever, name="engine-daemon", daemon=True)
    thread.start()
    try:
        yield InProcessEngine(daemon, host, path)
        daemon.stop()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the engine daemon did not stop"
        assert not os.path.exists(path), "the engine daemon left its socket file"
    finally:
        daemon.stop()
        thread.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)
