"""The low-level ovpnctl commands against a RecordingTransport and an in-process engine.

Every command goes through the real console entry point (``bsd_ovpn.cli.main``)
so exit statuses and the one-line error format are what a person sees.  SET
requests are compared byte for byte with OpenVPN 2.6's golden nvlist vectors
where the values can be made the same; replies come from the kernel reply
vectors.
"""
from __future__ import annotations

import errno as E
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from bsd_ovpn import nv
from bsd_ovpn.cli import main
from bsd_ovpn.cli import engineopts, netconf, stats as stats_mod
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.proto import keyfile
from bsd_ovpn.transport import RecordingTransport

VEC = Path("/work/shared/vectors/nvlist")
C = Command


def vec(name: str) -> bytes:
    return (VEC / f"{name}.bin").read_bytes()


def vjson(name: str) -> dict:
    return json.loads((VEC / f"{name}.json").read_text())


POLL = nv.pack({"pending": 0})


def Shared(inner: RecordingTransport) -> RecordingTransport:
    """The transport handed to the CLI, made to survive the command's close()."""
    inner.close = lambda: None          # type: ignore[method-assign]
    return inner


@pytest.fixture
def rec() -> RecordingTransport:
    r = RecordingTransport(["ovpn0"])
    r.script(C.OVPN_POLL_PKT, *([POLL] * 20))
    return r


@pytest.fixture
def run(monkeypatch, capsys):
    """run(argv, transport=None) -> (exit status, stdout, stderr)."""
    opened: list[tuple[str, object]] = []

    def _run(argv, transport=None):
        if transport is not None:
            def fake_open(engine, *, socket_path=None):
                opened.append((engine, socket_path))
                return Shared(transport)
            monkeypatch.setattr(engineopts, "open_transport", fake_open)
        code = 0
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    _run.opened = opened
    return _run


def sets(r: RecordingTransport, command: Command) -> list:
    return [c for c in r.calls if c.method == "request" and c.command == command]


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ovpnctl: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


# ---------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------

def test_interface_create_default_name_prints_it(run, rec):
    code, out, err = run(["interface", "create"], rec)
    assert (code, out, err) == (0, "ovpn1\n", "")          # ovpn0 exists already
    created = [c for c in rec.calls if c.method == "create_interface"]
    assert created[0].ifname == "ovpn"
    assert out.strip() in rec.interfaces
    assert not sets(rec, C.OVPN_SET_IFMODE)


def test_interface_create_subnet_mode_sends_openvpn_bytes(run, rec):
    code, out, _ = run(["interface", "create", "ovpn5", "--mode", "subnet"], rec)
    assert code == 0 and out == "ovpn5\n"
    (req,) = sets(rec, C.OVPN_SET_IFMODE)
    assert req.ifname == "ovpn5" and req.data == vec("ovpn_set_ifmode_subnet")


def test_interface_create_configures_addresses_and_mtu(run, rec, monkeypatch):
    ran: list[list[str]] = []
    monkeypatch.setattr(netconf, "_run", lambda argv: ran.append(list(argv)))
    code, out, _ = run(["interface", "create", "ovpn3", "--address", "198.51.100.1/24",
                        "--address", "2001:db8:100::1/64", "--mtu", "1400"], rec)
    assert code == 0 and out == "ovpn3\n"
    assert ran == [["ip", "link", "set", "dev", "ovpn3", "mtu", "1400"],
                   ["ip", "addr", "add", "198.51.100.1/24", "dev", "ovpn3"],
                   ["ip", "addr", "add", "2001:db8:100::1/64", "dev", "ovpn3", "nodad"]]
    assert "ovpn3" in rec.interfaces


def test_interface_create_destroys_it_when_configuration_fails(run, rec, monkeypatch):
    def fail(argv):
        raise netconf.NetConfError("ip addr add 198.51.100.1/24 dev ovpn3: RTNETLINK: boom")
    monkeypatch.setattr(netconf, "_run", fail)
    code, out, err = run(["interface", "create", "ovpn3", "--address", "198.51.100.1/24"], rec)
    assert code == 1 and out == ""
    one_line_error(err, "RTNETLINK: boom")
    assert "ovpn3" not in rec.interfaces
    assert [c.method for c in rec.calls if "interface" in c.method] == \
        ["create_interface", "destroy_interface"]


