"""``kill -9`` of ``ovpnctl client``, then a restart of the same config.

Why: the client's if_ovpn interface outlives the process (if_ovpn.md §5); the
restarted client must find and remove it (daemon/stale.py owner records)
instead of failing on the taken `dev` name or keeping two tunnels.  The
server-side twin is tests/netns/test_faults.py::test_kill_9_then_restart_...
"""
from __future__ import annotations

import pytest

from bsd_ovpn.testbed.daemons import OvpnctlFactory
from bsd_ovpn.testbed.fixtures import TwoHosts
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.testbed.stockovpn import OvpnConfig, WrapKeys

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SERVER_VPN = "198.51.100.1"


@pytest.mark.slow
def test_kill_9_of_the_client_then_restart(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                           ovpnctl: OvpnctlFactory) -> None:
    two = two_hosts
    before = sorted(i for i in two.client.interfaces() if i != "lo")
    srv = ovpnctl.server(two.server, OvpnConfig.server(pki, wrap_keys, local=two.server_ip,
                                                       topology="subnet", keepalive=(1, 5)))
    srv.wait_ready(30)
    cfg = OvpnConfig.client(pki, wrap_keys, remote=two.server_ip, cert=pki.client("phoenix"))
    first = ovpnctl.client(two.client, cfg, name="first")
    first.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=2, timeout=10)
    stale = ovpnctl.engines.interfaces(two.client)
    assert list(stale) == [cfg.dev], stale
    first.kill()                                        # SIGKILL: no cleanup
    assert ovpnctl.engines.interfaces(two.client) == stale      # left behind
    again = ovpnctl.client(two.client, cfg, name="second")
    again.wait_for(r"removed stale interface " + cfg.dev, 30)
    again.wait_ready(40)
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), again.log_tail()
    ifs = ovpnctl.engines.interfaces(two.client)
    assert list(ifs) == [cfg.dev] and len(ifs[cfg.dev]) == 1, ifs
    assert again.count("Traceback") == 0, again.log_tail()
    assert again.stop() == 0
    assert ovpnctl.engines.interfaces(two.client) == {}
    assert sorted(i for i in two.client.interfaces() if i != "lo") == before
    assert srv.stop() == 0
