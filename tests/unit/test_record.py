"""The TLS 1.3 record layer used after the OpenSSL hand-off: two ends in memory.

Interop with OpenSSL itself (sequence numbers at the hand-off, KeyUpdate
answered by OpenSSL, the exporter) is in test_tls_handoff.py; here every
rule of RFC 8446 §5 the layer enforces gets a record crafted to break it.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsd_ovpn.errors import LocalProtocolError
from bsd_ovpn.proto.record import (
    MAX_CIPHERTEXT, SUITES, RecordCounter, RecordError, RecordLayer, _Keys, hkdf_expand_label,
)

SUITE = "TLS_AES_256_GCM_SHA384"


def _pair(suite: str = SUITE, cseq: int = 0, sseq: int = 0) -> tuple[RecordLayer, RecordLayer]:
    """(server, client) with shared random secrets and the given starting sequence numbers."""
    n = 48 if SUITES[suite][0] == "sha384" else 32
    c_secret, s_secret, exp = os.urandom(n), os.urandom(n), os.urandom(n)
    srv = RecordLayer(suite, server=True, read_secret=c_secret, write_secret=s_secret,
                      read_seq=cseq, write_seq=sseq, exporter_secret=exp)
    cli = RecordLayer(suite, server=False, read_secret=s_secret, write_secret=c_secret,
                      read_seq=sseq, write_seq=cseq, exporter_secret=exp)
    return srv, cli


def _raw(layer: RecordLayer, ctype: int, content: bytes, *, inner_pad: int = 0) -> bytes:
    """A record from ``layer``'s write side with any inner content type (a misbehaving peer)."""
    keys = layer._write                      # noqa: SLF001 - crafting bad records on purpose
    if inner_pad:
        # seal() appends the type byte: a trailing 0 "type" makes the last pad byte
        return keys.seal(0, content + bytes((ctype,)) + bytes(inner_pad - 1))
    return keys.seal(ctype, content)


def test_rfc8448_key_and_iv() -> None:
    """RFC 8448 §3 (simple 1-RTT): server handshake traffic secret -> write key and iv."""
    secret = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    assert hkdf_expand_label("sha256", secret, b"key", b"", 16).hex() == \
        "3fce516009c21727d0f2e4e86ee403bc"
    assert hkdf_expand_label("sha256", secret, b"iv", b"", 12).hex() == "5d313eb2671276ee13000b30"


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_messages_both_ways_from_any_sequence_number(suite: str) -> None:
    srv, cli = _pair(suite, cseq=3, sseq=7)
    for i in range(5):
        cli.write(b"ping %d\x00" % i)
        srv.write(b"pong %d\x00" % i)
    srv.receive(cli.outgoing())
    cli.receive(srv.outgoing())
    assert [srv.read_record() for _ in range(5)] == [b"ping %d\x00" % i for i in range(5)]
    assert [cli.read_record() for _ in range(5)] == [b"pong %d\x00" % i for i in range(5)]
    assert srv.read_record() == b"" and cli.read_record() == b""
    assert srv.sequence_numbers == (8, 12) and cli.sequence_numbers == (12, 8)


def test_stream_split_anywhere_and_padding_removed() -> None:
    srv, cli = _pair()
    wire = b"".join([_raw(cli, 23, b"padded", inner_pad=100), _raw(cli, 23, b"second")])
    for i in range(len(wire)):
        srv.receive(wire[i:i + 1])           # one byte at a time
    assert srv.read_record() == b"padded" and srv.read_record() == b"second"


def test_wrong_starting_sequence_number_is_caught() -> None:
    srv, cli = _pair(cseq=5)
    srv._read.seq = 4                        # noqa: SLF001 - as if the hand-off miscounted
    cli.write(b"x")
    with pytest.raises(RecordError, match="does not authenticate"):
        srv.receive(cli.outgoing())


def test_tampered_record_is_refused_and_peer_told() -> None:
    srv, cli = _pair()
    cli.write(b"PUSH_REQUEST\x00")
    wire = bytearray(cli.outgoing())
    wire[-3] ^= 0x40
    with pytest.raises(RecordError, match=r"record 0 does not authenticate.*bad_record_mac"):
        srv.receive(bytes(wire))
    # the alert went out, protected; the peer says what happened
    with pytest.raises(RecordError, match="peer sent fatal alert bad_record_mac") as exc:
        cli.receive(srv.outgoing())
    assert exc.value.peer_alert == 20
    with pytest.raises(RecordError, match="already failed"):
        srv.read_record()
    with pytest.raises(RecordError, match="already failed"):
        srv.write(b"more")


