"""``username-as-common-name``: after auth-user-pass-verify accepts, the username is
the client's common name for the client-config-dir lookup, status and kill.

Reuses test_daemon_glue's in-memory server (ServerDaemon on a recording kernel,
a real client Session); the client certificate's CN is "alice".
"""
from __future__ import annotations

import time

import pytest

from bsd_ovpn.ifovpn import Command as C
from bsd_ovpn.proto import events as ev

from tests.unit.test_daemon_glue import ServerNet, files, last, stats_reply  # noqa: F401 - fixture


def _connect(n: ServerNet) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n.advance(0.5)
        if any(isinstance(e, (ev.KeysReady, ev.AuthFailed)) for e in n.c_events):
            return
        time.sleep(0.02)


@pytest.mark.parametrize("as_cn", [True, False])
def test_username_as_common_name(files, as_cn: bool) -> None:  # noqa: F811
    d = files["dir"]
    ccd = d / f"ccd-ucn-{as_cn}"
    ccd.mkdir(exist_ok=True)
    (ccd / "bob").write_text("ifconfig-push 198.51.100.60 255.255.255.0\n")
    (ccd / "alice").write_text("ifconfig-push 198.51.100.70 255.255.255.0\n")
    script = d / "verify-bob.sh"
    script.write_text('#!/bin/sh\n[ "$(sed -n 1p "$1")" = bob ]\n')
    script.chmod(0o755)
    extra = (f"script-security 2\nauth-user-pass-verify {script} via-file\n"
             f"client-config-dir {ccd}\n" + ("username-as-common-name\n" if as_cn else ""))
    n = ServerNet(files, extra, username="bob", password="pw")
    _connect(n)
    assert any(isinstance(e, ev.KeysReady) for e in n.c_events), n.c_events
    want_cn, want_ip = ("bob", "198.51.100.60") if as_cn else ("alice", "198.51.100.70")
    assert bytes(last(n.tr, C.OVPN_NEW_PEER)["vpn_ipv4"]) == bytes(
        int(x) for x in want_ip.split("."))
    n.tr.script(C.OVPN_GET_PEER_STATS, stats_reply())
    [c] = n.d.status().clients
    assert (c.common_name, c.username, c.vpn_ipv4) == (want_cn, "bob", want_ip)
    assert n.d.kill(want_cn, n.clock.t) == [c.peer_id]
