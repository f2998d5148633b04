"""A daemon whose data channel is gone ends (status 1) instead of limping on.

if_ovpn state (peers, keys) cannot be rebuilt behind the clients' backs: when
the userspace engine dies or someone removes our interface, the daemon's next
notification drain must say so and stop, so that its supervisor restarts it
from a clean interface.  Ordinary errors (EINVAL, a full queue) stay warnings.
"""
from __future__ import annotations

import errno

import pytest

from bsd_ovpn.daemon.loop import DataChannelLost, IfOvpnPeers
from bsd_ovpn.engine.transport import EngineNotRunning
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.interface import Interface
from bsd_ovpn.transport import RecordingTransport


class _DeadEngine(RecordingTransport):
    def query(self, ifname, command, bufsize):
        raise EngineNotRunning("userspace engine at /tmp/e.sock went away: Broken pipe")


def test_engine_gone_ends_the_daemon():
    peers = IfOvpnPeers(Interface("tun0", _DeadEngine(["tun0"])), sock=None)
    with pytest.raises(DataChannelLost, match="data channel of tun0 is gone.*went away"):
        peers.drain()
    with pytest.raises(DataChannelLost):
        peers.stats()


def test_interface_removed_ends_the_daemon():
    tr = RecordingTransport(["tun0"]).fail(Command.OVPN_GET_PKT, errno.ENXIO)
    with pytest.raises(DataChannelLost, match="interface tun0 is gone"):
        IfOvpnPeers(Interface("tun0", tr), sock=None).drain()


def test_other_errors_stay_warnings(caplog):
    tr = RecordingTransport(["tun0"]).fail(Command.OVPN_GET_PKT, errno.EINVAL)
    assert IfOvpnPeers(Interface("tun0", tr), sock=None).drain() == []
    assert "reading if_ovpn notifications failed" in caplog.text
