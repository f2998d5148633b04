"""TLSChannel hands established TLS 1.3 sessions from OpenSSL to our record layer.

The peer in most tests is a TLSChannel with ``record_handoff=False``: plain
OpenSSL all the way, so every record our layer writes is checked by OpenSSL
and every record OpenSSL writes (incl. its NewSessionTickets and its answer
to our KeyUpdate) is read by ours, at the sequence numbers the hand-off found.
"""
from __future__ import annotations

import gc
import weakref

import pytest

from bsd_ovpn.proto.keys import EKM_LABEL
from bsd_ovpn.proto.session import DYN_TLS_CRYPT_LABEL
from bsd_ovpn.proto.tls import TLSChannel, TLSConfig, TLSError, format_subject
from bsd_ovpn.testbed.pki import PKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def _cfgs(pki: PKI, *, srv_handoff: bool = True, cli_handoff: bool = True,
          **kw: object) -> tuple[TLSConfig, TLSConfig]:
    s, c = pki.server(), pki.client()
    return (TLSConfig(ca=pki.ca_pem, cert=s.cert_pem, key=s.key_pem, record_handoff=srv_handoff,
                      **kw),  # type: ignore[arg-type]
            TLSConfig(ca=pki.ca_pem, cert=c.cert_pem, key=c.key_pem, record_handoff=cli_handoff,
                      **kw))  # type: ignore[arg-type]


def _shuttle(a: TLSChannel, b: TLSChannel) -> tuple[list[bytes], list[bytes]]:
    """Move bytes both ways until quiet; return the records each side read."""
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    for _ in range(10):
        x = a.outgoing()
        b.receive(x)
        while rec := b.read_record():
            got_b.append(rec)
        y = b.outgoing()
        a.receive(y)
        while rec := a.read_record():
            got_a.append(rec)
        if not x and not y and not a.outgoing() and not b.outgoing():
            break
    return got_a, got_b


def _messages_both_ways(a: TLSChannel, b: TLSChannel) -> None:
    """Three messages each way, several records per direction, all read in order."""
    for i in range(3):
        a.write(b"to b %d\x00" % i)
        b.write(b"to a %d\x00" % i)
    got_a, got_b = _shuttle(a, b)
    assert got_a == [b"to a %d\x00" % i for i in range(3)]
    assert got_b == [b"to b %d\x00" % i for i in range(3)]


def _connect(srv_cfg: TLSConfig, cli_cfg: TLSConfig) -> tuple[TLSChannel, TLSChannel]:
    srv, cli = TLSChannel(srv_cfg, server=True), TLSChannel(cli_cfg, server=False)
    _shuttle(srv, cli)
    assert srv.handshake_complete and cli.handshake_complete
    return srv, cli


@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                                   "TLS_CHACHA20_POLY1305_SHA256"])
@pytest.mark.parametrize("ours", ["server", "client"])
def test_handed_off_side_talks_to_openssl(pki: PKI, suite: str, ours: str) -> None:
    scfg, ccfg = _cfgs(pki, srv_handoff=ours == "server", cli_handoff=ours == "client",
                       tls_ciphersuites=suite)
    srv, cli = _connect(scfg, ccfg)
    me, peer = (srv, cli) if ours == "server" else (cli, srv)
    assert me.handed_off and not peer.handed_off
    assert me.cipher_name == peer.cipher_name == suite
    # the exporter (OpenVPN's EKM and dynamic tls-crypt) is OpenSSL's, bit for bit
    for label, n in ((EKM_LABEL, 256), (DYN_TLS_CRYPT_LABEL, 256), (b"EXPORTER-x", 17)):
        assert me.export_keying_material(label, n) == peer.export_keying_material(label, n)
    _messages_both_ways(me, peer)


def test_key_update_answered_by_openssl(pki: PKI) -> None:
    srv, cli = _connect(*_cfgs(pki, cli_handoff=False))
    assert srv.handed_off
    srv.key_update(request=True)          # OpenSSL must switch keys and send its own update
    srv.write(b"after our update\x00")
    got_srv, got_cli = _shuttle(srv, cli)
    assert got_cli == [b"after our update\x00"]
    cli.write(b"after its update\x00")    # only readable if we followed OpenSSL's KeyUpdate
    got_srv, _ = _shuttle(srv, cli)
    assert got_srv == [b"after its update\x00"]
    assert srv._rl is not None and srv._rl.sequence_numbers == (1, 1)   # noqa: SLF001
    srv.key_update()                      # unrequested: OpenSSL just follows
    srv.write(b"again\x00")
    assert _shuttle(srv, cli)[1] == [b"again\x00"]