def test_freebsd_address_commands():
    import ipaddress as ip
    cmds = netconf.commands("ovpn0", [ip.ip_interface("198.51.100.1/24"),
                                      ip.ip_interface("2001:db8:100::1/64")], 1400,
                            platform="freebsd14")
    assert cmds == [["ifconfig", "ovpn0", "mtu", "1400"],
                    ["ifconfig", "ovpn0", "inet", "198.51.100.1/24", "198.51.100.1", "alias"],
                    ["route", "-q", "add", "-net", "198.51.100.0/24", "-interface", "ovpn0"],
                    ["ifconfig", "ovpn0", "inet6", "2001:db8:100::1/64", "alias"]]
    sub = netconf.commands("ovpn0", [ip.ip_interface("198.51.100.1/24")], None,
                           subnet_mode=True, platform="freebsd14")
    assert sub == [["ifconfig", "ovpn0", "inet", "198.51.100.1/24", "alias"]]


@pytest.mark.parametrize("argv, needle", [
    (["--address", "198.51.100.1"], "prefix length"),
    (["--address", "banana/24"], "not an address"),
    (["--mtu", "100"], "576"),
])
def test_interface_create_bad_input(run, rec, argv, needle):
    code, out, err = run(["interface", "create", *argv], rec)
    assert code == 2 and out == ""
    one_line_error(err, needle)
    assert not [c for c in rec.calls if c.method == "create_interface"]


def test_interface_create_bad_name(run, rec):
    code, _, err = run(["interface", "create", "tun0"], rec)
    assert code == 1
    one_line_error(err, "'ovpn'")


def test_interface_destroy_and_unknown(run, rec):
    assert run(["interface", "destroy", "ovpn0"], rec)[0] == 0
    assert rec.interfaces == []
    r2 = RecordingTransport([])
    r2.fail(C.OVPN_POLL_PKT, E.ENXIO)
    code, _, err = run(["interface", "destroy", "ovpn9"], r2)
    assert code == 1
    one_line_error(err, "ovpn9", "ENXIO")


def test_interface_list_json(run):
    r = RecordingTransport(["ovpn0", "ovpn1"])
    r.script(C.OVPN_GET_PEER_STATS, vec("kreply_get_peer_stats"), E.ENOTSUP)
    code, out, _ = run(["interface", "list", "--json"], r)
    assert code == 0
    assert json.loads(out) == {"engine": "test", "interfaces": [
        {"name": "ovpn0", "peer_ids": [1, 2]}, {"name": "ovpn1", "peer_ids": None}]}


def test_interface_list_text(run):
    r = RecordingTransport(["ovpn0"])
    r.script(C.OVPN_GET_PEER_STATS, vec("kreply_get_peer_stats_nopeers"))
    code, out, _ = run(["interface", "list"], r)
    assert (code, out) == (0, "ovpn0\tpeers: -\n")


@pytest.mark.parametrize("argv", [["interface", "up", "ovpn0"], ["start", "ovpn0"]])
def test_start_vpn(run, rec, argv):
    assert run(argv, rec)[0] == 0
    (req,) = sets(rec, C.OVPN_START_VPN)
    assert req.ifname == "ovpn0" and req.data is None


# ---------------------------------------------------------------------------
# peer
# ---------------------------------------------------------------------------

