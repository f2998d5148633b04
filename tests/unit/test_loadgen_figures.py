"""bsd_ovpn.loadgen without a network: plan checks and the figures' arithmetic.

The end-to-end proof (real clients against stock OpenVPN) is
tests/netns/test_loadgen.py; here the aggregation that turns per-client
timestamps into the benchmark's numbers is pinned down exactly.
"""
from __future__ import annotations

import math

import pytest

from bsd_ovpn.errors import ValidationError
from bsd_ovpn.loadgen import ClientRecord, ClientSpec, LoadGenerator, LoadPlan, phase_result
from bsd_ovpn.proto.tls import TLSConfig

SPEC = ClientSpec(TLSConfig(ca=b""), "192.0.2.2")


def _plan(**kw: object) -> LoadPlan:
    base: dict[str, object] = {"remote": ("192.0.2.1", 1194), "clients": [SPEC],
                               "wrap_factory": object}
    base.update(kw)
    return LoadPlan(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, match", [
    ({"clients": []}, "clients"),
    ({"remote": ("192.0.2.1", 0)}, "port"),
    ({"start_rate": 0}, "start_rate"),
    ({"start_rate": float("inf")}, "start_rate"),
    ({"hand_window": 0}, "hand_window"),
])
def test_plan_rejects(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        _plan(**kw).validate()


def test_workers_bounded_by_clients() -> None:
    with pytest.raises(ValidationError, match="workers"):
        LoadGenerator(_plan(), workers=2)
    with pytest.raises(ValidationError, match="workers"):
        LoadGenerator(_plan(), workers=0)


def test_connect_phase_figures() -> None:
    # 100 clients started at t=10.0 .. 10.99, each taking (i+1) ms; one failed
    recs = []
    for i in range(100):
        r = ClientRecord(i, started=10.0 + i / 100, connected=10.0 + i / 100 + (i + 1) / 1000)
        recs.append(r)
    recs[7].connected = None
    recs[7].failed = "hand-window: TLS key negotiation failed"
    res = phase_result("connect", recs)
    assert res.total == 100 and res.done == 99 and res.failed == 1 and not res.all_done
    assert res.failures == {"hand-window": 1}
    assert res.t0 == 10.0
    assert math.isclose(res.wall, 0.99 + 0.1)
    assert math.isclose(res.rate, 99 / 1.09)
    # nearest rank: p50 of 99 values = the 50th smallest; p99 = the 99th (the max)
    lat = sorted(x.connected - x.started for x in recs if x.connected)
    assert res.p50 == lat[49] and res.p99 == lat[98] == max(lat)
    assert math.isclose(res.p50, 0.051)


def test_rekey_phase_uses_rekey_stamps() -> None:
    recs = [ClientRecord(0, started=1.0, connected=2.0, rekey_started=5.0, rekey_done=5.25),
            ClientRecord(1, started=1.0, connected=2.0, rekey_started=5.0, rekey_done=None)]
    res = phase_result("rekey", recs)
    assert res.done == 1 and res.latencies == [0.25] and res.wall == 0.25
    with pytest.raises(ValidationError):
        phase_result("idle", recs)


def test_empty_phase_is_nan_not_a_crash() -> None:
    res = phase_result("connect", [ClientRecord(0)])
    assert res.done == 0 and math.isnan(res.wall) and math.isnan(res.p99)
    assert "0/1" in res.summary()
