"""pytest fixtures for test hosts (network namespaces / vnet jails), PKI and stock peers.

Loaded by the top-level conftest.py for tests/ and jail-tests/ alike, so
every tier builds its hosts the same way.  All fixtures tear down in
``finally`` blocks, so a failing test still leaves no namespace, jail or
openvpn process behind; when a test fails, the logs of the stock peers it
started are attached to its report ("openvpn server (server) log" sections).

Fixtures:

``pki``            session: :class:`~bsd_ovpn.testbed.pki.PKI` in a tmp dir
``wrap_keys``      session: :class:`~bsd_ovpn.testbed.stockovpn.WrapKeys` (openvpn --genkey)
``lab``            function: a :class:`~bsd_ovpn.testbed.hosts.Lab`
``two_hosts``      function: :class:`TwoHosts`: server/client linked on 192.0.2.0/24 + 2001:db8:2::/64
``stock_openvpn``  function: :class:`StockFactory`; ``.server(host, **opts)``, ``.client(host, remote=…)``
``iperf``          function: :class:`~bsd_ovpn.testbed.iperf.Iperf` runner
``ovpn_engines``   module: :class:`~bsd_ovpn.testbed.daemons.Engines` (per-host data channel)
``ovpnctl``        function: :class:`~bsd_ovpn.testbed.daemons.OvpnctlFactory`;
                   ``.server(host, config)``, ``.client(host, config)`` run our daemons
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from bsd_ovpn.testbed.daemons import Engines, OvpnctlFactory
from bsd_ovpn.testbed.hosts import Host, Lab, cleanup_stale
from bsd_ovpn.testbed.iperf import Iperf
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.testbed.stockovpn import (
    OvpnConfig, StockOpenVPN, WrapKeys, log_sections,
)

#: Outer-link addresses of ``two_hosts`` (documentation ranges only).
SERVER_IP, CLIENT_IP = "192.0.2.1", "192.0.2.2"
SERVER_IP6, CLIENT_IP6 = "2001:db8:2::1", "2001:db8:2::2"

_PEERS_KEY = pytest.StashKey[list]()
_DAEMONS_KEY = pytest.StashKey[OvpnctlFactory]()


@dataclass(frozen=True)
class TwoHosts:
    """Two hosts joined by one cable: the usual server/client topology."""

    lab: Lab
    server: Host
    client: Host
    server_if: str
    client_if: str
    server_ip: str = SERVER_IP
    client_ip: str = CLIENT_IP
    server_ip6: str = SERVER_IP6
    client_ip6: str = CLIENT_IP6


class StockFactory:
    """Starts stock openvpn peers for one test and stops them all afterwards."""

    def __init__(self, pki: PKI, keys: WrapKeys, workdir: Path, peers: list[StockOpenVPN]) -> None:
        self.pki = pki
        self.keys = keys
        self.workdir = workdir
        self.peers = peers

    def __call__(self, host: Host, config: OvpnConfig | str, name: str) -> StockOpenVPN:
        """Start openvpn in ``host`` with a ready config (OvpnConfig or text)."""
        peer = StockOpenVPN(host, config, self.workdir, name)
        self.peers.append(peer)
        return peer.start()

    def server(self, host: Host, *, name: str = "server", **opts: Any) -> StockOpenVPN:
        """A stock server (``OvpnConfig.server`` options: wrap=, subnet6=, local=, …)."""
        return self(host, OvpnConfig.server(self.pki, self.keys, **opts), name)

    def client(self, host: Host, *, remote: str, name: str = "client", **opts: Any) -> StockOpenVPN:
        """A stock client of ``remote`` (``OvpnConfig.client`` options)."""
        return self(host, OvpnConfig.client(self.pki, self.keys, remote=remote, **opts), name)

    def stop_all(self) -> None:
        errors = []
        for peer in reversed(self.peers):
            try:
                peer.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{peer.name}: {exc}")
        if errors:
            raise RuntimeError("could not stop stock openvpn peers: " + "; ".join(errors))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the logs of a failed test's stock peers to its report."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    peers = item.stash.get(_PEERS_KEY, None)
    if rep.failed and peers:
        for title, text in log_sections(peers):
            rep.sections.append((f"{title} ({rep.when})", text))
    ours = item.stash.get(_DAEMONS_KEY, None)
    if rep.failed and ours is not None:
        for title, text in ours.log_sections():
            rep.sections.append((f"{title} ({rep.when})", text))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """One throwaway PKI for the session (certificates are made on demand)."""
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def wrap_keys(tmp_path_factory: pytest.TempPathFactory) -> WrapKeys:
    """tls-auth / tls-crypt / tls-crypt-v2 keys made by ``openvpn --genkey`` on first use."""
    return WrapKeys(tmp_path_factory.mktemp("wrapkeys"))


@pytest.fixture(scope="session")
def _testbed_stale_cleanup() -> None:
    """Once per session: remove hosts of earlier runs that were killed (pid gone)."""
    cleanup_stale()


@pytest.fixture
def lab(_testbed_stale_cleanup: None) -> Iterator[Lab]:
    """A Lab whose hosts, links and processes are removed after the test."""
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def two_hosts(lab: Lab) -> TwoHosts:
    """"server" and "client" hosts on 192.0.2.1/24 + 2001:db8:2::1/64 and .2 / ::2."""
    server, client = lab.host("server"), lab.host("client")
    s_if, c_if = lab.link(server, client, [f"{SERVER_IP}/24", f"{SERVER_IP6}/64"],
                          [f"{CLIENT_IP}/24", f"{CLIENT_IP6}/64"])
    return TwoHosts(lab, server, client, s_if, c_if)


@pytest.fixture
def stock_openvpn(request: pytest.FixtureRequest, pki: PKI, wrap_keys: WrapKeys,
                  tmp_path: Path) -> Iterator[StockFactory]:
    """Factory for stock openvpn peers; all are SIGTERMed (then SIGKILLed) after the test.

    Their config and log files live in ``tmp_path / "openvpn"``; a failing
    test gets the log tails in its report.  If the lab is torn down first,
    its hosts kill the processes anyway.
    """
    peers: list[StockOpenVPN] = []
    request.node.stash[_PEERS_KEY] = peers
    factory = StockFactory(pki, wrap_keys, tmp_path / "openvpn", peers)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def iperf(tmp_path: Path) -> Iterator[Iperf]:
    """iperf3 runner; stops every server it started after the test."""
    runner = Iperf()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="module")
def ovpn_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    """The data channel per host, shared by a module's tests: engine daemons on Linux
    (one per host, started on first use), the kernel's if_ovpn on FreeBSD."""
    engines = Engines()
    try:
        yield engines
    finally:
        engines.close()


@pytest.fixture
def ovpnctl(request: pytest.FixtureRequest, ovpn_engines: Engines,
            tmp_path: Path) -> Iterator[OvpnctlFactory]:
    """Factory for our daemons (``ovpnctl server|client -c FILE``) in test hosts.

    All are SIGTERMed after the test (a daemon that ignores SIGTERM fails the
    teardown); a failing test gets their logs and their engines' logs.
    """
    factory = OvpnctlFactory(ovpn_engines, tmp_path / "ovpnctl")
    request.node.stash[_DAEMONS_KEY] = factory
    try:
        yield factory
    finally:
        factory.stop_all()