class Inspecting(RecordingTransport):
    """Looks at the NEW_PEER socket while it is still open."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: dict = {}
        self.script(C.OVPN_POLL_PKT, *([POLL] * 5))

    def request(self, ifname, command, data, *, fd=None):
        if command == C.OVPN_NEW_PEER and fd is not None:
            s = socket.socket(fileno=os.dup(fd))
            try:
                self.seen = {
                    "family": s.family, "type": s.type, "local": s.getsockname(),
                    "reuseport": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
                    "v6only": (s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                               if s.family == socket.AF_INET6 else None),
                }
            finally:
                s.close()
        return super().request(ifname, command, data, fd=fd)


def test_peer_add_ipv4_matches_openvpn_client_bytes(run):
    r = Inspecting(["ovpn0"])
    code, out, err = run(["peer", "add", "ovpn0", "7", "--remote", "192.0.2.1:1194",
                          "--local", ":0"], r)
    assert (code, out, err) == (0, "", "")
    (req,) = sets(r, C.OVPN_NEW_PEER)
    expected = nv.unpack(vec("ovpn_new_peer_client_ipv4"))
    expected["fd"] = req.fd
    assert req.data == nv.pack(expected)
    assert r.seen["family"] == socket.AF_INET and r.seen["type"] == socket.SOCK_DGRAM
    assert r.seen["local"][1] != 0 and r.seen["reuseport"] == 1


def test_peer_add_server_style_with_vpn_ip(run):
    r = Inspecting(["ovpn0"])
    code, _, _ = run(["peer", "add", "ovpn0", "1", "--remote", "198.51.100.2:51000",
                      "--local", ":0", "--vpn-ip", "10.8.0.2"], r)
    assert code == 0
    (req,) = sets(r, C.OVPN_NEW_PEER)
    expected = nv.unpack(vec("ovpn_new_peer_server_ipv4"))
    expected["fd"] = req.fd
    assert req.data == nv.pack(expected)


def test_peer_add_ipv6_matches_openvpn_bytes(run):
    r = Inspecting(["ovpn0"])
    code, _, err = run(["peer", "add", "ovpn0", "0", "--remote", "[2001:db8::1]:1194",
                        "--local", "[::]:0"], r)
    assert code == 0, err
    (req,) = sets(r, C.OVPN_NEW_PEER)
    expected = nv.unpack(vec("ovpn_new_peer_client_ipv6"))
    expected["fd"] = req.fd
    assert req.data == nv.pack(expected)
    assert r.seen["family"] == socket.AF_INET6 and r.seen["v6only"] == 1


def test_peer_add_dual_stack_sends_v4_mapped(run):
    r = Inspecting(["ovpn0"])
    code, _, err = run(["peer", "add", "ovpn0", "3", "--remote", "192.0.2.1:1194",
                        "--local", "[::]:0", "--vpn-ip", "198.51.100.2",
                        "--vpn-ip", "2001:db8:100::2"], r)
    assert code == 0, err
    (req,) = sets(r, C.OVPN_NEW_PEER)
    nvl = req.nvlist()
    assert list(nvl) == ["remote", "vpn_ipv4", "vpn_ipv6", "fd", "peerid"]
    assert nvl["remote"]["af"] == 28
    assert nvl["remote"]["address"] == bytes.fromhex("00000000000000000000ffffc0000201")
    assert nvl["vpn_ipv6"] == bytes.fromhex("20010db8010000000000000000000002")
    assert r.seen["family"] == socket.AF_INET6 and r.seen["v6only"] == 0


def test_peer_add_specific_local_is_sent(run):
    r = Inspecting(["ovpn0"])
    code, _, err = run(["peer", "add", "ovpn0", "4", "--remote", "127.0.0.2:1194",
                        "--local", "127.0.0.1:0"], r)
    assert code == 0, err
    nvl = sets(r, C.OVPN_NEW_PEER)[0].nvlist()
    assert list(nvl) == ["local", "remote", "fd", "peerid"]
    assert nvl["local"]["address"] == bytes([127, 0, 0, 1])
    port = r.seen["local"][1]
    assert nvl["local"]["port"] == int.from_bytes(port.to_bytes(2, "big"), "little")


@pytest.mark.parametrize("argv, needle", [
    (["--remote", "2001:db8::1:1194"], "brackets"),
    (["--remote", "192.0.2.1"], "ADDR:PORT"),
    (["--remote", "192.0.2.1:0"], "1..65535"),
    (["--remote", "vpn.example:1194"], "not an IP address"),
    (["--remote", "192.0.2.1:1194", "--local", "[2001:db8::5]:0"], "IPv6"),
    (["--remote", "[2001:db8::1]:1194", "--local", "127.0.0.1:0"], "IPv4"),
    (["--remote", "192.0.2.1:1194", "--vpn-ip", "10.0.0.1", "--vpn-ip", "10.0.0.2"],
     "at most one IPv4"),
    (["--remote", "192.0.2.1:1194", "--vpn-ip", "nope"], "not an IP address"),
])
def test_peer_add_bad_address(run, rec, argv, needle):
    code, out, err = run(["peer", "add", "ovpn0", "1", *argv], rec)
    assert code == 2 and out == ""
    one_line_error(err, needle)
    assert not sets(rec, C.OVPN_NEW_PEER)


def test_peer_add_bad_peer_id(run, rec):
    code, _, err = run(["peer", "add", "ovpn0", "16777216", "--remote", "192.0.2.1:1194"], rec)
    assert code == 2
    one_line_error(err, "0..16777215")


def test_peer_add_port_in_use(run, rec):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        code, _, err = run(["peer", "add", "ovpn0", "1", "--remote", "127.0.0.1:1194",
                            "--local", f"127.0.0.1:{port}"], rec)
    finally:
        holder.close()
    assert code == 1
    one_line_error(err, f"127.0.0.1:{port} is in use")
    assert not sets(rec, C.OVPN_NEW_PEER)


def test_peer_add_port_held_with_reuseport_is_refused(run, rec):
    """Without the probe, SO_REUSEPORT would silently join another interface's port."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        code, _, err = run(["peer", "add", "ovpn0", "1", "--remote", "127.0.0.1:1194",
                            "--local", f"127.0.0.1:{port}"], rec)
    finally:
        holder.close()
    assert code == 1
    one_line_error(err, "is in use")


def test_peer_add_ebusy_says_what_to_do(run, rec):
    rec.fail(C.OVPN_NEW_PEER, E.EBUSY)
    code, _, err = run(["peer", "add", "ovpn0", "2", "--remote", "127.0.0.1:1194",
                        "--local", ":0"], rec)
    assert code == 1
    one_line_error(err, "one interface per peer", "EBUSY")


