"""Control-channel wrappings: sizes from the spec, round trips, tampering, replay window."""
from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings, strategies as st
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError
from bsd_ovpn.proto.keyfile import (
    StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, timestamp_metadata, wrap_client_key,
)
from bsd_ovpn.proto.packet import ControlPacket, Opcode
from bsd_ovpn.proto.wrap import (
    EARLY_NEG_START, NoWrap, ReplayWindow, TLSAuth, TLSCrypt, TLSCryptV2Client, TLSCryptV2Server,
    TLSCryptV2ServerSession, WrapError, dynamic_tls_crypt, early_negotiation_marker,
)

KEY = StaticKey(bytes((i * 7 + 3) & 0xFF for i in range(256)))
CSID = bytes.fromhex("0102030405060708")
SSID = bytes.fromhex("f1f2f3f4f5f6f7f8")
T0 = 1_700_000_000.0

CLIENT_RESET = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, CSID, message_id=0)
SERVER_RESET = ControlPacket(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, 0, SSID, acks=(0,),
                             remote_session_id=CSID, message_id=0)


def _ctl(mid: int, payload: bytes = b"tls") -> bytes:
    return ControlPacket(Opcode.P_CONTROL_V1, 0, CSID, message_id=mid, payload=payload).encode()


def _pairs():
    """(sender, receiver) pairs in both directions for every wrapping."""
    out = [("none", NoWrap(), NoWrap())]
    for d in ("SHA1", "SHA256", "SHA512"):
        out.append((f"tls-auth {d} 0->1", TLSAuth(KEY, 0, d), TLSAuth(KEY, 1, d)))
        out.append((f"tls-auth {d} 1->0", TLSAuth(KEY, 1, d), TLSAuth(KEY, 0, d)))
        out.append((f"tls-auth {d} none", TLSAuth(KEY, None, d), TLSAuth(KEY, None, d)))
    out.append(("tls-crypt c->s", TLSCrypt(KEY, server=False), TLSCrypt(KEY, server=True)))
    out.append(("tls-crypt s->c", TLSCrypt(KEY, server=True), TLSCrypt(KEY, server=False)))
    return out


@pytest.mark.parametrize("name,tx,rx", _pairs(), ids=lambda x: x if isinstance(x, str) else "")
def test_roundtrip(name, tx, rx):
    for mid, payload in enumerate([b"", b"a", b"x" * 1200]):
        raw = _ctl(mid, payload)
        wire = tx.wrap(raw, T0 + mid)
        assert len(wire) == len(raw) + tx.wire_overhead
        assert rx.unwrap(wire, T0 + mid) == raw
    assert ControlPacket.decode(rx.unwrap_stateless(wire, T0)).payload == b"x" * 1200


def test_worked_sizes_plain():
    assert len(NoWrap().wrap(CLIENT_RESET.encode(), T0)) == 14
    assert len(NoWrap().wrap(SERVER_RESET.encode(), T0)) == 26


def test_worked_sizes_tls_auth_sha1():
    c, s = TLSAuth(KEY, 1), TLSAuth(KEY, 0)
    assert c.overhead == 28 and TLSAuth(KEY, 1, "SHA256").overhead == 40
    assert TLSAuth(KEY, 1, "SHA512").overhead == 72
    assert len(c.wrap(CLIENT_RESET.encode(), T0)) == 42
    assert len(s.wrap(SERVER_RESET.encode(), T0)) == 54


def test_worked_sizes_tls_crypt():
    c, s = TLSCrypt(KEY, server=False), TLSCrypt(KEY, server=True)
    assert c.overhead == 56 and c.wire_overhead == 40
    w = c.wrap(CLIENT_RESET.encode(), T0)
    assert len(w) == 54
    assert w[0] == 0x38 and w[1:9] == CSID
    assert w[9:17] == struct.pack(">II", 1, int(T0))
    assert len(s.wrap(SERVER_RESET.encode(), T0)) == 66
    with_tlv = ControlPacket(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, 0, SSID, acks=(0,),
                             remote_session_id=CSID, message_id=0,
                             payload=bytes.fromhex("000100020001"))
    assert len(s.wrap(with_tlv.encode(), T0)) == 72          # spec §6.4: +6 with the TLV


