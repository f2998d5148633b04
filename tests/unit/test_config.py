"""OpenVPN config files: tokenizer, inline blocks, helper expansion, every error names file:line."""
from __future__ import annotations

import math
import os
import textwrap

import pytest

from bsd_ovpn.config import (
    NOOP_DIRECTIVES, Config, Pool, Remote, Route, RouteIPv6, TokenizeError, VerifyX509Name,
    load, load_ccd, loads, loads_ccd, split_line,
)
from bsd_ovpn.errors import ConfigError
from bsd_ovpn.proto.keyfile import (
    StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, genkey,
)
from bsd_ovpn.proto.wrap import NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Client

CERT = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
PKEY = "-----BEGIN PRIVATE KEY-----\nMIIBfake\n-----END PRIVATE KEY-----\n"
DH = "-----BEGIN DH PARAMETERS-----\nMIIBfake\n-----END DH PARAMETERS-----\n"
CRL = "-----BEGIN X509 CRL-----\nMIIBfake\n-----END X509 CRL-----\n"
TC = StaticKey(bytes(range(256)))


# --- tokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("line,tokens", [
    ("", []),
    ("   ", []),
    ("# comment", []),
    ("; comment", []),
    ("port 1194", ["port", "1194"]),
    ("  port\t1194  ", ["port", "1194"]),
    ("port 1194 # trailing", ["port", "1194"]),
    ("port 1194 ;trailing", ["port", "1194"]),
    ("push a#b", ["push", "a#b"]),                       # '#' inside a parameter is literal
    ('push "route 10.0.0.0 255.0.0.0"', ["push", "route 10.0.0.0 255.0.0.0"]),
    ('push "dhcp-option DNS 192.0.2.1"', ["push", "dhcp-option DNS 192.0.2.1"]),
    ("ca 'my ca.crt'", ["ca", "my ca.crt"]),
    ("x 'a\\b'", ["x", "a\\b"]),                         # no escapes in single quotes
    ('x "a\\"b"', ["x", 'a"b']),
    ("x a\\ b", ["x", "a b"]),
    ("x a\\\\b", ["x", "a\\b"]),
    ('x ""', ["x", ""]),
    ('x "a"b', ["x", "a", "b"]),                         # closing quote ends the parameter
    ("--port 1194", ["--port", "1194"]),                 # '--' is stripped by the loader
])
def test_split_line(line, tokens):
    assert split_line(line) == tokens


@pytest.mark.parametrize("line,fragment", [
    ('push "route', 'closing quotation (")'),
    ("ca 'x", "closing single quotation"),
    ("ca c:\\temp\\ca.crt", "bad backslash"),
    ("ca x\\", "residual"),
])
def test_split_line_errors(line, fragment):
    with pytest.raises(TokenizeError) as info:
        split_line(line)
    assert fragment in str(info.value)


# --- typical files ----------------------------------------------------------------------------

def _write(d, name, text, mode=0o600):
    p = d / name
    p.write_text(text)
    os.chmod(p, mode)
    return p


@pytest.fixture
def pki_dir(tmp_path):
    _write(tmp_path, "ca.crt", CERT, 0o644)
    _write(tmp_path, "server.crt", CERT, 0o644)
    _write(tmp_path, "server.key", PKEY)
    _write(tmp_path, "dh.pem", DH, 0o644)
    _write(tmp_path, "crl.pem", CRL, 0o644)
    _write(tmp_path, "tc.key", TC.format())
    _write(tmp_path, "ta.key", TC.format())
    (tmp_path / "ccd").mkdir()
    return tmp_path


SERVER_CONF = """\
# stock-style server
port 1194
proto udp
dev tun
topology subnet
server 198.51.100.0 255.255.255.0
server-ipv6 2001:db8:1::/64
ca ca.crt
cert server.crt
key server.key  # this file should be kept secret
dh none
tls-crypt tc.key
data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305
push "route 192.0.2.0 255.255.255.0"
push "dhcp-option DNS 192.0.2.53"
client-config-dir ccd
client-to-client
keepalive 10 60
reneg-sec 3600
hand-window 60
max-clients 100
user nobody
group nogroup
persist-key
persist-tun
status openvpn-status.log
status-version 2
verb 4
mute 20
explicit-exit-notify 1
disable-dco
crl-verify crl.pem
remote-cert-tls client
tls-version-min 1.2
"""


def test_typical_server_conf(pki_dir):
    p = _write(pki_dir, "server.conf", SERVER_CONF, 0o644)
    c = load(p)
    assert c.mode == "server" and c.tls_server and not c.tls_client and c.is_server
    assert c.port == 1194 and c.proto == "udp" and c.dev == "tun" and c.dev_type == "tun"
    assert c.ifconfig == ("198.51.100.1", "255.255.255.0")
    assert c.ifconfig_pool == Pool("198.51.100.2", "198.51.100.254", "255.255.255.0")
    assert c.route_gateway == "198.51.100.2"
    assert c.ifconfig_ipv6 == ("2001:db8:1::1/64", "2001:db8:1::2")
    assert c.ifconfig_ipv6_pool == "2001:db8:1::1000/64"
    # user pushes first, then the helpers' pushes in OpenVPN's order
    assert c.push == ["route 192.0.2.0 255.255.255.0", "dhcp-option DNS 192.0.2.53",
                      "tun-ipv6", "route-gateway 198.51.100.1", "topology subnet",
                      "ping 10", "ping-restart 60"]
    assert c.ping == 10 and c.ping_restart == 120          # server: 2 * t locally
    assert c.ca.path == str(pki_dir / "ca.crt") and c.ca.text == CERT
    assert c.key.text == PKEY and "MIIB" not in repr(c.key)
    assert c.dh is None
    assert c.crl_verify.read() == CRL
    assert c.tls_crypt.key == TC and c.control_wrap_kind() == "tls-crypt"
    w = c.new_control_wrap()
    assert isinstance(w, TLSCrypt) and w.server
    assert c.data_ciphers == ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"]
    assert c.client_config_dir == str(pki_dir / "ccd")
    assert c.client_to_client and c.max_clients == 100
    assert (c.user, c.group) == ("nobody", "nogroup")
    assert c.persist_tun and c.disable_dco
    assert c.status.path == str(pki_dir / "openvpn-status.log") and c.status.interval == 60
    assert c.status_version == 2 and c.verb == 4 and c.mute == 20
    assert c.explicit_exit_notify == 1
    assert c.remote_cert_tls == "client" and c.tls_version_min == "1.2"
    assert c.origins["server"] == (str(p), 6)