def test_peer_add_exists(run, rec):
    rec.fail(C.OVPN_NEW_PEER, E.EEXIST)
    code, _, err = run(["peer", "add", "ovpn0", "2", "--remote", "127.0.0.1:1194",
                        "--local", ":0"], rec)
    assert code == 1
    one_line_error(err, "peer id 2 already exists")


def test_peer_del_bytes_and_unknown_peer(run, rec):
    assert run(["peer", "del", "ovpn0", "7"], rec)[0] == 0
    assert sets(rec, C.OVPN_DEL_PEER)[0].data == vec("ovpn_del_peer")
    rec.fail(C.OVPN_DEL_PEER, E.ENOENT)
    code, _, err = run(["peer", "del", "ovpn0", "9"], rec)
    assert code == 1
    one_line_error(err, "OVPN_DEL_PEER on ovpn0", "peer id 9 does not exist", "ENOENT")


def test_peer_set_keepalive_bytes(run, rec):
    assert run(["peer", "set", "ovpn0", "7", "--keepalive", "10", "120"], rec)[0] == 0
    assert sets(rec, C.OVPN_SET_PEER)[0].data == vec("ovpn_set_peer")


def test_peer_set_negative(run, rec):
    code, _, err = run(["peer", "set", "ovpn0", "7", "--keepalive", "-1", "120"], rec)
    assert code == 1
    one_line_error(err, "keepalive interval")
    assert not sets(rec, C.OVPN_SET_PEER)


def test_peer_list_json_and_text(run, rec):
    rec.script(C.OVPN_GET_PEER_STATS, vec("kreply_get_peer_stats"), vec("kreply_get_peer_stats"))
    code, out, _ = run(["peer", "list", "ovpn0", "--json"], rec)
    assert code == 0
    assert json.loads(out) == {"interface": "ovpn0", "engine": "test", "peers": [
        {"peer_id": 1, "packets_in": 10, "packets_out": 11, "bytes_in": 1000, "bytes_out": 1100},
        {"peer_id": 2, "packets_in": 0, "packets_out": 1, "bytes_in": 0, "bytes_out": 84}]}
    code, out, _ = run(["peer", "list", "ovpn0"], rec)
    assert out.splitlines() == ["peer 1: packets in 10 out 11, bytes in 1000 out 1100",
                                "peer 2: packets in 0 out 1, bytes in 0 out 84"]


# ---------------------------------------------------------------------------
# key
# ---------------------------------------------------------------------------

def _dir(name: str, which: str) -> dict:
    pairs = {p[0]: p for p in vjson(name)["pairs"]}
    return {k: v for k, _t, v in pairs[which][2]}


def test_key_new_matches_openvpn_bytes_with_hex_and_files(run, rec, tmp_path):
    enc = _dir("ovpn_new_key_aes128gcm_secondary", "encrypt")
    dec = _dir("ovpn_new_key_aes128gcm_secondary", "decrypt")
    (tmp_path / "dk").write_bytes(bytes.fromhex(dec["key"]))          # raw bytes
    (tmp_path / "div").write_text(dec["iv"] + "\n")                     # hex text
    code, out, err = run(["key", "new", "ovpn0", "7", "--slot", "secondary", "--key-id", "1",
                          "--cipher", "aes-128-gcm", "--encrypt-key", enc["key"],
                          "--encrypt-iv", ":".join(enc["iv"][i:i + 2] for i in range(0, 16, 2)),
                          "--decrypt-key", f"@{tmp_path / 'dk'}",
                          "--decrypt-iv", f"@{tmp_path / 'div'}"], rec)
    assert (code, out, err) == (0, "", "")
    assert sets(rec, C.OVPN_NEW_KEY)[0].data == vec("ovpn_new_key_aes128gcm_secondary")


@pytest.mark.parametrize("name", ["ovpn_new_key_aes256gcm", "ovpn_new_key_chacha20poly1305"])
def test_key_new_primary_vectors(run, rec, name):
    pairs = {p[0]: p[2] for p in vjson(name)["pairs"]}
    enc, dec = _dir(name, "encrypt"), _dir(name, "decrypt")
    code, _, err = run(["key", "new", "ovpn0", str(pairs["peerid"]), "--key-id",
                        str(pairs["keyid"]), "--cipher", enc["cipher"],
                        "--encrypt-key", enc["key"], "--encrypt-iv", enc["iv"],
                        "--decrypt-key", dec["key"], "--decrypt-iv", dec["iv"]], rec)
    assert code == 0, err
    assert sets(rec, C.OVPN_NEW_KEY)[0].data == vec(name)


def test_key_new_none(run, rec):
    assert run(["key", "new", "ovpn0", "7", "--cipher", "none"], rec)[0] == 0
    assert sets(rec, C.OVPN_NEW_KEY)[0].data == vec("ovpn_new_key_none")