def test_tls_auth_layout_independently_computed():
    """HMAC sits after the sid and covers pid||ts||opcode||sid||rest with keys[1].hmac (dir 1)."""
    w = TLSAuth(KEY, 1).wrap(CLIENT_RESET.encode(), T0)
    pidts = struct.pack(">II", 1, int(T0))
    plain = CLIENT_RESET.encode()
    mac = hmac.new(KEY.hmac(1)[:20], pidts + plain[:9] + plain[9:], hashlib.sha1).digest()
    assert w == plain[:9] + mac + pidts + plain[9:]
    # no direction: keys[0].hmac for both
    w0 = TLSAuth(KEY, None, "SHA256").wrap(CLIENT_RESET.encode(), T0)
    assert w0[9:41] == hmac.new(KEY.hmac(0)[:32], pidts + plain, hashlib.sha256).digest()


def test_tls_crypt_layout_independently_computed():
    """Client sends with keys[1]: Ke = bytes 128..159, Ka = bytes 192..223; IV = tag[:16]."""
    plain = CLIENT_RESET.encode()
    w = TLSCrypt(KEY, server=False).wrap(plain, T0)
    header = plain[:9] + struct.pack(">II", 1, int(T0))
    tag = hmac.new(KEY.data[192:224], header + plain[9:], hashlib.sha256).digest()
    enc = Cipher(algorithms.AES(KEY.data[128:160]), modes.CTR(tag[:16])).encryptor()
    assert w == header + tag + enc.update(plain[9:]) + enc.finalize()
    # server sends with keys[0]
    ws = TLSCrypt(KEY, server=True).wrap(plain, T0)
    tag_s = hmac.new(KEY.data[64:96], header + plain[9:], hashlib.sha256).digest()
    assert ws[17:49] == tag_s


