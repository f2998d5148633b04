#!/usr/bin/env python3
"""Seed ``fuzz/corpus/<target>/`` with real inputs made by the modules' own encoders.

Why: a fuzzer that starts from valid messages explores the parsers' deep
paths in minutes instead of hours.  Seeds are: the libnv golden vectors
(``shared/vectors/nvlist``, invalid/ and tolerated/ included), control
packets of every opcode wrapped with every wrapping (same fixed keys as
``targets.py``), WKcs, key files, KM2 messages with stock-like peer-info,
PUSH_REPLYs and other control messages, data packets of every cipher,
configs, engine command sequences built from the OpenVPN nvlist vectors,
and server handshakes.  Each seed is named by its SHA-1, so a seed never
duplicates an input the fuzzer already found; targets that already have a
corpus are left alone unless ``--all`` is given.

Usage: ``python3 fuzz/make_corpus.py [--vectors DIR] [--all]``
"""
from __future__ import annotations

import argparse
import hashlib
import os
import ssl
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import targets as T  # noqa: E402
from bsd_ovpn.ifovpn import PING_MAGIC, Command  # noqa: E402
from bsd_ovpn.proto.datachannel import DataChannel, build_occ_exit  # noqa: E402
from bsd_ovpn.proto.keyfile import (  # noqa: E402
    StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, user_metadata, wrap_client_key,
)
from bsd_ovpn.proto.keymethod import IVProto, KeyMethod2, PeerInfo, options_string  # noqa: E402
from bsd_ovpn.proto.keys import KeySource  # noqa: E402
from bsd_ovpn.proto.packet import ControlPacket, Opcode, encode_tlvs  # noqa: E402
from bsd_ovpn.proto.push import (  # noqa: E402
    build_auth_failed, build_auth_failed_temp, build_auth_pending, build_exit, build_halt,
    build_info, build_push_reply, build_restart, encode_message,
)

SID = bytes.fromhex("1122334455667788")
SID2 = bytes.fromhex("99aabbccddeeff01")


#: Targets whose corpus already existed: not re-seeded (TLS seeds carry fresh
#: randoms, so seeding twice would add near-duplicates) unless --all is given.
_SKIP: set[str] = set()


def _put(target: str, data: bytes) -> None:
    if target in _SKIP:
        return
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    path = d / hashlib.sha1(data).hexdigest()
    if not path.exists():
        path.write_bytes(data)