K16, IV = "00" * 16, "11" * 8


@pytest.mark.parametrize("argv, needle", [
    (["--cipher", "AES-256-GCM", "--encrypt-key", K16, "--encrypt-iv", IV,
      "--decrypt-key", K16, "--decrypt-iv", IV], "exactly 32 bytes"),
    (["--cipher", "AES-128-GCM", "--encrypt-key", K16, "--encrypt-iv", "11" * 12,
      "--decrypt-key", K16, "--decrypt-iv", IV], "exactly 8 bytes"),
    (["--cipher", "AES-128-GCM", "--encrypt-key", "zz" * 16, "--encrypt-iv", IV,
      "--decrypt-key", K16, "--decrypt-iv", IV], "not hex"),
    (["--cipher", "AES-128-GCM", "--encrypt-key", K16, "--encrypt-iv", IV,
      "--decrypt-key", K16], "--decrypt-iv is required"),
    (["--cipher", "BF-CBC"], "one of"),
    (["--cipher", "none", "--encrypt-key", K16], "takes no keys"),
    (["--cipher", "none", "--slot", "third"], "primary or secondary"),
    (["--cipher", "none", "--key-id", "8"], "0..7"),
    (["--cipher", "AES-128-GCM", "--encrypt-key", "@/nonexistent/k", "--encrypt-iv", IV,
      "--decrypt-key", K16, "--decrypt-iv", IV], "cannot read /nonexistent/k"),
])
def test_key_new_bad_input(run, rec, argv, needle):
    code, out, err = run(["key", "new", "ovpn0", "7", *argv], rec)
    assert code == 2 and out == ""
    one_line_error(err, needle)
    assert not sets(rec, C.OVPN_NEW_KEY)


def test_key_new_unknown_peer(run, rec):
    rec.fail(C.OVPN_NEW_KEY, E.ENOENT)
    code, _, err = run(["key", "new", "ovpn0", "5", "--cipher", "none"], rec)
    assert code == 1
    one_line_error(err, "peer id 5 does not exist")


def test_key_swap_and_del(run, rec):
    assert run(["key", "swap", "ovpn0", "7"], rec)[0] == 0
    assert sets(rec, C.OVPN_SWAP_KEYS)[0].data == vec("ovpn_swap_keys")
    assert run(["key", "del", "ovpn0", "7", "--slot", "secondary"], rec)[0] == 0
    assert sets(rec, C.OVPN_DEL_KEY)[0].data == vec("ovpn_del_key")
    rec.fail(C.OVPN_SWAP_KEYS, E.ENOLINK)
    code, _, err = run(["key", "swap", "ovpn0", "7"], rec)
    assert code == 1
    one_line_error(err, "no key in the secondary slot")


# ---------------------------------------------------------------------------
# stats / events
# ---------------------------------------------------------------------------

STATS_JSON = {"lost_ctrl": {"in": 0, "out": 0}, "lost_data": {"in": 3, "out": 1},
              "nomem_data": {"in": 0, "out": 0}, "data": {"in": 120, "out": 118},
              "ctrl": {"in": 0, "out": 0}, "tunnel": {"in": 10240, "out": 10240},
              "transport": {"in": 14000, "out": 14000}}


def test_stats_json(run, rec):
    rec.script(C.OVPN_GET_STATS, vec("kreply_get_stats"))
    rec.script(C.OVPN_GET_PEER_STATS, vec("kreply_get_peer_stats"))
    code, out, _ = run(["stats", "ovpn0", "--json"], rec)
    assert code == 0
    doc = json.loads(out)
    assert list(doc) == ["interface", "engine", "stats", "peers"]
    assert doc["stats"] == STATS_JSON and list(doc["stats"]) == list(STATS_JSON)
    assert doc["peers"][1] == {"peer_id": 2, "packets_in": 0, "packets_out": 1,
                               "bytes_in": 0, "bytes_out": 84}


def test_stats_text_and_old_kernel(run, rec):
    rec.script(C.OVPN_GET_STATS, vec("kreply_get_stats"), vec("kreply_get_stats"))
    rec.script(C.OVPN_GET_PEER_STATS, E.ENOTSUP, E.ENOTSUP)
    code, out, _ = run(["stats", "ovpn0"], rec)
    assert code == 0
    assert out.splitlines()[0] == "interface ovpn0"
    assert "data        in          120  out          118" in out
    assert "not supported" in out
    code, out, _ = run(["stats", "ovpn0", "--json"], rec)
    assert json.loads(out)["peers"] is None


def test_stats_permission(run, rec):
    rec.fail(C.OVPN_GET_STATS, E.EPERM)
    code, _, err = run(["stats", "ovpn0"], rec)
    assert code == 1
    one_line_error(err, "needs root")