def test_key_update_both_ways() -> None:
    srv, cli = _pair()
    cli.write(b"before")
    cli.key_update(request=True)             # client -> new key, asks the server to follow
    cli.write(b"after")
    srv.receive(cli.outgoing())
    assert srv.read_record() == b"before" and srv.read_record() == b"after"
    srv.write(b"answer")                     # preceded by the server's own KeyUpdate
    wire = srv.outgoing()
    assert srv.sequence_numbers == (1, 1)    # both sides on generation 1 now
    cli.receive(wire)
    assert cli.read_record() == b"answer"
    assert cli.sequence_numbers == (1, 1)
    # an unrequested update is not answered
    previous = _Keys(SUITE, srv._write.secret, srv._write.seq)   # noqa: SLF001
    srv.key_update()
    srv.write(b"x")
    cli.receive(srv.outgoing())
    assert cli.read_record() == b"x" and cli.outgoing() == b""
    # and a record under the previous generation no longer authenticates
    with pytest.raises(RecordError, match="does not authenticate"):
        cli.receive(previous.seal(23, b"replayed generation"))


def test_close_notify() -> None:
    srv, cli = _pair()
    cli.write(b"EXIT\x00")
    cli.close()
    with pytest.raises(LocalProtocolError, match="after close_notify"):
        cli.write(b"late")
    srv.receive(cli.outgoing())
    assert srv.read_record() == b"EXIT\x00"
    assert srv.closed
    srv.receive(b"\x17\x03\x03\x00\x20" + bytes(32))   # anything after close_notify is ignored
    assert srv.read_record() == b""


@pytest.mark.parametrize("wire,match", [
    (b"\x14\x03\x03\x00\x01\x01", "change_cipher_spec after the handshake"),
    (b"\x16\x03\x03\x00\x05" + bytes(5), "unprotected record of type 22"),
    (b"\x17\x03\x01\x00\x20" + bytes(32), "record version 0301"),
    (b"\x17\x03\x03" + (MAX_CIPHERTEXT + 1).to_bytes(2, "big"), "exceeds 16640"),
    (b"\x17\x03\x03\x00\x05" + bytes(5), "too short"),
])
def test_malformed_records_refused(wire: bytes, match: str) -> None:
    srv, cli = _pair()
    with pytest.raises(RecordError, match=match):
        srv.receive(wire)
    # every refusal tells the peer with a fatal alert
    with pytest.raises(RecordError, match="peer sent fatal alert"):
        cli.receive(srv.outgoing())


@pytest.mark.parametrize("ctype,content,pad,match", [
    (23, b"", 30, None),                                            # all padding
    (24, b"hb", 0, "content type 24"),                              # heartbeat: no
    (21, b"\x02", 0, "alert record of 1 bytes"),
    (22, b"\x18\x00\x00\x01\x02", 0, "request_update 2"),
    (22, b"\x18\x00\x00\x02\x00\x00", 0, "KeyUpdate of 2 bytes"),
    (22, b"\x18\x00\x00\x01\x00" + b"\x18\x00\x00\x01\x00", 0, "data after a KeyUpdate"),
    (22, b"\x04\x00\x00\x01\x00", 0, "handshake message type 4"),  # ticket sent to a server
    (22, b"\x01\x00\x00\x01\x00", 0, "handshake message type 1"),  # a ClientHello
])
def test_bad_inner_content_refused(ctype: int, content: bytes, pad: int,
                                   match: str | None) -> None:
    srv, cli = _pair()
    if content:
        wire = _raw(cli, ctype, content, inner_pad=pad)
    else:
        # TLSInnerPlaintext of zeros only: no content type at all
        wire = cli._write.seal(0, bytes(pad))   # noqa: SLF001
    with pytest.raises(RecordError, match=match or "no content type"):
        srv.receive(wire)


def test_oversized_plaintext_refused() -> None:
    srv, cli = _pair()
    with pytest.raises(LocalProtocolError, match="exceeds 16384"):
        cli.write(bytes(16385))
    wire = cli._write.seal(23, bytes(16385))   # noqa: SLF001 - a peer that ignores the limit
    with pytest.raises(RecordError, match="record plaintext of 16386 bytes"):
        srv.receive(wire)


