"""Data-channel ciphers (FreeBSD's chacha and gcm_128, plus AES-256-GCM) and key
rotation under traffic.

* Each AEAD cipher, negotiated with a peer offering only that cipher, carries
  traffic both ways and is what the status reports.
* Rotation: ``reneg-sec 4`` while iperf3 pushes UDP through the tunnel for 9 s: at
  least two new keys are installed (NEW_KEY in slot secondary, SWAP_KEYS) and the
  traffic barely notices (loss under 2 %).
"""
from __future__ import annotations

from typing import Any

import pytest

from scenario import (
    OURS, SERVER_IP, SIDES_ALL, SIDES_BOTH_WAYS, VPN_CLIENT4, VPN_SERVER4, Scenario,
    assert_pings, assert_tunnel_counts,
)

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]

CIPHERS = [pytest.param("CHACHA20-POLY1305", id="chacha"),
           pytest.param("AES-128-GCM", id="gcm_128"),
           pytest.param("AES-256-GCM", id="gcm_256")]


@pytest.mark.parametrize("sides", SIDES_BOTH_WAYS)
@pytest.mark.parametrize("cipher", CIPHERS)
def test_cipher(pair: Any, scenario: Scenario, cipher: str, sides: tuple[str, str]) -> None:
    t = scenario.tunnel(sides, pair.server, pair.client,
                        server_opts=dict(local=SERVER_IP, data_ciphers=cipher),
                        client_opts=dict(data_ciphers=cipher))
    assert_pings(pair.client, [VPN_SERVER4], count=3)
    assert_pings(pair.client, [VPN_SERVER4], count=2, size=1300)
    assert_pings(pair.server, [VPN_CLIENT4], count=2)
    c = t.server_view()
    assert c["cipher"] == cipher, c
    if t.ours_client is not None:
        [srv] = t.client_view()["clients"]
        assert srv["cipher"] == cipher, srv
    assert_tunnel_counts(t)


@pytest.mark.iperf3
@pytest.mark.slow
@pytest.mark.parametrize("sides", SIDES_ALL)
def test_key_rotation_under_traffic(pair: Any, scenario: Scenario, iperf: Any,
                                    sides: tuple[str, str]) -> None:
    """reneg-sec 4 on our side(s) (the other side: 3600, so ours initiates)."""
    fast, slow = ("reneg-sec 4",), ("reneg-sec 3600",)
    t = scenario.tunnel(sides, pair.server, pair.client,
                        server_opts=dict(local=SERVER_IP,
                                         extra=fast if sides[0] == OURS else slow),
                        client_opts=dict(extra=fast if sides[1] == OURS else slow))
    assert_pings(pair.client, [VPN_SERVER4], count=1)
    res = iperf.run(pair.server, pair.client, VPN_SERVER4, seconds=9, udp=True,
                    bitrate="20M")
    print(f"{sides}: UDP 20M during rotation: received {res.received_mbps:.1f} Mbit/s, "
          f"lost {res.lost_percent} %")
    assert res.lost_percent is not None and res.lost_percent < 2.0, res
    assert res.received_bps > 15e6, res
    # key ids count 0, 1, 2, ...: two rotations -> >= 2 on every side of ours.  The TX
    # key moves to a new key some time after its handshake (lame-duck transition), so
    # the last rotation of the iperf run may still be on its way: poll briefly.
    if t.ours_server is not None:
        c = t.server_view(timeout=10, predicate=lambda c: c["key_id"] >= 2)
        assert c["cipher"] == "AES-256-GCM"
    if t.ours_client is not None:
        t.ours_client.wait_status(lambda s: s["clients"] and s["clients"][0]["key_id"] >= 2,
                                  timeout=10, what="key_id >= 2")
    assert_pings(pair.client, [VPN_SERVER4], count=3, why="after the rotations")
    assert_pings(pair.server, [VPN_CLIENT4], count=1)