def test_close_notify_both_directions(pki: PKI) -> None:
    srv, cli = _connect(*_cfgs(pki, cli_handoff=False))
    srv.write(b"EXIT\x00")
    srv.close()
    _, got = _shuttle(srv, cli)
    assert got == [b"EXIT\x00"] and cli.closed
    srv, cli = _connect(*_cfgs(pki, cli_handoff=False))
    cli.write(b"bye\x00")
    cli.close()                           # OpenSSL's close_notify to our record layer
    got, _ = _shuttle(srv, cli)
    assert got == [b"bye\x00"] and srv.closed


def test_tampered_record_is_a_clear_error_and_openssl_gets_the_alert(pki: PKI) -> None:
    srv, cli = _connect(*_cfgs(pki, cli_handoff=False))
    cli.write(b"PUSH_REQUEST\x00")
    wire = bytearray(cli.outgoing())
    wire[-1] ^= 1
    with pytest.raises(TLSError, match="does not authenticate.*bad_record_mac"):
        srv.receive(bytes(wire))
    cli.receive(srv.outgoing())
    with pytest.raises(TLSError, match="bad record mac"):
        cli.read()
    with pytest.raises(TLSError, match="already failed"):
        srv.write(b"x")


def test_openssl_peer_refusing_us_after_our_handshake(pki: PKI) -> None:
    """TLS 1.3: the client finishes first, so a server's refusal reaches our record layer."""
    scfg, ccfg = _cfgs(pki, remote_cert_tls="server")    # the client cert lacks serverAuth
    srv, cli = TLSChannel(scfg, server=True), TLSChannel(ccfg, server=False)
    srv.receive(cli.outgoing())               # ClientHello
    cli.receive(srv.outgoing())               # the server's flight: the client is done
    finished = cli.outgoing()
    assert cli.read() == b"" and cli.outgoing() == b""
    assert cli.handed_off
    with pytest.raises(TLSError, match="lacks extendedKeyUsage serverAuth"):
        srv.receive(finished)
    with pytest.raises(TLSError, match=r"TLS handshake failed: the server rejected us \(TLS "
                                       r"alert [a-z ]+\)"):
        cli.receive(srv.outgoing())           # the alert, under the application key


def test_facts_survive_and_openssl_is_freed(pki: PKI) -> None:
    srv, cli = TLSChannel(_cfgs(pki)[0], server=True), TLSChannel(_cfgs(pki)[1], server=False)
    facts = {}
    conn_ref = weakref.ref(srv._conn)     # noqa: SLF001
    _shuttle(srv, cli)
    assert srv.handed_off and cli.handed_off
    gc.collect()
    assert conn_ref() is None and srv._conn is None      # noqa: SLF001
    facts = (srv.version, srv.cipher_name, srv.group_name, srv.peer_common_name)
    assert facts[0] == "TLSv1.3" and facts[1] and facts[2] and facts[3] == "client"
    assert cli.peer_common_name == "server"
    assert format_subject(srv.peer_certificate.subject) == "CN=client"


def test_tls12_stays_in_openssl(pki: PKI) -> None:
    srv, cli = _connect(*_cfgs(pki, tls_version_max="1.2"))
    assert srv.version == "TLSv1.2" and not srv.handed_off and not cli.handed_off
    assert srv._count_in is None                          # noqa: SLF001 - stopped counting
    cli.write(b"hi\x00")
    assert _shuttle(srv, cli)[0] == [b"hi\x00"]
    assert srv.export_keying_material(EKM_LABEL, 32) == cli.export_keying_material(EKM_LABEL, 32)


