"""Fixtures of the jail-tests scenarios (on top of bsd_ovpn.testbed.fixtures).

``pair`` is one server host and one client host joined by one cable, built
once per test module (scenarios that do not change the topology share it):

* IPv4 192.0.2.1/24 (server), alias 192.0.2.3/24 (multihome), 192.0.2.2/24 (client);
* IPv6 2001:db8:2::1/64, alias ::3 (server), ::2 (client);
* link-local fe80::a (server), fe80::b (client).

``scenario`` starts servers/clients of either kind (ours or stock openvpn)
for one test and stops them afterwards.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bsd_ovpn.testbed.daemons import OvpnctlFactory  # noqa: E402
from bsd_ovpn.testbed.fixtures import StockFactory  # noqa: E402
from bsd_ovpn.testbed.hosts import Host, Lab  # noqa: E402
from bsd_ovpn.testbed.pki import PKI  # noqa: E402
from bsd_ovpn.testbed.stockovpn import WrapKeys  # noqa: E402

from scenario import (  # noqa: E402
    CLIENT_IP, CLIENT_IP6, CLIENT_LL, SERVER_ALIAS, SERVER_ALIAS6, SERVER_IP, SERVER_IP6,
    SERVER_LL, Scenario,
)


@dataclass(frozen=True)
class Pair:
    lab: Lab
    server: Host
    client: Host
    server_if: str
    client_if: str


def build_pair(lab: Lab) -> Pair:
    server, client = lab.host("server"), lab.host("client")
    s_if, c_if = lab.link(server, client,
                          [f"{SERVER_IP}/24", f"{SERVER_IP6}/64", f"{SERVER_LL}/64"],
                          [f"{CLIENT_IP}/24", f"{CLIENT_IP6}/64", f"{CLIENT_LL}/64"])
    # aliases after the primaries, so the primaries stay the default source
    server.add_address(s_if, f"{SERVER_ALIAS}/24")
    server.add_address(s_if, f"{SERVER_ALIAS6}/64")
    return Pair(lab, server, client, s_if, c_if)


@pytest.fixture(scope="module")
def pair(_testbed_stale_cleanup: None) -> Iterator[Pair]:
    """Server + client hosts shared by one module's scenarios."""
    lab = Lab()
    try:
        yield build_pair(lab)
    finally:
        lab.close()


@pytest.fixture
def fresh_pair(lab: Lab) -> Pair:
    """The same topology for one test only (scenarios that move addresses)."""
    return build_pair(lab)


@pytest.fixture
def scenario(pki: PKI, wrap_keys: WrapKeys, stock_openvpn: StockFactory,
             ovpnctl: OvpnctlFactory, tmp_path: Path) -> Scenario:
    return Scenario(pki, wrap_keys, stock_openvpn, ovpnctl, tmp_path)