CLIENT_CONF = f"""\
client
dev tun
proto udp
remote 192.0.2.1 1194
remote vpn.example.net
remote-random
resolv-retry infinite
nobind
persist-key
persist-tun
remote-cert-tls server
verify-x509-name server name
data-ciphers AES-256-GCM
connect-retry 2 30
connect-retry-max 5
explicit-exit-notify
verb 3
disable-dco
key-direction 1
<ca>
{CERT}</ca>
<cert>
{CERT}</cert>
<key>
{PKEY}</key>
<tls-auth>
{TC.format()}</tls-auth>
auth SHA256
"""


def test_typical_client_conf_with_inline_blocks():
    c = loads(CLIENT_CONF, "/etc/openvpn/client.conf")
    assert c.client and c.pull and c.tls_client and not c.tls_server and not c.is_server
    assert c.remotes == [Remote("192.0.2.1", 1194, "udp"), Remote("vpn.example.net", 1194, "udp")]
    assert c.remote_random and c.resolv_retry == math.inf and c.nobind
    assert c.remote_cert_tls == "server"
    assert c.verify_x509_name == VerifyX509Name("server", "name")
    assert c.data_ciphers == ["AES-256-GCM"]
    assert (c.connect_retry, c.connect_retry_max_interval, c.connect_retry_max) == (2, 30, 5)
    assert c.explicit_exit_notify == 1
    assert c.ca.inline and c.ca.text == CERT and c.cert.text == CERT and c.key.text == PKEY
    assert c.tls_auth.key == TC and c.tls_auth.direction == 1 and c.tls_auth.source is None
    w = c.new_control_wrap()
    assert isinstance(w, TLSAuth) and w.overhead == 32 + 8        # auth SHA256
    assert c.ping == 0


def test_client_keepalive_and_tls_crypt_v2_inline():
    sk = TLSCryptV2ServerKey.generate()
    cli = genkey("tls-crypt-v2-client", server_key=sk)
    text = (f"client\ndev tun\nremote 192.0.2.1\nca x.crt\nkeepalive 10 60\n"
            f"<tls-crypt-v2>\n{cli}</tls-crypt-v2>\n<cert>\n{CERT}</cert>\n<key>\n{PKEY}</key>\n")
    with pytest.raises(ConfigError) as info:
        loads(text, "/nonexistent/c.conf")
    assert info.value.directive == "ca" and info.value.line == 4
    c = loads(text.replace("ca x.crt\n", f"<ca>\n{CERT}</ca>\n"))
    assert c.ping == 10 and c.ping_restart == 60 and c.push == []
    assert isinstance(c.tls_crypt_v2.key, TLSCryptV2ClientKey)
    assert isinstance(c.new_control_wrap(), TLSCryptV2Client)
    assert c.control_wrap_kind() == "tls-crypt-v2"


def test_server_tls_crypt_v2_and_tls_auth_files(pki_dir):
    _write(pki_dir, "v2.key", TLSCryptV2ServerKey.generate().format())
    c = loads("server 198.51.100.0 255.255.255.0\ndev tun\nca ca.crt\ncert server.crt\n"
              "key server.key\ntls-crypt-v2 v2.key force-cookie\ntls-auth ta.key 0\n",
              str(pki_dir / "s.conf"))
    assert isinstance(c.tls_crypt_v2.key, TLSCryptV2ServerKey) and c.tls_crypt_v2.force_cookie
    assert c.tls_auth.direction == 0 and c.tls_auth.source == str(pki_dir / "ta.key")
    # net30 default topology
    assert c.topology == "net30"
    assert c.ifconfig == ("198.51.100.1", "198.51.100.2")
    assert c.ifconfig_pool == Pool("198.51.100.4", "198.51.100.251")
    assert Route("198.51.100.0", "255.255.255.0") in c.routes
    assert c.push == ["route 198.51.100.1", "topology net30"]
    assert isinstance(c.new_control_wrap(), TLSAuth)


def test_server_net30_client_to_client_and_nopool(pki_dir):
    base = "dev tun\nca ca.crt\ncert server.crt\nkey server.key\n"
    c = loads(base + "client-to-client\nserver 198.51.100.0 255.255.255.0\n",
              str(pki_dir / "s.conf"))
    assert c.push == ["route 198.51.100.0 255.255.255.0", "topology net30"]
    c = loads(base + "server 198.51.100.0 255.255.255.248 nopool\n", str(pki_dir / "s.conf"))
    assert c.ifconfig_pool is None
    c = loads(base + "server 198.51.100.0 255.255.255.248\n", str(pki_dir / "s.conf"))
    assert c.ifconfig_pool == Pool("198.51.100.4", "198.51.100.7")   # /29: no end reserve

