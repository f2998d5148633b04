"""README.rst stays true: configs, command reference, the OpenVPN 2.6 table.

The walkthrough is what a new user copies from, so its config files are
parsed and checked by the daemons' own checks, its command reference must be
what ``ovpnctl --help`` prints today, and its support table must cover every
directive the parser refuses and claim support only for directives the parser
knows.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from bsd_ovpn import config as configmod

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "README.rst"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_command_reference_is_current() -> None:
    gen = _gen()
    text = DOC.read_text()
    assert gen.splice(text, gen.reference(), str(DOC)) == text, (
        f"stale command reference in {DOC.name}: run python3 docs/gen_reference.py "
        f"--write {DOC.relative_to(REPO)}")


def test_command_reference_covers_every_command() -> None:
    import click

    from bsd_ovpn.cli import cli

    gen = _gen()
    block = gen.reference()
    for path, cmd in gen.commands(cli):
        if path and not isinstance(cmd, click.Group):
            assert f"``ovpnctl {' '.join(path)}``" in block
    assert "ovpnctl demo" in block and "ovpnctl install-service" in block


def test_splice_refuses_a_file_without_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        _gen().splice("no markers here\n", "x", "README.rst")


def _code_blocks(text: str) -> list[str]:
    """The bodies of ``.. code-block:: text`` directives."""
    out = []
    for m in re.finditer(r"^( *)\.\. code-block:: text\n\n((?:\1   .*\n|\n)+)", text, re.M):
        indent = len(m.group(1)) + 4
        out.append("".join(ln[indent:] + "\n" for ln in m.group(2).splitlines()).strip() + "\n")
    return out


@pytest.fixture
def material(tmp_path: Path) -> Path:
    """ca.crt, server/alice certificates and tc.key where the doc's configs expect them."""
    from bsd_ovpn.proto import keyfile
    from bsd_ovpn.testbed.pki import PKI

    pki = PKI(tmp_path / "pki")
    shutil.copy(pki.ca_path, tmp_path / "ca.crt")
    for cred, stem in ((pki.server("server"), "server"), (pki.client("alice"), "alice")):
        shutil.copy(cred.cert_path, tmp_path / f"{stem}.crt")
        shutil.copy(cred.key_path, tmp_path / f"{stem}.key")
    (tmp_path / "tc.key").write_text(keyfile.genkey("tls-crypt"))
    (tmp_path / "ccd").mkdir()
    return tmp_path


def test_walkthrough_configs_are_accepted(material: Path) -> None:
    from bsd_ovpn.daemon.client import check_client_config
    from bsd_ovpn.daemon.server import check_server_config

    blocks = _code_blocks(DOC.read_text())
    servers = [b for b in blocks if "ovpnctl server -c" in b.splitlines()[0]]
    clients = [b for b in blocks if "ovpnctl client -c" in b.splitlines()[0]]
    ccd = [b for b in blocks if b.startswith("ifconfig-push")]
    assert len(servers) == 1 and len(clients) == 1 and len(ccd) == 1
    (material / "server.conf").write_text(servers[0])
    (material / "client.conf").write_text(clients[0])
    srv = configmod.load(material / "server.conf")
    check_server_config(srv)
    assert srv.server_ipv6 == "2001:db8:100::/64" and srv.client_config_dir
    cli = configmod.load(material / "client.conf")
    check_client_config(cli)
    assert [r.host for r in cli.remotes] == ["192.0.2.1"]
    configmod.loads_ccd(ccd[0])


_ADDR = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3})(?:/\d+)?\b|\b([0-9a-f]{1,4}(?::[0-9a-f]{0,4}){2,7})")


def test_walkthrough_uses_documentation_addresses_only() -> None:
    import ipaddress

    allowed = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24",
                                                 "2001:db8::/32", "255.255.255.0/24",
                                                 "0.0.0.0/32", "127.0.0.0/8")]
    for m in _ADDR.finditer(DOC.read_text()):
        text = m.group(1) or m.group(2)
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue                     # a time like 18:51:28 or a version number
        assert any(addr in n for n in allowed if n.version == addr.version), text


def _table_rows(text: str) -> list[tuple[str, str]]:
    """(feature cell, status cell) of the support table."""
    table = text[text.index("Supported, compared with OpenVPN 2.6"):]
    rows = re.findall(r"^   \* - (.*)\n     - (.*)\n", table, re.M)
    return [(f, s.strip()) for f, s in rows[1:]]            # without the header


def _directives(cell: str) -> set[str]:
    names = set()
    for lit in re.findall(r"``([^`]+)``", cell):
        word = lit.split()[0].strip("<>/")
        if re.fullmatch(r"[a-z][a-z0-9-]*", word):
            names.add(word)
    return names


def test_support_table_matches_the_parser() -> None:
    rows = _table_rows(DOC.read_text())
    assert len(rows) > 30
    known = set(configmod._HANDLERS) | set(configmod._CCD_HANDLERS) | set(configmod.NOOP_DIRECTIVES)
    refused: set[str] = set()
    for feature, status in rows:
        assert status in ("yes", "no", "always", "accepted, no effect"), status
        names = _directives(feature)
        if status == "no":
            refused |= names
        else:
            unknown = names - known
            assert not unknown, f"table says {status!r} for directives the parser does not " \
                                f"accept: {sorted(unknown)}"
        if status == "accepted, no effect":
            # a directive the daemons really use must not be documented as ignored
            assert not names & {"keepalive", "reneg-sec", "status", "user", "push"}
    missing = set(configmod.UNSUPPORTED_DIRECTIVES) - refused
    assert not missing, f"refused by config.py but not listed as 'no': {sorted(missing)}"


def test_walkthrough_is_valid_rst() -> None:
    docutils_core = pytest.importorskip("docutils.core")
    import io

    warnings = io.StringIO()
    docutils_core.publish_doctree(DOC.read_text(), settings_overrides={
        "warning_stream": warnings, "report_level": 2, "halt_level": 5})
    assert warnings.getvalue() == ""