def test_client_ignores_session_tickets_and_handles_fragmented_handshake() -> None:
    srv, cli = _pair()
    ticket = b"\x04" + (40).to_bytes(3, "big") + bytes(40)
    srv._out.append(_raw(srv, 22, ticket[:10]))      # noqa: SLF001 - split over two records
    srv._out.append(_raw(srv, 22, ticket[10:]))      # noqa: SLF001
    srv.write(b"hello")
    cli.receive(srv.outgoing())
    assert cli.read_record() == b"hello"
    # a handshake fragment followed by application data is a protocol violation
    srv._out.append(_raw(srv, 22, ticket[:10]))      # noqa: SLF001
    srv.write(b"oops")
    with pytest.raises(RecordError, match="interrupted"):
        cli.receive(srv.outgoing())


def test_peer_alerts() -> None:
    srv, cli = _pair()
    srv._out.append(_raw(srv, 21, b"\x01\x5a"))      # noqa: SLF001 - user_canceled: ignored
    srv.write(b"still here")
    cli.receive(srv.outgoing())
    assert cli.read_record() == b"still here"
    srv._out.append(_raw(srv, 21, b"\x02\x2a"))      # noqa: SLF001 - bad_certificate
    with pytest.raises(RecordError, match="peer sent fatal alert bad_certificate") as exc:
        cli.receive(srv.outgoing())
    assert exc.value.peer_alert == 42
    assert cli.outgoing() == b""             # no alert in answer to an alert


def test_exporter_matches_on_both_ends_and_depends_on_label() -> None:
    srv, cli = _pair()
    a = srv.export(b"EXPORTER-OpenVPN-datakeys", 256)
    assert a == cli.export(b"EXPORTER-OpenVPN-datakeys", 256) and len(a) == 256
    assert a != srv.export(b"EXPORTER-OpenVPN-dynamic-tls-crypt", 256)


def test_counter_counts_only_application_epoch_records() -> None:
    n = 48
    hs_secret, app_secret = os.urandom(n), os.urandom(n)
    hs, app = _Keys(SUITE, hs_secret), _Keys(SUITE, app_secret)
    counter = RecordCounter()
    wire = (b"\x16\x03\x03\x00\x03abc" + b"\x14\x03\x03\x00\x01\x01"   # plaintext hello + CCS
            + hs.seal(22, b"finished-ish") + app.seal(23, b"km2")
            + app.seal(22, b"\x04\x00\x00\x00"))
    counter.feed(wire[:7])
    counter.feed(wire[7:])
    assert counter.count == 0 and not counter.idle          # waiting for the secret
    counter.set_secret(SUITE, app_secret)
    assert counter.count == 2 and counter.idle and counter.lost is None
    counter.feed(app.seal(23, b"x")[:10])
    assert not counter.idle
    # after application records, a record that does not decrypt means we lost track
    counter.feed(hs.seal(23, b"y"))
    assert counter.lost is not None


@pytest.mark.parametrize("content,ctype", [(b"\x18\x00\x00\x01\x00", 22), (b"\x01\x00", 21)])
def test_counter_gives_up_on_key_update_and_alerts(content: bytes, ctype: int) -> None:
    secret = os.urandom(48)
    app = _Keys(SUITE, secret)
    counter = RecordCounter()
    counter.set_secret(SUITE, secret)
    counter.feed(app.seal(23, b"ok"))
    assert counter.lost is None and counter.count == 1
    counter.feed(app.seal(ctype, content))
    assert counter.lost is not None


def test_unsupported_suite() -> None:
    with pytest.raises(LocalProtocolError, match="unsupported cipher suite"):
        RecordLayer("TLS_AES_128_CCM_SHA256", server=True, read_secret=bytes(32),
                    write_secret=bytes(32), read_seq=0, write_seq=0, exporter_secret=bytes(32))
    counter = RecordCounter()
    counter.set_secret("TLS_AES_128_CCM_SHA256", bytes(32))
    assert counter.lost is not None and "not supported" in counter.lost


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=400), cut=st.integers(0, 400), flip=st.integers(0, 4000))
def test_arbitrary_input_is_refused_cleanly(junk: bytes, cut: int, flip: int) -> None:
    """Random bytes, or a valid stream cut and bit-flipped anywhere: RecordError or nothing."""
    srv, cli = _pair()
    cli.write(b"PUSH_REPLY,ping 10\x00")
    cli.key_update(request=True)
    cli.write(b"x" * 100)
    cli.close()
    wire = bytearray(cli.outgoing())
    wire[flip % len(wire)] ^= 1 << (flip % 8)
    fresh = _pair()[0]
    for layer, chunks in ((fresh, [junk]), (srv, [bytes(wire[:cut]), bytes(wire[cut:])])):
        try:
            for chunk in chunks:
                layer.receive(chunk)
            while layer.read_record():
                pass
        except RecordError as exc:
            assert str(exc) and layer.failed is not None