def test_multihome_flag(pki_dir):
    """--multihome (a server on the wildcard address replies from the address used)."""
    base = "dev tun\nca ca.crt\ncert server.crt\nkey server.key\nserver 198.51.100.0 255.255.255.0\n"
    assert loads(base, str(pki_dir / "s.conf")).multihome is False
    assert loads(base + "multihome\n", str(pki_dir / "s.conf")).multihome is True
    with pytest.raises(ConfigError, match="multihome"):
        loads(base + "multihome yes\n", str(pki_dir / "s.conf"))



def test_double_dash_bom_include_and_cd(pki_dir):
    _write(pki_dir, "common.conf", "dev tun\nca ca.crt\n")
    sub = pki_dir / "sub"
    sub.mkdir()
    text = ("\ufeff--tls-client\n--config common.conf\nremote 192.0.2.9 1195 udp6\n"
            f"cd {sub}\ncert ../server.crt\nkey ../server.key\nnobind\n")
    c = loads(text, str(pki_dir / "c.conf"))
    assert c.tls_client and not c.pull and c.dev == "tun"
    assert c.remotes == [Remote("192.0.2.9", 1195, "udp6")]
    assert c.cert.path == str(pki_dir / "server.crt")


def test_noop_and_ignored_directives(pki_dir):
    c = loads("client\ndev tun\nremote 192.0.2.1\n" + f"<ca>\n{CERT}</ca>\n"
              + f"<cert>\n{CERT}</cert>\n<key>\n{PKEY}</key>\n"
              + "persist-key\nmute-replay-warnings\nkey-derivation tls-ekm\n"
              + "ignore-unknown-option frobnicate block-outside-dns\nfrobnicate 1 2\n"
              + "setenv opt another-unknown x\nsetenv FOO bar\n", str(pki_dir / "c.conf"))
    assert c.setenv == {"FOO": "bar"}
    assert "persist-key" in NOOP_DIRECTIVES and "key-derivation" in NOOP_DIRECTIVES


def test_ccd_file(tmp_path):
    p = tmp_path / "alice"
    p.write_text("iroute 192.0.2.0 255.255.255.0\niroute-ipv6 2001:db8:5::/64\n"
                 "ifconfig-push 198.51.100.50 255.255.255.0\npush \"route 192.0.2.128 "
                 "255.255.255.128\"\npush-reset\n")
    c = load_ccd(p)
    assert c.iroutes[0].network == "192.0.2.0" and c.iroutes[0].netmask == "255.255.255.0"
    assert c.iroutes_ipv6[0].network == "2001:db8:5::/64"
    assert c.ifconfig_push == ("198.51.100.50", "255.255.255.0")
    assert c.push == ["route 192.0.2.128 255.255.255.128"] and c.push_reset
    with pytest.raises(ConfigError) as info:
        loads_ccd("iroute 192.0.2.1 255.255.255.0\n", "ccd/bob")
    assert str(info.value).startswith("ccd/bob:1: iroute:")
    with pytest.raises(ConfigError, match="cannot be used in a client-config-dir"):
        loads_ccd("port 1\n", "ccd/bob")


def test_routes_parse():
    c = loads("client\ndev tun\nremote 192.0.2.1\n" + f"<ca>\n{CERT}</ca>\n"
              + f"<cert>\n{CERT}</cert>\n<key>\n{PKEY}</key>\n"
              + "route 192.0.2.0 255.255.255.0 vpn_gateway 5\nroute 192.0.2.7\n"
              + "route-ipv6 2001:db8:9::/48 2001:db8::1 3\nroute-ipv6 2001:db8:a::/48\n")
    assert c.routes == [Route("192.0.2.0", "255.255.255.0", "vpn_gateway", 5),
                        Route("192.0.2.7")]
    assert c.routes_ipv6 == [RouteIPv6("2001:db8:9::/48", "2001:db8::1", 3),
                             RouteIPv6("2001:db8:a::/48")]


# --- every error names file:line:directive ----------------------------------------------------

CLIENT_HEAD = "client\ndev tun\nremote 192.0.2.1\n"     # lines 1-3; the bad line is line 4
CLIENT_TAIL = f"<ca>\n{CERT}</ca>\n<cert>\n{CERT}</cert>\n<key>\n{PKEY}</key>\n"


