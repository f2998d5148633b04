"""The walkthrough's config files, run for real, with stock OpenVPN 2.6 on the other side.

README.rst tells users that its office.conf files are ordinary
OpenVPN 2.6 configs that ``ovpnctl server`` / ``ovpnctl client`` run and that
stock peers interoperate.  Both directions are run here with the files taken
verbatim from the document -- only the status file's path is moved into the
test directory -- in two hosts that have the document's addresses.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bsd_ovpn.testbed.stockovpn import StockOpenVPN

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "README.rst"
STATUS_LINE = "status /var/log/openvpn/office-status.log 10"


def _code_blocks() -> list[str]:
    text = DOC.read_text()
    out = []
    for m in re.finditer(r"^( *)\.\. code-block:: text\n\n((?:\1   .*\n|\n)+)", text, re.M):
        indent = len(m.group(1)) + 4
        out.append("".join(ln[indent:] + "\n" for ln in m.group(2).splitlines()).strip() + "\n")
    return out


def doc_configs(tmp: Path) -> tuple[str, str, str]:
    blocks = _code_blocks()
    [server] = [b for b in blocks if "ovpnctl server -c" in b.splitlines()[0]]
    [client] = [b for b in blocks if "ovpnctl client -c" in b.splitlines()[0]]
    [ccd] = [b for b in blocks if b.startswith("ifconfig-push")]
    assert STATUS_LINE in server
    server = server.replace(STATUS_LINE, f"status {tmp / 'office-status.log'} 1")
    if sys.platform.startswith("freebsd"):
        server = server.replace("group nogroup", "group nobody")
    return server, client, ccd


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody can traverse (pytest's tmp dirs are root-only), as
    /etc/openvpn/server is: the walkthrough's server drops to nobody and then reads ccd/."""
    d = Path(tempfile.mkdtemp(prefix="bovpn-walk-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def server_material(pki, d: Path, ccd: str) -> None:
    from bsd_ovpn.proto import keyfile

    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.ca_path, d / "ca.crt")
    cred = pki.server("server")
    shutil.copy(cred.cert_path, d / "server.crt")
    shutil.copy(cred.key_path, d / "server.key")
    (d / "tc.key").write_text(keyfile.genkey("tls-crypt"))
    (d / "tc.key").chmod(0o600)
    (d / "ccd").mkdir(exist_ok=True)
    (d / "ccd" / "alice").write_text(ccd)


def client_material(pki, d: Path, server_dir: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.ca_path, d / "ca.crt")
    cred = pki.client("alice")
    shutil.copy(cred.cert_path, d / "alice.crt")
    shutil.copy(cred.key_path, d / "alice.key")
    shutil.copy(server_dir / "tc.key", d / "tc.key")


def check_tunnel(two) -> None:
    assert two.client.ping("198.51.100.1", count=2, timeout=15)
    assert two.server.ping("198.51.100.10", count=1, timeout=10)      # the ccd address
    assert two.client.ping("2001:db8:100::1", count=1, timeout=10)
    routes = two.client.ip("route", "show").stdout
    routes6 = two.client.ip("-6", "route", "show").stdout
    assert "192.0.2.128/25" in routes, routes                          # pushed LAN route
    assert "2001:db8:200::/64" in routes6, routes6


def test_doc_server_with_stock_client(two_hosts, pki, ovpnctl, public_dir: Path,
                                      tmp_path: Path) -> None:
    two = two_hosts
    server, client, ccd = doc_configs(public_dir)
    ovpnctl.workdir = public_dir            # the config, its key files and ccd/ live here
    server_material(pki, ovpnctl.workdir, ccd)
    srv = ovpnctl.server(two.server, server, name="office")
    srv.wait_ready(30)
    cdir = tmp_path / "alice"
    client_material(pki, cdir, ovpnctl.workdir)
    peer = StockOpenVPN(two.client, client, cdir, "office").start()
    try:
        peer.wait_ready(30)
        check_tunnel(two)
        [c] = srv.clients()
        assert c["common_name"] == "alice" and c["vpn_ipv4"] == "198.51.100.10"
        assert srv.status()["max_clients"] == 200
    finally:
        peer.stop()
    assert "dropped privileges" in srv.log                            # user nobody / group


def test_doc_client_with_stock_server(two_hosts, pki, ovpnctl, tmp_path: Path) -> None:
    two = two_hosts
    server, client, ccd = doc_configs(tmp_path)
    sdir = tmp_path / "server"
    server_material(pki, sdir, ccd)
    stock = StockOpenVPN(two.server, server, sdir, "office").start()
    try:
        stock.wait_ready(30)
        client_material(pki, ovpnctl.workdir, sdir)
        ours = ovpnctl.client(two.client, client, name="office")
        ours.wait_ready(30)
        check_tunnel(two)
        [s] = ours.clients()
        assert s["vpn_ipv4"] == "198.51.100.10"
        assert ours.stop() == 0
    finally:
        stock.stop()