NOTIFS = ["kreply_notif_del_peer_requested", "kreply_notif_del_peer_timeout",
          "kreply_notif_rotate_key", "kreply_notif_float_ipv4", "kreply_notif_float_ipv6"]


def test_events_json_lines(run, rec):
    rec.script(C.OVPN_GET_PKT, *[vec(n) for n in NOTIFS])
    code, out, _ = run(["events", "ovpn0", "--json"], rec)
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 5
    assert docs[1] == {"interface": "ovpn0", "peer_id": 7, "notification": "del_peer",
                       "del_reason": "timeout", "packets_in": 50, "packets_out": 60,
                       "bytes_in": 4000, "bytes_out": 5000}
    assert docs[0]["del_reason"] == "requested"
    assert docs[2] == {"interface": "ovpn0", "peer_id": docs[2]["peer_id"],
                       "notification": "rotate_key"}
    assert docs[3]["notification"] == "float" and set(docs[3]["address"]) == {"address", "port"}
    assert docs[4]["address"] == {"address": "fe80::b", "port": 50001, "scope_id": 3}
    # the queue is drained until ENOENT, with the full 4096-byte buffer each time
    assert [q[2] for q in rec.queries if q[1] == C.OVPN_GET_PKT] == [4096] * 6


def test_events_text(run, rec):
    rec.script(C.OVPN_GET_PKT, vec("kreply_notif_del_peer_timeout"))
    code, out, _ = run(["events", "ovpn0"], rec)
    assert out == "ovpn0 peer 7: deleted (timeout), packets in 50 out 60, bytes in 4000 out 5000\n"


def test_events_follow_until_interrupt(run, rec, monkeypatch):
    monkeypatch.setattr(stats_mod, "FOLLOW_INTERVAL", 0)
    rec.script(C.OVPN_GET_PKT, vec("kreply_notif_rotate_key"), E.ENOENT,
               vec("kreply_notif_del_peer_requested"), E.ENOENT, KeyboardInterrupt())
    code, out, _ = run(["events", "ovpn0", "--follow", "--json"], rec)
    assert code == 0
    assert [json.loads(x)["notification"] for x in out.splitlines()] == \
        ["rotate_key", "del_peer"]


# ---------------------------------------------------------------------------
# engine selection and errors
# ---------------------------------------------------------------------------

def test_engine_options_on_group_and_leaf(run, rec, monkeypatch):
    monkeypatch.delenv("BSD_OVPN_ENGINE", raising=False)
    run(["peer", "--engine", "userspace", "--engine-socket", "/x/g.sock", "del", "ovpn0", "7"], rec)
    run(["peer", "--engine", "kernel", "del", "--engine", "userspace", "ovpn0", "7"], rec)
    run(["stats", "ovpn0", "--engine-socket", "/x/l.sock"], rec.script(
        C.OVPN_GET_STATS, vec("kreply_get_stats")).script(
        C.OVPN_GET_PEER_STATS, vec("kreply_get_peer_stats")))
    monkeypatch.setenv("BSD_OVPN_ENGINE", "userspace")
    run(["key", "swap", "ovpn0", "7"], rec)
    assert run.opened == [("userspace", "/x/g.sock"), ("userspace", None),
                          ("auto", "/x/l.sock"), ("userspace", None)]


def test_engine_not_running_is_one_line(run, monkeypatch, tmp_path):
    path = str(tmp_path / "none.sock")
    code, out, err = run(["interface", "list", "--engine", "userspace",
                          "--engine-socket", path])
    assert code == 1 and out == ""
    one_line_error(err, f"userspace engine not running at {path}",
                   f"`ovpnctl engine run --socket {path}`")
    monkeypatch.setenv("BSD_OVPN_ENGINE_SOCKET", path)
    code, _, err = run(["peer", "list", "ovpn0"])           # auto on Linux -> userspace
    one_line_error(err, f"not running at {path}")


def test_kernel_engine_on_linux_is_one_line(run):
    code, _, err = run(["interface", "list", "--engine", "kernel"])
    assert code == 1
    one_line_error(err, "FreeBSD kernel module", "--engine userspace")


def test_debug_shows_the_traceback(rec, monkeypatch):
    rec.fail(C.OVPN_DEL_PEER, E.ENOENT)
    monkeypatch.setattr(engineopts, "open_transport",
                        lambda engine, socket_path=None: Shared(rec))
    with pytest.raises(OSError) as info:
        main(["--debug", "peer", "del", "ovpn0", "9"])
    assert info.value.errno == E.ENOENT