@pytest.mark.parametrize("line,directive,fragment", [
    ("frobnicate 1", "frobnicate", "unknown"),
    ("proto tcp", "proto", "not supported"),
    ("proto tcp-client", "proto", "only carries UDP"),
    ("proto sctp", "proto", "must be one of"),
    ("port", "port", "expects 1 argument"),
    ("port 70000", "port", "outside 1..65535"),
    ("port abc", "port", "not an integer"),
    ("verb 12", "verb", "outside 0..11"),
    ("dev tap0", "dev", "layer-3"),
    ("dev-type tap", "dev-type", "layer-3"),
    ("topology star", "topology", "must be one of"),
    ("comp-lzo", "comp-lzo", "compression"),
    ("compress lz4-v2", "compress", "compression"),
    ("allow-compression yes", "allow-compression", "compression"),
    ("fragment 1300", "fragment", "not supported"),
    ("secret static.key", "secret", "static-key"),
    ("up /bin/true", "up", "script hooks"),
    ("learn-address /bin/true", "learn-address", "script hooks"),
    ("iroute 192.0.2.0 255.255.255.0", "iroute", "client-config-dir"),
    ("data-ciphers AES-256-CBC", "data-ciphers", "not supported by the data channel"),
    ("data-ciphers ?BF-CBC", "data-ciphers", "no usable cipher"),
    ("data-ciphers-fallback BF-CBC", "data-ciphers-fallback", "not supported"),
    ("auth BOGUS", "auth", "unknown digest"),
    ("key-direction 2", "key-direction", "must be one of"),
    ("tls-auth /nonexistent/ta.key 1", "tls-auth", "cannot read"),
    ("tls-crypt /nonexistent/tc.key", "tls-crypt", "cannot read"),
    ("ca /nonexistent/ca.crt", "ca", "cannot read"),
    ("remote-cert-tls peer", "remote-cert-tls", "must be one of"),
    ("verify-x509-name foo cn", "verify-x509-name", "must be one of"),
    ("keepalive 10 15", "keepalive", "at least twice"),
    ("keepalive 10", "keepalive", "expects 2 argument"),
    ("server 198.51.100.0 255.255.255.0", "server", "cannot be used together"),
    ("server 198.51.100.1 255.255.255.0", "server", "not the network address"),
    ("server 198.51.100.0 255.0.255.0", "server", "netmask"),
    ("server 198.51.100.0 255.255.255.0 pool", "server", "nopool"),
    ("server-ipv6 2001:db8::/32", "server-ipv6", "/64 and /124"),
    ("ifconfig 198.51.100.1", "ifconfig", "expects 2"),
    ("ifconfig 198.51.100.1 nonsense", "ifconfig", "not an IPv4"),
    ("route-ipv6 nonsense", "route-ipv6", "not an IPv6"),
    ("push \"route 10.0.0.0 255.0.0.0\"", "push", "TLS server"),
    ("client-config-dir ccd", "client-config-dir", "only valid in a server"),
    ("max-clients 5", "max-clients", "only valid in a server"),
    ("mode server", "mode", "cannot be used together"),
    ("tls-server", "tls-server", "cannot both"),
    ("tls-crypt-v2 /nonexistent/v2.key", "tls-crypt-v2", "cannot read"),
    ("status-version 4", "status-version", "outside 1..3"),
    ("tls-version-min 1.4", "tls-version-min", "must be one of"),
    ("auth-user-pass-verify /bin/check via-pipe", "auth-user-pass-verify", "must be one of"),
    ("crl-verify /etc crl dir", "crl-verify", "expects 1..2"),
    ("connection", "connection", "not supported"),
    ("ping 10", "ping", "conflicts"),
])
def test_errors_name_file_line_directive(line, directive, fragment):
    text = CLIENT_HEAD + line + "\n" + CLIENT_TAIL
    if directive == "ping":
        text += "keepalive 10 60\n"
    with pytest.raises(ConfigError) as info:
        loads(text, "/etc/openvpn/client.conf")
    err = info.value
    assert err.path == "/etc/openvpn/client.conf"
    assert err.directive == directive
    assert fragment in str(err)
    if directive not in ("server", "mode", "ping", "push", "client-config-dir",
                         "max-clients"):
        assert err.line == 4
        assert str(err).startswith(f"/etc/openvpn/client.conf:4: {directive}:")
    else:
        assert err.line is not None and str(err).startswith("/etc/openvpn/client.conf:")


def test_tokenizer_error_has_file_and_line():
    with pytest.raises(ConfigError) as info:
        loads(CLIENT_HEAD + 'push "unterminated\n' + CLIENT_TAIL, "c.conf")
    assert info.value.line == 4 and str(info.value).startswith("c.conf:4:")


def test_inline_errors():
    with pytest.raises(ConfigError) as info:
        loads(CLIENT_HEAD + "<ca>\n" + CERT, "c.conf")
    assert info.value.line == 4 and info.value.directive == "ca" and "</ca>" in str(info.value)
    with pytest.raises(ConfigError) as info:
        loads(CLIENT_HEAD + "<port>\n1194\n</port>\n" + CLIENT_TAIL, "c.conf")
    assert info.value.directive == "port" and "inline" in str(info.value)
    with pytest.raises(ConfigError) as info:
        loads(CLIENT_HEAD + "<tls-crypt>\nnot a key\n</tls-crypt>\n" + CLIENT_TAIL, "c.conf")
    assert info.value.directive == "tls-crypt" and info.value.line == 4
    with pytest.raises(ConfigError) as info:
        loads(CLIENT_HEAD + "<ca>\nno pem here\n</ca>\n", "c.conf")
    assert info.value.directive == "ca" and "no PEM" in str(info.value)