@pytest.mark.parametrize("name,tx,rx", [p for p in _pairs() if p[0] != "none"],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_tampering_rejected(name, tx, rx):
    wire = tx.wrap(_ctl(1, b"payload"), T0)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x40
        with pytest.raises(WrapError):
            rx.unwrap(bytes(bad), T0)
    with pytest.raises(WrapError, match="too short"):
        rx.unwrap(wire[:20], T0)
    assert rx.unwrap(wire, T0) == _ctl(1, b"payload")   # the good one still passes once


def test_wrong_direction_or_key_rejected():
    w = TLSAuth(KEY, 0).wrap(_ctl(0), T0)
    with pytest.raises(WrapError, match="HMAC"):
        TLSAuth(KEY, 0).unwrap(w, T0)             # both sides direction 0
    with pytest.raises(WrapError):
        TLSAuth(KEY, 1, "SHA256").unwrap(TLSAuth(KEY, 0, "SHA1").wrap(_ctl(0), T0), T0)
    w = TLSCrypt(KEY, server=True).wrap(_ctl(0), T0)
    with pytest.raises(WrapError, match="authentication"):
        TLSCrypt(KEY, server=True).unwrap(w, T0)  # server->server
    with pytest.raises(WrapError):
        TLSCrypt(StaticKey.generate(), server=False).unwrap(w, T0)


@pytest.mark.parametrize("make", [lambda: (TLSAuth(KEY, 0), TLSAuth(KEY, 1)),
                                  lambda: (TLSCrypt(KEY, True), TLSCrypt(KEY, False))])
def test_replay_and_old_timestamp_rejected(make):
    tx, rx = make()
    w1 = tx.wrap(_ctl(0), T0)
    w2 = tx.wrap(_ctl(1), T0)
    assert rx.unwrap(w2, T0)
    assert rx.unwrap(w1, T0)               # reordering inside the window is fine
    with pytest.raises(WrapError, match="replayed"):
        rx.unwrap(w1, T0)
    with pytest.raises(WrapError, match="replayed"):
        rx.unwrap(w2, T0)
    # stateless unwrap neither checks nor records
    assert rx.unwrap_stateless(w2, T0)
    # a sender restarted later (new timestamp) is accepted; then the old time is rejected
    tx2, _ = make()
    w_new = tx2.wrap(_ctl(0), T0 + 100)
    assert rx.unwrap(w_new, T0 + 100)
    w3 = tx.wrap(_ctl(2), T0)
    with pytest.raises(WrapError, match="older than current"):
        rx.unwrap(w3, T0 + 100)


def test_failed_authentication_does_not_touch_replay_state():
    tx, rx = TLSCrypt(KEY, True), TLSCrypt(KEY, False)
    w = tx.wrap(_ctl(0), T0)
    bad = bytearray(w)
    bad[-1] ^= 1
    with pytest.raises(WrapError):
        rx.unwrap(bytes(bad), T0)
    assert rx.unwrap(w, T0)


def test_send_packet_id_counter():
    tx = TLSCrypt(KEY, True)
    assert tx.send_packet_id == 0
    tx.wrap(_ctl(0), T0)
    assert tx.send_packet_id == 1
    tx2 = TLSCrypt(KEY, True)
    tx2.send_packet_id = 1                  # stateless server: reset already went out as id 1
    w = tx2.wrap(_ctl(1), T0 + 5)
    assert struct.unpack(">II", w[9:17]) == (2, int(T0 + 5))
    with pytest.raises(LocalProtocolError):
        tx2.send_packet_id = -1
    # the timestamp is fixed when the counter starts, not per packet
    w = tx2.wrap(_ctl(2), T0 + 50)
    assert struct.unpack(">II", w[9:17]) == (3, int(T0 + 5))


def test_send_counter_wrap_starts_new_time():
    tx, rx = TLSAuth(KEY, 0), TLSAuth(KEY, 1)
    tx.send_packet_id = 0xFFFFFFFE
    w = tx.wrap(_ctl(0), T0)
    assert struct.unpack(">I", w[29:33])[0] == 0xFFFFFFFF
    assert rx.unwrap(w, T0)
    w = tx.wrap(_ctl(1), T0 + 1)
    assert struct.unpack(">II", w[29:37]) == (1, int(T0 + 1))
    assert rx.unwrap(w, T0 + 1)


def test_local_misuse():
    with pytest.raises(LocalProtocolError):
        TLSCrypt(KEY, True).wrap(b"\x20abc", T0)
    with pytest.raises(LocalProtocolError, match="unknown --auth digest"):
        TLSAuth(KEY, 0, "NOPE")
    with pytest.raises(LocalProtocolError, match="none"):
        TLSAuth(KEY, 0, "none")
    assert TLSAuth(KEY, 0, "sha384").overhead == 56
    assert TLSAuth(KEY, 0, "SHA512-256").overhead == 40
    assert TLSAuth(KEY, 0, "MD5").overhead == 24


def test_nowrap_short_packet():
    with pytest.raises(WrapError):
        NoWrap().unwrap(b"\x38\x00", T0)
    assert issubclass(WrapError, RemoteProtocolError)


# --- replay window details ---------------------------------------------------------------

def test_replay_window_rules():
    r = ReplayWindow()
    assert r.check(0, 5, 0.0) is not None           # id 0 never valid
    r.add(100, 5, 0.0)
    assert r.check(100, 5, 0.0) is not None
    assert r.check(99, 5, 1.0) is None              # hole left behind, fresh
    assert r.check(37, 5, 1.0) is None              # 63 behind: still inside
    assert "outside the window" in r.check(36, 5, 1.0)
    assert "late" in r.check(99, 5, 16.5)           # hole older than 15 s
    r.add(99, 5, 1.0)
    assert "replayed" in r.check(99, 5, 2.0)
    r.add(300, 5, 3.0)                              # jump beyond window: restart
    assert r.check(99, 5, 3.0) is not None
    assert r.check(299, 5, 3.0) is None
    assert r.check(1, 6, 4.0) is None               # newer time always restarts
    assert "older" in r.check(400, 4, 4.0)
    assert len(r._seen) <= 64 and len(r._holes) <= 64


def test_replay_window_bounded_under_stream():
    r = ReplayWindow()
    for i in range(1, 5000, 3):
        assert r.check(i, 1, i / 1000) is None
        r.add(i, 1, i / 1000)
    assert len(r._seen) + len(r._holes) <= 64


class _RebuildingWindow(ReplayWindow):
    """The window as first written (containers rebuilt on every advance): the reference."""

    def add(self, pid, ts, now):
        if self._ts is None or ts > self._ts or pid > self._top + self.window:
            self._ts = ts
            self._seen = set()
            self._holes = {i: now for i in range(max(1, pid - self.window + 1), pid)}
            self._top = pid
        elif pid > self._top:
            for i in range(max(self._top + 1, pid - self.window + 1), pid):
                self._holes[i] = now
            self._top = pid
            floor = pid - self.window
            self._seen = {i for i in self._seen if i > floor}
            self._holes = {i: t for i, t in self._holes.items() if i > floor}
        self._holes.pop(pid, None)
        self._seen.add(pid)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 3), st.floats(0, 40)),
                max_size=120))