# ---------------------------------------------------------------------------
# genkey
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, cls", [("tls-crypt", keyfile.StaticKey),
                                       ("tls-auth", keyfile.StaticKey),
                                       ("secret", keyfile.StaticKey),
                                       ("tls-crypt-v2-server", keyfile.TLSCryptV2ServerKey)])
def test_genkey_files_are_private_and_readable(run, tmp_path, kind, cls):
    path = tmp_path / "k.key"
    path.write_text("old")
    path.chmod(0o644)
    code, out, err = run(["genkey", kind, str(path)])
    assert (code, out, err) == (0, "", "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = cls.load(path)
    assert key.format() == path.read_text()


def test_genkey_v2_client_with_metadata(run, tmp_path):
    srv = tmp_path / "srv.key"
    assert run(["genkey", "tls-crypt-v2-server", str(srv)])[0] == 0
    cli_path = tmp_path / "c.key"
    code, _, err = run(["genkey", "tls-crypt-v2-client", "--server-key", str(srv),
                        "--metadata", "aGVsbG8=", str(cli_path)])
    assert code == 0, err
    assert stat.S_IMODE(cli_path.stat().st_mode) == 0o600
    ck = keyfile.TLSCryptV2ClientKey.load(cli_path)
    kc, meta = keyfile.unwrap_client_key(keyfile.TLSCryptV2ServerKey.load(srv), ck.wkc)
    assert kc == ck.kc and meta == b"\x00hello"


def test_genkey_stdout(run):
    code, out, _ = run(["genkey", "tls-crypt"])
    assert code == 0 and keyfile.StaticKey.parse(out).format() == out


def test_genkey_errors(run, tmp_path):
    code, _, err = run(["genkey", "tls-crypt-v2-client", str(tmp_path / "c")])
    assert code == 2
    one_line_error(err, "--server-key")
    code, _, err = run(["genkey", "tls-crypt", "--server-key", "x", str(tmp_path / "c")])
    assert code == 2
    one_line_error(err, "tls-crypt-v2-client only")
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    code, _, err = run(["genkey", "tls-crypt", str(tmp_path / "link")])
    assert code == 2
    one_line_error(err, "symbolic link")
    assert target.read_text() == "keep"
    code, _, err = run(["genkey", "tls-crypt-v2-client", "--server-key",
                        str(tmp_path / "missing.key"), str(tmp_path / "c")])
    assert code == 1
    one_line_error(err, "missing.key")


@pytest.mark.openvpn
@pytest.mark.parametrize("kind", ["tls-crypt", "tls-auth"])
def test_openvpn_reads_our_static_key(run, tmp_path, kind):
    path = tmp_path / "k.key"
    assert run(["genkey", kind, str(path)])[0] == 0
    res = subprocess.run(["openvpn", "--test-crypto", "--secret", str(path), "--cipher",
                          "AES-256-CBC", "--auth", "SHA256", "--verb", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "SUCCEEDED" in res.stdout, res.stdout[-500:]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(l for i, l in enumerate(lines) if i != len(lines) - 2))  # teeth
    bad = subprocess.run(["openvpn", "--test-crypto", "--secret", str(path), "--cipher",
                          "AES-256-CBC", "--auth", "SHA256", "--verb", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


@pytest.mark.openvpn
def test_openvpn_wraps_with_our_server_key(run, tmp_path):
    srv = tmp_path / "srv.key"
    assert run(["genkey", "tls-crypt-v2-server", str(srv)])[0] == 0
    theirs = tmp_path / "theirs.key"
    subprocess.run(["openvpn", "--tls-crypt-v2", str(srv), "--genkey", "tls-crypt-v2-client",
                    str(theirs)], check=True, capture_output=True, timeout=60)
    ck = keyfile.TLSCryptV2ClientKey.load(theirs)
    kc, _meta = keyfile.unwrap_client_key(keyfile.TLSCryptV2ServerKey.load(srv), ck.wkc)
    assert kc == ck.kc


@pytest.mark.openvpn
def test_openvpn_client_sends_our_wrapped_client_key(run, tmp_path, pki):
    """A stock client loads our tls-crypt-v2 client key: its first packet carries our WKc."""
    srv, ckey = tmp_path / "srv.key", tmp_path / "c.key"
    assert run(["genkey", "tls-crypt-v2-server", str(srv)])[0] == 0
    assert run(["genkey", "tls-crypt-v2-client", "--server-key", str(srv), str(ckey)])[0] == 0
    cred = pki.client("genkey-test")
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(20)
    proc = subprocess.Popen(
        ["openvpn", "--client", "--dev", "null", "--proto", "udp", "--remote", "127.0.0.1",
         str(sink.getsockname()[1]), "--nobind", "--ca", str(pki.ca_path), "--cert",
         str(cred.cert_path), "--key", str(cred.key_path), "--tls-crypt-v2", str(ckey),
         "--verb", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        data, _ = sink.recvfrom(4096)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=20)[0]
        sink.close()
    assert data[0] >> 3 == 10, log[-500:]          # P_CONTROL_HARD_RESET_CLIENT_V3
    assert data.endswith(keyfile.TLSCryptV2ClientKey.load(ckey).wkc)


# ---------------------------------------------------------------------------
# the same commands against an in-process userspace engine (no root)
# ---------------------------------------------------------------------------

@pytest.fixture
def engine_socket(engine_daemon):
    """The socket of an in-process engine daemon (tests/unit/conftest.py's engine_daemon)."""
    return engine_daemon.path


def test_cli_against_in_process_engine(run, engine_socket):
    eng = ["--engine", "userspace", "--engine-socket", engine_socket]
    code, out, err = run(["interface", "create", *eng])
    assert (code, out) == (0, "ovpn0\n"), err
    code, _, err = run(["peer", "add", "ovpn0", "1", "--remote", "127.0.0.1:1194",
                        "--local", "127.0.0.1:0", *eng])
    assert code == 0, err
    code, _, err = run(["peer", "add", "ovpn0", "1", "--remote", "127.0.0.1:1194",
                        "--local", "127.0.0.1:0", *eng])
    assert code == 1
    one_line_error(err, "peer id 1 already exists")
    k = ["--encrypt-key", "01" * 32, "--encrypt-iv", "02" * 8,
         "--decrypt-key", "03" * 32, "--decrypt-iv", "04" * 8]
    assert run(["key", "new", "ovpn0", "1", "--cipher", "AES-256-GCM", *k, *eng])[0] == 0
    assert run(["key", "new", "ovpn0", "1", "--slot", "secondary", "--key-id", "1",
                "--cipher", "CHACHA20-POLY1305", *k, *eng])[0] == 0
    assert run(["key", "swap", "ovpn0", "1", *eng])[0] == 0
    assert run(["key", "del", "ovpn0", "1", "--slot", "secondary", *eng])[0] == 0
    code, _, err = run(["key", "swap", "ovpn0", "1", *eng])
    one_line_error(err, "no key in the secondary slot")
    assert run(["peer", "set", "ovpn0", "1", "--keepalive", "10", "60", *eng])[0] == 0
    assert run(["start", "ovpn0", *eng])[0] == 0
    code, out, _ = run(["stats", "ovpn0", "--json", *eng])
    doc = json.loads(out)
    assert doc["engine"] == "userspace" and doc["interface"] == "ovpn0"
    assert doc["peers"] == [{"peer_id": 1, "packets_in": 0, "packets_out": 0,
                             "bytes_in": 0, "bytes_out": 0}]
    assert set(doc["stats"]) == set(STATS_JSON)
    code, out, _ = run(["interface", "list", "--json", *eng])
    assert json.loads(out) == {"engine": "userspace",
                               "interfaces": [{"name": "ovpn0", "peer_ids": [1]}]}
    assert run(["peer", "del", "ovpn0", "1", *eng])[0] == 0
    code, _, err = run(["peer", "del", "ovpn0", "1", *eng])
    one_line_error(err, "peer id 1 does not exist")
    code, out, _ = run(["events", "ovpn0", "--json", *eng])
    (ev,) = [json.loads(x) for x in out.splitlines()]
    assert ev["notification"] == "del_peer" and ev["del_reason"] == "requested"
    assert run(["interface", "destroy", "ovpn0", *eng])[0] == 0
    code, _, err = run(["stats", "ovpn0", *eng])
    assert code == 1
    one_line_error(err, "ovpn0")


def test_engine_run_refusals(run, monkeypatch, tmp_path):
    from bsd_ovpn.engine import daemon as engine_daemon
    path = str(tmp_path / "e.sock")
    monkeypatch.setattr(engine_daemon.os, "geteuid", lambda: 1000)
    code, _, err = run(["engine", "run", "--socket", path])
    assert code == 1
    one_line_error(err, "must run as root")
    monkeypatch.setattr(engine_daemon.os, "geteuid", lambda: 0)
    code, _, err = run(["engine", "run", "--socket", path, "--group", "no-such-group-xq"])
    assert code == 1
    one_line_error(err, "--group 'no-such-group-xq': no such group")
    assert not os.path.exists(path)


def test_transport_injection_through_click_obj(rec):
    """Embedders (and CliRunner users) can hand the commands a transport directly."""
    from click.testing import CliRunner
    from bsd_ovpn.cli import cli
    res = CliRunner().invoke(cli, ["peer", "del", "ovpn0", "7"], obj={"transport": rec})
    assert res.exit_code == 0, res.output
    assert sets(rec, C.OVPN_DEL_PEER)[0].data == vec("ovpn_del_peer")
    assert not rec.closed                   # an injected transport is the caller's to close