def test_cross_checks():
    tail = CLIENT_TAIL
    with pytest.raises(ConfigError, match="mutually exclusive"):
        loads(CLIENT_HEAD + tail + f"<tls-auth>\n{TC.format()}</tls-auth>\n"
              f"<tls-crypt>\n{TC.format()}</tls-crypt>\n", "c.conf")
    with pytest.raises(ConfigError) as info:
        loads(CLIENT_HEAD + tail + f"<tls-crypt-v2>\n{TLSCryptV2ServerKey.generate().format()}"
              "</tls-crypt-v2>\n", "c.conf")
    assert "client* key" in str(info.value) and info.value.line is not None
    with pytest.raises(ConfigError, match="dev: missing"):
        loads("client\nremote 192.0.2.1\n" + tail, "c.conf")
    with pytest.raises(ConfigError, match="static-key mode"):
        loads("dev tun\n" + tail, "c.conf")
    with pytest.raises(ConfigError, match="at least one 'remote'"):
        loads("client\ndev tun\n" + tail, "c.conf")
    with pytest.raises(ConfigError, match="ca: missing"):
        loads(CLIENT_HEAD + f"<cert>\n{CERT}</cert>\n<key>\n{PKEY}</key>\n", "c.conf")
    with pytest.raises(ConfigError, match="together"):
        loads(CLIENT_HEAD + f"<ca>\n{CERT}</ca>\n<cert>\n{CERT}</cert>\n", "c.conf")
    with pytest.raises(ConfigError, match="auth none"):
        loads(CLIENT_HEAD + tail + f"auth none\n<tls-auth>\n{TC.format()}</tls-auth>\n", "c.conf")
    with pytest.raises(ConfigError, match="cannot tell the type"):
        loads("client\ndev foo0\nremote 192.0.2.1\n" + tail, "c.conf")


def test_auth_user_pass(tmp_path):
    up = tmp_path / "up.txt"
    up.write_text("alice\nsecret\n")
    os.chmod(up, 0o600)
    c = loads(f"client\ndev tun\nremote 192.0.2.1\n<ca>\n{CERT}</ca>\nauth-user-pass up.txt\n",
              str(tmp_path / "c.conf"))
    assert c.auth_user_pass.username == "alice" and c.auth_user_pass.password == "secret"
    assert "secret" not in repr(c.auth_user_pass)
    c = loads(f"client\ndev tun\nremote 192.0.2.1\n<ca>\n{CERT}</ca>\n"
              "<auth-user-pass>\nbob\npw\n</auth-user-pass>\n")
    assert (c.auth_user_pass.username, c.auth_user_pass.password) == ("bob", "pw")
    with pytest.raises(ConfigError, match="username"):
        loads(f"client\ndev tun\nremote 192.0.2.1\n<ca>\n{CERT}</ca>\n"
              "<auth-user-pass>\n\n</auth-user-pass>\n", "c.conf")


def test_server_auth_user_pass_verify_and_dh_crl(pki_dir):
    c = loads("server 198.51.100.0 255.255.255.0\ndev tun\nca ca.crt\ncert server.crt\n"
              "key server.key\ndh dh.pem\nauth-user-pass-verify /usr/bin/check via-file\n"
              "verify-client-cert none\n", str(pki_dir / "s.conf"))
    assert c.dh.text == DH and c.auth_user_pass_verify.method == "via-file"
    assert c.verify_client_cert == "none"
    with pytest.raises(ConfigError) as info:
        loads("server 198.51.100.0 255.255.255.0\ndev tun\nca ca.crt\ncert server.crt\n"
              "key server.key\ndh ca.crt\n", str(pki_dir / "s.conf"))
    assert info.value.line == 6 and "DH PARAMETERS" in str(info.value)


def test_cipher_fallback_appended():
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "cipher aes-128-gcm\n")
    assert c.cipher == "AES-128-GCM"
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "cipher CHACHA20-POLY1305\n")
    assert c.data_ciphers[-1] == "CHACHA20-POLY1305"
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "cipher AES-256-CBC\n")   # legacy: recorded only
    assert c.cipher == "AES-256-CBC" and "AES-256-CBC" not in c.data_ciphers
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "data-ciphers aes-256-gcm:?BF-CBC\nncp-ciphers "
              "AES-128-GCM:AES-256-GCM\n")
    assert c.data_ciphers == ["AES-128-GCM", "AES-256-GCM"]


def test_include_loop_is_an_error(tmp_path):
    p = tmp_path / "loop.conf"
    p.write_text("config loop.conf\n")
    with pytest.raises(ConfigError, match="include depth"):
        load(p)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "none.conf")
    assert "none.conf" in str(info.value)


def test_default_nowrap():
    c = loads(CLIENT_HEAD + CLIENT_TAIL)
    assert isinstance(c.new_control_wrap(), NoWrap) and c.control_wrap_kind() == "none"
    assert isinstance(c, Config)


def test_stock_spec_configs_parse(tmp_path):
    """The §15.3 stock server.conf / client.conf parse unchanged."""
    for name, text in (("ca.crt", CERT), ("server.crt", CERT), ("server.key", PKEY),
                       ("client.crt", CERT), ("client.key", PKEY), ("tc.key", TC.format())):
        _write(tmp_path, name, text)
    srv = textwrap.dedent("""\
        port 1194
        proto udp
        dev tun
        topology subnet
        server 198.51.100.0 255.255.255.0
        ca ca.crt
        cert server.crt
        key server.key
        dh none
        tls-crypt tc.key
        data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305
        keepalive 10 60
        verb 4
        disable-dco
        """)
    cli = textwrap.dedent("""\
        client
        dev tun
        proto udp
        remote 127.0.0.1 1194
        nobind
        ca ca.crt
        cert client.crt
        key client.key
        remote-cert-tls server
        tls-crypt tc.key
        data-ciphers AES-256-GCM
        verb 4
        disable-dco
        """)
    s = load(_write(tmp_path, "server.conf", srv))
    c = load(_write(tmp_path, "client.conf", cli))
    assert s.push == ["route-gateway 198.51.100.1", "topology subnet", "ping 10",
                      "ping-restart 60"]
    assert c.remotes == [Remote("127.0.0.1", 1194, "udp")]
    assert not isinstance(s.new_control_wrap(), TLSCryptV2Client)
    assert s.new_control_wrap().server and not c.new_control_wrap().server


