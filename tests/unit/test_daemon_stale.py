"""The owner records that let a restarted daemon remove its crashed predecessor's interface.

Runs against the real userspace engine (in-process, fake host edge), so
"destroyed" means the engine no longer lists the interface or its peers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bsd_ovpn.daemon.loop import create_interface
from bsd_ovpn.daemon.stale import InterfaceLedger, StaleInterfaceError, pid_alive
from bsd_ovpn.engines import open_transport


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


@pytest.fixture
def transport(engine_daemon):
    tr = open_transport("userspace", socket_path=engine_daemon.path)
    try:
        yield tr
    finally:
        for name in tr.list_interfaces():
            tr.destroy_interface(name)
        tr.close()


def crashed(transport, tmp_path: Path, dev: str, config: str) -> str:
    """What `kill -9` leaves: an interface with a peer, a record naming a dead pid."""
    ifc = create_interface(transport, dev, ifmode="subnet")
    ifc.detach()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    ifc.new_peer(0, s, ("127.0.0.1", 1194))
    s.close()
    InterfaceLedger(transport, config=config, control=str(tmp_path / "dead.ctl"),
                    directory=str(tmp_path / "owners"), pid=dead_pid()).record(ifc.name)
    return ifc.name


def test_restart_destroys_the_named_interface_of_a_dead_daemon(transport, tmp_path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text("dev tunstale0\n")
    crashed(transport, tmp_path, "tunstale0", str(tmp_path / "other.conf"))
    assert transport.list_interfaces() == ["tunstale0"]
    ledger = InterfaceLedger(transport, config=str(conf), control=str(tmp_path / "a.ctl"),
                             directory=str(tmp_path / "owners"))
    assert ledger.sweep("tunstale0") == ["tunstale0"]
    assert transport.list_interfaces() == []
    assert os.listdir(tmp_path / "owners") == []
    # and the start goes on cleanly with the same name
    ifc = create_interface(transport, "tunstale0", ifmode="subnet")
    ledger.record(ifc.name)
    assert len(os.listdir(tmp_path / "owners")) == 1
    ifc.close()
    ledger.release()
    assert os.listdir(tmp_path / "owners") == []


def test_dev_tun_matches_by_config_file_only(transport, tmp_path) -> None:
    mine, other = tmp_path / "mine.conf", tmp_path / "other.conf"
    for p in (mine, other):
        p.write_text("dev tun\n")
    a = crashed(transport, tmp_path, "tun", str(mine))
    b = crashed(transport, tmp_path, "tun", str(other))
    assert sorted(transport.list_interfaces()) == sorted([a, b])
    ledger = InterfaceLedger(transport, config=str(mine), control=str(tmp_path / "m.ctl"),
                             directory=str(tmp_path / "owners"))
    assert ledger.sweep("tun") == [a]
    assert transport.list_interfaces() == [b]          # another config's leftovers stay


def test_interface_of_a_live_daemon_is_never_destroyed(transport, tmp_path) -> None:
    ifc = create_interface(transport, "tunlive0", ifmode="subnet")
    ifc.detach()
    ctl = tmp_path / "live.ctl"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(ctl))
    srv.listen(1)
    try:
        # pid dead but its control socket answers: still treated as alive
        InterfaceLedger(transport, config=None, control=str(ctl),
                        directory=str(tmp_path / "owners"), pid=dead_pid()).record("tunlive0")
        ledger = InterfaceLedger(transport, config=None, control=None,
                                 directory=str(tmp_path / "owners"))
        with pytest.raises(StaleInterfaceError, match=r"tunlive0 belongs to a running daemon"):
            ledger.sweep("tunlive0")
        assert transport.list_interfaces() == ["tunlive0"]
    finally:
        srv.close()
    # a live pid (this test process) counts too
    other = InterfaceLedger(transport, config=None, control=None,
                            directory=str(tmp_path / "owners2"), pid=os.getpid())
    other.record("tunlive0")
    fresh = InterfaceLedger(transport, config=None, control=None,
                            directory=str(tmp_path / "owners2"), pid=os.getpid() + 1_000_000)
    with pytest.raises(StaleInterfaceError):
        fresh.sweep("tunlive0")
    assert transport.list_interfaces() == ["tunlive0"]


def test_unrecorded_interface_and_gone_interface(transport, tmp_path) -> None:
    # an interface nobody recorded (made by hand): left alone, create fails as before
    ifc = create_interface(transport, "tunhand0", ifmode="subnet")
    ifc.detach()
    ledger = InterfaceLedger(transport, config=None, control=None,
                             directory=str(tmp_path / "owners"))
    assert ledger.sweep("tunhand0") == []
    assert transport.list_interfaces() == ["tunhand0"]
    # a record whose interface vanished already (engine restarted): record dropped, no error
    InterfaceLedger(transport, config=None, control=None, directory=str(tmp_path / "owners"),
                    pid=dead_pid()).record("tungone0")
    assert ledger.sweep("tungone0") == []
    assert os.listdir(tmp_path / "owners") == []


def test_garbage_record_is_ignored(transport, tmp_path, caplog) -> None:
    d = tmp_path / "owners"
    ledger = InterfaceLedger(transport, config=None, control=None, directory=str(d))
    d.mkdir()
    (d / f"{ledger._prefix}tunx.json").write_bytes(b"\x00not json" * 1000)
    assert ledger.sweep("tunx") == []
    assert "unreadable interface owner record" in caplog.text


def test_records_of_dead_owners_whose_interface_is_gone_are_collected(transport,
                                                                       tmp_path) -> None:
    d = str(tmp_path / "owners")
    InterfaceLedger(transport, config=None, control=None, directory=d,
                    pid=dead_pid()).record("tunold0")          # engine restarted since
    kept = crashed(transport, tmp_path, "tunkeep0", str(tmp_path / "x.conf"))
    ledger = InterfaceLedger(transport, config=None, control=None, directory=d)
    assert ledger.sweep("tunother0") == []
    assert [r.ifname for _p, r in ledger.records()] == [kept]   # its interface still exists
    assert transport.list_interfaces() == [kept]
