"""The load generator against a real stock OpenVPN 2.6 server (N = 20).

bench/scale.py's figures are only worth something if every simulated client
really is a client: it must finish the handshake, receive a PUSH_REPLY with
its own peer-id, idle on keepalives the server accepts (the server's pings
must decrypt with the client's keys), survive a rekey of all clients at once
and leave with EXIT.  The stock server is the judge: its status file must list
every client, and after the EXITs none.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from bsd_ovpn.loadgen import ClientSpec, LoadGenerator, LoadPlan, phase_result
from bsd_ovpn.proto.keyfile import StaticKey
from bsd_ovpn.proto.tls import TLSConfig
from bsd_ovpn.proto.wrap import TLSCrypt
from bsd_ovpn.testbed.stockovpn import OvpnConfig

pytestmark = [pytest.mark.netns, pytest.mark.openvpn, pytest.mark.slow]

N = 20
SERVER, CLIENT = "192.0.2.1", "192.0.2.2"
SOURCES = [CLIENT, "192.0.2.20", "192.0.2.21", "192.0.2.22"]


def _status_clients(path: Path) -> int:
    try:
        return sum(1 for ln in path.read_text().splitlines() if ln.startswith("CLIENT_LIST,"))
    except OSError:
        return -1


def _wait_status(path: Path, want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    got = _status_clients(path)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = _status_clients(path)
    return got


def test_twenty_clients_against_stock_server(lab: Any, pki: Any, wrap_keys: Any,
                                             stock_openvpn: Any, tmp_path: Path) -> None:
    srv, cli = lab.host("server"), lab.host("client")
    _, cif = lab.link(srv, cli, f"{SERVER}/24", f"{CLIENT}/24")
    for a in SOURCES[1:]:
        cli.add_address(cif, f"{a}/24")
    status = tmp_path / "status.txt"
    cfg = OvpnConfig.server(pki, wrap_keys, wrap="tls-crypt", local=SERVER,
                            data_ciphers="AES-256-GCM", keepalive=(1, 5), verb=1,
                            status=status,
                            extra=("max-clients 2000", "connect-freq-initial 100000 1"))
    server = stock_openvpn(srv, cfg, "scale-server")
    server.wait_ready(30)

    key = StaticKey.load(wrap_keys.tls_crypt)
    specs = [ClientSpec(TLSConfig(ca=pki.ca_pem, cert=c.cert_pem, key=c.key_pem,
                                  remote_cert_tls="server"), SOURCES[i % len(SOURCES)])
             for i, c in enumerate(pki.clients(N, prefix="lg"))]
    plan = LoadPlan(remote=(SERVER, 1194), clients=specs,
                    wrap_factory=lambda: TLSCrypt(key, server=False))
    with LoadGenerator(plan, workers=2, netns=f"/run/netns/{cli.ident}") as gen:
        res = gen.connect(timeout=60)
        recs = gen.records
        # -- every client connected, with its own peer-id from the PUSH_REPLY
        assert res.all_done and res.failed == 0, (res.summary(), server.log_tail())
        peer_ids = [r.peer_id for r in recs]
        assert None not in peer_ids and len(set(peer_ids)) == N, peer_ids
        for r in recs:
            assert f"peer-id {r.peer_id}" in r.pushed, r.pushed
            assert "cipher AES-256-GCM" in r.pushed, r.pushed
        # the sources were really spread over the addresses we added
        assert {r.local[0] for r in recs} == set(SOURCES)
        assert len({r.local for r in recs}) == N
        # -- the figures are sane: latencies inside the phase, percentiles ordered
        assert len(res.latencies) == N
        assert all(0 < x <= res.wall + 1e-6 for x in res.latencies)
        assert 0 < res.p50 <= res.p99 <= max(res.latencies) < 60
        assert math.isclose(res.rate, N / res.wall)
        assert res.wall < 60
        assert phase_result("connect", recs).p99 == res.p99
        # -- the server agrees
        assert _wait_status(status, N, 5) == N, server.log_tail()

        # -- idling: keepalives both ways (ping 1 s pushed), server pings decrypt
        recs = gen.idle(2.5)
        assert all(r.failed is None for r in recs), [r.failed for r in recs if r.failed]
        assert all(r.pings_sent >= 1 for r in recs), [r.pings_sent for r in recs]
        assert all(r.data_received >= 1 for r in recs), [r.data_received for r in recs]
        assert all(r.data_errors == 0 for r in recs), \
            [(r.data_errors, r.last_data_error) for r in recs if r.data_errors]
        early = [(r.index, r.early_data, r.early_data_at - r.started, r.connected - r.started)
                 for r in recs if r.early_data]
        print("data before keys (index, count, at, connected):", early)

        # -- rekey all at once: every client gets key_id 1, none dropped,
        #    and the server's pings arrive on the new key
        rk = gen.rekey_all(timeout=60)
        assert rk.all_done and rk.failed == 0, (rk.summary(), server.log_tail())
        assert all(r.rekey_key_id == 1 for r in gen.records)
        recs = gen.idle(2.5)
        assert all(r.failed is None for r in recs), [r.failed for r in recs if r.failed]
        assert all(r.new_key_data >= 1 for r in recs), [r.new_key_data for r in recs]
        assert _status_clients(status) == N

        # -- EXIT: the stock server frees every slot at once
        gen.close(linger=2.0)
    assert _wait_status(status, 0, 20) == 0, server.log_tail()
    assert "TLS Error" not in server.log, server.log_tail()