# --- fuzz: only ConfigError escapes ---------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_WORDS = st.sampled_from(["client", "dev", "tun", "remote", "192.0.2.1", "port", "1194", "server",
                          "198.51.100.0", "255.255.255.0", "push", '"route', "<ca>", "</ca>",
                          "keepalive", "10", "60", "\\", "'", '"', "#", "ca", "x\0y", "-1",
                          "99999999999999999999", "٣", "route-ipv6", "2001:db8::/64", "cd",
                          "config", "tls-auth", "ifconfig-pool", "topology", "subnet", "\n"])


@given(st.lists(st.lists(_WORDS, max_size=5).map(" ".join), max_size=8).map("\n".join))
@settings(max_examples=400, deadline=None)
def test_fuzz_loads_only_config_error(text):
    try:
        loads(text, "/nonexistent/fuzz.conf")
    except ConfigError:
        pass


@given(st.text(max_size=80))
@settings(max_examples=400, deadline=None)
def test_fuzz_split_line_only_tokenize_error(line):
    try:
        split_line(line)
    except TokenizeError:
        pass


# --- honest support: NOOP / unsupported / not yet in ovpnctl (H19) -----------------------------

SERVER_HEAD = ("server 198.51.100.0 255.255.255.0\ndev tun\ntopology subnet\n"
               f"<ca>\n{CERT}</ca>\n<cert>\n{CERT}</cert>\n<key>\n{PKEY}</key>\n")


def _load_error(text: str, path: str = "/etc/openvpn/x.conf") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, path)
    return info.value


def test_noop_directives_each_load_and_have_a_reason() -> None:
    from bsd_ovpn.config import NOT_YET_SUPPORTED, UNSUPPORTED_DIRECTIVES
    for name, reason in NOOP_DIRECTIVES.items():
        assert len(reason) > 20, name
        args = {"sndbuf": " 393216", "rcvbuf": " 393216", "txqueuelen": " 1000",
                "route-delay": " 2", "key-derivation": " tls-ekm"}.get(name, "")
        c = loads(CLIENT_HEAD + CLIENT_TAIL + name + args + "\n")
        assert name not in c.origins                       # recorded nowhere
    # directives whose absence weakens security or changes who may connect are never NOOPs
    weakening = {"remote-cert-eku", "tls-cipher", "tls-ciphersuites", "tls-groups",
                 "tls-version-max", "tls-crypt-v2-verify", "auth-gen-token", "bind",
                 "persist-remote-ip", "push-peer-info", "pull-filter", "ping-exit",
                 "username-as-common-name", "ifconfig-pool-persist", "reneg-bytes",
                 "reneg-pkts"}
    assert not weakening & set(NOOP_DIRECTIVES)
    assert not set(NOOP_DIRECTIVES) & set(UNSUPPORTED_DIRECTIVES)
    assert not set(NOOP_DIRECTIVES) & set(NOT_YET_SUPPORTED)


@pytest.mark.parametrize("line,fragment", [
    ("tls-crypt-v2-verify /usr/local/bin/check-key", "tls-crypt-v2 key metadata"),
    ("auth-gen-token 3600 external-auth", "session tokens are not implemented"),
    ("auth-gen-token", "session tokens are not implemented"),
])
def test_unsupported_security_directives_name_file_line(line: str, fragment: str) -> None:
    err = _load_error(SERVER_HEAD + line + "\n")
    assert err.line == len(SERVER_HEAD.splitlines()) + 1 and err.path == "/etc/openvpn/x.conf"
    assert err.directive == line.split()[0]
    assert "not supported" in str(err) and fragment in str(err)


def test_setenv_opt_cannot_smuggle_a_refused_directive() -> None:
    n = len(SERVER_HEAD.splitlines())
    err = _load_error(SERVER_HEAD + "setenv opt tls-crypt-v2-verify /bin/check\n")
    assert err.directive == "tls-crypt-v2-verify" and err.line == n + 1
    err = _load_error(SERVER_HEAD + "ignore-unknown-option auth-gen-token\nauth-gen-token\n")
    assert err.directive == "auth-gen-token" and err.line == n + 2


@pytest.mark.parametrize("value", ["TLS Web Server Authentication", "1.3.6.1.5.5.7.3.1",
                                   "1.3.6.1.4.1.55555.7.1"])
def test_remote_cert_eku_reaches_tls_config(value: str) -> None:
    from bsd_ovpn.settings import tls_config_from
    c = loads(CLIENT_HEAD + CLIENT_TAIL + f'remote-cert-eku "{value}"\n')
    assert c.remote_cert_eku == value
    assert tls_config_from(c).remote_cert_eku == value


@pytest.mark.parametrize("line,fragment", [
    ("remote-cert-eku serverAuth", "write 'TLS Web Server Authentication' or the dotted OID"),
    ('remote-cert-eku "Web Server"', "neither a dotted OID nor an OpenSSL object name"),
    ("tls-cipher BOGUS:ECDHE-ECDSA-AES128-GCM-SHA256", "'BOGUS' matches no cipher suite"),
    ("tls-cipher TLS-RSA-WITH-AES-128-CBC-SHA", "cannot translate"),
    ("tls-ciphersuites TLS_AES_256_GCM_SHA384:TLS_FOO", "unknown TLS 1.3 suite 'TLS_FOO'"),
    ("tls-groups X25519:bogus", "unknown group 'bogus'"),
    ("tls-version-max 1.4", "must be one of"),
    ("tls-version-max 1.1", "below TLS 1.2"),
])
def test_tls_policy_errors_name_file_line(line: str, fragment: str) -> None:
    err = _load_error(CLIENT_HEAD + line + "\n" + CLIENT_TAIL)
    assert err.line == 4 and err.directive == line.split()[0], str(err)
    assert fragment in str(err)


