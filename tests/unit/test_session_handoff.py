"""Sessions after the TLS hand-off: control messages, rekeys, KeyUpdate, close, tampering.

A client Session and a ServerEndpoint in memory (test_session's ``Net``),
both with TLS 1.3 handed off to our record layer once established; the wire
drops and reorders packets so everything also goes through the reliability
layer's retransmissions.
"""
from __future__ import annotations

import dataclasses
import gc
import weakref

from bsd_ovpn.ifovpn import KeySlot
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.packet import ControlPacket, Opcode
from bsd_ovpn.proto.states import KSState
from bsd_ovpn.proto.tls import TLSConfig
from tests.unit.test_session import Net, _kernel, tls  # noqa: F401 - tls is a fixture


def _lossy_reordering() -> object:
    """Drop every 5th datagram; hold every 3rd back until the next one passes it."""
    held: list[bytes] = []

    def wire(i: int, d: bytes) -> list[bytes]:
        if i % 5 == 0:
            return []
        if i % 3 == 0 and not held:
            held.append(d)
            return []
        out = [d, *held]
        held.clear()
        return out
    return wire


def _rekey_slowly(net: Net, *, from_client: bool) -> None:
    """test_session's _rekey with time for retransmissions on the lossy wire."""
    nc, ns = len(net.keys(net.c_events)), len(net.keys(net.s_events))
    (net.client if from_client else net.server_session).renegotiate(net.now)
    net.run(lambda: len(net.keys(net.c_events)) > nc and len(net.keys(net.s_events)) > ns,
            max_time=120)


def _established(net: Net) -> None:
    net.run(net.established)
    net.run(lambda: net.server_session.primary.state is KSState.GENERATED_KEYS
            and net.client.primary.state is KSState.GENERATED_KEYS, max_time=10)


def _infos(net: Net) -> list[str]:
    return [e.text for e in net.c_events if isinstance(e, ev.InfoReceived)]


def test_both_sides_hand_off_and_messages_survive_loss(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    _established(net)
    srv = net.server_session
    assert srv.primary.tls.handed_off and net.client.primary.tls.handed_off
    assert srv.tls_info() == {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    net.to_server = _lossy_reordering()
    net.to_client = _lossy_reordering()
    for i in range(12):                       # more than the send window: queued, then sent
        srv.send_control_message(f"INFO,message {i}")
    net.run(lambda: len(_infos(net)) == 12, max_time=60)
    assert _infos(net) == [f"message {i}" for i in range(12)]
    # client -> server after the hand-off: a repeated push request is answered again
    net.advance(31)
    sent = len([e for e in net.s_events if isinstance(e, ev.PushReplySent)])
    net.client._send_control_message(net.client.primary, "PUSH_REQUEST")   # noqa: SLF001
    net.run(lambda: len([e for e in net.s_events if isinstance(e, ev.PushReplySent)]) > sent,
            max_time=60)
    # and EXIT ends the server's session
    net.client.close(net.now)
    net.run(lambda: net.client.terminated is not None, max_time=30)
    assert any(isinstance(e, ev.ExitReceived) for e in net.s_events)
    assert net.client.terminated.reason == "closed"


def test_key_update_then_messages_both_ways(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls)
    _established(net)
    net.to_server = _lossy_reordering()
    net.to_client = _lossy_reordering()
    srv = net.server_session
    srv.primary.tls.key_update(request=True)  # the client must answer with its own update
    srv.send_control_message("INFO,after key update")
    net.run(lambda: _infos(net) == ["after key update"], max_time=60)
    assert net.client.primary.tls._rl.sequence_numbers[0] == 1   # noqa: SLF001 - new generation
    net.client.primary.tls.key_update()
    net.client.close(net.now)                 # EXIT under the client's third key generation
    net.run(lambda: net.client.terminated is not None, max_time=30)
    assert any(isinstance(e, ev.ExitReceived) for e in net.s_events)


def test_rekeys_after_hand_off_with_loss(tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, client_kw={"reneg_sec": 0, "tran_window": 400},
              server_kw={"reneg_sec": 0, "tran_window": 400})
    _established(net)
    net.to_server = _lossy_reordering()
    net.to_client = _lossy_reordering()
    for from_client in (True, False, True):
        _rekey_slowly(net, from_client=from_client)
        net.run(lambda: net.server_session.primary.state is KSState.GENERATED_KEYS
                and net.client.primary.state is KSState.GENERATED_KEYS, max_time=30)
        for s in (net.client, net.server_session):
            assert s.primary.tls.handed_off and s.lame_duck.tls.handed_off
    net.advance(61)                           # TX moves to the new key (auth_deferred_expire)
    assert _kernel(net.c_events)[KeySlot.PRIMARY] == net.client.primary.key_id == 3
    assert _kernel(net.s_events)[KeySlot.PRIMARY] == net.server_session.primary.key_id == 3
    net.server_session.send_control_message("INFO,on key 3")
    net.run(lambda: _infos(net) == ["on key 3"], max_time=60)
    # the lame duck (and its record layer) goes after the transition window, memory and all
    old_tls = weakref.ref(net.server_session.lame_duck.tls)
    net.advance(401)
    assert net.server_session.lame_duck is None and net.client.lame_duck is None
    gc.collect()
    assert old_tls() is None


def test_tampered_record_after_hand_off_is_a_clear_tls_error(
        tls: tuple[TLSConfig, TLSConfig]) -> None:
    net = Net(*tls, wrap="none")              # nothing but TLS protects the payload
    _established(net)
    tampered: list[int] = []

    def flip(i: int, d: bytes) -> list[bytes]:
        pkt = ControlPacket.decode(d)
        if pkt.opcode is Opcode.P_CONTROL_V1 and pkt.payload and not tampered:
            tampered.append(i)
            payload = pkt.payload[:-1] + bytes((pkt.payload[-1] ^ 1,))
            return [dataclasses.replace(pkt, payload=payload).encode()]
        return [d]

    net.to_client = flip
    net.server_session.send_control_message("INFO,tampered")
    net.run(lambda: net.client.terminated is not None, max_time=10)
    assert tampered
    term = net.client.terminated
    assert term.reason == "tls-error"
    assert "does not authenticate" in term.message and "bad_record_mac" in term.message
    assert _infos(net) == []
    # the client's alert reached the server, which ends the session with a clear reason
    ends = [e for e in net.s_events if isinstance(e, ev.ConnectionTerminated)]
    assert ends and ends[0].reason == "tls-error"
    assert "the client rejected us (TLS alert bad record mac)" in ends[0].message


def test_tls12_sessions_keep_openssl(tls: tuple[TLSConfig, TLSConfig]) -> None:
    s12 = dataclasses.replace(tls[0], tls_version_max="1.2")
    net = Net(s12, tls[1])
    _established(net)
    assert net.server_session.tls_info()["version"] == "TLSv1.2"
    assert not net.server_session.primary.tls.handed_off
    net.server_session.send_control_message("INFO,still fine")
    net.run(lambda: _infos(net) == ["still fine"], max_time=10)