def client_hello() -> bytes:
    """A real TLS ClientHello record (what the first P_CONTROL_V1 carries)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def plain_packets() -> list[bytes]:
    hello = client_hello()
    pkts = [
        ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, SID, message_id=0),
        ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V3, 0, SID, message_id=0),
        ControlPacket(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, 0, SID2, (0,), SID, 0,
                      encode_tlvs([(1, b"\x00\x01")])),
        ControlPacket(Opcode.P_CONTROL_V1, 0, SID, (0,), SID2, 1, hello),
        ControlPacket(Opcode.P_CONTROL_WKC_V1, 0, SID, (0,), SID2, 1, hello[:60]),
        ControlPacket(Opcode.P_ACK_V1, 0, SID, (3, 2, 1, 0), SID2),
        ControlPacket(Opcode.P_ACK_V1, 2, SID, tuple(range(8)), SID2),
        ControlPacket(Opcode.P_CONTROL_SOFT_RESET_V1, 1, SID, message_id=7),
        ControlPacket(Opcode.P_CONTROL_V1, 5, SID, message_id=0xFFFFFFFF, payload=b"\x17\x03\x03"),
    ]
    return [p.encode() for p in pkts]


def seed_control() -> None:
    plains = plain_packets()
    for kind in ("none", "tls-auth", "tls-crypt", "tls-crypt-v2"):
        target = "control_" + kind.replace("-", "_")
        for i, plain in enumerate(plains):
            for mode in (0, 2, 4, 8, 12) if kind == "tls-auth" else (0, 2):
                _put(target, bytes([mode, i]) + plain)
            sender, _ = T._wrap_pair(kind, 0)
            _put(target, bytes([1, 0]) + sender.wrap(plain, T.NOW))
        _put(target, bytes([1, 0]) + b"\x38" + SID + bytes(40))


def seed_wkc() -> None:
    skey = TLSCryptV2ServerKey(T._V2_SERVER_KEY_BYTES)
    kc = StaticKey(T._V2_KC_BYTES)
    for meta in (T._V2_METADATA, user_metadata(b"client-7"), user_metadata(bytes(733))):
        _put("wkc_unwrap", b"\x00\x00" + wrap_client_key(skey, kc, meta))
        _put("wkc_unwrap", b"\x01\x05" + kc.data + meta)
        _put("wkc_unwrap", b"\x03\x09" + kc.data + meta)


def seed_keyfile() -> None:
    skey = TLSCryptV2ServerKey(T._V2_SERVER_KEY_BYTES)
    kc = StaticKey(T._V2_KC_BYTES)
    sk = StaticKey(T._STATIC_KEY_BYTES)
    _put("keyfile", sk.format().encode())
    _put("keyfile", skey.format().encode())
    _put("keyfile", TLSCryptV2ClientKey(kc, wrap_client_key(skey, kc, T._V2_METADATA))
         .format().encode())
    _put("keyfile", sk.format().replace("\n", "\r\n").encode())


def seed_keymethod() -> None:
    pi = PeerInfo.for_client(version="2.6.12", platform="linux",
                             ciphers=("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"),
                             proto=IVProto.DATA_V2 | IVProto.REQUEST_PUSH |
                             IVProto.TLS_KEY_EXPORT | IVProto.DYN_TLS_CRYPT, mtu=1600)
    pi_text = pi.build() + "IV_LZO_STUB=1\nIV_COMP_STUB=1\nUV_X=y\n"
    src_c = KeySource(bytes(range(48)), bytes(range(32)), bytes(range(32, 64)))
    src_s = KeySource(b"", bytes(range(64, 96)), bytes(range(96, 128)))
    client = KeyMethod2(src_c, options_string(server=False), "user", "pass", pi_text)
    server = KeyMethod2(src_s, options_string(server=True, cipher="AES-256-GCM"))
    cm, sm = client.encode(True), server.encode(False)
    _put("keymethod", b"\x01" + cm)
    _put("keymethod", b"\x00" + sm)
    _put("keymethod", b"\x03" + cm + b"PUSH_REQUEST\x00")
    _put("keymethod", b"\x02" + sm + b"PUSH_REPLY,ping 10\x00")
    _put("keymethod", b"\x04" + pi_text.encode())
    _put("keymethod", b"\x04IV_VER=2.5.0\nIV_NCP=2\nIV_PROTO=2\n")
    _put("keymethod", b"\x01" + KeyMethod2(src_c, options_string(
        server=False, cipher="AES-128-GCM", tls_auth_keydir=1)).encode(True))


def seed_push() -> None:
    opts = ["route 192.0.2.0 255.255.255.0", "route 198.51.100.0 255.255.255.0 vpn_gateway 5",
            "route-ipv6 2001:db8:2::/64", "route-ipv6 2001:db8:3::/64 2001:db8::1 7",
            "ifconfig 198.51.100.2 255.255.255.0", "ifconfig-ipv6 2001:db8:1::1000/64 2001:db8:1::1",
            "route-gateway 198.51.100.1", "topology subnet", "ping 10", "ping-restart 60",
            "peer-id 3", "cipher AES-256-GCM", "protocol-flags cc-exit tls-ekm dyn-tls-crypt",
            "key-derivation tls-ekm", "tun-mtu 1500", "dhcp-option DNS 192.0.2.53",
            "redirect-gateway def1 bypass-dhcp", "auth-token SESS_ID_x", "block-outside-dns",
            "explicit-exit-notify", 'setenv-safe "A B" c']
    msgs = build_push_reply(opts)
    _put("push", b"".join(encode_message(m) for m in msgs))
    for m in build_push_reply(opts * 3, max_len=200):
        _put("push", encode_message(m))
    _put("push", b"".join(encode_message(m) for m in build_push_reply(opts * 3, max_len=200)))
    for m in (build_auth_failed("bad password"), build_auth_failed_temp("later", backoff=5),
              build_auth_pending(30), build_info("OPEN_URL:https://example.net"),
              build_restart("server restart", advance=True), build_halt("bye"), build_exit(),
              "PUSH_REQUEST", "AUTH_FAILED,SESSION: token expired", "CR_RESPONSE,abc",
              "RESTART,[NP]x", "AUTH_FAILED,TEMP[backoff 5,advance addr]:msg",
              "PUSH_REPLY,route 1 2 3 4 5,push-continuation 3"):
        _put("push", encode_message(m))
    _put("push", b"PUSH_REPLY,ping 1\r\n\x00INFO,x\x00tail")


def seed_datachannel() -> None:
    ipv4 = bytes.fromhex("4500001c000000004011f9e0c0000201c6336401") + bytes(8)
    for ci in range(4):
        for plain in (ipv4, PING_MAGIC, build_occ_exit(), b""):
            for v2 in (0, 4):
                mode = ci | v2 | (3 << 3)
                _put("datachannel", bytes([mode, 7]) + plain)
                _put("datachannel", bytes([mode | 0x80, 7]) + plain)
                tx_keys, _ = T._data_keys(T._CIPHERS[ci], 3)
                tx = DataChannel(tx_keys, peer_id=7 * 0x10101 if v2 else None)
                _put("datachannel", bytes([mode | 0x40, 7]) + tx.encrypt(plain))


def seed_config() -> None:
    server = """\