def test_tls_version_range_must_not_be_empty() -> None:
    err = _load_error(CLIENT_HEAD + "tls-version-min 1.3\ntls-version-max 1.2\n" + CLIENT_TAIL)
    assert err.directive == "tls-version-max" and err.line == 5
    assert "tls-version-max 1.2 is below tls-version-min 1.3: no TLS version is left" in str(err)
    # or-highest does not rescue it: it only lowers min to what the library can do
    err = _load_error(CLIENT_HEAD + "tls-version-min 1.3 or-highest\ntls-version-max 1.2\n"
                      + CLIENT_TAIL)
    assert "no TLS version is left" in str(err)


def test_tls_policy_reaches_tls_config() -> None:
    from bsd_ovpn.settings import client_settings_from
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "tls-version-min 1.0\ntls-version-max 1.3\n"
              "tls-cipher TLS-ECDHE-ECDSA-WITH-AES-256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384\n"
              "tls-ciphersuites TLS-AES-256-GCM-SHA384\ntls-groups X25519:secp256r1\n")
    tls = client_settings_from(c).tls
    assert tls.tls_version_min == "1.2" and tls.tls_version_max == "1.3"
    assert tls.tls_cipher.startswith("TLS-ECDHE-ECDSA")
    assert tls._cipher_list == b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
    assert tls._ciphersuites == b"TLS_AES_256_GCM_SHA384"
    assert tls._groups == b"X25519:secp256r1"


@pytest.mark.parametrize("head,line,directive", [
    (SERVER_HEAD, "reneg-bytes 1000000", "reneg-bytes"),
    (SERVER_HEAD, "reneg-pkts 1000", "reneg-pkts"),
    (CLIENT_HEAD, "reneg-bytes 1000000", "reneg-bytes"),
    (CLIENT_HEAD, "ping-exit 60", "ping-exit"),
    (CLIENT_HEAD, "pull-filter ignore redirect-gateway", "pull-filter"),
    (CLIENT_HEAD, "persist-remote-ip", "persist-remote-ip"),
    (CLIENT_HEAD, "route-metric 50", "route-metric"),
])
def test_not_yet_supported_by_ovpnctl(head: str, line: str, directive: str) -> None:
    tail = CLIENT_TAIL if head is CLIENT_HEAD else ""
    err = _load_error(head + tail + line + "\n")
    assert err.directive == directive
    assert err.line == len((head + tail).splitlines()) + 1
    assert "not supported yet by ovpnctl" in str(err)


@pytest.mark.parametrize("line", ["reneg-bytes 0", "reneg-pkts 0", "ping-exit 0", "bind"])
def test_not_yet_supported_directives_without_effect_load(line: str) -> None:
    c = loads(CLIENT_HEAD + CLIENT_TAIL + line + "\n")
    assert not c.bind_ipv6only and c.reneg_bytes == c.reneg_pkts == c.ping_exit == 0


@pytest.fixture
def daemons_ready(monkeypatch: pytest.MonkeyPatch):
    """As if the daemons implemented every NOT_YET_SUPPORTED directive (parsing tests)."""
    import bsd_ovpn.config as configmod
    monkeypatch.setattr(configmod, "NOT_YET_SUPPORTED", {})


def test_pending_directives_parse_into_typed_fields(daemons_ready, tmp_path) -> None:
    from bsd_ovpn.config import PoolPersist
    c = loads(SERVER_HEAD + "username-as-common-name\nifconfig-pool-persist ipp.txt 0\n"
              "reneg-bytes 64000000\nreneg-pkts 100000\nbind ipv6only\n",
              str(tmp_path / "s.conf"))
    assert c.username_as_common_name and c.bind_ipv6only
    assert c.ifconfig_pool_persist == PoolPersist(str(tmp_path / "ipp.txt"), 0)
    assert (c.reneg_bytes, c.reneg_pkts) == (64000000, 100000)
    c = loads(SERVER_HEAD + "ifconfig-pool-persist /var/lib/ipp.txt\n")
    assert c.ifconfig_pool_persist == PoolPersist("/var/lib/ipp.txt", 600)
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "ping-exit 120\npull-filter ignore \"route \"\n"
              "pull-filter reject redirect-gateway\npersist-remote-ip\nroute-metric 50\n")
    assert c.ping_exit == 120 and c.persist_remote_ip and c.route_metric == 50
    assert c.pull_filters == [("ignore", "route "), ("reject", "redirect-gateway")]


@pytest.mark.parametrize("head,line,fragment", [
    (CLIENT_HEAD, "username-as-common-name", "only valid in a server"),
    (CLIENT_HEAD, "ifconfig-pool-persist ipp.txt", "only valid in a server"),
    (SERVER_HEAD, "pull-filter accept route", "only valid on a client"),
    (SERVER_HEAD, "persist-remote-ip", "only valid on a client"),
    (CLIENT_HEAD, "pull-filter drop route", "must be one of: accept, ignore, reject"),
    (CLIENT_HEAD, 'pull-filter ignore ""', "would match every pushed option"),
    (CLIENT_HEAD, "ifconfig-pool-persist ipp.txt -1", "seconds -1 outside 0.."),
    (CLIENT_HEAD, "ifconfig-pool-persist /tmp", "is a directory"),
    (CLIENT_HEAD, "reneg-bytes lots", "not an integer"),
    (CLIENT_HEAD, "ping-exit -5", "outside 0.."),
    (CLIENT_HEAD, "bind ipv4only", "must be one of: ipv6only"),
])
def test_pending_directive_validation(daemons_ready, head: str, line: str,
                                      fragment: str) -> None:
    tail = CLIENT_TAIL if head is CLIENT_HEAD else ""
    err = _load_error(head + tail + line + "\n")
    assert err.directive == line.split()[0] and fragment in str(err), str(err)


