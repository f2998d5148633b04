"""A stopping server takes no new sessions, not even from a known client's address.

A client that got RESTART reconnects at once; while the server lingers for the
other clients' acks it must not answer that reset (jail-tests' server-restart
scenario: the answered handshake died with the server and the client waited out
its hand-window)."""
from __future__ import annotations

from bsd_ovpn.proto.packet import Opcode

from tests.unit.test_daemon_glue import CLIENT_ADDR, ServerNet, files  # noqa: F401 - fixture


def test_stopping_server_ignores_a_new_session_from_a_known_address(files) -> None:  # noqa: F811
    n = ServerNet(files)
    n.connect()
    old, _ = n.clients.pop(CLIENT_ADDR)
    n.d.begin_shutdown(n.clock.t)            # RESTART queued to the (now silent) old client
    resets_before = n.d.endpoint.cookie_resets_sent
    n.add_client(CLIENT_ADDR)                # the client's new session, same address
    n.out.clear()
    n.step()
    assert n.d.endpoint.cookie_resets_sent == resets_before
    assert not any(d[0] >> 3 == Opcode.P_CONTROL_HARD_RESET_SERVER_V2 for d, _a in n.out)
    assert n.d.endpoint.session_by_peer_id(0) is not None      # the old one still lingers
    # a server that is not stopping answers such a reset (the check above is not vacuous)
    m = ServerNet(files)
    m.connect()
    m.clients.pop(CLIENT_ADDR)
    before = m.d.endpoint.cookie_resets_sent
    m.add_client(CLIENT_ADDR)
    m.step()
    assert m.d.endpoint.cookie_resets_sent == before + 1