def test_replay_window_same_verdicts_as_reference(stream):
    """Dropping just the ids that leave the window gives the reference's every verdict."""
    fast, ref = ReplayWindow(), _RebuildingWindow()
    for pid, ts, now in stream:
        verdict = fast.check(pid, ts, now)
        assert verdict == ref.check(pid, ts, now)
        if verdict is None:
            fast.add(pid, ts, now)
            ref.add(pid, ts, now)
            assert fast._seen == ref._seen and fast._holes == ref._holes
            assert fast._top == ref._top and fast._ts == ref._ts


# --- tls-crypt-v2 --------------------------------------------------------------------------

def _v2_keys(meta: bytes = timestamp_metadata(T0)):
    sk = TLSCryptV2ServerKey(bytes((i * 5 + 1) & 0xFF for i in range(128)))
    kc = StaticKey(bytes((i * 11 + 2) & 0xFF for i in range(256)))
    return sk, TLSCryptV2ClientKey(kc, wrap_client_key(sk, kc, meta))


def test_v2_client_reset_and_server_unwrap():
    sk, ck = _v2_keys()
    client = TLSCryptV2Client(ck)
    v3 = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, 0, CSID, message_id=0).encode()
    wire = client.wrap(v3, T0)
    assert len(wire) == 54 + 299
    assert wire.endswith(ck.wkc)
    assert struct.unpack(">I", wire[9:13])[0] == EARLY_NEG_START + 1 == 0x0F000001
    assert early_negotiation_marker(wire)
    server = TLSCryptV2Server(sk)
    plain, sess, meta = server.unwrap_client(wire, T0)
    assert plain == v3 and meta == timestamp_metadata(T0)
    assert isinstance(sess, TLSCrypt) and isinstance(sess, TLSCryptV2ServerSession)
    assert sess.kc == ck.kc
    # the server answers with plain tls-crypt under Kc; the client reads it
    reply = sess.wrap(SERVER_RESET.encode(), T0)
    assert len(reply) == 66
    assert client.unwrap(reply, T0) == SERVER_RESET.encode()
    # replay of the reset into the same session is rejected
    with pytest.raises(WrapError):
        sess.unwrap(wire, T0)


