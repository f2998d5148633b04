"""Control messages: NUL framing, PUSH_REPLY typing and continuation, message builders."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsd_ovpn.errors import RemoteProtocolError, ValidationError
from bsd_ovpn.proto.push import (AuthFailed, AuthPending, ControlMessageError, CrResponse, Exit,
                                 Halt, Info, InfoPre, PushError, PushReply, PushReplyAssembler,
                                 PushReplyPart, PushRequest, Restart, Route, Unknown,
                                 build_auth_failed, build_auth_failed_temp, build_auth_pending,
                                 build_exit, build_halt, build_info, build_push_reply,
                                 build_push_request, build_restart, encode_message,
                                 parse_message, split_messages)

STOCK_REPLY = ("PUSH_REPLY,route-gateway 198.51.100.1,topology subnet,ping 10,ping-restart 60,"
               "ifconfig 198.51.100.2 255.255.255.0,peer-id 0,cipher AES-256-GCM,"
               "protocol-flags cc-exit tls-ekm dyn-tls-crypt,tun-mtu 1500")


def test_split_messages_framing() -> None:
    data = b"PUSH_REQUEST\x00INFO,hello\r\n\x00\x00bad\x01msg\x00EXIT\x00partial"
    res = split_messages(data)
    assert res.messages == ["PUSH_REQUEST", "INFO,hello", "EXIT"]
    assert len(res.rejected) == 2
    assert "non-printable" in str(res.rejected[0]) and "NUL" in str(res.rejected[1])
    assert all(isinstance(e, RemoteProtocolError) for e in res.rejected)
    assert split_messages(b"").messages == []
    assert split_messages("caf\u00e9\x00".encode()).rejected  # UTF-8 is not printable ASCII


def test_encode_message() -> None:
    assert encode_message("EXIT") == b"EXIT\x00"
    with pytest.raises(ValidationError, match="printable"):
        encode_message("a\nb")
    with pytest.raises(ValidationError, match="exceeds"):
        encode_message("x" * 2048)
    assert len(encode_message("x" * 2047)) == 2048


def test_stock_push_reply_typed() -> None:
    msg = parse_message(STOCK_REPLY)
    assert isinstance(msg, PushReplyPart) and msg.continuation == 0
    r = PushReply.parse(STOCK_REPLY)
    assert r.route_gateway == "198.51.100.1" and r.topology == "subnet"
    assert (r.ping, r.ping_restart, r.peer_id, r.tun_mtu) == (10, 60, 0, 1500)
    assert r.ifconfig == (ipaddress.IPv4Address("198.51.100.2"),
                          ipaddress.IPv4Address("255.255.255.0"))
    assert r.cipher == "AES-256-GCM"
    assert r.protocol_flags == {"cc-exit", "tls-ekm", "dyn-tls-crypt"} and r.uses_ekm
    assert r.unknown == [] and len(r.options) == 9


def test_all_typed_options_and_unknown() -> None:
    r = PushReply.parse(
        "PUSH_REPLY,ifconfig-ipv6 2001:db8::2/64 2001:db8::1,route 192.0.2.0 255.255.255.0,"
        "route 198.51.100.7,route 192.0.2.128 255.255.255.128 vpn_gateway 5,"
        "route-ipv6 2001:db8:1::/48,route-ipv6 2001:db8:2::/48 2001:db8::1 7,"
        "dhcp-option DNS 192.0.2.53,dhcp-option DOMAIN example.com,"
        "redirect-gateway def1 bypass-dhcp,auth-token SESS_abc==,block-outside-dns,"
        "key-derivation tls-ekm,explicit-exit-notify 3,setenv-safe FOO \"bar baz\"")
    assert r.ifconfig_ipv6 == (ipaddress.IPv6Interface("2001:db8::2/64"),
                               ipaddress.IPv6Address("2001:db8::1"))
    assert r.routes == [Route("192.0.2.0", "255.255.255.0"), Route("198.51.100.7"),
                        Route("192.0.2.128", "255.255.255.128", "vpn_gateway", 5)]
    assert r.routes[0].ip_network == ipaddress.IPv4Network("192.0.2.0/24")
    assert [str(x.network) for x in r.routes_ipv6] == ["2001:db8:1::/48", "2001:db8:2::/48"]
    assert r.routes_ipv6[1].gateway == "2001:db8::1" and r.routes_ipv6[1].metric == 7
    assert r.dhcp_options == [("DNS", "192.0.2.53"), ("DOMAIN", "example.com")]
    assert r.redirect_gateway == ("def1", "bypass-dhcp")
    assert r.auth_token == "SESS_abc==" and r.block_outside_dns
    assert r.key_derivation == "tls-ekm" and r.uses_ekm
    assert r.unknown == ["explicit-exit-notify 3", 'setenv-safe FOO "bar baz"']


def test_empty_push_reply_is_valid() -> None:
    r = PushReply.parse("PUSH_REPLY")
    assert r.options == [] and not r.uses_ekm
    assert PushReply.parse("PUSH_REPLY,").options == []


@pytest.mark.parametrize("opt,text", [
    ("ifconfig 198.51.100.2", "takes 2 arguments"),
    ("ifconfig 198.51.100.300 255.255.255.0", "not an IPv4 address"),
    ("peer-id 16777216", "outside 0..16777215"),
    ("peer-id x", "not an integer"),
    ("ping --5", "not an integer"),
    ("ping \u00b2", "not an integer"),
    ("ping ten", "not an integer"),
    ("topology star", "net30, p2p or subnet"),
    ("route 192.0.2.0 255.255.255.0 gateway.example", "not an IPv4 address"),
    ("route-ipv6 2001:db8::/200", "2001:db8::/200"),
    ("tun-mtu 20", "outside 48..65535"),
    ("block-outside-dns yes", "takes 0 arguments"),
    ('setenv X "unterminated', "cannot be tokenized .*closing quot"),
])
def test_bad_options_name_the_option(opt: str, text: str) -> None:
    with pytest.raises(PushError, match=text) as exc:
        PushReply.parse(f"PUSH_REPLY,ping 5,{opt}")
    assert exc.value.option == opt
    assert isinstance(exc.value, RemoteProtocolError)


def test_continuation_reassembly() -> None:
    asm = PushReplyAssembler()
    assert asm.feed("PUSH_REPLY,route 192.0.2.0 255.255.255.0,push-continuation 2") is None
    assert asm.pending
    assert asm.feed("PUSH_REPLY,route 198.51.100.0 255.255.255.0,push-continuation 2") is None
    done = asm.feed("PUSH_REPLY,peer-id 3,ping 10,push-continuation 1")
    assert done is not None and not asm.pending
    assert [r.network for r in done.routes] == ["192.0.2.0", "198.51.100.0"]
    assert done.peer_id == 3 and done.ping == 10
    assert "push-continuation 1" not in done.options
    # A single message without continuation completes immediately.
    assert asm.feed(STOCK_REPLY) is not None
    with pytest.raises(PushError, match="push-continuation must be 1 or 2"):
        asm.feed("PUSH_REPLY,push-continuation 3")


def test_continuation_is_bounded() -> None:
    asm = PushReplyAssembler()
    with pytest.raises(ControlMessageError, match="more than 64"):
        for _ in range(100):
            asm.feed("PUSH_REPLY,ping 1,push-continuation 2")
    assert not asm.pending


def test_build_push_reply_single_and_split() -> None:
    opts = STOCK_REPLY.split(",")[1:]
    assert build_push_reply(opts) == [STOCK_REPLY]
    assert build_push_reply([]) == ["PUSH_REPLY"]
    many = [f"route 192.0.2.{i} 255.255.255.255" for i in range(120)]
    parts = build_push_reply(many, max_len=300)
    assert len(parts) > 3
    for p in parts:
        assert len(p) + 1 <= 300 and p.startswith("PUSH_REPLY,")
    assert all(p.endswith(",push-continuation 2") for p in parts[:-1])
    assert parts[-1].endswith(",push-continuation 1")
    asm = PushReplyAssembler()
    results = [asm.feed(p) for p in parts]
    assert results[:-1] == [None] * (len(parts) - 1)
    final = results[-1]
    assert final is not None and final.options == many
    with pytest.raises(ValidationError, match="without commas"):
        build_push_reply(["route 1,2"])
    with pytest.raises(ValidationError, match="cannot fit"):
        build_push_reply(["x" * 400], max_len=300)


def test_message_dispatch() -> None:
    assert parse_message("PUSH_REQUEST") == PushRequest()
    assert parse_message("AUTH_FAILED") == AuthFailed()
    assert parse_message("AUTH_FAILED,bad password") == AuthFailed(reason="bad password")
    temp = parse_message("AUTH_FAILED,TEMP[backoff 30,advance remote,weird]:try later")
    assert isinstance(temp, AuthFailed) and temp.temp
    assert (temp.backoff, temp.advance, temp.message) == (30, "remote", "try later")
    assert parse_message("AUTH_FAILED,TEMP").temp  # type: ignore[union-attr]
    sess = parse_message("AUTH_FAILED,SESSION: token expired")
    assert isinstance(sess, AuthFailed) and sess.session_expired
    crv = parse_message("AUTH_FAILED,CRV1:R,E:Om01u7Fh4LrGBS7uh0SWmzwabUiGiW6l:Y3Ix:Please")
    assert isinstance(crv, AuthFailed) and crv.challenge and crv.challenge.startswith("R,E:")
    assert parse_message("AUTH_PENDING") == AuthPending()
    assert parse_message("AUTH_PENDING,timeout 300") == AuthPending(300)
    assert parse_message("RESTART") == Restart()
    assert parse_message("RESTART,[NP]server going down") == Restart("server going down",
                                                                     True, True)
    assert parse_message("RESTART,bye") == Restart("bye")
    assert parse_message("HALT,go away") == Halt("go away")
    assert parse_message("INFO_PRE,OPEN_URL:https://example.com") == InfoPre(
        "OPEN_URL:https://example.com")
    assert parse_message("INFO,hello") == Info("hello")
    assert parse_message("CR_RESPONSE,aGk=") == CrResponse("aGk=")
    assert parse_message("EXIT") == Exit()
    assert parse_message("SOMETHING_NEW,x") == Unknown("SOMETHING_NEW,x")
    with pytest.raises(ControlMessageError, match="bad timeout"):
        parse_message("AUTH_PENDING,timeout soon")
    with pytest.raises(ControlMessageError, match="bad timeout"):
        parse_message("AUTH_PENDING,timeout \u00b2")
    assert parse_message("AUTH_FAILED,TEMP[backoff \u00b2]:x") == AuthFailed(
        reason="TEMP[backoff \u00b2]:x", temp=True, message="x")


def test_builders_round_trip() -> None:
    cases = [
        (build_push_request(), PushRequest()),
        (build_auth_failed(), AuthFailed()),
        (build_auth_failed("no"), AuthFailed(reason="no")),
        (build_auth_pending(), AuthPending()),
        (build_auth_pending(60), AuthPending(60)),
        (build_info("x y"), Info("x y")),
        (build_restart(), Restart()),
        (build_restart("bye", advance=True), Restart("bye", advance=True)),
        (build_restart(preserve=True), Restart(preserve=True)),
        (build_halt("stop"), Halt("stop")),
        (build_exit(), Exit()),
    ]
    for text, expected in cases:
        assert parse_message(text) == expected, text
        encode_message(text)
    temp = build_auth_failed_temp("busy", backoff=10, advance="addr")
    assert temp == "AUTH_FAILED,TEMP[backoff 10,advance addr]:busy"
    parsed = parse_message(temp)
    assert isinstance(parsed, AuthFailed) and (parsed.backoff, parsed.advance,
                                               parsed.message) == (10, "addr", "busy")
    with pytest.raises(ValidationError):
        build_auth_failed("line\nbreak")
    with pytest.raises(ValidationError):
        build_auth_failed_temp(advance="sideways")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_split_and_parse_only_documented_errors(data: bytes) -> None:
    asm = PushReplyAssembler()
    for m in split_messages(data).messages:
        try:
            parsed = parse_message(m)
            if isinstance(parsed, PushReplyPart):
                asm.feed(parsed)
        except ControlMessageError:
            pass


_opt_word = st.sampled_from(["ifconfig", "route", "route-ipv6", "peer-id", "ping", "topology",
                             "tun-mtu", "cipher", "protocol-flags", "dhcp-option",
                             "push-continuation", "auth-token", "block-outside-dns", "x"])
_opt_arg = st.text(alphabet="0123456789abcdef.:/ \"'\\-", max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_parse_message_any_text(text: str) -> None:
    for msg in (text, "PUSH_REPLY," + text, "AUTH_FAILED," + text, "RESTART," + text):
        _parse_quietly(msg)


def _parse_quietly(text: str) -> None:
    try:
        parsed = parse_message(text)
        if isinstance(parsed, PushReplyPart):
            PushReplyAssembler().feed(parsed)
    except ControlMessageError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_opt_word, _opt_arg), max_size=6))
def test_fuzz_push_reply_only_documented_errors(opts: list[tuple[str, str]]) -> None:
    msg = "PUSH_REPLY," + ",".join(f"{w} {a}" for w, a in opts)
    try:
        PushReplyAssembler().feed(msg)
    except ControlMessageError:
        pass