def test_no_hand_off_while_a_record_is_half_received(pki: PKI) -> None:
    """The client's Finished and its first message arrive together, the message cut in two."""
    srv, cli = TLSChannel(_cfgs(pki)[0], server=True), TLSChannel(_cfgs(pki)[1], server=False)
    srv.receive(cli.outgoing())               # ClientHello
    cli.receive(srv.outgoing())               # ServerHello ... Finished, the client is done
    assert cli.handshake_complete
    assert cli.read() == b""
    cli.write(b"KM2" * 100)
    wire = cli.outgoing()                     # client Finished + one application record
    assert cli.handed_off
    srv.receive(wire[:-50])
    assert srv.read_record() == b""
    cli.receive(srv.outgoing())               # OpenSSL's session tickets
    assert srv.handshake_complete and not srv.handed_off
    srv.receive(wire[-50:])
    assert srv.read_record() == b"KM2" * 100 and srv.read_record() == b""
    srv.write(b"reply\x00")
    cli.receive(srv.outgoing())               # the reply; the server hands off here
    assert srv.handed_off
    assert cli.read() == b"reply\x00"
    srv.write(b"next\x00")
    cli.receive(srv.outgoing())
    assert cli.read() == b"next\x00"


def test_unread_plaintext_delays_the_hand_off(pki: PKI) -> None:
    srv, cli = TLSChannel(_cfgs(pki)[0], server=True), TLSChannel(_cfgs(pki)[1], server=False)
    srv.receive(cli.outgoing())
    cli.receive(srv.outgoing())
    cli.write(b"one\x00")
    cli.write(b"two\x00")
    srv.receive(cli.outgoing())
    assert srv.read_record() == b"one\x00"    # "two" still inside OpenSSL
    cli.receive(srv.outgoing())
    assert not srv.handed_off
    assert srv.read_record() == b"two\x00"
    assert srv.read_record() == b""
    cli.receive(srv.outgoing())
    assert srv.handed_off
    srv.write(b"three\x00")
    cli.receive(srv.outgoing())
    assert cli.read() == b"three\x00"


def test_hand_off_can_be_disabled(pki: PKI) -> None:
    srv, cli = _connect(*_cfgs(pki, srv_handoff=False, cli_handoff=False))
    assert not srv.handed_off and not cli.handed_off
    with pytest.raises(Exception, match="handed off"):
        srv.key_update()


@pytest.mark.parametrize("ours", ["server", "client", "both"])
def test_finished_and_first_messages_in_one_flight(pki: PKI, ours: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The record boundary where the handshake ended is known, never guessed.

    A client that queued messages before its handshake completed sends its
    Finished and those records in one flight (as an OpenVPN client sends its
    key-method 2 message); the server reads that flight in one piece.  The
    hand-off must count exactly the application records on both sides, and
    no handshake record may need a trial decryption.
    """
    from bsd_ovpn.proto import record

    failed: list[int] = []
    real_open = record._Keys.open                 # noqa: SLF001

    def spy(self: record._Keys, header: bytes, body: bytes) -> bytes | None:  # noqa: SLF001
        out = real_open(self, header, body)
        if out is None:
            failed.append(len(body))
        return out

    monkeypatch.setattr(record._Keys, "open", spy)  # noqa: SLF001
    scfg, ccfg = _cfgs(pki, srv_handoff=ours in ("server", "both"),
                       cli_handoff=ours in ("client", "both"))
    srv, cli = TLSChannel(scfg, server=True), TLSChannel(ccfg, server=False)
    cli.write(b"key method 2\x00")
    cli.write(b"PUSH_REQUEST\x00")
    srv.receive(cli.outgoing())                   # ClientHello
    cli.receive(srv.outgoing())                   # ServerHello ... Finished
    assert cli.handshake_complete
    flight = cli.outgoing()                       # Finished + two application records
    srv.receive(flight)                           # all of it in one piece
    assert srv.handshake_complete
    assert [srv.read_record(), srv.read_record(), srv.read_record()] == \
        [b"key method 2\x00", b"PUSH_REQUEST\x00", b""]
    srv.write(b"key method 2 reply\x00")
    srv.write(b"PUSH_REPLY,ping 10\x00")
    cli.receive(srv.outgoing())                   # tickets + two application records
    got_cli = [cli.read_record(), cli.read_record(), cli.read_record()]
    assert got_cli == [b"key method 2 reply\x00", b"PUSH_REPLY,ping 10\x00", b""]
    _shuttle(cli, srv)
    assert srv.handed_off == (ours in ("server", "both"))
    assert cli.handed_off == (ours in ("client", "both"))
    _messages_both_ways(srv, cli)     # the sequence numbers the hand-off took are right
    assert failed == []                           # no handshake record was trial-decrypted