def test_v2_client_pids_keep_counting_and_wkc_only_on_v3_wkc():
    sk, ck = _v2_keys()
    client = TLSCryptV2Client(ck)
    sess = TLSCryptV2Server(sk).unwrap_client(client.wrap(
        ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, 0, CSID, message_id=0).encode(), T0),
        T0)[1]
    wkc_pkt = ControlPacket(Opcode.P_CONTROL_WKC_V1, 0, CSID, acks=(0,),
                            remote_session_id=SSID, message_id=1, payload=b"hello").encode()
    w = client.wrap(wkc_pkt, T0)
    assert w.endswith(ck.wkc) and struct.unpack(">I", w[9:13])[0] == 0x0F000002
    assert sess.unwrap(w, T0) == wkc_pkt
    plain_ctl = _ctl(2, b"more")
    w = client.wrap(plain_ctl, T0)
    assert len(w) == len(plain_ctl) + 40 and not w.endswith(ck.wkc)
    assert struct.unpack(">I", w[9:13])[0] == 0x0F000003
    assert sess.unwrap(w, T0) == plain_ctl


def test_v2_server_rejects():
    sk, ck = _v2_keys()
    client = TLSCryptV2Client(ck)
    server = TLSCryptV2Server(sk)
    v3 = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, 0, CSID, message_id=0).encode()
    wire = client.wrap(v3, T0)
    with pytest.raises(WrapError, match="carries no wrapped"):
        server.unwrap_client(client.wrap(_ctl(1), T0), T0)
    with pytest.raises(WrapError, match="does not authenticate"):
        TLSCryptV2Server(TLSCryptV2ServerKey.generate()).unwrap_client(wire, T0)
    bad = bytearray(wire)
    bad[20] ^= 1                                  # tag of the tls-crypt part
    with pytest.raises(WrapError, match="authentication"):
        server.unwrap_client(bytes(bad), T0)
    with pytest.raises(WrapError, match="does not fit"):
        server.unwrap_client(wire[:60] + wire[-2:], T0)
    with pytest.raises(WrapError):
        server.unwrap_client(wire[:-2] + b"\xff\xff", T0)
    with pytest.raises(WrapError):
        server.unwrap_client(b"\x50", T0)
    # a session refuses a WKC_V1 that carries another client's WKc
    _, sess, _ = server.unwrap_client(wire, T0)
    _, other = _v2_keys(timestamp_metadata(T0 + 1))
    w2 = TLSCryptV2Client(other).wrap(ControlPacket(
        Opcode.P_CONTROL_WKC_V1, 0, CSID, message_id=1).encode(), T0)
    with pytest.raises(WrapError, match="different wrapped client key"):
        sess.unwrap(w2, T0)
    assert not early_negotiation_marker(TLSCrypt(KEY, False).wrap(v3, T0))


def test_dynamic_tls_crypt():
    ekm = bytes(range(256))
    c = dynamic_tls_crypt(ekm, KEY, server=False)
    s = dynamic_tls_crypt(ekm, KEY, server=True)
    assert s.unwrap(c.wrap(_ctl(0), T0), T0) == _ctl(0)
    xored = StaticKey(bytes(a ^ b for a, b in zip(ekm, KEY.data)))
    assert TLSCrypt(xored, True).unwrap(c.wrap(_ctl(1), T0), T0) == _ctl(1)
    plain_key = dynamic_tls_crypt(ekm, None, server=True)
    assert TLSCrypt(StaticKey(ekm), False).unwrap(plain_key.wrap(_ctl(0), T0), T0)
    with pytest.raises(LocalProtocolError):
        dynamic_tls_crypt(b"short", KEY, True)


# --- fuzz: only WrapError escapes from unwrapping -----------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@given(st.binary(max_size=400))
@settings(max_examples=400, deadline=None)
def test_fuzz_unwrap_only_wrap_error(data):
    sk, ck = _v2_keys()
    receivers = [TLSAuth(KEY, 0), TLSAuth(KEY, None, "SHA512"), TLSCrypt(KEY, True),
                 TLSCryptV2Client(ck), NoWrap()]
    for rx in receivers:
        for fn in (rx.unwrap, rx.unwrap_stateless):
            try:
                fn(data, T0)
            except WrapError:
                pass
    for first in (0x50, 0x58):
        try:
            TLSCryptV2Server(sk).unwrap_client(bytes([first]) + data, T0)
        except WrapError:
            pass
