"""Unit tests of the scenario helpers (no root): the status readers must not hide a
wrong address or a missing client, or every scenario's assertion would be hollow."""
from __future__ import annotations

from pathlib import Path

import pytest

from scenario import addr_host, at_host, drop_directive, stock_status_clients


@pytest.mark.parametrize("real, ip", [
    ("192.0.2.2:40000", "192.0.2.2"),
    ("[2001:db8:2::2]:1194", "2001:db8:2::2"),
    ("[::ffff:192.0.2.2]:5000", "192.0.2.2"),
    ("::ffff:192.0.2.2:5000", "192.0.2.2"),
    ("[fe80::b%bxyz0a]:1194", "fe80::b"),
    ("[AF_INET]192.0.2.2:1194", "192.0.2.2"),
])
def test_addr_host(real: str, ip: str) -> None:
    assert addr_host(real) == ip
    assert at_host(real, ip)


def test_at_host_rejects_other_addresses() -> None:
    assert not at_host("192.0.2.22:1194", "192.0.2.2")
    assert not at_host("[2001:db8:2::22]:1194", "2001:db8:2::2")
    assert at_host("2001:db8:2::2:1194", "2001:db8:2::2")     # OpenVPN's unbracketed form
    with pytest.raises(ValueError):
        addr_host("not-an-address:1")


def test_stock_status_clients(tmp_path: Path) -> None:
    f = tmp_path / "status"
    f.write_text(
        "TITLE,OpenVPN 2.6.14\nTIME,2026-11-24 19:00:00,1795547000\n"
        "HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,"
        "Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,"
        "Client ID,Peer ID,Data Channel Cipher\n"
        "CLIENT_LIST,alice,192.0.2.2:40000,198.51.100.2,,4116,2950,2026-11-24 19:00:00,"
        "1795547000,UNDEF,0,0,AES-256-GCM\nEND\n")
    [c] = stock_status_clients(f)
    assert c == {"common_name": "alice", "real_address": "192.0.2.2:40000",
                 "vpn_ipv4": "198.51.100.2", "vpn_ipv6": None, "bytes_in": 4116,
                 "bytes_out": 2950, "peer_id": 0, "cipher": "AES-256-GCM"}
    assert stock_status_clients(tmp_path / "missing") == []


def test_drop_directive() -> None:
    text = "server 198.51.100.0 255.255.255.0\nserver-ipv6 2001:db8:100::/64\nlocal 192.0.2.1\n"
    assert drop_directive(text, "server") == "server-ipv6 2001:db8:100::/64\nlocal 192.0.2.1\n"