port 1194
proto udp
dev tun
topology subnet
server 198.51.100.0 255.255.255.0
server-ipv6 2001:db8:1::/64
ca ca.crt
cert server.crt
key server.key
dh none
tls-crypt ta.key
data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305
push "route 192.0.2.0 255.255.255.0"
push "dhcp-option DNS 192.0.2.53"
client-config-dir ccd
keepalive 10 60
max-clients 100
persist-key
status openvpn-status.log
verb 4
explicit-exit-notify 1
remote-cert-tls client
tls-version-min 1.2
config inc.conf
"""
    client = """\
client
dev tun
proto udp
remote 192.0.2.1 1194
remote 192.0.2.2 1195 udp
resolv-retry infinite
nobind
remote-cert-tls server
verify-x509-name server name
data-ciphers AES-256-GCM
connect-retry 2 30
key-direction 1
auth SHA256
<ca>
{pem}</ca>
<cert>
{pem}</cert>
<key>
{pem}</key>
<tls-auth>
{key}</tls-auth>
"""
    v2 = "client\ndev tun\nremote 192.0.2.1\nca ca.crt\ncert server.crt\nkey server.key\n" \
         "tls-crypt-v2 v2c.key\n"
    v2s = server.replace("tls-crypt ta.key", "tls-crypt-v2 v2s.key")
    ccd = "iroute 192.0.2.128 255.255.255.128\nifconfig-push 198.51.100.9 255.255.255.0\n" \
          "iroute-ipv6 2001:db8:9::/64\npush-reset\npush \"ping 5\"\n"
    key = StaticKey(T._STATIC_KEY_BYTES).format()
    for text in (server, client.format(pem=T._PEM, key=key), v2, v2s, ccd,
                 "config self.conf\n", 'setenv opt block-outside-dns\nremote "a b\\" c" 1\n',
                 "--dev tun\n# c\n; c\nremote 'x y'\n"):
        _put("config", text.encode())


def _step(kind: int, *parts: bytes) -> bytes:
    return bytes([kind]) + b"".join(parts)


def _chunk(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def seed_engine(vectors: Path) -> None:
    cmds = list(T._CMDS)

    def set_raw(cmd: Command, vec: str | None, fd: int = 1) -> bytes:
        payload = (vectors / f"{vec}.bin").read_bytes() if vec else b""
        return _step(0, bytes([cmds.index(cmd), fd]), _chunk(payload), b"\x00")

    def get(cmd: Command, size: int = 3) -> bytes:
        return _step(2, bytes([cmds.index(cmd), size]))

    base = [set_raw(Command.OVPN_NEW_PEER, "ovpn_new_peer_client_ipv4"),
            set_raw(Command.OVPN_NEW_KEY, "ovpn_new_key_aes256gcm"),
            set_raw(Command.OVPN_NEW_KEY, "ovpn_new_key_aes128gcm_secondary"),
            set_raw(Command.OVPN_SWAP_KEYS, "ovpn_swap_keys"),
            set_raw(Command.OVPN_SET_PEER, "ovpn_set_peer"),
            set_raw(Command.OVPN_START_VPN, None),
            set_raw(Command.OVPN_SET_IFMODE, "ovpn_set_ifmode_subnet"),
            get(Command.OVPN_GET_STATS), get(Command.OVPN_GET_PEER_STATS),
            get(Command.OVPN_POLL_PKT), set_raw(Command.OVPN_DEL_KEY, "ovpn_del_key"),
            set_raw(Command.OVPN_DEL_PEER, "ovpn_del_peer"), get(Command.OVPN_POLL_PKT),
            get(Command.OVPN_GET_PKT), get(Command.OVPN_GET_PKT)]
    _put("engine_commands", b"".join(base))
    _put("engine_commands", b"".join([
        set_raw(Command.OVPN_SET_IFMODE, "ovpn_set_ifmode_subnet"),
        set_raw(Command.OVPN_NEW_PEER, "ovpn_new_peer_server_ipv4"),
        set_raw(Command.OVPN_NEW_PEER, "ovpn_new_peer_server_multihome_ipv6", 2),
        set_raw(Command.OVPN_NEW_KEY, "ovpn_new_key_chacha20poly1305"),
        set_raw(Command.OVPN_NEW_KEY, "ovpn_new_key_none"),
        set_raw(Command.OVPN_SET_PEER, "ovpn_set_peer"),
        _step(4, b"\x01\x01"), _step(4, b"\x01\x00\x10\x05"), _step(3, b"\x10\x00"),
        get(Command.OVPN_POLL_PKT), get(Command.OVPN_GET_PKT, 1), get(Command.OVPN_GET_PKT),
        _step(3, b"\xff\xff"), get(Command.OVPN_GET_PKT), _step(5, b"\x01"),
        get(Command.OVPN_GET_PEER_STATS)]))
    _put("engine_commands", b"".join([
        set_raw(Command.OVPN_NEW_PEER, "ovpn_new_peer_client_ipv6", 2),
        set_raw(Command.OVPN_NEW_PEER, "ovpn_new_peer_client_ipv4", 3),
        set_raw(Command.OVPN_NEW_PEER, "ovpn_new_peer_client_ipv4", 0),
        _step(1, bytes([cmds.index(Command.OVPN_NEW_KEY), 1]),
              bytes([4, 0x80 + 10, 2, 0x80, 0x80 + 11, 2, 0x80, 0x80 + 12, 5, 2, 0x80 + 14, 3,
                     0x80, 0x80 + 13, 5, 2, 0x80 + 14, 3, 0x80]), b"\x01\x00", b"\x00"),
        _step(1, bytes([cmds.index(Command.OVPN_NEW_PEER), 1]),
              bytes([3, 0x80 + 2, 7, 0x00, 0x80 + 3, 7, 0x00, 0x80 + 1, 2, 0x80]),
              b"\x01\x01", b"\x00")]))
    for name in sorted(vectors.glob("ovpn_*.bin")):
        for ci, cmd in enumerate(cmds[:13]):
            if name.stem.startswith("ovpn_" + cmd.name[5:].lower()):
                _put("engine_commands", set_raw(cmd, name.stem) + get(Command.OVPN_POLL_PKT))


def seed_server() -> None:
    hello = client_hello()
    for ki, kind in enumerate(T._WRAP_KINDS):
        reset = ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V3 if kind == "tls-crypt-v2"
                              else Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, SID,
                              message_id=0).encode()
        seq = bytes([ki]) + _step(1, _chunk(reset)) + _step(2, _chunk(hello)) + \
            _step(3, _chunk(b"")) + b"\x05"
        _put("server_endpoint", seq)
        _put("server_endpoint", bytes([ki]) + _step(1, _chunk(reset)) + _step(2, _chunk(b"")) +
             _step(2, _chunk(hello)) + _step(4 + 1, _chunk(reset)))
        sender, _ = T._wrap_pair(kind, 0)
        _put("server_endpoint", bytes([ki]) + _step(0, _chunk(sender.wrap(reset, T.NOW))))


def seed_client() -> None:
    """Server reset (with and without the early-negotiation TLV), then TLS bytes."""
    srv_hello = server_flight()
    for ki in range(4):
        for tlv in (b"", encode_tlvs([(1, b"\x00\x01")])):
            _put("client_session", bytes([ki]) + _step(2, _chunk(tlv)) +
                 _step(3, _chunk(srv_hello[:1000])) + _step(3, _chunk(srv_hello[1000:2000])) +
                 _step(4, _chunk(b"")) + b"\x05")
        _put("client_session", bytes([ki]) + _step(0, _chunk(b"\x40" + SID2 + b"\x00" * 5)))
        _put("client_session", bytes([ki]) + _step(1, _chunk(
            ControlPacket(Opcode.P_ACK_V1, 0, SID2, (0,), SID).encode())))


def server_flight() -> bytes:
    """A real TLS server's first flight answering a real ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls = T._server_tls()
    import tempfile
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as cf, \
            tempfile.NamedTemporaryFile("wb", suffix=".pem") as kf:
        cf.write(tls.cert if isinstance(tls.cert, bytes) else tls.cert.encode())
        kf.write(tls.key if isinstance(tls.key, bytes) else tls.key.encode())
        cf.flush()
        kf.flush()
        ctx.load_cert_chain(cf.name, kf.name)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=True)
    inc.write(client_hello())
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_vec = HERE.parent.parent / "shared" / "vectors" / "nvlist"
    if not default_vec.is_dir():
        default_vec = Path("/work/shared/vectors/nvlist")
    ap.add_argument("--vectors", type=Path, default=default_vec)
    ap.add_argument("--all", action="store_true",
                    help="also seed targets whose corpus directory already has files")
    a = ap.parse_args()
    if not a.all:
        _SKIP.update(t for t in T.TARGETS if (HERE / "corpus" / t).is_dir()
                     and any((HERE / "corpus" / t).iterdir()))
    for p in sorted(a.vectors.rglob("*.bin")):
        _put("nv_unpack", p.read_bytes())
    seed_control()
    seed_wkc()
    seed_keyfile()
    seed_keymethod()
    seed_push()
    seed_datachannel()
    seed_config()
    seed_engine(a.vectors)
    seed_server()
    seed_client()
    for t in T.TARGETS:
        d = HERE / "corpus" / t
        n = len(os.listdir(d)) if d.is_dir() else 0
        print(f"{t:24} {n} files")


if __name__ == "__main__":
    main()
