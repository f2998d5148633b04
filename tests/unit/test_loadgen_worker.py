"""bsd_ovpn.loadgen worker internals that keep the instrument cheap, over loopback UDP.

The generator shares the CPUs with the server it measures, so per-client work
that is not on the wire is done before the connect phase (settings and
control-channel wraps) and the cyclic GC is kept out of the burst.  These
tests pin that down; tests/netns/test_loadgen.py proves the clients still
connect to a real stock OpenVPN server.
"""
from __future__ import annotations

import gc
import multiprocessing
import socket
from typing import Any

import pytest

from bsd_ovpn import loadgen
from bsd_ovpn.loadgen import ClientSpec, LoadPlan
from bsd_ovpn.proto.keyfile import StaticKey
from bsd_ovpn.proto.packet import Opcode
from bsd_ovpn.proto.tls import TLSConfig
from bsd_ovpn.proto.wrap import TLSCrypt
from bsd_ovpn.testbed.pki import PKI


@pytest.fixture()
def server_sock() -> Any:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5.0)
    yield s
    s.close()


def _plan(pki: PKI, port: int, n: int, made: list[TLSCrypt]) -> LoadPlan:
    cli = pki.client()
    tls = TLSConfig(ca=pki.ca_pem, cert=cli.cert_pem, key=cli.key_pem, remote_cert_tls="server")
    key = StaticKey.generate()

    def factory() -> TLSCrypt:
        w = TLSCrypt(key, server=False)
        made.append(w)
        return w

    return LoadPlan(remote=("127.0.0.1", port), clients=[ClientSpec(tls, "127.0.0.1")] * n,
                    wrap_factory=factory)


def test_settings_and_wraps_are_built_before_the_connect_phase(pki: PKI,
                                                                server_sock: Any) -> None:
    made: list[TLSCrypt] = []
    plan = _plan(pki, server_sock.getsockname()[1], 3, made)
    w = loadgen._Worker(plan, range(3))
    try:
        w.open_sockets()
        assert len(made) == 3                      # one wrap per client, all during setup
        assert all(c.settings is not None and not c.settings.server for c in w.clients)
        prebuilt = [c.wrap for c in w.clients]
        assert prebuilt == made
        now = w.clock()
        for c in w.clients:
            w._start(c, now)
        assert len(made) == 3                      # starting built nothing more
        for c, wrap in zip(w.clients, prebuilt):
            assert c.session is not None and c.session.wrap is wrap
            assert c.settings is None and c.wrap is None    # handed over, not kept twice
            assert c.rec.started == now
        # each client's hard reset reached the "server", from its own socket
        sources = set()
        for _ in range(3):
            data, addr = server_sock.recvfrom(2048)
            assert data[0] >> 3 == Opcode.P_CONTROL_HARD_RESET_CLIENT_V2
            sources.add(addr)
        assert sources == {c.rec.local for c in w.clients}
    finally:
        w.close()


def _child_gc_state(conn: Any) -> None:
    loadgen._quiet_gc()
    conn.send((gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()))
    conn.close()


def test_quiet_gc_freezes_setup_and_raises_the_young_threshold() -> None:
    # in a forked child: the settings are process-wide and must not leak into pytest
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_gc_state, args=(child,))
    p.start()
    child.close()
    try:
        assert parent.poll(30)
        (t0, t1, t2), frozen, enabled = parent.recv()
    finally:
        p.join(10)
    assert enabled                                  # cycles are still collected, only later
    assert t0 == loadgen._GC_THRESHOLD0 and t0 > 700
    assert (t1, t2) == gc.get_threshold()[1:]
    assert frozen > 1000                           # the imported modules and setup objects