def test_pull_filter_without_pull(daemons_ready) -> None:
    err = _load_error("tls-client\ndev tun\nremote 192.0.2.1\n" + CLIENT_TAIL
                      + "pull-filter ignore route\n")
    assert err.directive == "pull-filter" and "needs pull" in str(err)


def test_pull_filter_action_follows_openvpn() -> None:
    from bsd_ovpn.config import pull_filter_action
    filters = [("accept", "route 192.0.2."), ("ignore", "route "), ("reject", "redirect-gateway"),
               ("ignore", "dhcp-option DNS")]
    assert pull_filter_action(filters, "route 192.0.2.0 255.255.255.0") == "accept"
    assert pull_filter_action(filters, "route 198.51.100.0 255.255.255.0") == "ignore"
    assert pull_filter_action(filters, "  route 198.51.100.0") == "ignore"   # leading blanks
    assert pull_filter_action(filters, "route-gateway 198.51.100.1") == "accept"  # "route "
    assert pull_filter_action(filters, "redirect-gateway def1") == "reject"
    assert pull_filter_action(filters, "dhcp-option DNS 192.0.2.53") == "ignore"
    assert pull_filter_action(filters, "topology subnet") == "accept"
    assert pull_filter_action([], "anything") == "accept"
    assert pull_filter_action([("ignore", "route"), ("accept", "route")],
                              "route-gateway x") == "ignore"           # first match wins


def test_push_peer_info_cannot_send_uv_variables() -> None:
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "push-peer-info\nsetenv FOO bar\n")
    assert c.push_peer_info
    err = _load_error(CLIENT_HEAD + CLIENT_TAIL + "push-peer-info\nsetenv UV_GROUP admins\n")
    assert err.directive == "push-peer-info" and "UV_GROUP" in str(err)


def test_walkthrough_table_lists_exactly_what_config_does() -> None:
    """README.rst: the NOOP row is NOOP_DIRECTIVES; refused/not-yet ones say "no"."""
    import pathlib
    import re
    from bsd_ovpn.config import NOT_YET_SUPPORTED, UNSUPPORTED_DIRECTIVES
    doc = (pathlib.Path(__file__).resolve().parents[2] / "README.rst").read_text()
    table = doc[doc.index("Supported, compared with OpenVPN 2.6"):]
    rows = re.findall(r"^   \* - (.*)\n     - (.*)\n", table, re.M)
    status: dict[str, set[str]] = {}
    for feature, verdict in rows:
        for lit in re.findall(r"``([^`]+)``", feature):
            status.setdefault(lit.split()[0].strip("<>/"), set()).add(verdict.strip())
    noop_row = [f for f, _ in rows if "config.NOOP_DIRECTIVES" in f]
    assert len(noop_row) == 1
    listed = {lit for lit in re.findall(r"``([^`]+)``", noop_row[0])} - {"config.NOOP_DIRECTIVES"}
    assert listed == set(NOOP_DIRECTIVES)
    for d in set(NOT_YET_SUPPORTED) | set(UNSUPPORTED_DIRECTIVES):
        assert "no" in status.get(d, set()), d
    # directives that wait for the daemons: "no" exactly while config.py refuses them
    for d in ("username-as-common-name", "ifconfig-pool-persist", "reneg-bytes", "reneg-pkts",
              "ping-exit", "pull-filter", "persist-remote-ip", "route-metric", "bind"):
        want = {"no"} if d in NOT_YET_SUPPORTED else {"yes"}
        assert status[d] == want, (d, "update README.rst's table")
    for d in ("remote-cert-eku", "tls-cipher", "tls-ciphersuites", "tls-groups",
              "tls-version-max"):
        assert status[d] == {"yes"}, d
    assert status["push-peer-info"] == {"accepted, no effect"}


def test_replay_window_is_the_kernels_fixed_64() -> None:
    c = loads(CLIENT_HEAD + CLIENT_TAIL + "replay-window 64 30\n")
    assert c.replay_window == (64, 30)
    for n in (32, 128):
        err = _load_error(CLIENT_HEAD + f"replay-window {n}\n" + CLIENT_TAIL)
        assert err.directive == "replay-window" and err.line == 4
        assert "fixed at 64 packets" in str(err)


def test_mssfix_only_off() -> None:
    assert loads(CLIENT_HEAD + CLIENT_TAIL + "mssfix 0\n").mssfix == 0
    for line in ("mssfix", "mssfix 1400", "mssfix 1450 mtu"):
        err = _load_error(CLIENT_HEAD + line + "\n" + CLIENT_TAIL)
        assert err.directive == "mssfix" and err.line == 4
        assert "does not clamp TCP MSS" in str(err)
    err = _load_error(CLIENT_HEAD + "mssfix 0 sometimes\n" + CLIENT_TAIL)
    assert "must be one of: mtu, fixed" in str(err)
